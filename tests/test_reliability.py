"""The fault matrix of docs/reliability.md: bad inputs and failures across the pipeline, `merits predict/evaluate`,
train.py and label_with_llm.py, each with its exact behaviour (the message names the file / line / turn / key, the
exit status, the output unchanged or complete, nothing duplicated), and kill-and-resume tests of every resumable job,
including a resume after the input changed. Tiny random models; the slow ones are marked."""

from __future__ import annotations

import errno
import http.server
import json
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _tiny import tiny_merits_config, tiny_roberta_config
from test_cli import MELD_EMOTIONS, WORDS, text_model_folder, write_jsonl
from test_training import TINY_MODEL, feature_argv, features, write_features  # noqa: F401  (features: a fixture)

from merits import MeritsForConversationClassification, MeritsProcessor, save_hub_folder
from merits.cli import main as merits_main
from merits.pipeline_merits import ConversationEmotionRecognitionPipeline
from merits.resume import ResumeMismatch, check_manifest, fingerprint_path

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return text_model_folder(tmp_path_factory.mktemp("text_model"), MELD_EMOTIONS)


@pytest.fixture(scope="module")
def feature_model():
    torch.manual_seed(0)
    return MeritsForConversationClassification(tiny_merits_config("mister-e", initializer_range=0.3)).eval()


def conversations(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[{"text": " ".join(rng.choice(WORDS, 4))} for _ in range(1 + i % 3)] for i in range(n)]


def predict(model, source, out, *extra):
    return merits_main(["predict", "--model", str(model), str(source), "-o", str(out), "--quiet", *extra])


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ============================================================================================== resume manifests
def test_fingerprint_follows_content_not_name(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    first = fingerprint_path(path)
    path.write_text("two")
    assert fingerprint_path(path) != first
    path.write_text("one")
    assert fingerprint_path(path) == first
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x.csv").write_text("1")
    before = fingerprint_path(folder)
    (folder / "y.csv").write_text("2")
    assert fingerprint_path(folder) != before
    assert fingerprint_path(tmp_path / "missing") == "missing"


def test_manifest_refuses_naming_every_change_or_redoes(tmp_path):
    manifest = tmp_path / "m.json"
    assert check_manifest(manifest, "job", {"input": "aaa"}, {"lr": 1}, has_output=False) is False
    assert check_manifest(manifest, "job", {"input": "aaa"}, {"lr": 1}, has_output=True) is True
    with pytest.raises(ResumeMismatch, match=r"input input changed since the earlier run; lr: 1 then, 2 now\); start over"):
        check_manifest(manifest, "job", {"input": "bbb"}, {"lr": 2}, has_output=True, restart_hint="start over")
    assert check_manifest(manifest, "job", {"input": "bbb"}, {"lr": 2}, has_output=True, on_mismatch="redo") is False
    assert json.loads(manifest.read_text())["inputs"] == {"input": "bbb"}  # rewritten for the redone output
    manifest.write_text("{not json")
    with pytest.raises(ResumeMismatch, match="unreadable resume manifest"):
        check_manifest(manifest, "job", {}, {}, has_output=True)


def test_output_without_manifest_is_not_trusted(tmp_path):
    with pytest.raises(ResumeMismatch, match="no resume manifest"):
        check_manifest(tmp_path / "m.json", "job", {}, {}, has_output=True)


# ============================================================================================== merits predict
def test_predict_malformed_json_line_does_not_abort_the_batch(tmp_path, text_model, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(c) for c in conversations(5)]
    lines[2] = '[{"text": "oh no"'  # line 3 is torn
    source.write_text("\n".join(lines) + "\n")
    assert predict(text_model, source, out) == 1
    err = capsys.readouterr().err
    assert f"{source} line 3: not valid JSON" in err and "1 line(s) with errors" in err
    assert [r["line"] for r in records(out)] == [1, 2, 4, 5]  # the good ones written
    # fixed and rerun: only line 3 is added, nothing duplicated
    lines[2] = json.dumps([{"text": "oh no"}])
    source.write_text("\n".join(lines) + "\n")
    assert predict(text_model, source, out) == 0
    assert sorted(r["line"] for r in records(out)) == [1, 2, 3, 4, 5]


def test_predict_non_utf8_line_is_named(tmp_path, text_model, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b'[{"text": "hello"}]\n[{"text": "caf\xe9"}]\n')
    assert predict(text_model, source, out) == 1
    assert f"{source} line 2: not UTF-8 text (byte 15 of the line)" in capsys.readouterr().err
    assert [r["line"] for r in records(out)] == [1]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "c1"}', "line 1: an object line needs a 'turns' list (got keys ['id'])"),
        ("[]", "line 1: the conversation is empty (no turns)"),
        ('["hello"]', "line 1: a conversation must be a list of turn objects"),
        ('[{"text": "hi"}, {"speaker": "A"}]', "line 1, turn 2: the turn has neither 'text' nor 'audio'"),
        ('[{"text": 5}]', "line 1, turn 1: 'text' must be a string, got int"),
        ('[{"text": "hi"}, {"audio": "missing.wav"}]', "line 1, turn 2: audio file"),
    ],
)
def test_predict_bad_conversation_names_line_and_1_based_turn(tmp_path, text_model, capsys, line, message):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(line + "\n")
    assert predict(text_model, source, out) == 1
    err = capsys.readouterr().err
    assert f"{source} {message}" in err
    assert "conversation 0" not in err  # no 0-based pipeline index mixed with the 1-based line
    assert out.read_text() == ""


def test_predict_text_only_model_names_the_asr_flag(tmp_path, text_model, capsys):
    import soundfile

    soundfile.write(tmp_path / "a.wav", np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1, 16000)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps([{"text": "hello"}, {"audio": "a.wav"}]) + "\n")
    assert predict(text_model, source, out) == 1
    err = capsys.readouterr().err
    assert "line 1, turn 2: this model reads text only and the turn has no text; pass --asr-model NAME" in err
    assert "asr_model=" not in err


def test_predict_skip_errors_records_them_and_exits_0(tmp_path, text_model):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps([{"text": "hi"}]) + "\n{bad\n")
    assert predict(text_model, source, out, "--skip-errors") == 0
    lines = records(out)
    assert "predictions" in lines[0] and lines[1]["line"] == 2 and "not valid JSON" in lines[1]["error"]


def test_predict_output_at_a_folder(tmp_path, text_model, capsys):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, conversations(1))
    assert predict(text_model, source, tmp_path) == 2
    assert f"-o {tmp_path} is a folder; give the output file, e.g. -o {tmp_path / 'predictions.jsonl'}" in capsys.readouterr().err


def test_predict_missing_input(tmp_path, text_model, capsys):
    assert predict(text_model, tmp_path / "nope.jsonl", tmp_path / "o.jsonl") == 2
    assert f"{tmp_path / 'nope.jsonl'}: input file not found" in capsys.readouterr().err


def test_predict_resume_after_the_input_changed_refuses_and_keeps_the_output(tmp_path, text_model, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, conversations(4, seed=0))
    assert predict(text_model, source, out, "--batch-size", "2") == 0
    before = out.read_text()
    # another input under the same name (a conversation inserted at the top): the line numbers now mean other lines
    write_jsonl(source, conversations(1, seed=9) + conversations(4, seed=0))
    assert predict(text_model, source, out) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {out}: input line(s) [1, 2, 3, 4] of {source} changed" in err and "--overwrite" in err
    assert out.read_text() == before
    assert predict(text_model, source, out, "--overwrite") == 0
    assert [r["line"] for r in records(out)] == [1, 2, 3, 4, 5]


def test_predict_resume_after_lines_were_appended_adds_only_them(tmp_path, text_model):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, conversations(3))
    assert predict(text_model, source, out) == 0
    first = out.read_text()
    write_jsonl(source, conversations(3) + conversations(2, seed=5))
    assert predict(text_model, source, out) == 0
    assert out.read_text().startswith(first)
    assert [r["line"] for r in records(out)] == [1, 2, 3, 4, 5]


def test_predict_resume_with_another_model_refuses(tmp_path, text_model, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, conversations(2))
    other = shutil.copytree(text_model, tmp_path / "model")
    assert predict(other, source, out) == 0
    torch.manual_seed(1)
    model = MeritsForConversationClassification.from_pretrained(other)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    model.save_pretrained(other)
    assert predict(other, source, out) == 2
    assert "input model changed since the earlier run" in capsys.readouterr().err


def test_predict_output_from_an_unknown_run_is_not_resumed(tmp_path, text_model, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, conversations(2))
    out.write_text(json.dumps({"line": 1, "predictions": []}) + "\n")
    assert predict(text_model, source, out) == 2
    assert "holds earlier output but no resume manifest" in capsys.readouterr().err


def test_predict_ctrl_c_then_rerun_completes_without_duplicates(tmp_path, text_model, capsys, monkeypatch):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, conversations(6))
    original = ConversationEmotionRecognitionPipeline.__call__
    calls = []

    def interrupted(self, inputs, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(ConversationEmotionRecognitionPipeline, "__call__", interrupted)
    assert predict(text_model, source, out, "--batch-size", "2") == 130
    assert "merits predict: stopped; finished lines are kept, rerun the same command to resume" in capsys.readouterr().err
    assert [r["line"] for r in records(out)] == [1, 2]
    monkeypatch.setattr(ConversationEmotionRecognitionPipeline, "__call__", original)
    assert predict(text_model, source, out, "--batch-size", "2") == 0
    assert [r["line"] for r in records(out)] == [1, 2, 3, 4, 5, 6]


def test_predict_full_disk_says_so(tmp_path, text_model, capsys, monkeypatch):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, conversations(2))
    import merits.cli as cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(cli.json, "dumps", full)
    assert predict(text_model, source, out) == 2
    err = capsys.readouterr().err
    assert f"no space left on the device ({out}); free some space and rerun the same command" in err
    assert "Traceback" not in err


def test_predict_truncated_weights_file(tmp_path, text_model, capsys):
    model = shutil.copytree(text_model, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    source = tmp_path / "in.jsonl"
    write_jsonl(source, conversations(1))
    assert predict(model, source, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert f"--model {model}: cannot load the model from model.safetensors" in err and "truncated or corrupt" in err
    assert "Traceback" not in err


def test_predict_model_folder_without_config(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    write_jsonl(source, conversations(1))
    assert predict(tmp_path, source, tmp_path / "o.jsonl") == 2
    assert "no config.json there" in capsys.readouterr().err


# ============================================================================================== trust_remote_code
def folder_with_tokenizer_code(tmp_path, text_model):
    """A model folder whose tokenizer config names a Python file that leaves a marker when it is imported."""
    folder = shutil.copytree(text_model, tmp_path / "model")
    marker = tmp_path / "code_ran"
    (folder / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


def test_pipeline_from_a_loaded_model_runs_no_folder_code_without_consent(tmp_path, text_model):
    folder, marker = folder_with_tokenizer_code(tmp_path, text_model)
    model = MeritsForConversationClassification.from_pretrained(folder).eval()
    with pytest.raises(ValueError, match="trust_remote_code"):
        ConversationEmotionRecognitionPipeline(model=model, device=-1)
    assert not marker.exists()
    # the user's explicit consent is honoured (and shows the check above can fail)
    ConversationEmotionRecognitionPipeline(model=model, device=-1, trust_remote_code=True)
    assert marker.exists()


def test_conversation_stream_runs_no_folder_code_without_consent(tmp_path):
    from merits.streaming import ConversationStream
    from test_processing import make_tokenizer

    torch.manual_seed(0)
    config = tiny_merits_config(text_config=tiny_roberta_config(), audio_embed_dim=None, causal=True)
    model = MeritsForConversationClassification(config).eval()
    save_hub_folder(model, MeritsProcessor(tokenizer=make_tokenizer([" ".join(WORDS)])), tmp_path / "causal")
    folder, marker = folder_with_tokenizer_code(tmp_path / "x", tmp_path / "causal")
    loaded = MeritsForConversationClassification.from_pretrained(folder).eval()
    with pytest.raises(ValueError, match="trust_remote_code"):
        ConversationStream(loaded)
    assert not marker.exists()


def test_cli_runs_no_folder_code_without_the_flag(tmp_path, text_model, capsys):
    folder, marker = folder_with_tokenizer_code(tmp_path, text_model)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, conversations(1))
    assert predict(folder, source, tmp_path / "o.jsonl") == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()


# ============================================================================================== finite inputs
def test_pipeline_nan_embedding_is_named_and_clean_turns_stay_finite(feature_model):
    classifier = ConversationEmotionRecognitionPipeline(model=feature_model, device=-1)
    rng = np.random.default_rng(0)
    turns = [{"text_embeds": rng.standard_normal(12).tolist(), "audio_embeds": rng.standard_normal(10).tolist()}
             for _ in range(3)]
    clean = classifier(turns)
    assert all(np.isfinite(turn["score"]) and all(np.isfinite(list(turn["scores"].values()))) for turn in clean)
    turns[1]["text_embeds"][4] = float("nan")
    with pytest.raises(ValueError, match=r"conversation 0, turn 1: 'text_embeds' holds NaN or inf \(value 4 of 12 is nan\)"):
        classifier(turns)
    turns[1]["text_embeds"][4] = 0.0
    turns[2]["audio_embeds"][0] = float("inf")
    with pytest.raises(ValueError, match=r"conversation 0, turn 2: 'audio_embeds' holds NaN or inf"):
        classifier(turns)


def test_pipeline_nan_audio_is_named(text_model):
    from merits.processing_merits import load_turn_audio

    wave = np.zeros(1600, np.float32)
    wave[10] = np.nan
    with pytest.raises(ValueError, match=r"conversation 2, turn 0: the audio array holds NaN or inf \(value 10 of 1600"):
        load_turn_audio(wave, 16000, where="conversation 2, turn 0")


def test_one_sample_audio_turn_is_refused():
    from merits.processing_merits import load_turn_audio

    with pytest.raises(ValueError, match=r"turn 3: the audio is 1 sample\(s\) long at 16000 Hz \(0.06 ms\); a turn needs at least 25 ms"):
        load_turn_audio(np.ones(1, np.float32), 16000, where="turn 3")
    assert load_turn_audio(np.ones(400, np.float32), 16000).shape == (400,)


def test_pipeline_never_returns_nan_scores(feature_model):
    broken = MeritsForConversationClassification(feature_model.config).eval()
    broken.load_state_dict(feature_model.state_dict())
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if p.dim() == 2).fill_(float("nan"))
    classifier = ConversationEmotionRecognitionPipeline(model=broken, device=-1)
    with pytest.raises(ValueError, match="produced NaN/inf scores from finite inputs"):
        classifier([{"text_embeds": [0.1] * 12, "audio_embeds": [0.2] * 10}])


def feature_rows(nan_row=None):
    rng = np.random.default_rng(0)
    rows = {"dialogue_id": [], "turn": [], "label": [], "text_embeds": [], "audio_embeds": []}
    for d in range(2):
        for t in range(3):
            rows["dialogue_id"].append(f"d{d}")
            rows["turn"].append(t)
            rows["label"].append("happy")
            rows["text_embeds"].append(rng.standard_normal(12).tolist())
            rows["audio_embeds"].append(rng.standard_normal(10).tolist())
    if nan_row is not None:
        rows["audio_embeds"][nan_row][3] = float("nan")
    return rows


def test_evaluate_features_with_nan_names_the_row(tmp_path, feature_model, capsys):
    save_hub_folder(feature_model, None, tmp_path / "m")
    datasets.Dataset.from_dict(feature_rows(nan_row=4)).save_to_disk(str(tmp_path / "f"))
    code = merits_main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", "features", "--file", str(tmp_path / "f"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "row 4 (dialogue 'd1', turn 1): 'audio_embeds' holds NaN or inf (value 3 of 10 is nan)" in err
    assert capsys.readouterr().out == ""  # no score printed


def test_training_rejects_nan_features_naming_dialogue_and_turn(tmp_path):
    from merits.training.stages import DataError, feature_conversations

    ds = datasets.Dataset.from_dict(feature_rows(nan_row=2))
    with pytest.raises(DataError, match=r"features row 2 \(dialogue 'd0', turn 2\): audio_embeds holds NaN or inf"):
        feature_conversations(ds, "features")


# ============================================================================================== corpora
def test_meld_csv_mixing_encodings_names_the_line(tmp_path):
    from merits.data.schema import DataFormatError, read_csv

    path = tmp_path / "dev.csv"
    path.write_bytes("Utterance,Emotion\nCafé ok,joy\n".encode() + b"it\x92s fine,neutral\n")
    with pytest.raises(DataFormatError, match=r"dev.csv, line 3: byte 3 \(b'\\x92'\) is not UTF-8, while line 2 is UTF-8"):
        read_csv(path, ["Utterance"], "MELD")


def test_meld_csv_entirely_cp1252_is_read_as_documented(tmp_path):
    from merits.data.schema import LoadReport, read_csv

    path = tmp_path / "dev.csv"
    path.write_bytes(b"Utterance,Emotion\nit\x92s fine,neutral\n")
    report = LoadReport("MELD")
    rows = read_csv(path, ["Utterance"], "MELD", report)
    assert rows[0][1]["Utterance"] == "it\u2019s fine"
    assert "read as cp1252" in report.summary()


# ============================================================================================== train.py options
def test_negative_learning_rate_is_refused_before_any_data(tmp_path):
    from merits.training import main
    from merits.training.arguments import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"^--context.learning_rate: context.learning_rate must be a positive number, got -0.001"):
        main(["--output_dir", str(out), "--context.learning_rate", "-1e-3"])
    assert not out.exists()


def test_bad_value_in_yaml_is_blamed_on_the_yaml(tmp_path):
    from merits.training.arguments import ConfigError, parse_args

    config = tmp_path / "bad.yaml"
    config.write_text("utterance: {warmup_ratio: 1.5}\n")
    with pytest.raises(ConfigError, match=rf"^{config}: utterance.warmup_ratio must be in \[0, 1\), got 1.5"):
        parse_args(["--config", str(config)])


def test_bad_value_on_the_command_line_is_not_blamed_on_the_config():
    from merits.training.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", "configs/demo.yaml", "--mixed_precision", "fp16"])
    assert str(caught.value).startswith("--mixed_precision: mixed_precision must be")
    assert "demo.yaml" not in str(caught.value)


def test_dataset_options_without_space_after_colon():
    from merits.training.arguments import ConfigError, parse_args

    with pytest.raises(ConfigError, match=r"--dataset_options: .*YAML needs a space after the colon, write \{num_dialogues: 40\}"):
        parse_args(["--dataset_options", "{num_dialogues:40}"])


def test_unknown_dataset_option_fails_before_the_run_folder_is_written(tmp_path):
    from merits.training.arguments import parse_args
    from merits.training.stages import DataError, run_training

    out = tmp_path / "out"
    args = parse_args(["--output_dir", str(out), "--dataset_options", "{num_dialogs: 4}", "--report_to", "none"])
    with pytest.raises(DataError, match=r"--dataset_options: dataset_options: 'num_dialogs' is not an option of the demo loader make_demo_corpus\(\)"):
        run_training(args)
    assert not out.exists()


def test_a_run_that_made_nothing_does_not_block_the_corrected_rerun(tmp_path):
    from merits.training.checkpointing import RUN_CONFIG, prepare_output_dir

    out = tmp_path / "out"
    prepare_output_dir(out, {"dataset_options": {"bad": 1}}, resume=False, overwrite=False, is_main_process=True)
    (out / "mister-e").mkdir()  # an empty system folder, no checkpoint, no result
    assert prepare_output_dir(out, {"dataset_options": {}}, resume=False, overwrite=False, is_main_process=True) is False
    assert "bad" not in (out / RUN_CONFIG).read_text()


def test_resume_refuses_when_the_training_data_changed(tmp_path):
    from merits.training.checkpointing import OutputDirError, prepare_output_dir

    out = tmp_path / "out"
    prepare_output_dir(out, {"seed": 1}, resume=False, overwrite=False, is_main_process=True, inputs={"data_dir": "aaa"})
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "x").write_text("progress")
    with pytest.raises(OutputDirError, match=r"cannot resume .*input data_dir changed since the earlier run.*--overwrite_output_dir"):
        prepare_output_dir(out, {"seed": 1}, resume=True, overwrite=False, is_main_process=True, inputs={"data_dir": "bbb"})
    assert prepare_output_dir(out, {"seed": 1}, resume=True, overwrite=False, is_main_process=True, inputs={"data_dir": "aaa"})


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 130, "train.py: stopped; rerun the same command with --resume"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x"), 2, "train.py: error: no space left on the device (/out/x)"),
])
def test_train_py_interrupt_and_full_disk_messages(monkeypatch, capsys, error, code, message):
    import merits.training

    def fail(argv=None):
        raise error

    monkeypatch.setattr(merits.training, "main", fail)
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert caught.value.code == code
    assert message in capsys.readouterr().err


def test_checkpoint_trainer_state_is_json_not_pickle(features, tmp_path):
    from merits.training.arguments import parse_args
    from merits.training.stages import run_training

    out = tmp_path / "out"
    run_training(parse_args(feature_argv(features, out, epochs=1, extra=["--stages", "[context]"])))
    # the stage is finished and its checkpoints removed; the state file format is checked on a fresh save below
    from accelerate import Accelerator

    from merits.training.checkpointing import StageCheckpoints, TrainerState

    checkpoints = StageCheckpoints(tmp_path / "ck", "context")
    state = TrainerState(epoch=2, global_step=7, best={"final": 0.5})
    accelerator = Accelerator(cpu=True)
    path = checkpoints.save(accelerator, 7, state)
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == 7
    assert not list(path.glob("custom_checkpoint_*.pkl"))
    loaded = TrainerState()
    assert checkpoints.load_latest(accelerator, loaded) and loaded.global_step == 7 and loaded.best == {"final": 0.5}


@pytest.mark.slow
def test_train_kill_then_resume_after_the_data_changed_refuses(features, tmp_path):
    train = shutil.copytree(features["train"], tmp_path / "train")
    data = {**features, "train": str(train)}

    def run(*extra):
        return subprocess.run([sys.executable, str(REPO / "train.py"), *feature_argv(data, tmp_path / "out", epochs=2),
                               "--stages", "[context]", *extra], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})

    killed = run("--debug_exit_after_step", "4")
    assert killed.returncode == 17, killed.stderr[-2000:]
    shutil.rmtree(train)
    write_features(train, 60, 7)  # other conversations under the same path
    refused = run("--resume")
    assert refused.returncode == 2
    assert "input train_features changed since the earlier run" in refused.stderr
    shutil.rmtree(train)
    shutil.copytree(features["train"], train)  # the original data back: the resume goes on
    resumed = run("--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout


# ============================================================================================== embedding cache
def test_embedding_cache_resumed_with_another_chunking_recomputes(tmp_path, caplog):
    from merits.data import build_embedding_cache
    from merits.data.demo import make_demo_corpus, train_demo_tokenizer

    corpus = make_demo_corpus(num_dialogues=3, seed=1)["train"]
    processor = MeritsProcessor(tokenizer=train_demo_tokenizer(corpus))
    torch.manual_seed(0)
    tokenizer = processor.tokenizer
    model = MeritsForConversationClassification(tiny_merits_config(
        text_config=tiny_roberta_config(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id),
        audio_embed_dim=None, id2label={0: "neutral", 1: "happy", 2: "sad", 3: "angry"})).eval()
    fresh = build_embedding_cache(model, processor, corpus, tmp_path / "fresh", use_audio=False, chunk_size=4)
    # a run killed after its first chunks, with chunk_size 3, then resumed with chunk_size 4
    cache = tmp_path / "cache"
    build_embedding_cache(model, processor, corpus, cache, use_audio=False, chunk_size=3)
    final = next(p for p in cache.iterdir() if p.is_dir())
    partial = cache / f"{final.name}.partial"
    shutil.rmtree(final)
    from merits.data.cache import _embed_split

    _embed_split(model, processor, corpus, partial, 32, True, False, 3, 16000)  # the chunks of the killed run
    assert len(list(partial.glob("chunk_*.npz"))) > 1
    with caplog.at_level("WARNING", logger="merits.data"):
        resumed = build_embedding_cache(model, processor, corpus, cache, use_audio=False, chunk_size=4)
    assert "were made with other settings; recomputing them" in caplog.text
    assert np.allclose(np.asarray(resumed["text_embeds"]), np.asarray(fresh["text_embeds"]), atol=1e-6)


# ============================================================================================== label_with_llm.py
class FakeLLM:
    """An OpenAI-compatible server in a thread: ``reply(text)`` -> (status, body, content type)."""

    def __init__(self, reply, delay=0.0):
        self.reply, self.delay, self.asked = reply, delay, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body, kind="application/json"):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send(200, json.dumps({"data": [{"id": "m"}]}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/tokenize"):
                    return self.send(404, "{}")
                text = body["messages"][-1]["content"].split(": ", 1)[-1]
                outer.asked.append(text)
                time.sleep(outer.delay)
                status, payload, kind = outer.reply(text)
                self.send(status, payload, kind)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that timed out closes the connection: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def chat(content):
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}), "application/json"


@pytest.fixture
def llm():
    servers = []

    def make(reply, delay=0.0):
        servers.append(FakeLLM(reply, delay))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def label(server, csv_path, out, *extra):
    from merits.labelling.run import main

    return main(["--transcripts", str(csv_path), "--out", str(out), "--llm-url", server.url, "--llm-model", "m",
                 "--max-retries", "1", "--retry-base-delay", "0.01", "--concurrency", "2",
                 # these fakes answer with text only (no log-probabilities): the reply-parsing route
                 "--decoding", "choice", *extra])


def write_csv(path, texts):
    path.write_text("id,text\n" + "".join(f"r{i},{text}\n" for i, text in enumerate(texts)))
    return path


def test_labelling_reply_not_a_label_is_counted_warned_and_retried(tmp_path, llm, capsys):
    source = write_csv(tmp_path / "t.csv", ["good day", "odd day", "bad day"])
    server = llm(lambda text: chat("positive" if "good" in text else "negative" if "bad" in text else "I am not sure"))
    assert label(server, source, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "WARNING: 1 row(s) have no label" in err and "1 replies that are not a label" in err and "'r1'" in err
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds["label"][1] == -1 and "not one of the labels" in ds["llm_error"][1]
    server.reply = lambda text: chat("neutral")
    server.asked.clear()
    assert label(server, source, tmp_path / "out") == 0
    assert server.asked == ["odd day"]  # only the failed row asked again
    assert datasets.load_from_disk(str(tmp_path / "out"))["label"] == [2, 1, 0]  # positive, neutral, negative


def test_labelling_html_body_with_http_200(tmp_path, llm, capsys):
    source = write_csv(tmp_path / "t.csv", ["good day"])
    server = llm(lambda text: (200, "<html><body>Please log in</body></html>", "text/html"))
    assert label(server, source, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "1 failed requests" in err and "malformed reply (HTTP 200, text/html; not an OpenAI chat completion" in err and "<html>" in err
    assert label(server, source, tmp_path / "out", "--accept-failures") == 0


def test_labelling_empty_transcript_is_not_sent_and_counted(tmp_path, llm, capsys):
    source = write_csv(tmp_path / "t.csv", ["good day", "  "])
    server = llm(lambda text: chat("positive"))
    assert label(server, source, tmp_path / "out") == 1
    assert server.asked == ["good day"]
    assert "1 empty transcripts" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "journal" / "summary.json").read_text())
    assert summary["counts"]["empty"] == 1 and summary["not_labelled"] == 1


def test_labelling_resume_after_the_input_changed_refuses(tmp_path, llm, capsys):
    source = write_csv(tmp_path / "t.csv", ["good day", "bad day"])
    server = llm(lambda text: chat("positive"))
    assert label(server, source, tmp_path / "out") == 0
    before = (tmp_path / "out" / "journal" / "labels.jsonl").read_text()
    write_csv(source, ["bad day", "good day"])  # same file name, other rows under the same ids
    assert label(server, source, tmp_path / "out") == 2
    assert "input transcripts changed since the earlier run" in capsys.readouterr().err
    assert (tmp_path / "out" / "journal" / "labels.jsonl").read_text() == before
    assert label(server, source, tmp_path / "out", "--overwrite") == 0


def test_labelling_ctrl_c_then_rerun_resumes(tmp_path, llm, capsys, monkeypatch):
    from merits.labelling import llm as llm_module

    source = write_csv(tmp_path / "t.csv", [f"good {i}" for i in range(6)])
    server = llm(lambda text: chat("positive"))
    original = llm_module.OpenAICompatibleLabeller.label_one
    count = {"n": 0}

    async def interrupted(self, client, text):
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt
        return await original(self, client, text)

    monkeypatch.setattr(llm_module.OpenAICompatibleLabeller, "label_one", interrupted)
    assert label(server, source, tmp_path / "out", "--concurrency", "1") == 130
    assert "label_with_llm.py: stopped; finished rows are kept" in capsys.readouterr().err
    kept = len((tmp_path / "out" / "journal" / "labels.jsonl").read_text().splitlines())
    assert kept == 3
    monkeypatch.setattr(llm_module.OpenAICompatibleLabeller, "label_one", original)
    server.asked.clear()
    assert label(server, source, tmp_path / "out") == 0
    assert len(server.asked) == 3  # only the rows not yet labelled
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 6


def test_labelling_hung_server_times_out_and_says_so(tmp_path, llm, capsys):
    from merits.labelling.run import build_parser

    assert build_parser().parse_args(["--transcripts", "x", "--out", "y", "--llm-model", "m"]).timeout == 30.0
    source = write_csv(tmp_path / "t.csv", ["good day"])
    server = llm(lambda text: chat("positive"), delay=3.0)
    started = time.monotonic()
    assert label(server, source, tmp_path / "out", "--timeout", "0.3", "--max-retries", "0") == 2
    assert time.monotonic() - started < 3.0
    assert "kept failing after 1 attempts (last: ReadTimeout" in capsys.readouterr().err


def test_labelling_progress_line_while_the_server_is_silent(tmp_path, capsys):
    from merits.labelling.llm import LabelResult
    from merits.labelling.run import label_rows
    from merits.labelling.writer import Journal

    class Slow:
        name, timeout = "slow-llm", 30.0

        def label(self, items, on_result):
            for row_id, _ in items:
                time.sleep(0.5)
                on_result(row_id, LabelResult(reply="positive", label="positive"))

    label_rows(Slow(), [{"id": "a", "text": "x"}], Journal(tmp_path / "labels.jsonl"), heartbeat_seconds=0.1)
    assert "still waiting for slow-llm: 0/1 labelled, no reply for" in capsys.readouterr().err
