"""`bash bench/device_check.sh --cpu-smoke`: every section's code path at tiny sizes on CPU, one JSON of figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "matmul_peak", "model_tests", "moe_step", "merits_l_steps", "extraction", "host_tests"]


@pytest.mark.slow
def test_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    # a generous budget: the smoke takes ~2 minutes on an idle 2-core machine, this host may be shared
    done = subprocess.run(["bash", "bench/device_check.sh", "--cpu-smoke", "--budget_seconds", "900"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())  # $OUT/device_check.json
    assert report["meta"]["mode"] == "cpu-smoke" and report["meta"]["device"] == "cpu"
    assert list(report["sections"]) == SECTIONS
    assert report["meta"]["errors"] == [], {k: v.get("error") for k, v in report["sections"].items()}
    sections = report["sections"]
    assert all("section_seconds" in figures for figures in sections.values())
    assert sections["matmul_peak"]["tflops_per_second"] > 0
    assert sections["model_tests"]["test_device/returncode"] == 0
    assert sections["host_tests"]["test_modeling_host/returncode"] == 0
    moe = sections["moe_step"]
    for name in ("ours/fp32", "reference/fp32", "ours/bf16", "reference/bf16", "ours_loop_recurrence/fp32",
                 "reference_cudnn_disabled/fp32"):
        assert moe[f"{name}/utterances_per_second"] > 0, name
    assert moe["speedup_ours_vs_reference/fp32"] > 0 and moe["speedup_ours_vs_reference/bf16"] > 0
    steps = sections["merits_l_steps"]
    for stage in ("stage_ii", "stage_iii"):
        for precision in ("fp32", "bf16"):
            assert steps[f"{stage}/speedup_ours_vs_reference/{precision}"] > 0
    extraction = sections["extraction"]
    for name in ("text", "speech"):
        assert extraction[f"{name}/utterances_per_second"] > 0
        assert 0 < extraction[f"{name}/fraction_of_bf16_matmul_peak"]


def test_device_check_runs_without_the_packages_the_device_lacks():
    """The device machine lacks datasets, soundfile, soxr, evaluate, dill, multiprocess (they travel as wheels, whose
    install may fail there): with them made unimportable, everything the check imports and builds still works."""
    code = """
import sys
for name in ("datasets", "soundfile", "soxr", "evaluate", "multiprocess", "dill"):
    sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec returns None
sys.argv = ["x"]
import bench.device_check, bench.reference.mister_e, bench.reference.merits_l, bench.bench_extraction
import merits, merits.modeling_merits
from transformers import RobertaConfig, WavLMConfig
from merits import MeritsConfig, MeritsForConversationClassification
text = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
audio = WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                    conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=4,
                    num_conv_pos_embedding_groups=2, num_buckets=8, max_bucket_distance=10)
MeritsForConversationClassification(MeritsConfig(text_config=text, audio_config=audio, id2label={0: "a", 1: "b"}))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr[-3000:]
