"""What each stage of MERITS-L and MiSTER-E trains, evaluates and exports.

``run_training(args)`` is the whole of ``train.py``: for each configured system

* **stage 0** (``dataset: pseudo_labels``, MERITS-L): the text encoder on LLM pseudo-labels
  (positive/negative/neutral), one utterance at a time;
* **stage I** (``utterance``): the text encoder and the speech head, each utterance alone (the batch
  counts utterances); the text encoder of the best *text* epoch and the speech head of the best *speech*
  epoch are kept;
* the **embedding cache** (:func:`merits.data.build_embedding_cache`, fingerprinted and resumable): every
  utterance through the selected stage-I encoders, grouped back into conversations;
* **stage II** (``context``, MERITS-L): a context encoder per modality on the cached embeddings;
* **stage III** (``fusion``, MERITS-L): co-attention fusion on the stage II features (or
  ``context+fusion`` jointly, the ablation);
* **MoE** (``moe``, MiSTER-E): both experts, the cross-modal expert and the gate jointly;

then writes ``all_results.json``, confusion matrices, and ``best/`` (a Hub folder).

Data path: a corpus stays a ``datasets.Dataset`` per split. The acoustic speech head's inputs are computed once
and added as an ``audio_features`` column; stage 0/I batches come from :class:`merits.data.FeatureCollator`
(text tokenised per batch, speech statistics precomputed) or, for a speech backbone on waveforms, from
:class:`merits.data.ConversationCollator`; stages II/III and the MoE batch the cached feature datasets with
:class:`merits.data.FeatureCollator`.

Bad input: an empty train/validation split, NaN/inf in features (the error names the dialogue and turn) and a
label name unknown to the training split are errors (:class:`DataError`); a class of the label set that has
no training example but occurs in validation/test is a warning (:class:`UnseenLabelWarning`), because the
metrics stay well defined (those turns count as errors).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.collate import ConversationCollator, FeatureCollator, RandomAudioCrop, conversation_indices, conversations
from ..data.schema import DataFormatError
from .arguments import TrainingArguments
from .checkpointing import StageCheckpoints, prepare_output_dir
from .loop import IGNORE_INDEX, Head, StagePlan, distributed_state, run_stage
from .linear_probe import init_text_head_from_probe


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
# Data: corpora as datasets of utterance rows (merits.data.schema)
# ----------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The configured corpus: a ``datasets.Dataset`` of utterance rows per split (docs/design.md section 4)."""

    splits: dict  # split -> datasets.Dataset
    label_names: list
    name: str
    has_audio: bool


def _where(source: str, split: str, dialogue, turn) -> str:
    return f"{source} [{split}] dialogue {dialogue!r} turn {turn}"


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
        keep, labels = [], []
        for row_index, label in enumerate(ds["label"][:]):
            if label is None or (isinstance(label, int) and label < 0):
                continue  # the LLM's reply named no class (papers.md §6 #4: dropped)
            name = ds.features["label"].int2str(label) if hasattr(ds.features["label"], "int2str") else str(label).strip().lower()
            if name not in PSEUDO_LABELS:
                raise DataError(f"{path} [{split}] row {row_index} (id {ds[row_index]['id']!r}): label {label!r} is not one of {PSEUDO_LABELS}")
            keep.append(row_index)
            labels.append(PSEUDO_LABELS.index(name))
        if len(keep) < len(ds):
            logger.info("%s [%s]: %d of %d rows have no pseudo-label (unparseable LLM reply) and are left out",
                        path, split, len(ds) - len(keep), len(ds))
        ids, texts = ds["id"][:], ds["text"][:]
        out[split] = datasets.Dataset.from_dict(
            {
                "dialogue_id": [str(ids[i]) for i in keep],
                "turn": [0] * len(keep),
                "text": [texts[i] or "" for i in keep],
                "audio": [None] * len(keep),
                "label": labels,
            },
            features=features,
        )
    dsd = datasets.DatasetDict(out)
    if "validation" not in dsd:
        parts = dsd["train"].train_test_split(test_size=0.2, seed=seed)  # 80/20 (papers.md §3.2)
        dsd = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"], **{k: v for k, v in dsd.items() if k not in ("train",)}})
    return dsd


#: options naming files or folders the run reads: fingerprinted in resume_manifest.json (merits.resume)
INPUT_OPTIONS = ("data_dir", "train_features", "validation_features", "test_features", "text_encoder_init",
                 "tokenizer_name_or_path", "text_model_name_or_path", "audio_model_name_or_path")


def input_fingerprints(args: TrainingArguments) -> dict:
    """``{option: fingerprint}`` of every local file or folder the run reads (a Hub id is kept as given)."""
    from ..resume import fingerprint_path

    inputs = {}
    for key in INPUT_OPTIONS:
        value = getattr(args, key, None)
        if value:
            inputs[key] = fingerprint_path(value) if Path(value).exists() else f"not a local path: {value}"
    return inputs


def _corpus_loader(name: str):
    if name == "demo":
        from ..data.demo import make_demo_corpus

        return make_demo_corpus
    from .. import data as data_package

    return getattr(data_package, f"load_{name}", None)


def check_dataset_options(args: TrainingArguments) -> None:
    """``dataset_options`` must be keyword arguments of the dataset's loader (checked before any data is read)."""
    import inspect

    options = dict(args.dataset_options or {})
    if not options or args.dataset in ("pseudo_labels", "features") or args.train_features is not None:
        return
    loader = _corpus_loader(args.dataset)
    if loader is None:
        return  # load_corpus names the missing loader
    parameters = inspect.signature(loader).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][1 if args.dataset != "demo" else 0:]
    unknown = sorted(key for key in options if key not in accepted)
    if unknown:
        source = args.source_of("dataset_options")
        raise DataError(f"{source}: dataset_options: {', '.join(map(repr, unknown))} is not an option of the {args.dataset} "
                        f"loader {loader.__name__}() (its options: {', '.join(accepted)})")


def _first_dialogues(dataset, limit: int | None):
    """The rows of the first ``limit`` conversations (quick runs), in the dataset's row order."""
    if limit is None:
        return dataset
    groups = conversation_indices(dataset)[:limit]
    return dataset.select(sorted(index for _, rows in groups for index in rows))


def load_corpus(args: TrainingArguments, require_validation: bool = True) -> Corpus:
    """The configured corpus (demo / meld / mosi / iemocap / emodb / msp_podcast / pseudo_labels) as datasets per split."""
    import datasets

    name = args.dataset
    options = dict(args.dataset_options)
    if name == "demo":
        from ..data.demo import make_demo_corpus

        import inspect

        known = set(inspect.signature(make_demo_corpus).parameters)
        unknown = sorted(set(options) - known)
        if unknown:
            raise DataError(f"dataset_options {unknown}: not options of the demo corpus (known: {sorted(known)}); "
                            "on the command line write a YAML mapping with spaces: --dataset_options '{num_dialogues: 24}'")
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
    if "train" not in dsd:
        raise DataError(f"dataset {name!r}: there is no train split (splits: {list(dsd)})")
    label_names = list(dsd["train"].features["label"].names)
    splits = {}
    for split in ("train", "validation", "test"):
        if split in dsd:
            limit = args.max_train_dialogues if split == "train" else args.max_eval_dialogues
            splits[split] = _first_dialogues(dsd[split], limit)
    for split in ("train", "validation") if require_validation else ("train",):
        if split not in splits or len(splits[split]) == 0:
            raise DataError(f"dataset {name!r} ({args.data_dir or 'built-in'}): the {split} split is missing or empty")
    if "test" in splits and len(splits["test"]) == 0:
        del splits["test"]
    _check_labels(splits, label_names, args.data_dir or name)
    has_audio = False
    if "audio" in splits["train"].column_names:  # an Arrow null count: no audio is decoded here
        audio = splits["train"].select_columns(["audio"]).with_format("arrow")[:].column("audio")
        has_audio = audio.null_count < len(audio)
    return Corpus(splits=splits, label_names=label_names, name=name, has_audio=has_audio)


def _check_labels(splits: dict, label_names: list, source: str) -> None:
    """Training needs labelled turns. A validation/test label that never occurs in training is a *warning*: the
    class exists (the corpus' label set) but the model never saw it, so every such turn will count as an error;
    it names the first such dialogue and turn."""
    train_labels = np.asarray(splits["train"]["label"][:])
    seen = set(int(v) for v in train_labels[train_labels >= 0])
    if not seen:
        raise DataError(f"{source} [train]: the training split has no labelled turn")
    for split in ("validation", "test"):
        if split not in splits:
            continue
        labels = np.asarray(splits[split]["label"][:])
        unseen = [(i, int(v)) for i, v in enumerate(labels) if v >= 0 and int(v) not in seen]
        if unseen:
            first, value = unseen[0]
            row = splits[split][first]
            names = sorted({label_names[v] for _, v in unseen})
            message = (
                f"{_where(source, split, row['dialogue_id'], row['turn'])}: label {label_names[value]!r} never occurs in "
                f"the training split ({len(unseen)} {split} turns with labels {names}); the model cannot predict them, "
                "so they count as errors"
            )
            logger.warning(message)
            warnings.warn(message, UnseenLabelWarning, stacklevel=2)


class UnseenLabelWarning(UserWarning):
    """A validation or test label never occurs in the training split."""


def _check_feature_labels(features: dict, label_names: list, source: str) -> None:
    """:func:`_check_labels` for feature datasets (conversations of rows with label ids)."""
    seen = {row["label"] for conversation in features["train"] for row in conversation if row["label"] >= 0}
    if not seen:
        raise DataError(f"{source}: the training split has no labelled turn")
    for split in ("validation", "test"):
        unseen = [row for conversation in features.get(split) or [] for row in conversation
                  if row["label"] >= 0 and row["label"] not in seen]
        if unseen:
            first = unseen[0]
            message = (
                f"{source} [{split}] dialogue {first['dialogue_id']!r} turn {first['turn']}: label "
                f"{label_names[first['label']]!r} never occurs in the training split ({len(unseen)} {split} turns with "
                f"labels {sorted({label_names[r['label']] for r in unseen})}); the model cannot predict them, so they "
                "count as errors"
            )
            logger.warning(message)
            warnings.warn(message, UnseenLabelWarning, stacklevel=2)


def utterance_items(dataset, columns: list[str]) -> list[list[dict]]:
    """Every utterance of ``dataset`` as a 1-turn conversation (stage 0/I batches count utterances)."""
    columns = [c for c in columns if c in dataset.column_names]
    items = []
    for conversation in conversations(dataset, columns):
        for row in conversation:
            if row.get("audio_features") is not None:  # float32 once here, not in every batch of every epoch
                row["audio_features"] = np.asarray(row["audio_features"], dtype=np.float32)
            items.append([row])
    return items


# ----------------------------------------------------------------------------------------------
# Feature datasets (api.md section 5): --train_features and the embedding cache
# ----------------------------------------------------------------------------------------------
def _embedding_matrix(dataset, column: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A ``list<float>`` column as ``[N, D]`` float32 (zeros where null) and its presence mask, checked for
    empty vectors, differing sizes and NaN/inf (the error names the row's dialogue and turn)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..processing_merits import first_non_finite

    table = dataset.data.table if dataset._indices is None else dataset.flatten_indices().data.table
    array = table.column(column).combine_chunks()
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type) and not pa.types.is_fixed_size_list(array.type):
        raise DataError(f"{source}: column {column!r} must hold lists of floats, found {array.type}")
    present = ~np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.asarray(pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)

    def where(row: int) -> str:
        return f"{source} row {row} (dialogue {dataset[row]['dialogue_id']!r}, turn {dataset[row]['turn']})"

    if not present.any():
        return np.zeros((len(dataset), 0), np.float32), present
    empty = np.nonzero(present & (lengths == 0))[0]
    if empty.size:
        raise DataError(f"{where(int(empty[0]))}: {column} is an empty list")
    dim = int(lengths[present][0])
    differing = np.nonzero(present & (lengths != dim))[0]
    if differing.size:
        raise DataError(f"{where(int(differing[0]))}: {column} has {lengths[differing[0]]} values, earlier rows have {dim}")
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.float32)
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    bad = first_non_finite(values)  # the project's one finiteness check (merits.processing_merits)
    if bad is not None:
        raise DataError(f"{where(int(parents[bad]))}: {column} holds NaN or inf")
    matrix = np.zeros((len(dataset), dim), np.float32)
    matrix[present] = values.reshape(-1, dim)
    return matrix, present


def feature_conversations(dataset, source: str, label_ids: list[int] | None = None) -> list[list[dict]]:
    """A feature dataset -> conversations of rows (``dialogue_id``, ``turn``, ``label``, ``text_embeds`` /
    ``audio_embeds`` as numpy rows or None), read once into memory for :class:`merits.data.FeatureCollator`.

    ``label_ids`` replaces the ``label`` column (ids in the training label order)."""
    matrices = {column: _embedding_matrix(dataset, column, source) for column in ("text_embeds", "audio_embeds")
                if column in dataset.column_names}
    # plain lists (one Arrow read each): indexing a datasets Column row by row re-reads the table every time
    columns = dataset.select_columns(["dialogue_id", "turn", "label"]).to_dict()
    labels = label_ids if label_ids is not None else columns["label"]
    try:
        groups = conversation_indices(dataset)
    except DataFormatError as error:
        raise DataError(f"{source}: {error}") from None
    dialogue_ids, turns = columns["dialogue_id"], columns["turn"]
    result = []
    for _, rows in groups:
        conversation = []
        for row in rows:
            item = {"dialogue_id": dialogue_ids[row], "turn": int(turns[row]), "label": labels[row]}
            for column, (matrix, present) in matrices.items():
                item[column] = matrix[row] if present[row] else None
            conversation.append(item)
        result.append(conversation)
    return result


def load_feature_split(path: str, label_names: list | None = None) -> tuple[list[list[dict]], list]:
    """A feature dataset folder (save_to_disk) or parquet file -> its conversations and the label names.

    With ``label_names`` (the training split's), a label outside them is an error naming the row; without, the
    names come from the ``label`` ClassLabel, else from the sorted distinct values.
    """
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
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: expected one split (a Dataset), found a DatasetDict with {list(ds)}")
    if len(ds) == 0:
        raise DataError(f"{path}: the feature dataset is empty")
    for column in ("dialogue_id", "turn", "label"):
        if column not in ds.column_names:
            raise DataError(f"{path}: column {column!r} is missing (have {ds.column_names})")
    if not any(m in ds.column_names for m in ("text_embeds", "audio_embeds")):
        raise DataError(f"{path}: neither text_embeds nor audio_embeds is present")
    feature = ds.features["label"]
    raw = ds["label"][:]

    def name_of(value):
        if value is None or (isinstance(value, int) and value < 0):
            return None
        return feature.names[value] if hasattr(feature, "names") else str(value)

    if label_names is None:
        if hasattr(feature, "names"):
            label_names = list(feature.names)
        else:
            label_names = sorted({name_of(v) for v in raw if name_of(v) is not None})
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for row, value in enumerate(raw):
        name = name_of(value)
        if name is None:
            ids.append(IGNORE_INDEX)
        elif name not in index:
            raise DataError(
                f"{path} row {row} (dialogue {ds[row]['dialogue_id']!r}, turn {ds[row]['turn']}): label {value!r} is "
                f"unknown to the training split (labels {label_names})"
            )
        else:
            ids.append(index[name])
    return feature_conversations(ds, path, ids), label_names


# ----------------------------------------------------------------------------------------------
# Encoders: tokenizer, speech inputs, model
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
    from ..data.demo import train_demo_tokenizer

    kind = "wordlevel" if corpus.name == "demo" else "bpe"
    tokenizer = train_demo_tokenizer(corpus.splits["train"].select_columns(["text"]), vocab_size=args.tokenizer_vocab_size, model=kind)
    tokenizer.model_max_length = args.max_text_length
    return tokenizer


def uses_acoustic_features(args: TrainingArguments) -> bool:
    """The speech head reads MeritsAcousticFeatureExtractor statistics (no speech backbone configured)."""
    return args.audio_features == "acoustic" and args.audio_config is None and args.audio_model_name_or_path is None


def cached_utterance_features(dataset, cache_file: Path, accelerator_state, compute, source: str, split: str,
                              description: str, missing=None) -> np.ndarray:
    """``compute(waveform_16khz, where)`` of every utterance of ``dataset``, stacked [N, ...] and cached in
    ``cache_file`` (computed on the main process; the others read the cache). An utterance without audio gets
    ``missing``, or a DataError naming it when ``missing`` is None."""
    from tqdm.auto import tqdm

    from ..data.audio import load_audio

    with accelerator_state.main_process_first():
        if cache_file.is_file():
            stacked = np.load(cache_file)
        else:
            rows = []
            view = dataset.select_columns(["dialogue_id", "turn", "audio"])
            for row in tqdm(view, total=len(view), desc=description,
                            disable=not accelerator_state.is_local_main_process):
                where = _where(source, split, row["dialogue_id"], row["turn"])
                if row["audio"] is None:
                    if missing is None:
                        raise DataError(f"{where}: no audio")
                    rows.append(missing)
                    continue
                try:
                    array = load_audio(row["audio"], 16000, source=where)
                except Exception as error:
                    raise DataError(f"{where}: cannot read its audio: {error}") from error
                rows.append(compute(array, where))
            stacked = np.stack(rows).astype(np.float32)
            if accelerator_state.is_main_process:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache_file, stacked)
    if stacked.shape[0] != len(dataset):
        raise DataError(f"{cache_file}: cached features do not match the split ({stacked.shape[0]} != {len(dataset)} turns)")
    return stacked


def add_acoustic_features(corpus: Corpus, cache_dir: Path, accelerator_state) -> "MeritsAcousticFeatureExtractor":
    """Add an ``audio_features`` column (acoustic statistics, None where a turn has no audio) to every split.

    The statistics are computed once per split on the main process and cached in ``cache_dir`` under the split's
    dataset fingerprint; they are normalised with the training split's mean and std, which the returned extractor
    carries, so the processor saved in ``best/`` computes exactly the training inputs from raw audio.
    """
    from ..feature_extraction_merits import MeritsAcousticFeatureExtractor

    extractor = MeritsAcousticFeatureExtractor()

    def statistics(array, where):
        features = extractor(array, sampling_rate=16000)["audio_features"][0]
        if not np.isfinite(features).all():
            raise DataError(f"{where}: its acoustic features hold NaN or inf (silent or corrupt audio?)")
        return features

    raw: dict[str, np.ndarray] = {}
    for split, dataset in corpus.splits.items():
        cache_file = Path(cache_dir) / f"acoustic_features_{split}_{dataset._fingerprint}.npy"
        stacked = cached_utterance_features(dataset, cache_file, accelerator_state, statistics, corpus.name, split,
                                            f"acoustic features [{split}]",
                                            missing=np.full(extractor.feature_size, np.nan, np.float32))
        raw[split] = stacked
    train = raw["train"][np.isfinite(raw["train"]).all(axis=1)]
    if len(train) < 2:
        raise DataError(f"{corpus.name} [train]: fewer than 2 turns with audio; cannot normalise the acoustic features")
    mean = train.mean(axis=0)
    std = np.maximum(train.std(axis=0), 1e-3)
    extractor.feature_mean, extractor.feature_std, extractor.do_normalize = mean.tolist(), std.tolist(), True
    for split, stacked in raw.items():
        normalised = (stacked - mean) / std
        column = [row.tolist() if np.isfinite(row).all() else None for row in normalised]
        dataset = corpus.splits[split]
        if "audio_features" in dataset.column_names:
            dataset = dataset.remove_columns("audio_features")
        corpus.splits[split] = dataset.add_column("audio_features", column)
    return extractor


def speech_feature_extractor(args: TrainingArguments, audio_config):
    """The feature extractor of a speech backbone (raw waveforms -> ``input_values`` / ``input_features``)."""
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    if args.audio_model_name_or_path:
        return AutoFeatureExtractor.from_pretrained(args.audio_model_name_or_path)
    if getattr(audio_config, "model_type", None) == "whisper":
        return WhisperFeatureExtractor(feature_size=audio_config.num_mel_bins)
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


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
    if args.text_encoder_init and use_text and text_embed_dim is None:
        return _model_from_stage0(args, kwargs, use_audio and audio_embed_dim is None)
    text_source = args.text_model_name_or_path if use_text and text_embed_dim is None else None
    audio_source = args.audio_model_name_or_path if use_audio and audio_embed_dim is None else None
    if text_source or audio_source:
        return MeritsForConversationClassification.from_backbones(
            text_model_name_or_path=text_source, audio_model_name_or_path=audio_source, **kwargs
        )
    return MeritsForConversationClassification(MeritsConfig(**kwargs))


def _model_from_stage0(args: TrainingArguments, kwargs: dict, use_audio_backbone: bool):
    """Stage I initialised from stage 0 (``text_encoder_init``: the Hub folder of a ``dataset: pseudo_labels`` run).

    The text encoder (backbone, pooling, projection) is copied; its classifier is new (the dataset's classes
    replace positive/negative/neutral), as is everything else.
    """
    from ..configuration_merits import MeritsConfig
    from ..modeling_merits import MeritsForConversationClassification

    stage0 = MeritsForConversationClassification.from_pretrained(args.text_encoder_init)
    if stage0.text_encoder is None:
        raise ValueError(f"text_encoder_init {args.text_encoder_init}: that model has no text encoder")
    kwargs = dict(kwargs, text_config=stage0.config.text_config)
    for key in ("text_pooling", "utterance_embed_dim", "text_layer_norm", "attentive_pooling_hidden_size"):
        kwargs.setdefault(key, getattr(stage0.config, key))
    if use_audio_backbone and args.audio_model_name_or_path:
        model = MeritsForConversationClassification.from_backbones(audio_model_name_or_path=args.audio_model_name_or_path, **kwargs)
    else:
        model = MeritsForConversationClassification(MeritsConfig(**kwargs))
    state = {k: v for k, v in stage0.text_encoder.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.text_encoder.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("classifier.")]:
        raise ValueError(f"text_encoder_init {args.text_encoder_init}: the text encoder does not match "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    logger.info("text encoder initialised from stage 0 (%s)", args.text_encoder_init)
    return model


def apply_lora(model, args: TrainingArguments):
    """LoRA (peft) on the text backbone for the utterance stage; merged back (:func:`merge_lora`) before saving."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules)
    model.text_encoder.backbone = get_peft_model(model.text_encoder.backbone, config)
    return model


def freeze_lora_base(model) -> None:
    """After ``freeze_for_stage("utterance")`` (which unfreezes the whole text encoder): freeze the backbone's own
    weights again so that only the LoRA adapters and the head (pooling, projection, classifier) train."""
    for name, parameter in model.text_encoder.backbone.named_parameters():
        if "lora_" not in name:
            parameter.requires_grad_(False)


def merge_lora(model):
    backbone = model.text_encoder.backbone if model.text_encoder is not None else None
    if backbone is not None and hasattr(backbone, "merge_and_unload"):
        model.text_encoder.backbone = backbone.merge_and_unload()
    return model


# ----------------------------------------------------------------------------------------------
# Stage plans
# ----------------------------------------------------------------------------------------------
def stage1_param_groups(args: TrainingArguments):
    """Stage I optimiser groups (``separate_speech_head_optimizer``): the speech head (everything of
    ``model.speech_encoder`` that trains) with ``speech_head:`` settings, the rest (text encoder, LoRA) with
    ``utterance:`` settings, as if the papers' separately trained models shared one data pass. None (one group) when
    the switch is off or when stage I trains only one of the two."""
    if not args.separate_speech_head_optimizer:
        return None

    def groups(model):
        speech = [p for p in (model.speech_encoder.parameters() if model.speech_encoder is not None else []) if p.requires_grad]
        speech_ids = {id(p) for p in speech}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in speech_ids]
        if not speech or not rest:
            return None
        return [(rest, args.utterance), (speech, args.speech_head)]

    return groups


def heads_for(stage: str, architecture: str, use_text: bool, use_audio: bool, experts=None) -> list[Head]:
    """The heads scored on validation in ``stage``; ``experts`` (mister-e ``config.experts``) limits the MoE's."""
    heads: list[Head] = []
    experts = ("speech", "text", "cross_modal") if experts is None else tuple(experts)
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
        if use_audio and "speech" in experts:
            heads.append(Head("speech_expert", "context_audio_logits", "audio_mask"))
        if use_text and "text" in experts:
            heads.append(Head("text_expert", "context_text_logits", "text_mask"))
        if use_text and use_audio and "cross_modal" in experts:
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
def embed_corpus(model, processor, corpus: Corpus, cache_dir: Path, run_dir: Path, use_text: bool, use_audio: bool,
                 state, batch_size: int, max_tokens: int | None) -> dict[str, list[list[dict]]]:
    """The embedding cache (:func:`merits.data.build_embedding_cache`) of every split, as conversations.

    The main process computes it first (the others then load it); ``run_dir/features.json`` names each split's
    feature-dataset folder (reusable with ``--train_features``).
    """
    from ..data import build_embedding_cache

    features, folders = {}, {}
    with state.main_process_first():
        for split, dataset in corpus.splits.items():
            embedded = build_embedding_cache(model, processor, dataset, cache_dir, batch_size=batch_size,
                                             use_text=use_text, use_audio=use_audio, max_tokens=max_tokens)
            folder = str(Path(embedded.cache_files[0]["filename"]).parent) if embedded.cache_files else str(cache_dir)
            folders[split] = folder
            features[split] = feature_conversations(embedded, f"embedding cache {folder} [{split}]")
    if state.is_main_process:
        (run_dir / "features.json").write_text(json.dumps(folders, indent=2))
    return features


def run_system(args: TrainingArguments, architecture: str, run_dir: Path, corpus: Corpus | None, cache_dir: Path,
               acoustic_extractor=None) -> dict:
    """Train every configured stage of ``architecture`` in ``run_dir``; returns its flat results."""
    from accelerate.utils import set_seed

    from ..processing_merits import MeritsProcessor
    from . import report
    from .model_card import write_best_model

    state = distributed_state()
    set_seed(args.seed)  # the initial weights of every stage: a resumed run rebuilds the same model
    stages = args.stages_for(architecture)
    results: dict[str, Any] = {}
    predictions: dict[str, Any] = {}
    processor = None
    stage1_collator = None
    use_text = "text" in args.modalities
    use_audio = "audio" in args.modalities

    if args.train_features is not None:
        train, label_names = load_feature_split(args.train_features)
        validation, _ = load_feature_split(args.validation_features, label_names)
        test = load_feature_split(args.test_features, label_names)[0] if args.test_features else None
        rows = [row for conversation in train for row in conversation]
        text_dims = {len(r["text_embeds"]) for r in rows if r.get("text_embeds") is not None}
        audio_dims = {len(r["audio_embeds"]) for r in rows if r.get("audio_embeds") is not None}
        use_text, use_audio = use_text and bool(text_dims), use_audio and bool(audio_dims)
        model = build_model(args, architecture, label_names, text_embed_dim=text_dims.pop() if use_text else None,
                            audio_embed_dim=audio_dims.pop() if use_audio else None, use_text=use_text, use_audio=use_audio)
        features = {"train": train, "validation": validation, "test": test}
        _check_feature_labels(features, label_names, args.train_features)
        dataset_name = Path(args.train_features).name
    else:
        label_names = corpus.label_names
        use_audio = use_audio and corpus.has_audio
        tokenizer = build_tokenizer(args, corpus, run_dir) if use_text else None
        acoustic = use_audio and uses_acoustic_features(args)
        extractor = acoustic_extractor if acoustic else None
        if acoustic and extractor is None:
            raise ValueError("the acoustic speech head needs add_acoustic_features(corpus, ...) first (run_training does it)")
        model = build_model(
            args, architecture, label_names, tokenizer=tokenizer,
            audio_feature_dim=extractor.feature_size if extractor is not None else None,
            use_text=use_text, use_audio=use_audio,
        )
        if use_audio and not acoustic:
            extractor = speech_feature_extractor(args, model.config.audio_config)
        processor = MeritsProcessor(tokenizer=tokenizer, feature_extractor=extractor, label2id=dict(model.config.label2id),
                                    max_length=args.max_text_length)
        if use_audio and not acoustic:  # raw waveforms through the speech backbone's feature extractor
            columns = ["dialogue_id", "turn", "label", "text", "audio"]
            stage1_collator = ConversationCollator(processor, use_text=use_text, use_audio=use_audio)
        else:  # text tokenised per batch, speech statistics precomputed in the `audio_features` column
            columns = ["dialogue_id", "turn", "label"] + (["text"] if use_text else []) + (["audio_features"] if use_audio else [])
            stage1_collator = FeatureCollator(tokenizer=tokenizer, max_length=args.max_text_length)
        features = None
        dataset_name = corpus.name

    for stage in stages:
        tag = STAGE_TAGS[stage]
        model_stage = "utterance" if stage == "pretrain" else stage
        heads = heads_for(stage, architecture, use_text, use_audio, getattr(model.config, "experts", None))
        if stage in ("pretrain", "utterance"):
            if corpus is None:
                raise ValueError(f"stage {stage!r} needs a corpus (not --train_features)")
            lora = args.use_lora and use_text
            if lora:
                apply_lora(model, args)
            items = {split: utterance_items(dataset, columns) for split, dataset in corpus.splits.items()}
            train_items = items["train"]
            if args.audio_train_crop_seconds and use_audio and isinstance(stage1_collator, ConversationCollator):
                train_items = RandomAudioCrop(train_items, args.audio_train_crop_seconds, seed=args.seed)
            plan = StagePlan(model_stage, tag, heads, train_items, items["validation"], items.get("test"),
                             stage1_collator, args.stage_arguments(stage), label_names,
                             after_freeze=freeze_lora_base if lora else None,
                             param_groups=stage1_param_groups(args) if stage == "utterance" else None)
            if (stage == "utterance" and use_text and args.text_head_init == "linear_probe"
                    and not StageCheckpoints(run_dir, tag).is_done()):  # a finished stage I is loaded, not refitted
                probe = init_text_head_from_probe(model, train_items, items["validation"], stage1_collator, label_names,
                                                  device=state.device, seed=args.seed)
                if state.is_main_process:
                    print(f"[{tag}] text head from a linear probe (C={probe['C']:g}): "
                          f"val text_weighted_f1={probe['validation_weighted_f1']:.4f}")
            stage_results, stage_predictions = run_stage(model, plan, args, run_dir)
            if lora:
                merge_lora(model)
        else:
            if features is None:
                features = embed_corpus(model, processor, corpus, cache_dir, run_dir, use_text, use_audio, state,
                                        args.embedding_batch_size, args.embedding_max_tokens)
            splits = features
            if stage == "fusion" and architecture == "merits-l":
                # §3.1: stage III fuses the exported stage II features c_i; the frozen context encoders run once
                splits = {split: export_context_features(model, conversations) for split, conversations in features.items()}
            plan = StagePlan(stage, tag, heads, splits["train"], splits["validation"], splits.get("test"),
                             FeatureCollator(), args.stage_arguments(stage), label_names)
            stage_results, stage_predictions = run_stage(model, plan, args, run_dir)
        results.update(stage_results)
        for split, per_head in (stage_predictions or {}).items():
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


def export_context_features(model, conversations: list[list[dict]], batch_size: int = 16) -> list[list[dict]]:
    """MERITS-L stage II features c_i of every turn (``model.get_context_features``, eval mode, frozen encoders):
    copies of the feature conversations whose rows also hold ``text_context_features`` / ``audio_context_features``,
    the inputs of stage III (the co-attention trains on them instead of recomputing the context encoders each step)."""
    collate = FeatureCollator(label_column=None)
    device = next(model.parameters()).device
    exported: list[list[dict]] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        features = {k: v.float().cpu().numpy() for k, v in model.get_context_features(**batch).items() if v is not None}
        for b, conversation in enumerate(chunk):
            exported.append([{**row, **{k: v[b, t] for k, v in features.items()}} for t, row in enumerate(conversation)])
    return exported


def run_training(args: TrainingArguments) -> dict:
    """``train.py``: every configured system, then ``all_results.json``, ``best/`` and the results table."""
    from . import report
    from .model_card import push_best_model

    state = distributed_state()
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    output_dir = Path(args.output_dir)
    options = args.to_dict()
    check_dataset_options(args)  # before anything is written: a typo must not leave a run folder behind
    prepare_output_dir(output_dir, options, args.resume, args.overwrite_output_dir, state.is_main_process,
                       barrier=state.wait_for_everyone, inputs=input_fingerprints(args))
    state.wait_for_everyone()
    if args.speaker_folds:
        from .speaker_folds import run_speaker_folds

        return run_speaker_folds(args, output_dir, state)

    corpus = None if args.train_features is not None else load_corpus(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    acoustic_extractor = None
    if corpus is not None and "audio" in args.modalities and corpus.has_audio and uses_acoustic_features(args):
        acoustic_extractor = add_acoustic_features(corpus, cache_dir, state)
    architectures = args.architectures()
    all_results: dict[str, Any] = {}
    per_system: dict[str, dict] = {}
    for architecture in architectures:
        run_dir = output_dir if len(architectures) == 1 else output_dir / architecture
        run_dir.mkdir(parents=True, exist_ok=True)
        per_system[architecture] = run_system(args, architecture, run_dir, corpus, cache_dir, acoustic_extractor)

    if len(architectures) == 1:
        chosen = architectures[0]
        all_results = per_system[chosen]
    else:
        for architecture, results in per_system.items():
            prefix = architecture.replace("-", "_")
            all_results.update({f"{prefix}_{k}": v for k, v in results.items()})
        # OUT/best: the system with the higher validation weighted F1 (validation alone selects)
        chosen = max(architectures, key=lambda a: per_system[a].get("validation_weighted_f1", -1.0))
        all_results["selected_architecture"] = chosen
        # the unprefixed keys are those of the model in OUT/best (validation_stage2_text_weighted_f1, ...), as for
        # a one-system run; each system's own keys keep their prefix (merits_l_..., mister_e_...)
        all_results.update(per_system[chosen])
        chosen_stages = args.stages_for(chosen)
        all_results.update(final_results(per_system[chosen], STAGE_TAGS[chosen_stages[-1]]))
        if state.is_main_process:
            import shutil

            best = output_dir / "best"
            if best.exists():
                shutil.rmtree(best)
            shutil.copytree(output_dir / chosen / "best", best)
    all_results["num_processes"] = state.num_processes
    if state.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(all_results, indent=2, sort_keys=True))
        table = report.results_table(per_system)
        (output_dir / "results.md").write_text(table + "\n")
        print(table)
        examples = report.write_examples(corpus, output_dir) if corpus is not None else None
        print(report.run_summary(output_dir, per_system, chosen, examples=examples, toy=args.dataset == "demo",
                                 logs=args.report_to == "tensorboard"), flush=True)
        if args.push_to_hub:
            print(f"Pushed {output_dir / 'best'} to {push_best_model(output_dir / 'best', args.hub_model_id)}")
    state.wait_for_everyone()
    return all_results
