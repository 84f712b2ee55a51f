"""The embedding cache (api.md §5): Stage I utterance embeddings computed once, reused by Stages II/III.

:func:`build_embedding_cache` runs ``model.get_utterance_embeddings`` over every utterance of a
conversation dataset and stores a *feature dataset* (one row per utterance: ``dialogue_id``,
``turn``, ``label``, ``text_embeds``, ``audio_embeds``) with ``save_to_disk`` under
``cache_dir/<fingerprint>/``. The fingerprint hashes

* the utterance encoders' weights (``model.text_encoder`` and ``model.speech_encoder``, or the
  whole model when it has neither),
* the model config without the keys that do not affect Stage I (context, fusion, gate, loss and
  optimisation settings),
* the processor's configuration and which modalities are embedded,
* the dataset's own fingerprint (``Dataset._fingerprint``),

so a rerun with the same encoder and data loads the saved dataset without running the model, and a
changed encoder (e.g. after Stage I training) recomputes it. Computation is resumable: utterances
are sorted by length, batched, and written in chunks under ``cache_dir/<fingerprint>.partial/``; an
interrupted run continues from the last finished chunk.

Batches (:func:`length_batches`): utterances sorted by length (text tokens + speech frames), cut into batches of at
most ``batch_size`` utterances and, with ``max_tokens``, at most ``max_tokens`` padded positions (rows x the longest
row): short utterances go in large batches, long ones in small ones, so the matrix products stay large while padding
stays small.

A dataset with an ``audio_features`` column (precomputed speech-head inputs: acoustic statistics, CARE
layer stacks) is embedded from that column (text tokenised by the processor's tokenizer) instead of
decoding its audio.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from .audio import audio_duration, load_audio
from .collate import FeatureCollator

logger = logging.getLogger("merits.data")

CACHE_FORMAT_VERSION = 1
#: Config keys (substrings) that do not change Stage I embeddings.
NON_STAGE1_CONFIG_KEYS = (
    "context", "fusion", "gate", "supcon", "kl_", "focal", "stage", "learning_rate", "epoch", "batch", "causal",
    "expert", "transformers_version", "_name_or_path", "dtype", "co_attention", "moe", "loss",
)


def _hash_module(module: torch.nn.Module, digest) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def _stage1_config(model) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {key: value for key, value in values.items() if not any(part in key for part in NON_STAGE1_CONFIG_KEYS)}


def _processor_description(processor) -> str:
    for method in ("to_json_string", "to_dict"):
        if hasattr(processor, method):
            try:
                value = getattr(processor, method)()
                return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            except Exception:  # some processors cannot serialise every attribute; fall back to repr
                pass
    return repr(processor)


def embedding_cache_fingerprint(model, processor, dataset: datasets.Dataset, use_text: bool = True, use_audio: bool = True) -> str:
    """The cache key of ``dataset`` embedded by ``model`` (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(f"merits-embedding-cache-v{CACHE_FORMAT_VERSION}|text={use_text}|audio={use_audio}".encode())
    encoders = [getattr(model, name) for name in ("text_encoder", "speech_encoder") if getattr(model, name, None) is not None]
    for module in encoders or [model]:
        digest.update(type(module).__name__.encode())
        _hash_module(module, digest)
    digest.update(json.dumps(_stage1_config(model), sort_keys=True, default=str).encode())
    digest.update(_processor_description(processor).encode())
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError("the dataset has no fingerprint (build it with the datasets library)")
    digest.update(str(fingerprint).encode())
    return digest.hexdigest()[:32]


#: Speech frames per second of audio in the length used to sort and budget batches (wav2vec2/WavLM/HuBERT: 20 ms
#: frames; Whisper's encoder runs the same 50 per second).
AUDIO_FRAMES_PER_SECOND = 50


def _audio_frames(audio) -> float:
    try:
        return AUDIO_FRAMES_PER_SECOND * audio_duration(audio)
    except Exception:  # unreadable audio fails with a clear message when it is decoded
        return 0.0


def _text_lengths(texts, tokenizer) -> np.ndarray:
    """Token counts of ``texts`` (None/blank -> 0) with ``tokenizer``; ~4 characters per token without one."""
    texts = [text if text and text.strip() else "" for text in texts]
    if tokenizer is None:
        return np.asarray([-(-len(text) // 4) for text in texts], dtype=np.float64)
    present = [i for i, text in enumerate(texts) if text]
    lengths = np.zeros(len(texts), dtype=np.float64)
    if present:
        encoded = tokenizer([texts[i] for i in present], add_special_tokens=True)["input_ids"]
        lengths[present] = [len(ids) for ids in encoded]
    return lengths


def length_batches(lengths, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """The batches of the embedding cache: indices sorted by ``lengths`` (stable), cut into consecutive batches of at
    most ``batch_size`` items and, when ``max_tokens`` is set, at most ``max_tokens`` padded positions (items x the
    longest item; an item longer than ``max_tokens`` gets a batch of its own).

    The cut is the one with the fewest batches (the largest matrix products) and, among those, the fewest padded
    positions (dynamic programming over the sorted lengths, O(len(lengths) * batch_size)).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None), got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
    order = np.argsort(lengths, kind="stable")
    if max_tokens is None:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    ordered = lengths[order].tolist()
    count = len(ordered)
    # best[j] = (batches, padded positions) covering the first j sorted items; start[j] = where its last batch starts
    best, start = [(0, 0.0)] + [None] * count, [0] * (count + 1)
    for j in range(1, count + 1):
        longest = ordered[j - 1]
        for i in range(j - 1, max(j - batch_size, 0) - 1, -1):
            rows = j - i
            if rows > 1 and rows * longest > max_tokens:
                break  # more rows only add positions
            candidate = (best[i][0] + 1, best[i][1] + rows * longest)
            if best[j] is None or candidate < best[j]:
                best[j], start[j] = candidate, i
    batches, j = [], count
    while j > 0:
        batches.append(order[start[j] : j])
        j = start[j]
    return batches[::-1]


def _list_column(matrix: np.ndarray, present: np.ndarray) -> pa.Array:
    """A ``list<float>`` Arrow column from [N, D] rows, null where ``present`` is False."""
    lengths = np.where(present, matrix.shape[1], 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = matrix[present].reshape(-1).astype(np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()), mask=pa.array(~present))


def _embed_batch(model, batch, accepted, takes_kwargs, device, num_rows: int, outputs: dict) -> None:
    """``model.get_utterance_embeddings`` of one batch of 1-turn conversations, appended to ``outputs``."""
    kwargs = {key: (value.to(device) if hasattr(value, "to") else value) for key, value in batch.items()
              if key != "labels" and (takes_kwargs or key in accepted)}
    with torch.inference_mode():
        embeddings = model.get_utterance_embeddings(**kwargs)
    for modality, mask_key in (("text", "text_mask"), ("audio", "audio_mask")):
        value = embeddings.get(modality)
        if value is None:
            outputs[modality].append(None)
            continue
        present = batch[mask_key].reshape(-1).bool().cpu().numpy() if mask_key in batch else np.ones(num_rows, bool)
        outputs[modality].append((value.float().cpu().numpy(), present))


def _embed_split(model, processor, dataset, partial_dir: Path, batch_size: int, use_text: bool, use_audio: bool,
                 chunk_size: int, sampling_rate: int, max_tokens: int | None = None) -> datasets.Dataset:
    # precomputed speech-head inputs (an `audio_features` column: acoustic statistics, CARE layer stacks) are used
    # as they are instead of decoding the audio again
    precomputed = use_audio and "audio_features" in dataset.column_names
    audio_column = "audio_features" if precomputed else "audio"
    columns = [c for c in ("text", audio_column) if c in dataset.column_names and ((c == "text" and use_text) or (c == audio_column and use_audio))]
    if not columns:
        raise ValueError(f"nothing to embed: the dataset has columns {dataset.column_names} (use_text={use_text}, use_audio={use_audio})")
    inputs_view = dataset.select_columns(columns)
    tokenizer = getattr(processor, "tokenizer", None) if use_text else None
    lengths = (_text_lengths(inputs_view["text"], tokenizer) if "text" in columns else np.zeros(len(dataset)))
    if precomputed:
        collator = FeatureCollator(label_column=None, tokenizer=processor.tokenizer if use_text else None,
                                   max_length=getattr(processor, "max_length", None))
    elif audio_column in columns:
        # row by row: reading the whole audio column at once would hold every waveform in memory
        lengths = lengths + np.asarray([_audio_frames(row[audio_column]) if row[audio_column] is not None else 0.0
                                        for row in inputs_view.select_columns([audio_column])])
    order = np.argsort(lengths, kind="stable")
    dialogue_ids, turns_column = dataset["dialogue_id"][:], dataset["turn"][:]  # plain lists: no Arrow read per row
    accepted = set(inspect.signature(model.get_utterance_embeddings).parameters)
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.get_utterance_embeddings).parameters.values())
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    partial_dir.mkdir(parents=True, exist_ok=True)
    # chunks made with another order or chunking (other chunk_size, length rule, batch layout) cannot be resumed
    # chunk by chunk: the resume manifest (merits.resume) records them, and a mismatch recomputes every chunk
    from ..resume import check_manifest, fingerprint_value

    stale = sorted(partial_dir.glob("chunk_*.npz"))
    resumable = check_manifest(
        partial_dir / "resume.json", "embedding cache",
        inputs={"dataset": str(getattr(dataset, "_fingerprint", None)), "order": fingerprint_value(order.tolist())},
        settings={"chunk_size": chunk_size, "batch_size": batch_size, "max_tokens": max_tokens,
                  "sampling_rate": sampling_rate, "use_text": use_text, "use_audio": use_audio},
        has_output=bool(stale), on_mismatch="redo",
    )
    if stale and not resumable:
        logger.warning("embedding cache: %d chunk(s) in %s were made with other settings; recomputing them",
                       len(stale), partial_dir)
        for path in stale:
            path.unlink()
    num_chunks = (len(order) + chunk_size - 1) // chunk_size
    was_training = model.training
    model.eval()
    try:
        for chunk in range(num_chunks):
            chunk_path = partial_dir / f"chunk_{chunk:05d}.npz"
            if chunk_path.is_file():
                continue
            indices = order[chunk * chunk_size : (chunk + 1) * chunk_size]
            outputs = {"text": [], "audio": []}
            for positions in length_batches(lengths[indices], batch_size, max_tokens):
                batch_indices = indices[np.sort(positions)]
                rows = inputs_view[batch_indices.tolist()]
                if precomputed:
                    conversations_ = []
                    for position, index in enumerate(batch_indices):
                        row = {key: rows[key][position] for key in columns}
                        if not (row.get("text") or "").strip() and row.get("audio_features") is None:
                            raise ValueError(f"row {int(index)} (dialogue {dialogue_ids[index]!r}, turn {turns_column[index]}): "
                                             "nothing to embed (no text and no audio_features)")
                        conversations_.append([dict(row, dialogue_id=dialogue_ids[index], turn=turns_column[index])])
                    batch = collator(conversations_)
                    _embed_batch(model, batch, accepted, takes_kwargs, device, len(batch_indices), outputs)
                    continue
                turns = []
                for position, index in enumerate(batch_indices):
                    where = f"row {int(index)} (dialogue {dialogue_ids[index]!r}, turn {turns_column[index]})"
                    text = rows["text"][position] if "text" in rows else None
                    audio = rows["audio"][position] if "audio" in rows else None
                    if audio is not None:
                        audio = load_audio(audio, sampling_rate=sampling_rate, source=where)
                    if not (text and text.strip()) and audio is None:
                        raise ValueError(f"{where}: nothing to embed (no text and no audio)")
                    turns.append([{"text": text if text and text.strip() else None, "audio": audio}])
                batch = processor(conversations=turns, sampling_rate=sampling_rate, return_tensors="pt")
                _embed_batch(model, batch, accepted, takes_kwargs, device, len(batch_indices), outputs)
            arrays = {"indices": indices}
            for modality in ("text", "audio"):
                parts = outputs[modality]
                if parts and all(part is not None for part in parts):
                    arrays[modality] = np.concatenate([p[0] for p in parts])
                    arrays[f"{modality}_present"] = np.concatenate([p[1] for p in parts])
                    rows_ = np.nonzero(arrays[f"{modality}_present"] & ~np.isfinite(arrays[modality]).all(axis=1))[0]
                    if rows_.size:
                        index = int(indices[rows_[0]])  # outputs are stored in the order of `indices`
                        raise ValueError(
                            f"row {index} (dialogue {dialogue_ids[index]!r}, turn {turns_column[index]}): the {modality} "
                            "encoder produced NaN/inf embeddings from finite inputs (corrupt weights, or an overflow "
                            "under bf16?)"
                        )
            temporary = chunk_path.with_suffix(".tmp.npz")
            np.savez(temporary, **arrays)
            temporary.rename(chunk_path)
            logger.info("embedding cache: chunk %d/%d done", chunk + 1, num_chunks)
    finally:
        model.train(was_training)

    vectors: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for chunk in range(num_chunks):
        with np.load(partial_dir / f"chunk_{chunk:05d}.npz") as data:
            indices = data["indices"]
            for modality in ("text", "audio"):
                if modality not in data:
                    continue
                if modality not in vectors:
                    vectors[modality] = np.zeros((len(dataset), data[modality].shape[1]), np.float32)
                    present[modality] = np.zeros(len(dataset), bool)
                vectors[modality][indices] = data[modality]
                present[modality][indices] = data[f"{modality}_present"]
    keep = [c for c in ("dialogue_id", "turn", "label") if c in dataset.column_names]
    base = dataset.select_columns(keep)
    table = base.data.table if base._indices is None else base.flatten_indices().data.table
    features = dict(base.features)
    for modality in ("text", "audio"):
        if modality in vectors:
            table = table.append_column(f"{modality}_embeds", _list_column(vectors[modality], present[modality]))
            features[f"{modality}_embeds"] = datasets.List(datasets.Value("float32"))
    features = datasets.Features(features)
    return datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))


def build_embedding_cache(model, processor, dataset, cache_dir, batch_size: int = 32, use_text: bool = True,
                          use_audio: bool = True, chunk_size: int = 1024, sampling_rate: int = 16000,
                          max_tokens: int | None = 8192):
    """Stage I embeddings of every utterance of ``dataset`` as a feature dataset, cached on disk.

    Args:
        model: a ``MeritsForConversationClassification`` (anything with ``get_utterance_embeddings``).
        processor: the ``MeritsProcessor`` that prepares its raw inputs.
        dataset: a conversation ``Dataset`` or ``DatasetDict`` (schema of :mod:`merits.data.schema`).
        cache_dir: the cache folder; each (encoder, data) pair gets ``cache_dir/<fingerprint>/``.
        batch_size: at most this many utterances per forward pass (sorted by length to limit padding).
        max_tokens: at most this many padded positions (utterances x the longest one's text tokens + speech frames
            at 50 per second) per forward pass; None for fixed ``batch_size`` batches. See :func:`length_batches`.
        use_text, use_audio: which modalities to embed.
        chunk_size: utterances per resumable chunk.

    Returns:
        A ``Dataset`` (or ``DatasetDict``, matching the input) with ``dialogue_id``, ``turn``, ``label``
        and ``text_embeds`` / ``audio_embeds`` (a list of floats, None where the turn lacks it), loaded
        from disk.
    """
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({
            split: build_embedding_cache(model, processor, part, cache_dir, batch_size, use_text, use_audio, chunk_size, sampling_rate,
                                         max_tokens)
            for split, part in dataset.items()
        })
    if not hasattr(model, "get_utterance_embeddings"):
        raise TypeError(f"{type(model).__name__} has no get_utterance_embeddings method")
    cache_dir = Path(cache_dir)
    fingerprint = embedding_cache_fingerprint(model, processor, dataset, use_text, use_audio)
    target = cache_dir / fingerprint
    if (target / "cache_info.json").is_file():
        logger.info("embedding cache: reusing %s", target)
        return datasets.load_from_disk(str(target))
    features = _embed_split(model, processor, dataset, cache_dir / f"{fingerprint}.partial", batch_size, use_text, use_audio,
                            chunk_size, sampling_rate, max_tokens)
    staging = cache_dir / f"{fingerprint}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    features.save_to_disk(str(staging))
    info = {"fingerprint": fingerprint, "rows": len(features), "dataset_fingerprint": dataset._fingerprint,
            "columns": features.column_names, "format_version": CACHE_FORMAT_VERSION}
    (staging / "cache_info.json").write_text(json.dumps(info, indent=2))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    shutil.rmtree(cache_dir / f"{fingerprint}.partial", ignore_errors=True)
    logger.info("embedding cache: wrote %d rows to %s", len(features), target)
    return datasets.load_from_disk(str(target))
