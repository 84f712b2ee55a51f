"""One entry point that reads a labelled corpus file for scoring a trained model (`merits evaluate`, the
modality-dropout analysis): the loader chosen by name, MELD's label set chosen by the model's labels."""

from __future__ import annotations

from pathlib import Path

from .folder import load_emodb, load_folder
from .iemocap import load_iemocap
from .meld import load_meld
from .mosi import load_mosi

#: Split names users type for the validation split.
SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}

#: The corpora `load_labelled_corpus` reads.
SCORING_CORPORA: tuple[str, ...] = ("meld", "mosi", "iemocap", "emodb")


def load_labelled_corpus(dataset: str, path: str | Path, label_names, split: str | None = None):
    """The corpus at ``path`` as a ``DatasetDict`` of splits (or one ``Dataset``), audio that is absent as None.

    MELD is read with sentiment labels when ``label_names`` are positive / negative / neutral, else emotions; IEMOCAP
    with as many classes as ``label_names``. A single MELD CSV is one split whatever its name: with ``split`` it is
    returned under that name."""
    import datasets

    path = Path(path)
    if dataset == "meld":
        names = {str(name).lower() for name in label_names}
        label = "sentiment" if names <= {"positive", "negative", "neutral"} else "emotion"
        loaded = load_meld(path, label=label, missing_audio="none")
        if path.is_file() and split is not None:
            loaded = {split: next(iter(loaded.values()))}
    elif dataset == "mosi":
        loaded = load_mosi(path, missing_audio="none")
    elif dataset == "iemocap":
        loaded = load_iemocap(path, num_classes=len(label_names), other_labels="drop", missing_audio="none")
    elif dataset == "emodb":
        loaded = load_emodb(path) if path.is_dir() or path.name == "labels.csv" else load_folder(path)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(SCORING_CORPORA)}")
    if isinstance(loaded, dict) and not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict(loaded)
    return loaded


class SplitError(ValueError):
    """The asked split is not in the loaded corpus."""


def select_split(loaded, split: str | None, where: str):
    """One split of a ``DatasetDict`` (``dev``/``valid``/``val`` mean ``validation``), or all of its splits
    concatenated when ``split`` is None; a plain ``Dataset`` has no splits. :class:`SplitError` names ``where``."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise SplitError(f"{where}: --split {split} given but the file has no splits.")
        return loaded
    if split is not None:
        split = SPLIT_ALIASES.get(split, split)
        if split not in loaded:
            raise SplitError(f"{where}: no '{split}' rows (splits present: {sorted(loaded)}).")
        return loaded[split]
    parts = [loaded[name] for name in loaded]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
