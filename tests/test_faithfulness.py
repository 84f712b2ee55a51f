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


# ---------------------------------------------------------------------------------------------------------------------
# configs/ablations: one YAML per paper row, inheriting from a main config; every one parses and builds
# ---------------------------------------------------------------------------------------------------------------------

ABLATIONS = sorted((REPO / "configs" / "ablations").glob("*.yaml"))


def _flat(options: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_config_differs_from_its_main_config_only_where_it_says_and_builds(path):
    import yaml
    from transformers import LlamaConfig

    import test_configs
    from merits.training.arguments import parse_args

    test_configs.BACKBONES.setdefault("meta-llama/Llama-3.1-8B", lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, max_position_embeddings=131072, rope_theta=5e5, tie_word_embeddings=False))
    own = yaml.safe_load(path.read_text())
    main = (path.parent / own.pop("inherit")).resolve()
    assert main.is_file() and main.parent == REPO / "configs", "an ablation inherits from a main config"
    args = parse_args(["--config", str(path)])
    parent = parse_args(["--config", str(main)])
    changed = {k for k, v in _flat(args.to_dict()).items() if _flat(parent.to_dict()).get(k, object()) != v}
    changed -= {"config", "output_dir"}
    assert changed, f"{path.name} changes nothing"
    assert changed <= set(_flat(own)), f"{path.name} changes {sorted(changed - set(_flat(own)))} it does not set"
    assert args.output_dir.endswith(path.stem)
    for architecture in args.architectures():
        config = test_configs.model_config(args, architecture)
        with torch.device("meta"):
            model = MeritsForConversationClassification(config)
        for stage in args.stages_for(architecture):
            assert model.freeze_for_stage("utterance" if stage == "pretrain" else stage)
    readme = (REPO / "configs" / "ablations" / "README.md").read_text()
    stem = path.stem.split("_", 1)[1] if not path.stem.startswith("msp") else path.stem
    row = stem.split("_", 1)[1] if "_" in stem and not stem.startswith("msp") else stem
    assert row in readme, f"configs/ablations/README.md does not list {path.name}"


def test_inherit_merges_mappings_and_refuses_cycles(tmp_path):
    from merits.training.arguments import ConfigError, parse_args

    (tmp_path / "base.yaml").write_text("architecture: mister-e\nmodel: {kl_weight: 0.5, supcon_weight: 1.0}\n"
                                        "moe: {num_epochs: 3, learning_rate: 1.0e-3}\nmodalities: [text, audio]\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\nmodel: {kl_weight: 0.0}\nmoe: {num_epochs: 5}\n"
                                         "modalities: [text]\n")
    args = parse_args(["--config", str(tmp_path / "child.yaml")])
    assert args.model == {"kl_weight": 0.0, "supcon_weight": 1.0}
    assert (args.moe.num_epochs, args.moe.learning_rate) == (5, 1e-3) and args.modalities == ["text"]
    (tmp_path / "loop.yaml").write_text("inherit: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        parse_args(["--config", str(tmp_path / "loop.yaml")])
    (tmp_path / "orphan.yaml").write_text("inherit: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*not found.*inherited by"):
        parse_args(["--config", str(tmp_path / "orphan.yaml")])


def test_pretrain_config_names_a_whisper_model_load_whisper_takes():
    import re

    import whisper

    for path in [REPO / "configs" / "msp_podcast_pretrain.yaml", *sorted((REPO / "configs" / "ablations").glob("msp_*.yaml"))]:
        names = re.findall(r"--whisper-model (\S+)", path.read_text())
        assert names, path
        assert all(name in whisper.available_models() for name in names), (path, names)


def test_mosi_configs_describe_the_split_the_loader_uses():
    import csv

    for path in (REPO / "configs").glob("mosi_m*.yaml"):  # mosi_merits-l, mosi_mister-e
        text = path.read_text()
        assert "49 videos train" not in text and "52 videos train, 10 validation, 31 test" in text
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "mosi" / "mosi_label.csv"
    if data.is_file():
        videos = {}
        for row in csv.DictReader(open(data)):
            videos.setdefault(row["mode"], set()).add(row["id"].rsplit("_", 1)[0])
        assert (len(videos["train"]), len(videos["dev"])) == (52, 10)


# ---------------------------------------------------------------------------------------------------------------------
# Training: the speech head's own optimiser group, no clipping in stage I, the 5 s random crop
# ---------------------------------------------------------------------------------------------------------------------


def test_stage1_defaults_follow_the_official_utterance_code():
    from merits.training.arguments import ConfigError, parse_args

    args = parse_args([], default_config=None)
    assert args.utterance.max_grad_norm is None and args.moe.max_grad_norm == 1.0
    assert args.separate_speech_head_optimizer
    head = args.speech_head  # the CARE head (§2.3): Adam 1e-4
    assert (head.learning_rate, head.optimizer, head.weight_decay, head.max_grad_norm) == (1e-4, "adam", 0.0, None)
    with pytest.raises(ConfigError, match="speech_head.optimizer"):
        parse_args(["--speech_head.weight_decay", "0.1", "--utterance.weight_decay", "0.01"], default_config=None)
    with pytest.raises(ConfigError, match="audio_train_crop_seconds"):
        parse_args(["--audio_train_crop_seconds", "0"], default_config=None)


def test_separate_speech_head_group_has_its_own_lr_schedule_and_clip():
    from merits.training.arguments import StageArguments
    from merits.training.loop import build_optimizer, build_scheduler

    text = nn.Linear(4, 4)
    speech = nn.Linear(4, 4)
    text_args = StageArguments(learning_rate=2e-5, weight_decay=0.01, warmup_ratio=0.5, optimizer="adamw")
    speech_args = StageArguments(learning_rate=1e-4, weight_decay=0.0, optimizer="adam", max_grad_norm=None)
    groups = [(list(text.parameters()), text_args), (list(speech.parameters()), speech_args)]
    optimizer = build_optimizer(None, text_args, groups)
    assert isinstance(optimizer, torch.optim.AdamW)  # Adam == AdamW without weight decay
    assert [g["lr"] for g in optimizer.param_groups] == [2e-5, 1e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    scheduler = build_scheduler(optimizer, text_args, total_steps=10, group_arguments=[text_args, speech_args])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-5 / 5)  # warm-up: step 1 of 5
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-4)  # constant
    del scheduler


def test_stage1_param_groups_split_the_speech_head_from_the_text_encoder():
    from merits.training.arguments import parse_args
    from merits.training.stages import stage1_param_groups

    from _tiny import tiny_roberta_config

    model = MeritsForConversationClassification(MeritsConfig(architecture="merits-l", text_config=tiny_roberta_config(),
                                                             audio_feature_dim=10, id2label=LABELS))
    model.freeze_for_stage("utterance")
    args = parse_args([], default_config=None)
    (rest, rest_args), (speech, speech_args) = stage1_param_groups(args)(model)
    assert {id(p) for p in speech} == {id(p) for p in model.speech_encoder.parameters() if p.requires_grad}
    assert {id(p) for p in rest} == {id(p) for p in model.text_encoder.parameters()}
    assert rest_args is args.utterance and speech_args is args.speech_head
    assert stage1_param_groups(parse_args(["--separate_speech_head_optimizer", "false"], default_config=None)) is None


def test_random_audio_crop_is_random_per_epoch_reproducible_and_leaves_short_turns():
    import numpy as np

    from merits.data import RandomAudioCrop

    rng = np.random.default_rng(0)
    long = {"array": rng.standard_normal(16000 * 8).astype(np.float32), "sampling_rate": 16000, "path": None}
    short = {"array": rng.standard_normal(16000 * 2).astype(np.float32), "sampling_rate": 16000, "path": None}
    items = [[{"dialogue_id": "d", "turn": 0, "audio": long, "text": "x"}, {"dialogue_id": "d", "turn": 1, "audio": short},
              {"dialogue_id": "d", "turn": 2, "audio": None, "text": "y"}]]
    crop = RandomAudioCrop(items, 5.0, seed=1)
    first = crop[0]
    assert len(first[0]["audio"]["array"]) == 5 * 16000
    window = first[0]["audio"]["array"]
    start = int(np.flatnonzero(long["array"] == window[0])[0])
    assert np.array_equal(long["array"][start : start + 80000], window)  # a contiguous window of the original
    assert np.array_equal(first[1]["audio"]["array"], short["array"]) and first[2]["audio"] is None
    assert np.array_equal(crop[0][0]["audio"]["array"], window)  # same epoch, same window
    windows = set()
    for epoch in range(6):
        crop.set_epoch(epoch)
        windows.add(float(crop[0][0]["audio"]["array"][0]))
    assert len(windows) > 3  # a new window each epoch
    assert items[0][0]["audio"] is long  # the items themselves are untouched


# ---------------------------------------------------------------------------------------------------------------------
# merits evaluate --drop-modality: MiSTER-E's test-time modality-dropout analysis
# ---------------------------------------------------------------------------------------------------------------------


def _feature_folder(tmp_path, text_dim=12, audio_dim=10, conversations=4, turns=5):
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    rows = {"dialogue_id": [], "turn": [], "label": [], "text_embeds": [], "audio_embeds": []}
    for dialogue in range(conversations):
        for turn in range(turns - dialogue % 2):
            rows["dialogue_id"].append(f"d{dialogue}")
            rows["turn"].append(turn)
            rows["label"].append(["neutral", "happy", "sad"][int(rng.integers(3))])
            rows["text_embeds"].append(rng.standard_normal(text_dim).astype(np.float32).tolist())
            rows["audio_embeds"].append(rng.standard_normal(audio_dim).astype(np.float32).tolist())
    folder = tmp_path / "features"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return folder, rows


def _run_cli(capsys, argv):
    import json

    from merits.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _conversation_tensors(rows, model):
    dialogues = sorted(set(rows["dialogue_id"]))
    out = []
    for dialogue in dialogues:
        index = [i for i, d in enumerate(rows["dialogue_id"]) if d == dialogue]
        index.sort(key=lambda i: rows["turn"][i])
        out.append((torch.tensor([[rows["text_embeds"][i] for i in index]]),
                    torch.tensor([[rows["audio_embeds"][i] for i in index]]),
                    [model.config.label2id[rows["label"][i]] for i in index]))
    return out


def test_drop_speech_mister_e_gate_falls_to_the_text_expert(tmp_path, capsys):
    from sklearn.metrics import f1_score

    from merits import save_hub_folder

    from _tiny import tiny_merits_config

    torch.manual_seed(0)
    model = MeritsForConversationClassification(tiny_merits_config("mister-e", initializer_range=0.3)).eval()
    folder = tmp_path / "m"
    save_hub_folder(model, None, folder)
    features, rows = _feature_folder(tmp_path)
    result = _run_cli(capsys, ["evaluate", "--model", str(folder), "--dataset", "features", "--file", str(features),
                               "--quiet", "--drop-modality", "speech"])
    full_pred, text_pred, gold, gates = [], [], [], []
    with torch.no_grad():
        for text, audio, labels in _conversation_tensors(rows, model):
            out = model(text_embeds=text, audio_embeds=audio)
            full_pred += out.logits[0].argmax(-1).tolist()
            text_pred += out.expert_logits[1][0].argmax(-1).tolist()  # the text expert alone
            gates.append(out.gate_weights[0])
            gold += labels
    wf1 = lambda pred: f1_score(gold, pred, labels=[0, 1, 2], average="weighted", zero_division=0)  # noqa: E731
    assert result["num_utterances"] == len(gold) == result["num_dropped"]
    assert result["full"]["weighted_f1"] == pytest.approx(wf1(full_pred))
    assert result["dropped"]["weighted_f1"] == pytest.approx(wf1(text_pred))  # speech gone: only the text expert left
    gate = torch.cat(gates).mean(0)
    assert [result["full"]["gate_mean"][e] for e in ("speech", "text", "cross_modal")] == pytest.approx(gate.tolist(), abs=1e-6)
    assert result["dropped"]["gate_mean_on_dropped_turns"] == pytest.approx({"speech": 0.0, "text": 1.0, "cross_modal": 0.0})
    assert "weight 0" in result["fallback"]
    # the official analysis' random per-utterance dropout: about p of the turns, reproducible with the seed
    argv = ["evaluate", "--model", str(folder), "--dataset", "features", "--file", str(features), "--quiet",
            "--drop-modality", "text", "--drop-probability", "0.5", "--seed", "3"]
    half = _run_cli(capsys, argv)
    assert 0 < half["num_dropped"] < len(gold) and half == _run_cli(capsys, argv)
    zero = _run_cli(capsys, argv[:-4] + ["--drop-mode", "zero"])
    assert zero["drop_mode"] == "zero" and zero["num_dropped"] == len(gold)


def test_drop_speech_merits_l_falls_back_to_the_text_context(tmp_path, capsys):
    from sklearn.metrics import f1_score

    from merits import save_hub_folder

    from _tiny import tiny_merits_config

    torch.manual_seed(1)
    model = MeritsForConversationClassification(tiny_merits_config("merits-l", initializer_range=0.3)).eval()
    folder = tmp_path / "m"
    save_hub_folder(model, None, folder)
    features, rows = _feature_folder(tmp_path)
    result = _run_cli(capsys, ["evaluate", "--model", str(folder), "--dataset", "features", "--file", str(features),
                               "--quiet", "--drop-modality", "speech"])
    text_pred, gold = [], []
    with torch.no_grad():
        for text, audio, labels in _conversation_tensors(rows, model):
            text_pred += model(text_embeds=text, audio_embeds=audio).context_text_logits[0].argmax(-1).tolist()
            gold += labels
    assert result["dropped"]["weighted_f1"] == pytest.approx(
        f1_score(gold, text_pred, labels=[0, 1, 2], average="weighted", zero_division=0))
    assert result["fallback"].startswith("context_text_logits") and result["fallback_verified"] is True
    assert "gate_mean" not in result["full"]


def test_drop_modality_errors_are_named(tmp_path, capsys):
    from merits import save_hub_folder
    from merits.cli import main

    from _tiny import tiny_merits_config

    model = MeritsForConversationClassification(tiny_merits_config("merits-l", audio_embed_dim=None))
    folder = tmp_path / "m"
    save_hub_folder(model, None, folder)
    features, _ = _feature_folder(tmp_path)
    assert main(["evaluate", "--model", str(folder), "--dataset", "features", "--file", str(features), "--quiet",
                 "--drop-modality", "speech"]) == 2
    assert "does not use speech" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(folder), "--dataset", "features", "--file", str(features), "--quiet",
                 "--drop-modality", "text", "--drop-probability", "1.5"]) == 2
    assert "--drop-probability" in capsys.readouterr().err


def test_drop_modality_on_a_raw_corpus_embeds_once_and_scores_both_runs():
    from merits.analysis import embed_rows, gold_ids, modality_dropout
    from merits.data.demo import make_demo_corpus
    from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor
    from merits.processing_merits import MeritsProcessor

    from _tiny import tiny_merits_config, tiny_roberta_config
    from test_processing import make_tokenizer

    corpus = make_demo_corpus(num_dialogues=4, seed=0)
    rows = corpus["validation"] if "validation" in corpus else corpus["train"]
    labels = rows.features["label"].names
    extractor = MeritsAcousticFeatureExtractor()
    torch.manual_seed(2)
    model = MeritsForConversationClassification(tiny_merits_config(
        "mister-e", text_config=tiny_roberta_config(vocab_size=200), audio_feature_dim=extractor.feature_size,
        id2label=dict(enumerate(labels)))).eval()
    processor = MeritsProcessor(tokenizer=make_tokenizer(list(rows["text"])), feature_extractor=extractor)
    features = embed_rows(model, processor, rows)
    assert {"text_embeds", "audio_embeds"} <= set(features.column_names) and len(features) == len(rows)
    gold = gold_ids(features, model.config.label2id, "demo")
    result = modality_dropout(model, features, gold, "speech")
    assert result["num_utterances"] == len(rows) and result["num_dropped"] == len(rows)
    assert result["dropped"]["gate_mean_on_dropped_turns"]["speech"] == 0.0


def test_a_config_saved_before_the_key_keeps_exporting_activated_embeddings():
    config = MeritsConfig(architecture="mister-e", text_embed_dim=8, audio_embed_dim=8, id2label=LABELS)
    saved = config.to_dict()
    assert saved["utterance_embed_before_activation"] is True
    assert MeritsConfig.from_dict(saved).utterance_embed_before_activation is True  # round trip keeps it
    del saved["utterance_embed_before_activation"]  # a config.json written before issue 17
    assert MeritsConfig.from_dict(saved).utterance_embed_before_activation is False


@pytest.mark.parametrize("name", ["iemocap6_mister-e", "iemocap4_mister-e", "meld_mister-e", "mosi_mister-e",
                                  "iemocap4_merits-l", "meld_merits-l", "mosi_merits-l"])
def test_paper_configs_stage1_settings(name):
    from merits.training.arguments import parse_args

    args = parse_args(["--config", str(REPO / "configs" / f"{name}.yaml")])
    assert args.utterance.max_grad_norm is None and args.speech_head.max_grad_norm is None  # official: no clipping
    assert args.separate_speech_head_optimizer
    if name.endswith("mister-e"):
        # §4.2: text batch 8 (no accumulation), AdamW 1e-5 betas (0.9, 0.99) eps 1e-6 wd 0; speech AdamW 1e-5, 5 s crops
        u = args.utterance
        assert (u.batch_size, u.gradient_accumulation_steps, u.learning_rate, u.adam_beta2, u.adam_epsilon,
                u.weight_decay) == (8, 1, 1e-5, 0.99, 1e-6, 0.0)
        assert (args.speech_head.learning_rate, args.speech_head.optimizer) == (1e-5, "adamw")
        assert args.audio_train_crop_seconds == 5.0
    else:
        # §2.3: the CARE head, Adam 1e-4; whole utterances
        assert (args.speech_head.learning_rate, args.speech_head.optimizer, args.speech_head.weight_decay) == (1e-4, "adam", 0.0)
        assert args.audio_train_crop_seconds is None
