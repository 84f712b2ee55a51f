"""One resume-manifest mechanism for every resumable job (docs/reliability.md).

A resumable job (``merits predict``, ``label_with_llm.py``, the embedding cache, ``train.py --resume``) keeps
its partial output next to a small JSON *manifest* that records what the output was made from:

- ``inputs``: a fingerprint of each input file or folder (:func:`fingerprint_path`);
- ``settings``: the options that change the output (model, prompt, batch layout, ...).

Before appending to earlier output the job calls :func:`check_manifest` with the fingerprints and settings of
*this* run. When they match, the job resumes; when they differ it either refuses with
:class:`ResumeMismatch` (whose message names every input and setting that changed, and how to start again) or,
for a cache that can simply be recomputed, discards the stale part and redoes it (``on_mismatch="redo"``).

Fingerprints: a file is hashed by content (sha256) up to :data:`CONTENT_HASH_LIMIT` bytes and by
``(size, modification time)`` beyond it (a corpus of audio files would take minutes to hash at every resume);
a folder by the sorted list of its files with their own fingerprints.

This module imports only the standard library; the Hub files never import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

MANIFEST_VERSION = 1
#: Files up to this size are fingerprinted by content; larger ones by size and modification time.
CONTENT_HASH_LIMIT = 64 * 1024 * 1024


class ResumeMismatch(ValueError):
    """Earlier output belongs to other inputs or settings; the message names what changed."""


#: Inside a folder, files up to this size are fingerprinted by content (the CSV / JSON / label files that say what
#: a corpus is); larger ones (audio, arrow shards) by size and modification time.
FOLDER_CONTENT_HASH_LIMIT = 4 * 1024 * 1024


def _file_digest(path: Path, digest, limit: int = CONTENT_HASH_LIMIT) -> None:
    stat = path.stat()
    if stat.st_size <= limit:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}".encode())


def fingerprint_path(path: str | os.PathLike, exclude: Iterable[str] = (), content_limit: int | None = None) -> str:
    """A short hex fingerprint of a file (content) or folder (names + contents of its files, recursively; files over
    :data:`FOLDER_CONTENT_HASH_LIMIT` by size and modification time).

    ``exclude``: top-level names inside a folder to leave out (e.g. the job's own output inside it).
    ``content_limit``: inside a folder, hash files up to this size by content (default
    :data:`FOLDER_CONTENT_HASH_LIMIT`; 0: every file by size and modification time).
    A missing path has the fingerprint ``"missing"``.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _file_digest(path, digest)
    elif path.is_dir():
        skip = set(exclude)
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = child.relative_to(path)
            if relative.parts[0] in skip:
                continue
            digest.update(relative.as_posix().encode() + b"\0")
            _file_digest(child, digest, FOLDER_CONTENT_HASH_LIMIT if content_limit is None else content_limit)
            digest.update(b"\0")
    else:
        return "missing"
    return digest.hexdigest()[:24]


def fingerprint_value(value: Any) -> str:
    """A fingerprint of a JSON-serialisable value (a list of row ids, an order array as a list, ...)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _differences(kind: str, old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before = "absent" if key not in old else repr(old[key])
            after = "absent" if key not in new else repr(new[key])
            if kind == "input":
                out.append(f"input {key} changed since the earlier run" if key in old and key in new
                           else f"input {key}: {before} then, {after} now")
            else:
                out.append(f"{key}: {before} then, {after} now")
    return out


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest at ``path``, None when there is none; :class:`ResumeMismatch` when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "inputs" not in data or "settings" not in data:
            raise ValueError("not a merits resume manifest")
    except (ValueError, UnicodeDecodeError) as error:
        raise ResumeMismatch(f"{path}: unreadable resume manifest ({error}); remove it together with the output it "
                             "describes to start again") from None
    return data


def write_manifest(path: str | os.PathLike, job: str, inputs: dict, settings: dict, extra: dict | None = None) -> None:
    """Write the manifest atomically (a temporary file renamed over it); ``extra`` adds job-specific keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), "version": MANIFEST_VERSION, "job": job, "inputs": inputs, "settings": settings}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def check_manifest(path: str | os.PathLike, job: str, inputs: dict, settings: dict, *, has_output: bool,
                   on_mismatch: str = "refuse", what: str = "the output", restart_hint: str = "",
                   extra: dict | None = None) -> bool:
    """Verify that earlier output described by the manifest at ``path`` may be resumed by this run.

    Args:
        path: the manifest file.
        job: the job's name (``"merits predict"``, ...), stored and compared.
        inputs: ``{name: fingerprint}`` of this run's inputs (:func:`fingerprint_path`).
        settings: this run's settings that change the output (JSON-serialisable).
        has_output: whether there is earlier output to resume.
        on_mismatch: ``"refuse"`` raises :class:`ResumeMismatch`; ``"redo"`` returns False so that the caller
            discards the earlier output and starts again.
        what: how the message names the earlier output (e.g. ``"out.jsonl"``).
        restart_hint: how to start again (appended to the refusal).
        extra: job-specific keys stored in the manifest (not compared here).

    Returns:
        True when earlier output exists and matches (resume it); False when there is nothing to resume or (with
        ``"redo"``) it does not match. In both False cases the manifest is (re)written for this run.
    """
    if on_mismatch not in ("refuse", "redo"):
        raise ValueError(f"on_mismatch must be 'refuse' or 'redo', got {on_mismatch!r}")
    previous = read_manifest(path) if has_output or Path(path).exists() else None
    if has_output and previous is None:
        if on_mismatch == "redo":
            write_manifest(path, job, inputs, settings, extra)
            return False
        raise ResumeMismatch(
            f"{what} holds earlier output but no resume manifest ({Path(path).name}), so it cannot be checked "
            f"against this run's input and settings; {restart_hint or 'remove it to start again'}"
        )
    if previous is not None and has_output:
        changes = []
        if previous.get("job") != job:
            changes.append(f"job: {previous.get('job')!r} then, {job!r} now")
        changes += _differences("input", previous.get("inputs", {}), inputs)
        changes += _differences("setting", previous.get("settings", {}), json.loads(json.dumps(settings, default=str)))
        if not changes:
            if extra is not None:
                write_manifest(path, job, inputs, settings, extra)
            return True
        if on_mismatch == "refuse":
            raise ResumeMismatch(
                f"cannot resume {what}: it was made from other input or settings ({'; '.join(changes[:6])}"
                f"{'; ...' if len(changes) > 6 else ''}); {restart_hint or 'remove it to start again'}"
            )
    write_manifest(path, job, inputs, settings, extra)
    return False


__all__ = [
    "CONTENT_HASH_LIMIT",
    "ResumeMismatch",
    "check_manifest",
    "fingerprint_path",
    "fingerprint_value",
    "read_manifest",
    "write_manifest",
]
