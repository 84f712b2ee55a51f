"""MELD from its official CSV files (no download).

Accepted input (``path``):

* a directory holding any of ``train_sent_emo.csv``, ``dev_sent_emo.csv``, ``test_sent_emo.csv``
  (splits ``train`` / ``validation`` / ``test``), or
* one CSV file in that format (e.g. the held-back test CSV); its split is named from the file name
  (``train*`` → train, ``dev*``/``val*`` → validation, otherwise test) unless ``split`` is given.

Columns used: ``Utterance, Emotion, Sentiment, Dialogue_ID, Utterance_ID`` (``Speaker``, ``Season``,
``Episode``, ``StartTime``, ``EndTime`` are kept for analysis; the speaker is never a model input).
Files are UTF-8 (the current release, with the cp1252 characters fixed); an older cp1252 file is
read as cp1252 and the report says so. Quoted fields with commas and newlines are handled by the
csv module.

Audio (optional): the raw release ships mp4 clips; extract them to 16 kHz wav named
``dia{Dialogue_ID}_utt{Utterance_ID}.wav`` in one of these folders, searched in order:

1. ``audio_dir`` when given;
2. next to the CSV, in the official split folder: ``train_splits/``, ``dev_splits_complete/``,
   ``output_repeated_splits_test/`` (or ``<split>/``, ``<split>_wav/``, ``wav/<split>/``);
3. next to the CSV itself.

When no file is found for any row the corpus is text-only (noted in the report). When some rows have
audio and others not, ``missing_audio="error"`` (default) raises naming the row and the expected
file; ``"none"`` keeps those turns text-only and counts them.

``dialogue_id`` is ``dia{Dialogue_ID}``; ``turn`` is ``Utterance_ID``.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from .schema import DataFormatError, LoadReport, audio_value, check_conversations, conversation_features, finish, label_index, read_csv

EMOTIONS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENTS = ("negative", "neutral", "positive")
SPLIT_FILES = {"train": "train_sent_emo.csv", "validation": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
OFFICIAL_AUDIO_DIRS = {"train": "train_splits", "validation": "dev_splits_complete", "test": "output_repeated_splits_test"}
REQUIRED_COLUMNS = ("Utterance", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")


def _split_of(path: Path) -> str:
    stem = path.stem.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith("dev") or stem.startswith("val"):
        return "validation"
    return "test"


def _audio_dirs(csv_path: Path, split: str, audio_dir) -> list[Path]:
    if audio_dir is not None:
        return [Path(audio_dir)]
    base = csv_path.parent
    short = {"validation": "dev"}.get(split, split)
    candidates = [base / OFFICIAL_AUDIO_DIRS[split], base / split, base / short, base / f"{split}_wav", base / f"{short}_wav",
                  base / "wav" / split, base / "wav" / short, base]
    return [directory for directory in dict.fromkeys(candidates) if directory.is_dir()]


def _int(value: str, where: str, column: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DataFormatError(f"{where}: {column} must be an integer, got {value!r}") from None


def load_meld(
    path,
    label: str = "emotion",
    split: str | None = None,
    audio_dir=None,
    missing_audio: str = "error",
    with_audio: bool = True,
    return_report: bool = False,
):
    """Load MELD CSV file(s) as a :class:`datasets.DatasetDict` (see the module docstring).

    Args:
        path: a directory with the official CSVs, or one CSV file.
        label: ``"emotion"`` (7 classes) or ``"sentiment"`` (3 classes).
        split: split name for a single CSV file (default: from its file name).
        audio_dir: folder with ``dia{D}_utt{U}.wav`` files (default: searched next to the CSV).
        missing_audio: ``"error"`` or ``"none"`` when only some rows have a wav file.
        with_audio: False skips the audio search (text-only).
    """
    if label not in ("emotion", "sentiment"):
        raise ValueError(f"label must be 'emotion' or 'sentiment', got {label!r}")
    if missing_audio not in ("error", "none"):
        raise ValueError(f"missing_audio must be 'error' or 'none', got {missing_audio!r}")
    path = Path(path)
    if path.is_dir():
        files = {name: path / file for name, file in SPLIT_FILES.items() if (path / file).is_file()}
        if not files:
            raise DataFormatError(f"MELD: {path} holds none of {list(SPLIT_FILES.values())}")
    elif path.is_file():
        files = {split or _split_of(path): path}
    else:
        raise DataFormatError(f"MELD: {path} not found")
    names = EMOTIONS if label == "emotion" else SENTIMENTS
    column = "Emotion" if label == "emotion" else "Sentiment"
    report = LoadReport(corpus=f"MELD-{label} ({path})")
    splits = {}
    for split_name, csv_path in files.items():
        rows = []
        for line, values in read_csv(csv_path, REQUIRED_COLUMNS, "MELD", report):
            where = f"{csv_path}, line {line} (Sr No. {values.get('Sr No.', '?')})"
            dialogue, utterance = _int(values["Dialogue_ID"], where, "Dialogue_ID"), _int(values["Utterance_ID"], where, "Utterance_ID")
            label_value = label_index(names, values[column].strip().lower(), where)
            rows.append(dict(
                dialogue_id=f"dia{dialogue}", turn=utterance, text=values["Utterance"].strip(), audio=None, label=label_value,
                row=line, speaker=values.get("Speaker", ""), emotion=values["Emotion"].strip().lower(),
                sentiment=values["Sentiment"].strip().lower(), season=values.get("Season"), episode=values.get("Episode"),
                start_time=values.get("StartTime"), end_time=values.get("EndTime"), where=where,
            ))
        check_conversations(rows, str(csv_path))
        directories = _audio_dirs(csv_path, split_name, audio_dir) if with_audio else []
        found = 0
        for row in rows:
            file_name = f"{row['dialogue_id']}_utt{row['turn']}.wav"
            for directory in directories:
                candidate = directory / file_name
                if candidate.is_file():
                    row["audio"] = audio_value(path=str(candidate.resolve()))
                    found += 1
                    break
        if found == 0:
            report.note(f"{csv_path.name}: text only (no dia*_utt*.wav found" + (f" in {[str(d) for d in directories]})" if directories else ")"))
        elif found < len(rows):
            missing = [row for row in rows if row["audio"] is None]
            if missing_audio == "error":
                row = missing[0]
                raise DataFormatError(
                    f"{row['where']}: no audio file {row['dialogue_id']}_utt{row['turn']}.wav in {[str(d) for d in directories]} "
                    f"({len(missing)} of {len(rows)} rows lack audio; pass missing_audio='none' to keep them text-only)"
                )
            report.issue(f"{csv_path.name} rows without a wav file (text-only, missing_audio='none')", len(missing))
        for row in rows:
            if not row["text"]:
                if row["audio"] is None:
                    raise DataFormatError(f"{row['where']}: empty Utterance and no audio")
                report.issue("rows with empty text (audio only)")
        splits[split_name] = rows
    features = conversation_features(
        names,
        extra={
            "speaker": datasets.Value("string"), "emotion": datasets.Value("string"), "sentiment": datasets.Value("string"),
            "season": datasets.Value("string"), "episode": datasets.Value("string"),
            "start_time": datasets.Value("string"), "end_time": datasets.Value("string"),
        },
    )
    return finish(splits, features, report, return_report)
