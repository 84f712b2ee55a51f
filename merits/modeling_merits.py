# coding=utf-8
"""MERITS-L and MiSTER-E: speech + text emotion recognition in conversations.

Shipped to the Hugging Face Hub as remote code next to `configuration_merits.py` and the files below (flat, relative
imports): they import only torch, transformers, numpy and each other. Section numbers refer to `shared/spec/papers.md`.

Building blocks, top-down order of the data flow, and the file of each:

- `utterance_encoders_merits.py`: `MeritsTextEncoder` / `MeritsSpeechEncoder`, utterance encoders (Stage I), one
  vector + logits per utterance (the Whisper encoder on each clip's own frames: `whisper_encoder_merits.py`).
- `context_merits.py`: `MeritsContextEncoder`, context over the turns of a conversation (MERITS-L Stage II Bi-GRU +
  self-attention §3.5; MiSTER-E conv 1/3/5 + Bi-GRU speech and text experts §4.3), with `MeritsTurnPlan` and the GRU
  over the real turns (`run_packed_gru`).
- `fusion_merits.py`: `MeritsCoAttentionFusion`, cross-attention then self-attention blocks between the two streams
  (MERITS-L Stage III §3.6; the MiSTER-E cross-modal expert §4.3).
- this file: `MeritsGate`, per-turn mixture weights over the MiSTER-E experts; `MeritsPreTrainedModel` and
  `MeritsForConversationClassification`.
- `losses_merits.py`: loss functions (masked focal, masked SupCon, masked symmetric KL).
- `common_merits.py`: `MeritsDropout`, the output `MeritsConversationClassifierOutput` and small helpers.

Every name these files held when they were all in this one is still importable from here.

Shapes: B conversations, T turns, N = number of real turns (`turn_mask.sum()`), C classes. Utterance-level raw inputs
are flattened over real turns in row-major order (conversation b, then turn t).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel

# Besides what this file uses, every name that it defined or imported before the split into the files below stays
# importable from here (tests, the training code and users import them from `modeling_merits`): hence the noqa.
from .whisper_encoder_merits import is_whisper_encoder, whisper_encoder_own_frames  # noqa: F401
from .configuration_merits import EXPERTS, MeritsConfig, _backbone_hidden_size, speech_backbone_layers  # noqa: F401
from .common_merits import (  # noqa: F401
    MeritsConversationClassifierOutput,
    MeritsDropout,
    _default_modality_mask,
    _mark_conversation_level,
    causal_mask,
    check_turn_mask,
    float32_region,
    init,
    masked_softmax,
    scatter_turns,
)
from .losses_merits import focal_loss, supervised_contrastive_loss, symmetric_kl_loss
from .utterance_encoders_merits import (  # noqa: F401
    _ACTIVATIONS,
    MeritsAttentiveStatisticsPooling,
    MeritsSpeechEncoder,
    MeritsTextEncoder,
    _conv_output_length,
    _feature_encoder_forward,
    _masked_time_mean,
    _self_attention_sequence_first,
    batch_friendly,
    masked_group_norm,
)
from .context_merits import (  # noqa: F401
    RECURRENCE_ROUTES,
    MeritsContextEncoder,
    MeritsGRURecurrence,
    MeritsTurnPlan,
    _baddbmm_into,
    _packed_positions,
    resolve_recurrence,
    run_packed_gru,
    run_packed_gru_cudnn,
)
from .fusion_merits import MeritsAttention, MeritsCoAttentionBlock, MeritsCoAttentionFusion  # noqa: F401


# ---------------------------------------------------------------------------------------------------------------------
# Gate (MiSTER-E)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsGate(nn.Module):
    """Per-turn weights over the experts (§4.3).

    mode "learned": g = Linear(hidden, E)(ReLU(Linear(E*C, hidden)(concat expert logits))), w = softmax(g / τ) over the
    experts available at that turn (an expert whose modality is absent gets weight exactly 0). "mean": equal weights
    over the available experts. "vote": majority vote of the available experts' argmax (ties go to cross-modal, then
    text, then speech); the weights are spread equally over the experts that voted for the winning class, so the
    mixture's argmax is the voted class.
    """

    def __init__(self, config: MeritsConfig, num_experts: int):
        super().__init__()
        self.mode = config.gate_mode
        self.temperature = config.gate_temperature
        self.num_experts = num_experts
        self.dense = nn.Linear(num_experts * config.num_labels, config.gate_hidden_size)
        self.output = nn.Linear(config.gate_hidden_size, num_experts)
        _mark_conversation_level(self)

    def forward(self, expert_logits, available, tie_order=None):
        """expert_logits [..., E, C], available [..., E] bool -> weights [..., E]."""
        available = available.bool()
        if self.mode == "learned":
            # the gate and its softmax in (at least) float32 under mixed precision or with bf16 weights
            dtype = torch.promote_types(self.dense.weight.dtype, torch.float32)
            with float32_region(expert_logits):
                hidden = F.linear(expert_logits.to(dtype).flatten(-2), self.dense.weight.to(dtype), self.dense.bias.to(dtype))
                g = F.linear(torch.relu(hidden), self.output.weight.to(dtype), self.output.bias.to(dtype))
                return masked_softmax(g / self.temperature, available)
        if self.mode == "mean":
            weights = available.to(expert_logits.dtype)
            return weights / weights.sum(-1, keepdim=True).clamp(min=1.0)
        # majority vote
        num_labels = expert_logits.shape[-1]
        votes = F.one_hot(expert_logits.argmax(-1), num_labels) * available.unsqueeze(-1)  # [..., E, C]
        counts = votes.sum(-2)  # [..., C]
        best = counts.max(-1, keepdim=True).values
        tied = (counts == best) & (best > 0)  # classes with the most votes
        # tie-break: the class of the highest-priority available expert among the tied classes
        priority = torch.tensor(tie_order if tie_order is not None else list(range(self.num_experts)),
                                device=expert_logits.device, dtype=torch.long)
        expert_class = expert_logits.argmax(-1)  # [..., E]
        candidate = available & tied.gather(-1, expert_class)  # experts voting for a tied class
        score = torch.where(candidate, priority.expand_as(expert_class), torch.full_like(expert_class, -1))
        chosen_expert = score.argmax(-1, keepdim=True)
        winner = expert_class.gather(-1, chosen_expert)  # [..., 1]
        voters = available & (expert_class == winner)
        weights = voters.to(expert_logits.dtype)
        return weights / weights.sum(-1, keepdim=True).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ---------------------------------------------------------------------------------------------------------------------


def _pytorch_default_init(module: nn.Module) -> None:
    """`module.reset_parameters()` of nn.Linear / nn.Conv1d / nn.GRU, written with the loaded-weight-safe `init`."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, nn.GRU):
        bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0.0
        for param in module.parameters():
            init.uniform_(param, -bound, bound)


class MeritsPreTrainedModel(PreTrainedModel):
    config_class = MeritsConfig
    base_model_prefix = "merits"
    main_input_name = "turn_mask"
    supports_gradient_checkpointing = True  # applies to the transformers backbones
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Linear/Conv: normal(0, initializer_range), zero bias; LayerNorm: ones/zeros (base class); GRU: Xavier weights
        and zero biases; learned layer weights: zeros (= uniform softmax). Backbones use their own init.

        With `conversation_init="pytorch"` (the default) the context encoders, the co-attention fusion and the gate are
        then re-initialised as PyTorch initialises them, as in the authors' code: weights U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) for Linear / Conv1d (kaiming-uniform, a=sqrt(5)) and the same bound for their biases,
        U(-1/sqrt(H), 1/sqrt(H)) for every GRU parameter. (Those modules mark their layers `_conversation_level`: the
        init visits layers, not the containers, which own no parameter; the `init` functions skip loaded weights.)"""
        super()._init_weights(module)
        if isinstance(module, nn.GRU):
            for name, param in module.named_parameters():
                if "weight" in name:
                    init.xavier_uniform_(param)
                else:
                    init.zeros_(param)
        elif isinstance(module, MeritsSpeechEncoder) and module.num_layers is not None:
            if module.layer_weights is not None:
                init.zeros_(module.layer_weights)
            if module.layer_mean is not None:
                init.zeros_(module.layer_mean)
                init.ones_(module.layer_std)
        if getattr(module, "_conversation_level", False) and getattr(self.config, "conversation_init", "pytorch") == "pytorch":
            _pytorch_default_init(module)
            projection = getattr(module, "_mha_projection", None)
            if projection == "in":  # nn.MultiheadAttention: Xavier-uniform over the stacked [3E, E] in_proj, zero bias
                width = module.weight.shape[1]
                bound = math.sqrt(6.0 / (width + 3 * width))
                init.uniform_(module.weight, -bound, bound)
                init.zeros_(module.bias)
            elif projection == "out":  # out_proj: nn.Linear's own weight init, zero bias
                init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------------------
# The task model
# ---------------------------------------------------------------------------------------------------------------------


class MeritsForConversationClassification(MeritsPreTrainedModel):
    """MERITS-L (`architecture="merits-l"`) or MiSTER-E (`"mister-e"`) emotion recognition in conversations.

    Inputs (docs/design.md §2): flattened utterance tensors over the N real turns (`input_ids`/`attention_mask`,
    `input_values`/`audio_attention_mask` or `input_features`, `audio_features`) or precomputed utterance embeddings
    `text_embeds`/`audio_embeds` [B, T, D]; `turn_mask`, `text_mask`, `audio_mask` [B, T]; `labels` [B, T] (-100 =
    ignore). `forward(..., stage=...)` computes only what the stage needs.
    """

    def __init__(self, config: MeritsConfig):
        super().__init__(config)
        self.text_encoder = MeritsTextEncoder(config) if config.text_config is not None else None
        has_speech_encoder = config.audio_config is not None or config.audio_feature_dim is not None
        self.speech_encoder = MeritsSpeechEncoder(config) if has_speech_encoder else None
        self.text_context = self.audio_context = self.fusion = self.gate = None

        if config.architecture == "merits-l":
            if config.has_text:
                self.text_context = MeritsContextEncoder(
                    config, config.text_embed_dim, config.context_text_hidden_size, "bigru_attention"
                )
            if config.has_audio:
                self.audio_context = MeritsContextEncoder(
                    config, config.audio_embed_dim, config.context_audio_hidden_size, "bigru_attention"
                )
            if config.has_text and config.has_audio:
                self.fusion = MeritsCoAttentionFusion(
                    config, self.text_context.output_size, self.audio_context.output_size
                )
        else:
            if "speech" in config.experts:
                self.audio_context = MeritsContextEncoder(
                    config, config.audio_embed_dim, config.context_audio_hidden_size, "conv_bigru"
                )
            if "text" in config.experts:
                self.text_context = MeritsContextEncoder(
                    config, config.text_embed_dim, config.context_text_hidden_size, "conv_bigru"
                )
            if "cross_modal" in config.experts:
                self.fusion = MeritsCoAttentionFusion(config, config.text_embed_dim, config.audio_embed_dim)
            self.gate = MeritsGate(config, len(config.experts))

        self.post_init()
        if self.speech_encoder is not None and self.speech_encoder.backbone is not None:
            self.speech_encoder.backbone.requires_grad_(False)

    # ---- loading real backbones -------------------------------------------------------------------------------
    @classmethod
    def from_backbones(cls, text_model_name_or_path=None, audio_model_name_or_path=None, backbone_kwargs=None,
                       **config_kwargs):
        """Build a model around pretrained backbones loaded with `AutoModel.from_pretrained` (e.g. roberta-large,
        Qwen/Qwen2.5-7B, microsoft/wavlm-base-plus, openai/whisper-large-v3: its encoder only). The config is built
        from the backbones' configs plus `config_kwargs`; every other part is freshly initialised."""
        if text_model_name_or_path is None and audio_model_name_or_path is None:
            raise ValueError("from_backbones needs `text_model_name_or_path` and/or `audio_model_name_or_path`.")
        backbone_kwargs = dict(backbone_kwargs or {})
        text_model = audio_model = None
        if text_model_name_or_path is not None:
            text_model = AutoModel.from_pretrained(text_model_name_or_path, **backbone_kwargs)
            config_kwargs["text_config"] = text_model.config
        if audio_model_name_or_path is not None:
            audio_model = AutoModel.from_pretrained(audio_model_name_or_path, **backbone_kwargs)
            config_kwargs["audio_config"] = audio_model.config
            if getattr(audio_model.config, "is_encoder_decoder", False):
                audio_model = audio_model.get_encoder()
        model = cls(MeritsConfig(**config_kwargs))
        if text_model is not None:
            state_dict = {k: v for k, v in text_model.state_dict().items() if not k.startswith("pooler.")}
            model.text_encoder.backbone.load_state_dict(state_dict, strict=True)
        if audio_model is not None:
            model.speech_encoder.backbone.load_state_dict(audio_model.state_dict(), strict=True)
            model.speech_encoder.backbone.requires_grad_(False)
        return model

    def get_input_embeddings(self):
        """The text backbone's token embeddings; None when there is no text backbone (precomputed text embeddings,
        or no text). Accelerate's FSDP2 asks for them (they become their own shard unit); transformers' own lookup
        does not reach into `text_encoder.backbone` and raises instead."""
        backbone = self.text_encoder.backbone if self.text_encoder is not None else None
        return backbone.get_input_embeddings() if backbone is not None else None

    # ---- stages -----------------------------------------------------------------------------------------------
    def _stage_modules(self, stage):
        if stage == "utterance":
            modules = [self.text_encoder]
            if self.speech_encoder is not None:
                modules += [self.speech_encoder.head, self.speech_encoder.classifier]
                if self.speech_encoder.layer_weights is not None:
                    modules.append(self.speech_encoder.layer_weights)
        elif stage == "context":
            modules = [self.text_context, self.audio_context]
        elif stage == "fusion":
            modules = [self.fusion]
        elif stage == "context+fusion":
            modules = [self.text_context, self.audio_context, self.fusion]
        else:  # moe
            modules = [self.text_context, self.audio_context, self.fusion, self.gate]
        return [m for m in modules if m is not None]

    def freeze_for_stage(self, stage):
        """Make exactly the parameters of `stage` trainable (docs/design.md §3 table) and set `config.stage`.
        The speech backbone always stays frozen. Returns the names of the trainable parameters."""
        stage = self.config.check_stage(stage)
        self.requires_grad_(False)
        for module in self._stage_modules(stage):
            module.requires_grad_(True)
        if self.speech_encoder is not None and self.speech_encoder.backbone is not None:
            self.speech_encoder.backbone.requires_grad_(False)
        self.config.stage = stage
        return [name for name, p in self.named_parameters() if p.requires_grad]

    # ---- utterance level ----------------------------------------------------------------------------------------
    @staticmethod
    def _run(module, *args, **kwargs):
        """Run a module, with autograd only when some of its parameters are trainable."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        with torch.set_grad_enabled(grad):
            return module(*args, **kwargs)

    def _encode_text(self, input_ids, attention_mask):
        if input_ids is None:
            return None, None
        if self.text_encoder is None:
            raise ValueError("Got `input_ids` but this model has no text encoder (config.text_config is None).")
        return self._run(self.text_encoder, input_ids, attention_mask)

    def _encode_audio(self, input_values, input_features, audio_attention_mask, audio_features):
        if input_values is None and input_features is None and audio_features is None:
            return None, None
        if self.speech_encoder is None:
            raise ValueError(
                "Got raw speech inputs but this model has no speech encoder (config.audio_config and "
                "config.audio_feature_dim are None)."
            )
        return self._run(
            self.speech_encoder,
            input_values=input_values,
            input_features=input_features,
            audio_attention_mask=audio_attention_mask,
            audio_features=audio_features,
        )

    def _flatten_audio_features(self, audio_features, turn_mask, index=None):
        """`audio_features` may come as [B, T, ...] (design §2) or flattened [N, ...]; return [N, ...]. `index`: as
        in `scatter_turns`."""
        if audio_features is None:
            return None
        per_row = 1 if self.config.audio_feature_layers is None else 2
        if audio_features.dim() == per_row + 2:
            if tuple(audio_features.shape[:2]) != tuple(turn_mask.shape):
                raise ValueError(
                    f"`audio_features` of shape {tuple(audio_features.shape)} does not match `turn_mask` "
                    f"{tuple(turn_mask.shape)} in its first two dims."
                )
            return audio_features[turn_mask if index is None else index]
        if audio_features.dim() != per_row + 1:
            raise ValueError(
                f"`audio_features` must be [B, T, {'K, ' if per_row == 2 else ''}F] or [N, {'K, ' if per_row == 2 else ''}F], "
                f"got shape {tuple(audio_features.shape)}."
            )
        return audio_features

    def get_utterance_embeddings(self, input_ids=None, attention_mask=None, input_values=None, input_features=None,
                                 audio_attention_mask=None, audio_features=None, turn_mask=None, text_mask=None,
                                 audio_mask=None, **unused):
        """Stage I utterance embeddings of every real turn, for the embedding cache: dict(text=[N, D_text] or None,
        audio=[N, D_audio] or None). Rows of turns that lack the modality (per `text_mask`/`audio_mask`) are zero."""
        if turn_mask is not None:
            turn_mask = check_turn_mask(turn_mask)
            audio_features = self._flatten_audio_features(audio_features, turn_mask)
        text, _ = self._encode_text(input_ids, attention_mask)
        audio, _ = self._encode_audio(input_values, input_features, audio_attention_mask, audio_features)
        if turn_mask is not None:
            for name, value, mask in (("text", text, text_mask), ("audio", audio, audio_mask)):
                if value is None:
                    continue
                if value.shape[0] != int(turn_mask.sum()):
                    raise ValueError(f"Got {value.shape[0]} {name} utterances for {int(turn_mask.sum())} real turns.")
                if mask is not None:
                    keep = mask.bool()[turn_mask].unsqueeze(-1).to(value.dtype)
                    if name == "text":
                        text = text * keep
                    else:
                        audio = audio * keep
        return {"text": text, "audio": audio}

    @torch.no_grad()
    def get_context_features(self, text_embeds=None, audio_embeds=None, turn_mask=None, text_mask=None, audio_mask=None,
                             **unused):
        """MERITS-L stage II features c_i of each modality (§3.1: exported, then fused in stage III), computed in eval
        mode: dict(text_context_features=[B, T, 2H_text] or None, audio_context_features=[B, T, 2H_audio] or None).
        Passing them back to `forward(..., stage="fusion")` gives the same output as recomputing them from the
        embeddings, without running the frozen context encoders at every training step."""
        if self.config.architecture != "merits-l":
            raise ValueError("get_context_features exports MERITS-L stage II features; MiSTER-E trains its context "
                             "experts jointly with the rest of the MoE.")
        was_training = self.training
        self.eval()
        try:
            out = self(text_embeds=text_embeds, audio_embeds=audio_embeds, turn_mask=turn_mask, text_mask=text_mask,
                       audio_mask=audio_mask, stage="context")
        finally:
            self.train(was_training)
        return {"text_context_features": out.text_context_features, "audio_context_features": out.audio_context_features}

    # ---- helpers for forward ------------------------------------------------------------------------------------
    def _classification_loss(self, logits, labels, mask, stage):
        if self.config.classification_loss == "ce":
            gamma = 0.0
        else:
            gamma = self.config.utterance_focal_gamma if stage == "utterance" else self.config.focal_gamma
        return focal_loss(logits, labels, gamma=gamma, mask=mask)

    @staticmethod
    def _combine(text_logits, audio_logits, text_mask, audio_mask):
        """Per turn: the mean of both modalities' logits where both are present, else the present one."""
        if text_logits is None:
            return audio_logits
        if audio_logits is None:
            return text_logits
        t, a = text_mask.unsqueeze(-1).to(text_logits.dtype), audio_mask.unsqueeze(-1).to(audio_logits.dtype)
        return (t * text_logits + a * audio_logits) / (t + a).clamp(min=1.0)

    def _prepare_masks(self, turn_mask, text_mask, audio_mask, text_embeds, audio_embeds, text_given=True,
                       audio_given=True):
        """Check `turn_mask` and build the boolean modality masks.

        A modality mask defaults to `turn_mask` when that modality has inputs (`*_given`), and to all zeros when it
        has none at all (a batch in which no turn has audio or text: the modality is absent everywhere, docs/design.md
        §2). A mask that marks a turn as having a modality for which no input was given raises, naming the turn.

        Returns (turn_mask, text_mask, audio_mask, host_turn_mask). Where the turn plan keeps its bookkeeping on the
        host (`MeritsTurnPlan.on_host`: any non-CPU device), the three masks are read back ONCE, the checks run on that
        host copy and `host_turn_mask` hands it to the plan (no further host-device sync in this forward); else
        `host_turn_mask` is None and the checks read the masks where they are.
        """
        if turn_mask is None:
            reference = text_embeds if text_embeds is not None else audio_embeds
            if reference is None:
                raise ValueError("`turn_mask` [B, T] is required with flattened utterance inputs.")
            turn_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        if turn_mask.dim() != 2:
            raise ValueError(f"`turn_mask` must be [B, T], got shape {tuple(turn_mask.shape)}.")
        turn_mask = turn_mask.bool()
        masks, without_input = {}, {}
        for name, mask, has, given, inputs in (
            ("text", text_mask, self.config.has_text, text_given, "`input_ids` or `text_embeds`"),
            ("audio", audio_mask, self.config.has_audio, audio_given,
             "`input_values`, `input_features`, `audio_features` or `audio_embeds`"),
        ):
            if not has or (not given and mask is None):
                masks[name] = torch.zeros_like(turn_mask)
                continue
            masks[name] = _default_modality_mask(mask, turn_mask, f"{name}_mask")
            if not given:
                without_input[name] = inputs
        text_mask, audio_mask = masks["text"], masks["audio"]
        host_turn_mask = None
        if MeritsTurnPlan.on_host(turn_mask.device):
            host = torch.stack([turn_mask, text_mask, audio_mask]).cpu()  # the one host read of the masks
            host_turn_mask, host_text_mask, host_audio_mask = host.unbind(0)
            for tensor in (host_turn_mask, host_text_mask, host_audio_mask):
                tensor._merits_host_copy = True  # (a copy of ours: MeritsTurnPlan computes on it in place)
            self._check_masks(host_turn_mask, host_text_mask, host_audio_mask, without_input)
        else:
            self._check_masks(turn_mask, text_mask, audio_mask, without_input)
        return turn_mask, text_mask, audio_mask, host_turn_mask

    def _check_masks(self, turn_mask, text_mask, audio_mask, without_input):
        """The content checks of `_prepare_masks` (on the host copy where there is one): real turns first, no turn
        marked with a modality that has no input (`without_input`: name -> the inputs to pass), no real turn
        with neither modality."""
        check_turn_mask(turn_mask)
        for name, mask in (("text", text_mask), ("audio", audio_mask)):
            if name in without_input and mask.any():
                b, t = mask.nonzero()[0].tolist()
                raise ValueError(
                    f"`{name}_mask` says conversation {b}, turn {t} has {name}, but no {name} input was given: pass "
                    f"{without_input[name]}, or a `{name}_mask` of zeros for a batch without {name}."
                )
        empty = turn_mask & ~text_mask & ~audio_mask
        if empty.any():
            b, t = empty.nonzero()[0].tolist()
            raise ValueError(
                f"Conversation {b}, turn {t} is a real turn with neither text nor audio that this model uses "
                f"(configured modalities: {'text ' if self.config.has_text else ''}{'audio' if self.config.has_audio else ''})."
            )

    def _absent_embeds(self, turn_mask, size, like=None):
        """Zero utterance embeddings [B, T, size] for a modality absent from the whole batch."""
        dtype = like.dtype if like is not None else next(self.parameters()).dtype
        return torch.zeros(*turn_mask.shape, size, device=turn_mask.device, dtype=dtype)

    def _check_embeds(self, embeds, expected_dim, turn_mask, name):
        if embeds.dim() != 3 or tuple(embeds.shape[:2]) != tuple(turn_mask.shape):
            raise ValueError(f"`{name}` must be [B, T, D] matching turn_mask {tuple(turn_mask.shape)}, got {tuple(embeds.shape)}.")
        if embeds.shape[-1] != expected_dim:
            raise ValueError(
                f"`{name}` has size {embeds.shape[-1]} but the config expects {expected_dim} "
                f"({'text' if name.startswith('text') else 'audio'}_embed_dim)."
            )

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        input_values=None,
        input_features=None,
        audio_attention_mask=None,
        audio_features=None,
        text_embeds=None,
        audio_embeds=None,
        turn_mask=None,
        text_mask=None,
        audio_mask=None,
        labels=None,
        stage=None,
        return_dict=True,
        text_context_features=None,
        audio_context_features=None,
        **unused,
    ):
        config = self.config
        stage = config.check_stage(stage if stage is not None else config.stage)
        context_features = {"text": text_context_features, "audio": audio_context_features}
        if any(v is not None for v in context_features.values()) and (
            config.architecture != "merits-l" or stage != "fusion"
        ):
            raise ValueError(
                "`text_context_features` / `audio_context_features` (exported stage II features) feed the merits-l "
                f"fusion stage only, with frozen context encoders; got architecture {config.architecture!r}, stage {stage!r}."
            )
        text_given = input_ids is not None or text_embeds is not None
        audio_given = any(x is not None for x in (input_values, input_features, audio_features, audio_embeds))
        turn_mask, text_mask, audio_mask, host_turn_mask = self._prepare_masks(
            turn_mask, text_mask, audio_mask, text_embeds, audio_embeds, text_given, audio_given
        )
        if labels is not None and tuple(labels.shape) != tuple(turn_mask.shape):
            raise ValueError(f"`labels` must be [B, T] = {tuple(turn_mask.shape)}, got {tuple(labels.shape)}.")
        out = {}
        terms = {}

        # ---- Stage I: utterance encoders (or precomputed embeddings) ----------------------------------------------
        utt_text_logits = utt_audio_logits = None
        real_turns = None  # the real turns' (conversation, turn) indices, from the masks' host copy where there is one
        if host_turn_mask is not None and (input_ids is not None or input_values is not None or
                                           input_features is not None or audio_features is not None):
            real_turns = tuple(i.to(turn_mask.device, non_blocking=True) for i in host_turn_mask.nonzero(as_tuple=True))
        if input_ids is not None and config.has_text:
            flat_embeds, flat_logits = self._encode_text(input_ids, attention_mask)
            text_embeds = scatter_turns(flat_embeds, turn_mask, real_turns)
            utt_text_logits = scatter_turns(flat_logits, turn_mask, real_turns)
        flat_audio_features = self._flatten_audio_features(audio_features, turn_mask, real_turns)
        if (input_values is not None or input_features is not None or flat_audio_features is not None) and config.has_audio:
            flat_embeds, flat_logits = self._encode_audio(
                input_values, input_features, audio_attention_mask, flat_audio_features
            )
            audio_embeds = scatter_turns(flat_embeds, turn_mask, real_turns)
            utt_audio_logits = scatter_turns(flat_logits, turn_mask, real_turns)
        if text_embeds is not None:
            self._check_embeds(text_embeds, config.text_embed_dim or -1, turn_mask, "text_embeds")
            text_embeds = text_embeds * text_mask.unsqueeze(-1).to(text_embeds.dtype)
        if audio_embeds is not None:
            self._check_embeds(audio_embeds, config.audio_embed_dim or -1, turn_mask, "audio_embeds")
            audio_embeds = audio_embeds * audio_mask.unsqueeze(-1).to(audio_embeds.dtype)
        out.update(text_embeds=text_embeds, audio_embeds=audio_embeds,
                   utterance_text_logits=utt_text_logits, utterance_audio_logits=utt_audio_logits)

        if stage == "utterance":
            if utt_text_logits is None and utt_audio_logits is None:
                raise ValueError("Stage 'utterance' needs raw inputs (input_ids and/or audio), not precomputed embeddings.")
            logits = self._combine(utt_text_logits, utt_audio_logits, text_mask, audio_mask)
            if labels is not None:
                if utt_text_logits is not None:
                    terms["utterance_text"] = self._classification_loss(utt_text_logits, labels, text_mask, stage)
                if utt_audio_logits is not None:
                    terms["utterance_audio"] = self._classification_loss(utt_audio_logits, labels, audio_mask, stage)
            return self._finish(out, logits, labels, terms, sum(terms.values()) if terms else None, return_dict)

        # A modality with no input at all in this batch is absent at every turn (its mask is all zeros): its branch
        # runs on zeros and is masked out everywhere (no attention to it, gate weight 0, merits-l falls back).
        if config.has_text and text_embeds is None:
            text_embeds = self._absent_embeds(turn_mask, config.text_embed_dim, audio_embeds)
        if config.has_audio and audio_embeds is None:
            audio_embeds = self._absent_embeds(turn_mask, config.audio_embed_dim, text_embeds)

        if config.architecture == "merits-l":
            logits, loss = self._forward_merits_l(stage, text_embeds, audio_embeds, turn_mask, text_mask, audio_mask,
                                                  labels, out, terms, context_features, host_turn_mask)
        else:
            logits, loss = self._forward_mister_e(text_embeds, audio_embeds, turn_mask, text_mask, audio_mask, labels,
                                                  out, terms, host_turn_mask)
        return self._finish(out, logits, labels, terms, loss, return_dict)

    def _turn_plan(self, turn_mask, host_turn_mask=None):
        """The `MeritsTurnPlan` shared by every module of one forward (packing, real rows, convolution layout);
        `host_turn_mask`: `_prepare_masks`' host copy of the mask, where it made one."""
        gap = max([m.conv_gap for m in (self.text_context, self.audio_context) if m is not None] or [0])
        return MeritsTurnPlan(turn_mask, gap=gap, host_mask=host_turn_mask)

    def _forward_merits_l(self, stage, text_embeds, audio_embeds, turn_mask, text_mask, audio_mask, labels, out, terms,
                          context_features=None, host_turn_mask=None):
        ctx_text = ctx_audio = None
        text_features = audio_features = None
        context_features = context_features or {}
        plan = self._turn_plan(turn_mask, host_turn_mask)
        if self.text_context is not None:
            text_features, ctx_text = self._run(self.text_context, text_embeds, turn_mask, text_mask, plan=plan,
                                                exported=context_features.get("text"))
        if self.audio_context is not None:
            audio_features, ctx_audio = self._run(self.audio_context, audio_embeds, turn_mask, audio_mask, plan=plan,
                                                  exported=context_features.get("audio"))
        out.update(context_text_logits=ctx_text, context_audio_logits=ctx_audio,
                   text_context_features=text_features, audio_context_features=audio_features)
        context_logits = self._combine(ctx_text, ctx_audio, text_mask, audio_mask)
        if stage == "context":
            if labels is not None:
                if ctx_text is not None:
                    terms["context_text"] = self._classification_loss(ctx_text, labels, text_mask, stage)
                if ctx_audio is not None:
                    terms["context_audio"] = self._classification_loss(ctx_audio, labels, audio_mask, stage)
            return context_logits, (sum(terms.values()) if terms else None)

        fusion_logits, _, _ = self._run(
            self.fusion, text_features, audio_features, turn_mask, text_mask, audio_mask, plan=plan
        )
        out["fusion_logits"] = fusion_logits
        both = text_mask & audio_mask
        # a turn lacking one modality falls back to the other modality's context logits
        logits = torch.where(both.unsqueeze(-1), fusion_logits, context_logits)
        if labels is not None:
            if stage == "context+fusion" and not self.config.joint_context_losses:
                # the paper merges stages II and III into one end-to-end stage: the loss of its final output (fusion
                # where a turn has both modalities, the context fallback where it has one)
                terms["joint"] = self._classification_loss(logits, labels, turn_mask, stage)
                return logits, terms["joint"]
            terms["fusion"] = self._classification_loss(fusion_logits, labels, both, stage)
            if stage == "context+fusion":
                terms["context_text"] = self._classification_loss(ctx_text, labels, text_mask, stage)
                terms["context_audio"] = self._classification_loss(ctx_audio, labels, audio_mask, stage)
        return logits, (sum(terms.values()) if terms else None)

    def _expert_outputs(self, text_embeds, audio_embeds, turn_mask, text_mask, audio_mask, plan):
        """Logits and availability of the enabled experts, in the canonical (speech, text, cross_modal) order."""
        experts = {}
        if self.audio_context is not None:
            experts["speech"] = (
                self._run(self.audio_context, audio_embeds, turn_mask, audio_mask, plan=plan)[1], audio_mask
            )
        if self.text_context is not None:
            experts["text"] = (self._run(self.text_context, text_embeds, turn_mask, text_mask, plan=plan)[1], text_mask)
        reprs = None
        if self.fusion is not None:
            fusion_logits, text_repr, audio_repr = self._run(
                self.fusion, text_embeds, audio_embeds, turn_mask, text_mask, audio_mask, plan=plan
            )
            experts["cross_modal"] = (fusion_logits, text_mask & audio_mask)
            reprs = (text_repr, audio_repr)
        return experts, reprs

    def _mix(self, experts, turn_mask):
        names = [name for name in EXPERTS if name in experts]
        stacked = torch.stack([experts[name][0] for name in names], dim=-2)  # [B, T, E, C]
        available = torch.stack([experts[name][1] for name in names], dim=-1) & turn_mask.unsqueeze(-1)
        tie_order = [{"speech": 0, "text": 1, "cross_modal": 2}[name] for name in names]
        weights = self._run(self.gate, stacked, available, tie_order) if self.gate is not None else None
        mixture = (weights.unsqueeze(-1) * stacked).sum(-2)
        full_weights = weights.new_zeros(*weights.shape[:-1], len(EXPERTS))  # float32 under mixed precision
        for index, name in enumerate(names):
            full_weights[..., EXPERTS.index(name)] = weights[..., index]
        return mixture, full_weights, stacked, available

    def _forward_mister_e(self, text_embeds, audio_embeds, turn_mask, text_mask, audio_mask, labels, out, terms,
                          host_turn_mask=None):
        plan = self._turn_plan(turn_mask, host_turn_mask)
        experts, reprs = self._expert_outputs(text_embeds, audio_embeds, turn_mask, text_mask, audio_mask, plan)
        mixture, gate_weights, stacked, available = self._mix(experts, turn_mask)
        out.update(
            context_audio_logits=experts.get("speech", (None,))[0],
            context_text_logits=experts.get("text", (None,))[0],
            fusion_logits=experts.get("cross_modal", (None,))[0],
            expert_logits=tuple(experts[name][0] if name in experts else None for name in EXPERTS),
            gate_weights=gate_weights,
        )
        loss = None
        if labels is not None:
            terms["mixture"] = self._classification_loss(mixture, labels, turn_mask, "moe")
            for name, (expert_logits, expert_mask) in experts.items():
                terms[f"expert_{name}"] = self._classification_loss(expert_logits, labels, expert_mask, "moe")
            loss = sum(terms.values())
            if reprs is not None:
                # over the N real turns only (the plan's rows), not the B x T padded grid
                terms["supcon"] = supervised_contrastive_loss(
                    plan.gather(reprs[0]), plan.gather(reprs[1]), plan.gather(labels), plan.gather(text_mask & audio_mask),
                    self.config.supcon_temperature,
                )
                loss = loss + self.config.supcon_weight * terms["supcon"]
            if len(experts) > 1:
                terms["kl"] = symmetric_kl_loss(stacked, available, self.config.kl_reduction)
                loss = loss + self.config.kl_weight * terms["kl"]
        return mixture, loss

    def _finish(self, out, logits, labels, terms, loss, return_dict):
        output = MeritsConversationClassifierOutput(
            loss=loss,
            logits=logits,
            loss_terms={k: v.detach() for k, v in terms.items()} if terms else None,
            **out,
        )
        return output if return_dict else output.to_tuple()

    # ---- streaming ----------------------------------------------------------------------------------------------
    def _stream_stage(self):
        stage = self.config.stage
        if stage == "utterance":
            stage = "moe" if self.config.architecture == "mister-e" else (
                "fusion" if self.fusion is not None else "context")
        return stage

    def init_stream_state(self, batch_size=1):
        """Empty streaming state for `batch_size` parallel conversations (needs `config.causal=True`)."""
        if not self.config.causal:
            raise ValueError("Streaming needs a causal model: build it with MeritsConfig(causal=True, ...).")
        param = next(self.parameters())
        device, dtype = param.device, param.dtype
        state = {"turn": 0, "batch_size": batch_size}
        for name in ("text_context", "audio_context", "fusion"):
            module = getattr(self, name)
            state[name] = module.init_state(batch_size, device, dtype) if module is not None else None
        return state

    def stream_step(self, state, text_embeds=None, audio_embeds=None, input_ids=None, attention_mask=None,
                    input_values=None, input_features=None, audio_attention_mask=None, audio_features=None,
                    text_mask=None, audio_mask=None):
        """Process ONE new turn of each of the B conversations in `state`.

        Inputs for that turn: `text_embeds` [B, D_text] / `audio_embeds` [B, D_audio], or raw tensors for one turn
        ([B, L] `input_ids`, [B, S] `input_values`, [B, F] / [B, K, F] `audio_features`...); `text_mask`/`audio_mask`
        [B] say whether the turn has that modality (default: it has every modality given).
        Returns (logits [B, C], gate_weights [B, 3] (mister-e) or None, new_state). Reuses the GRU hidden states,
        convolution windows and attention keys/values of earlier turns; equals the full causal forward.
        """
        config = self.config
        batch_size = state["batch_size"]
        if input_ids is not None:
            text_embeds, _ = self._encode_text(input_ids, attention_mask)
        if input_values is not None or input_features is not None or audio_features is not None:
            audio_embeds, _ = self._encode_audio(input_values, input_features, audio_attention_mask, audio_features)
        device, dtype = next(self.parameters()).device, next(self.parameters()).dtype

        def presence(mask, embeds, has, name):
            if not has:
                return torch.zeros(batch_size, dtype=torch.bool, device=device)
            if mask is None:
                return torch.full((batch_size,), embeds is not None, dtype=torch.bool, device=device)
            mask = mask.bool().to(device).reshape(-1)
            if mask.shape[0] != batch_size:
                raise ValueError(f"Turn {state['turn']}: `{name}_mask` must be [{batch_size}], got {mask.shape[0]} values.")
            if embeds is None and mask.any():
                b = int(mask.nonzero()[0])
                raise ValueError(
                    f"Turn {state['turn']}: `{name}_mask` says conversation {b} has {name}, but no {name} input was given."
                )
            return mask

        text_present = presence(text_mask, text_embeds, config.has_text, "text")
        audio_present = presence(audio_mask, audio_embeds, config.has_audio, "audio")
        if not (text_present | audio_present).all():
            raise ValueError(f"Turn {state['turn']}: some conversation has neither text nor audio for this model.")
        if config.has_text and text_embeds is None:
            text_embeds = torch.zeros(batch_size, config.text_embed_dim, device=device, dtype=dtype)
        if config.has_audio and audio_embeds is None:
            audio_embeds = torch.zeros(batch_size, config.audio_embed_dim, device=device, dtype=dtype)
        if text_embeds is not None:
            text_embeds = text_embeds * text_present.unsqueeze(-1).to(text_embeds.dtype)
        if audio_embeds is not None:
            audio_embeds = audio_embeds * audio_present.unsqueeze(-1).to(audio_embeds.dtype)

        new_state = {"turn": state["turn"] + 1, "batch_size": batch_size, "text_context": None,
                     "audio_context": None, "fusion": None}
        stage = self._stream_stage()
        outputs = {}
        text_features = audio_features = None
        if self.text_context is not None:
            text_features, outputs["text"], new_state["text_context"] = self.text_context.step(
                text_embeds, text_present, state["text_context"])
        if self.audio_context is not None:
            audio_features, outputs["speech"], new_state["audio_context"] = self.audio_context.step(
                audio_embeds, audio_present, state["audio_context"])

        if config.architecture == "merits-l":
            context_logits = self._combine(outputs.get("text"), outputs.get("speech"), text_present, audio_present)
            if stage == "context" or self.fusion is None:
                return context_logits, None, new_state
            fusion_logits, new_state["fusion"] = self.fusion.step(
                text_features, audio_features, text_present, audio_present, state["fusion"])
            both = (text_present & audio_present).unsqueeze(-1)
            return torch.where(both, fusion_logits, context_logits), None, new_state

        experts = {}
        if "speech" in outputs:
            experts["speech"] = (outputs["speech"], audio_present)
        if "text" in outputs:
            experts["text"] = (outputs["text"], text_present)
        if self.fusion is not None:
            fusion_logits, new_state["fusion"] = self.fusion.step(
                text_embeds, audio_embeds, text_present, audio_present, state["fusion"])
            experts["cross_modal"] = (fusion_logits, text_present & audio_present)
        mixture, gate_weights, _, _ = self._mix(experts, torch.ones(batch_size, dtype=torch.bool, device=device))
        return mixture, gate_weights, new_state


__all__ = [
    "MeritsConversationClassifierOutput",
    "MeritsAttentiveStatisticsPooling",
    "MeritsTextEncoder",
    "MeritsSpeechEncoder",
    "MeritsContextEncoder",
    "MeritsAttention",
    "MeritsCoAttentionBlock",
    "MeritsCoAttentionFusion",
    "MeritsGate",
    "MeritsTurnPlan",
    "MeritsGRURecurrence",
    "run_packed_gru",
    "run_packed_gru_cudnn",
    "resolve_recurrence",
    "MeritsPreTrainedModel",
    "MeritsForConversationClassification",
    "focal_loss",
    "supervised_contrastive_loss",
    "symmetric_kl_loss",
]
