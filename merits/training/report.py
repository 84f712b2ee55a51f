"""Results of a run: ``all_results.json``, confusion-matrix PNGs and the printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix_png(predictions, references, label_names, path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (counts written in the cells) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    labels = list(range(len(label_names)))
    counts = confusion_matrix(np.asarray(references), np.asarray(predictions), labels=labels)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(labels, label_names, rotation=45, ha="right")
    ax.set_yticks(labels, label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in labels:
        for j in labels:
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(run_dir: Path, results: dict, predictions: dict, label_names) -> None:
    """``all_results.json`` and one confusion matrix per (split, stage, head) of this run."""
    run_dir = Path(run_dir)
    (run_dir / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    for (split, tag, key), (preds, refs) in predictions.items():
        if len(refs) == 0:
            continue
        name = "_".join(p for p in (split, tag.replace("+", "_"), key) if p)
        confusion_matrix_png(preds.numpy(), refs.numpy(), label_names, run_dir / "confusion_matrices" / f"{name}.png", name)


_ROWS = [
    ("stage0", "text", "Stage 0 text (pseudo-labels)"),
    ("stage1", "text", "Stage I text"),
    ("stage1", "audio", "Stage I speech"),
    ("stage2", "text", "Stage II text (context)"),
    ("stage2", "audio", "Stage II speech (context)"),
    ("stage3", "", "Stage III fusion"),
    ("stage2+3", "", "Stage II+III joint fusion"),
    ("moe", "speech_expert", "MoE speech expert"),
    ("moe", "text_expert", "MoE text expert"),
    ("moe", "cross_modal_expert", "MoE cross-modal expert"),
    ("moe", "", "MoE (gate)"),
]


def results_table(per_system: dict[str, dict[str, Any]]) -> str:
    """Markdown table: weighted F1 per stage and modality (validation and test) for each system."""
    lines = ["| system | stage / modality | validation wF1 | test wF1 |", "|---|---|---|---|"]
    for system, results in per_system.items():
        for tag, head, title in _ROWS:
            middle = f"{tag}_{head}_" if head else f"{tag}_"
            val = results.get(f"validation_{middle}weighted_f1")
            test = results.get(f"test_{middle}weighted_f1")
            if val is None and test is None:
                continue
            fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"
            lines.append(f"| {system} | {title} | {fmt(val)} | {fmt(test)} |")
    return "\n".join(lines)
