"""Resumable, incremental output: an append-only JSONL journal per step, keyed by row id.

Every finished row is appended (and flushed) the moment it is known, so a run killed at any point
(SIGKILL, a server crash, a power cut of the labeller process) loses at most the row being written.
A rerun reads the journal, skips the ids it holds and appends the rest. A torn last line (the
process died mid-write) is detected and cut off before appending.

The journal is the source of truth; the final ``datasets`` dataset is rebuilt from it in the input
order, so a resumed run produces exactly the dataset an unbroken run produces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class JournalError(ValueError):
    """A journal or run-metadata file that cannot be used; the message names the file and line."""


class Journal:
    """An append-only JSONL file of records, each with an ``"id"`` key.

    Usage::

        journal = Journal(out_dir / "journal" / "labels.jsonl")
        done = journal.load()            # {id: record}; repairs a torn last line
        with journal:                    # opens for appending
            journal.append({"id": "a", "label": "positive"})
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Read every complete record (the last one wins for a repeated id); cut off a torn last line."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        if tail:
            # the file does not end with a newline: the process died while writing this line
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data) - len(tail))
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                row_id = record["id"]
            except (ValueError, KeyError, TypeError) as error:
                raise JournalError(f"{self.path}, line {number}: not a journal record ({error}): {line[:200]!r}")
            records[str(row_id)] = record
        return records

    def __enter__(self) -> "Journal":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and flush it to the OS (it survives the process being killed)."""
        if self._handle is None:
            raise RuntimeError("Journal.append outside `with journal:`")
        if "id" not in record:
            raise ValueError(f"journal records need an 'id': {record!r}")
        self._handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self._handle.flush()

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.load().values())


def check_run_metadata(path: str | os.PathLike, metadata: dict[str, Any], overwrite: bool = False,
                       inputs: dict[str, str] | None = None) -> None:
    """Store ``metadata`` (model, prompt hash, input) at ``path``, or check that a previous run used the same.

    Resuming with another LLM, prompt or input would silently mix two labellings in one dataset; this
    raises :class:`JournalError` naming what differs instead (``overwrite=True`` replaces the file;
    the caller then clears the journals). ``inputs`` (``{name: fingerprint}``, :func:`merits.resume.fingerprint_path`)
    catches an input file edited or replaced under the same name. The file is a :mod:`merits.resume` manifest.
    """
    from merits.resume import ResumeMismatch, check_manifest

    path = Path(path)
    if overwrite:
        path.unlink(missing_ok=True)
    try:
        # the settings are also kept at the top level of run.json (readers of the earlier flat format)
        check_manifest(path, "label_with_llm.py", inputs or {}, metadata, has_output=path.exists(),
                       what=str(path.parent.parent), restart_hint="use another --out, or --overwrite to start again",
                       extra=dict(metadata))
    except ResumeMismatch as error:
        raise JournalError(str(error)) from None
