# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""`ConversationEmotionRecognitionPipeline`: the task ``"conversation-emotion-recognition"``.

This file is shipped to the Hub next to the model (``custom_pipelines`` in ``config.json``), so it
imports only torch, numpy and transformers: it runs where the ``merits`` package is not installed.

```python
from transformers import pipeline

classifier = pipeline("conversation-emotion-recognition", model="path/or/repo", trust_remote_code=True)
classifier([
    {"text": "I got the job!", "audio": "turn0.wav"},
    {"text": "That is wonderful."},
    {"audio": waveform, "sampling_rate": 44100},   # transcribed when an ASR model is configured
])
# -> [{"label": "joy", "score": 0.91, "scores": {...}, "gate": {"speech": .., "text": .., "cross-modal": ..}}, ...]
```

Input: one conversation (a list of turns) or a list of conversations. A turn is a dict with
``text`` and/or ``audio`` (a file path, an array with ``sampling_rate``, or a ``{"array",
"sampling_rate"}`` / ``{"path"}`` dict as in `datasets`' Audio feature). Audio of any rate and any
number of channels is turned into 16 kHz mono. Feature-only models (no text or speech backbone)
take the precomputed utterance embeddings instead: ``text_embeds`` / ``audio_embeds`` per turn.

How the work is organised (the speed-ups measured by ``bench/bench_inference.py``):
- conversations are processed ``batch_size`` at a time;
- inside a batch, the utterances of all conversations are sorted by length and encoded in chunks
  of ``utterance_batch_size`` with padding trimmed to the longest utterance of the chunk, then the
  context encoders / fusion / gate run once on the padded conversation batch;
- everything runs under ``torch.inference_mode``; ``bf16=True`` adds ``torch.autocast`` in
  bfloat16 (useful on CPUs with AVX512-BF16/AMX, where it is faster; elsewhere it is emulated and slower, and the
  pipeline warns; probabilities are computed in float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

from .processing_merits import EXPERT_NAMES, TARGET_SAMPLING_RATE, MeritsProcessor, check_finite, load_turn_audio

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo;
    None where that file does not exist (not Linux: unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        return None
    return None


def _is_turn(value: Any) -> bool:
    return isinstance(value, dict)


def _is_conversation(value: Any) -> bool:
    """A conversation is a list of turn dicts (an empty list counts as an (invalid) conversation)."""
    return isinstance(value, (list, tuple)) and (len(value) == 0 or _is_turn(value[0]))


class ConversationEmotionRecognitionPipeline(Pipeline):
    """Emotion of every turn of a conversation from its speech and/or text.

    Extra arguments (at construction or per call):
        asr_model (`str`, `Pipeline` or callable, *optional*): transcribes turns that have audio but
            no text, when the model reads text. A string is loaded as a transformers
            ``"automatic-speech-recognition"`` pipeline (e.g. a Whisper checkpoint); a callable is
            called with ``{"raw": array, "sampling_rate": 16000}`` and returns a str or ``{"text": str}``.
        utterance_batch_size (`int`, defaults to 32): utterances per encoder call (sorted by length).
        bf16 (`bool`, defaults to False): run the model under bfloat16 autocast.
        group_by_length (`bool`, defaults to True): encode utterances in length-sorted chunks; False runs
            one plain ``model(**batch)`` per conversation batch.
        top_k (`int`, *optional*): keep only the k best classes in ``scores``.
        trust_remote_code (`bool`, *optional*, construction only): passed on when the pipeline loads the processor
            saved next to the model (a tokenizer or feature extractor whose config names a Python file runs that
            file only with ``True``). Default: ``True`` only when this pipeline class was itself loaded as remote
            code from the model's repository (``pipeline(..., trust_remote_code=True)``: the user trusted it);
            otherwise ``None``, transformers' default, which refuses such code.
    ``batch_size`` (conversations per model call, default 8) is the usual pipeline argument.
    """

    # The processor is loaded by __init__ from the model's folder (a sibling Hub file), not by `pipeline()`.
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False

    #: how messages name a turn (0-based indexes, as in the Python input); the `merits` CLI names input lines
    describe_turn = staticmethod(lambda conversation, turn: f"conversation {conversation}, turn {turn}")
    #: what a message about a text-only model and a turn without text tells the user to do
    asr_hint = "pass asr_model=... (e.g. a Whisper checkpoint) to transcribe its audio"

    def __init__(self, *args, trust_remote_code: bool | None = None, **kwargs):
        if trust_remote_code is None and __name__.startswith("transformers_modules."):
            # this class was itself loaded from the model's repository with trust_remote_code=True
            trust_remote_code = True
        self.trust_remote_code = trust_remote_code
        super().__init__(*args, **kwargs)
        self._asr_cache: dict[str, Any] = {}
        if self.processor is None:
            self.processor = self._load_model_processor()
        self._check_processor()

    def _load_model_processor(self) -> MeritsProcessor:
        """The `MeritsProcessor` saved next to the model; an empty one for feature-only models."""
        source = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", None)
        if source:
            try:
                return MeritsProcessor.from_pretrained(source, trust_remote_code=self.trust_remote_code)
            except OSError:
                pass  # no processor_config.json there
            except ValueError as error:
                if "trust_remote_code" not in str(error):
                    raise
                raise ValueError(
                    f"The processor saved with the model {source!r} names Python code of that folder (its tokenizer or "
                    "feature extractor config has an auto_map); it is not run unless you pass trust_remote_code=True "
                    f"(only for a folder you trust). ({error})"
                ) from None
        if self.reads_text or self.reads_speech:
            raise ValueError(
                f"No MeritsProcessor found for the model {source!r} (processor_config.json), and the model encodes "
                "raw text/speech; pass processor=MeritsProcessor(...) to the pipeline."
            )
        # A feature-only model: the empty processor still turns logits into labels.
        return MeritsProcessor(label2id=dict(self.model.config.label2id))

    def _check_processor(self) -> None:
        if self.reads_text and getattr(self.processor, "tokenizer", None) is None:
            raise ValueError("The model has a text encoder but the processor has no tokenizer.")
        if getattr(self.model.config, "audio_feature_dim", None) is not None and self.reads_speech and (
            getattr(self.processor, "feature_extractor", None) is None
        ):
            raise ValueError(
                "The model's speech head reads acoustic features (config.audio_feature_dim) but the processor has "
                "no feature extractor to compute them."
            )

    # -- parameters --------------------------------------------------------------------------
    def _sanitize_parameters(
        self, asr_model=None, utterance_batch_size=None, bf16=None, group_by_length=None, top_k=None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"ConversationEmotionRecognitionPipeline got unexpected arguments: {sorted(kwargs)}")
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if asr_model is not None:
            preprocess_params["asr_model"] = asr_model
        if utterance_batch_size is not None:
            if int(utterance_batch_size) < 1:
                raise ValueError(f"utterance_batch_size must be >= 1, got {utterance_batch_size}")
            forward_params["utterance_batch_size"] = int(utterance_batch_size)
        if bf16 is not None:
            forward_params["bf16"] = bool(bf16)
            if bf16 and self.device.type == "cpu" and cpu_has_native_bf16() is False:
                logger.warning_once(
                    "bf16=True on a CPU without AVX512-BF16 or AMX: bfloat16 is emulated there and runs slower than "
                    "float32 (0.37x in bench/bench_inference.py on an AVX2 CPU); leave bf16 off on this machine."
                )
        if group_by_length is not None:
            forward_params["group_by_length"] = bool(group_by_length)
        if top_k is not None:
            postprocess_params["top_k"] = int(top_k)
        return preprocess_params, forward_params, postprocess_params

    def get_inference_context(self):
        return torch.inference_mode

    # -- what the model reads ----------------------------------------------------------------
    @property
    def reads_text(self) -> bool:
        return getattr(self.model, "text_encoder", None) is not None

    @property
    def reads_speech(self) -> bool:
        return getattr(self.model, "speech_encoder", None) is not None

    @property
    def feature_only(self) -> bool:
        """No text or speech encoder: turns carry precomputed ``text_embeds`` / ``audio_embeds``.

        (A model with an encoder for one modality and precomputed embeddings for the other is served on its
        raw modality only: the other one counts as absent.)"""
        return not self.reads_text and not self.reads_speech

    @property
    def takes_text_embeds(self) -> bool:
        return not self.reads_text and getattr(self.model.config, "text_embed_dim", None) is not None

    @property
    def takes_audio_embeds(self) -> bool:
        return not self.reads_speech and getattr(self.model.config, "audio_embed_dim", None) is not None

    @property
    def target_sampling_rate(self) -> int:
        return int(getattr(self.processor, "audio_sampling_rate", TARGET_SAMPLING_RATE))

    # -- call ----------------------------------------------------------------------------------
    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        """Classify one conversation (a list of turn dicts) or a list of conversations.

        Returns a list with one dict per turn, or a list of those for a list of conversations.
        """
        single = _is_conversation(inputs)
        if single:
            conversations = [inputs]
        elif isinstance(inputs, (list, tuple)) and all(_is_conversation(c) for c in inputs):
            conversations = list(inputs)
        else:
            raise TypeError(
                "The input must be one conversation (a list of turn dicts such as {'text': ..., 'audio': ...}) "
                f"or a list of conversations; got {type(inputs).__name__}"
                + (f" of {type(inputs[0]).__name__}" if isinstance(inputs, (list, tuple)) and inputs else "")
            )
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        batch_size = int(batch_size or self._batch_size or 8)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        results = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            model_inputs = self.preprocess(chunk, first_index=start, **preprocess_params)
            model_outputs = self.forward(model_inputs, **forward_params)
            results.extend(self.postprocess(model_outputs, **postprocess_params))
        return results[0] if single else results

    # -- preprocess ------------------------------------------------------------------------------
    def _transcribe(self, asr_model, array: np.ndarray, where: str) -> str:
        if isinstance(asr_model, str):
            if asr_model not in self._asr_cache:
                from transformers import pipeline as make_pipeline

                self._asr_cache[asr_model] = make_pipeline(
                    "automatic-speech-recognition", model=asr_model, device=self.device
                )
            asr_model = self._asr_cache[asr_model]
        try:
            result = asr_model({"raw": array, "sampling_rate": self.target_sampling_rate})
        except Exception as error:
            raise RuntimeError(f"{where}: speech recognition failed: {error}") from error
        text = result.get("text") if isinstance(result, dict) else result
        if not isinstance(text, str):
            raise TypeError(f"{where}: the ASR model returned {type(result).__name__}, expected a str or {{'text': str}}.")
        return text.strip()

    def prepare_turn(self, turn: Any, where: str, asr_model=None) -> dict:
        if not isinstance(turn, dict):
            raise TypeError(f"{where}: a turn must be a dict with 'text' and/or 'audio', got {type(turn).__name__}.")
        text = turn.get("text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{where}: 'text' must be a string, got {type(text).__name__}.")
        if text is not None and not text.strip():
            text = None
        audio = turn.get("audio")
        text_embeds, audio_embeds = turn.get("text_embeds"), turn.get("audio_embeds")
        if text is None and audio is None and text_embeds is None and audio_embeds is None:
            raise ValueError(f"{where}: the turn has neither 'text' nor 'audio'.")

        prepared: dict[str, Any] = {"text": None, "audio": None, "text_embeds": None, "audio_embeds": None}
        if text_embeds is not None or audio_embeds is not None:
            if not self.feature_only:
                raise ValueError(f"{where}: this model encodes raw text/audio; pass 'text' and 'audio', not embeddings.")
            for key, expected in (("text_embeds", "text_embed_dim"), ("audio_embeds", "audio_embed_dim")):
                value = turn.get(key)
                if value is None:
                    continue
                vector = check_finite(value, f"'{key}'", where).reshape(-1)
                size = getattr(self.model.config, expected, None)
                if size is not None and vector.shape[0] != int(size):
                    raise ValueError(f"{where}: '{key}' has {vector.shape[0]} values, the model expects {size}.")
                prepared[key] = vector
            return prepared

        if audio is not None and (self.reads_speech or (text is None and self.reads_text)):
            prepared["audio"] = load_turn_audio(audio, turn.get("sampling_rate"), self.target_sampling_rate, where)
        if text is None and self.reads_text and prepared["audio"] is not None and asr_model is not None:
            text = self._transcribe(asr_model, prepared["audio"], where)
            text = text or None
        prepared["text"] = text if self.reads_text else None
        if not self.reads_speech:
            prepared["audio"] = None
        if prepared["text"] is None and prepared["audio"] is None:
            if self.reads_text and not self.reads_speech:
                raise ValueError(f"{where}: this model reads text only and the turn has no text; {self.asr_hint}.")
            if self.reads_speech and not self.reads_text:
                raise ValueError(f"{where}: this model reads speech only and the turn has no audio.")
            raise ValueError(
                f"{where}: this model takes precomputed embeddings ('text_embeds'/'audio_embeds' per turn); "
                "it has no text or speech encoder."
            )
        return prepared

    def preprocess(self, conversations, first_index: int = 0, asr_model=None):
        prepared_conversations = []
        for offset, conversation in enumerate(conversations):
            index = first_index + offset
            if not _is_conversation(conversation):
                raise TypeError(f"conversation {index}: expected a list of turn dicts, got {type(conversation).__name__}.")
            if len(conversation) == 0:
                raise ValueError(f"conversation {index} is empty: it needs at least one turn.")
            prepared_conversations.append(
                [self.prepare_turn(turn, self.describe_turn(index, t), asr_model) for t, turn in enumerate(conversation)]
            )

        return {"batch": self.batch_from_prepared(prepared_conversations, first_index)}

    def batch_from_prepared(self, prepared_conversations: list, first_index: int = 0) -> dict:
        """The model batch (docs/design.md §2) of conversations whose turns went through `prepare_turn`."""
        if self.feature_only:
            return self._embedding_batch(prepared_conversations, first_index)
        processor_conversations = [
            [{"text": turn["text"], "audio": turn["audio"]} for turn in conversation]
            for conversation in prepared_conversations
        ]
        batch = self.processor(
            conversations=processor_conversations, sampling_rate=self.target_sampling_rate, return_tensors="pt"
        )
        return dict(batch)

    def _embedding_batch(self, conversations, first_index: int) -> dict:
        """Pad per-turn precomputed embeddings into ``text_embeds`` / ``audio_embeds`` [B, T, D]."""
        num_turns = max(len(c) for c in conversations)
        batch_size = len(conversations)
        turn_mask = torch.zeros(batch_size, num_turns, dtype=torch.long)
        batch: dict[str, torch.Tensor] = {"turn_mask": turn_mask}
        for key, mask_key, size_key in (
            ("text_embeds", "text_mask", "text_embed_dim"),
            ("audio_embeds", "audio_mask", "audio_embed_dim"),
        ):
            size = getattr(self.model.config, size_key, None)
            if size is None or (key == "text_embeds" and not self.takes_text_embeds) or (
                key == "audio_embeds" and not self.takes_audio_embeds
            ):
                continue
            values = torch.zeros(batch_size, num_turns, int(size))
            mask = torch.zeros(batch_size, num_turns, dtype=torch.long)
            for b, conversation in enumerate(conversations):
                for t, turn in enumerate(conversation):
                    if turn[key] is not None:
                        values[b, t] = torch.from_numpy(turn[key])
                        mask[b, t] = 1
            if mask.any():
                batch[key] = values
                batch[mask_key] = mask
        for b, conversation in enumerate(conversations):
            turn_mask[b, : len(conversation)] = 1
            for t, turn in enumerate(conversation):
                if turn["text_embeds"] is None and turn["audio_embeds"] is None:
                    raise ValueError(f"{self.describe_turn(first_index + b, t)}: no embedding for this model.")
        return batch

    # -- forward -------------------------------------------------------------------------------
    def _encode_utterances_by_length(self, batch: dict, utterance_batch_size: int) -> dict:
        """Stage I utterance embeddings of every real turn, encoded in length-sorted chunks.

        Returns ``text_embeds`` / ``audio_embeds`` [B, T, D] (zeros at padding and where a turn lacks the
        modality) for the modalities the model encodes from raw inputs. Sorting by length keeps the padding
        inside a chunk small; each chunk is cut to the longest utterance it holds.
        """
        turn_mask = batch["turn_mask"].bool()
        embeds: dict[str, torch.Tensor] = {}
        routes = []
        if self.reads_text and "input_ids" in batch:
            routes.append(("text", "input_ids", "attention_mask", "text_mask", True))
        if self.reads_speech and "input_values" in batch:
            routes.append(("audio", "input_values", "audio_attention_mask", "audio_mask", True))
        elif self.reads_speech and "input_features" in batch:
            # Whisper-style log-mel inputs have a fixed length: chunked, not trimmed.
            routes.append(("audio", "input_features", "audio_attention_mask", "audio_mask", False))
        for modality, value_key, mask_key, modality_mask_key, trim in routes:
            values, mask = batch[value_key], batch.get(mask_key)
            present = batch.get(modality_mask_key, batch["turn_mask"])[turn_mask].bool()
            if trim:
                if mask is None:
                    mask = torch.ones(values.shape[:2], dtype=torch.long, device=values.device)
                lengths = mask.sum(-1)
                order = torch.argsort(lengths, descending=True, stable=True)
            else:
                order = torch.arange(values.shape[0], device=values.device)
            order = order[present[order]]  # turns without this modality are not encoded (they stay zero)
            flat = None
            for start in range(0, order.numel(), utterance_batch_size):
                index = order[start : start + utterance_batch_size]
                kwargs = {}
                if trim:
                    width = int(lengths[index].max().clamp(min=1))
                    kwargs[value_key], kwargs[mask_key] = values[index, :width], mask[index, :width]
                else:
                    kwargs[value_key] = values[index]
                    if mask is not None:
                        kwargs[mask_key] = mask[index]
                chunk = self.model.get_utterance_embeddings(**kwargs)[modality]
                if flat is None:
                    flat = chunk.new_zeros(values.shape[0], chunk.shape[-1])
                flat[index] = chunk.to(flat.dtype)
            if flat is not None:
                padded = flat.new_zeros(*turn_mask.shape, flat.shape[-1])
                padded[turn_mask] = flat
                embeds[f"{modality}_embeds"] = padded
        if self.reads_speech and "audio_features" in batch:
            flat = self.model.get_utterance_embeddings(
                audio_features=batch["audio_features"], turn_mask=batch["turn_mask"]
            )["audio"]
            padded = flat.new_zeros(*turn_mask.shape, flat.shape[-1])
            padded[turn_mask] = flat
            embeds["audio_embeds"] = padded
        return embeds

    def _forward(self, model_inputs, utterance_batch_size: int = 32, bf16: bool = False, group_by_length: bool = True):
        batch = model_inputs["batch"]
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bool(bf16))
        raw = "input_ids" in batch or "input_values" in batch or "input_features" in batch or "audio_features" in batch
        with autocast:
            if raw and group_by_length and self.model.config.stage != "utterance":
                forward_kwargs = {key: batch[key] for key in ("turn_mask", "text_mask", "audio_mask") if key in batch}
                forward_kwargs.update(self._encode_utterances_by_length(batch, utterance_batch_size))
            else:
                # Stage I models classify from the utterance encoders' own heads: one plain forward.
                forward_kwargs = dict(batch)
            # a modality with no input in the whole batch is absent at every turn: the model handles it itself
            outputs = self.model(**forward_kwargs)
        result = {"logits": outputs.logits.float(), "turn_mask": batch["turn_mask"]}
        gate = getattr(outputs, "gate_weights", None)
        if gate is not None:
            result["gate_weights"] = gate.float()
        return result

    # -- postprocess -----------------------------------------------------------------------------
    def postprocess(self, model_outputs, top_k: int | None = None):
        logits, turn_mask = model_outputs["logits"], model_outputs["turn_mask"].bool()
        bad = ~torch.isfinite(logits).all(-1) & turn_mask
        if bad.any():
            # never hand out NaN scores: inputs are checked, so this is the model's own weights or arithmetic
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{self.describe_turn(b, t)} (of this batch): the model produced NaN/inf scores from finite inputs; "
                "its weights are likely corrupt (check the model files)."
            )
        conversations = self.processor.postprocess(
            model_outputs["logits"],
            model_outputs["turn_mask"],
            id2label=self.model.config.id2label,
            gate_weights=model_outputs.get("gate_weights"),
            expert_names=EXPERT_NAMES,
        )
        if top_k is not None:
            for turns in conversations:
                for turn in turns:
                    best = sorted(turn["scores"].items(), key=lambda item: -item[1])[:top_k]
                    turn["scores"] = dict(best)
        return conversations


__all__ = ["ConversationEmotionRecognitionPipeline"]
