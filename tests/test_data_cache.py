"""Collators (merits.data.collate) and the embedding cache (merits.data.cache) with a tiny real model and processor."""

import numpy as np
import pytest
import torch

from merits import MeritsAcousticFeatureExtractor, MeritsForConversationClassification, MeritsProcessor
from merits.data import (
    ConversationCollator,
    ConversationDataset,
    DataFormatError,
    FeatureCollator,
    build_embedding_cache,
    conversations,
    make_demo_corpus,
    train_demo_tokenizer,
)
from merits.data.cache import length_batches
from merits.data.schema import audio_value, build_split, conversation_features

from _tiny import tiny_merits_config, tiny_roberta_config

torch.set_num_threads(1)
LABELS = {0: "neutral", 1: "happy", 2: "sad", 3: "angry"}


@pytest.fixture(scope="module")
def corpus():
    return make_demo_corpus(num_dialogues=6, seed=2)


@pytest.fixture(scope="module")
def processor(corpus):
    tokenizer = train_demo_tokenizer(corpus)
    return MeritsProcessor(tokenizer=tokenizer, feature_extractor=MeritsAcousticFeatureExtractor())


def make_model(processor, seed=0):
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    config = tiny_merits_config(
        text_config=tiny_roberta_config(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id),
        audio_feature_dim=processor.feature_extractor.feature_size,
        id2label=dict(LABELS),
    )
    return MeritsForConversationClassification(config)


class CountingModel(torch.nn.Module):
    """Wraps a model and counts get_utterance_embeddings calls (the cache must not call it on a rerun)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.text_encoder = getattr(model, "text_encoder", None)
        self.speech_encoder = getattr(model, "speech_encoder", None)
        self.config = model.config
        self.calls = 0

    def get_utterance_embeddings(self, **kwargs):
        self.calls += 1
        return self.inner.get_utterance_embeddings(**kwargs)


# --------------------------------------------------------------------------------------------- grouping


def test_conversations_ordered_by_turn_and_duplicates_rejected():
    features = conversation_features(["a", "b"])
    rows = [dict(dialogue_id=d, turn=t, text=f"{d}{t}", audio=None, label=0) for d, t in [("x", 10), ("y", 0), ("x", 2), ("x", 0)]]
    dataset = build_split(rows, features).shuffle(seed=0)
    grouped = {conversation[0]["dialogue_id"]: [row["turn"] for row in conversation] for conversation in conversations(dataset)}
    assert grouped == {"x": [0, 2, 10], "y": [0]}
    wrapped = ConversationDataset(dataset, columns=["dialogue_id", "turn", "text"])
    assert sorted(len(wrapped[i]) for i in range(len(wrapped))) == [1, 3]
    duplicated = build_split(rows[:3], features).add_item(dict(dialogue_id="x", turn=2, text="again", audio=None, label=1))
    with pytest.raises(DataFormatError, match="dialogue 'x' has turn 2 twice"):
        conversations(duplicated)


# --------------------------------------------------------------------------------------------- collators


def test_feature_collator_masks_padding_and_labels():
    def row(turn, text=True, audio=True, label=1):
        return dict(dialogue_id="d", turn=turn, label=label, text_embeds=[float(turn)] * 4 if text else None,
                    audio_embeds=[1.0, 2.0, 3.0] if audio else None)

    batch = FeatureCollator()([[row(0), row(1, audio=False), row(2, label=-1)], [row(0, text=False)]])
    assert batch["text_embeds"].shape == (2, 3, 4) and batch["audio_embeds"].shape == (2, 3, 3)
    assert batch["turn_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["text_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert batch["audio_mask"].tolist() == [[1, 0, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 1, -100], [1, -100, -100]]
    assert batch["text_embeds"][0, 2].tolist() == [2.0] * 4 and batch["text_embeds"][1].abs().sum() == 0
    strings = FeatureCollator(label2id={"happy": 3})([[dict(turn=0, label="happy", text_embeds=[0.0])]])
    assert strings["labels"].tolist() == [[3]]
    with pytest.raises(ValueError, match="turn 1: text_embeds has shape"):
        FeatureCollator()([[row(0), dict(row(1), text_embeds=[1.0])]])
    with pytest.raises(ValueError, match="unknown label 'joy'"):
        FeatureCollator(label2id={"happy": 0})([[dict(turn=0, label="joy", text_embeds=[0.0])]])
    long = FeatureCollator()([[row(t) for t in range(500)], [row(0)]])  # a 500-turn and a 1-turn conversation
    assert long["turn_mask"].shape == (2, 500) and long["turn_mask"][1].sum() == 1
    # exported stage II features (MERITS-L stage III): zero-padded, leave the modality masks alone
    with_context = [[dict(row(t, audio=t != 1), text_context_features=np.full(2, t, np.float32)) for t in range(3)],
                    [dict(row(0), text_context_features=np.ones(2, np.float32))]]
    batch = FeatureCollator()(with_context)
    assert batch["text_context_features"].shape == (2, 3, 2) and "audio_context_features" not in batch
    assert batch["text_context_features"][0, :, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["text_context_features"][1, 1:].abs().sum() == 0 and batch["audio_mask"].tolist() == [[1, 0, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="every turn of the batch needs it, or none"):
        FeatureCollator()([[with_context[0][0], row(1)]])


def test_conversation_collator_runs_the_processor(corpus, processor, tmp_path):
    dataset = ConversationDataset(corpus["train"])
    batch = ConversationCollator(processor)([dataset[0], dataset[1]])
    lengths = [len(dataset[0]), len(dataset[1])]
    assert batch["turn_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"].shape[0] == sum(lengths)
    assert batch["audio_features"].shape == (2, max(lengths), processor.feature_extractor.feature_size)
    assert batch["labels"].shape == batch["turn_mask"].shape
    assert batch["labels"][0, : lengths[0]].tolist() == [row["label"] for row in dataset[0]]
    assert (batch["labels"][batch["turn_mask"] == 0] == -100).all()
    model = make_model(processor)
    output = model(**batch)
    assert output.logits.shape == (2, max(lengths), len(LABELS)) and torch.isfinite(output.loss)
    text_only = ConversationCollator(processor, use_audio=False)([dataset[0]])
    assert "audio_features" not in text_only and text_only["audio_mask"].sum() == 0
    # a turn whose audio file is missing fails naming the conversation, the turn and the file
    broken = [dict(dataset[0][0], audio=audio_value(path=str(tmp_path / "gone.wav")))]
    with pytest.raises(ValueError, match=r"conversation 'demo_0000', turn 0 .*gone\.wav"):
        ConversationCollator(processor)([broken])


# ------------------------------------------------------------------------------------------ embedding cache


def test_embedding_cache_reuse_recompute_and_resume(corpus, processor, tmp_path):
    model = CountingModel(make_model(processor, seed=0))
    first = build_embedding_cache(model, processor, corpus["validation"], tmp_path, batch_size=4, chunk_size=8)
    calls = model.calls
    n = len(corpus["validation"])
    assert calls == sum(-(-min(8, n - start) // 4) for start in range(0, n, 8))  # batches of 4 inside chunks of 8
    assert first.column_names == ["dialogue_id", "turn", "label", "text_embeds", "audio_embeds"]
    assert first["dialogue_id"] == corpus["validation"]["dialogue_id"] and first["turn"] == corpus["validation"]["turn"]
    assert first.features["label"].names == list(LABELS.values())
    assert len(first[0]["text_embeds"]) > 0 and len(first[0]["audio_embeds"]) > 0

    # the cached embeddings are those of the model on each utterance alone (order restored after length sorting)
    row = corpus["validation"][3]
    single = processor(conversations=[[{"text": row["text"], "audio": np.asarray(row["audio"]["array"], np.float32)}]], return_tensors="pt")
    assert model.inner.training  # the cache switched to eval mode and back
    model.inner.eval()
    with torch.inference_mode():
        expected = model.inner.get_utterance_embeddings(**{k: v for k, v in single.items()})
    np.testing.assert_allclose(first[3]["text_embeds"], expected["text"][0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first[3]["audio_embeds"], expected["audio"][0].numpy(), rtol=1e-4, atol=1e-5)

    # rerun: loaded from disk, the model is not run
    again = build_embedding_cache(model, processor, corpus["validation"], tmp_path, batch_size=4, chunk_size=8)
    assert model.calls == calls
    assert again["text_embeds"] == first["text_embeds"]

    # a changed encoder recomputes
    with torch.no_grad():
        next(model.inner.text_encoder.parameters()).add_(0.5)
    changed = build_embedding_cache(model, processor, corpus["validation"], tmp_path, batch_size=4, chunk_size=8)
    assert model.calls > calls
    assert changed["text_embeds"] != first["text_embeds"]

    # resume: an interrupted run keeps its finished chunks and only computes the rest
    class Interrupt(Exception):
        pass

    fresh = CountingModel(make_model(processor, seed=1))
    original = fresh.get_utterance_embeddings
    budget = {"calls": 2}  # the first chunk (2 batches) finishes, then the run dies

    def flaky(**kwargs):
        if budget["calls"] == 0:
            raise Interrupt
        budget["calls"] -= 1
        return original(**kwargs)

    fresh.get_utterance_embeddings = flaky
    with pytest.raises(Interrupt):
        build_embedding_cache(fresh, processor, corpus["train"], tmp_path, batch_size=4, chunk_size=8)
    assert list(tmp_path.glob("*.partial/chunk_00000.npz"))
    fresh.get_utterance_embeddings = original
    fresh.calls = 0
    resumed = build_embedding_cache(fresh, processor, corpus["train"], tmp_path, batch_size=4, chunk_size=8)
    total_batches = sum(-(-min(8, len(corpus["train"]) - start) // 4) for start in range(0, len(corpus["train"]), 8))
    assert fresh.calls == total_batches - 2  # the first chunk (2 batches) was not recomputed
    assert len(resumed) == len(corpus["train"]) and not list(tmp_path.glob("*.partial"))


def test_embedding_cache_feature_dataset_trains_through_feature_collator(corpus, processor, tmp_path):
    model = make_model(processor)
    features = build_embedding_cache(model, processor, corpus, tmp_path, batch_size=16)
    assert set(features) == {"train", "validation", "test"}
    loader = torch.utils.data.DataLoader(ConversationDataset(features["train"]), batch_size=2, collate_fn=FeatureCollator())
    batch = next(iter(loader))
    assert batch["text_embeds"].shape[0] == 2 and batch["text_mask"].sum() == batch["turn_mask"].sum()
    text_only = build_embedding_cache(model, processor, corpus["train"], tmp_path, use_audio=False)
    assert text_only.column_names == ["dialogue_id", "turn", "label", "text_embeds"]


def greedy_fill(ordered, batch_size, max_tokens):
    """Sorted lengths cut greedily (a batch closes when the next item would break a budget)."""
    groups, current = [], []
    for length in ordered:
        if current and (len(current) + 1 > batch_size or (len(current) + 1) * length > max_tokens):
            groups.append(current)
            current = []
        current.append(int(length))
    return groups + [current]


def padded_positions(groups):
    return sum(len(group) * max(group) for group in groups)


def test_length_batches_respect_the_utterance_and_token_budgets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200)
    lengths[7] = 500  # longer than the budget: a batch of its own
    batches = length_batches(lengths, batch_size=16, max_tokens=256)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(200))  # every item exactly once
    assert (np.diff(lengths[flat]) >= 0).all()  # sorted by length
    assert any(b.tolist() == [7] for b in batches)
    for batch in batches:
        assert 1 <= len(batch) <= 16
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 256
    # as few batches as a greedy fill (the minimum), with no more padding than it (here: strictly less)
    for size, budget in ((16, 256), (64, 768)):
        planned, greedy = length_batches(lengths, size, budget), greedy_fill(np.sort(lengths), size, budget)
        assert len(planned) == len(greedy)
        assert padded_positions([lengths[b].tolist() for b in planned]) < padded_positions(greedy)
    assert [len(b) for b in length_batches(lengths, batch_size=16)] == [16] * 12 + [8]  # no token budget
    with pytest.raises(ValueError, match="max_tokens"):
        length_batches(lengths, 4, max_tokens=0)


def test_embedding_cache_token_budget_gives_the_same_embeddings(corpus, processor, tmp_path):
    model = CountingModel(make_model(processor, seed=0))
    split = corpus["validation"]
    large = build_embedding_cache(model, processor, split, tmp_path / "large", batch_size=64, max_tokens=None)
    calls = model.calls
    small = build_embedding_cache(model, processor, split, tmp_path / "small", batch_size=64, max_tokens=40)
    assert model.calls - calls > calls  # the token budget cut the split into more, smaller batches
    np.testing.assert_allclose(np.asarray(small["text_embeds"]), np.asarray(large["text_embeds"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(small["audio_embeds"]), np.asarray(large["audio_embeds"]), rtol=1e-4, atol=1e-5)


def test_embedding_cache_discards_partial_chunks_of_another_order(corpus, processor, tmp_path):
    model = make_model(processor)
    split = corpus["validation"]
    expected = build_embedding_cache(model, processor, split, tmp_path / "clean", batch_size=4, chunk_size=8)
    fingerprint = next(p.name for p in (tmp_path / "clean").iterdir() if p.is_dir())
    partial = tmp_path / "stale" / f"{fingerprint}.partial"
    partial.mkdir(parents=True)
    # a chunk left by a run that sorted differently (and no order.npy): its rows must not be trusted
    np.savez(partial / "chunk_00000.npz", indices=np.arange(8), text=np.zeros((8, len(expected[0]["text_embeds"])), np.float32),
             text_present=np.ones(8, bool))
    rebuilt = build_embedding_cache(model, processor, split, tmp_path / "stale", batch_size=4, chunk_size=8)
    np.testing.assert_allclose(np.asarray(rebuilt["text_embeds"]), np.asarray(expected["text_embeds"]), rtol=1e-4, atol=1e-5)
