"""Fast unit tests of merits.labelling: parsing, prompt hashing, journals, oracle, CSV input, the async
client's retries/concurrency/errors (against an in-process httpx transport), and Whisper on a tiny
random checkpoint. The tests against a real vLLM server are in tests/test_labelling_vllm.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from merits.labelling import (
    Journal,
    JournalError,
    LLMServerError,
    OpenAICompatibleLabeller,
    PromptTemplate,
    RetryPolicy,
    check_run_metadata,
    oracle_agreement,
    parse_label,
    valence_to_sentiment,
)
from merits.labelling.run import InputError, build_dataset, main, read_transcripts_csv

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("positive", "positive"),
        ("Negative.", "negative"),
        ("  NEUTRAL\n", "neutral"),
        ("Sentiment: neutral", "neutral"),
        ("negative, not positive", "negative"),  # the first label word wins
        ("positive or negative", "positive"),
        ("positi", None),  # cut by max_tokens
        ("positively", None),  # not a whole word
        ("", None),
        (None, None),
        ("I cannot tell", None),
    ],
)
def test_parse_label(reply, expected):
    assert parse_label(reply) == expected


def test_prompt_messages_and_hash():
    prompt = PromptTemplate()
    messages = prompt.messages("I love it")
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("You are a sentiment classification bot.")
    assert messages[1] == {"role": "user", "content": "[sentence]: I love it"}
    # the hash is stable and changes with anything that changes a reply
    assert prompt.hash() == PromptTemplate().hash() and len(prompt.hash()) == 16
    assert PromptTemplate(user="Text: {text}").hash() != prompt.hash()
    assert PromptTemplate(max_tokens=5).hash() != prompt.hash()
    assert PromptTemplate(structured_outputs=False).hash() != prompt.hash()
    with pytest.raises(ValueError, match="must contain"):
        PromptTemplate(user="no placeholder")


def test_request_body_uses_structured_outputs_choice():
    body = OpenAICompatibleLabeller("http://127.0.0.1:1/v1", "m").request_body("hello")
    assert body["structured_outputs"] == {"choice": ["positive", "negative", "neutral"]}
    assert "guided_choice" not in body
    # constrained, budget not yet resolved against the server: the safe constant
    assert body["temperature"] == 0.0 and body["max_tokens"] == 16 and body["model"] == "m"
    plain = OpenAICompatibleLabeller("http://x/v1", "m", prompt=PromptTemplate(structured_outputs=False)).request_body("a")
    assert "structured_outputs" not in plain and plain["max_tokens"] == 4  # GPT-style unconstrained budget
    explicit = OpenAICompatibleLabeller("http://x/v1", "m", prompt=PromptTemplate(max_tokens=5)).request_body("a")
    assert explicit["max_tokens"] == 5
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        PromptTemplate(max_tokens=0)


def test_choice_token_budget_never_cuts_a_label():
    from merits.labelling.llm import choice_token_budget

    labels = ("positive", "negative", "neutral")
    # canonical counts are not a bound under a choice constraint (a label may be spelt in pieces):
    # the byte length of the longest label is, plus one token for EOS
    assert choice_token_budget(labels, {"positive": 1, "negative": 1, "neutral": 1}) == 9
    assert choice_token_budget(labels, {"positive": 12, "negative": 1, "neutral": 1}) == 13
    assert choice_token_budget(labels) == 16  # the served tokenizer unknown
    assert choice_token_budget(("très positif",), {"très positif": 3}) == len("très positif".encode()) + 1


# ---------------------------------------------------------------------------------------------- oracle


def test_valence_thresholds():
    assert [valence_to_sentiment(v) for v in (1, 3, 3.01, 4, 4.99, 5, 7)] == [
        "negative", "negative", "neutral", "neutral", "neutral", "positive", "positive"]
    assert valence_to_sentiment(2.5, negative_max=2, positive_min=6) == "neutral"


def test_oracle_agreement_and_confusion():
    labels = ["positive", "negative", "neutral", "positive", None, "neutral"]
    valences = [6.0, 2.0, 2.5, 4.0, 6.0, None]
    report = oracle_agreement(labels, valences)
    assert report.compared == 4 and report.unparsed == 1 and report.missing_valence == 1
    assert report.agreement == pytest.approx(2 / 4)
    # rows = oracle (negative, neutral, positive), columns = LLM
    assert report.confusion == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    text = report.format()
    assert "50.00%" in text and "confusion matrix" in text


# ---------------------------------------------------------------------------------------------- journal


def test_journal_resume_and_torn_line(tmp_path):
    journal = Journal(tmp_path / "j" / "labels.jsonl")
    assert journal.load() == {}
    with journal:
        journal.append({"id": "a", "label": "positive"})
        journal.append({"id": "b", "label": None})
    # a process killed mid-write leaves a line without its newline
    with open(journal.path, "a") as handle:
        handle.write('{"id": "c", "lab')
    records = journal.load()
    assert set(records) == {"a", "b"} and records["b"]["label"] is None
    assert journal.path.read_text().endswith("\n")  # the torn line was cut off
    with journal:
        journal.append({"id": "c", "label": "neutral"})
    assert set(Journal(journal.path).load()) == {"a", "b", "c"}


def test_journal_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(JournalError, match=r"labels.jsonl, line 2"):
        Journal(path).load()


def test_run_metadata_mismatch(tmp_path):
    path = tmp_path / "out" / "journal" / "run.json"
    check_run_metadata(path, {"llm_model": "a", "prompt_hash": "h"})
    check_run_metadata(path, {"llm_model": "a", "prompt_hash": "h"})  # same settings: resume
    with pytest.raises(JournalError, match="llm_model"):
        check_run_metadata(path, {"llm_model": "b", "prompt_hash": "h"})
    check_run_metadata(path, {"llm_model": "b", "prompt_hash": "h"}, overwrite=True)
    assert json.loads(path.read_text())["llm_model"] == "b"


# ---------------------------------------------------------------------------------------------- CSV input


def test_read_transcripts_csv_types_and_errors(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("id,text,valence,label,note\nu1,I love it,6.5,3,x\nu2,\"Bad, bad\",2,1,\n")
    rows = read_transcripts_csv(good)
    assert rows[0] == {"id": "u1", "text": "I love it", "valence": 6.5, "reference_label": 3, "note": "x"}
    assert rows[1]["text"] == "Bad, bad" and rows[1]["note"] is None and rows[1]["valence"] == 2.0

    missing = tmp_path / "m.csv"
    missing.write_text("key,sentence\na,b\n")
    with pytest.raises(InputError, match=r"m.csv: missing column\(s\) id, text"):
        read_transcripts_csv(missing)
    duplicate = tmp_path / "d.csv"
    duplicate.write_text("id,text\na,x\nb,y\na,z\n")
    with pytest.raises(InputError, match=r"d.csv, line 4: id 'a' repeats line 2"):
        read_transcripts_csv(duplicate)
    empty_id = tmp_path / "e.csv"
    empty_id.write_text("id,text\na,x\n,y\n")
    with pytest.raises(InputError, match=r"e.csv, line 3: empty 'id'"):
        read_transcripts_csv(empty_id)
    with pytest.raises(InputError, match="not found"):
        read_transcripts_csv(tmp_path / "nope.csv")


def test_build_dataset_keeps_order_and_records_unparsed():
    rows = [{"id": "b", "text": "x", "valence": 6.0}, {"id": "a", "text": "y", "valence": 2.0}]
    labels = {"a": {"id": "a", "reply": "negative", "label": "negative", "error": None},
              "b": {"id": "b", "reply": "positi", "label": None, "error": None}}
    dataset = build_dataset(rows, labels, "m", "h")
    assert dataset["id"] == ["b", "a"]
    assert dataset.features["label"].names == ["negative", "neutral", "positive"]
    assert dataset["label"] == [-1, 0] and dataset["llm_reply"] == ["positi", "negative"]
    assert dataset["llm_model"] == ["m", "m"] and dataset["prompt_hash"] == ["h", "h"] and dataset["valence"] == [6.0, 2.0]


# ---------------------------------------------------------------------------------------------- async client


class FakeServer:
    """An OpenAI-compatible chat server as an httpx transport: answers by keyword, counts concurrency."""

    def __init__(self, failures_before_success: int = 0, status: int = 503, delay: float = 0.0, models=("m",),
                 tokenize: bool = False):
        self.failures_left = failures_before_success
        self.status = status
        self.delay = delay
        self.models = models
        self.tokenize = tokenize
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies = []
        self.paths = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        if request.url.path == "/tokenize":  # vLLM's endpoint, at the server root (not under /v1)
            if not self.tokenize:
                return httpx.Response(404, json={"detail": "Not Found"})
            prompt = json.loads(request.content)["prompt"]
            return httpx.Response(200, json={"count": len(prompt) + 3, "tokens": [], "max_model_len": 512})
        body = json.loads(request.content)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.failures_left > 0:
                self.failures_left -= 1
                return httpx.Response(self.status, text="overloaded")
            text = body["messages"][-1]["content"]
            if "long" in text:
                return httpx.Response(400, json={"error": {"message": "prompt too long"}})
            reply = "Positive." if "good" in text else "negative" if "bad" in text else "hmm"
            return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})
        finally:
            self.in_flight -= 1


def _label_all(labeller, items):
    results = {}
    labeller.label(items, lambda row_id, result: results.__setitem__(row_id, result))
    return results


def test_client_labels_concurrently_and_parses():
    server = FakeServer(delay=0.02)
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", concurrency=8,
                                        transport=httpx.MockTransport(server.handle))
    items = [(f"r{i}", ["good day", "bad day", "a day"][i % 3]) for i in range(30)]
    results = _label_all(labeller, items)
    assert len(results) == 30
    assert results["r0"].label == "positive" and results["r0"].reply == "Positive."
    assert results["r1"].label == "negative"
    assert results["r2"].label is None and results["r2"].reply == "hmm"  # unparseable: recorded, not dropped
    assert server.max_in_flight == 8
    assert all(body["structured_outputs"] == {"choice": ["positive", "negative", "neutral"]} for body in server.bodies)


def test_client_resolves_the_reply_budget_once_from_tokenize():
    # a server with vLLM's /tokenize: its counts (here len+3, more than the bytes) set the budget
    server = FakeServer(tokenize=True)
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", concurrency=4,
                                        transport=httpx.MockTransport(server.handle))
    results = _label_all(labeller, [(f"r{i}", "good") for i in range(12)])
    assert len(results) == 12 and labeller.max_tokens == len("positive") + 3 + 1
    assert {body["max_tokens"] for body in server.bodies} == {12}
    # one /models check and one /tokenize per label for the whole run, not per request
    assert server.paths.count("/v1/models") == 1 and server.paths.count("/tokenize") == 3
    assert server.paths.count("/v1/chat/completions") == 12
    # a server without /tokenize (another OpenAI-compatible server): the safe constant
    plain = FakeServer()
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", transport=httpx.MockTransport(plain.handle))
    _label_all(labeller, [("a", "good")])
    assert labeller.max_tokens == 16 and plain.bodies[0]["max_tokens"] == 16
    # an explicit --max-tokens is never replaced
    explicit = FakeServer(tokenize=True)
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", prompt=PromptTemplate(max_tokens=3),
                                        transport=httpx.MockTransport(explicit.handle))
    _label_all(labeller, [("a", "good")])
    assert explicit.bodies[0]["max_tokens"] == 3 and "/tokenize" not in explicit.paths


def test_client_retries_transient_failures_then_succeeds():
    server = FakeServer(failures_before_success=3, status=503)
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", concurrency=1,
                                        retry=RetryPolicy(max_retries=4, base_delay=0.001),
                                        transport=httpx.MockTransport(server.handle))
    results = _label_all(labeller, [("a", "good")])
    assert results["a"].label == "positive" and len(server.bodies) == 4


def test_client_gives_up_naming_the_url():
    server = FakeServer(failures_before_success=100, status=500)
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", retry=RetryPolicy(max_retries=2, base_delay=0.001),
                                        transport=httpx.MockTransport(server.handle))
    with pytest.raises(LLMServerError, match=r"127.0.0.1:9/v1 kept failing after 3 attempts"):
        _label_all(labeller, [("a", "good")])


def test_client_row_error_is_recorded():
    server = FakeServer()
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", transport=httpx.MockTransport(server.handle))
    results = _label_all(labeller, [("a", "a long text"), ("b", "good")])
    assert results["a"].error and "400" in results["a"].error and results["a"].label is None
    assert results["b"].label == "positive"


def test_client_wrong_model_lists_served_models():
    server = FakeServer(models=("alpha", "beta"))
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "gamma", transport=httpx.MockTransport(server.handle))
    with pytest.raises(LLMServerError, match=r"does not serve a model named 'gamma'; served models: alpha, beta"):
        labeller.check_sync()


def test_client_server_down_names_the_url():
    port = __import__("merits.labelling.vllm_server", fromlist=["free_port"]).free_port()  # nothing listens there
    labeller = OpenAICompatibleLabeller(f"http://127.0.0.1:{port}/v1", "m", retry=RetryPolicy(max_retries=1, base_delay=0.01))
    with pytest.raises(LLMServerError, match=rf"cannot reach the LLM server at http://127.0.0.1:{port}/v1"):
        labeller.check_sync()


def test_cli_server_down_exits_with_clear_error(tmp_path, capsys):
    from merits.labelling.vllm_server import free_port

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("id,text\na,hello\n")
    port = free_port()
    code = main(["--transcripts", str(csv_path), "--out", str(tmp_path / "out"), "--llm-url",
                 f"http://127.0.0.1:{port}/v1", "--llm-model", "m", "--max-retries", "1", "--retry-base-delay", "0.01"])
    assert code == 2
    assert f"cannot reach the LLM server at http://127.0.0.1:{port}/v1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- Whisper


def save_tiny_whisper(path: Path) -> Path:
    """A random tiny Whisper checkpoint that ``whisper.load_model(path)`` loads (the real vocabulary size)."""
    from dataclasses import asdict

    pytest.importorskip("whisper", reason="openai-whisper is not installed (pip install --no-deps openai-whisper)")
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def synth_speechlike(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A vowel-like harmonic tone with a syllable-rate envelope, at ``rate`` Hz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 40 * rng.random()
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.2 * wave * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_whisper_transcriber_batched_and_long(tmp_path):
    from merits.labelling.asr import WhisperTranscriber, load_whisper

    model = load_whisper(str(save_tiny_whisper(tmp_path / "tiny.pt")))
    transcriber = WhisperTranscriber(model, language="en", batch_size=2, sample_len=6)
    arrays = [synth_speechlike(1.0, 16000, 0), synth_speechlike(2.0, 16000, 1), synth_speechlike(0.5, 16000, 2)]
    transcripts = transcriber.transcribe(arrays)
    assert len(transcripts) == 3 and all(isinstance(t.text, str) for t in transcripts)
    assert all(t.language == "en" for t in transcripts)
    # batching does not change a clip's transcript
    single = WhisperTranscriber(model, language="en", batch_size=1, sample_len=6).transcribe(arrays[:1])
    assert single[0].text == transcripts[0].text


def test_whisper_unknown_model_name():
    pytest.importorskip("whisper", reason="openai-whisper is not installed (pip install --no-deps openai-whisper)")
    from merits.labelling.asr import ASRError, load_whisper

    with pytest.raises(ASRError, match="neither a file nor one of"):
        load_whisper("no-such-whisper")


# ---------------------------------------------------------------------------------------------- real data


def test_mosi_csv_reads_with_kept_columns():
    path = SHARED_DATA / "mosi" / "mosi_label.csv"
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set MERITS_SHARED_DATA)")
    rows = read_transcripts_csv(path)
    assert len(rows) == 1281 + 229
    assert set(rows[0]) == {"id", "text", "reference_label", "mode"}
    assert all(isinstance(row["reference_label"], float) for row in rows)


def test_cli_bad_valence_column_names_row(tmp_path, capsys):
    """Input errors are caught before any request: a missing valence column is named."""
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("id,text,valence\na,hello,5\n")
    code = main(["--transcripts", str(csv_path), "--out", str(tmp_path / "out"), "--llm-model", "m",
                 "--valence-column", "arousal"])
    assert code == 2 and "--valence-column 'arousal' is not a column of the input" in capsys.readouterr().err


def test_vllm_server_passes_extra_env_and_args(tmp_path):
    """VLLMServer hands its ``env`` and ``extra_args`` to the server process (checked with a fake python that
    records them and exits), keeps the mandatory CPU settings, and reports the early exit with its log."""
    import sys

    from merits.labelling.vllm_server import VLLMServer

    record = tmp_path / "seen.json"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n"
                    "print('fake server gives up'); sys.exit(3)\n")
    fake.chmod(0o755)
    server = VLLMServer(tmp_path / "model", python=fake, log_path=tmp_path / "server.log", startup_timeout=30,
                        extra_args=("--max-num-seqs=8",), env={"VLLM_SERVER_DEV_MODE": "1"})
    with pytest.raises(RuntimeError, match="exited with code 3") as error:
        server.start()
    assert "fake server gives up" in str(error.value)
    seen = json.loads(record.read_text())
    assert seen["env"]["VLLM_SERVER_DEV_MODE"] == "1" and seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert seen["argv"][:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in seen["argv"] and seen["argv"][-1] == "--max-num-seqs=8"
    assert server.process is None  # stopped after the failed start
