"""What a new user meets first (issue 20): `--help` of every entry point (descriptions and defaults, no torch
import), `import merits` without torch, the one-line error of a second run under `accelerate launch`, the model
card's metric types and the progress bars' labels. No timing here: `--help` times are measured in the report."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


NO_TORCH = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], '--help']\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0].endswith('.py') else runpy.run_module(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as end:\n"
    "    assert end.code in (0, None), end.code\n"
    "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules)\n"
    "print('HEAVY', heavy, file=sys.stderr)\n"
)


@pytest.mark.parametrize("entry", ["train.py", "label_with_llm.py", "merits.cli"])
def test_help_imports_no_torch(entry):
    """`--help` answers before any heavy import (the time is the interpreter's; measured in the issue's report)."""
    result = _run("-c", NO_TORCH, entry)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stderr, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_train_help_describes_every_option_with_its_default():
    from merits.training.arguments import StageArguments, TrainingArguments, field_help, usage

    helps = field_help()
    text = usage()
    for field in dataclasses.fields(TrainingArguments):
        if field.type in (StageArguments, "StageArguments"):
            continue
        assert helps.get(field.name, ("", ""))[1], f"TrainingArguments.{field.name} has no description (a # comment)"
        block = text.split(f"  --{field.name} ", 1)
        assert len(block) == 2, f"--{field.name} is not in train.py --help"
        assert "default: " in block[1].split("\n  --", 1)[0], f"--{field.name} shows no default"
    for field in dataclasses.fields(StageArguments):
        assert helps.get(f"stage.{field.name}", ("", ""))[1], f"StageArguments.{field.name} has no description"
        block = text.split(f"  --<stage>.{field.name} ", 1)[1].split("\n  --", 1)[0]
        assert "default" in block, f"--<stage>.{field.name} shows no default"
    # the per-stage defaults and demo.yaml's values are the real ones
    assert "moe 100" in text and "demo.yaml: 400" in text  # moe.num_epochs; demo's tokenizer_vocab_size
    result = _run("train.py", "--help")
    assert result.returncode == 0 and result.stdout.strip() == text.strip()


@pytest.mark.parametrize("argv", [["label_with_llm.py", "--help"], ["-m", "merits.cli", "predict", "--help"],
                                  ["-m", "merits.cli", "evaluate", "--help"]])
def test_argparse_help_shows_defaults(argv):
    result = _run(*argv, env={"OPENAI_API_KEY": "sk-never-shown", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "sk-never-shown" not in result.stdout
    if argv[0] == "label_with_llm.py":
        for default in ("(default http://127.0.0.1:8000/v1)", "(default: 16)", "(default: large-v3)", "(default: id)"):
            assert default in result.stdout, default
    else:
        assert "conversations per model call (default 8)" in result.stdout


def test_import_merits_is_light_and_a_public_name_registers_the_auto_classes():
    code = (
        "import sys, merits\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import merits pulled torch in'\n"
        "from merits import MeritsConfig\n"
        "from transformers import AutoConfig\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert type(AutoConfig.for_model('merits', text_embed_dim=8)) is MeritsConfig\n"
        "assert 'conversation-emotion-recognition' in PIPELINE_REGISTRY.get_supported_tasks()\n"
        "assert sorted(merits.__all__) == merits.__all__ and all(hasattr(merits, n) for n in merits.__all__)\n"
        "print('ok')\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_a_second_run_under_accelerate_launch_fails_with_one_line(tmp_path):
    """`accelerate launch train.py` into a folder it may not use: the error once, no accelerate traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a merits run")
    command = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "train.py", "--output_dir", str(out)]
    result = _run(*command)
    assert result.returncode != 0
    message = f"train.py: error: {out} already holds another run (notes.txt)"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr, result.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "not a merits run"


def test_a_failed_start_names_the_bad_dataset_options(tmp_path):
    from merits.training.arguments import ConfigError, parse_args

    # refused while the options are parsed (before any data is loaded or folder written), with the YAML hint
    with pytest.raises(ConfigError, match=r"--dataset_options: .*YAML needs a space after the colon"):
        parse_args(["--dataset_options", "{num_dialogues:24}", "--output_dir", str(tmp_path)])


def test_model_card_metric_types_are_metric_ids():
    from merits.hub import _metric_type

    assert _metric_type("test_stage2_text_weighted_f1") == "f1"
    assert _metric_type("validation_moe_accuracy") == "accuracy"
    assert _metric_type("test_stage1_audio_unweighted_average_recall") == "recall"
    assert _metric_type("validation_stage3_macro_f1") == "f1"


def test_progress_bars_name_the_system_and_stage():
    from types import SimpleNamespace

    from merits.training.loop import progress_label

    model = SimpleNamespace(config=SimpleNamespace(architecture="merits-l"))
    assert progress_label(model, "stage2") == "MERITS-L stage II (context)"
    model.config.architecture = "mister-e"
    assert progress_label(model, "moe") == "MiSTER-E MoE"


def test_rerunning_the_same_options_says_so(tmp_path):
    from merits.training.checkpointing import OutputDirError, prepare_output_dir

    out = tmp_path / "out"
    options = {"seed": 1, "output_dir": str(out)}
    prepare_output_dir(out, options, resume=False, overwrite=False, is_main_process=True)
    (out / "all_results.json").write_text("{}")
    with pytest.raises(OutputDirError, match="already holds another run of these same options, finished"):
        prepare_output_dir(out, options, resume=False, overwrite=False, is_main_process=True)
    with pytest.raises(OutputDirError, match=r"already holds another run \(all_results.json"):
        prepare_output_dir(out, {**options, "seed": 2}, resume=False, overwrite=False, is_main_process=True)
