"""MSP-Podcast from its release folder (no download): the corpus of MERITS-L's LLM pseudo-labelling.

Layout read::

    <root>/Labels/labels_consensus.csv   # FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Gender, Split_Set
    <root>/Audios/<FileName>             # e.g. MSP-PODCAST_0001_0008.wav
    <root>/Transcripts/<stem>.txt        # optional; text "" where absent

Rows carry ``valence`` / ``arousal`` / ``dominance`` (1-7 consensus scores) for the LLM-agreement
oracle of papers.md §3.2. ``label`` is:

* ``label="sentiment"`` (default): the valence oracle, ``negative`` if v <= 3, ``positive`` if v >= 5,
  else ``neutral`` (papers.md §6 #3, :func:`merits.labelling.oracle.valence_to_sentiment`);
* ``label="emotion"``: the consensus class (``EmoClass`` codes A, S, H, U, F, D, C, N); rows with
  ``O`` (other) or ``X`` (no agreement) go through the explicit ``other_labels`` option
  (``"drop"``, reported, or ``"unlabelled"``).

Splits from ``Split_Set``: Train → train, Development → validation, Test1 → test, Test2 → test2,
Test3 → test3. ``dialogue_id`` is the podcast part of the file name (``MSP-PODCAST_0001``) and ``turn``
the segment number (``0008``), so segments of one podcast form a conversation in their order.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import datasets

from .schema import UNLABELLED, DataFormatError, LoadReport, audio_value, check_conversations, conversation_features, finish, read_csv

EMOTION_CODES = {"A": "angry", "S": "sad", "H": "happy", "U": "surprise", "F": "fear", "D": "disgust", "C": "contempt", "N": "neutral"}
EMOTIONS = tuple(EMOTION_CODES.values())
SENTIMENTS = ("negative", "neutral", "positive")
SPLIT_SETS = {"train": "train", "development": "validation", "validation": "validation", "test1": "test", "test": "test",
              "test2": "test2", "test3": "test3"}
REQUIRED = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
_FILE_NAME = re.compile(r"^(.*)_(\d+)$")


def valence_to_sentiment(valence: float, negative_max: float = 3.0, positive_min: float = 5.0) -> str:
    """The valence oracle (imported from :mod:`merits.labelling.oracle`, which owns it)."""
    from ..labelling.oracle import valence_to_sentiment as oracle

    return oracle(valence, negative_max=negative_max, positive_min=positive_min)


def load_msp_podcast(
    root,
    label: str = "sentiment",
    other_labels: str = "drop",
    missing_audio: str = "error",
    with_audio: bool = True,
    return_report: bool = False,
):
    """Load MSP-Podcast as a :class:`datasets.DatasetDict` (see the module docstring)."""
    if label not in ("sentiment", "emotion"):
        raise ValueError(f"label must be 'sentiment' or 'emotion', got {label!r}")
    if other_labels not in ("drop", "unlabelled"):
        raise ValueError(f"other_labels must be 'drop' or 'unlabelled', got {other_labels!r}")
    if missing_audio not in ("error", "none"):
        raise ValueError(f"missing_audio must be 'error' or 'none', got {missing_audio!r}")
    root = Path(root)
    csv_path = root / "Labels" / "labels_consensus.csv"
    report = LoadReport(corpus=f"MSP-Podcast ({root})")
    audio_dir, transcript_dir = root / "Audios", root / "Transcripts"
    if with_audio and not audio_dir.is_dir():
        raise DataFormatError(f"MSP-Podcast: {audio_dir} not found (pass with_audio=False for labels and transcripts only)")
    names = SENTIMENTS if label == "sentiment" else EMOTIONS
    splits: dict[str, list[dict]] = {}
    for line, values in read_csv(csv_path, REQUIRED, "MSP-Podcast", report):
        file_name = values["FileName"].strip()
        where = f"{csv_path}, line {line} ({file_name})"
        try:
            valence, arousal, dominance = (float(values[c]) for c in ("EmoVal", "EmoAct", "EmoDom"))
        except ValueError:
            raise DataFormatError(f"{where}: EmoVal/EmoAct/EmoDom must be numbers") from None
        if not all(math.isfinite(v) for v in (valence, arousal, dominance)):
            raise DataFormatError(f"{where}: EmoVal/EmoAct/EmoDom must be finite numbers")
        split = SPLIT_SETS.get(values["Split_Set"].strip().lower())
        if split is None:
            raise DataFormatError(f"{where}: unknown Split_Set {values['Split_Set']!r}; expected one of {sorted(SPLIT_SETS)}")
        code = values["EmoClass"].strip().upper()
        if label == "sentiment":
            label_value = names.index(valence_to_sentiment(valence))
        elif code in EMOTION_CODES:
            label_value = names.index(EMOTION_CODES[code])
        elif code in ("O", "X"):
            if other_labels == "drop":
                report.drop(f"rows with EmoClass '{code}' (other_labels='drop')")
                continue
            label_value = UNLABELLED
        else:
            raise DataFormatError(f"{where}: unknown EmoClass {code!r}; expected one of {sorted(EMOTION_CODES) + ['O', 'X']}")
        stem = Path(file_name).stem
        match = _FILE_NAME.match(stem)
        if match is None:
            raise DataFormatError(f"{where}: FileName must look like '<podcast>_<segment number>.wav'")
        audio = None
        if with_audio:
            wav = audio_dir / file_name
            if wav.is_file():
                audio = audio_value(path=str(wav.resolve()))
            elif missing_audio == "error":
                raise DataFormatError(f"{where}: audio file {wav} not found (pass missing_audio='none' to keep the row without audio)")
            else:
                report.issue("rows without an audio file (missing_audio='none')")
        transcript = transcript_dir / f"{stem}.txt"
        text = transcript.read_text(encoding="utf-8", errors="replace").strip() if transcript.is_file() else ""
        if not text and audio is None:
            raise DataFormatError(f"{where}: no transcript ({transcript}) and no audio")
        splits.setdefault(split, []).append(dict(
            dialogue_id=match.group(1), turn=int(match.group(2)), text=text, audio=audio, label=label_value, row=line,
            file_name=file_name, emo_class=code, valence=valence, arousal=arousal, dominance=dominance,
            speaker=values["SpkrID"].strip(), gender=values["Gender"].strip(),
        ))
    if not transcript_dir.is_dir():
        report.note(f"no {transcript_dir}: text is empty (transcribe with label_with_llm.py)")
    for split, rows in splits.items():
        check_conversations(rows, f"{csv_path} ({split} rows)")
    features = conversation_features(
        names,
        extra={
            "file_name": datasets.Value("string"), "emo_class": datasets.Value("string"),
            "valence": datasets.Value("float32"), "arousal": datasets.Value("float32"), "dominance": datasets.Value("float32"),
            "speaker": datasets.Value("string"), "gender": datasets.Value("string"),
        },
    )
    return finish(splits, features, report, return_report)
