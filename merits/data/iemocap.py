"""IEMOCAP from the released directory tree (no download).

Layout read (the official release, ``IEMOCAP_full_release/``)::

    Session{1..5}/dialog/EmoEvaluation/<dialog>.txt      # "[start - end]\\t<utterance>\\t<code>\\t[V, A, D]"
    Session{1..5}/dialog/transcriptions/<dialog>.txt     # "<utterance> [start-end]: <text>"
    Session{1..5}/sentences/wav/<dialog>/<utterance>.wav

Class sets (papers.md §1):

* ``num_classes=4`` (MERITS-L): ``angry, happy, sad, neutral`` with *excited merged into happy*;
* ``num_classes=6`` (MiSTER-E): ``happy, sad, neutral, angry, excited, frustrated`` (the code's order).

Utterances with any other code (surprise, fear, disgust, other, ``xxx`` = no agreement, and
frustrated in the 4-class set) are handled by the explicit ``other_labels`` option: ``"drop"`` (the
standard protocol; counts are logged and in the report), ``"unlabelled"`` (kept as context turns with
label -1, ignored by the losses) or ``"error"``.

Splits (``split_scheme``): ``"merits-l"``: train = sessions 2-4, validation = session 1, test =
session 5. ``"mister-e"``: test = session 5; validation = ``validation_session`` if given, else a
``validation_fraction`` of the session 1-4 conversations drawn with ``seed`` (papers.md §6 #16);
train = the rest. Turns are numbered in temporal order (start time) inside each dialog. Speaker ids
(``Ses01F`` + utterance gender) are kept for analysis only.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np

from .schema import UNLABELLED, DataFormatError, LoadReport, audio_value, conversation_features, finish

CLASS_SETS = {
    4: {"names": ("angry", "happy", "sad", "neutral"), "codes": {"ang": "angry", "hap": "happy", "exc": "happy", "sad": "sad", "neu": "neutral"}},
    6: {
        "names": ("happy", "sad", "neutral", "angry", "excited", "frustrated"),
        "codes": {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"},
    },
}
KNOWN_CODES = {"neu", "hap", "exc", "ang", "sad", "fru", "sur", "fea", "dis", "oth", "xxx"}

_EVALUATION_LINE = re.compile(r"^\[(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]")
_TRANSCRIPT_LINE = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s?(.*)$")


def _parse_evaluation(path: Path) -> list[dict]:
    utterances, seen = [], {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.startswith("["):
            continue
        match = _EVALUATION_LINE.match(line)
        if match is None:
            raise DataFormatError(f"{path}, line {line_number}: cannot parse evaluation line {line!r}")
        start, end, name, code, vad = match.groups()
        if name in seen:
            raise DataFormatError(f"{path}, line {line_number}: utterance {name} appears twice (first on line {seen[name]})")
        seen[name] = line_number
        try:
            valence, arousal, dominance = (float(v) for v in vad.split(","))
        except ValueError:
            raise DataFormatError(f"{path}, line {line_number}: cannot parse [V, A, D] = [{vad}]") from None
        utterances.append(dict(name=name, start=float(start), end=float(end), code=code.lower(), line=line_number,
                               valence=valence, arousal=arousal, dominance=dominance))
    return utterances


def _parse_transcripts(path: Path) -> dict[str, str]:
    texts = {}
    if not path.is_file():
        return texts
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _TRANSCRIPT_LINE.match(line.strip())
        if match:
            texts[match.group(1)] = match.group(2).strip()
    return texts


def load_iemocap(
    root,
    num_classes: int = 4,
    split_scheme: str = "merits-l",
    other_labels: str = "drop",
    missing_audio: str = "error",
    validation_fraction: float = 0.1,
    validation_session: int | None = None,
    seed: int = 0,
    with_audio: bool = True,
    return_report: bool = False,
):
    """Load IEMOCAP from ``root`` (the folder holding ``Session1`` … ``Session5``).

    Args:
        num_classes: 4 (MERITS-L) or 6 (MiSTER-E); see the module docstring.
        split_scheme: ``"merits-l"`` or ``"mister-e"``.
        other_labels: ``"drop"``, ``"unlabelled"`` or ``"error"`` for utterances outside the class set.
        missing_audio: ``"error"`` (raise naming the wav file) or ``"none"`` (keep the turn text-only and
            count it in the report).
        with_audio: False reads no wav paths at all (a text-only corpus).
        return_report: also return the :class:`~merits.data.schema.LoadReport`.
    """
    if num_classes not in CLASS_SETS:
        raise ValueError(f"num_classes must be 4 or 6, got {num_classes}")
    if split_scheme not in ("merits-l", "mister-e"):
        raise ValueError(f"split_scheme must be 'merits-l' or 'mister-e', got {split_scheme!r}")
    if other_labels not in ("drop", "unlabelled", "error"):
        raise ValueError(f"other_labels must be 'drop', 'unlabelled' or 'error', got {other_labels!r}")
    if missing_audio not in ("error", "none"):
        raise ValueError(f"missing_audio must be 'error' or 'none', got {missing_audio!r}")
    root = Path(root)
    names, code_map = CLASS_SETS[num_classes]["names"], CLASS_SETS[num_classes]["codes"]
    report = LoadReport(corpus=f"IEMOCAP-{num_classes} ({root})")

    dialogues: dict[int, dict[str, list[dict]]] = {}
    for session in range(1, 6):
        evaluation_dir = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        if not evaluation_dir.is_dir():
            raise DataFormatError(f"IEMOCAP: {evaluation_dir} not found (expected the released Session1..Session5 tree)")
        files = sorted(evaluation_dir.glob("*.txt"))
        if not files:
            raise DataFormatError(f"IEMOCAP: {evaluation_dir} holds no <dialog>.txt evaluation files")
        dialogues[session] = {}
        for path in files:
            dialog = path.stem
            transcripts = _parse_transcripts(root / f"Session{session}" / "dialog" / "transcriptions" / f"{dialog}.txt")
            rows = []
            utterances = sorted(_parse_evaluation(path), key=lambda u: (u["start"], u["end"], u["name"]))
            report.rows_read += len(utterances)
            for turn, utterance in enumerate(utterances):
                code = utterance["code"]
                where = f"{path}, line {utterance['line']} ({utterance['name']})"
                if code not in KNOWN_CODES:
                    raise DataFormatError(f"{where}: unknown emotion code {code!r}; known codes: {sorted(KNOWN_CODES)}")
                if code in code_map:
                    label = names.index(code_map[code])
                elif other_labels == "drop":
                    report.drop(f"utterances with code '{code}' outside the {num_classes}-class set (other_labels='drop')")
                    continue
                elif other_labels == "unlabelled":
                    label = UNLABELLED
                else:
                    raise DataFormatError(f"{where}: emotion code {code!r} is outside the {num_classes}-class set {names}")
                text = transcripts.get(utterance["name"], "")
                if not text:
                    report.issue("utterances without a transcript (text empty)")
                audio = None
                if with_audio:
                    wav = root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utterance['name']}.wav"
                    if wav.is_file():
                        audio = audio_value(path=str(wav.resolve()))
                    elif missing_audio == "error":
                        raise DataFormatError(f"{where}: audio file {wav} not found (pass missing_audio='none' to keep the turn text-only)")
                    else:
                        report.issue("utterances without a wav file (text-only, missing_audio='none')")
                if not text and audio is None:
                    raise DataFormatError(f"{where}: the utterance has neither a transcript nor audio")
                speaker = utterance["name"][:5] + utterance["name"].rsplit("_", 1)[-1][:1]
                rows.append(dict(
                    dialogue_id=dialog, turn=turn, text=text, audio=audio, label=label, row=utterance["line"],
                    speaker=speaker, emotion_code=code, start=utterance["start"], end=utterance["end"],
                    valence=utterance["valence"], arousal=utterance["arousal"], dominance=utterance["dominance"],
                ))
            if rows:
                dialogues[session][dialog] = rows
    if other_labels == "unlabelled":
        report.note("utterances outside the class set kept as unlabelled context turns (label -1)")

    if split_scheme == "merits-l":
        assignment = {1: "validation", 2: "train", 3: "train", 4: "train", 5: "test"}
        splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
        for session, by_dialog in dialogues.items():
            for rows in by_dialog.values():
                splits[assignment[session]].extend(rows)
    else:
        splits = {"train": [], "validation": [], "test": []}
        for rows in dialogues[5].values():
            splits["test"].extend(rows)
        if validation_session is not None:
            if validation_session not in (1, 2, 3, 4):
                raise ValueError(f"validation_session must be one of 1-4, got {validation_session}")
            for session in range(1, 5):
                for rows in dialogues[session].values():
                    splits["validation" if session == validation_session else "train"].extend(rows)
        else:
            if not 0.0 < validation_fraction < 1.0:
                raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
            pool = sorted(dialog for session in range(1, 5) for dialog in dialogues[session])
            rng = np.random.default_rng(seed)
            held_out = set(rng.choice(pool, size=max(1, int(round(validation_fraction * len(pool)))), replace=False).tolist())
            for session in range(1, 5):
                for dialog, rows in dialogues[session].items():
                    splits["validation" if dialog in held_out else "train"].extend(rows)
            report.note(f"validation = {len(held_out)} of {len(pool)} session 1-4 dialogs (seed {seed})")

    features = conversation_features(
        names,
        extra={
            "speaker": datasets.Value("string"), "emotion_code": datasets.Value("string"),
            "start": datasets.Value("float32"), "end": datasets.Value("float32"),
            "valence": datasets.Value("float32"), "arousal": datasets.Value("float32"), "dominance": datasets.Value("float32"),
        },
    )
    return finish(splits, features, report, return_report)
