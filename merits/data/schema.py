"""The conversation dataset schema shared by every loader in :mod:`merits.data`.

Every loader returns a :class:`datasets.DatasetDict` (splits ``train`` / ``validation`` / ``test``
where the corpus defines them) whose rows are **utterances**, one row per turn:

=================  =====================================================================================
column             meaning
=================  =====================================================================================
``dialogue_id``    ``string``. The conversation the turn belongs to (IEMOCAP dialog, MELD ``Dialogue_ID``,
                   MOSI video id, MSP-Podcast podcast id, or the file stem for corpora without
                   conversations, e.g. EmoDB).
``turn``           ``int32``. Position of the turn inside its conversation; turns are ordered by it
                   (temporal order). Unique inside a conversation, not necessarily contiguous.
``text``           ``string``. Transcript of the turn, ``""`` when the turn has no text.
``audio``          ``struct{path: string, array: list<float32>, sampling_rate: int32}`` or ``None``
                   when the turn has no audio. Loaders of on-disk corpora fill ``path`` (absolute)
                   and leave ``array`` empty; the demo corpus fills ``array`` and ``sampling_rate``.
                   Decode any value with :func:`merits.data.audio.load_audio`. (We do not use
                   ``datasets.Audio``: it needs ``torchcodec``, which is not usable here.)
``label``          ``ClassLabel``: the label names travel with the dataset
                   (``ds.features["label"].names``). ``-1`` marks an unlabelled turn.
extra columns      analysis-only information that is **never a model input**, e.g. ``speaker``,
                   ``valence``, ``sentiment_score``, ``emotion_raw``, ``start``/``end`` times.
=================  =====================================================================================

Both systems are speaker-agnostic: ``speaker`` (when a corpus has it) is kept for analysis and for
leave-speaker-out folds only.

Bad input never disappears silently. A loader either raises :class:`DataFormatError` naming the
file, row or turn, or (only behind an explicit option such as ``drop_other_labels=True`` or
``missing_audio="none"``) keeps going and records what it did in a :class:`LoadReport`, which is
logged and returned when the loader is called with ``return_report=True``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import pyarrow as pa

logger = logging.getLogger("merits.data")

SPLITS = ("train", "validation", "test")

#: Label value of a turn without a label (mapped to -100 by the collators).
UNLABELLED = -1

AUDIO_FEATURE = {
    "path": datasets.Value("string"),
    "array": datasets.Sequence(datasets.Value("float32")),
    "sampling_rate": datasets.Value("int32"),
}


class DataFormatError(ValueError):
    """A corpus file does not have the expected format; the message names the file, row or turn."""


@dataclasses.dataclass
class LoadReport:
    """What a loader read, kept and deliberately left out (``dropped`` maps a reason to a count)."""

    corpus: str
    rows_read: int = 0
    rows_kept: dict = dataclasses.field(default_factory=dict)  # split -> rows
    dropped: Counter = dataclasses.field(default_factory=Counter)  # reason -> rows left out
    issues: Counter = dataclasses.field(default_factory=Counter)  # reason -> rows kept with a problem
    notes: list = dataclasses.field(default_factory=list)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count

    def issue(self, reason: str, count: int = 1) -> None:
        self.issues[reason] += count

    def note(self, message: str) -> None:
        self.notes.append(message)

    def summary(self) -> str:
        kept = ", ".join(f"{split}={n}" for split, n in self.rows_kept.items())
        text = f"{self.corpus}: read {self.rows_read} rows, kept {kept or 'none'}"
        if self.dropped:
            text += "; left out: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        if self.issues:
            text += "; kept: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.issues.items()))
        for note in self.notes:
            text += f"; {note}"
        return text

    def log(self) -> None:
        level = logging.WARNING if (self.dropped or self.issues or self.notes) else logging.INFO
        logger.log(level, self.summary())


def conversation_features(label_names: Sequence[str], extra: dict | None = None) -> datasets.Features:
    """The :class:`datasets.Features` of the schema above, with ``extra`` analysis columns appended."""
    features = {
        "dialogue_id": datasets.Value("string"),
        "turn": datasets.Value("int32"),
        "text": datasets.Value("string"),
        "audio": dict(AUDIO_FEATURE),
        "label": datasets.ClassLabel(names=list(label_names)),
    }
    for name, feature in (extra or {}).items():
        features[name] = feature
    return datasets.Features(features)


def audio_value(path: str | None = None, array=None, sampling_rate: int | None = None) -> dict | None:
    """One ``audio`` cell: a path on disk or an in-memory array (with its sampling rate)."""
    if path is None and array is None:
        return None
    return {
        "path": None if path is None else str(path),
        "array": None if array is None else array,
        "sampling_rate": sampling_rate,
    }


def check_conversations(rows: Iterable[dict], source: str) -> None:
    """Raise :class:`DataFormatError` when a conversation has the same turn number twice.

    ``rows`` are dicts with ``dialogue_id`` and ``turn`` (and optionally ``row``, the line or row
    number in ``source`` used in the message).
    """
    seen: dict[tuple, Any] = {}
    for row in rows:
        key = (row["dialogue_id"], row["turn"])
        where = row.get("row")
        if key in seen:
            raise DataFormatError(
                f"{source}: dialogue {key[0]!r} has turn {key[1]} twice"
                + (f" (rows {seen[key]} and {where})" if where is not None else "")
            )
        seen[key] = where


def build_split(rows: list[dict], features: datasets.Features) -> datasets.Dataset:
    """A dataset of ``rows`` (dicts with the schema columns) sorted by dialogue (first appearance) then turn."""
    order: dict[str, int] = {}
    for row in rows:
        order.setdefault(row["dialogue_id"], len(order))
    rows = sorted(rows, key=lambda r: (order[r["dialogue_id"]], r["turn"]))
    columns = {name: [row.get(name) for row in rows] for name in features}
    return dataset_from_columns(columns, features)


def audio_arrow_column(values: list[dict | None]) -> pa.StructArray:
    """The ``audio`` column as an Arrow struct array, built without a Python loop over samples.

    ``datasets.Dataset.from_dict`` converts audio arrays sample by sample (≈10 s for the demo
    corpus); concatenating them with numpy is a hundred times faster.
    """
    is_null = [value is None for value in values]
    paths, rates, arrays = [], [], []
    for value in values:
        value = value or {}
        paths.append(value.get("path"))
        rate = value.get("sampling_rate")
        rates.append(None if rate is None else int(rate))
        array = value.get("array")
        arrays.append(None if array is None else np.asarray(array, dtype=np.float32).reshape(-1))
    lengths = np.asarray([0 if a is None else a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([a for a in arrays if a is not None]) if any(a is not None for a in arrays) else np.zeros(0, np.float32)
    array_mask = pa.array([a is None for a in arrays])
    list_array = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()), mask=array_mask)
    list_array = list_array.cast(pa.list_(pa.float32()))
    return pa.StructArray.from_arrays(
        [pa.array(paths, pa.string()), list_array, pa.array(rates, pa.int32())],
        names=["path", "array", "sampling_rate"],
        mask=pa.array(is_null),
    )


def dataset_from_columns(columns: dict[str, list], features: datasets.Features) -> datasets.Dataset:
    """A :class:`datasets.Dataset` from column lists; the ``audio`` column goes through :func:`audio_arrow_column`."""
    if "audio" not in columns or "audio" not in features:
        return datasets.Dataset.from_dict(columns, features=features)
    others = datasets.Features({name: feature for name, feature in features.items() if name != "audio"})
    table = datasets.Dataset.from_dict({name: columns[name] for name in others}, features=others).data.table
    table = table.append_column("audio", audio_arrow_column(columns["audio"]))
    table = table.select(list(features)).cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def label_index(names: Sequence[str], value: str, source: str, allowed_hint: str = "") -> int:
    """Index of ``value`` in ``names``; an unknown label raises naming ``source`` (file and row)."""
    try:
        return list(names).index(value)
    except ValueError:
        raise DataFormatError(
            f"{source}: unknown label {value!r}; expected one of {list(names)}{allowed_hint}"
        ) from None


def finish(splits: dict[str, list[dict]], features: datasets.Features, report: LoadReport, return_report: bool):
    """Build the :class:`datasets.DatasetDict`, fill and log the report, return what the caller asked for."""
    dsd = datasets.DatasetDict()
    for split in list(SPLITS) + sorted(set(splits) - set(SPLITS)):
        if split in splits and splits[split]:
            dsd[split] = build_split(splits[split], features)
            report.rows_kept[split] = len(dsd[split])
    if not dsd:
        raise DataFormatError(f"{report.corpus}: no rows left to load ({report.summary()})")
    report.log()
    return (dsd, report) if return_report else dsd


def _decode_legacy(raw: bytes, path) -> str:
    """A CSV that is not UTF-8: cp1252 when no line of it is UTF-8 beyond ASCII (the original MELD release);
    an error naming the first bad line when the file mixes UTF-8 text with other bytes (a corrupt or
    concatenated file: decoding it all as cp1252 would turn every UTF-8 character into mojibake)."""
    lines = raw.split(b"\n")
    utf8_line, bad_line = None, None
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8-sig" if number == 1 else "utf-8")
            if utf8_line is None and any(byte >= 0x80 for byte in line):
                utf8_line = number
        except UnicodeDecodeError as error:
            if bad_line is None:
                bad_line = (number, error.start + 1, line[error.start : error.start + 1])
    if utf8_line is not None and bad_line is not None:
        number, column, byte = bad_line
        raise DataFormatError(
            f"{path}, line {number}: byte {column} ({byte!r}) is not UTF-8, while line {utf8_line} is UTF-8 text; "
            "the file mixes encodings. Re-save it as UTF-8 (a file entirely in cp1252, as the original MELD "
            "release, is read as cp1252)."
        )
    try:
        return raw.decode("cp1252", errors="strict")
    except UnicodeDecodeError as error:
        number = raw[: error.start].count(b"\n") + 1
        raise DataFormatError(f"{path}, line {number}: neither UTF-8 nor cp1252 text (byte {raw[error.start:error.start + 1]!r})") from None


def read_csv(path, required: Sequence[str], corpus: str, report: LoadReport | None = None) -> list[tuple[int, dict]]:
    """Rows of a CSV file as ``(line number, row dict)``; a missing column or a ragged row raises naming the file.

    Files are read as UTF-8 (with or without BOM). A file that is not valid UTF-8 is read as cp1252
    (the encoding of the original MELD release) and the report says so.
    """
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{corpus}: {path} not found")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        content = _decode_legacy(raw, path)
        if report is not None:
            report.note(f"{path.name} is not UTF-8; read as cp1252")
    import io

    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path}: empty file (no header row)") from None
    header = [name.strip() for name in header]
    missing = [name for name in required if name not in header]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing}; the header has {header}")
    rows = []
    for values in reader:
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataFormatError(
                f"{path}, line {reader.line_num}: {len(values)} fields where the header has {len(header)} "
                "(unbalanced quotes or an unquoted comma?)"
            )
        rows.append((reader.line_num, dict(zip(header, values))))
    if report is not None:
        report.rows_read += len(rows)
    return rows
