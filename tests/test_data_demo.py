"""The demo corpus (merits.data.demo): determinism, shape, the HMM's Bayes bound, quick baselines and the tokenizer."""

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from merits.data import conversation_indices, load_audio, make_demo_corpus, train_demo_tokenizer
from merits.data.demo import EMOTIONS, bayes_optimal_accuracy, bayes_optimal_table
from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor


@pytest.fixture(scope="module")
def corpus():
    return make_demo_corpus(num_dialogues=200, seed=0)


def test_demo_corpus_shape_and_determinism(corpus):
    assert list(corpus) == ["train", "validation", "test"]
    assert [len(set(corpus[s]["dialogue_id"])) for s in corpus] == [140, 30, 30]
    assert corpus["train"].features["label"].names == list(EMOTIONS)
    for split in corpus.values():
        for _, rows in conversation_indices(split):
            assert 6 <= len(rows) <= 14
    first = corpus["train"][0]
    audio = load_audio(first["audio"])
    assert first["audio"]["sampling_rate"] == 16000 and 0.5 <= audio.size / 16000 <= 1.5
    assert first["text"]
    again = make_demo_corpus(num_dialogues=8, seed=0, with_audio=False)
    small = make_demo_corpus(num_dialogues=8, seed=0, with_audio=False)
    assert again["train"]["text"] == small["train"]["text"] and again["test"]["label"] == small["test"]["label"]
    assert make_demo_corpus(num_dialogues=8, seed=1, with_audio=False)["train"]["text"] != small["train"]["text"]
    with_audio = make_demo_corpus(num_dialogues=4, seed=3)
    np.testing.assert_array_equal(with_audio["train"][0]["audio"]["array"], make_demo_corpus(num_dialogues=4, seed=3)["train"][0]["audio"]["array"])
    # emotions persist across turns (the Markov chain)
    labels, ids = np.asarray(corpus["train"]["label"]), np.asarray(corpus["train"]["dialogue_id"])
    same_dialogue = ids[1:] == ids[:-1]
    assert np.mean(labels[1:][same_dialogue] == labels[:-1][same_dialogue]) > 0.65


def test_bayes_bound_context_and_fusion_help(corpus):
    for split in ("validation", "test"):
        table = bayes_optimal_table(corpus[split])
        for modality in ("text", "audio", "both"):
            assert table[f"context_{modality}"] > table[f"utterance_{modality}"]
        for context in ("utterance", "context"):
            assert table[f"{context}_both"] > max(table[f"{context}_text"], table[f"{context}_audio"])
        assert 0.55 < table["utterance_text"] < 0.8 and 0.5 < table["utterance_audio"] < 0.75
        assert table["context_both"] < 0.95  # not trivially separable
    assert bayes_optimal_accuracy(corpus["test"]) == bayes_optimal_table(corpus["test"])["context_both"]
    with pytest.raises(ValueError, match="split of make_demo_corpus"):
        bayes_optimal_accuracy(corpus["test"].remove_columns(["latent_text_cue"]))


def _neighbours(features, dialogue_ids, offsets=(-1, 1)):
    """Each utterance's features concatenated with those of its neighbours in the same conversation (zeros outside)."""
    parts = [features]
    for offset in offsets:
        shifted = np.zeros_like(features)
        index = np.arange(len(features)) + offset
        ok = (index >= 0) & (index < len(features))
        ok[ok] &= dialogue_ids[index[ok]] == dialogue_ids[ok]
        shifted[ok] = features[index[ok]]
        parts.append(shifted)
    return np.concatenate(parts, axis=1)


@pytest.mark.slow  # among the costliest of the quick loop (issue 20: --durations on 2 shared cores)
def test_quick_baselines_context_and_fusion_help(corpus):
    """Logistic regression per utterance vs. with neighbouring turns, for text, audio and both (validation+test pooled)."""
    extractor = MeritsAcousticFeatureExtractor()
    vectorizer = CountVectorizer().fit(corpus["train"]["text"])
    data = {}
    for split in ("train", "evaluation"):
        parts = [corpus[split]] if split == "train" else [corpus["validation"], corpus["test"]]
        text = np.concatenate([vectorizer.transform(p["text"]).toarray() for p in parts]).astype(float)
        audio = np.concatenate([extractor([load_audio(a) for a in p["audio"]])["audio_features"] for p in parts])
        ids = np.concatenate([np.asarray(p["dialogue_id"]) for p in parts])
        labels = np.concatenate([np.asarray(p["label"]) for p in parts])
        data[split] = dict(text=text, audio=audio, both=np.hstack([text, audio]), ids=ids, labels=labels)

    def accuracy(modality, context):
        inputs = {s: (_neighbours(d[modality], d["ids"]) if context else d[modality]) for s, d in data.items()}
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        model.fit(inputs["train"], data["train"]["labels"])
        return model.score(inputs["evaluation"], data["evaluation"]["labels"])

    scores = {f"{'context' if c else 'utterance'}_{m}": accuracy(m, c) for m in ("text", "audio", "both") for c in (False, True)}
    print("demo corpus baselines (accuracy, validation+test):", {k: round(v, 3) for k, v in scores.items()})
    assert 0.5 < scores["utterance_text"] < 0.8 and 0.45 < scores["utterance_audio"] < 0.72
    assert scores["utterance_both"] > max(scores["utterance_text"], scores["utterance_audio"]) + 0.03
    assert scores["context_both"] > scores["utterance_both"] + 0.02
    assert scores["context_audio"] > scores["utterance_audio"]
    bound = bayes_optimal_table(corpus["validation"])["context_both"]
    assert scores["context_both"] < bound  # headroom left for the real context models


def test_demo_tokenizer(corpus, tmp_path):
    from transformers import AutoTokenizer

    for kind in ("wordlevel", "bpe"):
        tokenizer = train_demo_tokenizer(corpus, model=kind, vocab_size=300)
        assert tokenizer.pad_token_id == 0
        for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            assert token in tokenizer.get_vocab()
        encoded = tokenizer(["this is great , the flight", "okay"], padding=True)
        assert encoded["input_ids"][0][0] == tokenizer.cls_token_id and tokenizer.sep_token_id in encoded["input_ids"][1]
        assert encoded["attention_mask"][1][-1] == 0  # padded
        tokenizer.save_pretrained(tmp_path / kind)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / kind)
        assert reloaded("this is great")["input_ids"] == tokenizer("this is great")["input_ids"]
    word_level = train_demo_tokenizer(corpus)
    assert word_level.convert_ids_to_tokens(word_level("zyzzyva")["input_ids"])[1] == "[UNK]"
