"""Tests of merits/configuration_merits.py and merits/modeling_merits.py with tiny random configs (no downloads)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny import (  # noqa: E402
    tiny_llama_config,
    tiny_merits_config,
    tiny_roberta_config,
    tiny_wavlm_config,
    tiny_whisper_config,
)

from merits.configuration_merits import MeritsConfig  # noqa: E402
from merits.modeling_merits import (  # noqa: E402
    MeritsConversationClassifierOutput,
    MeritsForConversationClassification,
    focal_loss,
    supervised_contrastive_loss,
    symmetric_kl_loss,
)


torch.set_num_threads(1)

B, T, C, D_TEXT, D_AUDIO = 2, 4, 3, 12, 10
TURN_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
LABELS = torch.tensor([[0, 1, 2, 1], [2, 0, 1, -100]])
STAGES = {"merits-l": ["context", "fusion", "context+fusion"], "mister-e": ["moe"]}


def make_model(architecture="merits-l", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MeritsForConversationClassification(tiny_merits_config(architecture, **kwargs))
    return model.eval()


def embeds(seed=1, batch=B, turns=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, turns, D_TEXT, generator=g), torch.randn(batch, turns, D_AUDIO, generator=g)


def randomize(model, std=0.5, seed=0):
    """Larger random weights so that logits are far from uniform (the 0.02 init makes every expert nearly equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="hcam", text_embed_dim=4), "valid ones are merits-l, mister-e"),
        (dict(architecture="merits-l"), "at least one modality"),
        (dict(text_config=tiny_roberta_config(), text_embed_dim=99), "text_embed_dim=99 conflicts"),
        (dict(audio_feature_dim=20, audio_embed_dim=3), "audio_embed_dim=3 conflicts"),
        (dict(audio_config=tiny_wavlm_config(), audio_feature_dim=20), "either `audio_config`"),
        (dict(text_embed_dim=4, id2label={0: "a", 1: "b"}, label2id={"a": 1, "b": 0}), "disagree"),
        (dict(text_embed_dim=4, stage="moe"), "Unknown stage 'moe'"),
        (dict(text_embed_dim=4, stage="fusion"), "needs both modalities"),
        (dict(architecture="mister-e", text_embed_dim=4, experts=["speech"]), "need a modality"),
        (dict(architecture="mister-e", text_embed_dim=4, experts=["vision"]), "Unknown experts"),
        (dict(text_embed_dim=4, gate_mode="max"), "Unknown gate_mode"),
        (dict(text_embed_dim=4, text_pooling="max"), "Unknown text_pooling"),
        (dict(text_embed_dim=4, fusion_attention_size=10, fusion_num_heads=3), "divisible"),
        (dict(audio_feature_layers=3), "needs `audio_feature_dim`"),
        (dict(text_config={"hidden_size": 8}), "must contain `model_type`"),
        (dict(audio_feature_dim=20, speech_head_input_dropout=1.0), "speech_head_input_dropout"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MeritsConfig(**kwargs)


def test_config_defaults_and_roundtrip(tmp_path):
    merits_l = MeritsConfig(text_config=tiny_roberta_config(), audio_feature_dim=2304, audio_feature_layers=13)
    assert merits_l.stage == "fusion" and merits_l.text_pooling == "cls" and merits_l.classification_loss == "ce"
    assert merits_l.text_embed_dim == 32 and merits_l.audio_embed_dim == 256  # pooled hidden; CARE head H=256
    assert merits_l.speech_head_hidden_sizes == [768, 256] and merits_l.speech_head_activation is None
    assert MeritsConfig(text_embed_dim=8).stage == "context"  # merits-l with one modality

    mister_e = MeritsConfig(
        architecture="mister-e",
        text_config=tiny_llama_config().to_dict(),
        audio_embed_dim=2048,
        label2id={"neg": 0, "pos": 1},
    )
    assert mister_e.stage == "moe" and mister_e.text_embed_dim == 2048 and mister_e.experts == [
        "speech", "text", "cross_modal"]
    assert mister_e.id2label == {0: "neg", 1: "pos"} and mister_e.num_labels == 2
    assert (mister_e.focal_gamma, mister_e.supcon_weight, mister_e.supcon_temperature, mister_e.kl_weight) == (
        3.0, 2.0, 1.0, 0.1)
    assert (mister_e.gate_hidden_size, mister_e.gate_temperature, mister_e.context_num_layers) == (10, 2.0, 3)
    assert type(mister_e.text_config).__name__ == "LlamaConfig"

    for config in (merits_l, mister_e):
        config.save_pretrained(tmp_path / config.architecture)
        loaded = MeritsConfig.from_pretrained(tmp_path / config.architecture)
        assert loaded.to_dict() == config.to_dict()
        assert type(loaded.text_config) is type(config.text_config)
        assert loaded.label2id == config.label2id


# ---------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture, stage", [(a, s) for a, stages in STAGES.items() for s in stages])
def test_output_shapes_from_embeddings(architecture, stage):
    model = make_model(architecture)
    text, audio = embeds()
    out = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, labels=LABELS, stage=stage)
    assert isinstance(out, MeritsConversationClassifierOutput)
    assert out.logits.shape == (B, T, C) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.text_embeds.shape == (B, T, D_TEXT) and out.audio_embeds.shape == (B, T, D_AUDIO)
    if architecture == "mister-e":
        assert out.gate_weights.shape == (B, T, 3) and len(out.expert_logits) == 3
        assert all(e.shape == (B, T, C) for e in out.expert_logits)
        assert torch.allclose(out.gate_weights[TURN_MASK.bool()].sum(-1), torch.ones(int(TURN_MASK.sum())))
        assert set(out.loss_terms) == {"mixture", "expert_speech", "expert_text", "expert_cross_modal", "supcon", "kl"}
    else:
        assert out.gate_weights is None and out.context_text_logits.shape == (B, T, C)
        assert (out.fusion_logits is None) == (stage == "context")
    assert model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, stage=stage).loss is None


def _raw_batch(vocab=99, samples=1600, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(TURN_MASK.sum())
    input_ids = torch.randint(3, vocab, (n, 6), generator=g)
    attention_mask = torch.ones(n, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_values = torch.randn(n, samples, generator=g)
    audio_attention_mask = torch.ones(n, samples, dtype=torch.long)
    audio_attention_mask[2, samples // 2:] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
                audio_attention_mask=audio_attention_mask, turn_mask=TURN_MASK, labels=LABELS)


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_output_shapes_with_backbones_every_stage(architecture):
    model = make_model(architecture, text_config=tiny_roberta_config(), audio_config=tiny_wavlm_config())
    batch = _raw_batch()
    for stage in ["utterance"] + STAGES[architecture]:
        out = model(**batch, stage=stage)
        assert out.logits.shape == (B, T, C) and torch.isfinite(out.loss), stage
        assert out.utterance_text_logits.shape == (B, T, C) and out.utterance_audio_logits.shape == (B, T, C)
        assert out.text_embeds.shape == (B, T, model.config.text_embed_dim)
        assert out.audio_embeds.shape == (B, T, model.config.audio_embed_dim)
    # the embedding cache's entry point gives the same vectors as forward
    cache = model.get_utterance_embeddings(**batch)
    assert cache["text"].shape == (int(TURN_MASK.sum()), model.config.text_embed_dim)
    torch.testing.assert_close(cache["text"], out.text_embeds[TURN_MASK.bool()])
    torch.testing.assert_close(cache["audio"], out.audio_embeds[TURN_MASK.bool()])


def test_decoder_llm_text_whisper_audio_and_care_features():
    n = int(TURN_MASK.sum())
    batch = _raw_batch()
    # Llama text encoder (decoder LLM) + Whisper encoder over mel features
    model = make_model("mister-e", text_config=tiny_llama_config(), audio_config=tiny_whisper_config())
    assert not hasattr(model.speech_encoder.backbone, "decoder")  # the encoder only
    features = torch.randn(n, 8, 40)  # num_mel_bins=8, 2 * max_source_positions = 40 frames
    mel_mask = torch.ones(n, 40, dtype=torch.long)
    mel_mask[0, 20:] = 0
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], input_features=features,
                audio_attention_mask=mel_mask, turn_mask=TURN_MASK, labels=LABELS, stage="utterance")
    assert out.logits.shape == (B, T, C) and torch.isfinite(out.loss)
    assert out.text_embeds.shape == (B, T, 12)  # utterance_embed_dim projection of attentive-stats pooling
    # CARE-style [K, F] layer stacks as [B, T, K, F]
    model = make_model("merits-l", audio_feature_dim=20, audio_feature_layers=5)
    stack = torch.randn(B, T, 5, 20)
    out = model(text_embeds=embeds()[0], audio_features=stack, turn_mask=TURN_MASK, labels=LABELS, stage="utterance")
    assert out.utterance_audio_logits.shape == (B, T, C) and out.audio_embeds.shape == (B, T, 8)
    with pytest.raises(ValueError, match="audio_features"):
        model(text_embeds=embeds()[0], audio_features=torch.randn(B, T, 4, 20), turn_mask=TURN_MASK)
    with pytest.raises(ValueError, match="needs raw inputs"):
        model(text_embeds=embeds()[0], audio_embeds=embeds()[1][..., :8], turn_mask=TURN_MASK, stage="utterance")


def test_speech_head_input_dropout_acts_in_training_only():
    """The optional input dropout of the speech head: off by default (the papers' heads), random in train mode,
    the identity in eval mode, and the layer names of a head without it are unchanged (old checkpoints load)."""
    plain, dropped = make_model("merits-l", audio_feature_dim=20), make_model("merits-l", audio_feature_dim=20,
                                                                               speech_head_input_dropout=0.5)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.speech_encoder.head[:1])
    assert isinstance(dropped.speech_encoder.head[0], torch.nn.Dropout) and dropped.speech_encoder.head[0].p == 0.5
    features = torch.randn(B, T, 20)
    dropped.eval()
    with torch.no_grad():
        first = dropped(text_embeds=embeds()[0], audio_features=features, turn_mask=TURN_MASK, stage="utterance")
        again = dropped(text_embeds=embeds()[0], audio_features=features, turn_mask=TURN_MASK, stage="utterance")
    torch.testing.assert_close(first.utterance_audio_logits, again.utterance_audio_logits)
    dropped.train()
    head = dropped.speech_encoder.head
    torch.manual_seed(0)
    assert not torch.equal(head(features.reshape(-1, 20)), head(features.reshape(-1, 20)))
    assert [k for k in plain.state_dict() if k.startswith("speech_encoder.head")] == [
        "speech_encoder.head.0.weight", "speech_encoder.head.0.bias", "speech_encoder.head.2.weight", "speech_encoder.head.2.bias"]


def test_mismatched_embedding_sizes_fail_clearly():
    model = make_model("merits-l")
    text, audio = embeds()
    with pytest.raises(ValueError, match="`audio_embeds` has size 7 but the config expects 10"):
        model(text_embeds=text, audio_embeds=audio[..., :7], turn_mask=TURN_MASK)
    with pytest.raises(ValueError, match="real turn 2 after a padded turn 1"):
        model(text_embeds=text, audio_embeds=audio, turn_mask=torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="Conversation 1, turn 2 .* neither text nor audio"):
        model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK,
              text_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), audio_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]]))
    with pytest.raises(ValueError, match="Got 3 utterances but `turn_mask` has 7 real turns"):
        make_model("merits-l", audio_feature_dim=20)(
            text_embeds=text, audio_features=torch.randn(3, 20), turn_mask=TURN_MASK)


# ---------------------------------------------------------------------------------------------------------------
# Padding invariance
# ---------------------------------------------------------------------------------------------------------------


def _pad(tensor, turns, batch, fill):
    """Append padded turns (and padded conversations) filled with `fill` values."""
    out = fill(batch, turns, *tensor.shape[2:]).to(tensor.dtype)
    out[: tensor.shape[0], : tensor.shape[1]] = tensor
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("architecture, stage", [(a, s) for a, stages in STAGES.items() for s in stages])
def test_padding_never_changes_real_turns(architecture, stage, causal):
    model = randomize(make_model(architecture, causal=causal), std=0.1)
    text, audio = embeds()
    labels = LABELS
    base = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, labels=labels, stage=stage)
    real = TURN_MASK.bool()
    for seed in (1, 2):  # two different padding contents
        g = torch.Generator().manual_seed(seed)
        noise = lambda *shape: torch.randn(*shape, generator=g) * 5  # noqa: E731
        padded_mask = torch.zeros(B + 1, T + 2, dtype=torch.long)
        padded_mask[:B, :T] = TURN_MASK
        padded_mask[B, :2] = 1  # an extra, shorter conversation
        padded_labels = torch.full((B + 1, T + 2), -100)
        padded_labels[:B, :T] = labels
        out = model(
            text_embeds=_pad(text, T + 2, B + 1, noise),
            audio_embeds=_pad(audio, T + 2, B + 1, noise),
            turn_mask=padded_mask,
            labels=padded_labels,
            stage=stage,
        )
        torch.testing.assert_close(out.logits[:B, :T][real], base.logits[real], atol=1e-5, rtol=0)
        if architecture == "mister-e":
            torch.testing.assert_close(out.gate_weights[:B, :T][real], base.gate_weights[real], atol=1e-5, rtol=0)
        # the loss: compare with the extra conversation fully padded (a zero-length conversation)
        padded_mask[B] = 0
        out = model(text_embeds=_pad(text, T + 2, B + 1, noise), audio_embeds=_pad(audio, T + 2, B + 1, noise),
                    turn_mask=padded_mask, labels=padded_labels, stage=stage)
        for name, value in base.loss_terms.items():
            torch.testing.assert_close(out.loss_terms[name], value, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Missing modality
# ---------------------------------------------------------------------------------------------------------------

TEXT_MASK = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
AUDIO_MASK = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]])


@pytest.mark.parametrize("gate_mode", ["learned", "mean", "vote"])
def test_mister_e_gate_gives_zero_weight_to_absent_experts(gate_mode):
    model = randomize(make_model("mister-e", gate_mode=gate_mode), std=0.3)
    text, audio = embeds()
    out = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, text_mask=TEXT_MASK,
                audio_mask=AUDIO_MASK, labels=LABELS)
    w = out.gate_weights  # (speech, text, cross_modal)
    assert torch.all(w[0, 1, 0] == 0) and torch.all(w[0, 1, 2] == 0)  # turn without audio
    assert torch.all(w[0, 2, 1] == 0) and torch.all(w[0, 2, 2] == 0)  # turn without text
    assert w[0, 1, 1] == 1 and w[0, 2, 0] == 1
    assert torch.allclose(w[TURN_MASK.bool()].sum(-1), torch.ones(7))
    assert torch.all(w[1, 3] == 0)  # padding
    # the mixture at a text-only turn is the text expert itself
    torch.testing.assert_close(out.logits[0, 1], out.expert_logits[1][0, 1])
    # what sits in an absent modality's slot never matters
    out2 = model(text_embeds=text, audio_embeds=audio + 7 * (1 - AUDIO_MASK).unsqueeze(-1), turn_mask=TURN_MASK,
                 text_mask=TEXT_MASK, audio_mask=AUDIO_MASK, labels=LABELS)
    torch.testing.assert_close(out2.logits, out.logits)
    torch.testing.assert_close(out2.loss, out.loss)


def test_mister_e_vote_and_mean_gates():
    torch.manual_seed(0)
    model = make_model("mister-e", gate_mode="vote")
    logits = torch.tensor([[[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]],  # 1-1-1 tie -> cross-modal
                           [[2.0, 0, 0], [3.0, 0, 0], [0, 0, 1.0]]])  # 2 votes for class 0
    available = torch.ones(2, 3, dtype=torch.bool)
    w = model.gate(logits, available, [0, 1, 2])
    torch.testing.assert_close(w, torch.tensor([[0.0, 0, 1], [0.5, 0.5, 0]]))
    model.gate.mode = "mean"
    w = model.gate(logits, torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]]))


def test_merits_l_falls_back_to_the_other_modality():
    model = randomize(make_model("merits-l"), std=0.3)
    text, audio = embeds()
    out = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, text_mask=TEXT_MASK, audio_mask=AUDIO_MASK,
                stage="fusion")
    torch.testing.assert_close(out.logits[0, 1], out.context_text_logits[0, 1])  # no audio -> text context
    torch.testing.assert_close(out.logits[0, 2], out.context_audio_logits[0, 2])  # no text -> speech context
    torch.testing.assert_close(out.logits[0, 0], out.fusion_logits[0, 0])
    assert not torch.allclose(out.logits[0, 0], out.context_text_logits[0, 0])
    # a turn without audio is never attended as audio: its audio content changes nothing anywhere
    out2 = model(text_embeds=text, audio_embeds=audio + 7 * (1 - AUDIO_MASK).unsqueeze(-1), turn_mask=TURN_MASK,
                 text_mask=TEXT_MASK, audio_mask=AUDIO_MASK, stage="fusion")
    torch.testing.assert_close(out2.logits, out.logits)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("architecture, stage", [(a, s) for a, stages in STAGES.items() for s in stages])
@pytest.mark.parametrize("absent", ["audio", "text"])
def test_batch_without_any_turn_of_one_modality(architecture, stage, causal, absent):
    """No turn of the batch has audio (text): no input for it at all is valid, every stage runs and trains."""
    model = randomize(make_model(architecture, causal=causal), std=0.1)
    model.freeze_for_stage(stage)
    model.train()
    for module in model.modules():  # no dropout: compare runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    text, audio = embeds()
    present = {"text_embeds": text} if absent == "audio" else {"audio_embeds": audio}
    out = model(**present, turn_mask=TURN_MASK, labels=LABELS, stage=stage)
    assert out.logits.shape == (B, T, C) and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if stage == "fusion":  # no turn has both modalities: nothing for the fusion to learn from
        assert out.loss == 0
    else:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the same as zeros, or anything, with a zero modality mask
    zeros = {f"{absent}_embeds": torch.zeros_like(audio if absent == "audio" else text) + 3.0,
             f"{absent}_mask": torch.zeros_like(TURN_MASK)}
    same = model(**present, **zeros, turn_mask=TURN_MASK, labels=LABELS, stage=stage)
    torch.testing.assert_close(same.logits, out.logits)
    torch.testing.assert_close(same.loss, out.loss)
    real = TURN_MASK.bool()
    kept = "text" if absent == "audio" else "audio"
    if architecture == "merits-l":  # falls back to the present modality's context head
        torch.testing.assert_close(out.logits[real], getattr(out, f"context_{kept}_logits")[real])
    else:  # gate weight 0 for the absent expert and the cross-modal one; the mixture is the present expert
        w = out.gate_weights[real]
        present_index, absent_index = (1, 0) if absent == "audio" else (0, 1)
        assert torch.all(w[:, absent_index] == 0) and torch.all(w[:, 2] == 0) and torch.all(w[:, present_index] == 1)
        torch.testing.assert_close(out.logits[real], out.expert_logits[present_index][real])
        assert out.loss_terms["supcon"] == 0
    # a mask claiming the modality at some turn without giving it is an error naming the turn
    bad_mask = torch.zeros_like(TURN_MASK)
    bad_mask[1, 2] = 1
    with pytest.raises(ValueError, match=f"`{absent}_mask` says conversation 1, turn 2 has {absent}"):
        model(**present, turn_mask=TURN_MASK, stage=stage, **{f"{absent}_mask": bad_mask})
    if causal:  # streaming, turn by turn, without the absent modality
        model.eval()
        with torch.no_grad():
            full = model(**present, turn_mask=torch.ones(B, T), stage=stage)
            state = model.init_stream_state(batch_size=B)
            for t in range(T):
                step = {key: value[:, t] for key, value in present.items()}
                logits, gate, state = model.stream_step(state, **step)
                torch.testing.assert_close(logits, full.logits[:, t], atol=1e-5, rtol=0)
                if architecture == "mister-e":
                    torch.testing.assert_close(gate, full.gate_weights[:, t], atol=1e-5, rtol=0)
            with pytest.raises(ValueError, match=f"Turn {T}: `{absent}_mask` says conversation 0 has {absent}"):
                model.stream_step(state, **step, **{f"{absent}_mask": torch.ones(B)})


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_raw_batch_without_any_audio(architecture):
    """The processor emits no audio tensors when no turn has audio: every stage still runs from input_ids alone."""
    model = make_model(architecture, text_config=tiny_roberta_config(), audio_config=tiny_wavlm_config())
    batch = _raw_batch()
    text_only = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], turn_mask=TURN_MASK,
                     text_mask=TURN_MASK, audio_mask=torch.zeros_like(TURN_MASK), labels=LABELS)
    for stage in ["utterance"] + STAGES[architecture]:
        out = model(**text_only, stage=stage)
        assert out.logits.shape == (B, T, C) and torch.isfinite(out.logits).all() and torch.isfinite(out.loss), stage
        assert out.utterance_audio_logits is None
        torch.testing.assert_close(out.logits, model(**{k: v for k, v in text_only.items() if k != "audio_mask"},
                                                     stage=stage).logits)


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_single_modality_models(architecture):
    text, audio = embeds()
    text_only = make_model(architecture, audio_embed_dim=None)
    out = text_only(text_embeds=text, turn_mask=TURN_MASK, labels=LABELS)
    assert out.logits.shape == (B, T, C) and torch.isfinite(out.loss)
    speech_only = make_model(architecture, text_embed_dim=None)
    out = speech_only(audio_embeds=audio, turn_mask=TURN_MASK, labels=LABELS)
    assert out.logits.shape == (B, T, C) and torch.isfinite(out.loss)
    if architecture == "mister-e":
        assert speech_only.config.experts == ["speech"]
        assert torch.all(out.gate_weights[TURN_MASK.bool()][:, 0] == 1)
        single = make_model(architecture, experts=["cross_modal"])  # single-expert ablation
        out = single(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, labels=LABELS)
        assert set(out.loss_terms) == {"mixture", "expert_cross_modal", "supcon"}
        assert out.expert_logits[0] is None and out.expert_logits[1] is None


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def test_loss_functions_zero_where_they_must_be():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, C, generator=g)
    labels = torch.tensor([[0, 1, 2, -100], [2, 2, 0, 1]])
    none = torch.zeros(2, 4, dtype=torch.bool)
    # focal: gamma 0 is cross-entropy over the labelled turns; empty mask -> 0
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, C), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0), ce)
    focal = focal_loss(logits, labels, gamma=3.0)
    assert 0 < focal < ce
    assert focal_loss(logits, labels, mask=none) == 0
    # SupCon: finite and positive, 0 with an empty mask
    text, audio = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    both = torch.ones(2, 4, dtype=torch.bool)
    supcon = supervised_contrastive_loss(text, audio, labels, both)
    assert torch.isfinite(supcon) and supcon > 0
    assert supervised_contrastive_loss(text, audio, labels, none) == 0
    # KL: identical experts -> 0, empty availability -> 0, different experts -> > 0
    same = logits.unsqueeze(-2).expand(2, 4, 3, C)
    available = torch.ones(2, 4, 3, dtype=torch.bool)
    assert symmetric_kl_loss(same, available).abs() < 1e-6
    different = torch.randn(2, 4, 3, C, generator=g)
    assert symmetric_kl_loss(different, available) > 0
    assert symmetric_kl_loss(different, torch.zeros_like(available)) == 0
    # KL ignores turns where an expert is unavailable
    masked = available.clone()
    masked[0, 0, 1] = False
    changed = different.clone()
    changed[0, 0, 1] += 10
    torch.testing.assert_close(symmetric_kl_loss(changed, masked), symmetric_kl_loss(different, masked))


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_conversation_init_is_pytorch_default_and_loaded_weights_stay(architecture, tmp_path):
    """conversation_init="pytorch": context encoders, fusion and gate initialised as torch does (fan-in-scaled
    uniform, nonzero biases); the utterance heads keep normal(0, initializer_range) and zero biases; "normal" gives
    every linear the normal init; from_pretrained keeps the saved weights."""
    model = make_model(architecture, text_config=tiny_roberta_config(), audio_config=tiny_wavlm_config())
    conversation = ("text_context.", "audio_context.", "fusion.", "gate.")
    utterance_level = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
            bound = 1.0 / module.weight[0].numel() ** 0.5
            if name.startswith(conversation):
                assert module.weight.abs().max() <= bound + 1e-7, name
                assert module.weight.std() > 0.5 * bound / 3**0.5, name  # U(-b, b) has std b / sqrt(3)
                assert module.bias.abs().max() > 0 and module.bias.abs().max() <= bound + 1e-7, name
            elif ".backbone." not in name:  # our utterance-level layers (backbones keep their own init)
                utterance_level.append(name)
                assert module.bias is None or torch.all(module.bias == 0), name
        elif isinstance(module, torch.nn.GRU):
            bound = 1.0 / module.hidden_size ** 0.5
            for param in module.parameters():
                assert 0 < param.abs().max() <= bound + 1e-7, name
    assert any(name.startswith(("text_encoder.", "speech_encoder.")) for name in utterance_level)
    normal = make_model(architecture, conversation_init="normal")
    for name, module in normal.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(conversation):
            assert torch.all(module.bias == 0), name
    model.save_pretrained(tmp_path)
    loaded = MeritsForConversationClassification.from_pretrained(tmp_path)
    assert loaded.config.conversation_init == "pytorch"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="conversation_init"):
        tiny_merits_config(architecture, conversation_init="xavier")


def test_model_loss_terms_finite_and_nonzero():
    model = randomize(make_model("mister-e"), std=0.3)
    text, audio = embeds()
    out = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, labels=LABELS)
    for name, value in out.loss_terms.items():
        assert torch.isfinite(value) and value > 0, name
    expected = sum(out.loss_terms[k] for k in ("mixture", "expert_speech", "expert_text", "expert_cross_modal"))
    expected = expected + 2.0 * out.loss_terms["supcon"] + 0.1 * out.loss_terms["kl"]
    torch.testing.assert_close(out.loss.detach(), expected)
    # no turn with both modalities -> SupCon is exactly 0
    out = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK,
                text_mask=torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0]]), audio_mask=torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]]),
                labels=LABELS)
    assert out.loss_terms["supcon"] == 0 and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
# Stages and freezing
# ---------------------------------------------------------------------------------------------------------------

STAGE_PREFIXES = {
    "utterance": ("text_encoder.", "speech_encoder."),
    "context": ("text_context.", "audio_context."),
    "fusion": ("fusion.",),
    "context+fusion": ("text_context.", "audio_context.", "fusion."),
    "moe": ("text_context.", "audio_context.", "fusion.", "gate."),
}


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_gradients_reach_exactly_the_stage(architecture):
    model = make_model(architecture, text_config=tiny_roberta_config(), audio_config=tiny_wavlm_config())
    model.train()
    batch = _raw_batch()
    for stage in ["utterance"] + STAGES[architecture]:
        trainable = set(model.freeze_for_stage(stage))
        expected = {
            name for name, _ in model.named_parameters()
            if name.startswith(STAGE_PREFIXES[stage]) and not name.startswith("speech_encoder.backbone.")
        }
        assert trainable == expected, stage
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()  # the stage comes from freeze_for_stage via config.stage
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        # the attentive pooling's score bias shifts every score of a softmax equally: its gradient is zero by
        # construction (only rounding makes it nonzero), so it counts as reached whether or not rounding shows it
        reached = with_grad | {name for name in expected if name.endswith("pooler.score.bias")}
        if stage == "context+fusion":  # the joint loss is the final output's: with both modalities at every turn, the
            # context classifiers (the one-modality fallback) get no gradient (joint_context_losses=False, issue 17)
            reached |= {name for name in expected if name.startswith(("text_context.classifier.", "audio_context.classifier."))}
        assert reached == expected, (stage, sorted(expected - reached)[:5], sorted(reached - expected)[:5])
        assert not any(p.requires_grad for p in model.speech_encoder.backbone.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_streaming_equals_full_causal_forward(architecture):
    model = randomize(make_model(architecture, causal=True), std=0.1)
    turns = 6
    text, audio = embeds(batch=2, turns=turns)
    turn_mask = torch.ones(2, turns, dtype=torch.long)
    text_mask = torch.ones(2, turns, dtype=torch.long)
    audio_mask = torch.ones(2, turns, dtype=torch.long)
    text_mask[0, 2] = 0
    audio_mask[1, 4] = 0
    with torch.no_grad():
        full = model(text_embeds=text, audio_embeds=audio, turn_mask=turn_mask, text_mask=text_mask,
                     audio_mask=audio_mask)
        state = model.init_stream_state(batch_size=2)
        for t in range(turns):
            logits, gate, state = model.stream_step(state, text_embeds=text[:, t], audio_embeds=audio[:, t],
                                                    text_mask=text_mask[:, t], audio_mask=audio_mask[:, t])
            torch.testing.assert_close(logits, full.logits[:, t], atol=1e-5, rtol=0)
            if architecture == "mister-e":
                torch.testing.assert_close(gate, full.gate_weights[:, t], atol=1e-5, rtol=0)
            else:
                assert gate is None
    # earlier turns are cached (O(T) memory), not recomputed: one cached key per turn, fixed-size GRU states
    assert state["turn"] == turns
    assert state["fusion"]["blocks"][0]["text_self"][0].shape[2] == turns
    assert state["text_context"]["gru"].shape[1] == 2
    # a future turn never changes the past in the causal model
    changed = model(text_embeds=torch.cat([text[:, :3], text[:, 3:] + 5], 1), audio_embeds=audio,
                    turn_mask=turn_mask, text_mask=text_mask, audio_mask=audio_mask)
    torch.testing.assert_close(changed.logits[:, :3], full.logits[:, :3], atol=1e-5, rtol=0)


def test_streaming_with_raw_features_and_non_causal_error():
    model = randomize(make_model("merits-l", causal=True, audio_feature_dim=20), std=0.1)
    text = torch.randn(1, 3, D_TEXT)
    feats = torch.randn(1, 3, 20)
    with torch.no_grad():
        full = model(text_embeds=text, audio_features=feats, turn_mask=torch.ones(1, 3))
        state = model.init_stream_state()
        for t in range(3):
            logits, _, state = model.stream_step(state, text_embeds=text[:, t], audio_features=feats[:, t])
            torch.testing.assert_close(logits, full.logits[:, t], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="causal"):
        make_model("merits-l").init_stream_state()


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def test_from_backbones_loads_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    text_dir, audio_dir, whisper_dir = tmp_path / "text", tmp_path / "audio", tmp_path / "whisper"
    AutoModel.from_config(tiny_roberta_config()).save_pretrained(text_dir)
    AutoModel.from_config(tiny_wavlm_config()).save_pretrained(audio_dir)
    AutoModel.from_config(tiny_whisper_config()).save_pretrained(whisper_dir)
    model = MeritsForConversationClassification.from_backbones(
        text_dir, audio_dir, architecture="merits-l", id2label={0: "a", 1: "b"}, speech_head_hidden_sizes=[8, 4])
    reference = AutoModel.from_pretrained(text_dir).state_dict()
    for name, value in model.text_encoder.backbone.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    reference = AutoModel.from_pretrained(audio_dir).state_dict()
    for name, value in model.speech_encoder.backbone.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    assert model.config.text_embed_dim == 32 and model.config.audio_embed_dim == 4
    assert not any(p.requires_grad for p in model.speech_encoder.backbone.parameters())

    model = MeritsForConversationClassification.from_backbones(
        audio_model_name_or_path=whisper_dir, architecture="mister-e", audio_embed_dim=None, id2label={0: "a", 1: "b"})
    reference = AutoModel.from_pretrained(whisper_dir).get_encoder().state_dict()
    for name, value in model.speech_encoder.backbone.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)


def test_save_and_reload_gives_the_same_outputs(tmp_path):
    model = randomize(make_model("mister-e", text_config=tiny_roberta_config()), std=0.05)
    batch = _raw_batch()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  audio_embeds=embeds()[1], turn_mask=TURN_MASK)
    with torch.no_grad():
        expected = model(**kwargs).logits
    model.save_pretrained(tmp_path)
    loaded = MeritsForConversationClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kwargs).logits, expected)


# ---------------------------------------------------------------------------------------------------------------
# Speed paths: packed GRU with hand-written backward, real-row convolutions; checkpointing; bf16
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
def test_packed_gru_equals_torch_gru_with_gradients(bidirectional):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from merits.modeling_merits import MeritsTurnPlan, run_packed_gru

    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 4, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    turn_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    x = torch.randn(4, 5, 5, dtype=torch.double, requires_grad=True)
    plan = MeritsTurnPlan(turn_mask)
    ours = run_packed_gru(gru, plan.gather(x), plan)
    packed = pack_padded_sequence(x, turn_mask.sum(1), batch_first=True, enforce_sorted=False)
    reference = pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=5)[0][turn_mask.bool()]
    torch.testing.assert_close(ours, reference)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), [x, *gru.parameters()])
    expected = torch.autograd.grad((reference * weights).sum(), [x, *gru.parameters()])
    for (name, _), got, want in zip([("x", None), *gru.named_parameters()], grads, expected):
        torch.testing.assert_close(got, want, msg=name)
    # the recurrence's hand-written backward against finite differences
    plan_inputs = (torch.randn(3, 2, 2, 6, dtype=torch.double, requires_grad=True),  # [T, D, B, 3H]
                   torch.randn(2, 6, 2, dtype=torch.double, requires_grad=True),
                   torch.randn(2, 6, dtype=torch.double, requires_grad=True))
    from merits.modeling_merits import MeritsGRURecurrence

    for sizes in ([2, 2, 2], [2, 2, 1]):  # all running; one sequence ends after step 2
        assert torch.autograd.gradcheck(lambda a, b, c, s=sizes: MeritsGRURecurrence.apply(a, b, c, s), plan_inputs)


def test_turn_convolutions_equal_conv1d_per_conversation():
    for causal in (False, True):
        model = randomize(make_model("mister-e", causal=causal), std=0.1)
        expert = model.text_context
        text = embeds()[0]
        out = expert(text, TURN_MASK)[0]
        for b, length in enumerate(TURN_MASK.sum(1).tolist()):
            u = text[b : b + 1, :length].transpose(1, 2)
            conv = sum(
                torch.relu(c(torch.nn.functional.pad(u, (k - 1, 0)) if causal else u))
                for k, c in zip(expert.kernel_sizes, expert.convs)
            ).transpose(1, 2)
            gru_out = expert.gru(conv)[0]
            torch.testing.assert_close(out[b, :length], (gru_out + expert.skip(text[b : b + 1, :length]))[0])
            assert torch.all(out[b, length:] == 0)


def test_gradient_checkpointing_of_the_text_backbone_trains():
    config = dict(text_config=tiny_roberta_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                  audio_embed_dim=None, text_head_dropout=0.0)
    batch = _raw_batch()
    batch = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], turn_mask=TURN_MASK,
                 labels=LABELS)
    plain, checkpointed = make_model("merits-l", **config), make_model("merits-l", **config)
    assert MeritsForConversationClassification.supports_gradient_checkpointing
    enable = getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)
    enable()
    layers = [m for m in checkpointed.text_encoder.backbone.modules()
              if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    assert layers, "no backbone layer has checkpointing on"
    calls = []
    for layer in layers:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=func, **k: calls.append(1) or _f(*a, **k)
    for model in (plain, checkpointed):
        model.freeze_for_stage("utterance")
        model.train()
    losses = []
    optimizer = torch.optim.AdamW(checkpointed.parameters(), lr=1e-2)
    for step in range(4):
        plain.zero_grad()
        optimizer.zero_grad()
        loss = checkpointed(**batch).loss
        loss.backward()
        if step == 0:  # the same gradients as without checkpointing
            plain(**batch).loss.backward()
            for (name, p), q in zip(checkpointed.named_parameters(), plain.parameters()):
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, q.grad, msg=name)
        optimizer.step()
        losses.append(loss.item())
    assert calls and losses[-1] < losses[0]


@pytest.mark.parametrize("architecture", ["merits-l", "mister-e"])
def test_bf16_autocast_forward_is_finite(architecture):
    model = make_model(architecture, text_config=tiny_roberta_config(), audio_config=tiny_wavlm_config())
    batch = _raw_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for stage in ["utterance"] + STAGES[architecture]:
            out = model(**batch, stage=stage)
            assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss.float()), stage
    # the cached-embedding training path, backward included (the GRU recurrence's own backward)
    model = make_model(architecture)
    model.train()
    text, audio = embeds()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, labels=LABELS,
                    stage=STAGES[architecture][-1])
    out.loss.backward()
    assert torch.isfinite(out.logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_exported_stage2_features_give_the_same_fusion_stage():
    """Stage III on the exported stage II features c_i (§3.1) equals stage III recomputing them: logits, loss and
    the fusion gradients; a turn without audio still falls back to the text context logits."""
    model = randomize(make_model("merits-l"))
    model.freeze_for_stage("fusion")
    text, audio = embeds()
    audio_mask = TURN_MASK.clone()
    audio_mask[0, 2] = 0  # one turn without audio
    inputs = dict(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, audio_mask=audio_mask, labels=LABELS)
    exported = model.get_context_features(**inputs)
    assert exported["text_context_features"].shape == (B, T, 2 * model.config.context_text_hidden_size)
    assert exported["audio_context_features"].shape == (B, T, 2 * model.config.context_audio_hidden_size)
    assert not exported["text_context_features"].requires_grad
    assert (exported["text_context_features"][1, 3] == 0).all()  # padded turn
    model.eval()  # same dropout masks (none) in both passes
    grads = []
    for extra in ({}, exported):
        model.zero_grad()
        out = model(**inputs, stage="fusion", **extra)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if extra:
            fast = out
        else:
            full = out
    torch.testing.assert_close(fast.logits, full.logits)
    torch.testing.assert_close(fast.loss, full.loss)
    torch.testing.assert_close(fast.logits[0, 2], full.context_text_logits[0, 2])  # the text fallback
    assert grads[0].keys() == grads[1].keys() and all(n.startswith("fusion") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_exported_stage2_features_are_refused_where_they_do_not_apply():
    text, audio = embeds()
    model = make_model("merits-l")
    exported = model.get_context_features(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK)
    for stage in ("context", "context+fusion"):  # these train the context encoders: features must be recomputed
        with pytest.raises(ValueError, match="fusion stage only"):
            model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, stage=stage, **exported)
    with pytest.raises(ValueError, match=r"must be \[B, T, 2H\]"):
        model(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, stage="fusion",
              text_context_features=exported["text_context_features"][..., :3])
    mister_e = make_model("mister-e")
    with pytest.raises(ValueError, match="MiSTER-E trains its context"):
        mister_e.get_context_features(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK)
    with pytest.raises(ValueError, match="fusion stage only"):
        mister_e(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK, **exported)


def test_dropout_masks_drawn_fast_keep_the_distribution_and_the_gradient():
    from merits.modeling_merits import MeritsDropout

    dropout = MeritsDropout(0.3)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # each element kept with probability 1 - p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))  # and scaled by 1 / (1 - p)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask) / dx = mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the torch generator: seeded runs repeat
    dropout.eval()
    assert torch.equal(dropout(x), x)
    assert torch.equal(MeritsDropout(1.0).train()(x), torch.zeros_like(x))
    assert torch.equal(MeritsDropout(0.0).train()(x), x)


def test_batch_friendly_speech_backbone_gives_the_same_states_and_survives_deepcopy():
    import copy

    from transformers import WavLMConfig

    from merits.modeling_merits import batch_friendly

    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, num_buckets=32, max_bucket_distance=100)
    plain = AutoModel.from_config(config).eval()
    fast = batch_friendly(copy.deepcopy(plain))
    patched = [m for m in fast.modules() if "forward" in vars(m) or "torch_multi_head_self_attention" in vars(m)]
    assert len(patched) == 1 + config.num_hidden_layers  # the feature encoder and every attention
    assert list(fast.state_dict()) == list(plain.state_dict())
    values = torch.randn(3, 4000) * 0.1
    mask = torch.ones(3, 4000, dtype=torch.long)
    mask[1, 3000:] = 0
    mask[2, 2000:] = 0
    values = values * mask
    with torch.no_grad():
        want = plain(input_values=values, attention_mask=mask, output_hidden_states=True).hidden_states
        got = fast(input_values=values, attention_mask=mask, output_hidden_states=True).hidden_states
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(fast)  # the bound methods follow the copy: its own weights run
        for p in twin.parameters():
            p.add_(0.5)
        assert not torch.allclose(twin(input_values=values, attention_mask=mask).last_hidden_state, got[-1])
        torch.testing.assert_close(fast(input_values=values, attention_mask=mask).last_hidden_state, got[-1])
    # the model applies it to its speech backbone
    model = MeritsForConversationClassification(MeritsConfig(architecture="merits-l", audio_config=config, id2label={0: "a", 1: "b"}))
    assert "forward" in vars(model.speech_encoder.backbone.feature_extractor)


def test_modeling_merits_still_exports_every_name_of_the_split_files():
    """modeling_merits.py was split by concept into the Hub files below: every name it defined before stays importable
    from it (tests, the training code and users import them from there), as the very object the new file defines."""
    import importlib

    from merits import modeling_merits

    homes = {
        "common_merits": ["MeritsDropout", "MeritsConversationClassifierOutput", "float32_region", "masked_softmax",
                          "causal_mask", "check_turn_mask", "scatter_turns", "_default_modality_mask",
                          "_mark_conversation_level", "init"],
        "losses_merits": ["focal_loss", "supervised_contrastive_loss", "symmetric_kl_loss"],
        "utterance_encoders_merits": ["MeritsAttentiveStatisticsPooling", "MeritsTextEncoder", "_ACTIVATIONS",
                                      "_conv_output_length", "masked_group_norm", "_feature_encoder_forward",
                                      "_self_attention_sequence_first", "batch_friendly", "_masked_time_mean",
                                      "MeritsSpeechEncoder"],
        "context_merits": ["MeritsTurnPlan", "_baddbmm_into", "MeritsGRURecurrence", "RECURRENCE_ROUTES",
                           "resolve_recurrence", "_packed_positions", "run_packed_gru_cudnn", "run_packed_gru",
                           "MeritsContextEncoder"],
        "fusion_merits": ["MeritsAttention", "MeritsCoAttentionBlock", "MeritsCoAttentionFusion"],
    }
    for module_name, names in homes.items():
        module = importlib.import_module(f"merits.{module_name}")
        for name in names:
            assert getattr(modeling_merits, name) is getattr(module, name), f"{module_name}.{name}"
    for name in modeling_merits.__all__:
        assert hasattr(modeling_merits, name), name
