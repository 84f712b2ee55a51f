"""Log-probability label scoring, calibration and few-shot prompts (merits.labelling.llm), against fakes."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from merits.labelling.llm import (
    CONTENT_FREE_INPUTS,
    OpenAICompatibleLabeller,
    PromptTemplate,
    content_free_log_prior,
    decide_label,
    first_token_map,
    label_scores_from_top_logprobs,
    label_surface_forms,
    mean_calibrated_labels,
    read_few_shot_csv,
)
from merits.labelling.run import main


def test_surface_forms_and_first_token_map():
    assert label_surface_forms("neutral") == ("neutral", " neutral", "Neutral", " Neutral")
    # SmolLM2 spells "Neutral" as "Ne" + "utral" while "Negative" is one token: "Ne" starts neutral only
    mapping = first_token_map({"negative": {"negative", "Negative"}, "neutral": {"neutral", "Ne"}, "positive": {"Pos", "Ne"}})
    assert mapping["Negative"] == "negative" and mapping["Pos"] == "positive"
    assert "Ne" not in mapping  # shared by two labels: dropped


def test_scores_sum_the_label_tokens_and_bound_missing_labels():
    entries = [{"token": "Positive", "logprob": math.log(0.4)}, {"token": " positive", "logprob": math.log(0.1)},
               {"token": "Ne", "logprob": math.log(0.2)}, {"token": "The", "logprob": math.log(0.05)}]
    token_labels = {"Positive": "positive", " positive": "positive", "Ne": "neutral", "negative": "negative"}
    scores, missing = label_scores_from_top_logprobs(entries, token_labels=token_labels)
    assert scores["positive"] == pytest.approx(math.log(0.5))
    assert scores["neutral"] == pytest.approx(math.log(0.2))
    assert missing == ("negative",) and scores["negative"] == pytest.approx(math.log(0.05))  # the smallest returned
    # without the tokenizer's map: whole words and unambiguous >= 3-character prefixes only ("Ne" is ambiguous)
    scores, missing = label_scores_from_top_logprobs(entries + [{"token": " neu", "logprob": math.log(0.1)}])
    assert scores["neutral"] == pytest.approx(math.log(0.1)) and missing == ("negative",)
    with pytest.raises(ValueError, match="no top_logprobs"):
        label_scores_from_top_logprobs([])


def test_calibration_moves_the_decision():
    rows = [{"positive": -0.5, "negative": -1.5, "neutral": -3.0}, {"positive": -0.7, "negative": -1.0, "neutral": -2.8},
            {"positive": -1.2, "negative": -0.9, "neutral": -3.4}]
    assert [decide_label(r) for r in rows] == ["positive", "positive", "negative"]  # raw: never neutral
    labels, prior = mean_calibrated_labels(rows + [None])
    assert prior == pytest.approx({"positive": -0.8, "negative": -3.4 / 3, "neutral": -9.2 / 3})
    assert labels[-1] is None  # a failed row stays unlabelled
    assert labels[1] == "neutral"  # its neutral score is the highest above that label's mean
    prior = content_free_log_prior([{"positive": math.log(0.7), "negative": math.log(0.2), "neutral": math.log(0.1)}])
    assert prior["positive"] == pytest.approx(math.log(0.7)) and decide_label(rows[0], prior) == "negative"
    with pytest.raises(ValueError, match="no scored rows"):
        mean_calibrated_labels([None, None])


def test_prompt_few_shot_turns_and_hash_compatibility(tmp_path):
    plain = PromptTemplate()
    # the hash of a plain choice-decoded prompt is unchanged by the new (default) settings
    assert plain.hash() == PromptTemplate(few_shot=(), decoding="choice", calibration="none").hash()
    shots = PromptTemplate(few_shot=(("I love it", "positive"), ("So sad", "negative")))
    messages = shots.messages("fine")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "[sentence]: I love it" and messages[2]["content"] == "positive"
    assert len({plain.hash(), shots.hash(), PromptTemplate(decoding="logprobs").hash(),
                PromptTemplate(decoding="logprobs", calibration="mean").hash()}) == 4
    with pytest.raises(ValueError, match="few-shot example"):
        PromptTemplate(few_shot=(("x", "happy"),))
    with pytest.raises(ValueError, match="needs decoding='logprobs'"):
        PromptTemplate(calibration="mean")
    path = tmp_path / "shots.csv"
    path.write_text("text,label\nGreat!,positive\nUgh.,negative\n")
    assert read_few_shot_csv(path) == (("Great!", "positive"), ("Ugh.", "negative"))
    path.write_text("text,label\nGreat!,joy\n")
    with pytest.raises(ValueError, match="line 2: label 'joy'"):
        read_few_shot_csv(path)


class LogprobServer:
    """A fake vLLM: /tokenize + /detokenize with a word-level vocabulary, chat completions with top_logprobs."""

    VOCAB = ["Positive", "positive", " positive", " Positive", "Negative", "negative", " negative", " Negative",
             "Ne", "utral", "neutral", " neutral", " Neutral", "The", "I"]

    def __init__(self):
        self.bodies = []

    def tokenize(self, text: str) -> list[int]:
        if text == "Neutral":
            return [self.VOCAB.index("Ne"), self.VOCAB.index("utral")]
        return [self.VOCAB.index(text)]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        body = json.loads(request.content)
        if path == "/tokenize":
            ids = self.tokenize(body["prompt"])
            return httpx.Response(200, json={"count": len(ids), "tokens": ids, "max_model_len": 512})
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": "".join(self.VOCAB[i] for i in body["tokens"])})
        self.bodies.append(body)
        text = body["messages"][-1]["content"]
        # a biased model: "positive" always leads; "sad" raises negative, "meeting" raises neutral ("Ne")
        probs = {"Positive": 0.5, "Negative": 0.1, "Ne": 0.05, "The": 0.05}
        if "sad" in text:
            probs.update(Negative=0.3)
        if "meeting" in text or text in CONTENT_FREE_INPUTS or text.endswith(": ") or text.endswith("N/A") \
                or text.endswith("[MASK]"):
            probs.update(Ne=0.12)
        top = [{"token": t, "logprob": math.log(p)} for t, p in sorted(probs.items(), key=lambda kv: -kv[1])]
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": top[0]["token"]},
                                                      "logprobs": {"content": [{"token": top[0]["token"],
                                                                                "logprob": top[0]["logprob"],
                                                                                "top_logprobs": top}]}}]})


def test_client_logprobs_decoding_body_tokens_and_content_free_prior():
    server = LogprobServer()
    prompt = PromptTemplate(decoding="logprobs", calibration="content-free", top_logprobs=5)
    labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "m", prompt=prompt, concurrency=4,
                                        transport=httpx.MockTransport(server.handle))
    results = {}
    labeller.label([("a", "what a sad day"), ("b", "the meeting is at noon"), ("c", "lovely")],
                   lambda row_id, result: results.__setitem__(row_id, result))
    body = server.bodies[-1]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 5
    assert "structured_outputs" not in body
    assert labeller.token_labels["Ne"] == "neutral" and labeller.token_labels[" positive"] == "positive"
    assert labeller.prior is not None and len(server.bodies) == 3 + len(CONTENT_FREE_INPUTS)
    assert results["b"].scores["neutral"] == pytest.approx(math.log(0.12))
    # raw, every row would be positive; against the content-free prior the evidence decides
    assert {k: decide_label(r.scores) for k, r in results.items()} == {"a": "positive", "b": "positive", "c": "positive"}
    assert results["a"].label == "negative" and results["c"].label == "positive"
    asyncio.run(asyncio.sleep(0))


def test_cli_logprobs_mean_calibration_and_summary(tmp_path, monkeypatch):
    server = LogprobServer()
    real_client = OpenAICompatibleLabeller._client

    def client(self):
        self.transport = httpx.MockTransport(server.handle)
        return real_client(self)

    monkeypatch.setattr(OpenAICompatibleLabeller, "_client", client)
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("id,text\nr1,what a sad day\nr2,the meeting is at noon\nr3,lovely\nr4,so nice\n")
    out = tmp_path / "out"
    args = ["--transcripts", csv_path, "--out", out, "--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m",
            "--decoding", "logprobs", "--calibration", "mean"]
    assert main([str(a) for a in args]) == 0
    import datasets

    dataset = datasets.load_from_disk(str(out))
    names = dataset.features["label"].names
    assert [names[i] for i in dataset["label"]] == ["negative", "neutral", "positive", "positive"]
    assert all(len(scores) == 3 for scores in dataset["llm_logprobs"])
    summary = json.loads((out / "journal" / "summary.json").read_text())
    assert summary["decoding"] == "logprobs" and summary["calibration"] == "mean" and set(summary["prior"]) == set(names)
    # a rerun resumes from the journal's raw scores and gives the same labels without asking the server again
    asked = len(server.bodies)
    assert main([str(a) for a in args]) == 0
    assert len(server.bodies) == asked
    assert datasets.load_from_disk(str(out))["label"] == dataset["label"]


def test_bench_pseudo_labels_agreement_and_labelled_mode(tmp_path, monkeypatch):
    """bench/bench_pseudo_labels.py: the metrics, VADER's cut-offs and --labelled on a small MELD-shaped CSV."""
    import csv
    import sys
    from pathlib import Path

    import datasets

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import bench.bench_pseudo_labels as bench

    figures = bench.agreement(["positive", "negative", None, "neutral"], ["positive", "neutral", "neutral", "neutral"])
    assert figures["accuracy"] == 50.0 and figures["unlabelled"] == 1
    assert figures["confusion_rows_oracle_cols_label_neg_neu_pos"] == [[0, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert bench.vader_labels(["I love it, wonderful!", "This is awful and I hate it.", "The table is here."]) == [
        "positive", "negative", "neutral"]

    meld = tmp_path / "dev.csv"
    with open(meld, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment"])
        for i, (text, sentiment) in enumerate([("Great news!", "positive"), ("Oh no.", "negative"), ("Okay.", "neutral")], 1):
            writer.writerow([i, text, "A", "joy", sentiment])
    transcripts = bench.meld_transcripts_csv(meld, tmp_path / "t.csv")
    assert transcripts.read_text().splitlines()[0] == "id,text,oracle_sentiment"
    labelled = tmp_path / "labels"
    names = ["negative", "neutral", "positive"]
    datasets.Dataset.from_dict({"id": ["1", "2", "3"], "label": [2, 0, 2], "llm_model": ["m"] * 3, "prompt_hash": ["h"] * 3}) \
        .cast_column("label", datasets.ClassLabel(names=names)).save_to_disk(str(labelled))
    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "shared")
    (tmp_path / "shared" / "meld").mkdir(parents=True)
    (tmp_path / "shared" / "meld" / "train_sent_emo.csv").write_text(meld.read_text())
    recorded = {}
    monkeypatch.setattr(bench, "record", lambda name, figures, notes="": recorded.update(name=name, figures=figures))
    bench.main(["--labelled", str(labelled), "--tags", "x", "--meld-csv", str(meld)])
    assert recorded["name"] == "pseudo_labels_meld"
    assert recorded["figures"]["x/llm/accuracy"] == pytest.approx(200 / 3)
    assert recorded["figures"]["x/llm_model"] == "m"

    # MELD train repeats `Sr No.` (329 twice): with Dialogue_ID / Utterance_ID the ids are MELD's clip names, unique
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"])
        writer.writerow([329, "Ooooohh!", "Joey", "surprise", "negative", 32, 0])
        writer.writerow([329, "It's the big night!", "Joey", "joy", "positive", 33, 1])
    rows = bench.read_meld(tmp_path / "train.csv")
    assert [r["id"] for r in rows] == ["dia32_utt0", "dia33_utt1"]
