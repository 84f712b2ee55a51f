"""train.py / merits.training: options, output-folder policy, feature-only training, resume, faults.

Fast tests train tiny models on small synthetic feature datasets (api.md section 5) written in tmp
folders; the slow ones run the demo end to end and a 2-process gloo DDP run with torchrun.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from merits.training.arguments import ConfigError, parse_args
from merits.training.checkpointing import OutputDirError, prepare_output_dir
from merits.training.stages import DataError, final_results, run_training


REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "merits-l": {"context_text_hidden_size": 8, "context_audio_hidden_size": 8, "fusion_hidden_size": 16,
                 "fusion_num_blocks": 1, "fusion_attention_size": 12, "fusion_num_heads": 3, "fusion_head_hidden_size": 16},
    "mister-e": {"context_text_hidden_size": 8, "context_audio_hidden_size": 8, "context_conv_channels": 8,
                 "fusion_hidden_size": 16, "fusion_num_blocks": 1, "fusion_attention_size": 12, "fusion_num_heads": 3,
                 "fusion_head_hidden_size": 16, "gate_hidden_size": 5},
}


def write_features(path: Path, num_dialogues: int, seed: int, text_noise=1.5, audio_noise=1.5, labels=("a", "b", "c"),
                   nan_at=None, value_scale=1.0):
    """Conversations whose label persists across turns; each modality is a noisy view of it."""
    import datasets

    rng = np.random.default_rng(seed)
    centers_t = np.random.default_rng(100).normal(size=(len(labels), 6))
    centers_a = np.random.default_rng(101).normal(size=(len(labels), 5))
    rows = {"dialogue_id": [], "turn": [], "label": [], "text_embeds": [], "audio_embeds": []}
    for d in range(num_dialogues):
        label = int(rng.integers(len(labels)))
        for t in range(int(rng.integers(3, 7))):
            if rng.random() < 0.25:
                label = int(rng.integers(len(labels)))
            text = centers_t[label] + text_noise * rng.normal(size=6)
            audio = centers_a[label] + audio_noise * rng.normal(size=5)
            rows["dialogue_id"].append(f"d{d}")
            rows["turn"].append(t)
            rows["label"].append(labels[label])
            rows["text_embeds"].append((value_scale * text).tolist())
            rows["audio_embeds"].append((value_scale * audio).tolist())
    if nan_at is not None:
        rows["text_embeds"][nan_at][0] = float("nan")
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return {
        "train": str(write_features(root / "train", 60, 0)),
        "validation": str(write_features(root / "validation", 20, 1)),
        "test": str(write_features(root / "test", 20, 2)),
    }


def feature_argv(features, out, architecture="merits-l", epochs=3, extra=()):
    argv = ["--architecture", architecture, "--train_features", features["train"],
            "--validation_features", features["validation"], "--test_features", features["test"],
            "--output_dir", str(out), "--report_to", "none", "--seed", "0",
            "--model", json.dumps(TINY_MODEL[architecture]),
            "--context.num_epochs", str(epochs), "--fusion.num_epochs", str(epochs), "--moe.num_epochs", str(epochs),
            "--context.batch_size", "8", "--fusion.batch_size", "8", "--moe.batch_size", "8",
            "--context.learning_rate", "5e-3", "--fusion.learning_rate", "5e-3", "--moe.learning_rate", "5e-3",
            "--checkpointing_steps", "4"]
    return argv + list(extra)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def test_yaml_and_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("architecture: mister-e\ndata_dir: ../shared/data/meld\nmoe: {learning_rate: 1e-5, num_epochs: 4}\n")
    args = parse_args(["--config", str(config), "--moe.num_epochs", "7", "--resume", "--model.gate_mode", "vote"])
    assert args.architecture == "mister-e" and args.resume is True
    assert args.moe.learning_rate == pytest.approx(1e-5) and isinstance(args.moe.learning_rate, float)
    assert args.moe.num_epochs == 7 and args.model == {"gate_mode": "vote"}
    assert args.output_dir.endswith("outputs/c")
    assert args.stages_for("mister-e") == ["utterance", "moe"]
    os.environ["MERITS_SHARED_DATA"] = "/elsewhere/data"
    try:
        assert parse_args(["--config", str(config)]).data_dir == "/elsewhere/data/meld"
    finally:
        del os.environ["MERITS_SHARED_DATA"]


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'"):
        parse_args(["--learning_rat", "1"], default_config=None)
    with pytest.raises(ConfigError, match="moe.num_epochs"):
        parse_args(["--moe.num_epochs", "many"], default_config=None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("utterance: {speed: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'utterance.speed'"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="validation_features"):
        parse_args(["--architecture", "merits-l", "--train_features", "x"], default_config=None)


def test_every_shipped_config_parses():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert any(c.name == "demo.yaml" for c in configs)
    for config in configs:
        args = parse_args(["--config", str(config)])
        for architecture in args.architectures():
            assert args.stages_for(architecture)


# ----------------------------------------------------------------------------------------------
# output folder
# ----------------------------------------------------------------------------------------------
def test_output_dir_policy(tmp_path):
    out = tmp_path / "run"
    assert prepare_output_dir(out, {"seed": 1}, resume=False, overwrite=False, is_main_process=True) is False
    (out / "marker").write_text("x")
    with pytest.raises(OutputDirError, match="already holds another run"):
        prepare_output_dir(out, {"seed": 1}, resume=False, overwrite=False, is_main_process=True)
    with pytest.raises(OutputDirError, match="options differ"):
        prepare_output_dir(out, {"seed": 2}, resume=True, overwrite=False, is_main_process=True)
    assert prepare_output_dir(out, {"seed": 1}, resume=True, overwrite=False, is_main_process=True) is True
    assert prepare_output_dir(out, {"seed": 2}, resume=False, overwrite=True, is_main_process=True) is False
    assert not (out / "marker").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="refusing to delete"):
        prepare_output_dir(foreign, {}, resume=False, overwrite=True, is_main_process=True)
    assert (foreign / "precious.txt").exists()


# ----------------------------------------------------------------------------------------------
# feature-only training (api.md section 6)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_feature_only_training(features, tmp_path, architecture):
    out = tmp_path / architecture
    results = run_training(parse_args(feature_argv(features, out, architecture, epochs=4)))
    saved = json.loads((out / "all_results.json").read_text())
    assert saved == pytest.approx(results)
    if architecture == "merits-l":
        for key in ("validation_stage2_text_weighted_f1", "validation_stage2_audio_weighted_f1",
                    "validation_stage3_weighted_f1", "test_stage3_weighted_f1"):
            assert 0.0 <= saved[key] <= 1.0, key
        assert saved["test_weighted_f1"] == saved["test_stage3_weighted_f1"]
        # the noisy modalities alone are far from perfect; fused context must beat chance clearly
        assert saved["validation_stage3_weighted_f1"] > 0.5
    else:
        for key in ("validation_moe_weighted_f1", "validation_moe_speech_expert_weighted_f1",
                    "validation_moe_text_expert_weighted_f1", "validation_moe_cross_modal_expert_weighted_f1"):
            assert 0.0 <= saved[key] <= 1.0, key
        assert saved["validation_weighted_f1"] > 0.5
    best = out / "best"
    for name in ("config.json", "model.safetensors", "modeling_merits.py", "README.md"):
        assert (best / name).is_file(), name
    card = (best / "README.md").read_text()
    assert "model-index" in card and "test_weighted_f1" in card
    assert list((out / "confusion_matrices").glob("*.png"))
    from merits import MeritsForConversationClassification

    reloaded = MeritsForConversationClassification.from_pretrained(str(best))
    assert reloaded.config.architecture == architecture


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_unbroken_run(features, tmp_path):
    """A run hard-killed mid-stage (os._exit, like SIGKILL) and resumed ends with the same weights and metrics."""
    def run(out, extra=()):
        return subprocess.run([sys.executable, str(REPO / "train.py"), *feature_argv(features, out, epochs=3), *extra],
                              cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    unbroken = run(tmp_path / "unbroken")
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    killed = run(tmp_path / "killed", ["--debug_exit_after_step", "10"])
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "all_results.json").exists()
    refused = run(tmp_path / "killed")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run(tmp_path / "killed", ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = json.loads((tmp_path / "unbroken" / "all_results.json").read_text())
    b = json.loads((tmp_path / "killed" / "all_results.json").read_text())
    assert a == b
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "unbroken" / "best" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "best" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ----------------------------------------------------------------------------------------------
# bad input and faults
# ----------------------------------------------------------------------------------------------
def test_nan_features_are_refused_naming_the_row(features, tmp_path):
    bad = write_features(tmp_path / "nan", 5, 3, nan_at=7)
    argv = feature_argv({**features, "train": str(bad)}, tmp_path / "out")
    with pytest.raises(DataError, match=r"row 7 .*NaN"):
        run_training(parse_args(argv))


def test_validation_label_unseen_in_training(features, tmp_path):
    train = write_features(tmp_path / "train2", 10, 4, labels=("a", "b"))
    validation = write_features(tmp_path / "val3", 5, 5, labels=("a", "b", "zzz"))
    argv = feature_argv({**features, "train": str(train), "validation": str(validation)}, tmp_path / "out")
    with pytest.raises(DataError, match="label 'zzz' is unknown"):
        run_training(parse_args(argv))


def test_empty_split_is_refused(features, tmp_path):
    import datasets

    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"dialogue_id": [], "turn": [], "label": [], "text_embeds": []}).save_to_disk(str(empty))
    with pytest.raises(DataError, match="empty"):
        run_training(parse_args(feature_argv({**features, "validation": str(empty)}, tmp_path / "out")))


def test_a_loss_that_turns_nan_stops_naming_the_step(features, tmp_path):
    from merits.training import NonFiniteLossError

    # an absurd learning rate blows the weights up after the first updates: the loss turns inf/NaN
    argv = feature_argv(features, tmp_path / "out", extra=["--context.learning_rate", "1e30", "--context.max_grad_norm", "none"])
    with pytest.raises(NonFiniteLossError, match=r"stage stage2: the training loss became .* optimizer step \d+"):
        run_training(parse_args(argv))


def test_final_results_pick_the_last_stage_head():
    results = {"validation_stage2_text_weighted_f1": 0.5, "validation_stage2_audio_weighted_f1": 0.4,
               "validation_moe_weighted_f1": 0.9, "validation_moe_text_expert_weighted_f1": 0.1}
    assert final_results(results, "stage2") == {"validation_weighted_f1": 0.5}
    assert final_results(results, "moe") == {"validation_weighted_f1": 0.9}


@pytest.mark.slow
def test_two_gloo_processes_reach_the_quality_of_one(features, tmp_path):
    """torchrun --nproc_per_node 2 (2 real CPU processes, gloo DDP) against a 1-process run."""
    def run(out, nproc):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(29500 + nproc), str(REPO / "train.py"), *feature_argv(features, out, epochs=4)]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    single, double = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    # every validation utterance is scored exactly once under DDP (gather_for_metrics drops the padding duplicates)
    assert two["validation_num_examples"] == one["validation_num_examples"]
    assert two["validation_weighted_f1"] >= one["validation_weighted_f1"] - 0.1
