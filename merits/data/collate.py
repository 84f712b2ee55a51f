"""From utterance rows to conversation batches (docs/design.md §2).

* :func:`conversation_indices` / :func:`conversations` group a dataset's rows (one per utterance)
  into conversations, turns in order.
* :class:`ConversationDataset` is a ``torch.utils.data.Dataset`` whose items are conversations.
* :class:`FeatureCollator` batches rows of a *feature dataset* (the embedding cache, api.md §5) into
  ``text_embeds`` / ``audio_embeds`` / ``audio_features`` [B, T, D], ``turn_mask`` / ``text_mask`` /
  ``audio_mask`` [B, T] and ``labels`` [B, T] with -100 at padding and unlabelled turns.
* :class:`ConversationCollator` batches raw conversations (text + audio rows of the schema) through a
  :class:`~merits.MeritsProcessor`.

Example::

    from torch.utils.data import DataLoader
    from merits.data import ConversationDataset, FeatureCollator

    loader = DataLoader(ConversationDataset(features["train"]), batch_size=8, shuffle=True,
                        collate_fn=FeatureCollator())
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .audio import SILENCE_PEAK, load_audio
from .schema import UNLABELLED, DataFormatError

IGNORE_INDEX = -100
EMBEDDING_COLUMNS = ("text_embeds", "audio_embeds", "audio_features")
#: exported MERITS-L stage II features (``model.get_context_features``): batched like the embeddings, no mask of their own
CONTEXT_FEATURE_COLUMNS = ("text_context_features", "audio_context_features")


def conversation_indices(dataset) -> list[tuple[str, list[int]]]:
    """``[(dialogue_id, [row indices in turn order]), ...]`` in order of each dialogue's first row.

    Raises :class:`~merits.data.schema.DataFormatError` when a dialogue has the same turn number twice.
    """
    for column in ("dialogue_id", "turn"):
        if column not in dataset.column_names:
            raise DataFormatError(f"dataset has no {column!r} column (columns: {dataset.column_names})")
    dialogue_ids = dataset["dialogue_id"]
    turns = dataset["turn"]
    groups: dict = {}
    for index, (dialogue, turn) in enumerate(zip(dialogue_ids, turns)):
        groups.setdefault(dialogue, []).append((int(turn), index))
    result = []
    for dialogue, items in groups.items():
        items.sort()
        for (turn_a, row_a), (turn_b, row_b) in zip(items, items[1:]):
            if turn_a == turn_b:
                raise DataFormatError(f"dialogue {dialogue!r} has turn {turn_a} twice (rows {row_a} and {row_b})")
        result.append((dialogue, [index for _, index in items]))
    return result


def conversations(dataset, columns: Sequence[str] | None = None) -> list[list[dict]]:
    """The dataset's rows grouped into conversations: a list of conversations, each a list of row dicts in turn order.

    ``columns`` restricts the columns read (e.g. leave out ``audio`` to keep memory low).
    """
    if columns is not None:
        dataset = dataset.select_columns(list(columns))
    return [[dataset[index] for index in indices] for _, indices in conversation_indices(dataset)]


class ConversationDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` of utterance rows viewed as a dataset of conversations (lists of rows in turn order)."""

    def __init__(self, dataset, columns: Sequence[str] | None = None):
        self.dataset = dataset.select_columns(list(columns)) if columns is not None else dataset
        self.groups = conversation_indices(self.dataset)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict]:
        _, rows = self.groups[index]
        batch = self.dataset[rows]  # one Arrow read per conversation
        return [{name: batch[name][i] for name in batch} for i in range(len(rows))]

    def dialogue_id(self, index: int) -> str:
        return self.groups[index][0]


def _label_id(label, label2id: dict | None, where: str) -> int:
    if label is None:
        return IGNORE_INDEX
    if isinstance(label, str):
        if label2id is None:
            raise ValueError(f"{where}: label {label!r} is a string; give the collator a label2id mapping")
        if label not in label2id:
            raise ValueError(f"{where}: unknown label {label!r}; known labels: {sorted(label2id)}")
        return int(label2id[label])
    label = int(label)
    return IGNORE_INDEX if label in (UNLABELLED, IGNORE_INDEX) else label


class FeatureCollator:
    """Batches conversations of feature-dataset rows into the tensors of docs/design.md §2.

    Each row has ``label`` and any of ``text_embeds`` / ``audio_embeds`` / ``audio_features`` (a list of
    floats, or None when the turn lacks that modality), and optionally the exported stage II features
    ``text_context_features`` / ``audio_context_features`` (MERITS-L stage III; every turn or none). Turns are padded to the longest conversation;
    padding is zero with mask 0 and label -100.

    With a ``tokenizer``, the rows' ``text`` is tokenised too (``input_ids`` / ``attention_mask`` [N, L] over
    the N real turns, row-major, an empty string where a turn has no text; ``text_mask`` = turns with text):
    the Stage I batch of a text encoder next to a speech head on precomputed ``audio_features``.

    Args:
        label2id: maps string labels to ids (feature datasets may store label names).
        label_column: the row key holding the label (None: no ``labels`` in the batch).
        tokenizer: optional text tokenizer (e.g. ``processor.tokenizer``) for the rows' ``text``.
        max_length: token limit per utterance with ``tokenizer`` (default: its ``model_max_length``, at most 512).
    """

    def __init__(self, label2id: dict | None = None, label_column: str | None = "label", tokenizer=None,
                 max_length: int | None = None):
        self.label2id = label2id
        self.label_column = label_column
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: list[list[dict]]) -> dict[str, torch.Tensor]:
        if not batch or any(len(conversation) == 0 for conversation in batch):
            raise ValueError("FeatureCollator needs a non-empty list of non-empty conversations")
        batch_size, max_turns = len(batch), max(len(conversation) for conversation in batch)
        turn_mask = torch.zeros(batch_size, max_turns, dtype=torch.long)
        output: dict[str, torch.Tensor] = {"turn_mask": turn_mask}
        for column in EMBEDDING_COLUMNS:
            present = [row.get(column) for conversation in batch for row in conversation if row.get(column) is not None]
            if not present:
                continue
            dim = np.asarray(present[0]).shape
            values = torch.zeros((batch_size, max_turns) + tuple(dim), dtype=torch.float32)
            mask = torch.zeros(batch_size, max_turns, dtype=torch.long)
            for b, conversation in enumerate(batch):
                for t, row in enumerate(conversation):
                    value = row.get(column)
                    if value is None:
                        continue
                    value = torch.as_tensor(np.asarray(value, dtype=np.float32))
                    if tuple(value.shape) != tuple(dim):
                        raise ValueError(
                            f"conversation {row.get('dialogue_id', b)!r}, turn {row.get('turn', t)}: {column} has shape "
                            f"{tuple(value.shape)}, expected {tuple(dim)}"
                        )
                    values[b, t] = value
                    mask[b, t] = 1
            output[column] = values
            mask_name = "text_mask" if column == "text_embeds" else "audio_mask"
            output[mask_name] = torch.maximum(output[mask_name], mask) if mask_name in output else mask
        for column in CONTEXT_FEATURE_COLUMNS:
            present = [row[column] for conversation in batch for row in conversation if row.get(column) is not None]
            if not present:
                continue
            if len(present) != sum(len(conversation) for conversation in batch):
                raise ValueError(f"{column}: every turn of the batch needs it, or none (exported for whole conversations)")
            dim = np.asarray(present[0]).shape[-1]
            values = torch.zeros(batch_size, max_turns, dim, dtype=torch.float32)
            for b, conversation in enumerate(batch):
                values[b, : len(conversation)] = torch.as_tensor(np.stack([np.asarray(r[column], np.float32) for r in conversation]))
            output[column] = values
        for b, conversation in enumerate(batch):
            turn_mask[b, : len(conversation)] = 1
        if self.tokenizer is not None:
            output.update(self._tokenize(batch, batch_size, max_turns))
        if self.label_column is not None:
            labels = torch.full((batch_size, max_turns), IGNORE_INDEX, dtype=torch.long)
            for b, conversation in enumerate(batch):
                for t, row in enumerate(conversation):
                    where = f"conversation {row.get('dialogue_id', b)!r}, turn {row.get('turn', t)}"
                    labels[b, t] = _label_id(row.get(self.label_column), self.label2id, where)
            output["labels"] = labels
        return output


    def _tokenize(self, batch: list[list[dict]], batch_size: int, max_turns: int) -> dict[str, torch.Tensor]:
        texts, text_mask = [], torch.zeros(batch_size, max_turns, dtype=torch.long)
        for b, conversation in enumerate(batch):
            for t, row in enumerate(conversation):
                text = row.get("text") or ""
                if not isinstance(text, str):
                    raise ValueError(f"conversation {row.get('dialogue_id', b)!r}, turn {row.get('turn', t)}: text must be a str")
                texts.append(text if text.strip() else "")
                text_mask[b, t] = int(bool(text.strip()))
        max_length = self.max_length or min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_attention_mask=True,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long(),
                "text_mask": text_mask}


class ConversationCollator:
    """Batches raw conversations (rows with ``text`` and ``audio`` of the schema) through a ``MeritsProcessor``.

    Audio cells are decoded with :func:`merits.data.audio.load_audio` (soxr, errors naming the file)
    and handed to the processor as 16 kHz arrays; empty text counts as a turn without text.

    Args:
        processor: a :class:`~merits.MeritsProcessor` (tokenizer and/or feature extractor).
        use_text, use_audio: drop a modality (e.g. Stage I of one modality only).
        label_column: the row key holding the label (None: no ``labels``).
        sampling_rate: rate the audio is decoded to (the processor's backbones expect 16 kHz).
    """

    def __init__(self, processor, use_text: bool = True, use_audio: bool = True, label_column: str | None = "label",
                 sampling_rate: int = 16000, label2id: dict | None = None):
        if not (use_text or use_audio):
            raise ValueError("ConversationCollator needs at least one of use_text / use_audio")
        self.processor = processor
        self.use_text = use_text
        self.use_audio = use_audio
        self.label_column = label_column
        self.sampling_rate = sampling_rate
        self.label2id = label2id

    def turns(self, conversation: list[dict], index: int = 0) -> list[dict]:
        """The processor's turn dicts of one conversation."""
        turns = []
        for t, row in enumerate(conversation):
            where = f"conversation {row.get('dialogue_id', index)!r}, turn {row.get('turn', t)}"
            text = row.get("text") if self.use_text else None
            audio = row.get("audio") if self.use_audio else None
            if audio is not None:
                audio = load_audio(audio, sampling_rate=self.sampling_rate, source=f"{where} ({_audio_name(audio)})")
            if (text is None or not text.strip()) and audio is None:
                raise ValueError(f"{where} has neither text nor audio" + (" (text-only collator)" if not self.use_audio else ""))
            turns.append({"text": text if text else None, "audio": audio})
        return turns

    def __call__(self, batch: list[list[dict]]):
        conversations_ = [self.turns(conversation, b) for b, conversation in enumerate(batch)]
        inputs = self.processor(conversations=conversations_, sampling_rate=self.sampling_rate, return_tensors="pt")
        if self.label_column is not None:
            labels = torch.full(tuple(inputs["turn_mask"].shape), IGNORE_INDEX, dtype=torch.long)
            for b, conversation in enumerate(batch):
                for t, row in enumerate(conversation):
                    where = f"conversation {row.get('dialogue_id', b)!r}, turn {row.get('turn', t)}"
                    labels[b, t] = _label_id(row.get(self.label_column), self.label2id, where)
            inputs["labels"] = labels
        return inputs


def _audio_name(audio) -> str:
    if isinstance(audio, dict):
        return audio.get("path") or "in-memory audio"
    return str(audio) if isinstance(audio, str) else "in-memory audio"


class RandomAudioCrop(torch.utils.data.Dataset):
    """Training items (conversations of schema rows) whose audio is cut to a random ``seconds``-long window.

    MiSTER-E trains its speech encoder on random 5 s crops (papers.md §4.2; CARE pre-trains on 5 s crops too, §2.2);
    features for the later stages are still extracted from the whole utterance. A turn of at most ``seconds`` is kept
    whole (the official code pads it to 5 s with 1e-6; here the speech backbone's attention mask covers the padding).
    The window of item ``i`` in epoch ``e`` comes from ``numpy.random.default_rng([seed, e, i])``: random from epoch to
    epoch, and the same in a run resumed mid-epoch as in an unbroken one (the trainer calls :meth:`set_epoch`). The
    audio is decoded here (16 kHz) and handed on as an array, so the collator does not decode it again.
    """

    def __init__(self, items, seconds: float, seed: int = 0, sampling_rate: int = 16000):
        if seconds is None or seconds <= 0:
            raise ValueError(f"RandomAudioCrop: seconds must be positive, got {seconds}")
        self.items = items
        self.samples = int(round(seconds * sampling_rate))
        self.seed = int(seed)
        self.sampling_rate = sampling_rate
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        cropped = []
        for t, row in enumerate(self.items[index]):
            audio = row.get("audio")
            if audio is not None:
                where = f"conversation {row.get('dialogue_id', index)!r}, turn {row.get('turn', t)} ({_audio_name(audio)})"
                array = load_audio(audio, sampling_rate=self.sampling_rate, source=where)
                if len(array) > self.samples:
                    for _ in range(4):  # a silent window would be refused by the collator: draw again, else keep all
                        start = int(rng.integers(0, len(array) - self.samples + 1))
                        window = array[start : start + self.samples]
                        if np.abs(window).max() >= SILENCE_PEAK:
                            array = window
                            break
                row = {**row, "audio": {"path": None, "array": array, "sampling_rate": self.sampling_rate}}
            cropped.append(row)
        return cropped
