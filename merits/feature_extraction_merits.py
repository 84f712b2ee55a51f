# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""Utterance-level acoustic statistics for the MERITS speech head (numpy only; shipped to the Hub).

:class:`MeritsAcousticFeatureExtractor` turns each 16 kHz mono utterance into one fixed-size vector of
``F = 225`` eGeMAPS-like functionals. It is the CPU speech route: the same speech head that reads
CARE / WavLM layer stacks on a GPU reads these vectors (``audio_features`` [N, F]) on 2 CPU cores.

Frames are 25 ms (hop 10 ms, Hann window, 512-point FFT); pitch uses 40 ms frames. "Active" frames
are those within ``active_range_db`` of the loudest frame (silence and zero padding are left out of
the spectral statistics). The vector, in order (``feature_names`` lists every entry):

====================  ===  ==========================================================================
group                 n    content
====================  ===  ==========================================================================
loudness              6    frame log-RMS (dB) over active frames: mean, std, p10, p50, p90, p90-p10
pitch                 7    F0 in semitones above 27.5 Hz over voiced frames: mean, std, p10, p50, p90,
                           p90-p10, slope (semitones / s); zeros when nothing is voiced
voicing               3    voiced fraction of active frames, mean autocorrelation peak (all active
                           frames), mean peak of voiced frames
perturbation          2    jitter proxy (mean |ΔF0| in semitones between consecutive voiced frames),
                           shimmer proxy (mean |Δloudness| in dB between consecutive voiced frames)
spectral              14   mean and std of: centroid (kHz), 85 % roll-off (kHz), flux, flatness,
                           zero-crossing rate, alpha ratio (dB, 50-1000 Hz vs 1-5 kHz), Hammarberg
                           index (dB, peak 0-2 kHz vs 2-5 kHz)
log-mel               52   26 log-mel band energies: means then stds
MFCC                  26   MFCC 0-12 (DCT-II of the log-mel): means then stds
rate                  6    duration (s), loudness peaks per second (syllable-rate proxy), voiced
                           segments per second, mean voiced segment length (s), mean pause length (s),
                           pause fraction (inactive frames / all frames)
MFCC deltas           13   std of the frame-to-frame MFCC 0-12 deltas (``np.gradient``)
voiced / unvoiced     26   MFCC 0-12 means over voiced frames, then over unvoiced active frames
harmonicity           2    HNR (dB) from the voiced frames' autocorrelation peak r: 10 log10(r / (1 - r)),
                           mean and std
spectral slope        8    least-squares slope (dB / kHz) of the power spectrum in 0-500 Hz and 500-1500 Hz,
                           mean and std over voiced and over unvoiced frames (eGeMAPS' slopes)
dynamics              6    F0 changes (semitones / s, consecutive voiced frames) and loudness changes (dB / s,
                           active frames): mean rise, mean fall, std
pitch percentiles     2    F0 p20, p80 (semitones)
log-mel percentiles   52   26 log-mel bands over active frames: p10 then p90
====================  ===  ==========================================================================

Pitch is estimated per frame from the normalised autocorrelation (divided by the window's own
autocorrelation, Boersma 1993) with a sub-harmonic check against octave errors; a frame is voiced
when its peak exceeds ``voicing_threshold``. Everything is vectorised over frames.

``fit(arrays)`` stores the per-feature mean and std of a training set and turns ``do_normalize`` on;
both travel with ``save_pretrained`` in ``preprocessor_config.json``.
"""

from __future__ import annotations

import numpy as np
from transformers.audio_utils import mel_filter_bank
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

_SPECTRAL = ("centroid_khz", "rolloff85_khz", "flux", "flatness", "zcr", "alpha_ratio_db", "hammarberg_db")


def _feature_names(num_mel_bins: int, num_mfcc: int) -> list[str]:
    names = [f"loudness_{s}" for s in ("mean", "std", "p10", "p50", "p90", "range")]
    names += [f"pitch_st_{s}" for s in ("mean", "std", "p10", "p50", "p90", "range", "slope")]
    names += ["voiced_fraction", "voicing_strength_mean", "voicing_strength_voiced_mean"]
    names += ["jitter_st", "shimmer_db"]
    names += [f"{name}_{s}" for name in _SPECTRAL for s in ("mean", "std")]
    names += [f"logmel{i}_mean" for i in range(num_mel_bins)] + [f"logmel{i}_std" for i in range(num_mel_bins)]
    names += [f"mfcc{i}_mean" for i in range(num_mfcc)] + [f"mfcc{i}_std" for i in range(num_mfcc)]
    names += ["duration_s", "loudness_peaks_per_s", "voiced_segments_per_s", "voiced_segment_s", "pause_s", "pause_fraction"]
    names += [f"mfcc{i}_delta_std" for i in range(num_mfcc)]
    names += [f"mfcc{i}_voiced_mean" for i in range(num_mfcc)] + [f"mfcc{i}_unvoiced_mean" for i in range(num_mfcc)]
    names += ["hnr_db_mean", "hnr_db_std"]
    names += [f"slope_{band}_{part}_{s}" for band in ("0_500", "500_1500") for part in ("voiced", "unvoiced") for s in ("mean", "std")]
    names += [f"{name}_{s}" for name in ("pitch_delta_st_per_s", "loudness_delta_db_per_s") for s in ("rise_mean", "fall_mean", "std")]
    names += ["pitch_st_p20", "pitch_st_p80"]
    names += [f"logmel{i}_p10" for i in range(num_mel_bins)] + [f"logmel{i}_p90" for i in range(num_mel_bins)]
    return names


def _rise_fall(deltas: np.ndarray) -> list[float]:
    """Mean rise, mean fall (as a positive number) and std of frame-to-frame changes (zeros when there are none)."""
    rises, falls = deltas[deltas > 0], deltas[deltas < 0]
    return [float(rises.mean()) if rises.size else 0.0, float(-falls.mean()) if falls.size else 0.0,
            float(deltas.std()) if deltas.size else 0.0]


def _frames(signal: np.ndarray, length: int, hop: int, num_frames: int) -> np.ndarray:
    """[num_frames, length] view of ``signal`` (zero-padded at the end so every frame is complete)."""
    needed = (num_frames - 1) * hop + length
    if signal.shape[0] < needed:
        signal = np.pad(signal, (0, needed - signal.shape[0]))
    return np.lib.stride_tricks.sliding_window_view(signal, length)[::hop][:num_frames]


def _stats(values: np.ndarray) -> list[float]:
    if values.size == 0:
        return [0.0] * 6
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return [float(values.mean()), float(values.std()), float(p10), float(p50), float(p90), float(p90 - p10)]


def _mean_std(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if values.shape[axis] == 0:
        shape = values.shape[1:] if axis == 0 else values.shape[:1]
        return np.zeros(shape), np.zeros(shape)
    return values.mean(axis=axis), values.std(axis=axis)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices and lengths of the runs of True in a 1-D boolean mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return starts, ends - starts


class MeritsAcousticFeatureExtractor(SequenceFeatureExtractor):
    r"""eGeMAPS-like utterance statistics (see the module docstring for the ``F = 225`` entries).

    Args:
        sampling_rate (`int`, defaults to 16000): the rate the arrays must have.
        frame_length_ms, hop_length_ms (`float`): analysis frames (25 ms / 10 ms).
        pitch_frame_length_ms (`float`): frames for the pitch autocorrelation (40 ms).
        n_fft (`int`): FFT size of the spectral frames.
        num_mel_bins, num_mfcc (`int`): log-mel bands and cepstral coefficients.
        f0_min, f0_max (`float`): pitch search range in Hz.
        voicing_threshold (`float`): normalised autocorrelation peak above which a frame is voiced.
        active_range_db (`float`): frames quieter than the loudest minus this are pauses.
        do_normalize (`bool`): standardise with ``feature_mean`` / ``feature_std`` (set by :meth:`fit`).

    Call it on one array or a list of arrays (16 kHz mono); it returns ``audio_features`` [N, F].
    """

    model_input_names = ["audio_features"]

    def __init__(
        self,
        sampling_rate: int = 16000,
        frame_length_ms: float = 25.0,
        hop_length_ms: float = 10.0,
        pitch_frame_length_ms: float = 40.0,
        n_fft: int = 512,
        num_mel_bins: int = 26,
        num_mfcc: int = 13,
        f0_min: float = 60.0,
        f0_max: float = 500.0,
        voicing_threshold: float = 0.45,
        active_range_db: float = 40.0,
        do_normalize: bool = False,
        feature_mean: list[float] | None = None,
        feature_std: list[float] | None = None,
        padding_value: float = 0.0,
        **kwargs,
    ):
        names = _feature_names(num_mel_bins, num_mfcc)
        kwargs.pop("feature_size", None)
        super().__init__(feature_size=len(names), sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.frame_length_ms = frame_length_ms
        self.hop_length_ms = hop_length_ms
        self.pitch_frame_length_ms = pitch_frame_length_ms
        self.n_fft = n_fft
        self.num_mel_bins = num_mel_bins
        self.num_mfcc = num_mfcc
        self.f0_min = f0_min
        self.f0_max = f0_max
        self.voicing_threshold = voicing_threshold
        self.active_range_db = active_range_db
        self.do_normalize = do_normalize
        self.feature_mean = None if feature_mean is None else [float(v) for v in feature_mean]
        self.feature_std = None if feature_std is None else [float(v) for v in feature_std]
        if self.do_normalize and (self.feature_mean is None or self.feature_std is None):
            raise ValueError("do_normalize=True needs feature_mean and feature_std (call `fit` on training audio)")
        if self.feature_mean is not None and len(self.feature_mean) != self.feature_size:
            raise ValueError(f"feature_mean has {len(self.feature_mean)} entries, expected {self.feature_size}")

    # -- derived, not serialised -------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return _feature_names(self.num_mel_bins, self.num_mfcc)

    def _analysis_constants(self):
        if getattr(self, "_constants", None) is None:
            sr = self.sampling_rate
            frame = int(round(sr * self.frame_length_ms / 1000))
            pitch_frame = int(round(sr * self.pitch_frame_length_ms / 1000))
            window = np.hanning(frame + 2)[1:-1]
            pitch_window = np.hanning(pitch_frame + 2)[1:-1]
            pitch_fft = 1 << int(np.ceil(np.log2(2 * pitch_frame)))
            window_ac = np.fft.irfft(np.abs(np.fft.rfft(pitch_window, pitch_fft)) ** 2)[:pitch_frame]
            mel = mel_filter_bank(
                num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=self.num_mel_bins, min_frequency=20.0,
                max_frequency=sr / 2, sampling_rate=sr, norm=None, mel_scale="htk",
            )
            n = np.arange(self.num_mel_bins)
            dct = np.cos(np.pi / self.num_mel_bins * (n[None, :] + 0.5) * np.arange(self.num_mfcc)[:, None])
            dct *= np.sqrt(2.0 / self.num_mel_bins)
            dct[0] /= np.sqrt(2.0)
            slope_bands = []
            freqs = np.fft.rfftfreq(self.n_fft, 1.0 / sr)
            for low, high in ((0.0, 500.0), (500.0, 1500.0)):  # eGeMAPS' spectral slopes, dB per kHz
                band = (freqs >= low) & (freqs < high)
                centred = freqs[band] / 1000 - (freqs[band] / 1000).mean()
                slope_bands.append((band, centred / (centred @ centred)))
            self._constants = dict(
                frame=frame, hop=int(round(sr * self.hop_length_ms / 1000)), pitch_frame=pitch_frame, window=window,
                pitch_window=pitch_window, pitch_fft=pitch_fft, window_ac=np.maximum(window_ac / window_ac[0], 1e-3),
                mel=mel, dct=dct, freqs=freqs, slope_bands=slope_bands,
            )
        return self._constants

    def to_dict(self):
        output = super().to_dict()
        output.pop("_constants", None)
        return output

    # -- one utterance ---------------------------------------------------------------------------
    def _pitch(self, signal: np.ndarray, num_frames: int, c: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame F0 (Hz) and voicing strength (normalised autocorrelation peak)."""
        sr = self.sampling_rate
        frames = _frames(signal, c["pitch_frame"], c["hop"], num_frames)
        frames = (frames - frames.mean(axis=1, keepdims=True)) * c["pitch_window"]
        spectrum = np.fft.rfft(frames, c["pitch_fft"], axis=1)
        ac = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, : c["pitch_frame"]]
        ac = ac / np.maximum(ac[:, :1], 1e-12) / c["window_ac"]
        lag_min = max(2, int(np.floor(sr / self.f0_max)))
        lag_max = min(c["pitch_frame"] - 2, int(np.ceil(sr / self.f0_min)))
        search = ac[:, lag_min : lag_max + 1]
        lag = np.argmax(search, axis=1) + lag_min
        rows = np.arange(num_frames)
        peak = ac[rows, lag]
        # octave check: prefer the shortest period (lag / k) whose peak is nearly as high
        for k in (3, 2):
            candidate = np.rint(lag / k).astype(int)
            ok = candidate >= lag_min + 1
            candidate = np.clip(candidate, lag_min + 1, lag_max - 1)
            neighbourhood = np.stack([ac[rows, candidate - 1], ac[rows, candidate], ac[rows, candidate + 1]], axis=1)
            best = candidate + np.argmax(neighbourhood, axis=1) - 1
            better = ok & (ac[rows, best] >= 0.85 * peak)
            lag = np.where(better, best, lag)
        peak = np.clip(ac[rows, lag], 0.0, 1.0)
        # parabolic interpolation of the peak position
        left, centre, right = ac[rows, lag - 1], ac[rows, lag], ac[rows, np.minimum(lag + 1, ac.shape[1] - 1)]
        denominator = left - 2 * centre + right
        shift = np.where(np.abs(denominator) > 1e-9, 0.5 * (left - right) / np.where(denominator == 0, 1, denominator), 0.0)
        f0 = sr / (lag + np.clip(shift, -0.5, 0.5))
        return f0, peak

    def extract(self, signal: np.ndarray) -> np.ndarray:
        """The ``F``-dimensional statistics of one 16 kHz mono utterance (float32)."""
        signal = np.asarray(signal, dtype=np.float64).reshape(-1)
        if signal.size == 0:
            raise ValueError("MeritsAcousticFeatureExtractor: empty audio (0 samples)")
        if not np.all(np.isfinite(signal)):
            raise ValueError("MeritsAcousticFeatureExtractor: audio contains NaN or infinite samples")
        c = self._analysis_constants()
        sr, hop = self.sampling_rate, c["hop"]
        num_frames = max(1, 1 + (signal.size - c["frame"]) // hop) if signal.size >= c["frame"] else 1
        frames = _frames(signal, c["frame"], hop, num_frames)

        # loudness and activity
        rms = np.sqrt(np.mean(frames**2, axis=1) + 1e-12)
        loudness = 20 * np.log10(rms + 1e-10)
        active = (loudness > loudness.max() - self.active_range_db) & (rms > 1e-5)
        if not active.any():  # silent input (e.g. zeros for a missing turn): describe all frames
            active = np.ones(num_frames, dtype=bool)

        # spectra
        windowed = (frames - frames.mean(axis=1, keepdims=True)) * c["window"]
        power = np.abs(np.fft.rfft(windowed, self.n_fft, axis=1)) ** 2 + 1e-12
        freqs = c["freqs"]
        total = power.sum(axis=1)
        centroid = (power * freqs).sum(axis=1) / total / 1000
        rolloff = freqs[np.argmax(np.cumsum(power, axis=1) >= 0.85 * total[:, None], axis=1)] / 1000
        magnitude = np.sqrt(power)
        normalised = magnitude / magnitude.sum(axis=1, keepdims=True)
        flux = np.concatenate([[0.0], np.sqrt(np.sum(np.diff(normalised, axis=0) ** 2, axis=1))])
        flatness = np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)
        signs = np.signbit(frames)
        zcr = np.mean(signs[:, 1:] != signs[:, :-1], axis=1)
        low, mid = (freqs >= 50) & (freqs < 1000), (freqs >= 1000) & (freqs < 5000)
        alpha = 10 * np.log10(power[:, low].sum(axis=1) / power[:, mid].sum(axis=1))
        hammarberg = 10 * np.log10(power[:, freqs < 2000].max(axis=1) / power[:, (freqs >= 2000) & (freqs < 5000)].max(axis=1))
        log_mel = np.log(power @ c["mel"] + 1e-10)
        mfcc = log_mel @ c["dct"].T

        # pitch and voicing
        f0, strength = self._pitch(signal, num_frames, c)
        voiced = active & (strength > self.voicing_threshold) & (f0 >= self.f0_min) & (f0 <= self.f0_max)
        semitones = 12 * np.log2(f0[voiced] / 27.5)
        if semitones.size >= 2:
            times = np.flatnonzero(voiced) * hop / sr
            slope = float(np.polyfit(times, semitones, 1)[0])
        else:
            slope = 0.0
        voiced_runs_start, voiced_runs_length = _runs(voiced)
        same_run = np.diff(np.flatnonzero(voiced)) == 1
        jitter = float(np.mean(np.abs(np.diff(semitones))[same_run])) if same_run.any() else 0.0
        shimmer = float(np.mean(np.abs(np.diff(loudness[voiced]))[same_run])) if same_run.any() else 0.0

        # rate proxies
        duration = signal.size / sr
        smooth = np.convolve(np.pad(loudness, 2, mode="edge"), np.ones(5) / 5, mode="valid")
        # a syllable-like peak: the maximum of its +-50 ms neighbourhood, >= 3 dB above the minimum of +-100 ms
        radius = max(1, int(round(0.05 * sr / hop)))
        near = np.lib.stride_tricks.sliding_window_view(np.pad(smooth, radius, mode="edge"), 2 * radius + 1)
        around = np.lib.stride_tricks.sliding_window_view(np.pad(smooth, 2 * radius, mode="edge"), 4 * radius + 1)
        peaks = active & (smooth >= near.max(axis=1)) & (smooth - around.min(axis=1) > 3.0)
        _, pause_lengths = _runs(~active)

        a = active
        features = _stats(loudness[a])
        features += _stats(semitones) + [slope]
        features += [float(voiced.sum() / a.sum()), float(strength[a].mean()), float(strength[voiced].mean()) if voiced.any() else 0.0]
        features += [jitter, shimmer]
        for values in (centroid, rolloff, flux, flatness, zcr, alpha, hammarberg):
            features += [float(values[a].mean()), float(values[a].std())]
        mel_mean, mel_std = _mean_std(log_mel[a])
        mfcc_mean, mfcc_std = _mean_std(mfcc[a])
        features += list(mel_mean) + list(mel_std) + list(mfcc_mean) + list(mfcc_std)
        features += [
            duration,
            float(peaks.sum() / duration),
            float(len(voiced_runs_start) / duration),
            float(voiced_runs_length.mean() * hop / sr) if len(voiced_runs_length) else 0.0,
            float(pause_lengths.mean() * hop / sr) if len(pause_lengths) else 0.0,
            float(1.0 - a.sum() / num_frames) if a.sum() < num_frames else 0.0,
        ]

        # deltas, voiced / unvoiced spectra, harmonicity, spectral slopes, dynamics, percentiles
        delta_mfcc = np.gradient(mfcc, axis=0) if num_frames > 2 else np.zeros_like(mfcc)
        features += list(delta_mfcc[a].std(axis=0))
        unvoiced = a & ~voiced
        features += list(_mean_std(mfcc[voiced])[0]) + list(_mean_std(mfcc[unvoiced])[0])
        strength_voiced = np.clip(strength[voiced], 1e-3, 0.999)
        hnr = 10 * np.log10(strength_voiced / (1 - strength_voiced))  # from the normalised autocorrelation peak
        features += [float(hnr.mean()), float(hnr.std())] if hnr.size else [0.0, 0.0]
        log_power = 10 * np.log10(power)
        for band, weights in c["slope_bands"]:
            slope = log_power[:, band] @ weights  # least-squares slope (the weights are centred)
            for part in (voiced, unvoiced):
                features += [float(slope[part].mean()), float(slope[part].std())] if part.any() else [0.0, 0.0]
        frames_per_s = sr / hop
        pitch_deltas = np.diff(semitones)[same_run] * frames_per_s if same_run.any() else np.zeros(0)
        features += _rise_fall(pitch_deltas) + _rise_fall(np.diff(loudness)[a[1:]] * frames_per_s)
        features += [float(v) for v in np.percentile(semitones, [20, 80])] if semitones.size else [0.0, 0.0]
        features += [float(v) for v in np.percentile(log_mel[a], [10, 90], axis=0).reshape(-1)]
        return np.asarray(features, dtype=np.float32)

    # -- batches -------------------------------------------------------------------------------------
    def _as_list(self, raw_speech) -> list[np.ndarray]:
        if isinstance(raw_speech, np.ndarray):
            if raw_speech.ndim == 1:
                return [raw_speech]
            if raw_speech.ndim == 2:
                return list(raw_speech)
            raise ValueError(f"expected a 1-D waveform or a list of them, got an array of shape {raw_speech.shape}")
        if hasattr(raw_speech, "detach"):  # torch tensor
            return self._as_list(raw_speech.detach().cpu().numpy())
        if isinstance(raw_speech, (list, tuple)):
            if len(raw_speech) > 0 and isinstance(raw_speech[0], (int, float, np.floating)):
                return [np.asarray(raw_speech, dtype=np.float32)]
            return [np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32) for x in raw_speech]
        raise TypeError(f"cannot read audio of type {type(raw_speech).__name__}")

    def __call__(self, raw_speech, sampling_rate: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        """Statistics of each utterance: ``BatchFeature({"audio_features": [N, F]})``.

        Args:
            raw_speech: one 1-D float array (16 kHz mono) or a list of them.
            sampling_rate: the arrays' rate; must equal ``self.sampling_rate`` (resample first with
                ``merits.data.audio.load_audio``).
            return_tensors: ``"pt"``, ``"np"`` or ``None`` (numpy).
        """
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio at {sampling_rate} Hz given to a feature extractor for {self.sampling_rate} Hz; resample it first"
            )
        arrays = self._as_list(raw_speech)
        for index, array in enumerate(arrays):
            if array.ndim != 1:
                raise ValueError(f"utterance {index}: expected a 1-D mono waveform, got shape {array.shape}")
            if array.size == 0:
                raise ValueError(f"utterance {index}: empty audio (0 samples)")
        features = np.stack([self.extract(array) for array in arrays]) if arrays else np.zeros((0, self.feature_size), np.float32)
        if self.do_normalize:
            features = (features - np.asarray(self.feature_mean, np.float32)) / np.asarray(self.feature_std, np.float32)
        return BatchFeature({"audio_features": features.astype(np.float32)}, tensor_type=return_tensors)

    def fit(self, raw_speech, min_std: float = 1e-3) -> "MeritsAcousticFeatureExtractor":
        """Store the per-feature mean and std of ``raw_speech`` (training utterances) and normalise from now on."""
        self.do_normalize = False
        features = self(raw_speech)["audio_features"]
        if features.shape[0] < 2:
            raise ValueError("fit needs at least 2 utterances")
        self.feature_mean = features.mean(axis=0).astype(float).tolist()
        self.feature_std = np.maximum(features.std(axis=0), min_std).astype(float).tolist()
        self.do_normalize = True
        return self


__all__ = ["MeritsAcousticFeatureExtractor"]
