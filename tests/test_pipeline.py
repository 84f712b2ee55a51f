"""Tests of `merits.pipeline_merits.ConversationEmotionRecognitionPipeline` (api.md section 7).

Tiny random models (tests/_tiny.py), a tokenizer trained locally and synthesized audio: no downloads.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from _fresh import HIDE_MERITS
from _tiny import tiny_merits_config, tiny_roberta_config, tiny_wavlm_config
from test_processing import make_tokenizer, voiced
from transformers import Wav2Vec2FeatureExtractor

from merits import MeritsForConversationClassification, MeritsProcessor, save_hub_folder
from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor
from merits.pipeline_merits import ConversationEmotionRecognitionPipeline


torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def build(architecture="mister-e", text=True, audio=True, causal=False, seed=0, **kwargs):
    """A tiny model with a RoBERTa text encoder and/or a WavLM speech encoder, and its processor.

    `initializer_range=0.3` makes the logits far from uniform, so that comparisons are meaningful."""
    torch.manual_seed(seed)
    config = tiny_merits_config(
        architecture,
        text_config=tiny_roberta_config() if text else None,
        audio_config=tiny_wavlm_config() if audio else None,
        causal=causal,
        initializer_range=0.3,
        **kwargs,
    )
    model = MeritsForConversationClassification(config).eval()
    processor = MeritsProcessor(
        tokenizer=make_tokenizer() if text else None,
        feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True) if audio else None,
    )
    return model, processor


def make_pipeline(model, processor, **kwargs):
    return ConversationEmotionRecognitionPipeline(model=model, processor=processor, device=-1, **kwargs)


def conversations():
    return [
        [
            {"text": "hello there how are you", "audio": voiced(0.5, seed=1), "sampling_rate": 16000},
            {"text": "i got the job"},
            {"audio": voiced(1.1, f0=220, seed=2), "sampling_rate": 22050},
            {"text": "what a wonderful day it is", "audio": voiced(0.3, seed=3), "sampling_rate": 8000},
        ],
        [
            {"text": "oh no i am so sorry", "audio": voiced(0.7, f0=110, seed=4), "sampling_rate": 16000},
            {"text": "that is terrible news"},
        ],
        [{"text": "i am fine thanks and you"}],
    ]


def reference_probabilities(model, processor, conversation):
    """The model's own forward on the processor's batch: what the pipeline must reproduce."""
    with torch.no_grad():
        batch = dict(processor(conversations=[conversation], return_tensors="pt"))
        if model.config.has_audio and "input_values" not in batch and "audio_features" not in batch:
            # no turn has audio: the model still expects the modality (all absent)
            batch["audio_embeds"] = torch.zeros(*batch["turn_mask"].shape, model.config.audio_embed_dim)
        return model(**batch).logits.softmax(-1)[0].numpy()


def probabilities(turns, model):
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return np.array([[turn["scores"][name] for name in names] for turn in turns])


@pytest.mark.parametrize("architecture", ["mister-e", "merits-l"])
def test_batched_length_grouped_output_equals_plain_forward(architecture):
    model, processor = build(architecture)
    classifier = make_pipeline(model, processor)
    convs = conversations()
    batched = classifier(convs, batch_size=2, utterance_batch_size=2)
    assert len(batched) == 3 and [len(c) for c in batched] == [4, 2, 1]
    for conversation, output in zip(convs, batched):
        expected = reference_probabilities(model, processor, conversation)
        got = probabilities(output, model)
        np.testing.assert_allclose(got, expected, atol=2e-5)
        for turn, row in zip(output, expected):
            assert turn["label"] == model.config.id2label[int(row.argmax())]
            assert turn["score"] == pytest.approx(float(row.max()), abs=2e-5)
            assert sum(turn["scores"].values()) == pytest.approx(1.0, abs=1e-5)
            if architecture == "mister-e":
                assert set(turn["gate"]) == {"speech", "text", "cross-modal"}
                assert sum(turn["gate"].values()) == pytest.approx(1.0, abs=1e-5)
            else:
                assert "gate" not in turn
    # a single conversation gives a flat list of turns, the same as inside a batch
    single = classifier(convs[1])
    np.testing.assert_allclose(probabilities(single, model), probabilities(batched[1], model), atol=2e-5)
    # the plain path (one forward per conversation batch) agrees too
    plain = classifier(convs, batch_size=3, group_by_length=False)
    for a, b in zip(plain, batched):
        np.testing.assert_allclose(probabilities(a, model), probabilities(b, model), atol=2e-5)


def test_mister_e_gate_follows_the_available_modalities():
    model, processor = build("mister-e")
    output = make_pipeline(model, processor)(conversations()[0])
    assert output[1]["gate"]["speech"] == pytest.approx(0.0, abs=1e-6)  # text-only turn
    assert output[2]["gate"]["text"] == pytest.approx(0.0, abs=1e-6)  # audio-only turn
    assert output[2]["gate"]["cross-modal"] == pytest.approx(0.0, abs=1e-6)


def test_bf16_is_close_to_float32():
    model, processor = build("merits-l")
    classifier = make_pipeline(model, processor)
    convs = conversations()
    full = classifier(convs)
    half = classifier(convs, bf16=True)
    for a, b in zip(full, half):
        np.testing.assert_allclose(probabilities(a, model), probabilities(b, model), atol=0.05)


def test_audio_files_any_rate_and_stereo_equal_the_arrays(tmp_path):
    model, processor = build("mister-e")
    classifier = make_pipeline(model, processor)
    mono = voiced(0.6, seed=7)
    path = tmp_path / "stereo_44k.wav"
    import soxr

    at_44k = soxr.resample(mono, 16000, 44100)
    soundfile.write(path, np.stack([at_44k, at_44k], axis=1), 44100)
    from_file = classifier([{"text": "i got the job", "audio": str(path)}])
    from_array = classifier([{"text": "i got the job", "audio": at_44k, "sampling_rate": 44100}])
    np.testing.assert_allclose(probabilities(from_file, model), probabilities(from_array, model), atol=1e-4)
    from_dict = classifier([{"text": "i got the job", "audio": {"array": at_44k, "sampling_rate": 44100}}])
    np.testing.assert_allclose(probabilities(from_dict, model), probabilities(from_array, model), atol=1e-6)


def test_text_only_model_and_top_k():
    model, processor = build("merits-l", audio=False, audio_embed_dim=None)
    classifier = make_pipeline(model, processor, top_k=2)
    output = classifier([{"text": "hello there"}, {"text": "that is terrible news", "audio": voiced(0.2), "sampling_rate": 16000}])
    assert [len(turn["scores"]) for turn in output] == [2, 2]
    assert all(turn["label"] == max(turn["scores"], key=turn["scores"].get) for turn in output)
    with pytest.raises(ValueError, match=r"conversation 0, turn 1: this model reads text only.*asr_model"):
        classifier([{"text": "hello"}, {"audio": voiced(0.2), "sampling_rate": 16000}])


def test_acoustic_feature_route():
    torch.manual_seed(0)
    extractor = MeritsAcousticFeatureExtractor()
    config = tiny_merits_config(
        "mister-e", text_config=tiny_roberta_config(), audio_feature_dim=extractor.feature_size, initializer_range=0.3
    )
    model = MeritsForConversationClassification(config).eval()
    processor = MeritsProcessor(tokenizer=make_tokenizer(), feature_extractor=extractor)
    convs = conversations()
    output = make_pipeline(model, processor)(convs, batch_size=2)
    for conversation, turns in zip(convs, output):
        np.testing.assert_allclose(
            probabilities(turns, model), reference_probabilities(model, processor, conversation), atol=2e-5
        )


def test_feature_only_model_takes_embeddings():
    torch.manual_seed(0)
    model = MeritsForConversationClassification(tiny_merits_config("mister-e", initializer_range=0.3)).eval()
    classifier = ConversationEmotionRecognitionPipeline(model=model, device=-1)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((3, 12)).astype(np.float32)
    audio = rng.standard_normal((3, 10)).astype(np.float32)
    turns = [{"text_embeds": text[i], "audio_embeds": audio[i]} for i in range(3)]
    turns[1].pop("audio_embeds")
    output = classifier(turns)
    with torch.no_grad():
        reference = model(
            text_embeds=torch.from_numpy(text)[None],
            audio_embeds=torch.from_numpy(audio)[None],
            turn_mask=torch.ones(1, 3, dtype=torch.long),
            text_mask=torch.ones(1, 3, dtype=torch.long),
            audio_mask=torch.tensor([[1, 0, 1]]),
        ).logits.softmax(-1)[0]
    np.testing.assert_allclose(probabilities(output, model), reference.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="turn 0.*embeddings"):
        classifier([{"text": "hello"}])
    with pytest.raises(ValueError, match="'text_embeds' has 5 values, the model expects 12"):
        classifier([{"text_embeds": [0.0] * 5}])


def test_asr_transcribes_turns_without_text():
    model, processor = build("merits-l", audio=False, audio_embed_dim=None)
    heard = []

    def asr(inputs):
        assert inputs["sampling_rate"] == 16000 and inputs["raw"].dtype == np.float32
        heard.append(len(inputs["raw"]))
        return {"text": "i got the job"}

    classifier = make_pipeline(model, processor, asr_model=asr)
    # an 8 kHz array of 0.5 s arrives as 16 kHz audio of 0.5 s
    output = classifier([{"text": "hello there"}, {"audio": voiced(0.5, sampling_rate=8000), "sampling_rate": 8000}])
    assert heard == [8000]
    written = classifier([{"text": "hello there"}, {"text": "i got the job"}])
    np.testing.assert_allclose(probabilities(output, model), probabilities(written, model), atol=1e-6)


def test_asr_with_a_transformers_speech_recognition_pipeline(tmp_path):
    """A tiny random CTC model saved locally stands in for Whisper: the path goes through
    transformers' `pipeline("automatic-speech-recognition")`, as `asr_model="openai/whisper-..."` does."""
    import json

    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, Wav2Vec2Processor

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|")
    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(_tiny_wav2vec2(len(vocab)))
    asr_dir = tmp_path / "asr"
    ctc.save_pretrained(asr_dir)
    Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(), tokenizer=tokenizer).save_pretrained(asr_dir)

    model, processor = build("mister-e")
    classifier = make_pipeline(model, processor, asr_model=str(asr_dir))
    output = classifier([{"text": "hello there"}, {"audio": voiced(0.6, seed=3), "sampling_rate": 16000}])
    assert len(output) == 2 and all(set(turn) >= {"label", "score", "scores", "gate"} for turn in output)


def _tiny_wav2vec2(vocab_size):
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
        pad_token_id=0,
    )


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    model, processor = build("mister-e")
    return make_pipeline(model, processor)


def test_error_empty_conversation(classifier):
    with pytest.raises(ValueError, match="conversation 0 is empty"):
        classifier([])
    with pytest.raises(ValueError, match="conversation 1 is empty"):
        classifier([[{"text": "hello"}], []])


def test_error_turn_without_text_or_audio(classifier):
    with pytest.raises(ValueError, match="conversation 0, turn 1: the turn has neither 'text' nor 'audio'"):
        classifier([{"text": "hello"}, {"speaker": "A"}])
    with pytest.raises(ValueError, match="conversation 0, turn 0: the turn has neither"):
        classifier([{"text": "   "}])


def test_error_unreadable_and_missing_audio(classifier, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match=r"conversation 0, turn 1: could not decode audio file '.*broken\.wav'"):
        classifier([{"text": "hello"}, {"audio": str(bad)}])
    with pytest.raises(FileNotFoundError, match=r"conversation 2, turn 0: audio file '.*nowhere\.wav' does not exist"):
        classifier([[{"text": "a"}], [{"text": "b"}], [{"audio": str(tmp_path / "nowhere.wav")}]], batch_size=2)


def test_error_array_without_sampling_rate_and_bad_types(classifier):
    with pytest.raises(ValueError, match="conversation 0, turn 0: an audio array needs its `sampling_rate`"):
        classifier([{"audio": voiced(0.2)}])
    with pytest.raises(TypeError, match="conversation 0, turn 0: 'text' must be a string"):
        classifier([{"text": 3}])
    with pytest.raises(TypeError, match="one conversation"):
        classifier("hello")
    with pytest.raises(TypeError, match="unexpected arguments"):
        classifier([{"text": "hello"}], temperature=2)


def test_non_16k_stereo_file_is_resampled(classifier, tmp_path):
    path = tmp_path / "stereo_8k.wav"
    soundfile.write(path, np.stack([voiced(0.4, sampling_rate=8000), voiced(0.4, f0=200, sampling_rate=8000)], 1), 8000)
    output = classifier([{"audio": str(path)}])
    assert len(output) == 1 and output[0]["gate"]["text"] == pytest.approx(0.0, abs=1e-6)


def test_500_turn_conversation(classifier):
    words = ["hello there", "i got the job", "that is terrible news", "oh no i am so sorry"]
    conversation = [{"text": words[i % 4]} for i in range(500)]
    conversation[250]["audio"] = voiced(0.2)
    conversation[250]["sampling_rate"] = 16000
    output = classifier(conversation, utterance_batch_size=64)
    assert len(output) == 500
    expected = reference_probabilities(classifier.model, classifier.processor, conversation)
    np.testing.assert_allclose(probabilities(output, classifier.model), expected, atol=2e-5)


# ---- the Hub folder, where merits is not installed --------------------------------------------------------------


def test_pipeline_from_hub_folder_without_merits(tmp_path):
    model, processor = build("mister-e")
    folder = tmp_path / "hub"
    save_hub_folder(model, processor, folder)
    wav = tmp_path / "turn.wav"
    soundfile.write(wav, np.stack([voiced(0.5, seed=5), voiced(0.5, seed=6)], 1), 44100)
    conversation = [{"text": "hello there how are you"}, {"text": "i got the job", "audio": str(wav)}]
    expected = make_pipeline(model, processor)(conversation)

    script = HIDE_MERITS + textwrap.dedent(
        f"""
        import json
        assert merits_hidden, "merits must not be importable here"
        from transformers import pipeline
        classifier = pipeline("conversation-emotion-recognition", model={str(folder)!r}, trust_remote_code=True)
        out = classifier({conversation!r})
        many = classifier([{conversation!r}, {conversation[:1]!r}])
        print(json.dumps({{"single": out, "many": many}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")  # fresh remote-code module cache
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert [turn["label"] for turn in got["single"]] == [turn["label"] for turn in expected]
    np.testing.assert_allclose(probabilities(got["single"], model), probabilities(expected, model), atol=1e-5)
    assert len(got["many"]) == 2 and len(got["many"][1]) == 1
    assert set(got["single"][1]["gate"]) == {"speech", "text", "cross-modal"}


def test_bf16_warns_on_a_cpu_without_bf16_instructions(monkeypatch, caplog):
    """bf16 autocast is emulated (slower than float32) on a CPU without AVX512-BF16/AMX: the pipeline says so once."""
    import logging

    from transformers.utils import logging as hf_logging

    from merits import pipeline_merits

    model, processor = build("merits-l")
    classifier = make_pipeline(model, processor)
    hf_logging.enable_propagation()
    try:
        for native, expected in ((True, False), (None, False), (False, True)):
            monkeypatch.setattr(pipeline_merits, "cpu_has_native_bf16", lambda: native)
            pipeline_merits.logger.warning_once.cache_clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                classifier(conversations()[0], bf16=True)
            assert any("without AVX512-BF16 or AMX" in r.getMessage() for r in caplog.records) is expected, native
    finally:
        hf_logging.disable_propagation()
    assert pipeline_merits.cpu_has_native_bf16() in (True, False, None)
