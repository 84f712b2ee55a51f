# coding=utf-8
"""MERITS-L and MiSTER-E: speech + text emotion recognition in conversations.

Shipped to the Hugging Face Hub as remote code next to `configuration_merits.py`: this file imports only torch,
transformers, numpy and the configuration file. Section numbers refer to `shared/spec/papers.md`.

Building blocks, top-down order of the data flow:

- `MeritsTextEncoder` / `MeritsSpeechEncoder`: utterance encoders (Stage I), one vector + logits per utterance.
- `MeritsContextEncoder`: context over the turns of a conversation (MERITS-L Stage II Bi-GRU + self-attention §3.5;
  MiSTER-E conv 1/3/5 + Bi-GRU speech and text experts §4.3).
- `MeritsCoAttentionFusion`: cross-attention then self-attention blocks between the two streams (MERITS-L Stage III
  §3.6; the MiSTER-E cross-modal expert §4.3).
- `MeritsGate`: per-turn mixture weights over the MiSTER-E experts.
- loss functions (masked focal, masked SupCon, masked symmetric KL).
- `MeritsPreTrainedModel` and `MeritsForConversationClassification`.

Shapes: B conversations, T turns, N = number of real turns (`turn_mask.sum()`), C classes. Utterance-level raw inputs
are flattened over real turns in row-major order (conversation b, then turn t).
"""

import inspect
import math
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .whisper_encoder_merits import is_whisper_encoder, whisper_encoder_own_frames
from .configuration_merits import EXPERTS, MeritsConfig, _backbone_hidden_size, speech_backbone_layers


try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init


# ---------------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------------


class MeritsDropout(nn.Dropout):
    """`nn.Dropout` that draws its CPU mask with `torch.rand_like` (about 3x faster there than the `bernoulli_` of
    `F.dropout`; dropout was ~6 % of a MiSTER-E training step on cached embeddings). Same distribution: each element
    is kept with probability 1 - p and scaled by 1 / (1 - p). Elsewhere (CUDA, ...) it is `F.dropout` itself."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return x * 0
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # in place: no bool mask, no cast
        return x * keep


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MeritsConversationClassifierOutput(ModelOutput):
    """
    Output of [`MeritsForConversationClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): total loss of the stage (when `labels` are given).
        logits (`torch.FloatTensor` of shape `(B, T, C)`): the final head of the stage: fusion / gate mixture where a
            turn has both modalities, otherwise the available modality.
        utterance_text_logits, utterance_audio_logits (`(B, T, C)`, *optional*): Stage I utterance logits.
        context_text_logits, context_audio_logits (`(B, T, C)`, *optional*): Stage II logits (MiSTER-E: the text and
            speech experts).
        fusion_logits (`(B, T, C)`, *optional*): co-attention fusion logits (MiSTER-E: the cross-modal expert).
        expert_logits (`tuple` of 3 `(B, T, C)` or `None`, *optional*): MiSTER-E (speech, text, cross-modal) expert
            logits; `None` for an expert not in `config.experts`.
        gate_weights (`(B, T, 3)`, *optional*): MiSTER-E gate weights in the order (speech, text, cross-modal); 0 for
            an expert that is disabled or whose modality is absent at that turn.
        text_embeds, audio_embeds (`(B, T, D)`, *optional*): the utterance embeddings used (zero where absent).
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*): every term of the loss, unweighted, detached.
        text_context_features, audio_context_features (`(B, T, 2H)`, *optional*): MERITS-L stage II features c_i
            (the context encoders' outputs that stage III fuses); zero at padded turns.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    utterance_text_logits: Optional[torch.FloatTensor] = None
    utterance_audio_logits: Optional[torch.FloatTensor] = None
    context_text_logits: Optional[torch.FloatTensor] = None
    context_audio_logits: Optional[torch.FloatTensor] = None
    fusion_logits: Optional[torch.FloatTensor] = None
    expert_logits: Optional[tuple] = None
    gate_weights: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    audio_embeds: Optional[torch.FloatTensor] = None
    loss_terms: Optional[dict] = None
    text_context_features: Optional[torch.FloatTensor] = None
    audio_context_features: Optional[torch.FloatTensor] = None


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def float32_region(tensor: torch.Tensor):
    """A region where autocast is off on `tensor`'s device: the losses, the gate and their softmaxes run in float32
    under bf16 mixed precision (autocast would otherwise run their matrix products in bfloat16)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of `scores` over `dim` restricted to `mask` (True = keep). Fully masked rows give all zeros."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask.to(scores.dtype)


def causal_mask(length: int, device) -> torch.Tensor:
    """[T, T] bool, True where query turn i may see key turn j (j <= i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def check_turn_mask(turn_mask: torch.Tensor) -> torch.Tensor:
    """Return `turn_mask` as bool after checking that the real turns of every conversation come first."""
    if turn_mask.dim() != 2:
        raise ValueError(f"`turn_mask` must be [B, T], got shape {tuple(turn_mask.shape)}.")
    mask = turn_mask.bool()
    # a prefix mask never goes 0 -> 1 along the turn axis
    bad = (~mask[:, :-1]) & mask[:, 1:]
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"`turn_mask` of conversation {b} has a real turn {t + 1} after a padded turn {t}: the real turns of a "
            "conversation must come first, padding last."
        )
    return mask


def scatter_turns(flat: torch.Tensor, turn_mask: torch.Tensor, index=None) -> torch.Tensor:
    """[N, ...] rows of the real turns -> [B, T, ...] with zeros at padded turns.

    `index`: the real turns' (conversation, turn) indices, `turn_mask.nonzero(as_tuple=True)`, where they are known
    without reading the device (from the host copy of the mask on GPUs): then nothing here waits for the device
    (a boolean-mask assignment reads the number of real turns, forward and backward)."""
    n_real = int(turn_mask.sum()) if index is None else index[0].numel()
    if flat.shape[0] != n_real:
        raise ValueError(
            f"Got {flat.shape[0]} utterances but `turn_mask` has {n_real} real turns: flattened utterance inputs "
            "must have one row per real turn (conversation b, then turn t)."
        )
    out = flat.new_zeros(*turn_mask.shape, *flat.shape[1:])
    out[turn_mask if index is None else index] = flat
    return out


def _default_modality_mask(mask, turn_mask, name):
    if mask is None:
        return turn_mask
    if mask.shape != turn_mask.shape:
        raise ValueError(f"`{name}` must have the shape of `turn_mask` {tuple(turn_mask.shape)}, got {tuple(mask.shape)}.")
    return mask.bool() & turn_mask


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def focal_loss(logits, labels, gamma=3.0, mask=None, ignore_index=-100):
    """Masked focal loss: mean over the selected turns of (1 - p_y)^gamma * CE (gamma 0 = cross-entropy).

    Turns with `labels == ignore_index` or `mask == False` are left out of the mean (§6 #14), so padding never changes
    the value. With no turn selected the loss is an exact (differentiable) zero.

    Computed over all rows with 0/1 weights (the sum over the selected rows divided by their count, clamped to 1)
    rather than by selecting the rows with the mask, whose size the host would have to read: no host-device sync.
    Left-out rows get logit 0 and class 0 before the cross-entropy, so their values (even NaN) cannot reach the loss
    or the gradients (exactly zero there, as with a selection).
    """
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    num_labels = logits.shape[-1]
    with float32_region(logits):
        flat_valid = valid.reshape(-1)
        flat_logits = logits.reshape(-1, num_labels).float().masked_fill(~flat_valid.unsqueeze(-1), 0.0)
        targets = labels.reshape(-1).masked_fill(~flat_valid, 0)
        ce = F.cross_entropy(flat_logits, targets, reduction="none")
        if gamma:
            p_true = torch.exp(-ce)
            ce = (1.0 - p_true).pow(gamma) * ce
        weights = flat_valid.to(ce.dtype)
        return (ce * weights).sum() / weights.sum().clamp(min=1.0)


def supervised_contrastive_loss(text_repr, audio_repr, labels, mask, temperature=1.0, ignore_index=-100):
    """Masked SupCon (§4.3) between paired speech/text representations.

    Rows: the labelled turns with `mask` (real turns that have BOTH modalities). Both views are stacked into 2N
    L2-normalised anchors; positives are the other rows with the same label (so the other view of the same turn is
    always positive); self-pairs are excluded. Loss = -mean over anchors of the mean log-softmax over positives.

    Inputs have any leading shape ([B, T, D] / [B, T], or [N, D] / [N] real rows). Computed over all rows with the
    left-out ones masked out of every softmax, positive set and mean (no host-device sync to select them); their
    values cannot reach the loss, and their gradients are exactly zero.
    """
    width = text_repr.shape[-1]
    valid = (mask.bool() & (labels != ignore_index)).reshape(-1)
    rows = torch.cat([text_repr.reshape(-1, width), audio_repr.reshape(-1, width)], dim=0)
    row_valid = torch.cat([valid, valid], dim=0)
    row_labels = labels.reshape(-1).repeat(2)
    with float32_region(rows):
        features = F.normalize(rows.float().masked_fill(~row_valid.unsqueeze(-1), 0.0), dim=-1)
        similarity = features @ features.t() / temperature
        not_self = ~torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
        keep = not_self & row_valid.unsqueeze(0)  # the columns an anchor's softmax runs over
        similarity = similarity.masked_fill(~keep, torch.finfo(similarity.dtype).min)
        log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
        positives = (row_labels[:, None] == row_labels[None, :]) & keep
        per_anchor = torch.where(positives, log_prob, 0.0).sum(1) / positives.sum(1).clamp(min=1)
        anchors = row_valid.to(per_anchor.dtype)
        return -(per_anchor * anchors).sum() / anchors.sum().clamp(min=1.0)


def symmetric_kl_loss(expert_logits, available, reduction="batchmean"):
    """Masked symmetric KL (§4.3) averaged over expert pairs.

    `expert_logits` [B, T, E, C], `available` [B, T, E] bool. For each pair (i, j), KL(p_i||p_j) + KL(p_j||p_i) summed
    over classes, then over the turns where both experts are available, divided by the number of conversations B
    (`reduction="batchmean"`: the official `F.kl_div(log_p, q, reduction="batchmean")` on [B, T, C], which divides the
    total by its first dimension; here padded turns add nothing and B counts the conversations with a real turn, so a
    fully padded row changes nothing either) or averaged over those turns (`"mean"`: about T times smaller); then
    averaged over the E(E-1)/2 pairs. A pair with no shared turn contributes zero.

    All pairs at once and over all turns with 0/1 weights (no host-device sync): KL(p_i||p_j) + KL(p_j||p_i) =
    sum_c (p_i - p_j)(log p_i - log p_j), computed for every ordered pair (the diagonal is exactly zero) and halved.
    """
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"Unknown KL reduction {reduction!r}; valid ones are batchmean, mean.")
    num_experts = expert_logits.shape[-2]
    if num_experts < 2:
        return expert_logits.sum() * 0.0
    available = available.bool()
    with float32_region(expert_logits):
        log_probs = F.log_softmax(expert_logits.float(), dim=-1)  # [B, T, E, C]
        probs = log_probs.exp()
        kl = ((probs.unsqueeze(-2) - probs.unsqueeze(-3)) * (log_probs.unsqueeze(-2) - log_probs.unsqueeze(-3))).sum(-1)
        both = available.unsqueeze(-1) & available.unsqueeze(-2)  # [B, T, E, E]
        pair_sums = torch.where(both, kl, 0.0).flatten(0, -3).sum(0)  # [E, E]
        if reduction == "batchmean":
            conversations = available.reshape(available.shape[0], -1).any(-1).sum().clamp(min=1)
            pair_values = pair_sums / conversations
        else:
            pair_values = pair_sums / both.flatten(0, -3).sum(0).clamp(min=1)
        num_pairs = num_experts * (num_experts - 1) // 2
        return pair_values.sum() / (2 * num_pairs)


# ---------------------------------------------------------------------------------------------------------------------
# Utterance encoders (Stage I)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsAttentiveStatisticsPooling(nn.Module):
    """Attentive statistics pooling over non-pad tokens (§4.2): tanh attention, weighted mean ‖ weighted std."""

    def __init__(self, hidden_size, attention_hidden_size):
        super().__init__()
        self.attention = nn.Linear(hidden_size, attention_hidden_size)
        self.score = nn.Linear(attention_hidden_size, 1)

    def forward(self, hidden_states, attention_mask):
        scores = self.score(torch.tanh(self.attention(hidden_states))).squeeze(-1)  # [N, L]
        weights = masked_softmax(scores, attention_mask.bool()).unsqueeze(-1)
        mean = (weights * hidden_states).sum(1)
        variance = (weights * hidden_states.pow(2)).sum(1) - mean.pow(2)
        std = variance.clamp(min=1e-5).sqrt()
        return torch.cat([mean, std], dim=-1)


class MeritsTextEncoder(nn.Module):
    """Text utterance encoder: any `AutoModel` text backbone (RoBERTa-style encoders, Llama/Qwen decoders), pooling,
    optional projection to `utterance_embed_dim` (MiSTER-E §4.2) and a classifier.

    `forward(input_ids [N, L], attention_mask [N, L]) -> (embeds [N, D_text], logits [N, C])`.

    Pooling: "cls" takes the first token (`<s>` of RoBERTa, §6 #6; for decoder LLMs prefer "mean" or
    "attentive_stats"), "mean" the masked mean, "attentive_stats" the §4.2 pooling (2 x hidden).
    """

    def __init__(self, config: MeritsConfig):
        super().__init__()
        self.config = config
        self.backbone = AutoModel.from_config(config.text_config)
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # the BERT-style pooler is never used (we pool last_hidden_state ourselves)
        hidden_size = config.text_config.get_text_config().hidden_size
        self.layer_norm = nn.LayerNorm(hidden_size) if config.text_layer_norm else None
        self.pooler = (
            MeritsAttentiveStatisticsPooling(hidden_size, config.attentive_pooling_hidden_size or hidden_size)
            if config.text_pooling == "attentive_stats"
            else None
        )
        pooled_size = 2 * hidden_size if config.text_pooling == "attentive_stats" else hidden_size
        self.projection = nn.Linear(pooled_size, config.utterance_embed_dim) if config.utterance_embed_dim else None
        self.dropout = MeritsDropout(config.text_head_dropout)
        self.classifier = nn.Linear(config.text_embed_dim, config.num_labels)
        self._backbone_takes_use_cache = "use_cache" in inspect.signature(self.backbone.forward).parameters

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"use_cache": False} if self._backbone_takes_use_cache else {}
        hidden_states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
        mask = attention_mask.bool()
        if self.config.text_pooling == "cls":
            pooled = hidden_states[:, 0]
        elif self.config.text_pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden_states.dtype)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = self.pooler(hidden_states, mask)
        if self.projection is None:
            return pooled, self.classifier(self.dropout(pooled))
        projected = self.projection(pooled)
        activated = torch.relu(projected)
        logits = self.classifier(self.dropout(activated))
        # §4.2: the official code exports fc(feat), before the ReLU the classifier reads
        return (projected if self.config.utterance_embed_before_activation else activated), logits


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _conv_output_length(conv_layers, length):
    """Frames out of a stack of feature-encoder conv layers for `length` input samples (int or tensor): floor((L -
    kernel) / stride) + 1 per layer, as the backbone's `_get_feat_extract_output_lengths` (may go <= 0: no frame)."""
    for layer in conv_layers:
        length = (length - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1
    return length


def masked_group_norm(norm: nn.GroupNorm, hidden, frame_mask):
    """`norm` (an nn.GroupNorm) on `hidden` [B, C, T] with each sample's statistics taken over its valid frames only
    (`frame_mask` [B, T] bool): the same mean, biased variance, eps and affine weight/bias as `norm` on the valid frames
    alone. Statistics in float32 (as GroupNorm's own kernels in half precision); padded frames are NOT zeroed here."""
    batch, channels, frames = hidden.shape
    out_dtype = hidden.dtype
    if hidden.dtype in (torch.float16, torch.bfloat16) and hidden.is_cuda and torch.is_autocast_enabled():
        out_dtype = torch.float32  # CUDA autocast runs group_norm in float32 (CPU autocast keeps the input's dtype)
    x = hidden.float().reshape(batch, norm.num_groups, channels // norm.num_groups, frames)
    keep = frame_mask.bool()[:, None, None, :]
    count = (keep.sum(-1, keepdim=True) * x.shape[2]).clamp(min=1).to(x.dtype)  # [B, 1, 1, 1]
    mean = x.masked_fill(~keep, 0.0).sum((2, 3), keepdim=True) / count
    centered = (x - mean).masked_fill(~keep, 0.0)
    var = centered.square().sum((2, 3), keepdim=True) / count
    x = ((x - mean) * torch.rsqrt(var + norm.eps)).reshape(batch, channels, frames)
    if norm.affine:
        x = x * norm.weight.float()[:, None] + norm.bias.float()[:, None]
    return x.to(out_dtype)


def _feature_encoder_forward(self, input_values):
    """A wav2vec2-family convolutional feature encoder (`batch_friendly`); it never mixes utterances except through a
    GroupNorm first layer (`feat_extract_norm="group"`), which normalises each channel over the whole time axis.

    `self._merits_input_lengths` [B] (each row's real samples, right padding; set by `MeritsSpeechEncoder.
    pool_backbone` for one call) makes that layer exact: batched (GPUs), layer 0's conv runs on the whole batch, its
    GroupNorm takes each row's statistics over the row's valid frames only (`masked_group_norm`), padded frames are
    zeroed, and the remaining conv layers run batched (a valid output frame only reads valid input frames). On a
    CPU (`MeritsSpeechEncoder.feature_encoder_per_utterance`) each row runs alone on its own samples (a cache
    optimisation), zero-padded to the batch's frames."""
    lengths = getattr(self, "_merits_input_lengths", None)
    layers = self.conv_layers
    group_norm = isinstance(getattr(layers[0], "layer_norm", None), nn.GroupNorm)
    per_utterance = MeritsSpeechEncoder.feature_encoder_per_utterance
    if per_utterance is None:
        per_utterance = input_values.device.type == "cpu"
    if lengths is None or not group_norm:
        if input_values.shape[0] <= 1 or not per_utterance:
            return type(self).forward(self, input_values)
        return torch.cat([type(self).forward(self, row) for row in input_values.split(1)], dim=0)
    frames = _conv_output_length(layers, input_values.shape[1])
    if per_utterance:
        counts = lengths.tolist()
        rows = [type(self).forward(self, input_values[i : i + 1, : int(n)])
                if _conv_output_length(layers, int(n)) > 0 else None for i, n in enumerate(counts)]
        done = next((row for row in rows if row is not None), None)
        if done is not None:
            return torch.cat([done.new_zeros(1, done.shape[1], frames) if row is None
                              else F.pad(row, (0, frames - row.shape[-1])) for row in rows], dim=0)
    hidden = input_values[:, None]
    if self._requires_grad and self.training:  # as the backbone's own forward (gradient checkpointing)
        hidden.requires_grad = True
    first = layers[0]
    hidden = first.conv(hidden)
    valid = torch.arange(hidden.shape[-1], device=hidden.device) < _conv_output_length(layers[:1], lengths)[:, None]
    hidden = first.activation(masked_group_norm(first.layer_norm, hidden, valid))
    hidden = hidden.masked_fill(~valid[:, None, :], 0.0)
    for layer in layers[1:]:
        hidden = layer(hidden)
    return hidden


def _self_attention_sequence_first(self, hidden_states, *args, **kwargs):
    """WavLM's attention on a [B, T, E] tensor STORED sequence-first (the same values)."""
    stored = hidden_states.transpose(0, 1).contiguous().transpose(0, 1)
    return type(self).torch_multi_head_self_attention(self, stored, *args, **kwargs)


def batch_friendly(backbone: nn.Module) -> nn.Module:
    """Two exact rewrites that make a batched pass of a wav2vec2-family speech backbone as fast per utterance as one
    utterance at a time on a CPU (measured on WavLM-base-plus, 4 x 3.5 s; bench/bench_extraction.py):

    - the convolutional feature encoder runs per utterance: over [B, 512, 50 x 5 x seconds] its activations leave
      the CPU caches (batched it cost 1.2x per utterance); on GPUs it runs batched. Given the rows' lengths (by
      `MeritsSpeechEncoder.pool_backbone`), a GroupNorm first layer is made exact under padding
      (`_feature_encoder_forward`);
    - WavLM's attention hands `F.multi_head_attention_forward` the view `hidden_states.transpose(0, 1)`; for B > 1
      that view is not contiguous and the q/k/v projections run as one small matrix product per frame (24 % of the
      batched pass); fed a tensor stored sequence-first, the view is contiguous and each projection is one product.

    Both only override `forward` / the attention method on the instances (bound methods, so `copy.deepcopy` and
    `state_dict` are unaffected); a backbone without these parts is returned as it is."""
    for module in backbone.modules():
        if type(module).__name__.endswith("FeatureEncoder") and hasattr(module, "conv_layers"):
            module.forward = types.MethodType(_feature_encoder_forward, module)
        if hasattr(type(module), "torch_multi_head_self_attention"):
            module.torch_multi_head_self_attention = types.MethodType(_self_attention_sequence_first, module)
    return backbone


def _masked_time_mean(hidden, frame_mask):
    """[K, N, T, H] states, [N, T] frame mask -> [K, N, H] means over each row's own frames (0 for a row with none)."""
    weights = frame_mask[None, :, :, None].to(hidden.dtype)
    return (hidden * weights).sum(2) / weights.sum(2).clamp(min=1.0)


class MeritsSpeechEncoder(nn.Module):
    """Speech utterance encoder: a frozen speech backbone (wav2vec2 / HuBERT / WavLM `input_values`, or the Whisper
    encoder `input_features`) with softmax-normalised learned weights over all its hidden states and a masked mean over
    time; or precomputed `audio_features` [N, F] / [N, K, F] (K layers mixed the same way; with
    `speech_layer_combination="concat"` the K layers are concatenated instead, K*F wide). Then the light head of §2.3
    (Linear -> [activation] -> Dropout per hidden size; the last hidden is the utterance embedding) and a classifier.

    `forward(...) -> (embeds [N, D_audio], logits [N, C])`.
    """

    # where a wav2vec2-family feature encoder runs utterance by utterance (`_feature_encoder_forward`): None = by
    # device (on a CPU, a cache optimisation; batched elsewhere); False forces the batched route (the GPU path)
    feature_encoder_per_utterance = None

    def __init__(self, config: MeritsConfig):
        super().__init__()
        self.config = config
        self.backbone = None
        self.layer_weights = None
        if config.audio_config is not None:
            backbone = AutoModel.from_config(config.audio_config)
            if getattr(config.audio_config, "is_encoder_decoder", False):
                backbone = backbone.get_encoder()  # Whisper: the encoder only
            num_states = speech_backbone_layers(config.audio_config)
            self.backbone = backbone
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            batch_friendly(self.backbone)
            input_size = _backbone_hidden_size(config.audio_config)
        else:
            input_size = config.audio_feature_dim
            num_states = config.audio_feature_layers
        # K pooled layers -> one vector: learned softmax weights (CARE, the default) or side by side ("concat")
        self.num_layers = num_states
        self.concat_layers = num_states is not None and config.speech_layer_combination == "concat"
        if num_states is not None and not self.concat_layers:
            self.layer_weights = nn.Parameter(torch.zeros(num_states))
        if getattr(config, "standardize_speech_layers", False):
            # each layer's pooled vector standardised before the mix, with training-set statistics (set_layer_statistics)
            self.register_buffer("layer_mean", torch.zeros(num_states, input_size))
            self.register_buffer("layer_std", torch.ones(num_states, input_size))
        else:
            self.layer_mean = self.layer_std = None
        input_size = config.speech_head_input_size()  # K * F with "concat"
        layers = [MeritsDropout(config.speech_head_input_dropout)] if config.speech_head_input_dropout > 0 else []
        for index, hidden_size in enumerate(config.speech_head_hidden_sizes):
            if index > 0:
                layers.append(MeritsDropout(config.speech_head_dropout))
            layers.append(nn.Linear(input_size, hidden_size))
            if config.speech_head_activation is not None:
                layers.append(_ACTIVATIONS[config.speech_head_activation]())
            input_size = hidden_size
        # with `utterance_embed_before_activation` the last activation moves out of the head: the embedding is the last
        # Linear's output (the official MiSTER-E export), the classifier reads its activation (no parameter moves)
        self.embed_activation = None
        if (config.utterance_embed_before_activation and config.speech_head_activation is not None
                and config.speech_head_hidden_sizes):
            self.embed_activation = layers.pop()
        self.head = nn.Sequential(*layers)  # [Dropout] -> Linear -> [act] (-> Dropout -> Linear -> [act])*; output = embedding
        self.dropout = MeritsDropout(config.speech_head_dropout)
        self.classifier = nn.Linear(input_size, config.num_labels)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # the speech backbone is frozen: no dropout / no feature-encoder randomness
        return self

    def mix_layers(self, stacked):
        """Weighted sum over the layer axis (dim 0 of `stacked` [K, ...]) with softmax-normalised weights; with
        `speech_layer_combination="concat"`, the K layers side by side instead ([K, N, F] -> [N, K*F])."""
        if self.concat_layers:
            return stacked.movedim(0, -2).flatten(-2)
        weights = torch.softmax(self.layer_weights, dim=0).to(stacked.dtype)
        return torch.einsum("k,k...->...", weights, stacked)

    @torch.no_grad()
    def set_layer_statistics(self, mean, std, min_std: float = 1e-3):
        """Set the standardisation of the pooled layers (`standardize_speech_layers`): `mean` / `std` [K, F], the
        training utterances' statistics of `pooled_layers` (std floored at `min_std`)."""
        if self.layer_mean is None:
            raise ValueError("This speech encoder does not standardise its layers (config.standardize_speech_layers).")
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.layer_mean.shape or std.shape != self.layer_std.shape:
            raise ValueError(f"layer statistics must have shape {tuple(self.layer_mean.shape)}, got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        self.layer_mean.copy_(mean)
        self.layer_std.copy_(std.clamp(min=min_std))

    def standardize_and_mix(self, stacked):
        """[K, N, F] pooled layers -> [N, F]: standardised (`standardize_speech_layers`), then mixed."""
        if self.layer_mean is not None:
            stacked = (stacked - self.layer_mean[:, None].to(stacked.dtype)) / self.layer_std[:, None].to(stacked.dtype)
        return self.mix_layers(stacked)

    def pool_backbone(self, input_values=None, input_features=None, audio_attention_mask=None):
        """Frozen backbone -> layer-weighted, time-averaged vector [N, hidden] (`pooled_layers`, then
        `standardize_and_mix`; the mix commutes with the time mean)."""
        return self.standardize_and_mix(self.pooled_layers(input_values, input_features, audio_attention_mask))

    def pooled_layers(self, input_values=None, input_features=None, audio_attention_mask=None):
        """Frozen backbone -> every hidden state averaged over the utterance's own frames, [K, N, hidden].

        A wav2vec2-family feature encoder with `feat_extract_norm="group"` (wav2vec2/WavLM base) normalises each
        channel of its first layer over the whole time axis, padding included: given `audio_attention_mask` (right
        padding), the feature encoder gets each row's length and normalises over the row's own frames (a masked
        GroupNorm, batched; `_feature_encoder_forward`), so an utterance's vector is the same alone or in any batch.
        A row without samples pools to zeros."""
        encoder = getattr(self.backbone, "feature_extractor", None)
        if (input_values is not None and audio_attention_mask is not None
                and getattr(getattr(self.backbone, "config", None), "feat_extract_norm", None) == "group"
                and encoder is not None and "forward" in vars(encoder)):  # batch_friendly's forward reads the lengths
            lengths = audio_attention_mask.sum(-1)
            encoder._merits_input_lengths = lengths
            try:
                pooled = self._pooled_layers(input_values, input_features, audio_attention_mask)
            finally:
                del encoder._merits_input_lengths
            return torch.where((lengths > 0)[None, :, None], pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
        return self._pooled_layers(input_values, input_features, audio_attention_mask)

    def _pooled_layers(self, input_values=None, input_features=None, audio_attention_mask=None):
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())
        if input_features is not None and is_whisper_encoder(self.backbone):
            # each clip on its own mel frames (whisper_encoder_merits.py), not on 30 s of padding
            with torch.set_grad_enabled(grad):
                states, frame_mask = whisper_encoder_own_frames(self.backbone, input_features, audio_attention_mask)
            return _masked_time_mean(torch.stack(states, dim=0), frame_mask)
        with torch.set_grad_enabled(grad):
            if input_features is not None:
                outputs = self.backbone(input_features=input_features, output_hidden_states=True)
            elif input_values is not None:
                outputs = self.backbone(
                    input_values=input_values, attention_mask=audio_attention_mask, output_hidden_states=True
                )
            else:
                raise ValueError("The speech backbone needs `input_values` (waveforms) or `input_features` (Whisper mels).")
        hidden = torch.stack(outputs.hidden_states, dim=0)  # [K, N, frames, H]
        frames = hidden.shape[2]
        if audio_attention_mask is None:
            return hidden.mean(2)
        if input_features is not None:  # mel-frame mask -> encoder-frame mask (Whisper downsamples by 2)
            stride = max(1, audio_attention_mask.shape[-1] // frames)
            frame_mask = audio_attention_mask[:, ::stride][:, :frames].bool()
        else:
            frame_mask = self.backbone._get_feature_vector_attention_mask(frames, audio_attention_mask).bool()
        return _masked_time_mean(hidden, frame_mask)

    def forward(self, input_values=None, input_features=None, audio_attention_mask=None, audio_features=None):
        if self.backbone is not None:
            pooled = self.pool_backbone(input_values, input_features, audio_attention_mask)
        else:
            if audio_features is None:
                raise ValueError("This speech encoder reads precomputed `audio_features`, but none were given.")
            expected = (self.config.audio_feature_dim,)
            if self.config.audio_feature_layers is not None:
                expected = (self.config.audio_feature_layers, self.config.audio_feature_dim)
            if tuple(audio_features.shape[1:]) != expected:
                raise ValueError(
                    f"`audio_features` rows must have shape {expected} (audio_feature_layers, audio_feature_dim), got "
                    f"{tuple(audio_features.shape[1:])}."
                )
            pooled = audio_features
            if self.num_layers is not None:
                pooled = self.standardize_and_mix(audio_features.transpose(0, 1))
        embeds = self.head(pooled)
        hidden = self.embed_activation(embeds) if self.embed_activation is not None else embeds
        logits = self.classifier(self.dropout(hidden))
        return embeds, logits


# ---------------------------------------------------------------------------------------------------------------------
# Turn plan and GRU recurrence (the training hot path on cached embeddings)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsTurnPlan:
    """Index bookkeeping of one batch's real turns, computed once per forward and shared by every module.

    Row-major real rows: row i is (conversation `batch_index[i]`, turn `turn_index[i]`), i < N = turn_mask.sum().
    For the GRUs the conversations are sorted by length (longest first, like `pack_padded_sequence`); time-major
    slot `t * B + rank[b]` holds turn t of conversation b, and `batch_sizes[t]` conversations are still running at
    step t. `forward_slots` / `reverse_slots` [N] give each real row's slot in the forward and in the per-conversation
    reversed (backward-direction) order; `forward_rows` / `reverse_rows` [T * B] are the inverse maps (0 at padding).
    `conv_positions` [N] place the rows in one long sequence with `gap` zeros around every conversation, so one
    convolution over it equals a zero-padded convolution of each conversation alone.
    """

    # where the index bookkeeping is computed: None = by device (on the host for any non-CPU mask: ONE host read of
    # the mask instead of one per `int()` / `nonzero` / `.tolist()` below, then the indices are copied over without
    # waiting); True forces the host route (bench/op_counts.py counts the GPU path on a CPU with it)
    host_bookkeeping = None

    @classmethod
    def on_host(cls, device) -> bool:
        """Whether a plan for a mask on `device` computes its bookkeeping on the host (`host_bookkeeping`)."""
        return cls.host_bookkeeping if cls.host_bookkeeping is not None else torch.device(device).type != "cpu"

    def __init__(self, turn_mask: torch.Tensor, gap: int = 0, host_mask: torch.Tensor = None):
        """`host_mask`: a host copy of `turn_mask` that the caller made already (the model's `_prepare_masks` reads
        the masks back once per forward to check them), used on the host route instead of a second read."""
        turn_mask = turn_mask.bool()
        device = turn_mask.device
        if self.on_host(device) and not getattr(turn_mask, "_merits_host_copy", False):
            if host_mask is None:
                host_mask = turn_mask.cpu()
                if host_mask is turn_mask:  # forced on a CPU mask (host_bookkeeping=True): never mark the caller's
                    host_mask = turn_mask.clone()
            elif not getattr(host_mask, "_merits_host_copy", False):  # a caller's tensor: never marked either
                host_mask = host_mask.bool().cpu().clone()
            if tuple(host_mask.shape) != tuple(turn_mask.shape):
                raise ValueError(f"`host_mask` {tuple(host_mask.shape)} is not a copy of `turn_mask` "
                                 f"{tuple(turn_mask.shape)}.")
            host_mask._merits_host_copy = True  # the nested plan below computes in place
            host = MeritsTurnPlan(host_mask, gap=gap)
            for name, value in host.__dict__.items():
                if isinstance(value, torch.Tensor):
                    value = value.to(device, non_blocking=True)
                setattr(self, name, value)
            self.turn_mask = turn_mask
            return
        self.turn_mask = turn_mask
        self.batch_size, self.total_turns = turn_mask.shape
        lengths = turn_mask.sum(1)
        self.lengths = lengths
        self.num_real = int(lengths.sum())
        self.max_length = int(lengths.max()) if self.batch_size else 0
        self.batch_index, self.turn_index = turn_mask.nonzero(as_tuple=True)
        order = torch.argsort(lengths, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=device)
        steps = torch.arange(self.max_length, device=device)
        self.batch_sizes = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist()
        row_rank = rank[self.batch_index]
        row_length = lengths[self.batch_index]
        self.forward_slots = self.turn_index * self.batch_size + row_rank
        self.reverse_slots = (row_length - 1 - self.turn_index) * self.batch_size + row_rank
        rows = torch.arange(self.num_real, device=device)
        num_slots = self.max_length * self.batch_size
        self.forward_rows = torch.zeros(num_slots, dtype=torch.long, device=device).index_copy_(0, self.forward_slots, rows)
        self.reverse_rows = torch.zeros(num_slots, dtype=torch.long, device=device).index_copy_(0, self.reverse_slots, rows)
        self.gap = int(gap)
        starts = torch.cumsum(lengths + self.gap, 0) - lengths  # each conversation preceded by `gap` zeros
        self.conv_positions = starts[self.batch_index] + self.turn_index
        self.conv_length = int(lengths.sum()) + (self.batch_size + 1) * self.gap

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...] rows of the real turns."""
        return x[self.batch_index, self.turn_index]

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...] with zeros at padded turns."""
        out = rows.new_zeros(self.batch_size, self.total_turns, *rows.shape[1:])
        out[self.batch_index, self.turn_index] = rows
        return out


def _baddbmm_into(out: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor) -> torch.Tensor:
    """out += batch1 @ batch2, in place. A strided `out` (a step's first rows) takes a contiguous product and a copy: an
    in-place product into it falls back to one single-threaded matrix product per batch entry (~2x slower)."""
    if out.is_contiguous():
        return out.baddbmm_(batch1, batch2)
    return out.copy_(torch.baddbmm(out, batch1, batch2))


class MeritsGRURecurrence(torch.autograd.Function):
    """The recurrent half of a (multi-direction) GRU layer over time-major, length-sorted sequences.

    Inputs: `input_gates` [T, D, B, 3H] (x W_ih^T + b_ih, precomputed for all steps in one matrix product; D
    directions, each already in its own time order), `weight_hh` [D, 3H, H], `bias_hh` [D, 3H], `batch_sizes`
    (running sequences per step, non-increasing). Output [T, D, B, H] (zero where a sequence has ended). Equations of
    `torch.nn.GRU`: r = σ(i_r + h W_hr + b_hr), z = σ(i_z + h W_hz + b_hz), n = tanh(i_n + r (h W_hn + b_hn)),
    h' = (1 - z) n + z h.

    Time-major buffers make every step's block [D, B, ...] contiguous while all sequences run (strided per-step views
    made the step's elementwise kernels 1.1-1.5x slower), and a step is 5 kernels writing straight into the saved
    buffers: the hidden-gate buffer starts as (i_r + b_hr, i_z + b_hz, b_hn) and the step adds h W_hh^T in place.
    Steps past a sequence's end skip its row (a small matrix product costs less with fewer rows). The backward is
    written out through time with the derivative factors of every step computed at once beforehand (3 kernels a
    step), and the weight gradient is ONE matrix product over all steps (autograd through a cell loop would
    accumulate a full [3H, H] gradient at every step).
    """

    @staticmethod
    def forward(ctx, input_gates, weight_hh, bias_hh, batch_sizes):
        steps, num_dirs, batch, three_hidden = input_gates.shape
        hidden = three_hidden // 3
        dtype = input_gates.dtype
        weight_t = weight_hh.to(dtype).transpose(1, 2).contiguous()  # [D, H, 3H] (~10 % faster steps)
        bias = bias_hh.to(dtype).unsqueeze(1)  # [D, 1, 3H]
        gates = torch.empty_like(input_gates)  # per step: (r, z, h W_hn + b_hn) once the step is done
        torch.add(input_gates[..., : 2 * hidden], bias[..., : 2 * hidden], out=gates[..., : 2 * hidden])
        gates[..., 2 * hidden :] = bias[..., 2 * hidden :]
        news = input_gates.new_zeros(steps, num_dirs, batch, hidden)
        outputs = input_gates.new_zeros(steps, num_dirs, batch, hidden)
        h_prev = input_gates.new_zeros(num_dirs, batch, hidden)
        # every step's views made at once ([D, B, *] each): a loop of indexing ops cost ~10 % of a small step
        per_step = list(zip(*(x.unbind(0) for x in (
            gates, gates[..., : 2 * hidden], gates[..., :hidden], gates[..., hidden : 2 * hidden],
            gates[..., 2 * hidden :], input_gates[..., 2 * hidden :], news, outputs,
        ))))
        for views, size in zip(per_step, batch_sizes):
            if size < batch:  # a sequence has ended: its row is skipped
                views = [v[:, :size] for v in views]
            gate, rz, r, z, hidden_n, input_n, new, output = views
            h = h_prev if h_prev.shape[1] == size else h_prev[:, :size]
            _baddbmm_into(gate, h, weight_t)
            rz.sigmoid_()
            n = torch.addcmul(input_n, r, hidden_n, out=new)
            h_prev = torch.lerp(n.tanh_(), h, z, out=output)  # n + z (h - n)
        ctx.save_for_backward(weight_hh, bias_hh, outputs, gates, news)
        ctx.batch_sizes = list(batch_sizes)
        ctx.input_dtype = dtype
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        weight_hh, bias_hh, outputs, gates, n = ctx.saved_tensors
        sizes = ctx.batch_sizes
        steps, num_dirs, batch, hidden = outputs.shape
        weight = weight_hh.to(outputs.dtype)  # [D, 3H, H]
        grad_outputs = grad_outputs.to(outputs.dtype)
        r, z, h_n = gates.split(hidden, dim=-1)
        previous = torch.cat([outputs.new_zeros(1, num_dirs, batch, hidden), outputs[:-1]])  # h_{t-1}
        n_factor = (1 - z) * (1 - n * n)  # dh -> d(pre-activation of n)
        # dh -> d(h W_hh^T + b_hh) of (r, z, n), every step at once: [T, D, B, 3, H]
        factors = torch.stack([n_factor * h_n * r * (1 - r), (previous - n) * z * (1 - z), n_factor * r], dim=3)
        grad_hidden_gates = torch.zeros_like(factors)  # stays 0 at ended rows
        grad_h = torch.zeros_like(outputs)  # dL/dh_t of running rows: from the output and from step t + 1
        grad_h[steps - 1, :, : sizes[-1]] = grad_outputs[steps - 1, :, : sizes[-1]]
        flat_hidden_gates = grad_hidden_gates.view(steps, num_dirs, batch, 3 * hidden)
        per_step = list(zip(*(x.unbind(0) for x in (
            grad_h, grad_h.unsqueeze(3), factors, grad_hidden_gates, flat_hidden_gates, z,
        ))))
        previous_grad_outputs = [None, *grad_outputs.unbind(0)[:-1]]  # at step t: the output gradient of step t - 1
        for t in range(steps - 1, -1, -1):
            size = sizes[t]
            views = per_step[t] if size == batch else [v[:, :size] for v in per_step[t]]
            d_h, d_h_wide, factor, d_hidden, d_hidden_flat, z_t = views
            torch.mul(factor, d_h_wide, out=d_hidden)
            if t:
                grad_output = previous_grad_outputs[t]
                step_grad = per_step[t - 1][0]
                if size < batch:
                    grad_output, step_grad = grad_output[:, :size], step_grad[:, :size]
                torch.addcmul(grad_output, d_h, z_t, out=step_grad)
                _baddbmm_into(step_grad, d_hidden_flat, weight)
                if sizes[t - 1] > size:  # rows whose sequence ends at step t - 1
                    grad_h[t - 1, :, size : sizes[t - 1]] = grad_outputs[t - 1, :, size : sizes[t - 1]]
        grad_hidden_gates = flat_hidden_gates
        grad_input_gates = torch.cat([grad_hidden_gates[..., : 2 * hidden], grad_h * n_factor], dim=-1)
        flat_grad = grad_hidden_gates.transpose(0, 1).reshape(num_dirs, steps * batch, 3 * hidden)
        flat_previous = previous.transpose(0, 1).reshape(num_dirs, steps * batch, hidden)
        grad_weight = torch.bmm(flat_grad.transpose(1, 2), flat_previous)
        grad_bias = flat_grad.sum(1)
        return (grad_input_gates.to(ctx.input_dtype), grad_weight.to(weight_hh.dtype), grad_bias.to(bias_hh.dtype),
                None)


RECURRENCE_ROUTES = ("cudnn", "loop")


def resolve_recurrence(recurrence: str, device: torch.device) -> str:
    """`MeritsConfig.recurrence` -> the route for tensors on `device`: "auto" is "loop" on CPU (our per-step loop is the
    fastest there) and "cudnn" on any other device (`nn.GRU` runs a whole layer in one cuDNN call on a GPU, where a
    Python loop would issue ~5 small kernels per step, layer and direction)."""
    if recurrence == "auto":
        return "loop" if torch.device(device).type == "cpu" else "cudnn"
    if recurrence not in RECURRENCE_ROUTES:
        raise ValueError(f"Unknown recurrence {recurrence!r}; valid ones are auto, {', '.join(RECURRENCE_ROUTES)}.")
    return recurrence


def _packed_positions(plan: MeritsTurnPlan) -> torch.Tensor:
    """Row i's index in the data of the `PackedSequence` of the plan's conversations (time-major, length-sorted:
    step t holds its `batch_sizes[t]` running conversations in rank order); computed once per plan."""
    positions = getattr(plan, "_packed_positions", None)
    if positions is None:
        sizes = torch.tensor(plan.batch_sizes, dtype=torch.long)
        offsets = (torch.cumsum(sizes, 0) - sizes).to(plan.turn_index.device)
        positions = offsets[plan.turn_index] + plan.forward_slots % plan.batch_size
        plan._packed_positions = positions
    return positions


def run_packed_gru_cudnn(gru: nn.GRU, rows: torch.Tensor, plan: MeritsTurnPlan) -> torch.Tensor:
    """`gru` itself over the plan's conversations as one `PackedSequence` (cuDNN on a GPU): rows [N, D_in] ->
    [N, num_directions * H], the same function (and parameters) as `run_packed_gru`'s loop route."""
    width = gru.hidden_size * (2 if gru.bidirectional else 1)
    if plan.num_real == 0:
        return rows.new_zeros(0, width)
    positions = _packed_positions(plan)
    data = rows.new_empty(rows.shape).index_copy(0, positions, rows)  # [N, D_in] in packed order
    packed = nn.utils.rnn.PackedSequence(data, torch.tensor(plan.batch_sizes, dtype=torch.long))
    output, _ = gru(packed)
    return output.data.index_select(0, positions)


def run_packed_gru(gru: nn.GRU, rows: torch.Tensor, plan: MeritsTurnPlan, recurrence: str = "loop") -> torch.Tensor:
    """`gru` (batch-first) over the real turns only, using its own parameters.

    rows [N, D_in] (row-major real turns) -> [N, num_directions * H]; equals `gru` on the packed sequences.
    `recurrence` ("auto" | "cudnn" | "loop", see `resolve_recurrence`): "cudnn" hands the packed sequences to `gru`
    itself; "loop" (no inter-layer dropout) computes each layer's input projection as one matrix product over the N
    real rows and only the recurrence loops over time (`MeritsGRURecurrence`). (Running the two experts' GRUs in one
    recurrence was tried: on a CPU a step costs one read of the [3H, H] weights per direction, so it saved nothing.)
    """
    if resolve_recurrence(recurrence, rows.device) == "cudnn":
        return run_packed_gru_cudnn(gru, rows, plan)
    if gru.dropout and gru.training and gru.num_layers > 1:
        raise ValueError("run_packed_gru does not implement inter-layer GRU dropout.")
    if plan.num_real == 0:
        return rows.new_zeros(0, gru.hidden_size * (2 if gru.bidirectional else 1))
    directions = [("", plan.forward_slots, plan.forward_rows)]
    if gru.bidirectional:
        directions.append(("_reverse", plan.reverse_slots, plan.reverse_rows))
    steps, batch, num_dirs = plan.max_length, plan.batch_size, len(directions)
    # row i's place in the flat [T * D * B] recurrence output, per direction: [N, D]
    places = torch.stack(
        [(slots // batch) * (num_dirs * batch) + d * batch + slots % batch for d, (_, slots, _) in enumerate(directions)],
        dim=1,
    )
    x = rows
    for layer in range(gru.num_layers):
        input_gates, weights, biases = [], [], []
        for suffix, _, slot_rows in directions:
            gates = F.linear(x, getattr(gru, f"weight_ih_l{layer}{suffix}"), getattr(gru, f"bias_ih_l{layer}{suffix}"))
            input_gates.append(gates[slot_rows].view(steps, batch, -1))  # time-major, length-sorted
            weights.append(getattr(gru, f"weight_hh_l{layer}{suffix}"))
            biases.append(getattr(gru, f"bias_hh_l{layer}{suffix}"))
        outputs = MeritsGRURecurrence.apply(
            torch.stack(input_gates, dim=1), torch.stack(weights), torch.stack(biases), plan.batch_sizes
        )  # [T, D, B, H]
        x = outputs.reshape(steps * num_dirs * batch, -1)[places].flatten(1)  # [N, D * H], directions side by side
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Context encoders (Stage II / MiSTER-E speech and text experts)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsContextEncoder(nn.Module):
    """Context over the turns of a conversation.

    kind="bigru_attention" (MERITS-L Stage II, §3.5): 2-layer Bi-GRU -> the two halves of the output (forward /
    backward direction) each projected by its own Linear(H, H) -> unscaled dot-product self-attention over turns with a
    row softmax and a key mask -> concatenated [B, T, 2H] context features -> Linear(2H, C).

    kind="conv_bigru" (MiSTER-E expert, §4.3): ReLU(Conv1d k=1) + ReLU(Conv1d k=3) + ReLU(Conv1d k=5) over the turn
    axis -> 3-layer Bi-GRU -> + Linear(D_in, 2H)(x) skip -> [B, T, 2H] -> Linear(2H, C).

    GRUs run packed, so padded turns never leak into real ones; inputs are zeroed at padded turns (so the convolutions
    see padding exactly as their own zero padding). With `causal=True` the GRU is unidirectional with hidden size 2H
    (same output size), the convolutions look only left and the attention is causal; `step` then runs one turn at a
    time from a cached state and equals the full causal forward.
    """

    def __init__(self, config: MeritsConfig, input_size: int, hidden_size: int, kind: str):
        super().__init__()
        if kind not in ("bigru_attention", "conv_bigru"):
            raise ValueError(f"Unknown context encoder kind {kind!r}; valid ones are bigru_attention, conv_bigru.")
        self.kind = kind
        self.causal = config.causal
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = 2 * hidden_size
        gru_hidden = hidden_size if not self.causal else 2 * hidden_size
        if kind == "conv_bigru":
            self.kernel_sizes = list(config.context_conv_kernel_sizes)
            self.convs = nn.ModuleList(
                [
                    nn.Conv1d(input_size, config.context_conv_channels, k, padding=0 if self.causal else k // 2)
                    for k in self.kernel_sizes
                ]
            )
            gru_input = config.context_conv_channels
            self.skip = nn.Linear(input_size, self.output_size)
        else:
            gru_input = input_size
            self.direction_projections = nn.ModuleList([nn.Linear(hidden_size, hidden_size) for _ in range(2)])
        self.gru = nn.GRU(
            gru_input,
            gru_hidden,
            num_layers=config.context_num_layers,
            batch_first=True,
            bidirectional=not self.causal,
        )
        self.dropout = MeritsDropout(config.context_dropout)
        self.classifier = nn.Linear(self.output_size, config.num_labels)
        self.recurrence = getattr(config, "recurrence", "auto")  # resolved per call by the input's device
        _mark_conversation_level(self)

    # ---- full conversation ------------------------------------------------------------------------------------
    def _attend(self, gru_out, key_mask):
        """MERITS-L self-attention per direction half. `key_mask` [B, T] bool = turns that may be attended."""
        length = gru_out.shape[1]
        allowed = key_mask[:, None, :].expand(-1, length, -1)
        if self.causal:
            allowed = allowed & causal_mask(length, gru_out.device)
        halves = gru_out.split(self.hidden_size, dim=-1)
        outputs = []
        for half, projection in zip(halves, self.direction_projections):
            p = projection(half)
            scores = p @ p.transpose(1, 2)  # plain, unscaled dot product (§3.5)
            outputs.append(masked_softmax(scores, allowed) @ p)
        return torch.cat(outputs, dim=-1)

    @property
    def conv_gap(self):
        """Zeros needed around a conversation so that the convolutions see only its own turns."""
        return max(self.kernel_sizes) - 1 if self.kind == "conv_bigru" else 0

    def _convolve_rows(self, rows, plan):
        """Real rows [N, D] -> sum of ReLU(conv_k) over each conversation's turn axis -> [N, channels].

        The conversations are laid end to end in ONE sequence with `plan.gap` zeros around each, and only the N real
        output positions are computed: each is one matrix product of its window of turns (im2col) with the kernel,
        which equals `Conv1d` with zero padding (left-only when causal) applied to each conversation alone."""
        if plan.gap < self.conv_gap:
            raise ValueError(f"The turn plan has gap {plan.gap}, the convolutions need {self.conv_gap}.")
        sequence = rows.new_zeros(plan.conv_length, rows.shape[-1])
        sequence[plan.conv_positions] = rows
        widest = max(self.kernel_sizes)
        first = -(widest - 1) if self.causal else -(widest // 2)  # offset of the window's first turn
        offsets = torch.arange(first, first + widest, device=rows.device)
        windows = sequence[plan.conv_positions.unsqueeze(1) + offsets].transpose(1, 2)  # [N, D, widest]
        out = 0
        for kernel_size, conv in zip(self.kernel_sizes, self.convs):
            start = widest - kernel_size if self.causal else (widest - kernel_size) // 2
            # [N, D * k], channel-major like the Conv1d weight [C, D, k]: its flat view needs no copy (nor its gradient)
            taps = windows[..., start : start + kernel_size].reshape(windows.shape[0], -1)
            out = out + torch.relu(F.linear(taps, conv.weight.view(conv.out_channels, -1), conv.bias))
        return out

    def forward(self, x, turn_mask, key_mask=None, plan=None, exported=None):
        """x [B, T, D], turn_mask [B, T] (real turns), key_mask [B, T] (turns that have this modality) ->
        (features [B, T, 2H], logits [B, T, C]); both zero at padded turns.

        Everything but the attention runs on the N real turns only (`plan`, a `MeritsTurnPlan` shared by the
        modules of one forward; built here when not given). With `exported` (features [B, T, 2H] this encoder returned
        before: stage III trains on them, §3.1) only the classifier runs."""
        if exported is not None:
            return self.classify(exported, turn_mask)
        turn_mask = turn_mask.bool()
        key_mask = turn_mask if key_mask is None else key_mask.bool() & turn_mask
        if plan is None:
            plan = MeritsTurnPlan(turn_mask, gap=self.conv_gap)
        rows = plan.gather(x)  # [N, D]
        gru_in = self._convolve_rows(rows, plan) if self.kind == "conv_bigru" else rows
        gru_out = run_packed_gru(self.gru, gru_in, plan, self.recurrence)  # [N, 2H]
        if self.kind == "conv_bigru":
            features = gru_out + self.skip(rows)
            logits = self.classifier(self.dropout(features))
            return plan.scatter(features), plan.scatter(logits)
        features = self._attend(plan.scatter(gru_out), key_mask)
        features = features * turn_mask.unsqueeze(-1).to(features.dtype)
        logits = self.classifier(self.dropout(features)) * turn_mask.unsqueeze(-1).to(features.dtype)
        return features, logits

    def classify(self, features, turn_mask):
        """Exported stage II features [B, T, 2H] (as `forward` returned them) -> (features, logits), zero at padded
        turns: the classifier alone, so that stage III can train on features computed once (§3.1)."""
        expected = (*turn_mask.shape, self.output_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"exported context features must be [B, T, 2H] = {expected}, got {tuple(features.shape)}.")
        features = features.to(self.classifier.weight.dtype)
        keep = turn_mask.bool().unsqueeze(-1).to(features.dtype)
        features = features * keep
        return features, self.classifier(self.dropout(features)) * keep

    # ---- streaming (causal only) ------------------------------------------------------------------------------
    def init_state(self, batch_size, device, dtype):
        state = {"gru": None}
        if self.kind == "conv_bigru":
            state["window"] = torch.zeros(batch_size, max(self.kernel_sizes) - 1, self.input_size, device=device, dtype=dtype)
        else:
            state["keys"] = [torch.zeros(batch_size, 0, self.hidden_size, device=device, dtype=dtype) for _ in range(2)]
            state["key_mask"] = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return state

    def step(self, x, key_mask, state):
        """One turn: x [B, D], key_mask [B] -> (features [B, 2H], logits [B, C], new_state). Causal only."""
        if not self.causal:
            raise ValueError("Streaming needs a causal context encoder (config.causal=True).")
        new_state = {}
        if self.kind == "conv_bigru":
            window = torch.cat([state["window"], x.unsqueeze(1)], dim=1)  # [B, kmax, D]
            conv_out = 0
            for kernel_size, conv in zip(self.kernel_sizes, self.convs):
                conv_out = conv_out + torch.relu(conv(window[:, -kernel_size:].transpose(1, 2)))
            gru_in = conv_out.transpose(1, 2)  # [B, 1, channels]
            new_state["window"] = window[:, 1:]
        else:
            gru_in = x.unsqueeze(1)
        gru_out, hidden = self.gru(gru_in, state["gru"])
        new_state["gru"] = hidden
        if self.kind == "conv_bigru":
            features = gru_out[:, 0] + self.skip(x)
        else:
            mask = torch.cat([state["key_mask"], key_mask.bool().unsqueeze(1)], dim=1)  # [B, t]
            new_state["key_mask"] = mask
            new_state["keys"] = []
            outputs = []
            for half, projection, cached in zip(
                gru_out[:, 0].split(self.hidden_size, dim=-1), self.direction_projections, state["keys"]
            ):
                p = projection(half)  # [B, H]
                keys = torch.cat([cached, p.unsqueeze(1)], dim=1)  # [B, t, H]
                new_state["keys"].append(keys)
                scores = (keys @ p.unsqueeze(-1)).squeeze(-1)  # [B, t]
                outputs.append((masked_softmax(scores, mask).unsqueeze(1) @ keys).squeeze(1))
            features = torch.cat(outputs, dim=-1)
        logits = self.classifier(self.dropout(features))
        return features, logits, new_state


# ---------------------------------------------------------------------------------------------------------------------
# Co-attention fusion (MERITS-L Stage III / MiSTER-E cross-modal expert)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsAttention(nn.Module):
    """Multi-head attention with q/k/v projections d -> `attention_size` (120), `num_heads` heads (3 x 40), attention
    dropout, and an output projection `attention_size` -> d (the "Linear(t_x)" of §3.6).

    With `config.fusion_attention_inner_projections` (the official layout: Linear(d, 120) feeding an
    `nn.MultiheadAttention(120, 3)`), the q/k/v projections are followed by the MHA's own in-projections
    (`inner_query` / `inner_key` / `inner_value`, 120 -> 120) and the context goes through its out-projection
    (`inner_output`, 120 -> 120) before `output`; they are initialised as `nn.MultiheadAttention` initialises them."""

    def __init__(self, config: MeritsConfig):
        super().__init__()
        d, width = config.fusion_hidden_size, config.fusion_attention_size
        self.num_heads = config.fusion_num_heads
        self.head_dim = width // self.num_heads
        self.query = nn.Linear(d, width)
        self.key = nn.Linear(d, width)
        self.value = nn.Linear(d, width)
        self.output = nn.Linear(width, d)
        self.inner_query = self.inner_key = self.inner_value = self.inner_output = None
        if getattr(config, "fusion_attention_inner_projections", False):
            self.inner_query, self.inner_key, self.inner_value = (nn.Linear(width, width) for _ in range(3))
            self.inner_output = nn.Linear(width, width)
            for layer in (self.inner_query, self.inner_key, self.inner_value):
                layer._mha_projection = "in"
            self.inner_output._mha_projection = "out"
        self.dropout = MeritsDropout(config.fusion_attention_dropout)

    @staticmethod
    def _inner(layer, x):
        return x if layer is None else layer(x)

    def _heads(self, x):  # [B, T, width] -> [B, heads, T, head_dim]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _out(self, context):
        return self.output(self._inner(self.inner_output, context))

    def project_key_value(self, x):
        return (self._heads(self._inner(self.inner_key, self.key(x))),
                self._heads(self._inner(self.inner_value, self.value(x))))

    def _context(self, queries, keys, values, allowed):
        """queries [B, Tq, width], keys/values [B, heads, Tk, head_dim], allowed [B, Tq, Tk] -> [B, Tq, width]."""
        q = self._heads(queries)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)
        probs = self.dropout(masked_softmax(scores, allowed.unsqueeze(1)))
        return (probs @ values).transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1)

    def attend(self, query_input, keys, values, allowed):
        """query_input [B, Tq, d], keys/values [B, heads, Tk, head_dim], allowed [B, Tq, Tk] bool -> [B, Tq, d]."""
        return self._out(self._context(self._inner(self.inner_query, self.query(query_input)), keys, values, allowed))

    def _project(self, query_input, key_value_input):
        """(queries, keys, values), each [N, width]: the projections that share an input run as ONE matrix product
        (k and v always; q too in self-attention), whose wider output runs nearer the matmul peak than three products
        of 120 columns."""
        projections = (self.key, self.value) if query_input is not key_value_input else (self.query, self.key, self.value)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections])
        outputs = F.linear(key_value_input, weight, bias).split(self.query.out_features, dim=-1)
        if len(outputs) == 2:
            outputs = (self.query(query_input), *outputs)
        if self.inner_query is not None:
            outputs = tuple(layer(x) for layer, x in zip((self.inner_query, self.inner_key, self.inner_value), outputs))
        return outputs

    def forward(self, query_input, key_value_input, allowed, plan):
        """The real rows [N, d] of a batch (`plan`, a `MeritsTurnPlan`) -> [N, d]: the projections run on the N real
        turns, only the attention itself on [B, T] (`attend` serves the streaming steps on [B, 1, d])."""
        queries, keys, values = self._project(query_input, key_value_input)
        context = self._context(plan.scatter(queries), self._heads(plan.scatter(keys)), self._heads(plan.scatter(values)),
                                allowed)
        return self._out(plan.gather(context))


class MeritsCoAttentionBlock(nn.Module):
    """One block: symmetric cross-attention (text queries speech, speech queries text), residual + LayerNorm, then
    self-attention per stream, residual + LayerNorm (§3.6, §4.3)."""

    def __init__(self, config: MeritsConfig):
        super().__init__()
        d, eps = config.fusion_hidden_size, config.fusion_layer_norm_eps
        self.text_cross_attention = MeritsAttention(config)
        self.audio_cross_attention = MeritsAttention(config)
        self.text_self_attention = MeritsAttention(config)
        self.audio_self_attention = MeritsAttention(config)
        self.text_cross_norm = nn.LayerNorm(d, eps=eps)
        self.audio_cross_norm = nn.LayerNorm(d, eps=eps)
        self.text_self_norm = nn.LayerNorm(d, eps=eps)
        self.audio_self_norm = nn.LayerNorm(d, eps=eps)
        self.dropout = MeritsDropout(config.fusion_dropout)

    def forward(self, text, audio, text_allowed, audio_allowed, plan):
        """text/audio: the real rows [N, d] of the batch described by `plan` (see `MeritsAttention.forward`);
        `text_allowed` [B, Tq, Tk]: which text turns a query may attend (padding, missing text, causality)."""
        text_x = self.text_cross_attention(text, audio, audio_allowed, plan)
        audio_x = self.audio_cross_attention(audio, text, text_allowed, plan)
        text = self.text_cross_norm(text + self.dropout(text_x))
        audio = self.audio_cross_norm(audio + self.dropout(audio_x))
        text_s = self.text_self_attention(text, text, text_allowed, plan)
        audio_s = self.audio_self_attention(audio, audio, audio_allowed, plan)
        text = self.text_self_norm(text + self.dropout(text_s))
        audio = self.audio_self_norm(audio + self.dropout(audio_s))
        return text, audio

    def step(self, text, audio, text_allowed, audio_allowed, cache):
        """One new turn per stream: text/audio [B, 1, d]; *_allowed [B, 1, t] over all turns so far (incl. this one);
        `cache` holds the keys/values of the earlier turns. Returns (text, audio, new_cache)."""
        new_cache = {}
        for name, module, x in (
            ("text_cross", self.audio_cross_attention, text),  # text turns are keys of the speech queries
            ("audio_cross", self.text_cross_attention, audio),
        ):
            k, v = module.project_key_value(x)
            new_cache[name] = (torch.cat([cache[name][0], k], dim=2), torch.cat([cache[name][1], v], dim=2))
        text_x = self.text_cross_attention.attend(text, *new_cache["audio_cross"], audio_allowed)
        audio_x = self.audio_cross_attention.attend(audio, *new_cache["text_cross"], text_allowed)
        text = self.text_cross_norm(text + self.dropout(text_x))
        audio = self.audio_cross_norm(audio + self.dropout(audio_x))
        for name, module, x in (("text_self", self.text_self_attention, text), ("audio_self", self.audio_self_attention, audio)):
            k, v = module.project_key_value(x)
            new_cache[name] = (torch.cat([cache[name][0], k], dim=2), torch.cat([cache[name][1], v], dim=2))
        text_s = self.text_self_attention.attend(text, *new_cache["text_self"], text_allowed)
        audio_s = self.audio_self_attention.attend(audio, *new_cache["audio_self"], audio_allowed)
        text = self.text_self_norm(text + self.dropout(text_s))
        audio = self.audio_self_norm(audio + self.dropout(audio_s))
        return text, audio, new_cache


class MeritsCoAttentionFusion(nn.Module):
    """Co-attention fusion: Linear(D_t, d) / Linear(D_a, d) -> N co-attention blocks -> [+ Linear input skips
    (MiSTER-E)] -> LayerNorm(2d) -> Linear(2d, d') -> ReLU -> Linear(d', C).

    Key padding masks combine the real turns with the per-turn modality masks, so padding and a turn without audio
    (text) are never attended as audio (text). Inputs are zeroed at turns where their modality is absent.
    Returns (logits [B, T, C], text_repr [B, T, d], audio_repr [B, T, d]); the two representations are the pairs of
    the contrastive loss.
    """

    def __init__(self, config: MeritsConfig, text_input_size: int, audio_input_size: int):
        super().__init__()
        d = config.fusion_hidden_size
        self.causal = config.causal
        self.text_projection = nn.Linear(text_input_size, d)
        self.audio_projection = nn.Linear(audio_input_size, d)
        self.blocks = nn.ModuleList([MeritsCoAttentionBlock(config) for _ in range(config.fusion_num_blocks)])
        if config.fusion_input_skip:
            self.text_skip = nn.Linear(text_input_size, d)
            self.audio_skip = nn.Linear(audio_input_size, d)
        else:
            self.text_skip = self.audio_skip = None
        self.layer_norm = nn.LayerNorm(2 * d, eps=config.fusion_layer_norm_eps)
        self.dense = nn.Linear(2 * d, config.fusion_head_hidden_size)
        self.classifier = nn.Linear(config.fusion_head_hidden_size, config.num_labels)
        _mark_conversation_level(self)

    def _head(self, text_in, audio_in, text, audio):
        """Works on any leading shape: [B, T, .] while streaming, [N, .] real rows in `forward`."""
        if self.text_skip is not None:
            text = text + self.text_skip(text_in)
            audio = audio + self.audio_skip(audio_in)
        logits = self.classifier(torch.relu(self.dense(self.layer_norm(torch.cat([text, audio], dim=-1)))))
        return logits, text, audio

    def forward(self, text_inputs, audio_inputs, turn_mask, text_mask, audio_mask, plan=None):
        turn_mask = turn_mask.bool()
        text_mask, audio_mask = text_mask.bool() & turn_mask, audio_mask.bool() & turn_mask
        if plan is None:
            plan = MeritsTurnPlan(turn_mask)
        # everything but the attention itself runs on the N real turns only
        text_rows = plan.gather(text_inputs) * plan.gather(text_mask).unsqueeze(-1).to(text_inputs.dtype)
        audio_rows = plan.gather(audio_inputs) * plan.gather(audio_mask).unsqueeze(-1).to(audio_inputs.dtype)
        length = turn_mask.shape[1]
        text_allowed = text_mask[:, None, :].expand(-1, length, -1)
        audio_allowed = audio_mask[:, None, :].expand(-1, length, -1)
        if self.causal:
            past = causal_mask(length, turn_mask.device)
            text_allowed, audio_allowed = text_allowed & past, audio_allowed & past
        text, audio = self.text_projection(text_rows), self.audio_projection(audio_rows)
        for block in self.blocks:
            text, audio = block(text, audio, text_allowed, audio_allowed, plan)
        logits, text, audio = self._head(text_rows, audio_rows, text, audio)
        return plan.scatter(logits), plan.scatter(text), plan.scatter(audio)

    def init_state(self, batch_size, device, dtype):
        empty = lambda: torch.zeros(batch_size, self.blocks[0].text_self_attention.num_heads, 0,  # noqa: E731
                                    self.blocks[0].text_self_attention.head_dim, device=device, dtype=dtype)
        blocks = [{name: (empty(), empty()) for name in ("text_cross", "audio_cross", "text_self", "audio_self")}
                  for _ in self.blocks]
        mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return {"blocks": blocks, "text_mask": mask, "audio_mask": mask}

    def step(self, text_input, audio_input, text_present, audio_present, state):
        """One turn: text_input [B, D_t], audio_input [B, D_a], *_present [B] bool -> (logits [B, C], new_state)."""
        if not self.causal:
            raise ValueError("Streaming needs causal fusion (config.causal=True).")
        text_input = (text_input * text_present.unsqueeze(-1).to(text_input.dtype)).unsqueeze(1)
        audio_input = (audio_input * audio_present.unsqueeze(-1).to(audio_input.dtype)).unsqueeze(1)
        text_mask = torch.cat([state["text_mask"], text_present.bool().unsqueeze(1)], dim=1)
        audio_mask = torch.cat([state["audio_mask"], audio_present.bool().unsqueeze(1)], dim=1)
        text_allowed, audio_allowed = text_mask.unsqueeze(1), audio_mask.unsqueeze(1)  # [B, 1, t]
        text, audio = self.text_projection(text_input), self.audio_projection(audio_input)
        new_blocks = []
        for block, cache in zip(self.blocks, state["blocks"]):
            text, audio, cache = block.step(text, audio, text_allowed, audio_allowed, cache)
            new_blocks.append(cache)
        logits, text, audio = self._head(text_input, audio_input, text, audio)
        return logits[:, 0], {"blocks": new_blocks, "text_mask": text_mask, "audio_mask": audio_mask}


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


def _mark_conversation_level(module: nn.Module) -> None:
    """Flag every layer of a conversation-level module (context encoder, co-attention fusion, gate) for `_init_weights`."""
    for submodule in module.modules():
        submodule._conversation_level = True


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
