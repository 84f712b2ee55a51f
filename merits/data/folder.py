"""A generic corpus: a folder of audio files and a labels CSV (EmoDB is the real example).

The CSV (``labels.csv`` in the folder, or any CSV path) has one row per utterance:

==================  =========================================================================
column              meaning
==================  =========================================================================
``file``            audio path relative to the CSV (``file_column``)
``emotion``         the label (``label_column``; any named column)
``text``            optional transcript (``text_column``)
``dialogue``        optional conversation id (``dialogue_column``); default: each file is its
                    own 1-turn conversation, ``dialogue_id`` = the file's stem
``turn``            optional integer turn (``turn_column``); required with ``dialogue_column``
``split``           optional split (``split_column``: train / dev|validation / test); default:
                    everything in ``train``
``speaker``, …      any other column is kept as a string analysis column (never a model input)
==================  =========================================================================

Every audio file must exist (a missing one raises naming the row). Labels are ``labels`` (an
ordered list; an unknown label raises naming the row) or, by default, the sorted distinct values.
:func:`leave_speaker_out_folds` builds the leave-one-speaker-out folds used for EmoDB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import datasets

from .schema import DataFormatError, LoadReport, audio_value, check_conversations, conversation_features, finish, label_index, read_csv

SPLIT_NAMES = {"train": "train", "dev": "validation", "valid": "validation", "validation": "validation", "test": "test"}
EMODB_EMOTIONS = ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral")


def load_folder(
    path,
    label_column: str = "emotion",
    file_column: str = "file",
    text_column: str | None = None,
    dialogue_column: str | None = None,
    turn_column: str | None = None,
    split_column: str | None = None,
    labels: Sequence[str] | None = None,
    return_report: bool = False,
):
    """Load a labels CSV + audio folder as a :class:`datasets.DatasetDict` (see the module docstring)."""
    path = Path(path)
    csv_path = path / "labels.csv" if path.is_dir() else path
    if dialogue_column is not None and turn_column is None:
        raise ValueError("dialogue_column needs turn_column (the order of the turns inside a conversation)")
    report = LoadReport(corpus=f"folder ({csv_path})")
    required = [file_column, label_column] + [c for c in (text_column, dialogue_column, turn_column, split_column) if c]
    table = read_csv(csv_path, required, "folder", report)
    if not table:
        raise DataFormatError(f"{csv_path}: no rows")
    names = list(labels) if labels is not None else sorted({values[label_column].strip() for _, values in table})
    used = set(required)
    extra_columns = [c for c in table[0][1] if c not in used]
    splits: dict[str, list[dict]] = {}
    for line, values in table:
        where = f"{csv_path}, line {line}"
        relative = values[file_column].strip()
        if not relative:
            raise DataFormatError(f"{where}: empty {file_column!r}")
        audio_path = (csv_path.parent / relative).resolve()
        if not audio_path.is_file():
            raise DataFormatError(f"{where}: audio file {audio_path} not found")
        if dialogue_column:
            dialogue = values[dialogue_column].strip()
            try:
                turn = int(values[turn_column])
            except ValueError:
                raise DataFormatError(f"{where}: {turn_column!r} must be an integer, got {values[turn_column]!r}") from None
        else:
            dialogue, turn = Path(relative).stem, 0
        split = "train"
        if split_column:
            split = SPLIT_NAMES.get(values[split_column].strip().lower())
            if split is None:
                raise DataFormatError(f"{where}: unknown split {values[split_column]!r}; expected one of {sorted(SPLIT_NAMES)}")
        row = dict(
            dialogue_id=dialogue, turn=turn, text=values[text_column].strip() if text_column else "",
            audio=audio_value(path=str(audio_path)), label=label_index(names, values[label_column].strip(), where), row=line,
        )
        row.update({column: values[column] for column in extra_columns})
        splits.setdefault(split, []).append(row)
    for split, rows in splits.items():
        check_conversations(rows, f"{csv_path} ({split} rows)")
    features = conversation_features(names, extra={column: datasets.Value("string") for column in extra_columns})
    return finish(splits, features, report, return_report)


def load_emodb(path, return_report: bool = False):
    """EmoDB as a folder corpus (``labels.csv`` with ``file, speaker, gender, text_id, emotion``).

    One split, ``train``: use :func:`leave_speaker_out_folds` for model selection. The labels are the
    7 EmoDB emotions in a fixed order (:data:`EMODB_EMOTIONS`). Clips are 22.05 kHz; ``load_audio``
    resamples them to 16 kHz.
    """
    return load_folder(path, label_column="emotion", file_column="file", labels=EMODB_EMOTIONS, return_report=return_report)


def leave_speaker_out_folds(dataset, speaker_column: str = "speaker") -> list[tuple[str, datasets.DatasetDict]]:
    """``[(speaker, DatasetDict(train=all other speakers, test=that speaker)), ...]``, speakers sorted.

    ``dataset`` is a :class:`datasets.Dataset` or a :class:`datasets.DatasetDict` (its splits are
    concatenated first). Conversations never straddle folds when every conversation has one speaker;
    a conversation with several speakers raises, since its turns would leak across the fold.
    """
    if isinstance(dataset, datasets.DatasetDict):
        dataset = datasets.concatenate_datasets(list(dataset.values()))
    if speaker_column not in dataset.column_names:
        raise DataFormatError(f"no {speaker_column!r} column for speaker folds (columns: {dataset.column_names})")
    speakers = dataset[speaker_column]
    if any(s is None or str(s).strip() == "" for s in speakers):
        row = next(i for i, s in enumerate(speakers) if s is None or str(s).strip() == "")
        raise DataFormatError(f"row {row} has no {speaker_column!r}")
    by_dialogue: dict = {}
    for row, (dialogue, speaker) in enumerate(zip(dataset["dialogue_id"], speakers)):
        if by_dialogue.setdefault(dialogue, speaker) != speaker:
            raise DataFormatError(f"dialogue {dialogue!r} has several speakers ({by_dialogue[dialogue]!r} and {speaker!r}, row {row})")
    distinct = sorted(set(speakers))
    if len(distinct) < 2:
        raise DataFormatError(f"leave-speaker-out folds need at least 2 speakers, found {distinct}")
    folds = []
    for speaker in distinct:
        test = [i for i, s in enumerate(speakers) if s == speaker]
        train = [i for i, s in enumerate(speakers) if s != speaker]
        folds.append((speaker, datasets.DatasetDict(train=dataset.select(train), test=dataset.select(test))))
    return folds
