"""GPU-path follow-ups of issue 18: transformers-version compatibility of the config, batch-exact speech
backbones, host syncs of the context encoders."""

import pytest
import torch

from merits.configuration_merits import MeritsConfig


def test_config_declares_no_defaults_at_init(tmp_path):
    # transformers 5.17's to_diff_dict / save_pretrained build `self.__class__()` unless the class says it has no
    # defaults; MeritsConfig() without a modality is an error by design, so save_pretrained failed there
    assert MeritsConfig.has_no_defaults_at_init is True
    config = MeritsConfig(text_embed_dim=8)
    config.save_pretrained(tmp_path)
    assert MeritsConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_turn_plan_host_bookkeeping_equals_device_route():
    from merits.modeling_merits import MeritsTurnPlan

    turn_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    plain = MeritsTurnPlan(turn_mask, gap=2)
    MeritsTurnPlan.host_bookkeeping = True
    try:
        host = MeritsTurnPlan(turn_mask, gap=2)
    finally:
        MeritsTurnPlan.host_bookkeeping = None
    assert host.turn_mask is turn_mask
    for name, value in plain.__dict__.items():
        other = getattr(host, name)
        if isinstance(value, torch.Tensor):
            assert other.device == value.device and torch.equal(other, value), name
        else:
            assert other == value, name


def _group_norm_speech_model():
    from merits import MeritsConfig, MeritsForConversationClassification
    from tests._tiny import tiny_wavlm_config

    torch.manual_seed(0)
    config = MeritsConfig(audio_config=tiny_wavlm_config(feat_extract_norm="group"), id2label={0: "a", 1: "b"})
    return MeritsForConversationClassification(config).eval()


@pytest.fixture(params=[None, False], ids=["by-device", "batched"])
def feature_encoder_route(request, monkeypatch):
    # None: the CPU route (each utterance on its own samples); False: the batched masked GroupNorm (the GPU route)
    from merits.modeling_merits import MeritsSpeechEncoder

    monkeypatch.setattr(MeritsSpeechEncoder, "feature_encoder_per_utterance", request.param)
    return request.param


def test_group_norm_speech_backbone_is_batch_exact(feature_encoder_route):
    # GroupNorm in a wav2vec2/WavLM "group" feature encoder normalises over the whole (padded) time axis: a short
    # utterance padded to a longer one's length got other embeddings (and logits) than alone
    model = _group_norm_speech_model()
    generator = torch.Generator().manual_seed(1)
    short, long = torch.randn(1600, generator=generator), torch.randn(4000, generator=generator)
    values = torch.zeros(2, 4000)
    values[0, :1600], values[1] = short, long
    mask = torch.zeros(2, 4000, dtype=torch.long)
    mask[0, :1600], mask[1] = 1, 1
    with torch.no_grad():
        batched = model.get_utterance_embeddings(input_values=values, audio_attention_mask=mask)["audio"]
        alone = model.get_utterance_embeddings(input_values=short.unsqueeze(0),
                                               audio_attention_mask=torch.ones(1, 1600, dtype=torch.long))["audio"]
        alone_long = model.get_utterance_embeddings(input_values=long.unsqueeze(0))["audio"]
        # the conversation forward: one conversation alone vs batched with a longer one
        out_alone = model(input_values=short.unsqueeze(0), audio_attention_mask=torch.ones(1, 1600, dtype=torch.long),
                          turn_mask=torch.ones(1, 1, dtype=torch.bool)).logits
        out_batched = model(input_values=values, audio_attention_mask=mask,
                            turn_mask=torch.ones(2, 1, dtype=torch.bool)).logits
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], alone_long[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_batched[0], out_alone[0], rtol=1e-5, atol=1e-6)


def test_group_norm_speech_backbone_row_without_samples_gives_zeros(feature_encoder_route):
    model = _group_norm_speech_model()
    values = torch.randn(2, 2000)
    mask = torch.zeros(2, 2000, dtype=torch.long)
    mask[1, :1200] = 1
    with torch.no_grad():
        audio = model.get_utterance_embeddings(input_values=values, audio_attention_mask=mask)["audio"]
        alone = model.get_utterance_embeddings(input_values=values[1:, :1200])["audio"]
    pooled_zero = model.speech_encoder.head(torch.zeros(1, model.config.audio_config.hidden_size))
    torch.testing.assert_close(audio[0], pooled_zero[0])
    torch.testing.assert_close(audio[1], alone[0], rtol=1e-5, atol=1e-6)


def test_masked_group_norm_equals_group_norm_on_an_unpadded_sample():
    from merits.modeling_merits import masked_group_norm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(num_groups=6, num_channels=6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    sample = torch.randn(1, 6, 37) * 3 + 1
    full = torch.ones(1, 37, dtype=torch.bool)
    torch.testing.assert_close(masked_group_norm(norm, sample, full), norm(sample), rtol=1e-5, atol=1e-5)
    # padded: the valid frames equal the GroupNorm of the valid frames alone, whatever the padding holds
    padded = torch.cat([sample, torch.randn(1, 6, 20) * 100], dim=-1)
    valid = torch.arange(57)[None] < 37
    torch.testing.assert_close(masked_group_norm(norm, padded, valid)[..., :37], norm(sample), rtol=1e-5, atol=1e-5)
    # groups of several channels, a batch of two lengths
    grouped = torch.nn.GroupNorm(num_groups=2, num_channels=6, eps=1e-3)
    batch = torch.randn(2, 6, 30)
    mask = torch.arange(30)[None] < torch.tensor([[30], [11]])
    got = masked_group_norm(grouped, batch, mask)
    torch.testing.assert_close(got[0], grouped(batch[:1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :, :11], grouped(batch[1:, :, :11])[0], rtol=1e-5, atol=1e-5)


def test_group_norm_feature_encoder_runs_a_padded_batch_once(monkeypatch):
    # the batched (GPU) route: one pass of the feature encoder's first conv for a batch of three lengths, not one per
    # length (the per-length regrouping ran every utterance alone)
    from merits.modeling_merits import MeritsSpeechEncoder

    monkeypatch.setattr(MeritsSpeechEncoder, "feature_encoder_per_utterance", False)
    model = _group_norm_speech_model()
    first_conv = model.speech_encoder.backbone.feature_extractor.conv_layers[0].conv
    calls = []
    handle = first_conv.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    generator = torch.Generator().manual_seed(2)
    lengths = [4000, 2500, 1300]
    values = torch.zeros(3, 4000)
    mask = torch.zeros(3, 4000, dtype=torch.long)
    for row, length in enumerate(lengths):
        values[row, :length] = torch.randn(length, generator=generator)
        mask[row, :length] = 1
    try:
        with torch.no_grad():
            batched = model.get_utterance_embeddings(input_values=values, audio_attention_mask=mask)["audio"]
        assert len(calls) == 1 and calls[0][0] == 3
        with torch.no_grad():
            for row, length in enumerate(lengths):
                alone = model.get_utterance_embeddings(input_values=values[row : row + 1, :length])["audio"]
                torch.testing.assert_close(batched[row], alone[0], rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
