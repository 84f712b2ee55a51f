"""Audio decoding (merits.data.audio) and the acoustic feature extractor (merits/feature_extraction_merits.py)."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from merits.data.audio import AudioError, load_audio
from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor

SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RATE = 16000


def harmonic(f0=150.0, seconds=1.0, rate=RATE, amplitude=0.1, syllable_rate=None, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    signal = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * amplitude
    if syllable_rate:
        signal = signal * (0.5 - 0.5 * np.cos(2 * np.pi * syllable_rate * t))
    return (signal + 1e-3 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- load_audio


def test_load_audio_path_array_dict_stereo_and_resampling(tmp_path):
    tone = harmonic(seconds=0.5, rate=22050)
    path = tmp_path / "tone.wav"
    soundfile.write(str(path), np.stack([tone, tone], axis=1), 22050)  # stereo, 22.05 kHz
    from_path = load_audio(path)
    assert from_path.dtype == np.float32 and from_path.ndim == 1 and from_path.shape == (8000,)
    from_dict = load_audio({"path": str(path), "array": None, "sampling_rate": None})
    np.testing.assert_allclose(from_dict, from_path)
    from_array = load_audio({"path": None, "array": tone.tolist(), "sampling_rate": 22050})
    np.testing.assert_allclose(from_array, from_path, atol=1e-3)  # 16-bit file vs float array
    assert load_audio(tone[:1000], sampling_rate=16000).shape == (1000,)  # a bare array is taken at the target rate
    # resampling keeps the pitch: the spectral peak of a 440 Hz sine stays at 440 Hz
    sine = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    resampled = load_audio({"array": sine, "sampling_rate": 44100, "path": None})
    spectrum = np.abs(np.fft.rfft(resampled))
    assert abs(np.fft.rfftfreq(resampled.size, 1 / 16000)[spectrum.argmax()] - 440) < 2


def test_load_audio_rejects_bad_input_naming_the_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
    with pytest.raises(AudioError, match="corrupt.wav: cannot decode audio"):
        load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    soundfile.write(str(empty), np.zeros(0, np.float32), RATE)
    with pytest.raises(AudioError, match="empty.wav: empty audio"):
        load_audio(empty)
    silent = tmp_path / "silent.wav"
    soundfile.write(str(silent), np.zeros(1600, np.float32), RATE)
    with pytest.raises(AudioError, match="silent.wav: audio is silent"):
        load_audio(silent)
    assert load_audio(silent, allow_silent=True).shape == (1600,)
    with pytest.raises(AudioError, match="needs its 'sampling_rate'"):
        load_audio({"array": [0.1, 0.2], "path": None})
    with pytest.raises(AudioError, match="NaN"):
        load_audio(np.array([0.1, np.nan], np.float32))
    with pytest.raises(AudioError, match="dialogue 'd1', turn 3: .*nope.wav"):
        load_audio(str(tmp_path / "nope.wav"), source="dialogue 'd1', turn 3")


def test_datasets_audio_feature_is_not_relied_on():
    """datasets.Audio needs torchcodec; our schema stores plain structs, so building a corpus never touches it."""
    from merits.data.schema import conversation_features

    features = conversation_features(["a", "b"])
    assert not any(type(feature).__name__ == "Audio" for feature in features.values())


# --------------------------------------------------------------------------------------- feature extractor


def test_feature_extractor_shapes_and_names():
    extractor = MeritsAcousticFeatureExtractor()
    assert extractor.feature_size == len(extractor.feature_names) == 225
    assert len(set(extractor.feature_names)) == 225
    batch = extractor([harmonic(seconds=0.5), harmonic(seconds=1.2)], sampling_rate=RATE, return_tensors="pt")
    assert set(batch) == {"audio_features"}
    assert batch["audio_features"].shape == (2, 225) and batch["audio_features"].dtype == torch.float32
    assert torch.isfinite(batch["audio_features"]).all()
    single = extractor(harmonic(seconds=0.5))["audio_features"]
    np.testing.assert_allclose(single[0], batch["audio_features"][0].numpy(), rtol=1e-5, atol=1e-5)
    # very short, silent and constant inputs still give finite vectors (the processor pads missing turns with zeros)
    for signal in (np.zeros(16000, np.float32), np.full(100, 0.1, np.float32), np.random.default_rng(0).standard_normal(50)):
        assert np.isfinite(extractor(signal)["audio_features"]).all()
    with pytest.raises(ValueError, match="resample it first"):
        extractor(harmonic(), sampling_rate=22050)
    with pytest.raises(ValueError, match="utterance 1: empty audio"):
        extractor([harmonic(), np.zeros(0, np.float32)])


@pytest.mark.parametrize("f0", [80.0, 130.0, 220.0, 400.0])
def test_feature_extractor_pitch(f0):
    extractor = MeritsAcousticFeatureExtractor()
    features = dict(zip(extractor.feature_names, extractor(harmonic(f0=f0))["audio_features"][0]))
    estimated = 27.5 * 2 ** (features["pitch_st_p50"] / 12)
    assert abs(12 * np.log2(estimated / f0)) < 0.3  # within a third of a semitone
    assert features["voiced_fraction"] > 0.9
    noise = np.random.default_rng(1).standard_normal(RATE).astype(np.float32) * 0.1
    unvoiced = dict(zip(extractor.feature_names, extractor(noise)["audio_features"][0]))
    assert unvoiced["voiced_fraction"] < 0.2


def chirp(f_start=120.0, f_end=240.0, seconds=1.0, rate=RATE, amplitude=0.1):
    """A harmonic tone whose F0 glides exponentially from f_start to f_end (a constant rate in semitones / s)."""
    t = np.arange(int(seconds * rate)) / rate
    k = np.log(f_end / f_start) / seconds
    phase = 2 * np.pi * f_start * (np.exp(k * t) - 1) / k
    return (sum(np.sin(h * phase) / h for h in range(1, 8)) * amplitude).astype(np.float32)


def test_feature_extractor_pitch_dynamics_follow_a_chirp():
    extractor = MeritsAcousticFeatureExtractor()
    names = extractor.feature_names
    rising = dict(zip(names, extractor(chirp(120.0, 240.0))["audio_features"][0]))  # one octave in 1 s: 12 st/s
    falling = dict(zip(names, extractor(chirp(240.0, 120.0))["audio_features"][0]))
    steady = dict(zip(names, extractor(harmonic(f0=180.0))["audio_features"][0]))
    assert rising["pitch_st_slope"] == pytest.approx(12.0, abs=1.0)
    assert falling["pitch_st_slope"] == pytest.approx(-12.0, abs=1.0)
    assert rising["pitch_delta_st_per_s_rise_mean"] > 3 * rising["pitch_delta_st_per_s_fall_mean"]
    assert falling["pitch_delta_st_per_s_fall_mean"] > 3 * falling["pitch_delta_st_per_s_rise_mean"]
    assert rising["pitch_delta_st_per_s_rise_mean"] == pytest.approx(12.0, abs=1.0)
    assert steady["pitch_delta_st_per_s_rise_mean"] < 1.0 and steady["pitch_delta_st_per_s_fall_mean"] < 1.0
    # F0 percentiles of the rising chirp: p20 / p80 of an even glide from 0 to 12 semitones above 120 Hz
    base = 12 * np.log2(120.0 / 27.5)
    assert rising["pitch_st_p20"] == pytest.approx(base + 0.2 * 12, abs=1.0)
    assert rising["pitch_st_p80"] == pytest.approx(base + 0.8 * 12, abs=1.0)
    # the steady tone has voiced but no unvoiced frames, so its unvoiced MFCC means are the zeros of "none"
    assert all(steady[f"mfcc{i}_unvoiced_mean"] == 0.0 for i in range(13))
    assert steady["mfcc1_voiced_mean"] == pytest.approx(steady["mfcc1_mean"], abs=1e-3)


def test_feature_extractor_harmonicity_slope_and_deltas():
    extractor = MeritsAcousticFeatureExtractor()
    names = extractor.feature_names
    rng = np.random.default_rng(2)

    def values(signal):
        return dict(zip(names, extractor(signal)["audio_features"][0]))

    clean = values(harmonic(f0=150.0, amplitude=0.1))
    noisy = values(harmonic(f0=150.0, amplitude=0.1) + 0.04 * rng.standard_normal(RATE).astype(np.float32))
    assert clean["hnr_db_mean"] > noisy["hnr_db_mean"] + 3
    # spectral slopes: white noise is flat, integrated ("brown", -6 dB / octave) noise falls steeply
    white = rng.standard_normal(RATE) * 0.05
    brown = np.cumsum(white)
    brown = brown - np.convolve(brown, np.ones(401) / 401, mode="same")  # remove the slow drift
    white, brown = values(white.astype(np.float32)), values((brown / np.abs(brown).max() * 0.1).astype(np.float32))
    assert abs(white["slope_500_1500_unvoiced_mean"]) < 3
    assert brown["slope_0_500_unvoiced_mean"] < white["slope_0_500_unvoiced_mean"] - 20
    assert brown["slope_500_1500_unvoiced_mean"] < white["slope_500_1500_unvoiced_mean"] - 5
    # a syllable-like amplitude modulation moves the spectrum from frame to frame: larger MFCC-0 deltas and
    # loudness changes than the steady tone
    modulated = values(harmonic(f0=150.0, syllable_rate=4.0))
    assert modulated["mfcc0_delta_std"] > 3 * clean["mfcc0_delta_std"]
    assert modulated["loudness_delta_db_per_s_rise_mean"] > 3 * clean["loudness_delta_db_per_s_rise_mean"]
    assert modulated["logmel5_p90"] - modulated["logmel5_p10"] > clean["logmel5_p90"] - clean["logmel5_p10"] + 1


def test_feature_extractor_energy_and_rate_follow_the_signal():
    extractor = MeritsAcousticFeatureExtractor()
    names = extractor.feature_names

    def value(signal, name):
        return extractor(signal)["audio_features"][0][names.index(name)]

    quiet, loud = harmonic(amplitude=0.01), harmonic(amplitude=0.1)
    assert value(loud, "loudness_mean") - value(quiet, "loudness_mean") == pytest.approx(20.0, abs=0.5)
    slow, fast = harmonic(seconds=1.5, syllable_rate=2.0), harmonic(seconds=1.5, syllable_rate=6.0)
    assert value(slow, "loudness_peaks_per_s") < value(fast, "loudness_peaks_per_s")
    assert 5.0 <= value(fast, "loudness_peaks_per_s") <= 7.5
    assert value(harmonic(seconds=0.7), "duration_s") == pytest.approx(0.7)


def test_feature_extractor_fit_save_and_load(tmp_path):
    extractor = MeritsAcousticFeatureExtractor()
    training = [harmonic(f0=f0, amplitude=a, seconds=s) for f0, a, s in [(100, 0.05, 0.6), (180, 0.1, 0.9), (250, 0.2, 1.1), (140, 0.02, 0.8)]]
    extractor.fit(training)
    normalised = extractor(training)["audio_features"]
    np.testing.assert_allclose(normalised.mean(axis=0), 0.0, atol=1e-4)
    extractor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = MeritsAcousticFeatureExtractor.from_pretrained(tmp_path)
    assert reloaded.do_normalize and reloaded.feature_size == 225
    np.testing.assert_allclose(reloaded(training)["audio_features"], normalised, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs feature_mean and feature_std"):
        MeritsAcousticFeatureExtractor(do_normalize=True)


@pytest.mark.skipif(not (SHARED_DATA / "emodb").is_dir(), reason=f"shared data {SHARED_DATA / 'emodb'} is absent (set MERITS_SHARED_DATA)")
def test_emodb_features_separate_anger_from_sadness():
    """Real speech: 22.05 kHz EmoDB clips resampled to 16 kHz; anger is higher-pitched with a flatter spectrum than
    sadness (the clips here are level-normalised, so loudness is not compared)."""
    from merits.data import load_emodb

    train = load_emodb(SHARED_DATA / "emodb")["train"]
    names = train.features["label"].names
    extractor = MeritsAcousticFeatureExtractor()
    chosen = {"anger": [], "sadness": []}
    for audio, label in zip(train["audio"], train["label"]):
        if names[label] in chosen and len(chosen[names[label]]) < 12:
            chosen[names[label]].append(load_audio(audio))
    stats = {emotion: extractor(arrays)["audio_features"] for emotion, arrays in chosen.items()}
    column = extractor.feature_names.index
    assert stats["anger"][:, column("pitch_st_mean")].mean() > stats["sadness"][:, column("pitch_st_mean")].mean() + 2
    assert stats["anger"][:, column("centroid_khz_mean")].mean() > stats["sadness"][:, column("centroid_khz_mean")].mean() + 0.3
    assert stats["anger"][:, column("alpha_ratio_db_mean")].mean() < stats["sadness"][:, column("alpha_ratio_db_mean")].mean() - 3
