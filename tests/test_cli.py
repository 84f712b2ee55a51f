"""Tests of the `merits` command (merits/cli.py): predict (batched, resumable) and evaluate on every dataset kind."""

import csv
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch
from _tiny import tiny_merits_config, tiny_roberta_config
from sklearn.metrics import accuracy_score, f1_score
from test_processing import make_tokenizer, voiced

from merits import MeritsForConversationClassification, MeritsProcessor, save_hub_folder
from merits.cli import main
from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor
from merits.pipeline_merits import ConversationEmotionRecognitionPipeline


torch.set_num_threads(1)
SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MELD_EMOTIONS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
WORDS = "oh my god he is lost it what i got the job that is terrible news hello there how are you so sorry".split()


def text_model_folder(folder, labels, architecture="merits-l", audio_feature_dim=None, extractor=None):
    torch.manual_seed(0)
    config = tiny_merits_config(
        architecture,
        text_config=tiny_roberta_config(),
        audio_embed_dim=None,
        audio_feature_dim=audio_feature_dim,
        id2label=dict(enumerate(labels)),
        initializer_range=0.3,
    )
    model = MeritsForConversationClassification(config).eval()
    processor = MeritsProcessor(tokenizer=make_tokenizer([" ".join(WORDS)]), feature_extractor=extractor)
    save_hub_folder(model, processor, folder)
    return folder


def pipeline_of(folder):
    model = MeritsForConversationClassification.from_pretrained(folder).eval()
    return ConversationEmotionRecognitionPipeline(model=model, processor=MeritsProcessor.from_pretrained(folder), device=-1)


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---- predict -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meld_model(tmp_path_factory):
    return text_model_folder(tmp_path_factory.mktemp("meld_model"), MELD_EMOTIONS)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_predict_batched_and_resumable(tmp_path, meld_model, monkeypatch):
    rng = np.random.default_rng(0)
    records = []
    for i in range(7):
        turns = [{"text": " ".join(rng.choice(WORDS, 5))} for _ in range(1 + i % 3)]
        records.append({"id": f"c{i}", "turns": turns} if i % 2 else turns)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, records)
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(meld_model), str(source), "-o", str(out), "--batch-size", "3", "--quiet"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["line"] for line in lines] == list(range(1, 8))
    assert [line.get("id") for line in lines] == [None, "c1", None, "c3", None, "c5", None]
    expected = pipeline_of(meld_model)([r["turns"] if isinstance(r, dict) else r for r in records])
    for line, conversation in zip(lines, expected):
        assert [t["label"] for t in line["predictions"]] == [t["label"] for t in conversation]
        for got, want in zip(line["predictions"], conversation):
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)

    # an interrupted run: 3 complete lines and a torn 4th one; the rerun only does lines 4-7
    full = out.read_text().splitlines(keepends=True)
    out.write_text("".join(full[:3]) + full[3][:20])
    calls = []
    original = ConversationEmotionRecognitionPipeline.__call__

    def counting(self, inputs, *args, **kwargs):
        calls.append(len(inputs) if inputs and isinstance(inputs[0], list) else 1)
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(ConversationEmotionRecognitionPipeline, "__call__", counting)
    assert main(["predict", "--model", str(meld_model), str(source), "-o", str(out), "--batch-size", "3", "--quiet"]) == 0
    assert sum(calls) == 4
    assert out.read_text() == "".join(full)
    calls.clear()
    assert main(["predict", "--model", str(meld_model), str(source), "-o", str(out), "--quiet"]) == 0
    assert calls == []  # nothing left to do


def test_predict_bad_lines_are_named(tmp_path, meld_model, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps([{"text": "hello there"}]) + "\n" + json.dumps([{"text": "oh"}, {"speaker": "x"}]) + "\n")
    out = tmp_path / "out.jsonl"
    # the good line is written, the bad one is named (line and turn both counted from 1) and the exit status is 1
    assert main(["predict", "--model", str(meld_model), str(source), "-o", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"{source} line 2, turn 2: the turn has neither 'text' nor 'audio'" in error
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1]
    assert main(["predict", "--model", str(meld_model), str(source), "-o", str(out), "--quiet", "--skip-errors"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "predictions" in lines[0] and "neither" in lines[1]["error"]
    source.write_text("[{\"text\": \"hello\"\n")
    assert main(["predict", "--model", str(meld_model), str(source), "-o", str(tmp_path / "o2.jsonl"), "--quiet"]) == 1
    assert "line 1: not valid JSON" in capsys.readouterr().err


def test_predict_resolves_audio_paths_relative_to_the_input(tmp_path, capsys):
    extractor = MeritsAcousticFeatureExtractor()
    folder = text_model_folder(
        tmp_path / "model", MELD_EMOTIONS, "mister-e", audio_feature_dim=extractor.feature_size, extractor=extractor
    )
    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "a.wav", voiced(0.5), 22050)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [[{"text": "hello there", "audio": "audio/a.wav"}, {"audio": "audio/a.wav"}]])
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(folder), str(source), "-o", str(out), "--quiet"]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["predictions"][1]["gate"]["text"] == pytest.approx(0.0, abs=1e-6)


# ---- evaluate ----------------------------------------------------------------------------------------------------


def write_meld_csv(path, rows):
    columns = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i, (text, emotion, dialogue, utterance) in enumerate(rows, start=1):
            writer.writerow([i, text, "A", emotion, "neutral", dialogue, utterance, 1, 1, "00:00:01,000", "00:00:02,000"])


def expected_metrics(folder, conversations, gold_names):
    classifier = pipeline_of(folder)
    predicted = [turn["label"] for conversation in classifier(conversations) for turn in conversation]
    labels = list(classifier.model.config.label2id)
    return (
        f1_score(gold_names, predicted, labels=labels, average="weighted", zero_division=0),
        accuracy_score(gold_names, predicted),
    )


def test_evaluate_meld_csv(tmp_path, meld_model, capsys):
    rng = np.random.default_rng(1)
    rows, conversations, gold = [], [], []
    for dialogue in range(4):
        conversation = []
        for utterance in range(3):
            text, emotion = " ".join(rng.choice(WORDS, 4)), MELD_EMOTIONS[int(rng.integers(7))]
            rows.append((text, emotion, dialogue, utterance))
            conversation.append({"text": text})
            gold.append(emotion)
        conversations.append(conversation)
    path = tmp_path / "test_sent_emo.csv"
    write_meld_csv(path, rows)
    result = run_json(capsys, ["evaluate", "--model", str(meld_model), "--dataset", "meld", "--file", str(path), "--quiet"])
    weighted_f1, accuracy = expected_metrics(meld_model, conversations, gold)
    assert result["weighted_f1"] == pytest.approx(weighted_f1) and result["accuracy"] == pytest.approx(accuracy)
    assert result["num_utterances"] == 12 and result["num_conversations"] == 4
    assert set(result["per_class_f1"]) == set(MELD_EMOTIONS)
    assert sum(result["counts"].values()) == 12 and result["metrics_backend"].startswith("merits.metrics")


def test_evaluate_meld_unknown_label_is_named(tmp_path, capsys):
    folder = text_model_folder(tmp_path / "m", ["neutral", "joy", "sadness"])
    path = tmp_path / "dev.csv"
    write_meld_csv(path, [("hello there", "neutral", 0, 0), ("oh my god", "fear", 0, 1)])
    assert main(["evaluate", "--model", str(folder), "--dataset", "meld", "--file", str(path), "--quiet"]) == 2
    assert "label 'fear' is not one of the model's labels" in capsys.readouterr().err


def test_evaluate_mosi_split_and_binary_labels(tmp_path, capsys):
    folder = text_model_folder(tmp_path / "m", ["negative", "positive"])
    path = tmp_path / "label.csv"
    rows = [("vid_1", "i got the job", 2.0, "train"), ("vid_2", "that is terrible news", -1.5, "test"),
            ("vid_3", "oh my god", 0.0, "test"), ("vid_4", "so sorry", -0.2, "test")]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label", "mode"])
        writer.writerows(rows)
    everything = run_json(capsys, ["evaluate", "--model", str(folder), "--dataset", "mosi", "--file", str(path), "--quiet"])
    test = run_json(
        capsys, ["evaluate", "--model", str(folder), "--dataset", "mosi", "--file", str(path), "--split", "test", "--quiet"]
    )
    assert everything["num_utterances"] == 4 and test["num_utterances"] == 3
    assert test["counts"] == {"negative": 2, "positive": 1}  # score < 0 is negative, 0 is positive
    conversations = [[{"text": text}] for _, text, _, mode in rows if mode == "test"]
    weighted_f1, accuracy = expected_metrics(folder, conversations, ["negative", "positive", "negative"])
    assert test["weighted_f1"] == pytest.approx(weighted_f1) and test["accuracy"] == pytest.approx(accuracy)


def test_evaluate_emodb_like_folder(tmp_path, capsys):
    """An audio-only model on an EmoDB-like labels.csv with paths relative to it (22.05 kHz clips)."""
    extractor = MeritsAcousticFeatureExtractor()
    torch.manual_seed(0)
    labels = ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"]
    config = tiny_merits_config(
        "merits-l", text_embed_dim=None, audio_embed_dim=None, audio_feature_dim=extractor.feature_size,
        id2label=dict(enumerate(labels)), initializer_range=0.3,
    )
    model = MeritsForConversationClassification(config).eval()
    folder = tmp_path / "m"
    save_hub_folder(model, MeritsProcessor(feature_extractor=extractor), folder)
    corpus = tmp_path / "emodb"
    (corpus / "wav").mkdir(parents=True)
    gold, conversations = [], []
    with open(corpus / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "speaker", "gender", "text_id", "emotion"])
        for i, emotion in enumerate(["anger", "neutral", "sadness", "anger"]):
            name = f"wav/15a0{i}.wav"
            soundfile.write(corpus / name, voiced(0.6, f0=100 + 40 * i, sampling_rate=22050, seed=i), 22050)
            writer.writerow([name, "15", "m", f"a0{i}", emotion])
            gold.append(emotion)
            conversations.append([{"audio": str(corpus / name)}])
    result = run_json(capsys, ["evaluate", "--model", str(folder), "--dataset", "emodb", "--file", str(corpus / "labels.csv"), "--quiet"])
    weighted_f1, accuracy = expected_metrics(folder, conversations, gold)
    assert result["weighted_f1"] == pytest.approx(weighted_f1) and result["accuracy"] == pytest.approx(accuracy)
    assert result["num_utterances"] == 4


def test_evaluate_feature_dataset_and_feature_only_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = MeritsForConversationClassification(tiny_merits_config("mister-e", initializer_range=0.3)).eval()
    folder = tmp_path / "m"
    save_hub_folder(model, None, folder)
    rng = np.random.default_rng(0)
    rows = {"dialogue_id": [], "turn": [], "label": [], "text_embeds": [], "audio_embeds": []}
    for dialogue in range(3):
        for turn in reversed(range(4)):  # rows out of order on purpose
            rows["dialogue_id"].append(f"d{dialogue}")
            rows["turn"].append(turn)
            rows["label"].append(["neutral", "happy", "sad"][int(rng.integers(3))])
            rows["text_embeds"].append(rng.standard_normal(12).astype(np.float32).tolist())
            rows["audio_embeds"].append(rng.standard_normal(10).astype(np.float32).tolist())
    features = tmp_path / "features"
    datasets.Dataset.from_dict(rows).save_to_disk(str(features))
    result = run_json(capsys, ["evaluate", "--model", str(folder), "--dataset", "features", "--file", str(features), "--quiet"])
    predicted, gold = [], []
    with torch.no_grad():
        for dialogue in range(3):
            index = sorted(range(dialogue * 4, dialogue * 4 + 4), key=lambda i: rows["turn"][i])
            logits = model(
                text_embeds=torch.tensor([[rows["text_embeds"][i] for i in index]]),
                audio_embeds=torch.tensor([[rows["audio_embeds"][i] for i in index]]),
            ).logits[0]
            predicted += logits.argmax(-1).tolist()
            gold += [model.config.label2id[rows["label"][i]] for i in index]
    assert result["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert result["weighted_f1"] == pytest.approx(f1_score(gold, predicted, labels=[0, 1, 2], average="weighted", zero_division=0))

    path = tmp_path / "dev.csv"
    write_meld_csv(path, [("hello there", "neutral", 0, 0)])
    assert main(["evaluate", "--model", str(folder), "--dataset", "meld", "--file", str(path), "--quiet"]) == 2
    assert "can only be evaluated on a feature dataset, with --dataset features" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATA / "meld" / "dev_sent_emo.csv").is_file(), reason=f"no MELD data at {SHARED_DATA}/meld")
def test_evaluate_real_meld_dev_subset(tmp_path, meld_model, capsys):
    """The real MELD CSV format (quotes, unicode, times): its first 30 rows as a held-back file."""
    lines = (SHARED_DATA / "meld" / "dev_sent_emo.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    reader = list(csv.reader(lines))
    path = tmp_path / "subset.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(reader[:31])
    result = run_json(capsys, ["evaluate", "--model", str(meld_model), "--dataset", "meld", "--file", str(path), "--quiet"])
    assert result["num_utterances"] == 30 and 0.0 <= result["weighted_f1"] <= 1.0
    assert sum(result["counts"].values()) == 30
