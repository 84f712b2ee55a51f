"""What each stage of MERITS-L and MiSTER-E trains, evaluates and exports.

``run_training(args)`` is the whole of ``train.py``: for each configured system

* **stage 0** (``dataset: pseudo_labels``, MERITS-L): the text encoder on LLM pseudo-labels
  (positive/negative/neutral), one utterance at a time;
* **stage I** (``utterance``): the text encoder and the speech head, each utterance alone (the batch
  counts utterances); the text encoder of the best *text* epoch and the speech head of the best *speech*
  epoch are kept;
* the **embedding cache**: every utterance through the selected stage-I encoders, grouped back into
  conversations;
* **stage II** (``context``, MERITS-L): a context encoder per modality on the cached embeddings;
* **stage III** (``fusion``, MERITS-L): co-attention fusion on the stage II features (or
  ``context+fusion`` jointly, the ablation);
* **MoE** (``moe``, MiSTER-E): both experts, the cross-modal expert and the gate jointly;

then writes ``all_results.json``, confusion matrices, and ``best/`` (a Hub folder).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arguments import TrainingArguments
from .checkpointing import prepare_output_dir
from .loop import IGNORE_INDEX, Head, StagePlan, run_stage


logger = logging.getLogger("merits.training")

STAGE_TAGS = {
    "pretrain": "stage0",
    "utterance": "stage1",
    "context": "stage2",
    "fusion": "stage3",
    "context+fusion": "stage2+3",
    "moe": "moe",
}
PSEUDO_LABELS = ("negative", "neutral", "positive")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, split, dialogue or turn."""


# ----------------------------------------------------------------------------------------------
# Data: corpora -> conversations of turns
# ----------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Conversations per split: each a list of turn dicts (text, audio value, label id)."""

    splits: dict  # split -> list[list[dict]]
    label_names: list
    name: str
    has_audio: bool


def _group(dataset, split_name: str, source: str) -> list[list[dict]]:
    """Rows of a schema dataset (merits.data.schema) -> conversations ordered by turn."""
    order: dict[Any, list] = {}
    columns = dataset.column_names
    for index in range(len(dataset)):
        row = dataset[index]
        key = row["dialogue_id"]
        order.setdefault(key, []).append(
            {
                "dialogue_id": key,
                "turn": int(row["turn"]),
                "text": row.get("text") or "",
                "audio": row.get("audio") if "audio" in columns else None,
                "label": int(row["label"]) if row["label"] is not None and int(row["label"]) >= 0 else IGNORE_INDEX,
                "where": f"{source} [{split_name}] dialogue {key!r} turn {row['turn']}",
            }
        )
    return [sorted(turns, key=lambda t: t["turn"]) for turns in order.values()]


def _pseudo_label_corpus(path: str, seed: int) -> "datasets.DatasetDict":
    """The dataset ``label_with_llm.py`` writes (id, text, label in positive/negative/neutral) as 1-turn dialogues."""
    import datasets

    from ..data.schema import conversation_features

    source = Path(path)
    if not source.exists():
        raise DataError(f"{path}: pseudo-label dataset not found (run label_with_llm.py --out {path})")
    loaded = datasets.load_from_disk(str(source))
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    features = conversation_features(PSEUDO_LABELS)
    out = {}
    for split, ds in splits.items():
        for column in ("id", "text", "label"):
            if column not in ds.column_names:
                raise DataError(f"{path} [{split}]: column {column!r} is missing (have {ds.column_names})")
        labels = []
        for row_index, label in enumerate(ds["label"]):
            name = ds.features["label"].int2str(label) if hasattr(ds.features["label"], "int2str") else str(label).strip().lower()
            if name not in PSEUDO_LABELS:
                raise DataError(f"{path} [{split}] row {row_index}: label {label!r} is not one of {PSEUDO_LABELS}")
            labels.append(PSEUDO_LABELS.index(name))
        out[split] = datasets.Dataset.from_dict(
            {
                "dialogue_id": [str(i) for i in ds["id"]],
                "turn": [0] * len(ds),
                "text": [t or "" for t in ds["text"]],
                "audio": [None] * len(ds),
                "label": labels,
            },
            features=features,
        )
    dsd = datasets.DatasetDict(out)
    if "validation" not in dsd:
        parts = dsd["train"].train_test_split(test_size=0.2, seed=seed)  # 80/20 (papers.md §3.2)
        dsd = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"], **{k: v for k, v in dsd.items() if k not in ("train",)}})
    return dsd


def load_corpus(args: TrainingArguments) -> Corpus:
    """The configured corpus as conversations (demo / meld / mosi / iemocap / emodb / msp_podcast / pseudo_labels)."""
    import datasets

    name = args.dataset
    options = dict(args.dataset_options)
    if name == "demo":
        from ..data.demo import make_demo_corpus

        dsd = make_demo_corpus(**options)
    elif name == "pseudo_labels":
        if not args.data_dir:
            raise DataError("dataset pseudo_labels needs --data_dir (the folder label_with_llm.py wrote)")
        dsd = _pseudo_label_corpus(args.data_dir, args.seed)
    else:
        from .. import data as data_package

        loader = getattr(data_package, f"load_{name}", None)
        if loader is None:
            raise DataError(f"dataset {name!r}: merits.data has no load_{name}() loader")
        if args.data_dir is None:
            raise DataError(f"dataset {name!r} needs --data_dir")
        dsd = loader(args.data_dir, **options)
    if not isinstance(dsd, datasets.DatasetDict):
        raise DataError(f"dataset {name!r}: the loader returned {type(dsd).__name__}, expected a DatasetDict")
    label_names = list(dsd["train"].features["label"].names)
    splits = {}
    for split in ("train", "validation", "test"):
        if split in dsd:
            conversations = _group(dsd[split], split, args.data_dir or name)
            limit = args.max_train_dialogues if split == "train" else args.max_eval_dialogues
            if limit is not None:
                conversations = conversations[:limit]
            splits[split] = conversations
    for split in ("train", "validation"):
        if not splits.get(split):
            raise DataError(f"dataset {name!r}: the {split} split is missing or empty")
    _check_labels(splits, label_names, name)
    has_audio = any(turn["audio"] is not None for conv in splits["train"] for turn in conv)
    return Corpus(splits=splits, label_names=label_names, name=name, has_audio=has_audio)


def _check_labels(splits: dict, label_names: list, source: str) -> None:
    seen = {turn["label"] for conv in splits["train"] for turn in conv if turn["label"] != IGNORE_INDEX}
    if not seen:
        raise DataError(f"{source}: the training split has no labelled turn")
    for split in ("validation", "test"):
        for conv in splits.get(split) or []:
            for turn in conv:
                if turn["label"] != IGNORE_INDEX and turn["label"] not in seen:
                    raise DataError(
                        f"{turn['where']}: label {label_names[turn['label']]!r} never occurs in the training split; "
                        "a model cannot learn it (drop it or fix the split)"
                    )


# ----------------------------------------------------------------------------------------------
# Feature datasets (api.md section 5)
# ----------------------------------------------------------------------------------------------
def load_feature_split(path: str, label_names: list | None = None) -> tuple[list[dict], list]:
    """A feature dataset folder (save_to_disk) or parquet file -> conversation items and the label names."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise DataError(f"{path}: feature dataset not found")
    try:
        if source.is_file() or source.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(source))
        else:
            ds = datasets.load_from_disk(str(source))
    except (IndexError, ValueError, FileNotFoundError) as error:
        raise DataError(f"{path}: cannot read the feature dataset (empty or not a datasets folder): {error!r}") from error
    if not (source.is_file() or source.suffix == ".parquet"):
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: expected one split (a Dataset), found a DatasetDict with {list(ds)}")
    if len(ds) == 0:
        raise DataError(f"{path}: the feature dataset is empty")
    for column in ("dialogue_id", "turn", "label"):
        if column not in ds.column_names:
            raise DataError(f"{path}: column {column!r} is missing (have {ds.column_names})")
    modalities = [m for m in ("text_embeds", "audio_embeds") if m in ds.column_names]
    if not modalities:
        raise DataError(f"{path}: neither text_embeds nor audio_embeds is present")
    feature = ds.features["label"]
    if label_names is None:
        if hasattr(feature, "names"):
            label_names = list(feature.names)
        else:
            values = sorted({v for v in ds["label"] if v is not None and not (isinstance(v, int) and v < 0)}, key=str)
            label_names = [str(v) for v in values]
    by_dialogue: dict[Any, list] = {}
    for index in range(len(ds)):
        row = ds[index]
        where = f"{path} row {index} (dialogue {row['dialogue_id']!r}, turn {row['turn']})"
        label = row["label"]
        if label is None or (isinstance(label, int) and label < 0):
            label_id = IGNORE_INDEX
        elif hasattr(feature, "names"):
            label_id = label_names.index(feature.names[label]) if feature.names[label] in label_names else None
        else:
            label_id = label_names.index(str(label)) if str(label) in label_names else None
        if label_id is None:
            raise DataError(f"{where}: label {label!r} is unknown to the training split (labels {label_names})")
        turn = {"turn": int(row["turn"]), "label": label_id}
        for modality in modalities:
            value = row[modality]
            if value is None:
                turn[modality] = None
                continue
            array = np.asarray(value, dtype=np.float32)
            if array.ndim != 1 or array.size == 0:
                raise DataError(f"{where}: {modality} must be a non-empty list of floats, got shape {array.shape}")
            if not np.isfinite(array).all():
                raise DataError(f"{where}: {modality} holds NaN or inf")
            turn[modality] = array
        by_dialogue.setdefault(row["dialogue_id"], []).append(turn)
    items = []
    for dialogue, turns in by_dialogue.items():
        turns.sort(key=lambda t: t["turn"])
        if len({t["turn"] for t in turns}) != len(turns):
            raise DataError(f"{path}: dialogue {dialogue!r} has the same turn number twice")
        item = {"labels": np.array([t["label"] for t in turns], dtype=np.int64)}
        for modality in modalities:
            dims = {t[modality].shape[0] for t in turns if t[modality] is not None}
            if len(dims) > 1:
                raise DataError(f"{path}: dialogue {dialogue!r}: {modality} sizes differ between turns ({sorted(dims)})")
            if not dims:
                continue
            dim = dims.pop()
            item[modality] = np.stack([t[modality] if t[modality] is not None else np.zeros(dim, np.float32) for t in turns])
            item[modality.replace("_embeds", "_mask")] = np.array([t[modality] is not None for t in turns], dtype=np.int64)
        items.append(item)
    return items, label_names


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------
class UtteranceCollator:
    """Items of stage 0/I (one turn each, or whole conversations) -> a model batch (design.md section 2).

    Text is tokenised here; speech comes as precomputed ``audio_features`` (acoustic statistics).
    """

    def __init__(self, tokenizer, max_length: int, use_text: bool, use_audio: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_text = use_text
        self.use_audio = use_audio

    def __call__(self, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
        batch_size, max_turns = len(conversations), max(len(c) for c in conversations)
        turn_mask = torch.zeros(batch_size, max_turns, dtype=torch.long)
        text_mask = torch.zeros_like(turn_mask)
        audio_mask = torch.zeros_like(turn_mask)
        labels = torch.full((batch_size, max_turns), IGNORE_INDEX, dtype=torch.long)
        texts, features = [], None
        for b, conversation in enumerate(conversations):
            for t, turn in enumerate(conversation):
                turn_mask[b, t] = 1
                labels[b, t] = turn["label"]
                if self.use_text:
                    text_mask[b, t] = int(bool(turn["text"]))
                    texts.append(turn["text"])
                if self.use_audio and turn.get("audio_features") is not None:
                    if features is None:
                        features = torch.zeros(batch_size, max_turns, len(turn["audio_features"]))
                    features[b, t] = torch.as_tensor(turn["audio_features"])
                    audio_mask[b, t] = 1
        batch = {"turn_mask": turn_mask, "labels": labels}
        if self.use_text:
            batch["text_mask"] = text_mask
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            batch["input_ids"] = encoded["input_ids"]
            batch["attention_mask"] = encoded["attention_mask"]
        if self.use_audio:
            batch["audio_mask"] = audio_mask
            if features is None:
                raise DataError("a batch has no turn with audio features although the speech modality is used")
            batch["audio_features"] = features
        return batch


def collate_features(items: list[dict]) -> dict[str, torch.Tensor]:
    """Conversation items of cached embeddings -> ``text_embeds`` / ``audio_embeds`` [B, T, D] batches."""
    batch_size, max_turns = len(items), max(len(item["labels"]) for item in items)
    turn_mask = torch.zeros(batch_size, max_turns, dtype=torch.long)
    labels = torch.full((batch_size, max_turns), IGNORE_INDEX, dtype=torch.long)
    batch: dict[str, torch.Tensor] = {}
    for b, item in enumerate(items):
        length = len(item["labels"])
        turn_mask[b, :length] = 1
        labels[b, :length] = torch.as_tensor(item["labels"])
        for key in ("text_embeds", "audio_embeds"):
            if key not in item:
                continue
            if key not in batch:
                batch[key] = torch.zeros(batch_size, max_turns, item[key].shape[-1])
                batch[key.replace("_embeds", "_mask")] = torch.zeros(batch_size, max_turns, dtype=torch.long)
            batch[key][b, :length] = torch.as_tensor(item[key])
            batch[key.replace("_embeds", "_mask")][b, :length] = torch.as_tensor(item[key.replace("_embeds", "_mask")])
    batch.update(turn_mask=turn_mask, labels=labels)
    return batch


# ----------------------------------------------------------------------------------------------
# Encoders: tokenizer, acoustic features, model
# ----------------------------------------------------------------------------------------------
def build_tokenizer(args: TrainingArguments, corpus: Corpus | None, run_dir: Path):
    from transformers import AutoTokenizer

    if args.tokenizer_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    if args.text_encoder_init:
        return AutoTokenizer.from_pretrained(args.text_encoder_init)
    if args.text_model_name_or_path:
        return AutoTokenizer.from_pretrained(args.text_model_name_or_path)
    if not args.train_tokenizer:
        raise ValueError("the text modality needs tokenizer_name_or_path, text_model_name_or_path or train_tokenizer: true")
    import datasets

    from ..data.demo import train_demo_tokenizer

    texts = [turn["text"] for conv in corpus.splits["train"] for turn in conv if turn["text"]]
    kind = "wordlevel" if corpus.name == "demo" else "bpe"
    tokenizer = train_demo_tokenizer(datasets.Dataset.from_dict({"text": texts}), vocab_size=args.tokenizer_vocab_size, model=kind)
    tokenizer.model_max_length = args.max_text_length
    return tokenizer


def add_acoustic_features(corpus: Corpus, cache_file: Path, accelerator_state) -> "MeritsAcousticFeatureExtractor":
    """Acoustic statistics of every turn (computed once on the main process, cached), normalised on train."""
    from ..data.audio import load_audio
    from ..feature_extraction_merits import MeritsAcousticFeatureExtractor

    extractor = MeritsAcousticFeatureExtractor()
    turns = [(split, turn) for split, convs in corpus.splits.items() for conv in convs for turn in conv]
    with accelerator_state.main_process_first():
        if cache_file.is_file():
            stacked = np.load(cache_file)
        else:
            from tqdm.auto import tqdm

            rows = []
            for _, turn in tqdm(turns, desc="acoustic features", disable=not accelerator_state.is_local_main_process):
                if turn["audio"] is None:
                    rows.append(np.full(extractor.feature_size, np.nan, np.float32))
                    continue
                try:
                    array = load_audio(turn["audio"], 16000, source=turn["where"])
                except Exception as error:
                    raise DataError(f"{turn['where']}: cannot read its audio: {error}") from error
                rows.append(extractor(array, sampling_rate=16000)["audio_features"][0])
            stacked = np.stack(rows).astype(np.float32)
            if accelerator_state.is_main_process:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache_file, stacked)
    if stacked.shape[0] != len(turns):
        raise DataError(f"{cache_file}: cached acoustic features do not match the corpus ({stacked.shape[0]} != {len(turns)} turns)")
    train_rows = np.array([split == "train" and turn["audio"] is not None for split, turn in turns])
    mean = stacked[train_rows].mean(axis=0)
    std = np.maximum(stacked[train_rows].std(axis=0), 1e-3)
    extractor.feature_mean, extractor.feature_std, extractor.do_normalize = mean.tolist(), std.tolist(), True
    for (split, turn), row in zip(turns, stacked):
        if turn["audio"] is not None:
            if not np.isfinite(row).all():
                raise DataError(f"{turn['where']}: its acoustic features hold NaN or inf (silent or corrupt audio?)")
            turn["audio_features"] = ((row - mean) / std).astype(np.float32)
        else:
            turn["audio_features"] = None
    return extractor


def build_model(args: TrainingArguments, architecture: str, label_names: list, tokenizer=None, audio_feature_dim=None,
                text_embed_dim=None, audio_embed_dim=None, use_text=True, use_audio=True):
    from ..configuration_merits import MeritsConfig
    from ..modeling_merits import MeritsForConversationClassification

    id2label = dict(enumerate(label_names))
    # `model:` holds MeritsConfig settings; a nested `merits-l:` / `mister-e:` mapping applies to that system only
    hyperparameters = {k: v for k, v in args.model.items() if k not in ("merits-l", "mister-e")}
    hyperparameters.update(args.model.get(architecture) or {})
    kwargs: dict[str, Any] = dict(architecture=architecture, id2label=id2label, **hyperparameters)
    if use_audio:
        if audio_embed_dim is not None:
            kwargs["audio_embed_dim"] = audio_embed_dim
        elif args.audio_config is not None:
            kwargs["audio_config"] = dict(args.audio_config)
        elif args.audio_model_name_or_path is None:
            kwargs["audio_feature_dim"] = audio_feature_dim
    if use_text:
        if text_embed_dim is not None:
            kwargs["text_embed_dim"] = text_embed_dim
        elif args.text_model_name_or_path is None and args.text_encoder_init is None:
            if args.text_config is None:
                raise ValueError("the text modality needs text_config (from scratch) or text_model_name_or_path")
            text_config = dict(args.text_config)
            text_config.setdefault("vocab_size", len(tokenizer))
            text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
            text_config.setdefault("max_position_embeddings", args.max_text_length + 4)
            kwargs["text_config"] = text_config
    text_source = args.text_encoder_init or args.text_model_name_or_path if use_text and text_embed_dim is None else None
    audio_source = args.audio_model_name_or_path if use_audio and audio_embed_dim is None else None
    if text_source or audio_source:
        if args.text_encoder_init and use_text:
            from transformers import AutoModel

            # stage 0 output: a merits Hub folder; its text backbone initialises this one (the head is re-made)
            stage0 = MeritsForConversationClassification.from_pretrained(args.text_encoder_init)
            kwargs["text_config"] = stage0.config.text_config
            model = MeritsForConversationClassification(MeritsConfig(**kwargs))
            model.text_encoder.backbone.load_state_dict(stage0.text_encoder.backbone.state_dict())
            del AutoModel
            return model
        return MeritsForConversationClassification.from_backbones(
            text_model_name_or_path=text_source, audio_model_name_or_path=audio_source, **kwargs
        )
    return MeritsForConversationClassification(MeritsConfig(**kwargs))


def apply_lora(model, args: TrainingArguments):
    """LoRA (peft) on the text backbone for the utterance stage; merged back before anything is saved."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules)
    model.text_encoder.backbone = get_peft_model(model.text_encoder.backbone, config)
    return model


def merge_lora(model):
    backbone = model.text_encoder.backbone if model.text_encoder is not None else None
    if backbone is not None and hasattr(backbone, "merge_and_unload"):
        model.text_encoder.backbone = backbone.merge_and_unload()
    return model


@torch.no_grad()
def cache_embeddings(model, conversations: list[list[dict]], collator: UtteranceCollator, batch_size: int = 32) -> list[dict]:
    """Stage I embeddings of every turn, grouped back into conversations (the inputs of stages II/III, MoE)."""
    model.eval()
    flat = [turn for conv in conversations for turn in conv]
    text_rows, audio_rows = [], []
    for start in range(0, len(flat), batch_size):
        chunk = [[turn] for turn in flat[start : start + batch_size]]
        batch = collator(chunk)
        embeddings = model.get_utterance_embeddings(**batch)
        if embeddings.get("text") is not None:
            text_rows.append(embeddings["text"].float().cpu())
        if embeddings.get("audio") is not None:
            audio_rows.append(embeddings["audio"].float().cpu())
    text_all = torch.cat(text_rows).numpy() if text_rows else None
    audio_all = torch.cat(audio_rows).numpy() if audio_rows else None
    items, offset = [], 0
    for conv in conversations:
        n = len(conv)
        item = {"labels": np.array([t["label"] for t in conv], dtype=np.int64)}
        if text_all is not None:
            item["text_embeds"] = text_all[offset : offset + n]
            item["text_mask"] = np.array([int(bool(t["text"])) for t in conv], dtype=np.int64)
        if audio_all is not None:
            item["audio_embeds"] = audio_all[offset : offset + n]
            item["audio_mask"] = np.array([int(t.get("audio_features") is not None) for t in conv], dtype=np.int64)
        items.append(item)
        offset += n
    return items


def save_feature_dataset(items: list[dict], path: Path) -> None:
    """Write cached embeddings as a feature dataset (api.md section 5), reusable with --train_features."""
    import datasets

    rows = {"dialogue_id": [], "turn": [], "label": [], "text_embeds": [], "audio_embeds": []}
    for index, item in enumerate(items):
        for t, label in enumerate(item["labels"]):
            rows["dialogue_id"].append(str(index))
            rows["turn"].append(t)
            rows["label"].append(int(label))
            for key in ("text_embeds", "audio_embeds"):
                present = key in item and item[key.replace("_embeds", "_mask")][t]
                rows[key].append(item[key][t].tolist() if present else None)
    for key in ("text_embeds", "audio_embeds"):
        if all(v is None for v in rows[key]):
            del rows[key]
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))


# ----------------------------------------------------------------------------------------------
# Stage plans
# ----------------------------------------------------------------------------------------------
def heads_for(stage: str, architecture: str, use_text: bool, use_audio: bool) -> list[Head]:
    heads: list[Head] = []
    if stage in ("utterance", "pretrain"):
        if use_text:
            heads.append(Head("text", "utterance_text_logits", "text_mask", ("text_encoder",)))
        if use_audio:
            heads.append(Head("audio", "utterance_audio_logits", "audio_mask", ("speech_encoder",)))
    elif stage == "context":
        if use_text:
            heads.append(Head("text", "context_text_logits", "text_mask", ("text_context",)))
        if use_audio:
            heads.append(Head("audio", "context_audio_logits", "audio_mask", ("audio_context",)))
    elif stage == "fusion":
        heads.append(Head("", "logits", None, ("fusion",)))
    elif stage == "context+fusion":
        heads.append(Head("", "logits", None, ("text_context", "audio_context", "fusion")))
        heads.append(Head("text", "context_text_logits", "text_mask"))
        heads.append(Head("audio", "context_audio_logits", "audio_mask"))
    elif stage == "moe":
        heads.append(Head("", "logits", None, ("text_context", "audio_context", "fusion", "gate")))
        if use_audio:
            heads.append(Head("speech_expert", "context_audio_logits", "audio_mask"))
        if use_text:
            heads.append(Head("text_expert", "context_text_logits", "text_mask"))
        if use_text and use_audio:
            heads.append(Head("cross_modal_expert", "fusion_logits", None))
    return heads


_HEAD_KEYS = ("text_", "audio_", "speech_expert_", "text_expert_", "cross_modal_expert_")


def final_results(results: dict, tag: str) -> dict:
    """``validation_<metric>`` / ``test_<metric>`` of the run's final head: the stage's own output, else text, else audio."""
    for head in ("", "text", "audio"):
        out = {}
        for split in ("validation", "test"):
            prefix = f"{split}_{tag}_{head + '_' if head else ''}"
            for key, value in results.items():
                if not key.startswith(prefix):
                    continue
                metric = key[len(prefix):]
                if not head and metric.startswith(_HEAD_KEYS):
                    continue
                out[f"{split}_{metric}"] = value
        if out:
            return out
    return {}


# ----------------------------------------------------------------------------------------------
# One system
# ----------------------------------------------------------------------------------------------
def run_system(args: TrainingArguments, architecture: str, run_dir: Path, corpus: Corpus | None, shared_cache: Path) -> dict:
    """Train every configured stage of ``architecture`` in ``run_dir``; returns its flat results."""
    from accelerate import PartialState

    from . import report
    from .model_card import write_best_model

    from accelerate.utils import set_seed

    state = PartialState()
    set_seed(args.seed)  # the initial weights of every stage: a resumed run rebuilds the same model
    stages = args.stages_for(architecture)
    results: dict[str, Any] = {}
    predictions: dict[str, Any] = {}
    processor = None
    use_text = "text" in args.modalities
    use_audio = "audio" in args.modalities

    if args.train_features is not None:
        train_items, label_names = load_feature_split(args.train_features)
        validation_items, _ = load_feature_split(args.validation_features, label_names)
        test_items = load_feature_split(args.test_features, label_names)[0] if args.test_features else None
        use_text = "text_embeds" in train_items[0]
        use_audio = "audio_embeds" in train_items[0]
        model = build_model(
            args, architecture, label_names,
            text_embed_dim=train_items[0]["text_embeds"].shape[-1] if use_text else None,
            audio_embed_dim=train_items[0]["audio_embeds"].shape[-1] if use_audio else None,
            use_text=use_text, use_audio=use_audio,
        )
        features = {"train": train_items, "validation": validation_items, "test": test_items}
        dataset_name = Path(args.train_features).name
    else:
        label_names = corpus.label_names
        use_audio = use_audio and corpus.has_audio
        tokenizer = build_tokenizer(args, corpus, run_dir) if use_text else None
        extractor = None
        if use_audio:
            extractor = add_acoustic_features(corpus, shared_cache / "acoustic_features.npy", state)
        model = build_model(
            args, architecture, label_names, tokenizer=tokenizer,
            audio_feature_dim=extractor.feature_size if extractor is not None else None,
            use_text=use_text, use_audio=use_audio,
        )
        from ..processing_merits import MeritsProcessor

        processor = MeritsProcessor(tokenizer=tokenizer, feature_extractor=extractor, label2id=dict(model.config.label2id),
                                    max_length=args.max_text_length)
        collator = UtteranceCollator(tokenizer, args.max_text_length, use_text, use_audio)
        features = None
        dataset_name = corpus.name

    for stage in stages:
        tag = STAGE_TAGS[stage]
        model_stage = "utterance" if stage == "pretrain" else stage
        if stage in ("pretrain", "utterance"):
            if corpus is None:
                raise ValueError(f"stage {stage!r} needs a corpus (not --train_features)")
            if args.use_lora and use_text:
                apply_lora(model, args)
            single = {split: [[turn] for conv in convs for turn in conv] for split, convs in corpus.splits.items()}
            plan = StagePlan(model_stage, tag, heads_for(stage, architecture, use_text, use_audio), single["train"],
                             single["validation"], single.get("test"), collator, args.stage_arguments(stage), label_names)
            stage_results, stage_predictions = run_stage(model, plan, args, run_dir)
            if args.use_lora and use_text:
                merge_lora(model)
        else:
            if features is None:
                features = {split: cache_embeddings(model, convs, collator) if convs else None
                            for split, convs in corpus.splits.items()}
                features.setdefault("test", None)
                if state.is_main_process:
                    for split, items in features.items():
                        if items:
                            save_feature_dataset(items, run_dir / "cache" / f"features_{split}")
                state.wait_for_everyone()
            plan = StagePlan(stage, tag, heads_for(stage, architecture, use_text, use_audio), features["train"],
                             features["validation"], features.get("test"), collate_features, args.stage_arguments(stage),
                             label_names)
            stage_results, stage_predictions = run_stage(model, plan, args, run_dir)
        results.update(stage_results)
        if stage_predictions:
            for split, per_head in stage_predictions.items():
                for key, value in per_head.items():
                    predictions[(split, tag, key)] = value

    # the run's own keys (no stage tag): the last stage's final head
    results.update({k: v for k, v in final_results(results, STAGE_TAGS[stages[-1]]).items() if k not in results})

    if state.is_main_process:
        model.config.stage = "utterance" if stages[-1] == "pretrain" else stages[-1]
        report.write_outputs(run_dir, results, predictions, label_names)
        write_best_model(model, processor, run_dir / "best", results, dataset_name, args)
    state.wait_for_everyone()
    return results


def run_training(args: TrainingArguments) -> dict:
    """``train.py``: every configured system, then ``all_results.json``, ``best/`` and the results table."""
    from accelerate import PartialState

    from . import report
    from .model_card import push_best_model

    state = PartialState()
    output_dir = Path(args.output_dir)
    options = args.to_dict()
    prepare_output_dir(output_dir, options, args.resume, args.overwrite_output_dir, state.is_main_process)
    state.wait_for_everyone()

    corpus = None if args.train_features is not None else load_corpus(args)
    architectures = args.architectures()
    all_results: dict[str, Any] = {}
    per_system: dict[str, dict] = {}
    for architecture in architectures:
        run_dir = output_dir if len(architectures) == 1 else output_dir / architecture
        run_dir.mkdir(parents=True, exist_ok=True)
        per_system[architecture] = run_system(args, architecture, run_dir, corpus, output_dir / "cache")

    if len(architectures) == 1:
        all_results = per_system[architectures[0]]
    else:
        for architecture, results in per_system.items():
            prefix = architecture.replace("-", "_")
            all_results.update({f"{prefix}_{k}": v for k, v in results.items()})
        # OUT/best: the system with the higher validation weighted F1 (validation alone selects)
        chosen = max(architectures, key=lambda a: per_system[a].get("validation_weighted_f1", -1.0))
        all_results["selected_architecture"] = chosen
        chosen_stages = args.stages_for(chosen)
        all_results.update(final_results(per_system[chosen], STAGE_TAGS[chosen_stages[-1]]))
        if state.is_main_process:
            import shutil

            best = output_dir / "best"
            if best.exists():
                shutil.rmtree(best)
            shutil.copytree(output_dir / chosen / "best", best)
    if state.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(all_results, indent=2, sort_keys=True))
        table = report.results_table(per_system)
        (output_dir / "results.md").write_text(table + "\n")
        print(table)
        if args.push_to_hub:
            push_best_model(output_dir / "best", args.hub_model_id)
    state.wait_for_everyone()
    return all_results
