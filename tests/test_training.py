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

from merits.hub import HUB_CODE_FILES
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
    for name in ("config.json", "model.safetensors", "README.md", *HUB_CODE_FILES):  # every remote-code file
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
def test_nan_features_are_refused_naming_the_dialogue_and_turn(features, tmp_path):
    import datasets

    bad = write_features(tmp_path / "nan", 5, 3, nan_at=7)
    row = datasets.load_from_disk(str(bad))[7]
    argv = feature_argv({**features, "train": str(bad)}, tmp_path / "out")
    expected = rf"row 7 \(dialogue '{row['dialogue_id']}', turn {row['turn']}\): text_embeds holds NaN or inf"
    with pytest.raises(DataError, match=expected):
        run_training(parse_args(argv))
    assert not (tmp_path / "out" / "all_results.json").exists()


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


def test_a_loss_read_later_still_names_its_step_and_is_never_checkpointed(features, tmp_path, monkeypatch):
    """The step losses are read back once per logging interval / checkpoint / epoch end, not per step: a NaN loss at
    optimizer step 3 is still reported as step 3 (batch 2), and the checkpoint due at step 4 is not written."""
    from merits import MeritsForConversationClassification
    from merits.training import NonFiniteLossError

    forward = MeritsForConversationClassification.forward
    calls = []

    def nan_at_third_training_call(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls.append(1)
            if len(calls) == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MeritsForConversationClassification, "forward", nan_at_third_training_call)
    argv = feature_argv(features, tmp_path / "out", extra=["--logging_steps", "100"])
    with pytest.raises(NonFiniteLossError, match=r"stage stage2: the training loss became nan at epoch 0, batch 2, "
                                                 r"optimizer step 3;"):
        run_training(parse_args(argv))
    assert len(calls) == 4  # read before the checkpoint due at step 4
    assert not list((tmp_path / "out").rglob("step_00000004"))


def test_final_results_pick_the_last_stage_head():
    results = {"validation_stage2_text_weighted_f1": 0.5, "validation_stage2_audio_weighted_f1": 0.4,
               "validation_moe_weighted_f1": 0.9, "validation_moe_text_expert_weighted_f1": 0.1}
    assert final_results(results, "stage2") == {"validation_weighted_f1": 0.5}
    assert final_results(results, "moe") == {"validation_weighted_f1": 0.9}


@pytest.mark.slow
def test_two_gloo_processes_reach_the_quality_of_one(features, tmp_path):
    """torchrun --nproc_per_node 2 (2 real CPU processes, gloo DDP) against a 1-process run."""
    def run(out, nproc, extra=()):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(29500 + nproc), str(REPO / "train.py"), *feature_argv(features, out, epochs=4), *extra]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def errors(result):  # torchrun's own summary closes stderr: show the ranks' errors above it too
        return "\n".join(line for line in result.stderr.splitlines() if "Error" in line)[-3000:] + result.stderr[-1500:]

    single, double = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, errors(double)
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    # two ranks of one DDP run, not two independent single-process runs racing on one folder
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    # every validation utterance is scored exactly once under DDP (gather_for_metrics drops the padding duplicates)
    assert two["validation_num_examples"] == one["validation_num_examples"]
    assert two["validation_weighted_f1"] >= one["validation_weighted_f1"] - 0.1

    # a 2-process run killed mid-stage and resumed (both ranks restore their own RNG state) ends like the unbroken one
    killed = run(tmp_path / "killed", 2, ["--debug_exit_after_step", "10"])
    assert killed.returncode != 0 and not (tmp_path / "killed" / "all_results.json").exists()
    resumed = run(tmp_path / "killed", 2, ["--resume"])
    assert resumed.returncode == 0, errors(resumed)
    assert "resumed from" in resumed.stdout
    assert json.loads((tmp_path / "killed" / "all_results.json").read_text()) == two


# ----------------------------------------------------------------------------------------------
# corpora: bad splits and labels
# ----------------------------------------------------------------------------------------------
DEMO_TINY = ["--dataset", "demo", "--dataset_options", "{num_dialogues: 24, seed: 0}", "--report_to", "none",
             "--seed", "0", "--utterance.num_epochs", "1", "--context.num_epochs", "2", "--fusion.num_epochs", "2",
             "--moe.num_epochs", "2", "--checkpointing_steps", "1000"]


def test_an_empty_corpus_split_is_refused(tmp_path):
    args = parse_args([*DEMO_TINY, "--output_dir", str(tmp_path / "out"), "--max_eval_dialogues", "0"])
    with pytest.raises(DataError, match="the validation split is missing or empty"):
        run_training(args)


def write_classlabel_features(path, num_dialogues, seed, names, drop=()):
    """write_features with a ClassLabel ``label`` (``names``) and the labels in ``drop`` left out."""
    import datasets

    write_features(path / "raw", num_dialogues, seed, labels=names)
    ds = datasets.load_from_disk(str(path / "raw"))
    ds = ds.filter(lambda row: row["label"] not in drop)
    ds = ds.cast_column("label", datasets.ClassLabel(names=list(names)))
    ds.save_to_disk(str(path / "ds"))
    return str(path / "ds")


def test_a_validation_label_unseen_in_training_warns_naming_the_turn(features, tmp_path):
    """Decision: a label *name* the training split does not know is an error (test above); a class of the label
    set that merely has no training example is a warning naming the first such dialogue and turn, and training
    goes on (those turns count as errors)."""
    from merits.training.stages import UnseenLabelWarning

    names = ("a", "b", "c")
    train = write_classlabel_features(tmp_path / "train", 12, 4, names, drop=("c",))
    validation = write_classlabel_features(tmp_path / "validation", 6, 5, names)
    argv = feature_argv({**features, "train": train, "validation": validation}, tmp_path / "out", epochs=1)
    with pytest.warns(UnseenLabelWarning, match=r"\[validation\] dialogue 'd\d+' turn \d+: label 'c' never occurs"):
        results = run_training(parse_args(argv))
    assert 0.0 <= results["validation_weighted_f1"] <= 1.0


def test_output_dir_policy_of_a_whole_run(features, tmp_path):
    out = tmp_path / "out"
    argv = lambda epochs, *extra: parse_args(feature_argv(features, out, epochs=epochs, extra=["--stages", "[context]", *extra]))
    run_training(argv(1))
    with pytest.raises(OutputDirError, match="already holds another run.*--resume.*--overwrite_output_dir"):
        run_training(argv(1))
    with pytest.raises(OutputDirError, match="options differ"):
        run_training(argv(2, "--resume"))
    # a finished run resumed with the same options: every stage is done, the results are read back
    again = run_training(argv(1, "--resume"))
    assert again == json.loads((out / "all_results.json").read_text())
    fresh = run_training(argv(2, "--overwrite_output_dir"))
    assert fresh["stage2_epochs"] == 2


# ----------------------------------------------------------------------------------------------
# MiSTER-E ablation switches (api: --model.<key>), through the trainer's model builder
# ----------------------------------------------------------------------------------------------
def _moe_outputs(features, tmp_path, **switches):
    from merits.data import FeatureCollator
    from merits.training.stages import build_model, load_feature_split

    args = parse_args(feature_argv(features, tmp_path / "unused", "mister-e",
                                   extra=["--model", json.dumps({**TINY_MODEL["mister-e"], **switches})]))
    train, label_names = load_feature_split(features["train"])
    torch.manual_seed(0)
    model = build_model(args, "mister-e", label_names, text_embed_dim=6, audio_embed_dim=5)
    model.eval()
    batch = FeatureCollator()(train[:6])
    with torch.no_grad():
        output = model(**batch, stage="moe")
    return model, batch, output


def test_ablation_switches_change_the_loss_terms_and_outputs(features, tmp_path):
    import torch.nn.functional as F

    model, batch, learned = _moe_outputs(features, tmp_path)
    terms = learned.loss_terms
    assert set(terms) == {"mixture", "expert_speech", "expert_text", "expert_cross_modal", "supcon", "kl"}
    classification = sum(terms[k] for k in ("mixture", "expert_speech", "expert_text", "expert_cross_modal"))
    assert learned.loss == pytest.approx(float(classification + 2.0 * terms["supcon"] + 0.1 * terms["kl"]), rel=1e-5)
    real = batch["turn_mask"].bool()

    _, _, no_supcon = _moe_outputs(features, tmp_path, supcon_weight=0.0)
    t = no_supcon.loss_terms
    assert no_supcon.loss == pytest.approx(float(classification + 0.1 * t["kl"]), rel=1e-5)
    _, _, no_kl = _moe_outputs(features, tmp_path, kl_weight=0.0)
    assert no_kl.loss == pytest.approx(float(classification + 2.0 * terms["supcon"]), rel=1e-5)

    _, _, mean = _moe_outputs(features, tmp_path, gate_mode="mean")
    assert torch.allclose(mean.gate_weights[real], torch.full_like(mean.gate_weights[real], 1 / 3))
    experts = torch.stack(mean.expert_logits, dim=-2)
    assert torch.allclose(mean.logits[real], experts.mean(-2)[real], atol=1e-5)

    _, _, vote = _moe_outputs(features, tmp_path, gate_mode="vote")
    # majority vote: the weight is spread over the experts that voted for the winning class, which therefore has
    # at least 2 of the 3 votes unless all three disagree
    weights = vote.gate_weights[real]
    expert_votes = torch.stack(vote.expert_logits, dim=-2)[real].argmax(-1)  # [N, 3]
    winner = vote.logits[real].argmax(-1)
    voters = expert_votes == winner.unsqueeze(-1)
    assert torch.allclose(weights, voters.float() / voters.sum(-1, keepdim=True))
    disagree = (expert_votes[:, 0] != expert_votes[:, 1]) & (expert_votes[:, 1] != expert_votes[:, 2]) & (expert_votes[:, 0] != expert_votes[:, 2])
    assert torch.all(voters.sum(-1)[~disagree] >= 2)
    assert not torch.allclose(vote.logits[real], learned.logits[real])

    _, _, single = _moe_outputs(features, tmp_path, experts=["text"])
    assert single.expert_logits[0] is None and single.expert_logits[2] is None
    assert torch.all(single.gate_weights[real] == torch.tensor([0.0, 1.0, 0.0]))
    assert set(single.loss_terms) == {"mixture", "expert_text"}

    _, _, ce = _moe_outputs(features, tmp_path, classification_loss="ce")
    labels = batch["labels"]
    expected = F.cross_entropy(ce.logits.reshape(-1, ce.logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert ce.loss_terms["mixture"] == pytest.approx(float(expected), rel=1e-5)
    assert ce.loss_terms["mixture"] > terms["mixture"]  # focal (gamma 3) down-weights every turn


def test_a_single_expert_mean_gate_run_trains_and_reports_only_its_expert(features, tmp_path):
    model = {**TINY_MODEL["mister-e"], "experts": ["text"], "gate_mode": "mean", "classification_loss": "ce",
             "supcon_weight": 0.0, "kl_weight": 0.0}
    out = tmp_path / "single"
    results = run_training(parse_args(feature_argv(features, out, "mister-e", epochs=2, extra=["--model", json.dumps(model)])))
    assert "validation_moe_text_expert_weighted_f1" in results
    assert not any("speech_expert" in k or "cross_modal_expert" in k for k in results)
    from merits import MeritsForConversationClassification

    reloaded = MeritsForConversationClassification.from_pretrained(str(out / "best"))
    assert reloaded.config.experts == ["text"] and reloaded.config.gate_mode == "mean"


# ----------------------------------------------------------------------------------------------
# the training loop: gradient accumulation, bf16
# ----------------------------------------------------------------------------------------------
def _equal_length_items(num_conversations=16, turns=5, seed=0):
    rng = np.random.default_rng(seed)
    return [[{"dialogue_id": f"d{d}", "turn": t, "label": int(rng.integers(3)),
              "text_embeds": rng.normal(size=12).astype(np.float32), "audio_embeds": rng.normal(size=10).astype(np.float32)}
             for t in range(turns)] for d in range(num_conversations)]


def _train_context_stage(tmp_path, accumulation, batch_size=8):
    from merits.data import FeatureCollator
    from merits.modeling_merits import MeritsForConversationClassification
    from merits.training.arguments import StageArguments
    from merits.training.loop import Head, StagePlan, run_stage

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import tiny_merits_config

    torch.manual_seed(0)
    model = MeritsForConversationClassification(tiny_merits_config("merits-l", context_dropout=0.0))
    for module in model.modules():  # no randomness left in the forward pass
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.GRU):
            module.dropout = 0.0
    arguments = StageArguments(num_epochs=1, learning_rate=1e-2, batch_size=batch_size, gradient_accumulation_steps=accumulation)
    plan = StagePlan("context", "stage2", [Head("text", "context_text_logits", "text_mask", ("text_context",))],
                     _equal_length_items(), _equal_length_items(4, seed=1), None, FeatureCollator(), arguments,
                     ["neutral", "happy", "sad"])
    run_args = parse_args(["--report_to", "none", "--seed", "0"], default_config=None)
    run_stage(model, plan, run_args, tmp_path / f"batch{batch_size}_accumulation{accumulation}", progress=False)
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("text_context.")}


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """batch 8 in one step == 2 accumulated micro-batches of 4 (equal-length conversations: equal loss means)."""
    whole = _train_context_stage(tmp_path, 1)
    accumulated = _train_context_stage(tmp_path, 2)
    smaller = _train_context_stage(tmp_path, 1, batch_size=4)  # twice the updates: must differ
    assert max((whole[k] - accumulated[k]).abs().max().item() for k in whole) < 1e-5
    assert max((whole[k] - smaller[k]).abs().max().item() for k in whole) > 1e-3


@pytest.mark.parametrize("keep_last_epoch", [False, True])
def test_keep_last_epoch_ends_with_the_last_epoch(tmp_path, keep_last_epoch):
    """StagePlan.keep_last_epoch (speaker-fold refits and final fits, which score themselves on their training data):
    the stage keeps the last epoch's weights even when an earlier epoch scored as well; otherwise the first best
    epoch stays selected. With a zero learning rate every epoch scores the same."""
    from merits.data import FeatureCollator
    from merits.modeling_merits import MeritsForConversationClassification
    from merits.training.arguments import StageArguments
    from merits.training.loop import Head, StagePlan, run_stage

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import tiny_merits_config

    torch.manual_seed(0)
    model = MeritsForConversationClassification(tiny_merits_config("merits-l"))
    plan = StagePlan("context", "stage2", [Head("text", "context_text_logits", "text_mask", ("text_context",))],
                     _equal_length_items(), _equal_length_items(), None, FeatureCollator(),
                     StageArguments(num_epochs=3, learning_rate=0.0, batch_size=4), ["neutral", "happy", "sad"],
                     keep_last_epoch=keep_last_epoch)
    run_args = parse_args(["--report_to", "none", "--seed", "0"], default_config=None)
    results, _ = run_stage(model, plan, run_args, tmp_path / "run", progress=False)
    assert results["stage2_text_best_epoch"] == (3 if keep_last_epoch else 1)


@pytest.mark.slow  # among the costliest of the quick loop (issue 20: --durations on 2 shared cores)
def test_bf16_option_runs(features, tmp_path):
    # its own process: Accelerate's state (and so the mixed precision) is fixed once per process
    out = tmp_path / "bf16"
    argv = feature_argv(features, out, "merits-l", epochs=1, extra=["--mixed_precision", "bf16", "--stages", "[context]"])
    run = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["validation_weighted_f1"] <= 1.0
    assert yaml_load(out / "run_config.yaml")["mixed_precision"] == "bf16"
    assert (out / "best" / "model.safetensors").is_file()


def yaml_load(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


# ----------------------------------------------------------------------------------------------
# stage 0 (LLM pseudo-labels) -> stage I initialised from it; LoRA on an LLM text backbone
# ----------------------------------------------------------------------------------------------
TINY_TEXT = {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 48, "type_vocab_size": 1}


def write_pseudo_labels(path: Path, n: int = 120, seed: int = 0) -> Path:
    """What label_with_llm.py writes: id, text, label (ClassLabel negative/neutral/positive, -1 = no label), llm_reply..."""
    import datasets

    rng = np.random.default_rng(seed)
    words = {0: ["awful", "terrible", "i hate it", "so sad"], 1: ["the bus leaves at nine", "it is tuesday", "okay"],
             2: ["wonderful", "great news", "i love it", "fantastic"]}
    rows = {"id": [], "text": [], "label": [], "llm_reply": [], "llm_model": [], "prompt_hash": [], "llm_error": []}
    for i in range(n):
        label = int(rng.integers(3))
        text = f"{rng.choice(words[label])} about the {rng.choice(['car', 'trip', 'dinner', 'movie'])}"
        unparseable = i % 40 == 39
        rows["id"].append(f"utt{i:04d}")
        rows["text"].append(text)
        rows["label"].append(-1 if unparseable else label)
        rows["llm_reply"].append("I cannot tell" if unparseable else ["negative", "neutral", "positive"][label])
        rows["llm_model"].append("tiny-llm")
        rows["prompt_hash"].append("abc")
        rows["llm_error"].append(None)
    ds = datasets.Dataset.from_dict(rows).cast_column("llm_error", datasets.Value("string"))
    ds = ds.cast_column("label", datasets.ClassLabel(names=["negative", "neutral", "positive"]))
    ds.save_to_disk(str(path))
    return path


def test_stage0_pseudo_labels_then_stage1_initialised_from_it(tmp_path):
    from transformers import AutoTokenizer

    from merits import MeritsForConversationClassification
    from merits.training.stages import build_model

    data = write_pseudo_labels(tmp_path / "pseudo")
    out0 = tmp_path / "stage0"
    argv0 = ["--dataset", "pseudo_labels", "--data_dir", str(data), "--architecture", "merits-l", "--modalities", "[text]",
             "--output_dir", str(out0), "--train_tokenizer", "true", "--tokenizer_vocab_size", "120",
             "--max_text_length", "16", "--text_config", json.dumps(TINY_TEXT),
             "--model", json.dumps({**TINY_MODEL["merits-l"], "text_pooling": "mean"}),
             "--pretrain.num_epochs", "6", "--pretrain.learning_rate", "3e-3", "--pretrain.batch_size", "16",
             "--pretrain.warmup_ratio", "0.1", "--report_to", "none", "--seed", "0"]
    args0 = parse_args(argv0, default_config=None)
    assert args0.stages_for("merits-l") == ["pretrain"]
    results0 = run_training(args0)
    # 120 rows, 3 of them unlabelled (dropped), 80/20 split; the cue words make the task easy
    assert results0["validation_stage0_text_num_examples"] == 24  # ceil(0.2 * 117)
    assert results0["validation_stage0_text_weighted_f1"] > 0.6, results0
    stage0 = MeritsForConversationClassification.from_pretrained(str(out0 / "best"))
    assert stage0.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}

    argv1 = [*DEMO_TINY, "--architecture", "merits-l", "--modalities", "[text]", "--stages", "[utterance]",
             "--text_encoder_init", str(out0 / "best"), "--max_text_length", "16",
             "--model", json.dumps(TINY_MODEL["merits-l"]), "--output_dir", str(tmp_path / "stage1")]
    args1 = parse_args(argv1, default_config=None)
    tokenizer = AutoTokenizer.from_pretrained(str(out0 / "best"))
    initialised = build_model(args1, "merits-l", ["neutral", "happy", "sad", "angry"], tokenizer=tokenizer,
                              use_text=True, use_audio=False)
    source = stage0.text_encoder.state_dict()
    for key, value in initialised.text_encoder.state_dict().items():
        if key.startswith("classifier."):
            assert value.shape[0] == 4  # the dataset's classes replace the 3 pseudo-labels
        else:
            assert torch.equal(value, source[key]), key
    results1 = run_training(args1)
    assert 0.0 <= results1["validation_stage1_text_weighted_f1"] <= 1.0
    import yaml

    assert yaml.safe_load((tmp_path / "stage1" / "run_config.yaml").read_text())["text_encoder_init"] == str(out0 / "best")


TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 40}


def test_lora_on_an_llm_text_backbone_is_merged_before_saving(tmp_path):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from merits import MeritsForConversationClassification
    from merits.training.stages import apply_lora, build_model, freeze_lora_base

    model_options = {**TINY_MODEL["mister-e"], "utterance_embed_dim": 16, "attentive_pooling_hidden_size": 8}
    out = tmp_path / "lora"
    argv = [*DEMO_TINY, "--architecture", "mister-e", "--modalities", "[text]", "--stages", "[utterance]",
            "--train_tokenizer", "true", "--tokenizer_vocab_size", "300", "--max_text_length", "24",
            "--text_config", json.dumps(TINY_LLAMA), "--model", json.dumps(model_options), "--use_lora", "true",
            "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--lora_target_modules", "[q_proj, v_proj]",
            "--utterance.learning_rate", "5e-3", "--utterance.num_epochs", "2", "--output_dir", str(out)]
    args = parse_args(argv, default_config=None)
    label_names = ["neutral", "happy", "sad", "angry"]

    # what trains under LoRA: the adapters and the head, not the backbone's own weights
    set_seed(0)
    probe = apply_lora(build_model(args, "mister-e", label_names, tokenizer=_demo_tokenizer(), use_text=True,
                                   use_audio=False), args)
    probe.freeze_for_stage("utterance")
    freeze_lora_base(probe)
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any(n.startswith("text_encoder.classifier") for n in trainable)
    assert not [n for n in trainable if n.startswith("text_encoder.backbone") and "lora_" not in n]

    results = run_training(args)
    assert 0.0 <= results["validation_stage1_text_weighted_f1"] <= 1.0
    weights = load_file(str(out / "best" / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_model" in k]
    # rebuild the initial model (same seed, same tokenizer): LoRA changed q/v projections only (merged), the rest
    # of the backbone is untouched
    set_seed(0)
    initial = build_model(args, "mister-e", label_names, tokenizer=AutoTokenizer.from_pretrained(str(out / "best")),
                          use_text=True, use_audio=False).state_dict()
    q = "text_encoder.backbone.layers.0.self_attn.q_proj.weight"
    mlp = "text_encoder.backbone.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(weights[q], initial[q])
    assert torch.equal(weights[mlp], initial[mlp])
    reloaded = MeritsForConversationClassification.from_pretrained(str(out / "best"))
    assert type(reloaded.text_encoder.backbone).__name__ == "LlamaModel"


def _demo_tokenizer():
    from merits.data.demo import make_demo_corpus, train_demo_tokenizer

    corpus = make_demo_corpus(num_dialogues=24, seed=0, with_audio=False)
    tokenizer = train_demo_tokenizer(corpus["train"], vocab_size=300)
    tokenizer.model_max_length = 24
    return tokenizer


# ----------------------------------------------------------------------------------------------
# causal (streaming) variants: `model.causal: true` trains, and best/ streams turn by turn
# ----------------------------------------------------------------------------------------------
def _full_forward_probabilities(model, **inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    return torch.softmax(logits.float(), dim=-1)[0]


@pytest.mark.slow  # among the costliest of the quick loop (issue 20: --durations on 2 shared cores)
def test_causal_merits_l_trained_on_the_demo_streams_like_its_full_forward(tmp_path):
    from merits import MeritsForConversationClassification, MeritsProcessor
    from merits.data import conversations, load_audio
    from merits.data.demo import make_demo_corpus
    from merits.streaming import ConversationStream

    out = tmp_path / "causal"
    argv = [*DEMO_TINY, "--architecture", "merits-l", "--output_dir", str(out), "--model.causal", "true"]
    results = run_training(parse_args(argv))
    assert 0.0 <= results["validation_stage3_weighted_f1"] <= 1.0
    model = MeritsForConversationClassification.from_pretrained(str(out / "best"))
    processor = MeritsProcessor.from_pretrained(str(out / "best"))
    assert model.config.causal and model.config.stage == "fusion"
    model.eval()

    conversation = conversations(make_demo_corpus(num_dialogues=24, seed=0)["validation"])[0][:6]
    turns = [{"text": row["text"], "audio": load_audio(row["audio"])} for row in conversation]
    stream = ConversationStream(model, processor)
    streamed = [stream.add_turn(text=turn["text"], audio=turn["audio"], sampling_rate=16000) for turn in turns]
    full = _full_forward_probabilities(model, **processor(conversations=[turns], return_tensors="pt"))
    id2label = model.config.id2label
    for t, prediction in enumerate(streamed):
        expected = {id2label[c]: float(full[t, c]) for c in range(full.shape[-1])}
        assert prediction["scores"] == pytest.approx(expected, abs=1e-4), t
    # causal: a turn's prediction does not depend on later turns
    prefix = _full_forward_probabilities(model, **processor(conversations=[turns[:3]], return_tensors="pt"))
    assert torch.allclose(prefix, full[:3], atol=1e-5)


def test_causal_mister_e_from_feature_datasets_streams_like_its_full_forward(features, tmp_path):
    import datasets

    from merits import MeritsForConversationClassification
    from merits.streaming import ConversationStream

    out = tmp_path / "causal_moe"
    model_options = {**TINY_MODEL["mister-e"], "causal": True}
    run_training(parse_args(feature_argv(features, out, "mister-e", epochs=2, extra=["--model", json.dumps(model_options)])))
    model = MeritsForConversationClassification.from_pretrained(str(out / "best"))
    assert model.config.causal
    model.eval()
    rows = datasets.load_from_disk(features["validation"]).filter(lambda r: r["dialogue_id"] == "d0").sort("turn")
    text = torch.tensor(rows["text_embeds"], dtype=torch.float32)
    audio = torch.tensor(rows["audio_embeds"], dtype=torch.float32)
    stream = ConversationStream(model)
    streamed = [stream.add_turn(text_embeds=text[t].tolist(), audio_embeds=audio[t].tolist()) for t in range(len(rows))]
    full = _full_forward_probabilities(model, text_embeds=text[None], audio_embeds=audio[None])
    for t, prediction in enumerate(streamed):
        assert [prediction["scores"][model.config.id2label[c]] for c in range(full.shape[-1])] == pytest.approx(full[t].tolist(), abs=1e-4)
        assert set(prediction["gate"]) and sum(prediction["gate"].values()) == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# the README's main command, end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~3 CPU-minutes; the wall time grows when the machine is shared
def test_the_demo_run_trains_both_systems_and_shows_the_papers_effects(tmp_path):
    """`accelerate launch train.py` with no arguments (plus --output_dir, to keep the repository clean): MERITS-L stage
    I -> II -> III and MiSTER-E utterance encoders -> MoE on the demo corpus. On the held-out test split context beats
    no context in each modality, fusion beats the best single modality, and the MoE beats its best single expert."""
    import resource
    import time

    out = tmp_path / "demo"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), "--output_dir", str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"demo run: {time.time() - start:.0f} s wall, {cpu:.0f} s CPU")
    assert run.returncode == 0, run.stderr[-3000:]
    for row in ("| merits-l | Stage II text (context) |", "| merits-l | Stage III fusion |", "| mister-e | MoE (gate) |"):
        assert row in run.stdout, row
    results = json.loads((out / "all_results.json").read_text())
    ml = lambda key: results[f"merits_l_test_{key}_weighted_f1"]
    me = lambda key: results[f"mister_e_test_{key}_weighted_f1"]
    for modality in ("text", "audio"):
        assert ml(f"stage2_{modality}") > ml(f"stage1_{modality}") + 0.03, modality  # context > no context
    assert ml("stage3") > max(ml("stage2_text"), ml("stage2_audio")) + 0.01  # fusion > best single modality
    experts = [me(f"moe_{name}_expert") for name in ("speech", "text", "cross_modal")]
    assert me("moe") > max(experts) + 0.01  # the gated mixture > its best expert
    assert (out / "best" / "config.json").is_file() and results["selected_architecture"] in ("merits-l", "mister-e")
    assert cpu < 360, f"the demo took {cpu:.0f} s of CPU time"


def test_stage3_trains_on_exported_stage2_features(features, tmp_path, monkeypatch):
    """MERITS-L stage III never runs the frozen context encoders per step: they run once per conversation to export
    c_i (export_context_features), and the fusion stage's batches carry those features."""
    from merits import modeling_merits
    from merits.training import loop, stages

    calls = {"context": 0, "fusion_batches_with_features": 0}
    forward = modeling_merits.MeritsContextEncoder.forward

    def counting_forward(self, *args, **kwargs):
        if kwargs.get("exported") is None:  # the GRUs and attention run (not only the classifier on exported c_i)
            calls["context"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_merits.MeritsContextEncoder, "forward", counting_forward)
    exported = []
    real_export = stages.export_context_features

    def spy_export(model, conversations, batch_size=16):
        before = calls["context"]
        rows = real_export(model, conversations, batch_size)
        exported.append((len(conversations), calls["context"] - before))
        return rows

    monkeypatch.setattr(stages, "export_context_features", spy_export)
    real_run_stage = stages.run_stage

    def spy_run_stage(model, plan, *args, **kwargs):
        before = calls["context"]
        result = real_run_stage(model, plan, *args, **kwargs)
        if plan.stage == "fusion":
            assert all("text_context_features" in row and "audio_context_features" in row
                       for conversation in plan.train for row in conversation)
            calls["fusion_stage_context_calls"] = calls["context"] - before
        return result

    monkeypatch.setattr(stages, "run_stage", spy_run_stage)
    results = run_training(parse_args(feature_argv(features, tmp_path / "out", epochs=2)))
    assert calls["fusion_stage_context_calls"] == 0  # training, validation and test of stage III: none
    assert [n for n, _ in exported] == [60, 20, 20]  # train / validation / test conversations, once each
    assert all(0 < c <= 2 * -(-n // 16) for n, c in exported)  # one call per modality per batch of 16
    assert np.isfinite(results["test_stage3_weighted_f1"])


@pytest.mark.slow  # among the costliest of the quick loop (issue 20: --durations on 2 shared cores)
def test_embedding_cache_batching_options_reach_the_cache(tmp_path, monkeypatch):
    """--embedding_batch_size / --embedding_max_tokens are what the stage I embedding cache batches with."""
    import merits.data

    seen = []
    real = merits.data.build_embedding_cache

    def spy(*args, **kwargs):
        seen.append((kwargs["batch_size"], kwargs["max_tokens"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(merits.data, "build_embedding_cache", spy)
    argv = [*DEMO_TINY, "--architecture", "merits-l", "--output_dir", str(tmp_path / "out"),
            "--embedding_batch_size", "4", "--embedding_max_tokens", "1"]
    run_training(parse_args(argv))
    assert seen and set(seen) == {(4, 1)}
    assert parse_args(["--embedding_max_tokens", "null"]).embedding_max_tokens is None
    for option, value in (("--embedding_max_tokens", "0"), ("--embedding_batch_size", "0")):
        with pytest.raises(ConfigError, match=option.lstrip("-")):
            parse_args([option, value])


def test_optimizer_is_fused_and_updates_like_the_foreach_one():
    import dataclasses

    from merits.training.arguments import TrainingArguments
    from merits.training.loop import build_optimizer

    for optimizer in ("adam", "adamw"):
        stage = dataclasses.replace(TrainingArguments().moe, optimizer=optimizer, weight_decay=0.01, learning_rate=1e-2)
        torch.manual_seed(0)
        fused_params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
        plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
        fused = build_optimizer(fused_params, stage)
        assert fused.defaults["fused"] is True
        plain_class = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        plain = plain_class(plain_params, lr=1e-2, betas=(stage.adam_beta1, stage.adam_beta2), eps=stage.adam_epsilon,
                            weight_decay=0.01, foreach=False)
        assert type(fused) is plain_class
        for _ in range(3):
            for params in (fused_params, plain_params):
                for p in params:
                    p.grad = torch.sin(p.detach() * 3)
            fused.step()
            plain.step()
        for a, b in zip(fused_params, plain_params):
            torch.testing.assert_close(a, b)
