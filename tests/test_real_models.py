"""The Whisper encoder as a frozen speech backbone on each clip's own frames (merits/whisper_encoder_merits.py),
and the real-model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _tiny import tiny_whisper_config

from merits.whisper_encoder_merits import whisper_encoder_own_frames

ROOT = Path(__file__).resolve().parents[1]


def _encoder(**kwargs):
    from transformers import WhisperModel

    torch.manual_seed(0)
    return WhisperModel(tiny_whisper_config(**kwargs)).get_encoder().eval()


def test_full_window_equals_transformers_encoder():
    encoder = _encoder()
    features = torch.randn(2, 8, 40)  # 2 x max_source_positions mel frames: the window transformers insists on
    with torch.no_grad():
        reference = encoder(features, output_hidden_states=True)
        states, mask = whisper_encoder_own_frames(encoder, features)
    assert mask.all() and len(states) == len(reference.hidden_states) == 3
    for ours, theirs in zip(states, reference.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(states[-1], reference.last_hidden_state, rtol=0, atol=0)


def test_padded_batch_equals_each_clip_alone():
    """Clips of 13, 20 and 8 mel frames in one batch padded to the 40-frame window: every real frame of every layer
    has the value of that clip run alone on its own frames; padding never reaches them."""
    encoder = _encoder()
    lengths = [13, 20, 8]
    features = torch.zeros(3, 8, 40)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for i, length in enumerate(lengths):
        features[i, :, :length] = torch.randn(8, length)
        features[i, :, length:] = 5.0  # garbage in the padding: must not matter
        mask[i, :length] = 1
    with torch.no_grad():
        states, frame_mask = whisper_encoder_own_frames(encoder, features, mask)
        assert states[0].shape[1] == 10  # trimmed to the longest clip (20 mel frames -> 10 encoder frames)
        for i, length in enumerate(lengths):
            alone, alone_mask = whisper_encoder_own_frames(encoder, features[i:i + 1, :, :length])
            frames = alone[0].shape[1]
            assert frames == (length + 1) // 2 == int(frame_mask[i].sum())
            for batched, single in zip(states, alone):
                torch.testing.assert_close(batched[i, :frames], single[0], rtol=1e-5, atol=1e-5)


def test_short_clip_differs_from_its_30s_padded_run():
    """Own frames are not the 30 s-padded embeddings (the padded frames take part in every attention there)."""
    encoder = _encoder()
    features = torch.zeros(1, 8, 40)
    features[0, :, :12] = torch.randn(8, 12)
    with torch.no_grad():
        own, _ = whisper_encoder_own_frames(encoder, features[..., :12])
        padded = encoder(features).last_hidden_state[:, :6]
    assert (own[-1] - padded).abs().max() > 1e-3


def test_speech_encoder_pools_whisper_over_own_frames():
    """MeritsSpeechEncoder with a Whisper backbone: a clip's pooled vector does not depend on its batch mates or on
    the 30 s padding the processor adds."""
    from merits import MeritsConfig, MeritsForConversationClassification

    config = MeritsConfig(architecture="merits-l", audio_config=tiny_whisper_config(), id2label={0: "a", 1: "b"},
                          speech_head_hidden_sizes=[6])
    model = MeritsForConversationClassification(config).eval()
    speech = model.speech_encoder
    torch.nn.init.normal_(speech.layer_weights)
    features = torch.randn(2, 8, 40)
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, :14], mask[1, :30] = 1, 1
    with torch.no_grad():
        both = speech.pool_backbone(input_features=features, audio_attention_mask=mask)
        first = speech.pool_backbone(input_features=features[:1, :, :14], audio_attention_mask=mask[:1, :14])
    torch.testing.assert_close(both[0], first[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mosi_minilm_cpu", "meld_minilm_cpu"])
def test_minilm_configs_name_real_hub_ids(name):
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert config["text_model_name_or_path"] == config["tokenizer_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["modalities"] == ["text"] and config["stages"] == ["utterance", "context"]
    assert config["model"]["text_pooling"] == "mean"  # how all-MiniLM-L6-v2 was trained


def test_whisper_and_stage0_configs_name_real_hub_ids():
    emodb = yaml.safe_load((ROOT / "configs" / "emodb_whisper_cpu.yaml").read_text())
    assert emodb["audio_model_name_or_path"] == "openai/whisper-base" and emodb["speaker_folds"] is True
    assert emodb["model"]["standardize_speech_layers"] is True and emodb["modalities"] == ["audio"]
    stage0 = yaml.safe_load((ROOT / "configs" / "meld_stage0_minilm_cpu.yaml").read_text())
    meld = yaml.safe_load((ROOT / "configs" / "meld_minilm_cpu.yaml").read_text())
    assert stage0["dataset"] == "pseudo_labels" and stage0["stages"] == ["pretrain"]
    # stage 0 initialises meld_minilm_cpu.yaml's stage I: the same encoder, pooling and token limit
    for key in ("text_model_name_or_path", "tokenizer_name_or_path", "max_text_length"):
        assert stage0[key] == meld[key], key
    assert stage0["model"]["text_pooling"] == meld["model"]["text_pooling"]


def test_concatenated_layers_feed_the_head_side_by_side(tmp_path):
    """speech_layer_combination="concat": the standardised layers side by side ([K, F] -> K*F) feed the head's first
    Linear, no layer weights; the same as the head on the flattened stack; saved and reloaded with the model."""
    from merits import MeritsConfig, MeritsForConversationClassification
    from merits.modeling_merits import MeritsSpeechEncoder

    torch.manual_seed(0)
    config = MeritsConfig(architecture="merits-l", modalities=["audio"], audio_feature_dim=5, audio_feature_layers=3,
                          id2label={0: "a", 1: "b"}, speech_head_hidden_sizes=[4], standardize_speech_layers=True,
                          speech_layer_combination="concat")
    encoder = MeritsSpeechEncoder(config).eval()
    assert encoder.layer_weights is None and encoder.head[0].in_features == 15
    x = torch.randn(6, 3, 5) * 4 + 2
    mean, std = x.mean(0), x.std(0)
    encoder.set_layer_statistics(mean, std)
    with torch.no_grad():
        torch.testing.assert_close(encoder(audio_features=x)[0], encoder.head(((x - mean) / std).flatten(1)))
    with pytest.raises(ValueError, match="speech_layer_combination"):
        MeritsConfig(architecture="merits-l", audio_feature_dim=5, audio_feature_layers=3, id2label={0: "a", 1: "b"},
                     speech_layer_combination="sum")
    # no hidden layer: the classifier reads the 15-d vector, which is also the embedding (a linear probe)
    probe = MeritsSpeechEncoder(MeritsConfig(
        architecture="merits-l", modalities=["audio"], audio_feature_dim=5, audio_feature_layers=3, id2label={0: "a", 1: "b"},
        speech_head_hidden_sizes=[], standardize_speech_layers=True, speech_layer_combination="concat")).eval()
    assert probe.config.audio_embed_dim == 15 and probe.classifier.in_features == 15
    probe.set_layer_statistics(mean, std)
    with torch.no_grad():
        torch.testing.assert_close(probe(audio_features=x)[0], ((x - mean) / std).flatten(1))
    model = MeritsForConversationClassification(config)
    model.speech_encoder.set_layer_statistics(mean, std)
    model.save_pretrained(tmp_path)
    again = MeritsForConversationClassification.from_pretrained(tmp_path)
    assert again.config.speech_layer_combination == "concat" and again.speech_encoder.layer_weights is None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value)


def test_layer_standardisation_is_applied_before_the_mix():
    """standardize_speech_layers: (x - mean) / std per layer, then the softmax mix, then the head; saved with the model."""
    from merits import MeritsConfig
    from merits.modeling_merits import MeritsSpeechEncoder

    torch.manual_seed(0)
    config = MeritsConfig(architecture="merits-l", audio_feature_dim=5, audio_feature_layers=3, id2label={0: "a", 1: "b"},
                          speech_head_hidden_sizes=[4], standardize_speech_layers=True)
    encoder = MeritsSpeechEncoder(config).eval()
    torch.nn.init.normal_(encoder.layer_weights)
    x = torch.randn(6, 3, 5) * 4 + 2
    mean, std = x.mean(0), x.std(0)
    encoder.set_layer_statistics(mean, std)
    weights = torch.softmax(encoder.layer_weights, 0)
    expected = encoder.head(torch.einsum("k,nkf->nf", weights, (x - mean) / std))
    with torch.no_grad():
        torch.testing.assert_close(encoder(audio_features=x)[0], expected.detach())
    assert {"layer_mean", "layer_std"} <= set(encoder.state_dict())
    with pytest.raises(ValueError, match="shape"):
        encoder.set_layer_statistics(mean[:2], std)
    with pytest.raises(ValueError, match="standardize_speech_layers"):
        MeritsConfig(architecture="merits-l", audio_feature_dim=5, id2label={0: "a", 1: "b"}, standardize_speech_layers=True)
