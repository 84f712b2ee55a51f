# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""Turn-by-turn emotion recognition for a live conversation.

```python
from merits.streaming import ConversationStream

stream = ConversationStream(model, processor)          # model.config.causal must be True
stream.add_turn(text="Hi, how was the interview?")     # -> {"label": ..., "score": ..., "scores": {...}}
stream.add_turn(text="I got the job!", audio="turn1.wav")
```

Each call encodes only the new utterance and advances the model's streaming state
(`model.init_stream_state()` / `model.stream_step()`: the GRU hidden states, convolution windows
and attention keys/values of the earlier turns are reused), so a turn costs the same at turn 50 as
at turn 1. The prediction for a turn uses only the turns so far and equals the full forward of
the causal model over the conversation up to that turn.

Turns are prepared exactly as the pipeline prepares them (same audio decoding, resampling,
optional ASR and error messages): :class:`ConversationStream` reuses
:class:`merits.pipeline_merits.ConversationEmotionRecognitionPipeline`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from merits.pipeline_merits import ConversationEmotionRecognitionPipeline
from merits import register as _register

_register()  # the Auto classes resolve merits folders in-process


class ConversationStream:
    """One live conversation fed turn by turn to a causal MERITS-L / MiSTER-E model.

    Args:
        model: a `MeritsForConversationClassification` built with ``config.causal=True``.
        processor: its `MeritsProcessor` (loaded from the model folder when None; feature-only models
            need none and take ``text_embeds`` / ``audio_embeds`` per turn).
        asr_model: optional ASR (as for the pipeline) that transcribes turns given without text.
        bf16: run under bfloat16 autocast.
        trust_remote_code: passed on when the processor is loaded from the model's folder (code named by its
            tokenizer / feature extractor config runs only with ``True``); default None refuses such code.
    """

    def __init__(self, model, processor=None, asr_model=None, bf16: bool = False, trust_remote_code: bool | None = None):
        if not getattr(model.config, "causal", False):
            raise ValueError(
                "ConversationStream needs a causal model (config.causal=True: unidirectional GRUs, left-only "
                "convolutions, causal attention); this model looks at future turns, so a turn's prediction would "
                "change as the conversation goes on. Train or build the model with MeritsConfig(causal=True, ...)."
            )
        device = next(model.parameters()).device
        self.pipeline = ConversationEmotionRecognitionPipeline(
            model=model, processor=processor, device=device, task="conversation-emotion-recognition",
            trust_remote_code=trust_remote_code,
        )
        self.model = self.pipeline.model
        self.model.eval()
        self.asr_model = asr_model
        self.bf16 = bool(bf16)
        self.reset()

    def reset(self) -> None:
        """Start a new conversation."""
        self.state = self.model.init_stream_state(batch_size=1)
        self.predictions: list[dict] = []
        self.latencies: list[float] = []  # seconds per add_turn call

    @property
    def num_turns(self) -> int:
        return len(self.predictions)

    def _step_inputs(self, batch: dict) -> dict:
        """One-turn model batch ([1, 1] conversation layout) -> the keyword arguments of `stream_step`."""
        inputs: dict[str, Any] = {}
        if self.pipeline.reads_text and "input_ids" in batch:
            inputs["input_ids"], inputs["attention_mask"] = batch["input_ids"], batch.get("attention_mask")
        if self.pipeline.reads_speech:
            for key in ("input_values", "input_features", "audio_attention_mask"):
                if key in batch:
                    inputs[key] = batch[key]
            if "audio_features" in batch:
                inputs["audio_features"] = batch["audio_features"][:, 0]  # [1, T=1, ...] -> [1, ...]
        for key in ("text_embeds", "audio_embeds"):
            if key in batch:
                inputs[key] = batch[key][:, 0]
        for key in ("text_mask", "audio_mask"):
            if key in batch:
                inputs[key] = batch[key][:, 0]
        return inputs

    def add_turn(self, text: str | None = None, audio: Any = None, sampling_rate: int | None = None, **embeds) -> dict:
        """Add the next turn and return its prediction (``label``, ``score``, ``scores``, and ``gate`` for
        mister-e), computed from the turns so far. ``audio`` is a path or an array (with ``sampling_rate``);
        feature-only models take ``text_embeds=`` / ``audio_embeds=`` instead."""
        unknown = set(embeds) - {"text_embeds", "audio_embeds"}
        if unknown:
            raise TypeError(f"add_turn got unexpected arguments: {sorted(unknown)}")
        start = time.perf_counter()
        where = f"turn {self.num_turns}"
        turn = {"text": text, "audio": audio, "sampling_rate": sampling_rate, **embeds}
        prepared = self.pipeline.prepare_turn(turn, where, self.asr_model)
        batch = self.pipeline.batch_from_prepared([[prepared]])
        batch = self.pipeline._ensure_tensor_on_device(batch, self.pipeline.device)
        autocast = torch.autocast(device_type=self.pipeline.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), autocast:
            logits, gate_weights, new_state = self.model.stream_step(self.state, **self._step_inputs(batch))
        self.state = new_state
        prediction = self.pipeline.processor.postprocess(
            logits.float()[:, None],
            torch.ones(1, 1, dtype=torch.bool),
            id2label=self.model.config.id2label,
            gate_weights=None if gate_weights is None else gate_weights.float()[:, None],
        )[0][0]
        self.predictions.append(prediction)
        self.latencies.append(time.perf_counter() - start)
        return prediction

    def __len__(self) -> int:
        return self.num_turns


__all__ = ["ConversationStream"]
