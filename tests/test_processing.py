"""Tests of `merits.processing_merits`: the conversation batches of docs/design.md section 2, audio decoding
(resampling, stereo, errors naming the conversation / turn / file), labels, postprocessing and save/load."""

import csv
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor
from merits.processing_merits import IGNORE_INDEX, MeritsProcessor, load_turn_audio, resample_audio


torch.set_num_threads(1)

CORPUS = [
    "hello there how are you",
    "i am fine thanks and you",
    "what a wonderful day it is",
    "i got the job",
    "that is terrible news",
    "oh no i am so sorry",
]
LABELS = {"neutral": 0, "joy": 1, "sadness": 2}


def make_tokenizer(corpus=CORPUS) -> PreTrainedTokenizerFast:
    """A RoBERTa-style WordLevel tokenizer trained locally with the `tokenizers` library."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=64,
    )


def tone(frequency: float, seconds: float, sampling_rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def voiced(seconds: float, f0: float = 140.0, sampling_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A crude vowel: harmonics of f0 with a slow amplitude envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    signal = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * t / max(seconds, 1e-3)))
    return (0.3 * envelope * signal + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# Batch layout
# ---------------------------------------------------------------------------------------------------------------


def test_text_and_audio_batch_layout(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer, feature_extractor=Wav2Vec2FeatureExtractor(), label2id=LABELS)
    conversations = [
        [
            {"text": "hello there", "audio": voiced(0.30)},
            {"text": "i got the job", "audio": None},
            {"text": None, "audio": voiced(0.50, seed=1)},
        ],
        [{"text": "oh no i am so sorry", "audio": voiced(0.20, seed=2)}, {"text": "", "audio": voiced(0.40, seed=3)}],
    ]
    labels = [["neutral", "joy", None], [2, "sadness"]]
    batch = processor(conversations, sampling_rate=16000, labels=labels)

    assert batch["turn_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["text_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert batch["audio_mask"].tolist() == [[1, 0, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[0, 1, IGNORE_INDEX], [2, 2, IGNORE_INDEX]]
    for key in ("turn_mask", "text_mask", "audio_mask", "labels", "input_ids", "attention_mask"):
        assert batch[key].dtype == torch.long, key

    # Utterance tensors are flattened over the N = 5 real turns in row-major order.
    texts = ["hello there", "i got the job", "", "oh no i am so sorry", ""]
    assert batch["input_ids"].shape[0] == 5
    for row, text in enumerate(texts):
        expected = tokenizer(text)["input_ids"]
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == expected
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()

    # Audio: real lengths in the same order, a short silent placeholder where a turn has no audio.
    lengths = batch["audio_attention_mask"].sum(-1).tolist()
    assert lengths == [4800, 1600, 8000, 3200, 6400]
    assert batch["input_values"].shape == (5, 8000)
    assert batch["input_values"].dtype == torch.float32
    assert torch.all(batch["input_values"][1] == 0)


def test_single_conversation_and_flat_labels(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer, label2id=LABELS)
    batch = processor([{"text": "hello there"}, {"text": "i got the job"}], labels=["neutral", "joy"])
    assert batch["turn_mask"].shape == (1, 2)
    assert batch["labels"].tolist() == [[0, 1]]
    assert "input_values" not in batch and "audio_features" not in batch


def test_return_numpy(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer)
    batch = processor([[{"text": "hello"}]], return_tensors="np")
    assert isinstance(batch["input_ids"], np.ndarray)
    assert isinstance(batch["turn_mask"], np.ndarray)


def test_max_length_truncates(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer, max_length=4)
    batch = processor([[{"text": "what a wonderful day it is"}]])
    assert batch["input_ids"].shape == (1, 4)
    batch = processor([[{"text": "what a wonderful day it is"}]], max_length=6)
    assert batch["input_ids"].shape == (1, 6)


def test_acoustic_feature_extractor_gives_conversation_layout():
    feature_extractor = MeritsAcousticFeatureExtractor()
    processor = MeritsProcessor(feature_extractor=feature_extractor)
    first, second, third = voiced(0.6), voiced(0.4, f0=220, seed=1), voiced(0.5, f0=110, seed=2)
    batch = processor([[{"audio": first}, {"audio": second}], [{"audio": third}]])
    features = batch["audio_features"]
    assert features.shape == (2, 2, feature_extractor.feature_size)
    expected = feature_extractor([first, second, third])["audio_features"]
    np.testing.assert_allclose(features[0, 0].numpy(), expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[0, 1].numpy(), expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[1, 0].numpy(), expected[2], rtol=1e-5, atol=1e-5)
    assert torch.all(features[1, 1] == 0)  # padded turn


def test_whisper_feature_extractor_gives_input_features():
    processor = MeritsProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80))
    batch = processor([[{"audio": voiced(0.5)}, {"audio": voiced(0.3, seed=1)}]])
    assert batch["input_features"].shape == (2, 80, 3000)
    assert batch["audio_attention_mask"].shape == (2, 3000)
    assert batch["audio_attention_mask"].sum(-1).tolist() == [50, 30]


def test_without_feature_extractor_returns_raw_waveforms():
    processor = MeritsProcessor()
    audio = voiced(0.25)
    batch = processor([[{"audio": audio}, {"audio": voiced(0.1, seed=1)}]])
    assert batch["input_values"].shape == (2, 4000)
    np.testing.assert_array_equal(batch["input_values"][0].numpy(), audio)
    assert batch["audio_attention_mask"].sum(-1).tolist() == [4000, 1600]


# ---------------------------------------------------------------------------------------------------------------
# Resampling and channel mixing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orig_rate", [8000, 22050, 44100, 48000])
def test_resampling_preserves_an_in_band_tone(orig_rate):
    signal = tone(440.0, 1.0, orig_rate)
    resampled = resample_audio(signal, orig_rate, 16000)
    assert resampled.shape == (math.ceil(signal.shape[0] * 16000 / orig_rate),)
    assert resampled.dtype == np.float32
    expected = tone(440.0, resampled.shape[0] / 16000, 16000)[: resampled.shape[0]]
    interior = slice(400, -400)  # away from the zero-padded edges
    assert np.abs(resampled[interior] - expected[interior]).max() < 1e-3


def test_resampling_matches_soxr():
    soxr = pytest.importorskip("soxr")
    signal = voiced(1.0, sampling_rate=44100)
    ours = resample_audio(signal, 44100, 16000)
    reference = soxr.resample(signal, 44100, 16000, quality="HQ")
    n = min(ours.shape[0], reference.shape[0])
    assert np.abs(ours[400 : n - 400] - reference[400 : n - 400]).max() < 2e-3


def test_resampling_removes_content_above_the_new_nyquist():
    aliased = resample_audio(tone(10000.0, 1.0, 44100), 44100, 16000)  # 10 kHz > 8 kHz Nyquist
    assert np.sqrt(np.mean(aliased[400:-400] ** 2)) < 1e-3
    kept = resample_audio(tone(6000.0, 1.0, 44100), 44100, 16000)
    assert np.sqrt(np.mean(kept[400:-400] ** 2)) > 0.3  # 0.5 / sqrt(2) = 0.354


def test_upsampling_and_identity():
    signal = tone(300.0, 0.5, 8000)
    up = resample_audio(signal, 8000, 16000)
    assert up.shape == (8000,)
    np.testing.assert_array_equal(resample_audio(signal, 16000, 16000), signal)


def test_stereo_arrays_are_mixed_to_mono():
    left, right = voiced(0.5), voiced(0.5, f0=200, seed=1)
    mono = (left + right) / 2
    np.testing.assert_allclose(load_turn_audio(np.stack([left, right], axis=1), 16000), mono, atol=1e-6)
    np.testing.assert_allclose(load_turn_audio(np.stack([left, right], axis=0), 16000), mono, atol=1e-6)


def test_audio_files_are_decoded_mixed_and_resampled(tmp_path):
    left, right = voiced(0.5, sampling_rate=22050), voiced(0.5, f0=200, sampling_rate=22050, seed=1)
    stereo_path = tmp_path / "stereo.wav"
    soundfile.write(stereo_path, np.stack([left, right], axis=1), 22050, subtype="FLOAT")
    decoded = load_turn_audio(str(stereo_path))
    expected = resample_audio((left + right) / 2, 22050, 16000)
    assert decoded.shape == expected.shape
    np.testing.assert_allclose(decoded, expected, atol=1e-5)

    pcm_path = tmp_path / "pcm16.wav"
    soundfile.write(pcm_path, voiced(0.3), 16000, subtype="PCM_16")
    np.testing.assert_allclose(load_turn_audio(pcm_path), voiced(0.3), atol=1e-4)  # os.PathLike works too

    # Through the processor, with a per-turn sampling rate for an array and a datasets-style dict.
    processor = MeritsProcessor()
    batch = processor(
        [[{"audio": str(stereo_path)}, {"audio": left, "sampling_rate": 22050}, {"audio": {"path": str(pcm_path)}}]]
    )
    lengths = batch["audio_attention_mask"].sum(-1).tolist()
    assert lengths == [expected.shape[0], expected.shape[0], 4800]
    np.testing.assert_allclose(batch["input_values"][0, : expected.shape[0]].numpy(), expected, atol=1e-5)


def test_integer_arrays_are_scaled():
    pcm = (voiced(0.2) * 32767).astype(np.int16)
    np.testing.assert_allclose(load_turn_audio(pcm, 16000), voiced(0.2), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Errors name the conversation, the turn and the file
# ---------------------------------------------------------------------------------------------------------------


def test_error_empty_conversation(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer)
    with pytest.raises(ValueError, match="Conversation 1 is empty"):
        processor([[{"text": "hello"}], []])


def test_error_turn_without_text_or_audio(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer)
    with pytest.raises(ValueError, match="conversation 0, turn 2 has neither text nor audio"):
        processor([[{"text": "hello"}, {"text": "hi"}, {"text": "   ", "audio": None}]])


def test_error_unreadable_audio_names_the_file(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"this is not a wav file at all" * 10)
    processor = MeritsProcessor()
    with pytest.raises(ValueError, match=r"conversation 1, turn 0: could not decode audio file .*garbage\.wav"):
        processor([[{"audio": voiced(0.1)}], [{"audio": str(bad)}]])
    with pytest.raises(FileNotFoundError, match=r"conversation 0, turn 1: audio file .*missing\.wav"):
        processor([[{"audio": voiced(0.1)}, {"audio": str(tmp_path / "missing.wav")}]])


def test_error_empty_audio(tmp_path):
    processor = MeritsProcessor()
    with pytest.raises(ValueError, match="conversation 0, turn 1: audio array is empty"):
        processor([[{"audio": voiced(0.1)}, {"audio": np.zeros(0, np.float32)}]])
    empty_path = tmp_path / "empty.wav"
    soundfile.write(empty_path, np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match=r"conversation 0, turn 0: audio file .*empty\.wav' contains no samples"):
        processor([[{"audio": str(empty_path)}]])
    with pytest.raises(ValueError, match="conversation 0, turn 0: the audio array holds NaN or inf"):
        processor([[{"audio": np.array([0.0, np.nan, 0.1], np.float32)}]])


def test_error_when_soundfile_is_missing(tmp_path, monkeypatch):
    path = tmp_path / "a.wav"
    soundfile.write(path, voiced(0.1), 16000)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # makes `import soundfile` raise ImportError
    with pytest.raises(ImportError, match="needs the `soundfile` package"):
        MeritsProcessor()([[{"audio": str(path)}]])
    # Arrays do not need soundfile.
    assert MeritsProcessor()([[{"audio": voiced(0.1)}]])["input_values"].shape == (1, 1600)


def test_error_bad_labels(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer, label2id=LABELS)
    conversation = [{"text": "hello"}, {"text": "hi"}]
    with pytest.raises(ValueError, match=r"conversation 0, turn 1: unknown label 'anger'"):
        processor([conversation], labels=[["joy", "anger"]])
    with pytest.raises(ValueError, match="conversation 0: 1 labels for 2 turns"):
        processor([conversation], labels=[["joy"]])
    with pytest.raises(ValueError, match="conversation 0, turn 0: label id 7 is out of range"):
        processor([conversation], labels=[[7, 0]])
    with pytest.raises(ValueError, match="has no `label2id`"):
        MeritsProcessor(tokenizer=tokenizer)([conversation], labels=[["joy", "joy"]])


def test_error_bad_types(tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer)
    with pytest.raises(TypeError, match="conversation 0, turn 0: 'text' must be a str"):
        processor([[{"text": 3}]])
    with pytest.raises(TypeError, match="got a single dict"):
        processor({"text": "hello"})
    with pytest.raises(ValueError, match="an audio array needs its `sampling_rate`"):
        load_turn_audio(voiced(0.1), None, where="conversation 0, turn 0")
    with pytest.raises(TypeError, match="must be a transformers tokenizer"):
        MeritsProcessor(tokenizer="roberta-base")


# ---------------------------------------------------------------------------------------------------------------
# Postprocessing
# ---------------------------------------------------------------------------------------------------------------


def test_postprocess_per_turn_dicts():
    processor = MeritsProcessor(label2id=LABELS)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], [[0.0, 0.0, 1.0], [9.0, 9.0, 9.0]]])
    turn_mask = torch.tensor([[1, 1], [1, 0]])
    gate = torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]], [[1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]]])
    results = processor.postprocess(logits, turn_mask, gate_weights=gate)
    assert [len(turns) for turns in results] == [2, 1]
    first = results[0][0]
    assert first["label"] == "neutral"
    assert first["score"] == pytest.approx(math.exp(2) / (math.exp(2) + 2))
    assert sum(first["scores"].values()) == pytest.approx(1.0)
    assert results[0][1]["label"] == "joy" and results[1][0]["label"] == "sadness"
    assert first["gate"] == pytest.approx({"speech": 0.2, "text": 0.3, "cross-modal": 0.5})
    plain = processor.postprocess(logits, turn_mask, id2label={0: "a", 1: "b", 2: "c"})
    assert plain[0][1]["label"] == "b" and "gate" not in plain[0][1]
    with pytest.raises(ValueError, match="2 classes|3 classes"):
        processor.postprocess(logits, turn_mask, id2label={0: "a", 1: "b"})


# ---------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------


def _assert_same_batches(first, second):
    assert sorted(first.keys()) == sorted(second.keys())
    for key in first:
        torch.testing.assert_close(first[key], second[key], msg=key)


def test_save_and_load_with_tokenizer_and_wav2vec2_extractor(tmp_path, tokenizer):
    processor = MeritsProcessor(
        tokenizer=tokenizer,
        feature_extractor=Wav2Vec2FeatureExtractor(do_normalize=True),
        label2id=LABELS,
        max_length=16,
    )
    processor.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = MeritsProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.feature_extractor, Wav2Vec2FeatureExtractor)
    assert loaded.label2id == LABELS and loaded.max_length == 16
    conversations = [[{"text": "i got the job", "audio": voiced(0.3)}, {"text": "hello"}]]
    _assert_same_batches(
        processor(conversations, labels=[["joy", "neutral"]]), loaded(conversations, labels=[["joy", "neutral"]])
    )
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast)


def test_save_and_load_with_fitted_acoustic_extractor(tmp_path):
    feature_extractor = MeritsAcousticFeatureExtractor()
    feature_extractor.fit([voiced(0.4, f0=f0, seed=i) for i, f0 in enumerate((100, 150, 200, 250))])
    processor = MeritsProcessor(feature_extractor=feature_extractor)
    processor.save_pretrained(tmp_path)
    loaded = MeritsProcessor.from_pretrained(tmp_path)
    assert loaded.tokenizer is None
    assert isinstance(loaded.feature_extractor, MeritsAcousticFeatureExtractor)
    assert loaded.feature_extractor.do_normalize
    conversations = [[{"audio": voiced(0.5, f0=170, seed=9)}]]
    _assert_same_batches(processor(conversations), loaded(conversations))


def test_save_and_load_text_only(tmp_path, tokenizer):
    processor = MeritsProcessor(tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    loaded = MeritsProcessor.from_pretrained(tmp_path)
    assert loaded.feature_extractor is None
    _assert_same_batches(processor([[{"text": "hello there"}]]), loaded([[{"text": "hello there"}]]))


# ---------------------------------------------------------------------------------------------------------------
# Real audio: EmoDB clips (22,050 Hz, 16-bit PCM) from the shared data folder
# ---------------------------------------------------------------------------------------------------------------

SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_real_emodb_clips_decode_like_soxr():
    emodb = SHARED_DATA / "emodb"
    if not (emodb / "labels.csv").is_file():
        pytest.skip(f"EmoDB not found at {emodb} (set MERITS_SHARED_DATA to the shared data folder)")
    soxr = pytest.importorskip("soxr")
    with open(emodb / "labels.csv", newline="") as reader:
        rows = list(csv.DictReader(reader))[:3]
    processor = MeritsProcessor(feature_extractor=MeritsAcousticFeatureExtractor())
    conversation = [{"audio": str(emodb / row["file"])} for row in rows]
    batch = processor(conversation, return_tensors="np")
    assert batch["audio_features"].shape == (1, 3, processor.feature_extractor.feature_size)
    assert np.isfinite(batch["audio_features"]).all()
    for row in rows:
        array, rate = soundfile.read(emodb / row["file"], dtype="float32")
        assert rate == 22050
        ours = load_turn_audio(str(emodb / row["file"]))
        reference = soxr.resample(array, rate, 16000, quality="HQ")
        assert ours.shape == (32000,)  # 2.0 s at 16 kHz
        n = min(ours.shape[0], reference.shape[0])
        difference = ours[:n] - reference[:n]
        snr_db = 10 * np.log10(np.sum(reference[:n] ** 2) / np.sum(difference**2))
        assert snr_db > 40, (row["file"], snr_db)  # the filters differ only near the 8 kHz band edge


# ---------------------------------------------------------------------------------------------------------------
# Loading with the keyword arguments that `transformers.pipeline()` passes to every component
# ---------------------------------------------------------------------------------------------------------------


def test_from_pretrained_ignores_model_loading_kwargs(tmp_path, tokenizer):
    from transformers import AutoProcessor

    import merits  # noqa: F401  (registers MeritsProcessor for AutoProcessor, so save_pretrained writes auto_map)

    processor = MeritsProcessor(tokenizer=tokenizer, feature_extractor=Wav2Vec2FeatureExtractor(), label2id=LABELS)
    processor.save_pretrained(tmp_path)
    conversations = [[{"text": "i got the job", "audio": voiced(0.3)}, {"text": "hello"}]]
    # what `pipeline(..., dtype=..., device_map=..., model_kwargs=...)` forwards to AutoProcessor
    loaded = AutoProcessor.from_pretrained(
        tmp_path, trust_remote_code=True, dtype=torch.float32, torch_dtype=torch.float32, device_map="cpu",
        revision="main", token=None, cache_dir=str(tmp_path / "cache"), code_revision=None, _from_pipeline="x",
        low_cpu_mem_usage=True, attn_implementation="eager",
    )
    assert type(loaded).__name__ == "MeritsProcessor" and loaded.label2id == LABELS
    _assert_same_batches(processor(conversations), loaded(conversations))
    # processor arguments still override the saved ones; unknown arguments are ignored with a warning, not a crash
    loaded = MeritsProcessor.from_pretrained(tmp_path, dtype=torch.bfloat16, max_length=3, use_fast=True, foo=1)
    assert loaded.max_length == 3 and loaded.tokenizer.is_fast
    assert loaded([[{"text": "what a wonderful day it is"}]])["input_ids"].shape[-1] == 3


def test_pipeline_keeps_the_processor_when_given_a_dtype(tmp_path, tokenizer):
    from transformers import pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _tiny import tiny_merits_config, tiny_roberta_config

    from merits import MeritsForConversationClassification, save_hub_folder

    torch.manual_seed(0)
    config = tiny_merits_config("merits-l", text_config=tiny_roberta_config(vocab_size=len(tokenizer)), audio_embed_dim=None,
                                id2label={0: "neutral", 1: "joy", 2: "sadness"})
    model = MeritsForConversationClassification(config).eval()
    save_hub_folder(model, MeritsProcessor(tokenizer=tokenizer, label2id=LABELS), tmp_path / "hub")
    classifier = pipeline("conversation-emotion-recognition", model=str(tmp_path / "hub"), trust_remote_code=True,
                          dtype=torch.float32)
    assert classifier.processor is not None and type(classifier.processor).__name__ == "MeritsProcessor"
    output = classifier([{"text": "hello there"}, {"text": "i got the job"}])
    assert [set(turn) >= {"label", "score", "scores"} for turn in output] == [True, True]
