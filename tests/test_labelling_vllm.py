"""label_with_llm.py against the real thing: a vLLM OpenAI server (from the vLLM venv) serving a tiny
random Llama with a locally trained tokenizer, on a free 127.0.0.1 port.

Skipped with a message when the venv is missing (``bash scripts/setup_vllm_venv.sh`` makes it),
except under CI=true where a missing venv fails. One server for the whole module (start-up ~1-2 min).
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


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
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
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-llama")
    server = VLLMServer(model_dir, served_name="tiny-llama", python=python, startup_timeout=420)
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


def test_end_to_end_resume_after_sigkill(vllm_server, tmp_path, run_cli):
    rows = 240
    csv_path = write_csv(tmp_path / "transcripts.csv", rows)
    common = ["--transcripts", csv_path, "--llm-url", vllm_server.url, "--llm-model", "tiny-llama",
              "--valence-column", "valence"]

    # an unbroken run
    unbroken = run_cli(*common, "--out", tmp_path / "unbroken", "--concurrency", "8")
    assert unbroken.returncode == 0, unbroken.stderr
    assert "oracle agreement:" in unbroken.stdout and "confusion matrix" in unbroken.stdout
    reference = load(tmp_path / "unbroken")
    assert reference.num_rows == rows and reference["id"] == [f"utt{i:04d}" for i in range(rows)]
    assert set(reference.column_names) >= {"id", "text", "label", "llm_reply", "llm_model", "prompt_hash", "valence", "speaker"}
    assert set(reference["llm_model"]) == {"tiny-llama"}
    assert all(reply is not None for reply in reference["llm_reply"])  # every reply recorded, parsed or not
    summary = json.loads((tmp_path / "unbroken" / "journal" / "summary.json").read_text())
    assert sum(summary["counts"].values()) == rows and summary["oracle"]["compared"] + summary["oracle"]["unparsed"] == rows

    # a run killed midway, as a real process (one request at a time, so that it is still running when killed)
    out = tmp_path / "killed"
    journal = out / "journal" / "labels.jsonl"
    process = subprocess.Popen([*CLI, *map(str, common), "--out", str(out), "--concurrency", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 120
    written = 0
    while time.monotonic() < deadline and process.poll() is None:
        written = journal.read_text().count("\n") if journal.exists() else 0
        if written >= 30:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the labeller ended before it could be killed: {process.communicate()[1][-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    done_at_kill = len(journal.read_text().splitlines())
    assert 30 <= done_at_kill < rows, done_at_kill
    assert not (out / "dataset_info.json").exists()

    resumed = run_cli(*common, "--out", out, "--concurrency", "8")
    assert resumed.returncode == 0, resumed.stderr
    # finished rows were skipped (a torn last line, if any, is the only row asked again)
    assert (f"labels: {done_at_kill} in the journal" in resumed.stderr
            or f"labels: {done_at_kill - 1} in the journal" in resumed.stderr), resumed.stderr
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len({line["id"] for line in lines}) == rows and len(lines) == rows
    assert load(out).to_dict() == reference.to_dict()

    # a rerun of a finished job asks nothing and rewrites the same dataset
    again = run_cli(*common, "--out", out)
    assert again.returncode == 0 and f"labels: {rows} in the journal, 0 to ask" in again.stderr
    assert load(out).to_dict() == reference.to_dict()

    # resuming with another prompt is refused (it would mix two labellings)
    other = run_cli(*common, "--out", out, "--user-template", "Text: {text}")
    assert other.returncode == 2 and "prompt_hash" in other.stderr


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
            "--whisper-model", checkpoint, "--language", "en", "--asr-batch-size", "2", "--asr-max-tokens", "8"]
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
