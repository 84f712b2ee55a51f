"""Faithfulness to the papers and the official MiSTER-E code (issue 17).

Each restored behaviour is checked against a small re-implementation of the official formula: the loss terms and the
co-attention expert against `bench/reference/mister_e.py` (an independent re-implementation of the authors'
`hierarchical_moe.py` / `train_moe.py`) on UNPADDED tensors (where masking padded turns changes nothing), the
utterance heads against the official head written out here in a few lines.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merits.configuration_merits import MeritsConfig
from merits.modeling_merits import (
    MeritsCoAttentionFusion,
    MeritsForConversationClassification,
    MeritsSpeechEncoder,
    MeritsTextEncoder,
    focal_loss,
    supervised_contrastive_loss,
    symmetric_kl_loss,
)

from _tiny import tiny_llama_config


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.reference import mister_e as reference  # noqa: E402


LABELS = {0: "a", 1: "b", 2: "c", 3: "d"}


# ---------------------------------------------------------------------------------------------------------------------
# 1. KL term: batchmean as in the official code
# ---------------------------------------------------------------------------------------------------------------------


def test_kl_term_equals_official_batchmean_on_unpadded_tensors():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 3, 5) * 2  # [B, T, E, C]
    available = torch.ones(3, 7, 3, dtype=torch.bool)
    ours = symmetric_kl_loss(logits, available)  # default: batchmean
    official = reference.symmetric_kl(logits)
    assert torch.allclose(ours, official, rtol=1e-5, atol=1e-6), (ours, official)
    # the former per-turn mean is the same total divided by T (here 7) instead of by B: ~T times weaker
    mean = symmetric_kl_loss(logits, available, reduction="mean")
    assert torch.allclose(mean * 3 * 7 / 3, official, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        symmetric_kl_loss(logits, available, reduction="sum")


def test_kl_term_ignores_padded_turns_and_still_divides_by_conversations():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 3, 4)
    available = torch.ones(2, 5, 3, dtype=torch.bool)
    available[1, 3:] = False  # conversation 1 has 3 turns
    padded = logits.clone()
    padded[1, 3:] = torch.randn(2, 3, 4) * 10  # whatever sits at the pads changes nothing
    ours = symmetric_kl_loss(padded, available)
    assert torch.allclose(ours, symmetric_kl_loss(logits, available))
    # = the official batchmean over the real turns only: sum over the 5 + 3 real turns, divided by B = 2
    total = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        real = torch.cat([logits[0, :, [i, j]], logits[1, :3, [i, j]]], dim=0)  # [8, 2, C]
        p, q = F.log_softmax(real[:, 0], -1), F.log_softmax(real[:, 1], -1)
        total = total + (F.kl_div(p, q.exp(), reduction="sum") + F.kl_div(q, p.exp(), reduction="sum")) / 2
    assert torch.allclose(ours, total / 3, rtol=1e-5)
    # a fully padded conversation (no real turn) is not counted in B
    extra = torch.cat([padded, torch.randn(1, 5, 3, 4)]), torch.cat([available, torch.zeros(1, 5, 3, dtype=torch.bool)])
    assert torch.allclose(symmetric_kl_loss(*extra), ours)


def test_model_uses_the_configured_kl_reduction():
    torch.manual_seed(2)
    kwargs = dict(architecture="mister-e", text_embed_dim=8, audio_embed_dim=6, id2label=LABELS,
                  context_text_hidden_size=4, context_audio_hidden_size=4, context_conv_channels=8,
                  fusion_hidden_size=12, fusion_num_blocks=1, fusion_attention_size=6, fusion_num_heads=3)
    batch = dict(text_embeds=torch.randn(2, 6, 8), audio_embeds=torch.randn(2, 6, 6),
                 turn_mask=torch.ones(2, 6, dtype=torch.long), labels=torch.randint(0, 4, (2, 6)))
    model = MeritsForConversationClassification(MeritsConfig(**kwargs)).eval()
    out = model(**batch)
    stacked = torch.stack(out.expert_logits, dim=-2)
    assert torch.allclose(out.loss_terms["kl"], reference.symmetric_kl(stacked), rtol=1e-5)
    mean_model = MeritsForConversationClassification(MeritsConfig(kl_reduction="mean", **kwargs)).eval()
    mean_model.load_state_dict(model.state_dict())
    assert torch.allclose(mean_model(**batch).loss_terms["kl"] * 6, out.loss_terms["kl"], rtol=1e-5)
    with pytest.raises(ValueError, match="kl_reduction"):
        MeritsConfig(kl_reduction="sum", **kwargs)


def test_focal_and_supcon_equal_the_official_terms_on_unpadded_tensors():
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 4)
    labels = torch.randint(0, 4, (3, 5))
    assert torch.allclose(focal_loss(logits, labels, gamma=3.0), reference.focal_loss(logits, labels, 3.0), rtol=1e-5)
    text, audio = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    ours = supervised_contrastive_loss(text, audio, labels, torch.ones(3, 5, dtype=torch.bool), temperature=1.0)
    # the reference stacks the views the other way round (speech first): SupCon is symmetric in the two views
    assert torch.allclose(ours, reference.supcon_loss(audio, text, labels, 1.0), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 2. / 3. MiSTER-E utterance heads: the embedding before the ReLU, hidden -> hidden attentive pooling
# ---------------------------------------------------------------------------------------------------------------------


def official_text_head(hidden, mask, encoder):
    """The official text head written out: LayerNorm -> tanh attention (hidden -> hidden -> 1) over non-pad tokens ->
    weighted mean || weighted std -> fc (the exported embedding) -> ReLU -> Dropout -> classifier."""
    x = encoder.layer_norm(hidden)
    scores = encoder.pooler.score(torch.tanh(encoder.pooler.attention(x))).squeeze(-1)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).unsqueeze(-1)
    mean = (weights * x).sum(1)
    std = ((weights * x * x).sum(1) - mean * mean).clamp(min=1e-5).sqrt()
    embedding = encoder.projection(torch.cat([mean, std], -1))
    return embedding, encoder.classifier(torch.relu(embedding))


def test_mister_e_text_embedding_is_exported_before_the_relu_with_a_hidden_wide_pooling():
    torch.manual_seed(4)
    config = MeritsConfig(architecture="mister-e", text_config=tiny_llama_config(), utterance_embed_dim=24,
                          id2label=LABELS)
    assert config.utterance_embed_before_activation and config.attentive_pooling_hidden_size is None
    model = MeritsForConversationClassification(config).eval()
    encoder = model.text_encoder
    assert encoder.pooler.attention.weight.shape == (32, 32)  # hidden -> hidden, as the official code (3584 -> 3584)
    input_ids = torch.randint(3, 99, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    embeds, logits = encoder(input_ids, attention_mask)
    hidden = encoder.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    want_embeds, want_logits = official_text_head(hidden, attention_mask.bool(), encoder)
    assert torch.allclose(embeds, want_embeds, atol=1e-5) and torch.allclose(logits, want_logits, atol=1e-5)
    assert (embeds < 0).any(), "the exported embedding is signed (before the ReLU)"
    # the former behaviour: the ReLU'd embedding (the classifier reads the same vector)
    old = MeritsForConversationClassification(MeritsConfig(
        architecture="mister-e", text_config=tiny_llama_config(), utterance_embed_dim=24, id2label=LABELS,
        utterance_embed_before_activation=False, attentive_pooling_hidden_size=32)).eval()
    old.load_state_dict(model.state_dict())
    old_embeds, old_logits = old.text_encoder(input_ids, attention_mask)
    assert torch.allclose(old_embeds, torch.relu(embeds), atol=1e-6) and torch.allclose(old_logits, logits, atol=1e-6)


def test_mister_e_speech_embedding_is_exported_before_the_relu():
    torch.manual_seed(5)
    config = MeritsConfig(architecture="mister-e", audio_feature_dim=10, id2label=LABELS)
    head = MeritsSpeechEncoder(config).eval()
    features = torch.randn(4, 10)
    embeds, logits = head(audio_features=features)
    linear = head.head[0]
    assert torch.allclose(embeds, linear(features), atol=1e-6)  # official: Linear 4096 -> 2048 is the embedding
    assert torch.allclose(logits, head.classifier(torch.relu(linear(features))), atol=1e-6)
    # merits-l (the CARE head) and the old mister-e behaviour keep the activated vector as the embedding
    relu_config = MeritsConfig(architecture="merits-l", audio_feature_dim=10, id2label=LABELS,
                               speech_head_hidden_sizes=[8, 6], speech_head_activation="relu")
    assert not relu_config.utterance_embed_before_activation
    relu_head = MeritsSpeechEncoder(relu_config).eval()
    assert (relu_head(audio_features=features)[0] >= 0).all()
    # no parameter moves: a state dict saved either way loads into the other
    other = MeritsSpeechEncoder(MeritsConfig(architecture="mister-e", audio_feature_dim=10, id2label=LABELS,
                                             utterance_embed_before_activation=False))
    other.load_state_dict(head.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# 7. Co-attention: the official layout (Linear d -> 120, nn.MultiheadAttention's own projections, 120 -> d)
# ---------------------------------------------------------------------------------------------------------------------


def _copy_linear(ours: nn.Linear, weight, bias):
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)


def _load_reference_fusion(ours: MeritsCoAttentionFusion, ref: reference.ReferenceFusionExpert):
    """Copy the reference expert's weights into ours (module names of the two layouts side by side)."""
    pairs = [(ours.text_projection, ref.text_in), (ours.audio_projection, ref.audio_in), (ours.text_skip, ref.text_skip),
             (ours.audio_skip, ref.audio_skip), (ours.dense, ref.hidden), (ours.classifier, ref.classifier)]
    for mine, theirs in pairs:
        _copy_linear(mine, theirs.weight, theirs.bias)
    ours.layer_norm.load_state_dict(ref.norm.state_dict())
    for block, rblock in zip(ours.blocks, ref.blocks):
        for attention, (q, k, v), mha, out in (
            (block.text_cross_attention, (rblock.text_q, rblock.audio_k, rblock.audio_v), rblock.text_cross_attention, rblock.text_out),
            (block.audio_cross_attention, (rblock.audio_q, rblock.text_k, rblock.text_v), rblock.audio_cross_attention, rblock.audio_out),
            (block.text_self_attention, (rblock.text_q_self, rblock.text_k_self, rblock.text_v_self), rblock.text_self_attention, rblock.text_out_self),
            (block.audio_self_attention, (rblock.audio_q_self, rblock.audio_k_self, rblock.audio_v_self), rblock.audio_self_attention, rblock.audio_out_self),
        ):
            for mine, theirs in ((attention.query, q), (attention.key, k), (attention.value, v), (attention.output, out)):
                _copy_linear(mine, theirs.weight, theirs.bias)
            for mine, weight, bias in zip((attention.inner_query, attention.inner_key, attention.inner_value),
                                          mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                _copy_linear(mine, weight, bias)
            _copy_linear(attention.inner_output, mha.out_proj.weight, mha.out_proj.bias)
        for mine, theirs in ((block.text_cross_norm, rblock.text_norm), (block.audio_cross_norm, rblock.audio_norm),
                             (block.text_self_norm, rblock.text_norm_self), (block.audio_self_norm, rblock.audio_norm_self)):
            mine.load_state_dict(theirs.state_dict())


def test_official_co_attention_layout_equals_the_reference_expert():
    torch.manual_seed(6)
    config = MeritsConfig(architecture="mister-e", text_embed_dim=16, audio_embed_dim=16, id2label=LABELS,
                          fusion_hidden_size=24, fusion_num_blocks=2, fusion_attention_size=120, fusion_num_heads=3,
                          fusion_attention_inner_projections=True)
    model = MeritsForConversationClassification(config).eval()
    ref = reference.ReferenceFusionExpert(input_dim=16, num_blocks=2, num_classes=4, dim=24).eval()
    ours_count = sum(p.numel() for p in model.fusion.parameters())
    assert ours_count == sum(p.numel() for p in ref.parameters())  # the same parameters, one for one
    _load_reference_fusion(model.fusion, ref)
    text, audio = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    full = torch.ones(3, 5, dtype=torch.bool)
    logits, text_repr, audio_repr = model.fusion(text, audio, full, full, full)
    ref_audio, ref_text, ref_logits = ref(audio, text)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(text_repr, ref_text, atol=1e-5) and torch.allclose(audio_repr, ref_audio, atol=1e-5)


def test_co_attention_layouts_and_inits():
    torch.manual_seed(7)
    kwargs = dict(architecture="mister-e", text_embed_dim=16, audio_embed_dim=16, id2label=LABELS,
                  fusion_hidden_size=24, fusion_num_blocks=1, fusion_attention_size=12, fusion_num_heads=3)
    default = MeritsForConversationClassification(MeritsConfig(**kwargs))
    official = MeritsForConversationClassification(MeritsConfig(fusion_attention_inner_projections=True, **kwargs))
    assert default.fusion.blocks[0].text_cross_attention.inner_query is None  # today's layout stays the default
    extra = sum(p.numel() for p in official.fusion.parameters()) - sum(p.numel() for p in default.fusion.parameters())
    assert extra == 4 * 4 * (12 * 12 + 12)  # 4 attentions x (3 in + 1 out) x Linear(120 -> 120) per block
    attention = official.fusion.blocks[0].text_self_attention
    bound = math.sqrt(6.0 / (4 * 12))  # nn.MultiheadAttention: Xavier-uniform over the stacked [3E, E] in_proj
    for layer in (attention.inner_query, attention.inner_key, attention.inner_value):
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.5 * bound
        assert (layer.bias == 0).all()
    assert (attention.inner_output.bias == 0).all()
    # the two layouts keep their own checkpoints: loading one into the other is refused
    with pytest.raises(RuntimeError, match="inner_query"):
        default.load_state_dict(official.state_dict())


def test_official_co_attention_streams_like_the_full_causal_forward():
    torch.manual_seed(8)
    config = MeritsConfig(architecture="mister-e", text_embed_dim=8, audio_embed_dim=8, id2label=LABELS, causal=True,
                          context_text_hidden_size=4, context_audio_hidden_size=4, context_conv_channels=8,
                          fusion_hidden_size=12, fusion_num_blocks=2, fusion_attention_size=6, fusion_num_heads=3,
                          fusion_attention_inner_projections=True)
    model = MeritsForConversationClassification(config).eval()
    text, audio = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    full = model(text_embeds=text, audio_embeds=audio, turn_mask=torch.ones(2, 4, dtype=torch.long)).logits
    state = model.init_stream_state(batch_size=2)
    for t in range(4):
        logits, _, state = model.stream_step(state, text_embeds=text[:, t], audio_embeds=audio[:, t])
        assert torch.allclose(logits, full[:, t], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Joint stage II+III ablation: the fusion loss only (the paper merges the stages), context losses on a switch
# ---------------------------------------------------------------------------------------------------------------------


def test_joint_context_fusion_trains_on_the_fusion_loss_only_by_default():
    torch.manual_seed(9)
    kwargs = dict(architecture="merits-l", text_embed_dim=8, audio_embed_dim=6, id2label=LABELS,
                  context_text_hidden_size=4, context_audio_hidden_size=4, fusion_hidden_size=12, fusion_num_blocks=1,
                  fusion_attention_size=6, fusion_num_heads=3)
    batch = dict(text_embeds=torch.randn(2, 5, 8), audio_embeds=torch.randn(2, 5, 6),
                 turn_mask=torch.ones(2, 5, dtype=torch.long), labels=torch.randint(0, 4, (2, 5)), stage="context+fusion")
    model = MeritsForConversationClassification(MeritsConfig(**kwargs)).eval()
    out = model(**batch)
    assert set(out.loss_terms) == {"joint"} and torch.allclose(out.loss, out.loss_terms["joint"])
    # every turn has both modalities: the loss is the fusion head's
    assert torch.allclose(out.loss, F.cross_entropy(out.fusion_logits.flatten(0, 1), batch["labels"].flatten()))
    out.loss.backward()
    assert model.text_context.gru.weight_ih_l0.grad.abs().sum() > 0  # end to end: the context encoders learn from it
    with_context = MeritsForConversationClassification(MeritsConfig(joint_context_losses=True, **kwargs)).eval()
    with_context.load_state_dict(model.state_dict())
    terms = with_context(**batch).loss_terms
    assert set(terms) == {"fusion", "context_text", "context_audio"}
    # a turn with one modality: the joint loss trains its context fallback (the final output there)
    text_only = torch.ones(2, 5, dtype=torch.long)
    audio_mask = text_only.clone()
    audio_mask[0, 2] = 0
    model.zero_grad()
    out = model(**batch, audio_mask=audio_mask)
    out.loss.backward()
    assert model.text_context.classifier.weight.grad.abs().sum() > 0
    assert model.audio_context.classifier.weight.grad is None or model.audio_context.classifier.weight.grad.abs().sum() == 0
