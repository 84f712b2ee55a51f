"""Tiny random configs shared by the test files (built in the tests, as transformers' own tests do: no downloads)."""

from transformers import LlamaConfig, RobertaConfig, WavLMConfig, WhisperConfig

from merits.configuration_merits import MeritsConfig


TINY_LABELS = {0: "neutral", 1: "happy", 2: "sad"}


def tiny_roberta_config(**kwargs):
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    values.update(kwargs)
    return RobertaConfig(**values)


def tiny_wavlm_config(**kwargs):
    values = dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        conv_dim=(32, 32, 32),
        conv_stride=(4, 4, 2),
        conv_kernel=(8, 8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=False,
        num_buckets=8,
        max_bucket_distance=20,
        mask_time_prob=0.0,
        vocab_size=12,
    )
    values.update(kwargs)
    return WavLMConfig(**values)


def tiny_llama_config(**kwargs):
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(kwargs)
    return LlamaConfig(**values)


def tiny_whisper_config(**kwargs):
    values = dict(
        vocab_size=99,
        d_model=16,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        num_mel_bins=8,
        max_source_positions=20,
        max_target_positions=20,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    values.update(kwargs)
    return WhisperConfig(**values)


def tiny_merits_config(architecture="merits-l", **kwargs):
    """A tiny MeritsConfig. Defaults: precomputed embeddings (text 12-d, audio 10-d), 3 labels; every size small.
    Pass `text_config=tiny_roberta_config()` etc. (and `text_embed_dim=None`) to use backbones."""
    values = dict(
        architecture=architecture,
        text_embed_dim=12,
        audio_embed_dim=10,
        id2label=dict(TINY_LABELS),
        attentive_pooling_hidden_size=8,
        speech_head_hidden_sizes=[16, 8] if architecture == "merits-l" else [8],
        context_text_hidden_size=8,
        context_audio_hidden_size=6,
        context_conv_channels=16,
        fusion_hidden_size=16,
        fusion_num_blocks=2,
        fusion_attention_size=12,
        fusion_num_heads=3,
        fusion_head_hidden_size=16,
        gate_hidden_size=5,
    )
    if architecture == "mister-e":
        values["utterance_embed_dim"] = 12
    if kwargs.get("text_config") is not None:
        values["text_embed_dim"] = None
    if kwargs.get("audio_config") is not None or kwargs.get("audio_feature_dim") is not None:
        values["audio_embed_dim"] = None
    values.update(kwargs)
    return MeritsConfig(**values)
