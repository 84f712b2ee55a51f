"""Shared helpers for the benchmarks: every run records its own figures, never by hand.

Each benchmark calls :func:`record` once at its end. The entry lands in ``bench/results.json``
(keyed by benchmark name, the newest run replaces the older one) together with the machine, the
library versions and the exact command that produced it; ``bench/RESULTS.md`` is regenerated
from that file so the README can link one readable page.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import numpy
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
    }
    for name in ("transformers", "accelerate", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - optional
            pass
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_kb"] = int(fh.readline().split()[1])
    except OSError:  # pragma: no cover - non-Linux
        pass
    return info


def command_line() -> str:
    """The command that is running now, as a user would type it."""
    return " ".join(["python"] + [shlex.quote(a) for a in sys.argv])


def record(name: str, figures: dict[str, Any], notes: str = "", command: str | None = None,
           machine: dict[str, Any] | None = None, date: str | None = None) -> dict[str, Any]:
    """Store one benchmark's figures in ``bench/results.json`` and refresh ``bench/RESULTS.md``.

    ``machine``/``date`` are for figures measured elsewhere (the device check's JSON from a GPU machine)."""
    entry = {
        "benchmark": name,
        "date": date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or command_line(),
        "machine": machine or machine_info(),
        "figures": figures,
        "notes": notes,
    }
    results: dict[str, Any] = {}
    if RESULTS_JSON.exists():
        results = json.loads(RESULTS_JSON.read_text())
    results[name] = entry
    RESULTS_JSON.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    write_markdown(results)
    print(json.dumps(entry["figures"], indent=2))
    return entry


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_markdown(results: dict[str, Any]) -> None:
    lines = [
        "# Benchmark results",
        "",
        "Written by the benchmarks themselves (`bench/common.py`); rerun a line's command to refresh it.",
        "",
    ]
    for name in sorted(results):
        entry = results[name]
        machine = entry["machine"]
        lines += [
            f"## {name}",
            "",
            f"- command: `{entry['command']}`",
            f"- date: {entry['date']}; {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}"
            f" ({machine.get('torch_threads')} threads), {machine.get('platform')}",
        ]
        if entry.get("notes"):
            lines.append(f"- notes: {entry['notes']}")
        lines += ["", "| figure | value |", "|---|---|"]
        for key, value in entry["figures"].items():
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")
    RESULTS_MD.write_text("\n".join(lines))
