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


SYSTEM_NAMES = {"merits-l": "MERITS-L", "mister-e": "MiSTER-E"}


def write_examples(corpus, output_dir: Path, max_conversations: int = 2) -> Path | None:
    """``OUT/examples/conversations.jsonl``: a few held-out conversations in `merits predict`'s input format (one
    conversation per line; audio as wav files next to it, or the corpus's own paths), so the summary's next command
    runs as printed. ``None`` when the corpus has no held-out split."""
    import soundfile

    split = next((name for name in ("test", "validation") if name in corpus.splits and len(corpus.splits[name])), None)
    if split is None:
        return None
    dataset = corpus.splits[split]
    folder = Path(output_dir) / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    wanted, order = [], []
    for row in range(len(dataset)):  # the first conversations, in file order
        dialogue = dataset[row]["dialogue_id"]
        if dialogue not in wanted:
            if len(wanted) == max_conversations:
                break
            wanted.append(dialogue)
        order.append(row)
    names = getattr(dataset.features["label"], "names", None)
    lines = []
    for dialogue in wanted:
        rows = sorted((dataset[r] for r in order if dataset[r]["dialogue_id"] == dialogue), key=lambda r: r["turn"])
        turns = []
        for item in rows:
            turn = {"text": item["text"]} if item.get("text") else {}
            audio = item.get("audio")
            if audio is not None and audio.get("array") is not None and not (audio.get("path") and Path(audio["path"]).is_file()):
                name = f"{dialogue}_turn{item['turn']}.wav"
                soundfile.write(folder / name, np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"]))
                turn["audio"] = name  # relative to the JSONL file's folder
            elif audio is not None and audio.get("path") and Path(audio["path"]).is_file():
                turn["audio"] = str(Path(audio["path"]).resolve())
            turns.append(turn)
        labels = [names[r["label"]] if names is not None else r["label"] for r in rows]
        lines.append(json.dumps({"id": str(dialogue), "split": split, "reference_labels": labels, "turns": turns}))
    path = folder / "conversations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_summary(output_dir: Path, per_system: dict[str, dict], selected: str, examples: Path | None = None,
                toy: bool = False, logs: bool = True) -> str:
    """The lines printed at the end of every run: where the model, results and plots are, and what to run next."""
    out = Path(output_dir)
    runs = {a: (out / a if len(per_system) > 1 else out) for a in per_system}
    score = lambda a: per_system[a].get("validation_weighted_f1")
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"
    lines = ["", f"Done. Everything is in {out}/"]
    if len(per_system) > 1:
        others = ", ".join(f"{SYSTEM_NAMES.get(a, a)} {fmt(score(a))}" for a in per_system if a != selected)
        lines.append(f"  model    {out / 'best'}/  = {SYSTEM_NAMES.get(selected, selected)} (highest validation weighted F1: "
                     f"{fmt(score(selected))} vs {others}); each system's own model: "
                     + ", ".join(f"{runs[a] / 'best'}/" for a in per_system))
    else:
        lines.append(f"  model    {out / 'best'}/  ({SYSTEM_NAMES.get(selected, selected)}, a Hub folder; its README.md is the model card)")
    lines.append(f"  results  {out / 'all_results.json'} (flat keys; unprefixed = the model in best/), {out / 'results.md'}")
    plots = [runs[a] / "confusion_matrices" for a in per_system if (runs[a] / "confusion_matrices").is_dir()]
    if plots:
        lines.append("  plots    " + ", ".join(f"{p}/ ({len(list(p.glob('*.png')))} confusion matrices)" for p in plots))
    if logs:
        lines.append(f"  logs     tensorboard --logdir {out}")
    if toy:
        lines.append("  note     the demo corpus is synthetic (a small vocabulary of scripted sentences, simulated prosody): this "
                     "model is a toy that shows the pipeline, not an emotion recogniser for real speech or text")
    best = out / "best"
    lines.append("Next:")
    if examples is not None:
        lines.append(f"  merits predict --model {best} {examples} -o {examples.parent / 'predictions.jsonl'}")
    lines.append(f"  merits predict --model {best} your_conversations.jsonl -o predictions.jsonl"
                 '   # one conversation a line: [{"text": "...", "audio": "turn1.wav"}, ...]')
    features = runs[selected] / "features.json"
    if features.is_file():
        splits = json.loads(features.read_text())
        split = "test" if "test" in splits else next(iter(splits), None)
        if split is not None:
            lines.append(f"  merits evaluate --model {best} --dataset features --file {splits[split]}   # the {split} split")
    lines.append("  merits evaluate --model {} --dataset meld --file test_sent_emo.csv   # or mosi / iemocap / emodb".format(best))
    lines.append(f"  hf upload your-name/your-model {best}   # push to the Hub (after `hf auth login`)")
    return "\n".join(lines)
