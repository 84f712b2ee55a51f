"""Metrics of the project, as local `evaluate` modules (no hub access needed).

``ERC_METRICS_PATH`` is the folder of the ``erc_metrics`` module; ``load_erc_metrics()`` loads it
with ``evaluate.load`` and ``compute_erc_metrics`` is the one-call form used by the trainers and
the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

ERC_METRICS_PATH = str(Path(__file__).resolve().parent / "erc_metrics")

_LOADED = None


def load_erc_metrics():
    """`evaluate.load` of the local ``erc_metrics`` module (cached per process)."""
    global _LOADED
    if _LOADED is None:
        import evaluate

        _LOADED = evaluate.load(ERC_METRICS_PATH)
    return _LOADED


def compute_erc_metrics(
    predictions: Sequence[int],
    references: Sequence[int],
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
) -> dict:
    """Weighted F1, accuracy, UAR, macro F1 and per-class F1 (``f1_<name>``); references < 0 are dropped."""
    metric = load_erc_metrics()
    return metric.compute(
        predictions=[int(p) for p in predictions],
        references=[int(r) for r in references],
        label_names=list(label_names) if label_names is not None else None,
        num_labels=num_labels,
    )


__all__ = ["ERC_METRICS_PATH", "load_erc_metrics", "compute_erc_metrics"]
