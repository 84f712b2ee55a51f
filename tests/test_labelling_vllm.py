"""label_with_llm.py against the real thing: a vLLM OpenAI server (from the vLLM venv) serving a tiny
random Llama with a locally trained tokenizer, on a free 127.0.0.1 port.

Skipped with a message when the venv is missing (``bash scripts/setup_vllm_venv.sh`` makes it),
except under CI=true where a missing venv fails. Start-ups dominate the run time (~1-2 min each on a
loaded 2-core machine), so there are three: one server for the whole session (restarted once by the
server-crash test, on the same port) and one in-process engine (``--engine inprocess``). The unbroken
reference labelling is made once and shared.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from merits.labelling.run import main
from merits.labelling.vllm_server import VLLMServer, build_tiny_llama, vllm_python
from test_labelling import save_tiny_whisper, synth_speechlike

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(REPO / "label_with_llm.py")]


def _vllm_python_or_skip() -> Path:
    python = vllm_python()
    problem = None
    if python is None:
        problem = "no vLLM venv (run `bash scripts/setup_vllm_venv.sh` or set MERITS_VLLM_PYTHON)"
    else:
        check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True)
        if check.returncode != 0:
            problem = f"{python} cannot import vllm: {check.stderr.strip().splitlines()[-1:]}"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {problem}")
        pytest.skip(problem)
    return python


@pytest.fixture(scope="module")  # torn down after this file: the vLLM server frees its ~3 GB for the later tests
def tiny_llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama")


@pytest.fixture(scope="module")  # torn down after this file: the vLLM server frees its ~3 GB for the later tests
def vllm_server(tiny_llama_dir):
    python = _vllm_python_or_skip()
    server = VLLMServer(tiny_llama_dir, served_name="tiny-llama", python=python, startup_timeout=420)
    server.start()
    yield server
    server.stop()


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    """Run label_with_llm.py's main() in this process (the package import costs ~10 s per subprocess)."""

    def run(*args):
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def write_csv(path: Path, rows: int) -> Path:
    words = ["great", "awful", "fine", "terrible", "lovely", "boring", "okay", "wonderful"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "valence", "speaker"])
        for i in range(rows):
            writer.writerow([f"utt{i:04d}", f"the show was {words[i % 8]} and the food was {words[(i * 3) % 8]}",
                             1 + (i * 7) % 7, f"spk{i % 5}"])
    return path


def load(out: Path):
    import datasets

    return datasets.load_from_disk(str(out))


ROWS = 240


def _common_args(csv_path: Path, url: str) -> list:
    # these tests exercise the choice-constrained reply (the paper's route); --decoding logprobs, the default, is
    # tested on the real model in tests/test_real_labeller.py
    return ["--transcripts", csv_path, "--llm-url", url, "--llm-model", "tiny-llama", "--valence-column", "valence",
            "--decoding", "choice"]


@pytest.fixture(scope="module")  # torn down after this file: the vLLM server frees its ~3 GB for the later tests
def reference(vllm_server, tmp_path_factory):
    """One unbroken labelling of ROWS transcripts (concurrency 8): what every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    csv_path = write_csv(tmp / "transcripts.csv", ROWS)
    out = tmp / "unbroken"
    code = main([str(arg) for arg in [*_common_args(csv_path, vllm_server.url), "--out", out, "--concurrency", "8"]])
    assert code == 0
    return {"csv": csv_path, "out": out, "dataset": load(out).to_dict()}


def test_unbroken_run_every_reply_parses(reference, vllm_server, tmp_path, run_cli):
    dataset = reference["dataset"]
    assert dataset["id"] == [f"utt{i:04d}" for i in range(ROWS)]
    assert set(dataset) >= {"id", "text", "label", "llm_reply", "llm_model", "prompt_hash", "valence", "speaker"}
    assert set(dataset["llm_model"]) == {"tiny-llama"}
    # the choice-constrained reply is never cut: every reply is exactly one of the labels
    assert set(dataset["llm_reply"]) <= {"positive", "negative", "neutral"}, sorted(set(dataset["llm_reply"]))
    assert -1 not in dataset["label"]
    summary = json.loads((reference["out"] / "journal" / "summary.json").read_text())
    assert summary["counts"]["unparsed"] == 0 and summary["counts"]["failed"] == 0
    # the budget came from the server's /tokenize: every label is one token of the test tokenizer, but a
    # constrained model may spell it byte by byte, so 8 bytes of "positive"/"negative" + EOS
    assert summary["max_tokens"] == 9
    assert summary["oracle"]["compared"] == ROWS and summary["oracle"]["unparsed"] == 0

    # the documented GPT-style budget of 4, given explicitly, does cut this model's spelled-out replies
    csv_path = write_csv(tmp_path / "few.csv", 20)
    cut = run_cli("--transcripts", csv_path, "--llm-url", vllm_server.url, "--llm-model", "tiny-llama",
                  "--out", tmp_path / "cut", "--max-tokens", "4", "--decoding", "choice")
    # replies that are not a label are failures of the run: counted, warned, exit 1 (issue 19; --accept-failures: 0)
    assert cut.returncode == 1 and "replies that are not a label" in cut.stderr, cut.stderr
    cut_summary = json.loads((tmp_path / "cut" / "journal" / "summary.json").read_text())
    assert cut_summary["max_tokens"] == 4 and cut_summary["counts"]["unparsed"] > 0, cut_summary


def _journal_lines(journal: Path) -> int:
    return journal.read_text().count("\n") if journal.exists() else 0


def _start_labeller_and_wait(args: list, journal: Path, at_least: int = 30) -> subprocess.Popen:
    """Start label_with_llm.py as a real process (one request at a time) and return once it has journaled rows."""
    process = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and _journal_lines(journal) < at_least:
        time.sleep(0.05)
    assert process.poll() is None, f"the labeller ended before the interruption: {process.communicate()[1][-2000:]}"
    assert _journal_lines(journal) >= at_least, "the labeller journaled too few rows in time"
    return process


def test_resume_after_labeller_sigkill(reference, vllm_server, tmp_path, run_cli):
    common = _common_args(reference["csv"], vllm_server.url)
    out = tmp_path / "killed"
    journal = out / "journal" / "labels.jsonl"
    process = _start_labeller_and_wait([*common, "--out", out, "--concurrency", "1"], journal)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    done_at_kill = len(journal.read_text().splitlines())
    assert 30 <= done_at_kill < ROWS, done_at_kill
    assert not (out / "dataset_info.json").exists()

    resumed = run_cli(*common, "--out", out, "--concurrency", "8")
    assert resumed.returncode == 0, resumed.stderr
    # finished rows were skipped (a torn last line, if any, is the only row asked again)
    assert (f"labels: {done_at_kill} in the journal" in resumed.stderr
            or f"labels: {done_at_kill - 1} in the journal" in resumed.stderr), resumed.stderr
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len({line["id"] for line in lines}) == ROWS and len(lines) == ROWS
    assert load(out).to_dict() == reference["dataset"]

    # a rerun of a finished job asks nothing and rewrites the same dataset
    again = run_cli(*common, "--out", out)
    assert again.returncode == 0 and f"labels: {ROWS} in the journal, 0 to ask" in again.stderr
    assert load(out).to_dict() == reference["dataset"]

    # resuming with another prompt is refused (it would mix two labellings)
    other = run_cli(*common, "--out", out, "--user-template", "Text: {text}")
    assert other.returncode == 2 and "prompt_hash" in other.stderr


def test_resume_after_server_crash(reference, vllm_server, tmp_path, run_cli):
    """The SERVER dies mid-run: the labeller stops with an error naming the URL, keeps what finished,
    and the same command against the restarted server completes the identical dataset."""
    common = _common_args(reference["csv"], vllm_server.url)
    out = tmp_path / "crashed"
    journal = out / "journal" / "labels.jsonl"
    process = _start_labeller_and_wait(
        [*common, "--out", out, "--concurrency", "1", "--max-retries", "2", "--retry-base-delay", "0.2"], journal)
    try:
        vllm_server.kill()  # SIGKILL to the API server and its engine core
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        vllm_server.restart()  # same port: the same command resumes; later tests keep a live server
    stderr = stderr.decode(errors="replace")
    assert process.returncode == 2, stderr[-3000:]
    assert f"the LLM server at {vllm_server.url} kept failing after 3 attempts" in stderr, stderr[-3000:]
    assert "rerun the same command to resume" in stderr
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    done_at_crash = len(records)
    assert 30 <= done_at_crash < ROWS, done_at_crash
    # only finished rows were journaled: the row in flight at the crash is not recorded as failed
    assert all(record["error"] is None and record["label"] is not None for record in records)
    assert not (out / "dataset_info.json").exists()

    resumed = run_cli(*common, "--out", out, "--concurrency", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert f"labels: {done_at_crash} in the journal, {ROWS - done_at_crash} to ask" in resumed.stderr, resumed.stderr
    assert load(out).to_dict() == reference["dataset"]


def test_inprocess_engine_command(reference, tiny_llama_dir, tmp_path):
    """`--engine inprocess` as a command, run by the vLLM venv's python (the setup script installs the
    labeller there): vllm.LLM in the labeller's own process, same prompt, constraint and budget."""
    python = _vllm_python_or_skip()
    ready = subprocess.run([str(python), "-c", "import datasets, soundfile, soxr, merits.labelling.run"],
                           capture_output=True, text=True, cwd=REPO)
    if ready.returncode != 0:
        message = f"the vLLM venv lacks the labeller's packages (rerun bash scripts/setup_vllm_venv.sh): {ready.stderr[-500:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    rows = 12
    csv_path = write_csv(tmp_path / "few.csv", rows)
    out = tmp_path / "inprocess"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    result = subprocess.run(
        [str(python), str(REPO / "label_with_llm.py"), "--engine", "inprocess", "--transcripts", str(csv_path),
         "--out", str(out), "--llm-model", str(tiny_llama_dir), "--inprocess-batch-size", "5", "--decoding", "choice"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {rows} rows to {out}" in result.stderr
    dataset = load(out)
    assert dataset["id"] == [f"utt{i:04d}" for i in range(rows)]
    assert set(dataset["llm_model"]) == {str(tiny_llama_dir)}
    assert set(dataset["llm_reply"]) <= {"positive", "negative", "neutral"} and -1 not in dataset["label"]
    summary = json.loads((out / "journal" / "summary.json").read_text())
    assert summary["max_tokens"] == 9  # the same budget, from the engine's own tokenizer
    # the same greedy model gives the same labels in-process as through the server
    assert dataset["llm_reply"] == reference["dataset"]["llm_reply"][:rows]
    assert len((out / "journal" / "labels.jsonl").read_text().splitlines()) == rows


def test_wrong_model_name_lists_served_models(vllm_server, tmp_path, run_cli):
    csv_path = write_csv(tmp_path / "t.csv", 3)
    result = run_cli("--transcripts", csv_path, "--out", tmp_path / "out", "--llm-url", vllm_server.url,
                     "--llm-model", "no-such-model")
    assert result.returncode == 2
    assert "does not serve a model named 'no-such-model'; served models: tiny-llama" in result.stderr


def test_audio_folder_whisper_then_llm(vllm_server, tmp_path, run_cli):
    audio_dir = tmp_path / "clips"
    (audio_dir / "spk1").mkdir(parents=True)
    for i in range(5):  # 22.05 kHz stereo-free clips in a nested folder: resampled to 16 kHz on read
        soundfile.write(audio_dir / "spk1" / f"clip{i}.wav", synth_speechlike(0.6 + 0.2 * i, 22050, i), 22050)
    checkpoint = save_tiny_whisper(tmp_path / "whisper-tiny-random.pt")
    args = ["--audio", audio_dir, "--out", tmp_path / "out", "--llm-url", vllm_server.url, "--llm-model", "tiny-llama",
            "--whisper-model", checkpoint, "--language", "en", "--asr-batch-size", "2", "--asr-max-tokens", "8",
            "--decoding", "choice"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    dataset = load(tmp_path / "out")
    assert dataset["id"] == [f"spk1/clip{i}" for i in range(5)]
    assert all(isinstance(text, str) for text in dataset["text"]) and set(dataset["language"]) == {"en"}
    transcripts = (tmp_path / "out" / "journal" / "transcripts.jsonl").read_text().splitlines()
    assert len(transcripts) == 5
    # a rerun transcribes nothing again
    again = run_cli(*args)
    assert again.returncode == 0 and "transcripts: 5 in the journal, 0 to make" in again.stderr
    assert load(tmp_path / "out").to_dict() == dataset.to_dict()

    # an unreadable clip: a clear error naming the file, or left out with --skip-bad-audio
    (audio_dir / "broken.wav").write_bytes(b"RIFF not really a wav file")
    bad = run_cli(*args[:2], "--out", tmp_path / "out2", *args[4:])
    assert bad.returncode == 2 and "broken.wav" in bad.stderr
    skipped = run_cli(*args[:2], "--out", tmp_path / "out2", *args[4:], "--skip-bad-audio")
    assert skipped.returncode == 0, skipped.stderr
    assert load(tmp_path / "out2").num_rows == 5 and "left out" in skipped.stderr
