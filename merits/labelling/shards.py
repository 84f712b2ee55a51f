"""Sharded labelling: ``--num-shards N --shard-index i`` on N processes / GPUs / machines, then one merge.

    # any number of machines or GPUs, each its own shard (a Slurm array task, one process per GPU ...)
    python label_with_llm.py --audio DIR --out OUT ... --num-shards 8 --shard-index $i
    # once every shard has finished
    python label_with_llm.py merge --out OUT

**Which rows a shard gets.** Row ``id`` belongs to shard ``sha256(id) mod N`` (:func:`shard_of`): deterministic
(the same on every machine, whatever the listing order), disjoint and covering by construction, about ``1/N`` of
the rows each (binomial spread: ±``sqrt(rows/N)``). ``--limit`` is applied before sharding.

**Where a shard writes.** ``OUT/shards/<i>-of-<N>/``: a complete single-process run folder (its dataset + its
journals), so each shard resumes on its own exactly as an unsharded run does (rerun the same command after a
kill, a preemption or a dead server). ``OUT/shards/manifest.json`` is written by the first shard to start
(atomically) and checked by every other: the number of shards, the settings (LLM, prompt hash, input) and the
input's ids in order. A shard started with another N, prompt, model or input is refused, naming what differs.

**Merge.** ``label_with_llm.py merge --out OUT`` (:func:`merge_shards`) refuses, naming them: shard folders of
another N, missing or unfinished shards, an id held by two shards (overlap) or by the wrong shard, an input id
no shard holds (gap), rows whose LLM request failed (``--allow-failed`` merges them with label -1). Clips a shard
left out with ``--skip-bad-audio`` are not gaps: they are counted. It then writes the merged dataset at ``OUT``
in the input order (the same dataset an unsharded run writes) and ``OUT/merge.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from .writer import Journal, JournalError

SHARDS_FOLDER = "shards"
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")
#: How many ids an error message names before "and N more".
SHOWN_IDS = 5


class ShardError(ValueError):
    """Sharding settings or shard outputs that cannot be used; the message names the shard, id or file."""


class EmptyShard(Exception):
    """This shard has no rows (more shards than the input needs); nothing to do."""


def shard_of(row_id: str, num_shards: int) -> int:
    """The shard of ``row_id``: ``sha256(id) mod num_shards`` (stable across machines, Python versions, order)."""
    digest = hashlib.sha256(str(row_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_name(index: int, num_shards: int) -> str:
    return f"{index:05d}-of-{num_shards:05d}"


def shard_dir(out: str | os.PathLike, index: int, num_shards: int) -> Path:
    return Path(out) / SHARDS_FOLDER / shard_name(index, num_shards)


def ids_digest(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _named(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


# ----------------------------------------------------------------------------------------------------
# The labelling side: the hook in run.py
# ----------------------------------------------------------------------------------------------------


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharding (several processes, GPUs or machines; then `label_with_llm.py merge`)")
    group.add_argument("--num-shards", type=int, default=None,
                       help="split the input into N shards by a hash of the row id (each shard: --shard-index)")
    group.add_argument("--shard-index", type=int, default=None,
                       help="which shard this process labels, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID); writes "
                            "OUT/shards/<i>-of-<N>/")


def check_shard_arguments(num_shards: int | None, shard_index: int | None) -> None:
    if num_shards is None and shard_index is None:
        return
    if num_shards is None or shard_index is None:
        raise ShardError("--num-shards and --shard-index go together (e.g. --num-shards 8 --shard-index 3)")
    if num_shards < 1:
        raise ShardError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ShardError(f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard_index}")


def _write_or_check_manifest(path: Path, manifest: dict) -> None:
    """Create ``path`` atomically with ``manifest``, or check that the existing one has the same content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(manifest) + "\n")
        try:
            os.link(temporary, path)  # fails if another shard created it first: then compare with theirs
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    try:
        existing = json.loads(path.read_text())
    except ValueError as error:
        raise ShardError(f"{path}: unreadable shard manifest ({error})") from error
    differences = []
    for key in ("num_shards", "settings", "num_rows", "ids_sha256"):
        if existing.get(key) != manifest[key]:
            if key == "settings":
                settings_then, settings_now = existing.get(key) or {}, manifest[key]
                differences += [f"{k}: {settings_then.get(k)!r} then, {settings_now.get(k)!r} now"
                                for k in sorted(set(settings_then) | set(settings_now))
                                if settings_then.get(k) != settings_now.get(k)]
            elif key == "ids_sha256":
                differences.append("the input's ids differ (another input, order or --limit)")
            else:
                differences.append(f"{key}: {existing.get(key)!r} then, {manifest[key]!r} now")
    if differences:
        raise ShardError(
            f"{path.parent.parent}: holds a sharded run with other settings ({'; '.join(differences)}); "
            f"use another --out, or delete {path.parent} to start the sharded run again"
        )


def select_shard(args: argparse.Namespace, rows: list[dict], out: Path, settings: dict[str, Any],
                 log=None) -> tuple[list[dict], Path]:
    """The rows of this process's shard and the folder it writes (``OUT/shards/<i>-of-<N>``).

    Without ``--num-shards`` this is ``(rows, out)`` unchanged. Raises :class:`EmptyShard` when the shard has
    no rows (its folder then holds an empty ``journal/summary.json`` so that ``merge`` sees it finished).
    """
    num_shards, shard_index = getattr(args, "num_shards", None), getattr(args, "shard_index", None)
    check_shard_arguments(num_shards, shard_index)
    if num_shards is None:
        return rows, out
    ids = [str(row["id"]) for row in rows]
    manifest = {"num_shards": num_shards, "settings": settings, "num_rows": len(ids), "ids_sha256": ids_digest(ids),
                "ids": ids}
    _write_or_check_manifest(Path(out) / SHARDS_FOLDER / MANIFEST, manifest)
    mine = [row for row in rows if shard_of(str(row["id"]), num_shards) == shard_index]
    folder = shard_dir(out, shard_index, num_shards)
    if log is not None:
        log(f"shard {shard_index} of {num_shards}: {len(mine)} of {len(rows)} rows, written to {folder}")
    if not mine:
        (folder / "journal").mkdir(parents=True, exist_ok=True)
        (folder / "journal" / "summary.json").write_text(json.dumps({"rows": 0, "empty_shard": True}) + "\n")
        raise EmptyShard(f"shard {shard_index} of {num_shards} has no rows ({len(rows)} rows in all): nothing to do")
    return mine, folder


# ----------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike) -> dict:
    path = Path(out) / SHARDS_FOLDER / MANIFEST
    if not path.is_file():
        raise ShardError(f"{Path(out)}: no sharded run here ({path} not found; run the shards with --num-shards first)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ShardError(f"{path}: unreadable shard manifest ({error})") from error


def _left_out_ids(folder: Path) -> set[str]:
    """Ids a shard left out with --skip-bad-audio (error records of its transcripts journal)."""
    journal = folder / "journal" / "transcripts.jsonl"
    if not journal.exists():
        return set()
    return {row_id for row_id, record in Journal(journal).load().items() if record.get("error")}


def merge_shards(out: str | os.PathLike, allow_failed: bool = False, log=None) -> dict:
    """Check every shard of the sharded run in ``out`` and write the merged dataset there (see the module doc)."""
    import datasets

    from .run import OUTPUT_LABELS

    out = Path(out)
    manifest = read_manifest(out)
    num_shards, ids = int(manifest["num_shards"]), [str(i) for i in manifest["ids"]]
    if ids_digest(ids) != manifest.get("ids_sha256"):
        raise ShardError(f"{out / SHARDS_FOLDER / MANIFEST}: its id list does not match its digest (edited by hand?)")
    expected: list[list[str]] = [[] for _ in range(num_shards)]
    for row_id in ids:
        expected[shard_of(row_id, num_shards)].append(row_id)

    # 1. the shard folders: all of this N, none of another
    folders: dict[int, Path] = {}
    foreign = []
    for entry in sorted((out / SHARDS_FOLDER).iterdir()):
        match = _SHARD_NAME.match(entry.name)
        if not entry.is_dir() or match is None:
            continue
        index, total = int(match.group(1)), int(match.group(2))
        if total != num_shards or index >= num_shards:
            foreign.append(entry.name)
        else:
            folders[index] = entry
    if foreign:
        raise ShardError(
            f"{out / SHARDS_FOLDER}: folder(s) {', '.join(foreign)} do not belong to this {num_shards}-shard run "
            f"(another --num-shards was used in the same --out); remove them or merge elsewhere"
        )
    missing = [i for i in range(num_shards) if i not in folders and expected[i]]
    unfinished = [i for i in range(num_shards) if i in folders and expected[i]
                  and not (folders[i] / "journal" / "summary.json").is_file()]
    if missing or unfinished:
        parts = []
        if missing:
            parts.append(f"shard(s) {', '.join(map(str, missing))} never started")
        if unfinished:
            parts.append(f"shard(s) {', '.join(map(str, unfinished))} have not finished (no dataset yet)")
        raise ShardError(f"{out}: cannot merge: {'; '.join(parts)} of {num_shards}; run (or rerun, to resume) "
                         f"`label_with_llm.py ... --num-shards {num_shards} --shard-index I` for each")

    # 2. the rows: each id in exactly its own shard, every input id somewhere (or left out as unreadable audio)
    owner: dict[str, int] = {}
    overlaps, wrong_shard, unknown, failed = [], [], [], {}
    records_by_id: dict[str, dict] = {}
    known = set(ids)
    left_out: dict[int, set[str]] = {}
    for index in range(num_shards):
        if not expected[index]:
            continue
        try:
            shard = datasets.load_from_disk(str(folders[index]))
        except (FileNotFoundError, ValueError) as error:
            raise ShardError(f"{folders[index]}: shard {index} has no readable dataset ({error}); rerun it") from error
        left_out[index] = _left_out_ids(folders[index])
        shard_failed = []
        label_names = shard.features["label"].names if hasattr(shard.features["label"], "names") else None
        for record in shard.to_list():
            row_id = str(record["id"])
            if row_id in owner:
                overlaps.append(f"{row_id!r} in shards {owner[row_id]} and {index}")
                continue
            owner[row_id] = index
            if row_id not in known:
                unknown.append(f"{row_id!r} (shard {index})")
            elif shard_of(row_id, num_shards) != index:
                wrong_shard.append(f"{row_id!r} in shard {index}, belongs to {shard_of(row_id, num_shards)}")
            if record.get("llm_error"):
                shard_failed.append(row_id)
            if label_names is not None and label_names != list(OUTPUT_LABELS):
                raise ShardError(f"{folders[index]}: label names {label_names} differ from {list(OUTPUT_LABELS)}")
            records_by_id[row_id] = record
        if shard_failed:
            failed[index] = shard_failed
    problems = []
    if overlaps:
        problems.append(f"{len(overlaps)} id(s) in two shards: {_named(overlaps)}")
    if wrong_shard:
        problems.append(f"{len(wrong_shard)} id(s) in the wrong shard: {_named(wrong_shard)}")
    if unknown:
        problems.append(f"{len(unknown)} id(s) not in the input: {_named(unknown)}")
    gaps = {}
    for index in range(num_shards):
        lacking = [row_id for row_id in expected[index]
                   if row_id not in records_by_id and row_id not in left_out.get(index, set())]
        if lacking:
            gaps[index] = lacking
    for index, lacking in gaps.items():
        problems.append(f"shard {index} lacks {len(lacking)} row(s): {_named(lacking)}")
    if failed and not allow_failed:
        for index, rows in failed.items():
            problems.append(f"shard {index} has {len(rows)} row(s) whose LLM request failed: {_named(rows)} "
                            "(rerun that shard to retry them, or merge with --allow-failed)")
    if problems:
        raise ShardError(f"{out}: cannot merge: " + "; ".join(problems))

    # 3. the merged dataset, in input order (what an unsharded run writes)
    records = [records_by_id[row_id] for row_id in ids if row_id in records_by_id]
    dataset = datasets.Dataset.from_list(records)
    for column in ("llm_reply", "llm_error"):
        if column in dataset.column_names and dataset.features[column].dtype == "null":
            dataset = dataset.cast_column(column, datasets.Value("string"))
    dataset = dataset.cast_column("label", datasets.ClassLabel(names=list(OUTPUT_LABELS)))
    dataset.save_to_disk(str(out))
    counts = {name: 0 for name in (*OUTPUT_LABELS, "unparsed", "failed")}
    for record in records:
        label = record["label"]
        counts[OUTPUT_LABELS[label] if label is not None and label >= 0 else
               ("failed" if record.get("llm_error") else "unparsed")] += 1
    summary = {
        "rows": len(records),
        "input_rows": len(ids),
        "num_shards": num_shards,
        "rows_per_shard": [len([1 for r in expected[i] if r in records_by_id]) for i in range(num_shards)],
        "left_out_unreadable_audio": sum(len(v) for v in left_out.values()),
        "counts": counts,
        "settings": manifest["settings"],
    }
    (out / "merge.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log is not None:
        log(f"merged {num_shards} shards: {len(records)} rows to {out}: {json.dumps(counts)}")
    return summary


def build_merge_parser() -> argparse.ArgumentParser:
    """The parser of ``label_with_llm.py merge --out OUT [--allow-failed]``."""
    parser = argparse.ArgumentParser(
        prog="label_with_llm.py merge",
        description="Check the shards of a sharded labelling run (--num-shards) and merge them into one dataset "
                    "at OUT, in the input order; refuses missing/unfinished shards, overlaps and gaps, naming them.",
    )
    parser.add_argument("--out", required=True, help="the --out the shards were run with")
    parser.add_argument("--allow-failed", action="store_true", help="merge rows whose LLM request failed (label -1)")
    return parser


def merge_main(argv: list[str]) -> int:
    """``label_with_llm.py merge --out OUT [--allow-failed]``."""
    args = build_merge_parser().parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    try:
        merge_shards(args.out, allow_failed=args.allow_failed,
                     log=lambda message: print(f"[label_with_llm] {message}", file=sys.stderr, flush=True))
    except (ShardError, JournalError) as error:
        print(f"label_with_llm.py merge: error: {error}", file=sys.stderr)
        return 2
    return 0
