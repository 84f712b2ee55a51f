"""``label_with_llm.py``: Whisper transcripts + LLM sentiment pseudo-labels → a ``datasets`` dataset.

    python label_with_llm.py --transcripts mosi_label.csv --out labelled/ \\
        --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct
    python label_with_llm.py --audio wavs/ --out labelled/ --llm-url ... --llm-model ... \\
        --whisper-model large-v3 --language en

Output directory layout::

    OUT/                       the dataset (``datasets.load_from_disk(OUT)``): id, text, label, llm_reply,
                               llm_model, prompt_hash, llm_error, [language], other input columns
    OUT/journal/run.json       settings of the run (LLM, prompt hash, input); a rerun must match them
    OUT/journal/transcripts.jsonl  one line per transcribed clip, appended as they are made
    OUT/journal/labels.jsonl   one line per labelled row, appended as replies arrive

With ``--decoding logprobs`` (the default) each journal line also holds the three labels' raw
log-probabilities, and ``--calibration mean`` (the default) relabels every row once all are scored, from
those stored scores, so a resumed run gives the same labels as an unbroken one.

A rerun of the same command skips every row already in the journals (after a kill, a crash of the
LLM server or a finished run) and rebuilds the dataset in input order, so the result is identical to
an unbroken run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .llm import (
    CALIBRATIONS,
    DECODINGS,
    DEFAULT_CALIBRATION,
    DEFAULT_DECODING,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TOP_LOGPROBS,
    DEFAULT_USER_TEMPLATE,
    SENTIMENT_LABELS,
    InProcessVLLMLabeller,
    LabelResult,
    LLMServerError,
    PromptTemplate,
    RetryPolicy,
    mean_calibrated_labels,
    read_few_shot_csv,
)
from ..helpformat import DefaultsHelpFormatter
from .oracle import ORACLE_LABELS, oracle_agreement
from .shards import EmptyShard, ShardError, add_shard_arguments, merge_main, select_shard
from .endpoints import http_labeller, split_urls
from .writer import Journal, JournalError, check_run_metadata

#: Label ids of the output ``ClassLabel`` (alphabetical); -1 marks an unparseable reply or a failed row.
OUTPUT_LABELS: tuple[str, ...] = ORACLE_LABELS
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64")
#: Below this many scored rows ``--calibration mean`` warns (its prior is an average over the rows).
MIN_MEAN_CALIBRATION_ROWS = 50
DEFAULT_LLM_URL = "http://127.0.0.1:8000/v1"
RESERVED_COLUMNS = ("id", "text", "label", "llm_reply", "llm_model", "prompt_hash", "llm_error", "language")


class InputError(ValueError):
    """Bad input (file, row or column); the message names it."""


def log(message: str) -> None:
    print(f"[label_with_llm] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _convert_column(values: list[str]) -> list[Any]:
    """CSV strings → int, float or str, one type for the whole column (empty cells become None)."""
    present = [value for value in values if value != ""]
    for kind in (int, float):
        try:
            converted = [kind(value) if value != "" else None for value in values]
        except ValueError:
            continue
        if present:
            return converted
    return [value if value != "" else None for value in values]


def read_transcripts_csv(path: str | os.PathLike, id_column: str = "id", text_column: str = "text") -> list[dict]:
    """Rows of a transcripts CSV: ``id``, ``text`` and every other column (typed per column)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: transcripts CSV not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [column for column in (id_column, text_column) if column not in columns]
            if missing:
                raise InputError(
                    f"{path}: missing column(s) {', '.join(missing)}; the columns are {', '.join(columns) or '(none)'}"
                    " (choose others with --id-column / --text-column)"
                )
            raw_rows = []
            for line_number, row in enumerate(reader, start=2):
                if None in row:
                    raise InputError(f"{path}, line {line_number}: more cells than the header has columns")
                raw_rows.append((line_number, row))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error})") from error
    if not raw_rows:
        raise InputError(f"{path}: no rows")
    seen: dict[str, int] = {}
    for line_number, row in raw_rows:
        row_id = (row[id_column] or "").strip()
        if not row_id:
            raise InputError(f"{path}, line {line_number}: empty {id_column!r}")
        if row_id in seen:
            raise InputError(f"{path}, line {line_number}: id {row_id!r} repeats line {seen[row_id]}")
        seen[row_id] = line_number
        if row[text_column] is None:
            raise InputError(f"{path}, line {line_number}: no {text_column!r} cell")
    extra = [c for c in columns if c not in (id_column, text_column)]
    converted = {c: _convert_column([row[c] or "" for _, row in raw_rows]) for c in extra}
    rows = []
    for index, (_, row) in enumerate(raw_rows):
        out = {"id": row[id_column].strip(), "text": row[text_column]}
        out.update({kept_column_name(c): converted[c][index] for c in extra})
        rows.append(out)
    return rows


def kept_column_name(column: str) -> str:
    """The output name of an input column: ``label`` → ``reference_label``, other clashes → ``input_<name>``."""
    if column in ("label", "text"):
        return f"reference_{column}"
    return f"input_{column}" if column in RESERVED_COLUMNS else column


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def list_audio_inputs(path: str | os.PathLike, id_column: str = "id") -> list[dict]:
    """Rows ``{"id", "audio", ...}`` from a folder of sound files or a dataset saved with ``save_to_disk``.

    A folder: every file with a sound extension below it, id = its relative path without extension.
    A dataset (or ``DatasetDict``: all splits, with a ``split`` column): the ``audio`` column (a path or
    a ``{"path", "array", "sampling_rate"}`` dict), ids from ``id`` or ``dialogue_id``+``turn`` or the
    row number; other columns are kept.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: audio folder or dataset not found")
    if path.is_dir() and _is_saved_dataset(path):
        return _rows_from_dataset(path, id_column)
    if not path.is_dir():
        raise InputError(f"{path}: --audio takes a folder of sound files or a saved dataset folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise InputError(f"{path}: no sound files ({', '.join(AUDIO_EXTENSIONS)}) in this folder")
    return [{"id": f.relative_to(path).with_suffix("").as_posix(), "audio": str(f), "audio_path": str(f)} for f in files]


def _rows_from_dataset(path: Path, id_column: str) -> list[dict]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    rows: list[dict] = []
    for split, dataset in parts:
        if "audio" not in dataset.column_names:
            raise InputError(f"{path}{f' [{split}]' if split else ''}: no 'audio' column ({dataset.column_names})")
        for index, row in enumerate(dataset):
            if id_column in row and row[id_column] is not None:
                row_id = str(row[id_column])
            elif "dialogue_id" in row and "turn" in row:
                row_id = f"{row['dialogue_id']}_{row['turn']}"
            else:
                row_id = str(index)
            if split is not None:
                row_id = f"{split}/{row_id}"
            audio = row.pop("audio")
            out = {"id": row_id, "audio": audio}
            if isinstance(audio, dict) and audio.get("path"):
                out["audio_path"] = audio["path"]
            elif isinstance(audio, str):
                out["audio_path"] = audio
            for key, value in row.items():
                if key == id_column:
                    continue
                # the input's own text / label are kept under other names: ours are the transcript and LLM label
                out[kept_column_name(key)] = value
            if split is not None:
                out["split"] = split
            rows.append(out)
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: repeated ids; give the dataset a unique '{id_column}' column")
    return rows


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


def transcribe_rows(
    rows: list[dict],
    journal: Journal,
    whisper_model: str,
    language: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    sample_len: int | None = None,
    skip_bad_audio: bool = False,
) -> dict[str, dict]:
    """Fill ``text`` (and ``language``) of audio rows with Whisper, resuming from ``journal``."""
    from merits.data.audio import AudioError, load_audio

    from .asr import WhisperTranscriber, load_whisper

    done = journal.load()
    pending = [row for row in rows if row["id"] not in done]
    log(f"transcripts: {len(done)} in the journal, {len(pending)} to make")
    if pending:
        transcriber = WhisperTranscriber(
            load_whisper(whisper_model, device=device), language=language, batch_size=batch_size, sample_len=sample_len
        )
        started = time.monotonic()
        with journal:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                arrays, ok = [], []
                for row in chunk:
                    try:
                        arrays.append(load_audio(row["audio"], sampling_rate=16000, source=row.get("audio_path") or row["id"], allow_silent=True))
                        ok.append(row)
                    except AudioError as error:
                        if not skip_bad_audio:
                            raise InputError(f"row {row['id']!r}: {error} (pass --skip-bad-audio to leave such rows out)") from error
                        record = {"id": row["id"], "text": None, "language": None, "error": str(error)}
                        journal.append(record)
                        done[row["id"]] = record
                for row, transcript in zip(ok, transcriber.transcribe(arrays)):
                    record = {"id": row["id"], "text": transcript.text, "language": transcript.language}
                    journal.append(record)
                    done[row["id"]] = record
                finished = start + len(chunk)
                log(f"transcribed {finished}/{len(pending)} ({finished / (time.monotonic() - started):.2f} clips/s)")
    return done


EMPTY_TRANSCRIPT_ERROR = "empty transcript: nothing to label"


def is_finished(record: dict | None) -> bool:
    """A journal record that needs no new request: a label, and no error (failed, unparsed and empty rows are
    tried again by a rerun)."""
    return record is not None and not record.get("error") and record.get("label") in OUTPUT_LABELS


def label_rows(labeller, rows: list[dict], journal: Journal, progress_every: int = 100,
               heartbeat_seconds: float = 30.0) -> dict[str, dict]:
    """Label rows not yet finished in ``journal`` (rows that failed, whose reply was not a label, or whose transcript
    was empty are tried again). While requests are outstanding and no reply came for ``heartbeat_seconds``, a
    progress line says so (a hung server is visible)."""
    import threading

    done = journal.load()
    pending = [row for row in rows if not is_finished(done.get(row["id"]))]
    log(f"labels: {len(rows) - len(pending)} in the journal, {len(pending)} to ask {labeller.name}")
    if not pending:
        return done
    empty = [row for row in pending if not (row.get("text") or "").strip()]
    pending = [row for row in pending if (row.get("text") or "").strip()]
    started = time.monotonic()
    counter = {"n": 0, "last": started}

    def on_result(row_id: str, result: LabelResult) -> None:
        error = result.error
        if error is None and result.label is None:
            error = f"the reply is not one of the labels {list(labeller_labels)}: {str(result.reply)[:80]!r}"
        record = {"id": row_id, "reply": result.reply, "label": result.label, "error": error}
        if result.scores is not None:
            record["scores"] = result.scores
        journal.append(record)
        done[row_id] = record
        counter["n"] += 1
        counter["last"] = time.monotonic()
        if counter["n"] % progress_every == 0 or counter["n"] == len(pending):
            rate = counter["n"] / max(time.monotonic() - started, 1e-9)
            log(f"labelled {counter['n']}/{len(pending)} ({rate:.1f} rows/s)")

    labeller_labels = getattr(getattr(labeller, "prompt", None), "labels", OUTPUT_LABELS)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(heartbeat_seconds):
            quiet = time.monotonic() - counter["last"]
            if quiet >= heartbeat_seconds:
                log(f"still waiting for {labeller.name}: {counter['n']}/{len(pending)} labelled, no reply for "
                    f"{quiet:.0f} s (timeout {getattr(labeller, 'timeout', '?')} s per request, then retries)")

    with journal:
        for row in empty:
            record = {"id": row["id"], "reply": None, "label": None, "error": EMPTY_TRANSCRIPT_ERROR}
            journal.append(record)
            done[row["id"]] = record
        if pending:
            watcher = threading.Thread(target=heartbeat, daemon=True)
            watcher.start()
            try:
                labeller.label([(row["id"], row["text"]) for row in pending], on_result)
            finally:
                stop.set()
    return done


def build_dataset(rows: list[dict], labels: dict[str, dict], llm_name: str, prompt_hash: str):
    """The output dataset, in input order: id, text, label (ClassLabel, -1 = none), reply, model, hash, error, extras."""
    import datasets

    records = []
    for row in rows:
        entry = labels.get(row["id"])
        if entry is None:
            raise RuntimeError(f"row {row['id']!r} has no label record; rerun to finish it")
        label = entry.get("label")
        out = {
            "id": row["id"],
            "text": row["text"],
            "label": OUTPUT_LABELS.index(label) if label in OUTPUT_LABELS else -1,
            "llm_reply": entry.get("reply"),
            "llm_model": llm_name,
            "prompt_hash": prompt_hash,
            "llm_error": entry.get("error"),
        }
        if "scores" in entry:  # decoding=logprobs: the raw label log-probabilities, in OUTPUT_LABELS order
            scores = entry.get("scores")
            out["llm_logprobs"] = [scores[name] for name in OUTPUT_LABELS] if scores else None
        out.update({key: value for key, value in row.items() if key not in out and key != "audio"})
        records.append(out)
    dataset = datasets.Dataset.from_list(records)
    for column in ("llm_reply", "llm_error"):
        if dataset.features[column].dtype == "null":
            dataset = dataset.cast_column(column, datasets.Value("string"))
    return dataset.cast_column("label", datasets.ClassLabel(names=list(OUTPUT_LABELS)))


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label_with_llm.py",
        formatter_class=DefaultsHelpFormatter,
        description="Transcribe speech with Whisper and label each transcript positive/negative/neutral with an "
        "LLM (MERITS-L pseudo-labels); writes a datasets dataset (save_to_disk) and resumes when rerun.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="a folder of sound files, or a dataset folder saved with save_to_disk")
    source.add_argument("--transcripts", help="a CSV with columns id and text (other columns are kept)")
    parser.add_argument("--out", required=True, help="output folder (the dataset + its journal)")
    parser.add_argument("--id-column", default="id", help="the input column that identifies a row")
    parser.add_argument("--text-column", default="text", help="the input column holding the transcript (--transcripts)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of resuming")
    parser.add_argument("--accept-failures", action="store_true",
                        help="exit 0 even when rows failed (HTTP errors, replies that are not a label, empty "
                             "transcripts); by default such a run exits 1 (they are label -1 in the dataset and a "
                             "rerun asks for them again)")

    llm = parser.add_argument_group("LLM")
    llm.add_argument("--engine", choices=("http", "inprocess"), default="http",
                     help="http: an OpenAI-compatible server at --llm-url; inprocess: vllm.LLM(--llm-model) here")
    llm.add_argument("--llm-url", action="append", default=None,
                     help="an OpenAI-compatible API root (default http://127.0.0.1:8000/v1); repeat it or give a "
                          "comma-separated list to spread the requests over several servers")
    llm.add_argument("--llm-model", required=True, help="served model name (http) or model folder (inprocess)")
    llm.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token, if the server needs one")
    llm.add_argument("--concurrency", type=int, default=16, help="requests in flight at once, per --llm-url (http)")
    llm.add_argument("--max-retries", type=int, default=5, help="retries of a failed request before the run stops")
    llm.add_argument("--retry-base-delay", type=float, default=0.5, help="seconds; doubled at each retry")
    llm.add_argument("--timeout", type=float, default=30.0,
                     help="seconds per request before it is retried (default 30; a progress line reports a silent "
                          "server every 30 s)")
    llm.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="the LLM's instructions")
    llm.add_argument("--system-prompt-file", help="read the system prompt from this file")
    llm.add_argument("--user-template", default=DEFAULT_USER_TEMPLATE, help="must contain {text}")
    llm.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    llm.add_argument("--max-tokens", type=int, default=None,
                     help="reply budget; default: with the structured-outputs choice, enough for the longest label "
                          "under the served tokenizer (asked from vLLM's /tokenize, else 16), so no label is cut; "
                          "with --no-structured-outputs, 4 (the GPT-style setting)")
    llm.add_argument("--no-structured-outputs", action="store_true",
                     help="do not send vLLM's structured_outputs choice constraint (for servers that reject it)")
    llm.add_argument("--inprocess-batch-size", type=int, default=64, help="prompts per vllm.LLM.generate call (inprocess)")
    llm.add_argument("--decoding", choices=DECODINGS, default=DEFAULT_DECODING,
                     help="logprobs: score the three labels by their log-probability at the reply's first position "
                          "(vLLM logprobs/top_logprobs) and take the calibrated argmax; choice: generate the reply under "
                          "the choice constraint and parse it (the paper's route). Default: %(default)s (measured on "
                          "MELD train, README 'Real pseudo-labels')")
    llm.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                     help="with --decoding logprobs: subtract each label's mean log-probability over the labelled rows "
                          "(mean), the probabilities of content-free inputs (content-free), or nothing (none); "
                          f"default {DEFAULT_CALIBRATION} with logprobs, none with choice")
    llm.add_argument("--top-logprobs", type=int, default=DEFAULT_TOP_LOGPROBS,
                     help="top_logprobs asked for with --decoding logprobs (at most the server's --max-logprobs, 20)")
    llm.add_argument("--few-shot-file", help="a CSV with columns text,label: example turns sent before each transcript")

    asr = parser.add_argument_group("ASR (with --audio)")
    asr.add_argument("--whisper-model", default="large-v3", help="a Whisper name or a local checkpoint file")
    asr.add_argument("--language", default=None, help="e.g. en; default: detected per clip")
    asr.add_argument("--asr-batch-size", type=int, default=8, help="clips per Whisper decoding batch")
    asr.add_argument("--asr-max-tokens", type=int, default=None, help="maximum tokens per clip")
    asr.add_argument("--device", default="cpu", help="torch device for Whisper (cpu, cuda, ...)")
    asr.add_argument("--skip-bad-audio", action="store_true", help="leave unreadable clips out instead of stopping")

    add_shard_arguments(parser)

    oracle = parser.add_argument_group("valence oracle")
    oracle.add_argument("--valence-column", help="compare labels with this 1-7 valence column")
    oracle.add_argument("--negative-max", type=float, default=3.0, help="valence <= this is negative")
    oracle.add_argument("--positive-min", type=float, default=5.0, help="valence >= this is positive")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the whole job for parsed ``args``; returns a summary (also written to ``OUT/journal/summary.json``)."""
    import datasets

    out = Path(args.out)
    journal_dir = out / "journal"
    system = Path(args.system_prompt_file).read_text(encoding="utf-8").strip() if args.system_prompt_file else args.system_prompt
    calibration = args.calibration or (DEFAULT_CALIBRATION if args.decoding == "logprobs" else "none")
    try:
        prompt = PromptTemplate(
            system=system,
            user=args.user_template,
            labels=SENTIMENT_LABELS,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            structured_outputs=not args.no_structured_outputs,
            few_shot=read_few_shot_csv(args.few_shot_file) if args.few_shot_file else (),
            decoding=args.decoding,
            calibration=calibration,
            top_logprobs=args.top_logprobs,
        )
    except ValueError as error:
        raise InputError(str(error)) from None

    # 1. inputs
    from merits.resume import fingerprint_path

    if args.transcripts:
        rows = read_transcripts_csv(args.transcripts, args.id_column, args.text_column)
        source = {"transcripts": str(Path(args.transcripts).resolve())}
        inputs = {"transcripts": fingerprint_path(args.transcripts)}
    else:
        rows = list_audio_inputs(args.audio, args.id_column)
        source = {"audio": str(Path(args.audio).resolve()), "whisper_model": args.whisper_model, "language": args.language}
        # sound files by name, size and modification time (hashing a large corpus at every rerun would take minutes)
        inputs = {"audio": fingerprint_path(args.audio, content_limit=0 if Path(args.audio).is_dir() else None)}
    if args.limit is not None:
        rows = rows[: args.limit]
    valence_column = kept_column_name(args.valence_column) if args.valence_column else None
    if valence_column and valence_column not in rows[0]:
        raise InputError(f"--valence-column {args.valence_column!r} is not a column of the input ({', '.join(rows[0])})")

    # 2. the run's settings: a resumed run must use the same ones (a shard: also the other shards' settings)
    settings = {"llm_model": args.llm_model, "engine": args.engine, "prompt_hash": prompt.hash(), **source}
    rows, out = select_shard(args, rows, out, settings, log=log)
    journal_dir = out / "journal"
    if args.overwrite:
        for name in ("transcripts.jsonl", "labels.jsonl"):
            (journal_dir / name).unlink(missing_ok=True)
    check_run_metadata(journal_dir / "run.json", settings, overwrite=args.overwrite, inputs=inputs)

    # 3. the labeller (an HTTP server is checked first: fail before hours of ASR, not after)
    if args.engine == "http":
        labeller = http_labeller(  # one --llm-url: OpenAICompatibleLabeller; several: spread over them
            split_urls(args.llm_url, DEFAULT_LLM_URL), args.llm_model, prompt=prompt, concurrency=args.concurrency,
            retry=RetryPolicy(max_retries=args.max_retries, base_delay=args.retry_base_delay),
            timeout=args.timeout, api_key=args.api_key, log=log,
        )
        labeller.check_sync()

    # 4. transcripts
    if args.audio:
        transcripts = transcribe_rows(
            rows, Journal(journal_dir / "transcripts.jsonl"), args.whisper_model, language=args.language,
            batch_size=args.asr_batch_size, device=args.device, sample_len=args.asr_max_tokens,
            skip_bad_audio=args.skip_bad_audio,
        )
        bad = [row["id"] for row in rows if transcripts[row["id"]].get("error")]
        if bad:
            log(f"{len(bad)} clip(s) left out (unreadable audio), e.g. {bad[0]!r}: {transcripts[bad[0]]['error']}")
        rows = [row for row in rows if not transcripts[row["id"]].get("error")]
        for row in rows:
            row["text"] = transcripts[row["id"]]["text"]
            row["language"] = transcripts[row["id"]]["language"]

    # 5. labels
    if args.engine == "inprocess":
        labeller = InProcessVLLMLabeller(args.llm_model, prompt=prompt, batch_size=args.inprocess_batch_size)
    started, before = time.monotonic(), len(Journal(journal_dir / "labels.jsonl").load())
    labels = label_rows(labeller, rows, Journal(journal_dir / "labels.jsonl"))
    labelled_now = len(labels) - before
    rate = labelled_now / (time.monotonic() - started) if labelled_now else None
    prior = getattr(labeller, "prior", None)
    if prompt.calibration == "mean" and not any(labels[row["id"]].get("scores") for row in rows):
        log("--calibration mean: no row was scored (every request failed?), so no label prior is applied")
    elif prompt.calibration == "mean":
        # the prior is each label's mean raw log-probability over all rows of this run: applied once every row
        # is scored (the journal keeps the raw scores, so a resumed run gives the same labels)
        scored = [labels[row["id"]].get("scores") for row in rows]
        if sum(score is not None for score in scored) < MIN_MEAN_CALIBRATION_ROWS:
            log(f"--calibration mean estimates the label prior from only {sum(s is not None for s in scored)} scored "
                f"rows (fewer than {MIN_MEAN_CALIBRATION_ROWS}): noisy; --calibration content-free needs no rows")
        calibrated, prior = mean_calibrated_labels(scored, prompt.labels)
        labels = dict(labels)
        for row, label in zip(rows, calibrated):
            if label is not None:
                labels[row["id"]] = {**labels[row["id"]], "label": label}

    # 6. the dataset, in input order
    dataset = build_dataset(rows, labels, labeller.name, prompt.hash())
    dataset.save_to_disk(str(out))
    counts = {name: 0 for name in (*OUTPUT_LABELS, "unparsed", "empty", "failed")}
    failed_ids = []
    for row in rows:
        entry = labels[row["id"]]
        if is_finished(entry):
            counts[entry["label"]] += 1
            continue
        failed_ids.append(row["id"])
        error = entry.get("error") or ""
        key = ("empty" if error == EMPTY_TRANSCRIPT_ERROR else "unparsed" if error.startswith("the reply is not")
               or (not error and entry.get("reply") is not None) else "failed")
        counts[key] += 1
    summary: dict[str, Any] = {"rows": len(rows), "counts": counts, "llm_model": labeller.name,
                               "prompt_hash": prompt.hash(), "max_tokens": labeller.max_tokens,
                               "decoding": prompt.decoding, "calibration": prompt.calibration}
    summary["not_labelled"] = len(failed_ids)
    if prior is not None:
        summary["prior"] = prior
    if rate is not None:
        summary["rows_per_second"] = rate
        summary["rows_labelled_in_this_run"] = labelled_now
    log(f"wrote {len(rows)} rows to {out}: {json.dumps(counts)}")
    if failed_ids:
        first = labels[failed_ids[0]]
        log(f"WARNING: {len(failed_ids)} row(s) have no label (label -1; {counts['failed']} failed requests, "
            f"{counts['unparsed']} replies that are not a label, {counts['empty']} empty transcripts), e.g. "
            f"{failed_ids[0]!r}: {first.get('error') or first.get('reply')!r}; see the llm_error column. "
            "Rerun the same command to ask for them again" + ("" if args.accept_failures else
                                                               " (or pass --accept-failures to exit 0 with them)"))

    # 7. oracle agreement
    if valence_column:
        values = []
        for row in rows:
            value = row.get(valence_column)
            try:
                values.append(None if value is None or value == "" else float(value))
            except (TypeError, ValueError):
                raise InputError(f"row {row['id']!r}: {args.valence_column} = {value!r} is not a number") from None
        report = oracle_agreement(
            [labels[row["id"]].get("label") for row in rows],
            [None if v is None or math.isnan(v) else v for v in values],
            negative_max=args.negative_max, positive_min=args.positive_min,
        )
        print(report.format())
        summary["oracle"] = report.as_dict()
    (journal_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Iterable[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["merge"]:  # label_with_llm.py merge --out OUT: join the shards of a --num-shards run
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    try:
        summary = run(args)
    except EmptyShard as nothing:
        log(str(nothing))
        return 0
    except (InputError, JournalError, LLMServerError, ShardError) as error:
        print(f"label_with_llm.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"label_with_llm.py: stopped; finished rows are kept in {Path(args.out) / 'journal'}, rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    except OSError as error:
        import errno

        if error.errno != errno.ENOSPC:
            raise
        print(f"label_with_llm.py: error: no space left on the device ({error.filename or error}); free some space "
              "and rerun the same command (finished rows are kept in the journal)", file=sys.stderr)
        return 2
    except Exception as error:  # ASR errors and the like: a one-line message, the traceback on request
        from .asr import ASRError

        if isinstance(error, ASRError):
            print(f"label_with_llm.py: error: {error}", file=sys.stderr)
            return 2
        raise
    return 1 if summary.get("not_labelled") and not args.accept_failures else 0
