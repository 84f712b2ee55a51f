"""Test-time modality dropout: the MiSTER-E analysis of the official ``train_moe.py`` (papers.md §4.3).

``merits evaluate --model OUT/best --dataset ... --file ... --drop-modality speech`` (or ``text``) scores a trained
model twice on the same utterance embeddings, once with every modality and once with one modality removed at test
time, and prints one JSON object: both scores, the gate's mean weights in both runs (MiSTER-E) and how many turns were
dropped. ``--drop-probability p`` removes the modality from each utterance independently with probability ``p`` (the
official analysis sweeps p = 0.1 ... 0.9); 1.0 (default) removes it from every turn that has the other modality.

Two ways to remove a modality (``--drop-mode``):

* ``mask`` (default): the turn is marked as lacking the modality (``audio_mask`` / ``text_mask`` = 0), the way the
  model meets a turn without audio or text. MiSTER-E's gate then gives the experts that need it weight exactly 0 and
  renormalises over the rest (dropping speech leaves the text expert only); MERITS-L falls back from the fusion to
  the other modality's stage II context logits (``fallback`` in the output names the head).
* ``zero``: the utterance embedding is replaced by zeros and the model is not told (the turn still counts as having
  the modality), so every expert and the gate run on the zero vector.

The utterance embeddings are computed once (``merits.data.build_embedding_cache`` for a raw corpus; a feature dataset
already holds them); only the conversation-level part runs twice.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .configuration_merits import EXPERTS


MODALITIES = {"speech": "audio", "text": "text"}


class AnalysisError(ValueError):
    """Bad input for the analysis; the message names the file, row or option."""


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _select(loaded, split: str | None, where: str):
    """One split of ``loaded`` (all of them concatenated when ``split`` is None): merits.data.select_split."""
    from merits.data import SplitError, select_split

    try:
        return select_split(loaded, split, where)
    except SplitError as error:
        raise AnalysisError(str(error)) from None


def load_rows(dataset: str, file: str, split: str | None, label_names: list[str]):
    """The rows to score as a ``datasets.Dataset``: a raw corpus (schema of merits.data) or a feature dataset."""
    import datasets

    from . import data

    path = Path(file)
    where = f"{dataset} file {file}"
    if not path.exists():
        raise AnalysisError(f"--file {file}: not found.")
    if dataset == "features":
        if path.is_file() and path.suffix == ".parquet":
            loaded = datasets.Dataset.from_parquet(str(path))
        elif path.is_dir() and any(path.glob("*.parquet")) and not (path / "dataset_info.json").exists():
            loaded = datasets.Dataset.from_parquet([str(p) for p in sorted(path.glob("*.parquet"))])
        else:
            loaded = datasets.load_from_disk(str(path))
    elif dataset in data.SCORING_CORPORA:
        loaded = data.load_labelled_corpus(dataset, path, label_names, split)
    else:
        raise AnalysisError(f"unknown dataset {dataset!r}")
    rows = _select(loaded, split, where)
    for column in ("dialogue_id", "turn", "label"):
        if column not in rows.column_names:
            raise AnalysisError(f"{where}: column {column!r} is missing (have {rows.column_names}).")
    return rows


def gold_ids(rows, label2id: dict, where: str) -> list[int]:
    """Gold class ids in the model's numbering (-100 = unlabelled), matched by label name (case-insensitive)."""
    names = getattr(rows.features["label"], "names", None)
    lookup = {str(k).strip().lower(): int(v) for k, v in label2id.items()}
    gold = []
    for row, value in enumerate(rows["label"]):
        if value is None or (isinstance(value, int) and value < 0):
            gold.append(-100)
        elif names is None and isinstance(value, int):
            if not 0 <= value < len(lookup):
                raise AnalysisError(f"{where}, row {row}: label id {value} is outside the model's {len(lookup)} classes.")
            gold.append(int(value))
        else:
            name = names[value] if names is not None and isinstance(value, int) else value
            if str(name).strip().lower() not in lookup:
                raise AnalysisError(f"{where}, row {row}: label {name!r} is not one of the model's labels {sorted(lookup)}.")
            gold.append(lookup[str(name).strip().lower()])
    return gold


def embed_rows(model, processor, rows, batch_size: int = 32):
    """A raw corpus -> its feature dataset (Stage I embeddings of every utterance, computed once)."""
    from .data import build_embedding_cache

    if model.text_encoder is None and model.speech_encoder is None:
        raise AnalysisError("the model has no utterance encoder (trained on embeddings): use --dataset features.")
    if processor is None:
        raise AnalysisError("the model folder has no processor: cannot embed a raw corpus (use --dataset features).")
    use_text = model.text_encoder is not None and "text" in rows.column_names
    use_audio = model.speech_encoder is not None and "audio" in rows.column_names
    cache_dir = tempfile.mkdtemp(prefix="merits-analysis-")  # the returned dataset reads its files: removed at exit
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    return build_embedding_cache(model, processor, rows, cache_dir, batch_size=batch_size, use_text=use_text,
                                 use_audio=use_audio)


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
def _conversation_batches(features, config, gold: list[int], batch_size: int):
    """Batches of [B, T] tensors (embeds, masks, labels) from a feature dataset, conversations in file order."""
    from .data import conversation_indices

    columns = {m: features[f"{m}_embeds"] if f"{m}_embeds" in features.column_names and getattr(config, f"has_{m}") else None
               for m in ("text", "audio")}
    groups = conversation_indices(features)
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        turns = max(len(rows) for _, rows in chunk)
        batch = {"turn_mask": torch.zeros(len(chunk), turns, dtype=torch.long),
                 "labels": torch.full((len(chunk), turns), -100, dtype=torch.long)}
        for modality, values in columns.items():
            if values is None:
                continue
            size = getattr(config, f"{modality}_embed_dim")
            embeds = torch.zeros(len(chunk), turns, size)
            mask = torch.zeros(len(chunk), turns, dtype=torch.long)
            for b, (dialogue_id, rows) in enumerate(chunk):
                for t, row in enumerate(rows):
                    vector = values[row]
                    if vector is None or len(vector) == 0:
                        continue
                    if len(vector) != size:
                        raise AnalysisError(f"row {row} (dialogue {dialogue_id!r}): {modality}_embeds has {len(vector)} "
                                            f"values, the model expects {size}.")
                    embeds[b, t] = torch.as_tensor(np.asarray(vector, dtype=np.float32))
                    mask[b, t] = 1
            batch[f"{modality}_embeds"], batch[f"{modality}_mask"] = embeds, mask
        for b, (_, rows) in enumerate(chunk):
            batch["turn_mask"][b, : len(rows)] = 1
            batch["labels"][b, : len(rows)] = torch.tensor([gold[r] for r in rows])
        yield batch


def drop_modality(batch: dict, drop: str, probability: float, generator: torch.Generator, mode: str = "mask"):
    """A copy of ``batch`` with modality ``drop`` ("speech" | "text") removed from each real turn that also has the
    other modality, with probability ``probability``; returns (batch, dropped [B, T] bool)."""
    modality = MODALITIES[drop]
    other = "text" if modality == "audio" else "audio"
    out = dict(batch)
    if f"{modality}_mask" not in batch:
        return out, torch.zeros_like(batch["turn_mask"], dtype=torch.bool)
    has = batch[f"{modality}_mask"].bool() & batch["turn_mask"].bool()
    if f"{other}_mask" in batch:
        has = has & batch[f"{other}_mask"].bool()
    else:
        has = torch.zeros_like(has)  # no other modality: a turn is never left without input
    chosen = torch.rand(has.shape, generator=generator) < probability if probability < 1.0 else torch.ones_like(has)
    dropped = has & chosen
    if mode == "mask":
        out[f"{modality}_mask"] = batch[f"{modality}_mask"] * (~dropped).long()
    else:
        out[f"{modality}_embeds"] = batch[f"{modality}_embeds"] * (~dropped).unsqueeze(-1).to(batch[f"{modality}_embeds"].dtype)
    return out, dropped


def _scores(predictions, references, label_names):
    from .metrics import compute_erc_metrics

    metrics = compute_erc_metrics(predictions, references, label_names=label_names)
    return {k: metrics[k] for k in ("weighted_f1", "accuracy") if k in metrics}


@torch.no_grad()
def modality_dropout(model, features, gold: list[int], drop: str, probability: float = 1.0, mode: str = "mask",
                     seed: int = 0, batch_size: int = 8) -> dict:
    """Score ``model`` on ``features`` with every modality and with ``drop`` removed (see the module docstring)."""
    if drop not in MODALITIES:
        raise AnalysisError(f"--drop-modality must be one of {sorted(MODALITIES)}, got {drop!r}")
    if not 0.0 < probability <= 1.0:
        raise AnalysisError(f"--drop-probability must be in (0, 1], got {probability}")
    if mode not in ("mask", "zero"):
        raise AnalysisError(f"--drop-mode must be mask or zero, got {mode!r}")
    config = model.config
    if not getattr(config, f"has_{MODALITIES[drop]}"):
        raise AnalysisError(f"the model does not use {drop}: there is nothing to drop.")
    model.eval()
    label_names = [config.id2label[i] for i in range(config.num_labels)]
    generator = torch.Generator().manual_seed(seed)
    runs = {"full": {"pred": [], "gate": []}, "dropped": {"pred": [], "gate": [], "gate_dropped": []}}
    references, dropped_count, served = [], 0, {}
    for batch in _conversation_batches(features, config, gold, batch_size):
        labels = batch.pop("labels")
        keep = (labels != -100) & batch["turn_mask"].bool()
        references += labels[keep].tolist()
        dropped_batch, dropped = drop_modality(batch, drop, probability, generator, mode)
        dropped_count += int((dropped & keep).sum())
        for name, inputs in (("full", batch), ("dropped", dropped_batch)):
            out = model(**inputs)
            runs[name]["pred"] += out.logits.argmax(-1)[keep].tolist()
            if out.gate_weights is not None:
                real = batch["turn_mask"].bool()
                runs[name]["gate"].append(out.gate_weights[real])
                if name == "dropped":
                    runs[name]["gate_dropped"].append(out.gate_weights[dropped])
            if name == "dropped" and config.architecture == "merits-l" and mode == "mask":
                # which head gave each dropped turn's prediction: the other modality's context classifier
                other = "context_text_logits" if drop == "speech" else "context_audio_logits"
                head = getattr(out, other)
                if head is not None and dropped.any():
                    same = torch.isclose(out.logits[dropped], head[dropped]).all()
                    served[other] = served.get(other, True) and bool(same)
    if not references:
        raise AnalysisError("no labelled utterance to score.")
    result = {
        "architecture": config.architecture,
        "drop_modality": drop,
        "drop_probability": probability,
        "drop_mode": mode,
        "seed": seed,
        "num_utterances": len(references),
        "num_dropped": dropped_count,
    }
    for name, run in runs.items():
        result[name] = _scores(run["pred"], references, label_names)
        for key in ("gate", "gate_dropped"):
            if run.get(key):
                weights = torch.cat(run[key]) if sum(len(w) for w in run[key]) else None
                if weights is not None:
                    label = "gate_mean" if key == "gate" else "gate_mean_on_dropped_turns"
                    result[name][label] = {expert: float(weights[:, i].mean()) for i, expert in enumerate(EXPERTS)}
    result["weighted_f1_change"] = result["dropped"]["weighted_f1"] - result["full"]["weighted_f1"]
    if config.architecture == "mister-e":
        result["fallback"] = ("mask: the gate gives the experts that need the dropped modality weight 0 and renormalises "
                              "over the others" if mode == "mask" else "zero: every expert and the gate read the zeroed "
                              "embedding")
    elif mode == "mask":
        head = "context_text_logits" if drop == "speech" else "context_audio_logits"
        result["fallback"] = (f"{head} (the stage II {'text' if drop == 'speech' else 'speech'} context encoder) "
                              "instead of the fusion")
        if served:
            result["fallback_verified"] = served.get(head, False)
    else:
        result["fallback"] = "zero: the fusion reads the zeroed embedding's context features"
    return result


def modality_dropout_report(args) -> dict:
    """``merits evaluate ... --drop-modality``: load the model and rows named by the CLI arguments, run the analysis."""
    from .modeling_merits import MeritsForConversationClassification
    from .processing_merits import MeritsProcessor

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise AnalysisError(f"--model {args.model}: no config.json there; expected a folder written by train.py (OUT/best/).")
    model = MeritsForConversationClassification.from_pretrained(str(folder)).eval()
    processor = MeritsProcessor.from_pretrained(str(folder)) if (folder / "processor_config.json").is_file() else None
    label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = load_rows(args.dataset, args.file, args.split, label_names)
    where = f"{args.dataset} file {args.file}"
    if args.dataset != "features":
        if model.config.stage == "utterance":
            raise AnalysisError(f"the model at {args.model} is a stage I (utterance) model: it has no fusion or gate.")
        features = embed_rows(model, processor, rows)
    else:
        features = rows
    gold = gold_ids(features, model.config.label2id, where)
    result = modality_dropout(model, features, gold, args.drop_modality, getattr(args, "drop_probability", 1.0),
                              getattr(args, "drop_mode", "mask"), getattr(args, "seed", 0), args.batch_size)
    return {"dataset": args.dataset, "file": str(args.file), "split": args.split, "model": str(args.model), **result}


__all__ = ["AnalysisError", "drop_modality", "modality_dropout", "modality_dropout_report"]
