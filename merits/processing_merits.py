# coding=utf-8
# Copyright 2025 The merits authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Processor class for MERITS-L / MiSTER-E: turns conversations (lists of turns with text and/or audio) into the
conversation batches the models read (docs/design.md section 2).

This file is shipped to the Hugging Face Hub as remote code: it imports only torch, transformers, numpy and its
sibling files. Audio files are decoded with `soundfile`, imported lazily so that text-only users do not need it.
"""

import inspect
import json
import math
import os
from typing import Any, Optional, Union

import numpy as np
import torch

from transformers import AutoFeatureExtractor, AutoTokenizer
from transformers.dynamic_module_utils import custom_object_save
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME, cached_file, logging

from .feature_extraction_merits import MeritsAcousticFeatureExtractor


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
TARGET_SAMPLING_RATE = 16000
EXPERT_NAMES = ("speech", "text", "cross-modal")

# Keys of a feature extractor's output that hold one vector (or layer stack) per utterance and are therefore laid
# out per conversation ([B, T, ...]) instead of flattened over real turns ([N, ...]); see docs/design.md section 2.
CONVERSATION_LEVEL_AUDIO_KEYS = ("audio_features",)

# Hub-side keyword arguments understood by `cached_file` / `from_pretrained` of the sub-processors.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")

# Keyword arguments of `MeritsProcessor.__init__` that `from_pretrained` may override.
_INIT_KWARGS = ("label2id", "max_length", "missing_audio_seconds", "chat_template")

# Model-loading keyword arguments that `transformers.pipeline()` (its `model_kwargs`, `dtype`, `device_map`) and
# users pass to every component's `from_pretrained`; they mean nothing to a processor and are ignored.
_MODEL_LOADING_KWARGS = (
    "dtype",
    "torch_dtype",
    "device",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_state_dict",
    "low_cpu_mem_usage",
    "attn_implementation",
    "quantization_config",
    "load_in_8bit",
    "load_in_4bit",
    "use_safetensors",
    "weights_only",
    "variant",
    "tp_plan",
    "tp_size",
    "key_mapping",
    "output_loading_info",
    "ignore_mismatched_sizes",
    "state_dict",
    "config",
    "use_auth_token",
    "mirror",
    "_fast_init",
    "_commit_hash",
    "_from_auto",
    "_from_pipeline",
    "code_revision",
    "return_unused_kwargs",
    "adapter_kwargs",
    "adapter_name",
    "gguf_file",
)

# Tokenizer-loading keyword arguments passed on to `AutoTokenizer.from_pretrained`.
_TOKENIZER_KWARGS = ("use_fast",)


# ---------------------------------------------------------------------------------------------------------------
# Audio decoding and resampling (numpy only: Hub files may not depend on soxr)
# ---------------------------------------------------------------------------------------------------------------


def _import_soundfile():
    """Imports `soundfile` lazily, with an error that says what it is needed for."""
    try:
        import soundfile
    except ImportError as error:  # pragma: no cover - depends on the user's environment
        raise ImportError(
            "MeritsProcessor needs the `soundfile` package to decode audio files given as paths, and it is not "
            "installed in this environment. Install it with `pip install soundfile`, or pass the audio as a numpy "
            "array together with its `sampling_rate`."
        ) from error
    return soundfile


def _sinc_resample_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int, rolloff: float, beta: float):
    """
    Polyphase bank of Kaiser-windowed sinc filters, one row per output phase (`new_freq` rows, frequencies already
    divided by their gcd). Row `j` holds the weights that produce output sample `j` of every block of `new_freq`
    outputs from a window of `2 * width + orig_freq` input samples.
    """
    base_freq = min(orig_freq, new_freq) * rolloff  # cut-off below the lower Nyquist frequency
    width = math.ceil(lowpass_filter_width * orig_freq / base_freq)
    # Input sample positions (in input periods) relative to the first sample of the block ...
    idx = np.arange(-width, width + orig_freq, dtype=np.float64)[None, :] / orig_freq
    # ... minus the output sample positions of each phase.
    t = (-np.arange(new_freq, dtype=np.float64)[:, None] / new_freq + idx) * base_freq
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.i0(beta * np.sqrt(1.0 - (t / lowpass_filter_width) ** 2)) / np.i0(beta)
    kernels = np.sinc(t) * window * (base_freq / orig_freq)
    return kernels, width


def resample_audio(
    waveform: np.ndarray,
    orig_sampling_rate: int,
    target_sampling_rate: int = TARGET_SAMPLING_RATE,
    lowpass_filter_width: int = 32,
    rolloff: float = 0.98,
    beta: float = 12.0,
) -> np.ndarray:
    """
    Band-limited resampling of a mono waveform with a Kaiser-windowed sinc polyphase filter (the algorithm of
    `torchaudio.functional.resample` with `resampling_method="sinc_interp_kaiser"`, written with numpy).

    Args:
        waveform (`np.ndarray` of shape `(num_samples,)`): the signal.
        orig_sampling_rate (`int`): its sampling rate in Hz.
        target_sampling_rate (`int`, defaults to 16000): the wanted sampling rate in Hz.
        lowpass_filter_width (`int`): half-length of the sinc filter in zero crossings (sharper when larger).
        rolloff (`float`): cut-off as a fraction of the lower Nyquist frequency.
        beta (`float`): Kaiser window shape parameter.

    Returns:
        `np.ndarray` of dtype float32 and length `ceil(num_samples * target / orig)`.
    """
    waveform = np.asarray(waveform, dtype=np.float64)
    if waveform.ndim != 1:
        raise ValueError(f"resample_audio expects a mono 1-D waveform, got shape {waveform.shape}.")
    orig_sampling_rate, target_sampling_rate = int(orig_sampling_rate), int(target_sampling_rate)
    if orig_sampling_rate <= 0 or target_sampling_rate <= 0:
        raise ValueError(
            f"Sampling rates must be positive, got {orig_sampling_rate} -> {target_sampling_rate}."
        )
    if orig_sampling_rate == target_sampling_rate:
        return waveform.astype(np.float32)

    gcd = math.gcd(orig_sampling_rate, target_sampling_rate)
    orig_freq, new_freq = orig_sampling_rate // gcd, target_sampling_rate // gcd
    kernels, width = _sinc_resample_kernel(orig_freq, new_freq, lowpass_filter_width, rolloff, beta)

    num_samples = waveform.shape[0]
    padded = np.pad(waveform, (width, width + orig_freq))
    # One window of `2 * width + orig_freq` input samples per block of `new_freq` output samples, hop `orig_freq`.
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernels.shape[1])[::orig_freq]
    resampled = (windows @ kernels.T).reshape(-1)
    target_length = math.ceil(new_freq * num_samples / orig_freq)
    return resampled[:target_length].astype(np.float32)


def _to_mono_float32(array: np.ndarray, where: str) -> np.ndarray:
    """Converts an integer or float array, mono or multi-channel, to a float32 mono waveform."""
    array = np.asarray(array)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        array = array.astype(np.float64) / max(abs(info.min), info.max)
    elif array.dtype.kind != "f":
        raise TypeError(f"{where}: audio array has dtype {array.dtype}, expected floats or integers.")
    if array.ndim == 2:
        # Multi-channel: the channel axis is the short one ([channels, samples] or soundfile's [samples, channels]).
        channel_axis = 0 if array.shape[0] < array.shape[1] else 1
        array = array.mean(axis=channel_axis)
    elif array.ndim != 1:
        raise ValueError(f"{where}: audio array must be 1-D (mono) or 2-D (multi-channel), got shape {array.shape}.")
    return array.astype(np.float32)


#: The shortest audio a turn may have after resampling: one 25 ms analysis window (the frame of the acoustic
#: statistics and of the speech backbones' first convolution). Shorter audio carries no speech and would be
#: classified from padding alone (a 1-sample turn came out at 99 % confidence before this check).
MIN_AUDIO_SECONDS = 0.025


def first_non_finite(values: Any) -> Optional[int]:
    """The flat index of the first NaN/inf value of ``values`` (array-like), or None when all are finite."""
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    bad = ~np.isfinite(array)
    return int(np.argmax(bad)) if bad.any() else None


def check_finite(values: Any, what: str, where: str) -> np.ndarray:
    """``values`` as a float32 numpy array; `ValueError` naming ``where`` (file / row / turn) and ``what`` (the
    column or input) when it holds NaN or inf. The one finiteness check of the project: the pipeline, `merits
    evaluate` / `predict`, the embedding cache and the trainer all call it (docs/reliability.md)."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {what} is not an array of numbers ({error}).") from None
    index = first_non_finite(array)
    if index is not None:
        raise ValueError(
            f"{where}: {what} holds NaN or inf (value {index} of {array.size} is {array.reshape(-1)[index]})."
        )
    return array


def load_turn_audio(
    audio: Any,
    sampling_rate: Optional[int] = None,
    target_sampling_rate: int = TARGET_SAMPLING_RATE,
    where: str = "audio",
) -> np.ndarray:
    """
    Decodes one turn's audio into a float32 mono waveform at `target_sampling_rate`.

    Args:
        audio: a path (str or `os.PathLike`) to a file soundfile can read; a numpy array / list / torch tensor
            (mono `[samples]` or multi-channel); or a `datasets` Audio dict with `"array"` and `"sampling_rate"` or
            with `"path"`.
        sampling_rate (`int`, *optional*): sampling rate of an array input. Required for arrays unless the dict
            carries it.
        target_sampling_rate (`int`): output rate (16 kHz for every backbone of this project).
        where (`str`): names the conversation and turn in error messages.
    """
    if isinstance(audio, dict):
        if audio.get("array") is not None:
            return load_turn_audio(
                audio["array"], audio.get("sampling_rate", sampling_rate), target_sampling_rate, where
            )
        if audio.get("path") is not None:
            return load_turn_audio(audio["path"], None, target_sampling_rate, where)
        raise ValueError(f"{where}: audio dict has neither an 'array' nor a 'path' (keys: {sorted(audio)}).")

    if isinstance(audio, (str, os.PathLike)):
        path = os.fspath(audio)
        soundfile = _import_soundfile()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: audio file '{path}' does not exist.")
        try:
            array, file_sampling_rate = soundfile.read(path, dtype="float32", always_2d=True)
        except Exception as error:
            raise ValueError(f"{where}: could not decode audio file '{path}': {error}") from error
        if array.shape[0] == 0:
            raise ValueError(f"{where}: audio file '{path}' contains no samples.")
        waveform = array.mean(axis=1).astype(np.float32)  # [samples, channels] -> mono
        check_finite(waveform, f"the audio samples of '{path}'", where)
        return _check_duration(resample_audio(waveform, file_sampling_rate, target_sampling_rate), target_sampling_rate, where)

    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    if isinstance(audio, (list, tuple)):
        audio = np.asarray(audio, dtype=np.float32)
    if not isinstance(audio, np.ndarray):
        raise TypeError(
            f"{where}: audio must be a path, a numpy array or a dict with 'array'/'path', got {type(audio).__name__}."
        )
    waveform = _to_mono_float32(audio, where)
    if waveform.shape[0] == 0:
        raise ValueError(f"{where}: audio array is empty.")
    check_finite(waveform, "the audio array", where)
    if sampling_rate is None:
        raise ValueError(f"{where}: an audio array needs its `sampling_rate`.")
    return _check_duration(resample_audio(waveform, sampling_rate, target_sampling_rate), target_sampling_rate, where)


def _check_duration(waveform: np.ndarray, sampling_rate: int, where: str) -> np.ndarray:
    minimum = int(round(MIN_AUDIO_SECONDS * sampling_rate))
    if waveform.shape[0] < minimum:
        raise ValueError(
            f"{where}: the audio is {waveform.shape[0]} sample(s) long at {sampling_rate} Hz "
            f"({1000 * waveform.shape[0] / sampling_rate:.2f} ms); a turn needs at least {1000 * MIN_AUDIO_SECONDS:.0f} ms "
            "of audio to be classified (drop the audio of this turn, or the turn)."
        )
    return waveform


# ---------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------


class MeritsProcessor(ProcessorMixin):
    r"""
    Constructs a MERITS processor: an (optional) tokenizer for the turns' text and an (optional) audio feature
    extractor for their speech, producing the conversation batches of `MeritsForConversationClassification`.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            Tokenizer of the text backbone (e.g. RoBERTa). `None` when the model reads precomputed text embeddings.
        feature_extractor ([`FeatureExtractionMixin`], *optional*):
            Audio feature extractor: `Wav2Vec2FeatureExtractor` (WavLM / HuBERT / wav2vec2 -> `input_values`),
            `WhisperFeatureExtractor` (-> `input_features`) or `MeritsAcousticFeatureExtractor`
            (-> `audio_features` `[B, T, F]`). `None` returns the raw 16 kHz waveforms as `input_values`.
        label2id (`dict[str, int]`, *optional*):
            Maps label names to class ids for the `labels` argument of `__call__` (usually `model.config.label2id`).
        max_length (`int`, *optional*):
            Token limit per utterance (defaults to the tokenizer's `model_max_length`, capped at 512).
        missing_audio_seconds (`float`, defaults to 0.1):
            Length of the silent placeholder waveform given to the feature extractor for turns without audio (the
            `audio_mask` marks them; the model never reads their features).
    """

    attributes = ["tokenizer", "feature_extractor"]

    def __init__(
        self,
        tokenizer=None,
        feature_extractor=None,
        label2id: Optional[dict] = None,
        max_length: Optional[int] = None,
        missing_audio_seconds: float = 0.1,
        **kwargs,
    ):
        # `ProcessorMixin.__init__` requires every sub-processor; here both are optional, so we set them ourselves.
        self.chat_template = kwargs.pop("chat_template", None)
        if kwargs:
            raise TypeError(f"MeritsProcessor got unexpected keyword arguments: {sorted(kwargs)}.")
        if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
        if feature_extractor is not None and not isinstance(feature_extractor, FeatureExtractionMixin):
            raise TypeError(
                f"`feature_extractor` must be a transformers feature extractor, got {type(feature_extractor).__name__}."
            )
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.label2id = {str(name): int(index) for name, index in label2id.items()} if label2id else None
        self.max_length = max_length
        self.missing_audio_seconds = float(missing_audio_seconds)

    # -----------------------------------------------------------------------------------------------------------
    # Inputs
    # -----------------------------------------------------------------------------------------------------------

    @property
    def model_input_names(self) -> list[str]:
        names = ["turn_mask", "text_mask", "audio_mask"]
        if self.tokenizer is not None:
            names += list(self.tokenizer.model_input_names)
        if self.feature_extractor is not None:
            names += [
                "audio_attention_mask" if name == "attention_mask" else name
                for name in self.feature_extractor.model_input_names
            ]
        else:
            names += ["input_values", "audio_attention_mask"]
        return list(dict.fromkeys(names))

    @property
    def audio_sampling_rate(self) -> int:
        """Sampling rate the audio is resampled to before feature extraction."""
        return int(getattr(self.feature_extractor, "sampling_rate", None) or TARGET_SAMPLING_RATE)

    @staticmethod
    def _as_conversation_list(conversations) -> tuple[list, bool]:
        """Returns (list of conversations, whether a single conversation was given)."""
        if isinstance(conversations, dict):
            raise TypeError(
                "MeritsProcessor expects a conversation (a list of turns, each a dict with 'text' and/or 'audio') or "
                "a list of conversations, got a single dict. Wrap a single turn in a list."
            )
        if not isinstance(conversations, (list, tuple)):
            raise TypeError(
                f"MeritsProcessor expects a conversation or a list of conversations, got {type(conversations).__name__}."
            )
        if len(conversations) > 0 and isinstance(conversations[0], dict):
            return [list(conversations)], True
        return list(conversations), False

    def _label_to_id(self, label, label2id: Optional[dict], where: str) -> int:
        if label is None:
            return IGNORE_INDEX
        if isinstance(label, (np.integer, torch.Tensor)):
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise TypeError(f"{where}: label must be an int, a str or None, got {type(label).__name__} ({label!r}).")
        if isinstance(label, str):
            if not label2id:
                raise ValueError(f"{where}: label {label!r} is a string but the processor has no `label2id`.")
            if label not in label2id:
                raise ValueError(f"{where}: unknown label {label!r}; known labels: {sorted(label2id)}.")
            return int(label2id[label])
        if label == IGNORE_INDEX:
            return IGNORE_INDEX
        if label < 0 or (label2id and label >= len(label2id)):
            num = f" (the model has {len(label2id)} classes)" if label2id else ""
            raise ValueError(f"{where}: label id {label} is out of range{num}.")
        return int(label)

    def __call__(
        self,
        conversations=None,
        sampling_rate: Optional[int] = TARGET_SAMPLING_RATE,
        labels=None,
        return_tensors: Optional[str] = "pt",
        max_length: Optional[int] = None,
        label2id: Optional[dict] = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Prepares one conversation or a batch of conversations for the model.

        Args:
            conversations: a conversation (list of turns) or a list of conversations. A turn is a dict with
                `"text"` (str or None) and/or `"audio"` (numpy array, path, `datasets` Audio dict, or None), and
                optionally its own `"sampling_rate"` for an array.
            sampling_rate (`int`, defaults to 16000): sampling rate of audio arrays that do not carry their own.
            labels: per conversation, a list with one label per turn (int id, label name mapped through
                `label2id`, or None / -100 for an unlabelled turn). For a single conversation, a flat list.
            return_tensors (`str`, defaults to `"pt"`): `"pt"`, `"np"` or None.
            max_length (`int`, *optional*): token limit per utterance (overrides the processor's).
            label2id (`dict`, *optional*): overrides the processor's label mapping for this call.

        Returns:
            [`BatchFeature`] with the keys of docs/design.md section 2: `turn_mask`, `text_mask`, `audio_mask`
            `[B, T]`; `input_ids`, `attention_mask` `[N, L]` (with a tokenizer); the feature extractor's outputs
            flattened over the N real turns (`input_values` / `input_features` `[N, ...]`, its attention mask renamed
            `audio_attention_mask`), except `audio_features` laid out as `[B, T, ...]`; and `labels` `[B, T]`.
        """
        if kwargs:
            raise TypeError(f"MeritsProcessor.__call__ got unexpected keyword arguments: {sorted(kwargs)}.")
        if conversations is None:
            raise ValueError("MeritsProcessor needs `conversations`.")
        conversations, single = self._as_conversation_list(conversations)
        if len(conversations) == 0:
            raise ValueError("MeritsProcessor got an empty list of conversations.")
        label2id = label2id if label2id is not None else self.label2id

        batch_size = len(conversations)
        for index, conversation in enumerate(conversations):
            if not isinstance(conversation, (list, tuple)):
                raise TypeError(
                    f"Conversation {index} must be a list of turns, got {type(conversation).__name__}."
                )
            if len(conversation) == 0:
                raise ValueError(f"Conversation {index} is empty: a conversation needs at least one turn.")
        max_turns = max(len(conversation) for conversation in conversations)

        turn_mask = np.zeros((batch_size, max_turns), dtype=np.int64)
        text_mask = np.zeros((batch_size, max_turns), dtype=np.int64)
        audio_mask = np.zeros((batch_size, max_turns), dtype=np.int64)
        texts: list[str] = []  # one per real turn, row-major
        audios: list[Optional[np.ndarray]] = []  # one per real turn, None where absent

        target_rate = self.audio_sampling_rate
        for b, conversation in enumerate(conversations):
            for t, turn in enumerate(conversation):
                where = f"conversation {b}, turn {t}"
                if not isinstance(turn, dict):
                    raise TypeError(f"{where}: a turn must be a dict with 'text' and/or 'audio', got {type(turn).__name__}.")
                text = turn.get("text")
                audio = turn.get("audio")
                if text is not None and not isinstance(text, str):
                    raise TypeError(f"{where}: 'text' must be a str or None, got {type(text).__name__}.")
                has_text = text is not None and text.strip() != ""
                has_audio = audio is not None
                if not has_text and not has_audio:
                    raise ValueError(f"{where} has neither text nor audio.")
                turn_mask[b, t] = 1
                text_mask[b, t] = int(has_text)
                audio_mask[b, t] = int(has_audio)
                texts.append(text if has_text else "")
                if has_audio:
                    audios.append(
                        load_turn_audio(audio, turn.get("sampling_rate", sampling_rate), target_rate, where)
                    )
                else:
                    audios.append(None)

        data: dict[str, Any] = {"turn_mask": turn_mask, "text_mask": text_mask, "audio_mask": audio_mask}

        if self.tokenizer is not None:
            data.update(self._tokenize(texts, max_length))
        if audio_mask.any():
            data.update(self._extract_audio(audios, turn_mask))

        if labels is not None:
            data["labels"] = self._labels_array(labels, conversations, single, turn_mask, label2id)

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _tokenize(self, texts: list[str], max_length: Optional[int]) -> dict:
        if max_length is None:
            max_length = self.max_length
        if max_length is None:
            model_max_length = getattr(self.tokenizer, "model_max_length", None) or 512
            max_length = min(int(model_max_length), 512)
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_attention_mask=True, return_tensors="np"
        )
        return {key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}

    def _extract_audio(self, audios: list, turn_mask: np.ndarray) -> dict:
        """Runs the feature extractor over every real turn (silent placeholders where audio is absent)."""
        placeholder = np.zeros(max(1, int(round(self.missing_audio_seconds * self.audio_sampling_rate))), np.float32)
        waveforms = [audio if audio is not None else placeholder for audio in audios]

        if self.feature_extractor is None:
            # No feature extractor: the raw 16 kHz waveforms, right-padded with zeros.
            longest = max(waveform.shape[0] for waveform in waveforms)
            input_values = np.zeros((len(waveforms), longest), dtype=np.float32)
            audio_attention_mask = np.zeros((len(waveforms), longest), dtype=np.int64)
            for index, waveform in enumerate(waveforms):
                input_values[index, : waveform.shape[0]] = waveform
                audio_attention_mask[index, : waveform.shape[0]] = 1
            return {"input_values": input_values, "audio_attention_mask": audio_attention_mask}

        call_kwargs = {"sampling_rate": self.audio_sampling_rate, "return_attention_mask": True, "return_tensors": "np"}
        padding = inspect.signature(self.feature_extractor.__call__).parameters.get("padding")
        if padding is not None and padding.default in (False, None, "do_not_pad"):
            # e.g. Wav2Vec2FeatureExtractor does not pad by default; extractors padding to a fixed length (Whisper's
            # 30 s) keep their own default.
            call_kwargs["padding"] = "longest"
        features = self.feature_extractor(waveforms, **call_kwargs)
        output = {}
        batch_size, max_turns = turn_mask.shape
        flat_positions = np.nonzero(turn_mask.reshape(-1))[0]
        for key, value in features.items():
            value = np.asarray(value)
            if key in CONVERSATION_LEVEL_AUDIO_KEYS:
                # [N, ...] -> [B, T, ...] with zeros at padded turns.
                laid_out = np.zeros((batch_size * max_turns,) + value.shape[1:], dtype=value.dtype)
                laid_out[flat_positions] = value
                output[key] = laid_out.reshape((batch_size, max_turns) + value.shape[1:])
            elif key == "attention_mask":
                output["audio_attention_mask"] = value.astype(np.int64)
            else:
                output[key] = value
        return output

    def _labels_array(self, labels, conversations, single, turn_mask, label2id) -> np.ndarray:
        if single and len(labels) > 0 and not isinstance(labels[0], (list, tuple, np.ndarray, torch.Tensor)):
            labels = [labels]
        if len(labels) != len(conversations):
            raise ValueError(f"Got labels for {len(labels)} conversations but {len(conversations)} conversations.")
        array = np.full(turn_mask.shape, IGNORE_INDEX, dtype=np.int64)
        for b, (conversation_labels, conversation) in enumerate(zip(labels, conversations)):
            if isinstance(conversation_labels, (np.ndarray, torch.Tensor)):
                conversation_labels = conversation_labels.tolist()
            if len(conversation_labels) != len(conversation):
                raise ValueError(
                    f"conversation {b}: {len(conversation_labels)} labels for {len(conversation)} turns."
                )
            for t, label in enumerate(conversation_labels):
                array[b, t] = self._label_to_id(label, label2id, f"conversation {b}, turn {t}")
        return array

    # -----------------------------------------------------------------------------------------------------------
    # Outputs
    # -----------------------------------------------------------------------------------------------------------

    def postprocess(
        self,
        logits: torch.Tensor,
        turn_mask: torch.Tensor,
        id2label: Optional[dict] = None,
        gate_weights: Optional[torch.Tensor] = None,
        expert_names: tuple = EXPERT_NAMES,
    ) -> list[list[dict]]:
        """
        Turns `[B, T, C]` logits into one list per conversation of per-turn dicts
        `{"label", "score", "scores": {label: probability}}` (plus `"gate": {expert: weight}` when `gate_weights`
        `[B, T, E]` are given, as for MiSTER-E). Padded turns are dropped.
        """
        logits = torch.as_tensor(logits).detach().float().cpu()
        turn_mask = torch.as_tensor(turn_mask).detach().cpu().bool()
        if logits.dim() != 3 or turn_mask.shape != logits.shape[:2]:
            raise ValueError(
                f"postprocess expects logits [B, T, C] and turn_mask [B, T], got {tuple(logits.shape)} and "
                f"{tuple(turn_mask.shape)}."
            )
        num_labels = logits.shape[-1]
        if id2label is None and self.label2id is not None:
            id2label = {index: name for name, index in self.label2id.items()}
        if id2label is None:
            id2label = {index: f"LABEL_{index}" for index in range(num_labels)}
        id2label = {int(index): str(name) for index, name in id2label.items()}
        if sorted(id2label) != list(range(num_labels)):
            raise ValueError(f"id2label has ids {sorted(id2label)} but the logits have {num_labels} classes.")
        if gate_weights is not None:
            gate_weights = torch.as_tensor(gate_weights).detach().float().cpu()
            if gate_weights.shape[:2] != logits.shape[:2] or gate_weights.shape[-1] != len(expert_names):
                raise ValueError(
                    f"gate_weights {tuple(gate_weights.shape)} do not match logits {tuple(logits.shape)} and "
                    f"experts {expert_names}."
                )

        probabilities = logits.softmax(dim=-1)
        results = []
        for b in range(logits.shape[0]):
            turns = []
            for t in range(logits.shape[1]):
                if not turn_mask[b, t]:
                    continue
                scores = {id2label[c]: float(probabilities[b, t, c]) for c in range(num_labels)}
                best = int(probabilities[b, t].argmax())
                turn = {"label": id2label[best], "score": float(probabilities[b, t, best]), "scores": scores}
                if gate_weights is not None:
                    turn["gate"] = {name: float(gate_weights[b, t, e]) for e, name in enumerate(expert_names)}
                turns.append(turn)
            results.append(turns)
        return results

    # -----------------------------------------------------------------------------------------------------------
    # Serialization
    # -----------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The content of `processor_config.json` (the sub-processors are saved in their own files)."""
        output = {
            "processor_class": self.__class__.__name__,
            "has_tokenizer": self.tokenizer is not None,
            "has_feature_extractor": self.feature_extractor is not None,
            "label2id": self.label2id,
            "max_length": self.max_length,
            "missing_audio_seconds": self.missing_audio_seconds,
        }
        if getattr(self, "auto_map", None):
            output["auto_map"] = dict(self.auto_map)
        return output

    def __repr__(self):
        return (
            f"{self.__class__.__name__}:\n- tokenizer: {self.tokenizer!r}\n- feature_extractor: "
            f"{self.feature_extractor!r}\n\n{self.to_json_string()}"
        )

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> list:
        """
        Saves the tokenizer (`tokenizer.json`, `tokenizer_config.json`, ...), the feature extractor
        (`preprocessor_config.json`) and `processor_config.json`. When the class is registered for `AutoProcessor`
        (as `merits` does on import), this file and its relative imports are copied too and `auto_map` is written.
        """
        if push_to_hub:
            raise NotImplementedError(
                "MeritsProcessor.save_pretrained writes a folder; upload it with `huggingface_hub.upload_folder`."
            )
        os.makedirs(save_directory, exist_ok=True)
        if self._auto_class is not None:
            auto_map_holder: dict = {}
            custom_object_save(self, save_directory, config=auto_map_holder)  # copies this file and its imports
            self.auto_map = auto_map_holder["auto_map"]
        saved = []
        if self.tokenizer is not None:
            saved += list(self.tokenizer.save_pretrained(save_directory))
        if self.feature_extractor is not None:
            saved += list(self.feature_extractor.save_pretrained(save_directory))
        processor_file = os.path.join(save_directory, PROCESSOR_NAME)
        self.to_json_file(processor_file)
        saved.append(processor_file)
        return saved

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: Optional[Union[str, bool]] = None,
        revision: str = "main",
        trust_remote_code: Optional[bool] = None,
        **kwargs,
    ) -> "MeritsProcessor":
        """Loads a processor saved with `save_pretrained` from a folder, a Hub repo id or the HF cache."""
        hub_kwargs = {
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "token": token,
            "revision": revision,
        }
        for key in ("subfolder", "proxies"):
            if key in kwargs:
                hub_kwargs[key] = kwargs.pop(key)
        tokenizer_kwargs = {key: kwargs.pop(key) for key in _TOKENIZER_KWARGS if key in kwargs}
        # `pipeline()` passes its model kwargs (dtype, device_map, ...) to every component: a processor has no
        # weights, so they are accepted and ignored. Anything else that is not an `__init__` argument is ignored
        # with a warning (raising here would make `pipeline()` silently drop the processor).
        for key in _MODEL_LOADING_KWARGS:
            kwargs.pop(key, None)
        unknown = sorted(key for key in kwargs if key not in _INIT_KWARGS)
        if unknown:
            logger.warning(f"MeritsProcessor.from_pretrained ignores the unknown keyword arguments {unknown}.")
            for key in unknown:
                kwargs.pop(key)

        processor_file = cached_file(
            pretrained_model_name_or_path, PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if processor_file is None:
            raise OSError(f"No {PROCESSOR_NAME} found in '{pretrained_model_name_or_path}'.")
        with open(processor_file, encoding="utf-8") as reader:
            processor_dict = json.load(reader)

        tokenizer = None
        if processor_dict.get("has_tokenizer", False):
            tokenizer = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs, **tokenizer_kwargs
            )

        feature_extractor = None
        if processor_dict.get("has_feature_extractor", False):
            feature_extractor_file = cached_file(
                pretrained_model_name_or_path,
                FEATURE_EXTRACTOR_NAME,
                _raise_exceptions_for_missing_entries=False,
                **hub_kwargs,
            )
            if feature_extractor_file is None:
                raise OSError(
                    f"'{pretrained_model_name_or_path}' has a processor with a feature extractor but no "
                    f"{FEATURE_EXTRACTOR_NAME}."
                )
            with open(feature_extractor_file, encoding="utf-8") as reader:
                feature_extractor_type = json.load(reader).get("feature_extractor_type")
            if feature_extractor_type == MeritsAcousticFeatureExtractor.__name__:
                # Our own extractor is a sibling file: load it directly (works with and without `merits` installed).
                feature_extractor = MeritsAcousticFeatureExtractor.from_pretrained(
                    pretrained_model_name_or_path, **hub_kwargs
                )
            else:
                feature_extractor = AutoFeatureExtractor.from_pretrained(
                    pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs
                )

        init_kwargs = {
            key: processor_dict[key]
            for key in ("label2id", "max_length", "missing_audio_seconds")
            if key in processor_dict
        }
        init_kwargs.update(kwargs)
        return cls(tokenizer=tokenizer, feature_extractor=feature_extractor, **init_kwargs)


__all__ = ["MeritsProcessor", "check_finite", "first_non_finite", "load_turn_audio", "resample_audio"]
