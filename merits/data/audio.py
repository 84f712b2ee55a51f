"""Decoding audio cells into 16 kHz mono float32 arrays (soundfile + soxr; no torchcodec).

``datasets.Audio`` decodes with ``torchcodec``, which cannot be used in this environment, so the
datasets of :mod:`merits.data` store audio as plain ``{"path", "array", "sampling_rate"}`` structs
and :func:`load_audio` decodes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import soxr

#: Peak amplitude below which a signal counts as silent (about -80 dBFS).
SILENCE_PEAK = 1e-4


class AudioError(ValueError):
    """Audio that cannot be used: missing, corrupt, empty or silent. The message names the file."""


def resample(array: np.ndarray, orig_sampling_rate: float, sampling_rate: int = 16000) -> np.ndarray:
    """Resample a mono float32 signal with soxr (high quality)."""
    if orig_sampling_rate == sampling_rate:
        return array
    return soxr.resample(array, orig_sampling_rate, sampling_rate, quality="HQ").astype(np.float32, copy=False)


def speed_perturb(array: np.ndarray, speed: float, sampling_rate: int = 16000) -> np.ndarray:
    """Kaldi-style speed perturbation (Ko et al., 2015): the signal played ``speed`` times as fast, tempo and pitch
    together, at the same sampling rate (``len / speed`` samples): read as if sampled at ``speed * sampling_rate``
    and resampled to ``sampling_rate``."""
    if not speed > 0:
        raise ValueError(f"speed perturbation needs a positive speed, got {speed}")
    return resample(array, speed * sampling_rate, sampling_rate)


def _to_mono(array: np.ndarray, source: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        # soundfile gives [frames, channels]; arrays given by users may be [channels, frames]
        channel_axis = 1 if array.shape[1] <= array.shape[0] else 0
        array = array.mean(axis=channel_axis)
    if array.ndim != 1:
        raise AudioError(f"{source}: expected a mono or stereo signal, got an array of shape {array.shape}")
    return array


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a sound file with soundfile: ``(float32 mono array, sampling rate)``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        array, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError on corrupt files
        raise AudioError(f"{path}: cannot decode audio ({error})") from error
    return _to_mono(array, str(path)), int(rate)


def load_audio(value, sampling_rate: int = 16000, source: str | None = None, allow_silent: bool = False) -> np.ndarray:
    """Decode one audio value into a float32 mono array at ``sampling_rate``.

    ``value`` may be a path (``str`` / ``PathLike``), a dict ``{"path", "array", "sampling_rate"}`` (the
    schema's ``audio`` column; an in-memory ``array`` wins over ``path``), or an array already at
    ``sampling_rate``. Stereo is averaged to mono; other rates are resampled with soxr.

    Raises :class:`AudioError` naming the file (or ``source``) when the value is missing, corrupt,
    empty (zero samples) or silent (peak below :data:`SILENCE_PEAK`; pass ``allow_silent=True`` to
    accept it), or contains NaN/inf.
    """
    try:
        return _load_audio(value, sampling_rate, source, allow_silent)
    except AudioError as error:
        if source and not str(error).startswith(source):
            raise AudioError(f"{source}: {error}") from error
        raise


def _load_audio(value, sampling_rate: int, source: str | None, allow_silent: bool) -> np.ndarray:
    if value is None:
        raise AudioError(f"{source or 'audio'}: no audio (None)")
    if isinstance(value, (str, os.PathLike)):
        source = source or str(value)
        array, rate = read_audio_file(value)
    elif isinstance(value, dict):
        array_value = value.get("array")
        path = value.get("path")
        if array_value is not None and len(array_value) > 0:
            rate = value.get("sampling_rate")
            if rate is None:
                raise AudioError(f"{source or path or 'audio'}: an in-memory array needs its 'sampling_rate'")
            source = source or path or "in-memory audio"
            array = _to_mono(array_value, source)
            rate = int(rate)
        elif path:
            source = source or str(path)
            array, rate = read_audio_file(path)
        else:
            raise AudioError(f"{source or 'audio'}: the audio value has neither an array nor a path")
    else:
        source = source or "in-memory audio"
        array = _to_mono(value, source)
        rate = sampling_rate
    if array.size == 0:
        raise AudioError(f"{source}: empty audio (0 samples)")
    if not np.all(np.isfinite(array)):
        raise AudioError(f"{source}: audio contains NaN or infinite samples")
    if not allow_silent and float(np.max(np.abs(array))) < SILENCE_PEAK:
        raise AudioError(f"{source}: audio is silent (peak amplitude below {SILENCE_PEAK})")
    return resample(np.ascontiguousarray(array, dtype=np.float32), rate, sampling_rate)


def audio_duration(value) -> float:
    """Duration in seconds of an audio value without decoding a file (header only)."""
    if isinstance(value, dict) and value.get("array") is not None and len(value["array"]) > 0:
        return len(value["array"]) / float(value["sampling_rate"])
    path = value.get("path") if isinstance(value, dict) else value
    try:
        info = soundfile.info(str(path))
    except Exception as error:
        raise AudioError(f"{path}: cannot read audio header ({error})") from error
    return info.frames / float(info.samplerate)
