"""CMU-MOSI from its label CSV (no download), binary sentiment.

Accepted input (``path``): the label CSV itself (columns ``id, text, label, mode``; ``id`` is
``<video id>_<segment number>``, ``label`` the sentiment score in [-3, 3], ``mode`` one of
``train``, ``valid``/``dev``, ``test``), or a directory holding ``mosi_label.csv`` or ``label.csv``.

Task: ``negative`` when the score is < 0, else ``positive`` (papers.md §6 #21); the score is kept in
``sentiment_score``. Splits follow ``mode`` (train → train, dev/valid → validation, test → test).
A video is a dialogue (monologue) and its segments are its turns, ordered by segment number
(numerically: 2 before 10).

Audio (optional), the CMU-MultimodalSDK layout next to the CSV (or under ``audio_root``)::

    <root>/Audio/WAV_16000/Segmented/<id>.wav

Without that folder the corpus is text-only (noted in the report); with it, a missing segment raises
(``missing_audio="error"``) or stays text-only and is counted (``"none"``).
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets

from .schema import DataFormatError, LoadReport, audio_value, check_conversations, conversation_features, finish, read_csv

LABELS = ("negative", "positive")
MODES = {"train": "train", "valid": "validation", "dev": "validation", "validation": "validation", "test": "test"}
CSV_NAMES = ("mosi_label.csv", "label.csv")
SEGMENTED_AUDIO = Path("Audio") / "WAV_16000" / "Segmented"


def load_mosi(path, audio_root=None, missing_audio: str = "error", with_audio: bool = True, return_report: bool = False):
    """Load CMU-MOSI as a :class:`datasets.DatasetDict` (see the module docstring)."""
    if missing_audio not in ("error", "none"):
        raise ValueError(f"missing_audio must be 'error' or 'none', got {missing_audio!r}")
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in CSV_NAMES if (path / name).is_file()]
        if not candidates:
            raise DataFormatError(f"CMU-MOSI: {path} holds none of {list(CSV_NAMES)}")
        csv_path = candidates[0]
    else:
        csv_path = path
    report = LoadReport(corpus=f"CMU-MOSI ({csv_path})")
    audio_dir = Path(audio_root if audio_root is not None else csv_path.parent) / SEGMENTED_AUDIO
    use_audio = with_audio and audio_dir.is_dir()
    if with_audio and not use_audio:
        report.note(f"text only (no {audio_dir})")
    splits: dict[str, list[dict]] = {}
    for line, values in read_csv(csv_path, ("id", "text", "label", "mode"), "CMU-MOSI", report):
        where = f"{csv_path}, line {line} (id {values['id']!r})"
        segment_id = values["id"].strip()
        video, separator, segment = segment_id.rpartition("_")
        if not separator or not video or not segment.isdigit():
            raise DataFormatError(f"{where}: id must be '<video id>_<segment number>'")
        try:
            score = float(values["label"])
        except ValueError:
            raise DataFormatError(f"{where}: label must be a number in [-3, 3], got {values['label']!r}") from None
        if not math.isfinite(score) or not -3.0 <= score <= 3.0:
            raise DataFormatError(f"{where}: sentiment score {score} outside [-3, 3]")
        mode = values["mode"].strip().lower()
        if mode not in MODES:
            raise DataFormatError(f"{where}: unknown mode {values['mode']!r}; expected one of {sorted(MODES)}")
        audio = None
        if use_audio:
            wav = audio_dir / f"{segment_id}.wav"
            if wav.is_file():
                audio = audio_value(path=str(wav.resolve()))
            elif missing_audio == "error":
                raise DataFormatError(f"{where}: audio file {wav} not found (pass missing_audio='none' to keep it text-only)")
            else:
                report.issue("segments without a wav file (text-only, missing_audio='none')")
        text = values["text"].strip()
        if not text:
            if audio is None:
                raise DataFormatError(f"{where}: empty text and no audio")
            report.issue("segments with empty text (audio only)")
        splits.setdefault(MODES[mode], []).append(dict(
            dialogue_id=video, turn=int(segment), text=text, audio=audio, label=int(score >= 0.0), row=line,
            segment_id=segment_id, sentiment_score=score,
        ))
    for split, rows in splits.items():
        check_conversations(rows, f"{csv_path} ({split} rows)")
    features = conversation_features(
        LABELS, extra={"segment_id": datasets.Value("string"), "sentiment_score": datasets.Value("float32")}
    )
    return finish(splits, features, report, return_report)
