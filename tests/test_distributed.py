"""Training beyond one machine (issue 21): the Accelerate configs, a multi-node run, FSDP and DeepSpeed against DDP.

All on CPU with gloo: the multi-node test starts two torchrun "machines" of one process each on 127.0.0.1 and
checks that they give exactly the results of one machine with two processes (same ranks, same maths).

FSDP and DeepSpeed ZeRO-2 run train.py itself, started by ``accelerate launch --config_file
configs/accelerate/{fsdp,deepspeed_zero2}.yaml --num_processes 2 --mixed_precision no``: a tiny MERITS-L stage I
(a random 2-layer RoBERTa text encoder, dropout off; under FSDP with the speech head too) through
merits/training/loop.py, killed after 12 updates and
resumed from its ``save_state`` checkpoint, then compared with the same run under plain DDP (torchrun). Accelerate
1.x takes FSDP / DeepSpeed only for accelerator processes (on a CPU-only machine its state falls back to no
distribution, or to gloo DDP with ``cpu=True``), so the processes run train.py through tests/cpu_sharded_launch.py,
which changes only that classification: the rest is Accelerate's real FSDP2 / DeepSpeed code. DeepSpeed is not a
dependency (its test skips when it is not installed; DS_ACCELERATOR=cpu makes it use gloo).

tests/fsdp_vs_ddp.py checks the maths one level down: torch's ``fully_shard`` (wrapped as fsdp.yaml wraps), DDP and
one process on both ranks' batches, on the same steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merits.labelling.vllm_server import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


def test_accelerate_configs_load_and_say_what_they_are():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {}
    for path in CONFIGS:
        config = ClusterConfig.from_yaml_file(str(path))
        kinds[path.stem] = (str(config.distributed_type).split(".")[-1], config.num_machines, config.num_processes)
    assert kinds == {"deepspeed_zero2": ("DEEPSPEED", 1, 8), "fsdp": ("FSDP", 1, 8), "multi_gpu": ("MULTI_GPU", 1, 8),
                     "multi_node": ("MULTI_GPU", 8, 64)}
    fsdp = ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config
    # the wrapped layer classes exist in transformers (a typo would make FSDP wrap nothing)
    import transformers

    for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
        module = {"Roberta": "roberta", "Qwen2": "qwen2", "Llama": "llama", "Whisper": "whisper"}[name.split("Decoder")[0].split("Encoder")[0].split("Layer")[0]]
        assert hasattr(getattr(transformers.models, module), "modeling_" + module)
        assert hasattr(getattr(getattr(transformers.models, module), "modeling_" + module), name)


def _feature_run(features, out: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    sys.path.insert(0, str(REPO / "tests"))
    from test_training import feature_argv

    command = [sys.executable, "-m", "torch.distributed.run", *launcher, str(REPO / "train.py"),
               *feature_argv(features, out, epochs=2)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    from test_training import write_features

    root = tmp_path_factory.mktemp("features")
    return {"train": str(write_features(root / "train", 40, 0)),
            "validation": str(write_features(root / "validation", 12, 1)),
            "test": str(write_features(root / "test", 12, 2))}


@pytest.mark.slow
def test_two_machines_of_one_process_equal_one_machine_of_two(features, tmp_path):
    """multi_node.yaml's code path on CPU: torchrun --nnodes 2 --node_rank R on 127.0.0.1 (two launchers)."""
    port = free_port()
    single = _feature_run(features, tmp_path / "one_node", ["--nproc_per_node", "2", "--master_port", str(free_port())])
    _, err = single.communicate(timeout=1500)
    assert single.returncode == 0, err[-3000:]
    nodes = [_feature_run(features, tmp_path / "two_nodes",
                          ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
                           "127.0.0.1", "--master_port", str(port)]) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=1500)
        assert node.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one_node" / "all_results.json").read_text())
    two = json.loads((tmp_path / "two_nodes" / "all_results.json").read_text())
    assert one["num_processes"] == two["num_processes"] == 2
    assert one == two  # the same ranks and the same maths: identical to the last digit


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_matches_ddp(tmp_path):
    out = tmp_path / "weights.pt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(REPO / "tests" / "fsdp_vs_ddp.py"), str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out)
    assert saved["sharded"] and saved["world"] == 2  # FSDP really sharded the parameters over the 2 ranks
    assert saved["ddp"].keys() == saved["fsdp"].keys() == saved["single"].keys()
    moved = [name for name, value in saved["single"].items() if not torch.equal(value, saved["initial"][name])]
    assert len(moved) > len(saved["single"]) // 2  # the steps really changed the weights
    for name, value in saved["single"].items():
        torch.testing.assert_close(saved["ddp"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"DDP {name}: {m}")
        torch.testing.assert_close(saved["fsdp"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"FSDP {name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# train.py under accelerate's FSDP (configs/accelerate/fsdp.yaml) and DeepSpeed ZeRO-2 (deepspeed_zero2.yaml)
# ----------------------------------------------------------------------------------------------------------------
TINY_ROBERTA = {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 48, "type_vocab_size": 1, "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0}
# dropout off everywhere: each rank draws its own masks, which no other process layout reproduces
TINY_HEADS = {"text_head_dropout": 0.0, "context_text_hidden_size": 8, "context_audio_hidden_size": 8,
              "fusion_hidden_size": 16, "fusion_num_blocks": 1, "fusion_attention_size": 12, "fusion_num_heads": 3,
              "fusion_head_hidden_size": 16}


def tiny_stage1_argv(out: Path, *extra: str) -> list[str]:
    """A tiny MERITS-L stage I on the demo corpus's transcripts: the text encoder trains (clipped), 3 epochs."""
    return ["--dataset", "demo", "--dataset_options", "{num_dialogues: 24, seed: 0}", "--report_to", "none",
            "--seed", "0", "--architecture", "merits-l", "--modalities", "[text]", "--stages", "[utterance]",
            "--train_tokenizer", "true", "--tokenizer_vocab_size", "120", "--max_text_length", "16",
            "--text_config", json.dumps(TINY_ROBERTA), "--model", json.dumps(TINY_HEADS),
            "--utterance.num_epochs", "3", "--utterance.batch_size", "8", "--utterance.learning_rate", "3e-3",
            "--utterance.max_grad_norm", "0.5", "--checkpointing_steps", "5", "--output_dir", str(out), *extra]


def _environment(**more) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **more}


def _ddp_stage1(out: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(REPO / "train.py"), *tiny_stage1_argv(out, *extra)],
                            cwd=REPO, capture_output=True, text=True, timeout=900, env=_environment())
    assert result.returncode == 0, result.stderr[-3000:]


def _sharded_stage1(config: str, out: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / config), "--num_processes", "2", "--mixed_precision",
                           "no", "--main_process_port", str(free_port()), str(REPO / "tests" / "cpu_sharded_launch.py"),
                           str(REPO / "train.py"), *tiny_stage1_argv(out, *extra)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200, env=_environment(**(env or {})))


def _killed_and_resumed(config: str, out: Path, *extra: str, env=None) -> tuple[Path, str]:
    """Run until update 12 (os._exit: a crash), keep a copy of its first checkpoint, resume to the end."""
    import shutil

    killed = _sharded_stage1(config, out, *extra, "--debug_exit_after_step", "12", env=env)
    assert killed.returncode != 0 and "debug_exit_after_step=12" in killed.stdout, killed.stderr[-3000:]
    first = out.parent / f"{out.name}_step5"
    shutil.copytree(out / "checkpoints" / "stage1" / "step_00000005", first)
    resumed = _sharded_stage1(config, out, *extra, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[stage1] resumed from" in resumed.stdout and "step 10" in resumed.stdout, resumed.stdout[-2000:]
    return first, killed.stdout + resumed.stdout


def _assert_same_training(reference: Path, other: Path) -> float:
    """Identical metrics (every prediction the same) and weights equal up to float summation order; returns the
    largest weight difference. The attention key biases are left to a looser bound: their gradient is zero in exact
    maths (a constant added to every key cancels in the softmax), so Adam turns float noise into steps of their own,
    different per process layout, which change no output."""
    from safetensors.torch import load_file

    from merits import MeritsForConversationClassification

    assert json.loads((other / "all_results.json").read_text()) == json.loads((reference / "all_results.json").read_text())
    expected, got = load_file(reference / "best" / "model.safetensors"), load_file(other / "best" / "model.safetensors")
    assert expected.keys() == got.keys()
    largest = 0.0
    for name, value in expected.items():
        bound = 2e-4 if name.endswith("attention.self.key.bias") else 1e-5
        torch.testing.assert_close(got[name], value, rtol=0, atol=bound, msg=lambda m: f"{name}: {m}")
        if not name.endswith("attention.self.key.bias"):
            largest = max(largest, (got[name] - value).abs().max().item())
    model, info = MeritsForConversationClassification.from_pretrained(str(other / "best"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # best/ is a whole, unsharded Hub folder
    for name, value in model.state_dict().items():
        assert torch.equal(value, got[name]), name
    return largest


@pytest.mark.slow
def test_train_py_under_accelerate_fsdp_matches_ddp_and_resumes(tmp_path):
    """configs/accelerate/fsdp.yaml through train.py: FSDP2 per RobertaLayer, FULL_STATE_DICT checkpoints. Text and
    speech: stage I's two optimiser groups (text encoder, speech head), each clipped at its own norm, on the sharded
    parameters (a clipping that missed them would leave the run unclipped: 0.07 from DDP's weights, measured)."""
    extra = ("--modalities", "[text, audio]", "--utterance.max_grad_norm", "1e-3", "--speech_head.max_grad_norm", "1e-3")
    _ddp_stage1(tmp_path / "ddp", *extra)
    first, log = _killed_and_resumed("fsdp.yaml", tmp_path / "fsdp", *extra)
    assert "[stage1] FSDP: each RobertaLayer is its own shard unit" in log  # the other layer classes are not in it
    # accelerate's FSDP save_state: the full model gathered from the shards (DDP writes model.safetensors instead)
    assert (first / "pytorch_model_fsdp.bin").is_file() and not (first / "model.safetensors").exists()
    step5 = torch.load(first / "pytorch_model_fsdp.bin", weights_only=True)
    from safetensors.torch import load_file

    best = load_file(tmp_path / "fsdp" / "best" / "model.safetensors")
    assert {k: v.shape for k, v in step5.items()} == {k: v.shape for k, v in best.items()}  # whole tensors
    moved = [k for k in best if k.startswith("text_encoder.") and not torch.equal(best[k], step5[k])]
    assert len(moved) > 30  # the text encoder trained on after update 5 (its 38 tensors, most of them changed)
    _assert_same_training(tmp_path / "ddp", tmp_path / "fsdp")


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed (not a dependency: pip install deepspeed "
                    "to run configs/accelerate/deepspeed_zero2.yaml; on CPU it needs DS_ACCELERATOR=cpu, set here)")
def test_train_py_under_accelerate_deepspeed_zero2_matches_ddp_and_resumes(tmp_path):
    """configs/accelerate/deepspeed_zero2.yaml through train.py: ZeRO-2 partitions the optimizer state over the ranks,
    with this stage's accumulation (2) and clipping (1.0) written into DeepSpeed's config by the loop."""
    extra = ("--utterance.gradient_accumulation_steps", "2", "--utterance.max_grad_norm", "1.0")
    _ddp_stage1(tmp_path / "ddp", *extra)
    # the first run may build DeepSpeed's shared-memory op (a few minutes; cached in ~/.cache/torch_extensions)
    first, _ = _killed_and_resumed("deepspeed_zero2.yaml", tmp_path / "zero2", *extra, env={"DS_ACCELERATOR": "cpu"})
    partitions = sorted(p.name for p in (first / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    assert partitions == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    _assert_same_training(tmp_path / "ddp", tmp_path / "zero2")


class _Plugin:
    def __init__(self, **values):
        self.__dict__.update(values)


def _fake_accelerator(kind: str, **state):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=2, is_fsdp2=kind == "FSDP",
                           state=SimpleNamespace(**state), gradient_accumulation_steps=1)


def test_fsdp_wraps_the_layer_classes_the_model_has_and_names_them_when_none():
    from merits.training.loop import keep_present_layer_classes
    from _tiny import tiny_merits_config, tiny_roberta_config

    from merits import MeritsForConversationClassification

    model = MeritsForConversationClassification(tiny_merits_config(text_config=tiny_roberta_config()))
    plugin = _Plugin(transformer_cls_names_to_wrap=["RobertaLayer", "Qwen2DecoderLayer", "WhisperEncoderLayer"])
    assert keep_present_layer_classes(_fake_accelerator("FSDP", fsdp_plugin=plugin), model) == ["RobertaLayer"]
    assert plugin.transformer_cls_names_to_wrap == ["RobertaLayer"]
    assert model.get_input_embeddings() is model.text_encoder.backbone.embeddings.word_embeddings  # FSDP2 asks
    plugin = _Plugin(transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    with pytest.raises(ValueError, match="none of the layer classes to wrap .LlamaDecoderLayer.*RobertaLayer"):
        keep_present_layer_classes(_fake_accelerator("FSDP", fsdp_plugin=plugin), model)
    assert keep_present_layer_classes(_fake_accelerator("MULTI_CPU"), model) is None  # DDP: nothing to choose
    fsdp1 = _fake_accelerator("FSDP", fsdp_plugin=plugin)
    fsdp1.is_fsdp2 = False  # FSDP1 on CPU: its FULL_STATE_DICT gather in save_state killed a process here
    with pytest.raises(ValueError, match="FSDP1 .fsdp_version: 1. is not supported"):
        keep_present_layer_classes(fsdp1, model)


def test_deepspeed_gets_each_stage_settings_and_refuses_what_it_cannot_do():
    from merits.training.arguments import StageArguments
    from merits.training.loop import configure_deepspeed

    config = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "gradient_accumulation_steps": 1}
    accelerator = _fake_accelerator("DEEPSPEED", deepspeed_plugin=_Plugin(deepspeed_config=config))
    configure_deepspeed(accelerator, StageArguments(gradient_accumulation_steps=3, max_grad_norm=None), None, 4)
    assert config["gradient_clipping"] == 0.0 and config["gradient_accumulation_steps"] == 3
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 4 * 3 * 2
    assert accelerator.gradient_accumulation_steps == 3
    groups = [StageArguments(max_grad_norm=1.0), StageArguments(max_grad_norm=None)]
    with pytest.raises(ValueError, match="one norm.*max_grad_norm"):
        configure_deepspeed(accelerator, groups[0], groups, 4)
    config["zero_optimization"]["stage"] = 3
    with pytest.raises(ValueError, match="ZeRO-3 is not supported"):
        configure_deepspeed(accelerator, StageArguments(), None, 4)
