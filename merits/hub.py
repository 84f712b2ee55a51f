# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""Writing and reading complete Hugging Face Hub model folders (api.md section 2).

A folder written by :func:`save_hub_folder` holds:

- ``config.json``: ``model_type`` ``"merits"``, ``auto_map`` for AutoConfig, AutoModel and AutoProcessor, and a
  ``custom_pipelines`` entry for the task ``"conversation-emotion-recognition"``;
- ``model.safetensors``;
- the remote code, ``HUB_CODE_FILES``: ``configuration_merits.py``, ``modeling_merits.py`` and the model files it
  imports (``common_merits.py``, ``losses_merits.py``, ``whisper_encoder_merits.py``,
  ``utterance_encoders_merits.py``, ``context_merits.py``, ``fusion_merits.py``), ``processing_merits.py``,
  ``feature_extraction_merits.py``, ``pipeline_merits.py`` (flat, relative imports, importing only torch,
  transformers and numpy; checked here);
- the tokenizer files, ``preprocessor_config.json`` (feature extractor), ``processor_config.json``;
- ``README.md``: a model card with YAML metadata (and a ``model-index`` when results are given).

It loads with ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` where ``merits`` is not installed, and
with :func:`load_hub_folder` where it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.dynamic_module_utils import custom_object_save, get_imports, get_relative_imports

from .configuration_merits import MeritsConfig
from .modeling_merits import MeritsForConversationClassification
from .pipeline_merits import ConversationEmotionRecognitionPipeline
from .processing_merits import MeritsProcessor
from ._registration import PIPELINE_TASK  # importing it registers the classes with transformers (once)

# The remote-code files every Hub folder carries, in the order they depend on each other.
HUB_CODE_FILES = (
    "configuration_merits.py",
    "common_merits.py",
    "losses_merits.py",
    "whisper_encoder_merits.py",
    "utterance_encoders_merits.py",
    "context_merits.py",
    "fusion_merits.py",
    "modeling_merits.py",
    "feature_extraction_merits.py",
    "processing_merits.py",
    "pipeline_merits.py",
)

# Top-level packages a Hub file may import (the user of a Hub folder has only these).
ALLOWED_HUB_IMPORTS = ("torch", "transformers", "numpy")

_PACKAGE_DIR = Path(__file__).resolve().parent


def _pipeline_entry() -> dict:
    """The ``custom_pipelines`` value written into config.json, built as `Pipeline.save_pretrained` builds it from
    the `PIPELINE_REGISTRY` registration made in ``merits/_registration.py``."""
    from . import _registration  # noqa: F401  (registers the pipeline task once per process)

    registered = getattr(ConversationEmotionRecognitionPipeline, "_registered_impl", None)
    if not registered or PIPELINE_TASK not in registered:
        raise RuntimeError(
            f"ConversationEmotionRecognitionPipeline is not registered for '{PIPELINE_TASK}' "
            "(merits/_registration.py registers it with transformers' PIPELINE_REGISTRY)."
        )
    info = dict(registered[PIPELINE_TASK])
    impl = info["impl"]
    info["impl"] = f"{impl.__module__.split('.')[-1]}.{impl.__name__}"
    # The pipeline loads the model through the Auto class (from `auto_map`), so only transformers' AutoModel is named.
    info["pt"] = [model_class.__name__ for model_class in info.get("pt", ())]
    return {PIPELINE_TASK: info}


def check_hub_code(folder: str | os.PathLike) -> list[str]:
    """
    Checks the remote code of a Hub folder: every ``HUB_CODE_FILES`` entry is present, every relative import points
    to a file of the folder, and no file imports anything but the standard library, torch, transformers, numpy and
    its siblings (imports
    inside ``try`` blocks are optional and allowed, as transformers' own check allows them).

    Returns the list of python files of the folder; raises ``ValueError`` naming the file otherwise.
    """
    folder = Path(folder)
    problems = []
    for name in HUB_CODE_FILES:
        if not (folder / name).is_file():
            problems.append(f"{name} is missing")
    python_files = sorted(path.name for path in folder.glob("*.py"))
    for name in python_files:
        path = folder / name
        for relative in get_relative_imports(str(path)):
            if not (folder / f"{relative}.py").is_file():
                problems.append(f"{name} imports .{relative}, which is not in the folder")
        for package in get_imports(str(path)):
            if package not in ALLOWED_HUB_IMPORTS and package not in sys.stdlib_module_names:
                problems.append(f"{name} imports '{package}' (Hub files may import only {', '.join(ALLOWED_HUB_IMPORTS)})")
    if problems:
        raise ValueError(f"Hub folder {folder} has invalid remote code: " + "; ".join(problems))
    return python_files


def _metric_type(key: str) -> str:
    """The model-index ``type`` (a metric id such as the Hub's ``f1``); the full key stays the metric's ``name``."""
    if "f1" in key:
        return "f1"
    if "accuracy" in key:
        return "accuracy"
    if "recall" in key:  # unweighted average recall (UAR)
        return "recall"
    if "loss" in key:
        return "loss"
    return key.rsplit("_", 1)[-1]


def make_model_card(
    config: MeritsConfig,
    results: dict[str, float] | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
    description: str | None = None,
) -> str:
    """
    A model card with YAML metadata. `results` is a flat dict of measured metrics as written in
    ``all_results.json`` (e.g. ``{"test_weighted_f1": 0.64, "test_accuracy": 0.66}``); its numeric entries
    become the card's ``model-index`` (split taken from the ``test_`` / ``validation_`` / ``eval_`` prefix).
    """
    architecture = getattr(config, "architecture", "merits")
    system = {"merits-l": "MERITS-L", "mister-e": "MiSTER-E"}.get(architecture, architecture)
    eval_results = []
    for key, value in (results or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        split = next((s for s in ("test", "validation", "eval", "train") if key.startswith(f"{s}_")), None)
        eval_results.append(
            EvalResult(
                task_type="audio-classification",
                task_name="Emotion recognition in conversations",
                dataset_type=dataset_type or dataset_name or "custom",
                dataset_name=dataset_name or dataset_type or "custom",
                dataset_split=split,
                metric_type=_metric_type(key),
                metric_name=key,
                metric_value=float(value),
            )
        )
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["merits", architecture, "emotion-recognition", "conversation", "speech", "text", "multimodal", "custom_code"],
        model_name=f"{system} ({dataset_name})" if dataset_name else system,
        eval_results=eval_results or None,
    )
    labels = ", ".join(str(config.id2label[i]) for i in sorted(config.id2label))
    lines = [
        f"# {system} emotion recognition in conversations",
        "",
        description
        or (
            f"A {system} model (speech + text emotion recognition in conversations) built with the `merits` package. "
            f"Classes: {labels}."
        ),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("{PIPELINE_TASK}", model="<this repo or folder>", trust_remote_code=True)',
        'classifier([{"text": "I got the job!", "audio": "turn0.wav"}, {"text": "That is wonderful."}])',
        "```",
    ]
    if eval_results:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {result.metric_name} | {result.metric_value:.4f} |" for result in eval_results]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def _ensure_metadata(model_card: str, config: MeritsConfig) -> str:
    """A user card without YAML front matter gets the minimal metadata block prepended."""
    if model_card.lstrip().startswith("---"):
        ModelCard(model_card)  # raises on invalid YAML metadata
        return model_card
    minimal = make_model_card(config)
    header = minimal.split("\n---\n", 1)[0] + "\n---\n\n"
    return header + model_card


def save_hub_folder(
    model: MeritsForConversationClassification,
    processor: MeritsProcessor | None,
    out_dir: str | os.PathLike,
    model_card: str | None = None,
    results: dict[str, float] | None = None,
    dataset_name: str | None = None,
    safe_serialization: bool = True,
) -> Path:
    """
    Writes `model` and `processor` as a complete Hub model repo folder at `out_dir` (see the module docstring).

    Args:
        model: the trained `MeritsForConversationClassification`.
        processor: its `MeritsProcessor`. `None` for a model reading precomputed embeddings: an empty processor
            (masks and labels only, with the model's `label2id`) is saved so that AutoProcessor still works.
        out_dir: the folder (created; existing files of the same names are overwritten).
        model_card: the README.md text; when None, :func:`make_model_card` writes one from `results`.
        results: measured metrics for the generated card's model-index (flat, as in all_results.json).
        dataset_name: dataset named in the generated card.

    Returns:
        The folder path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if processor is None:
        processor = MeritsProcessor(label2id=dict(model.config.label2id))

    # Register the classes for the Auto classes (merits/_registration.py does this; a model class loaded from
    # remote code is registered here) so that save_pretrained writes `auto_map` and copies the code.
    if type(model.config)._auto_class is None:
        type(model.config).register_for_auto_class("AutoConfig")
    if type(model)._auto_class is None:
        type(model).register_for_auto_class("AutoModel")
    if type(processor)._auto_class is None:
        type(processor).register_for_auto_class("AutoProcessor")

    # config.json: the processor and the custom pipeline, next to the AutoConfig/AutoModel entries save_pretrained adds.
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    auto_map["AutoProcessor"] = f"{type(processor).__module__.split('.')[-1]}.{type(processor).__name__}"
    model.config.auto_map = auto_map
    model.config.custom_pipelines = _pipeline_entry()

    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    processor.save_pretrained(out_dir)
    custom_object_save(ConversationEmotionRecognitionPipeline, out_dir)  # pipeline_merits.py and its imports

    # Every remote-code file, whether or not something above imported it (e.g. feature_extraction_merits.py for a
    # processor whose feature extractor comes from transformers).
    for name in HUB_CODE_FILES:
        if not (out_dir / name).is_file():
            shutil.copyfile(_PACKAGE_DIR / name, out_dir / name)
    check_hub_code(out_dir)

    with open(out_dir / "config.json", encoding="utf-8") as reader:
        written = json.load(reader)
    missing = [key for key in ("AutoConfig", "AutoModel", "AutoProcessor") if key not in written.get("auto_map", {})]
    if written.get("model_type") != "merits" or missing or PIPELINE_TASK not in written.get("custom_pipelines", {}):
        raise RuntimeError(
            f"{out_dir / 'config.json'} is incomplete: model_type={written.get('model_type')!r}, missing auto_map "
            f"entries {missing}, custom_pipelines={written.get('custom_pipelines')}."
        )

    if model_card is None:
        model_card = make_model_card(model.config, results=results, dataset_name=dataset_name)
    else:
        model_card = _ensure_metadata(model_card, model.config)
    (out_dir / "README.md").write_text(model_card, encoding="utf-8")
    return out_dir


def load_hub_folder(
    path_or_repo: str | os.PathLike, **kwargs: Any
) -> tuple[MeritsForConversationClassification, MeritsProcessor]:
    """
    Loads `(model, processor)` from a folder written by :func:`save_hub_folder`, a Hub repo id, or the HF cache
    (`kwargs` go to both `from_pretrained` calls: `cache_dir`, `revision`, `local_files_only`, `token`, ...).
    Uses the installed `merits` classes, so no remote code is executed. The model is returned in eval mode.
    """
    model = MeritsForConversationClassification.from_pretrained(path_or_repo, **kwargs)
    model.eval()
    processor = MeritsProcessor.from_pretrained(path_or_repo, **kwargs)
    return model, processor


__all__ = [
    "ALLOWED_HUB_IMPORTS",
    "HUB_CODE_FILES",
    "PIPELINE_TASK",
    "check_hub_code",
    "load_hub_folder",
    "make_model_card",
    "save_hub_folder",
]
