"""Training beyond one machine (issue 21): the Accelerate configs, a multi-node run, FSDP against DDP.

All on CPU with gloo: the multi-node test starts two torchrun "machines" of one process each on 127.0.0.1 and
checks that they give exactly the results of one machine with two processes (same ranks, same maths); the FSDP
test trains the text encoder with FSDP2 and with DDP on 2 processes and in one process on both ranks' batches,
and compares the weights. Accelerate has no
FSDP or DeepSpeed for CPU processes (its FSDP state needs a GPU-type distributed state; with ``cpu=True`` it falls
back to DDP), so the FSDP check calls torch's ``fully_shard`` directly, wrapping as configs/accelerate/fsdp.yaml does.
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
