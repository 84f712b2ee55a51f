# coding=utf-8
"""Shared pieces of the MERITS-L / MiSTER-E model files: the dropout, the model output and small helpers.

Shipped to the Hugging Face Hub as remote code (flat, next to `modeling_merits.py`): imports only torch and
transformers. Holds `MeritsDropout`, `MeritsConversationClassifierOutput` (every head of every stage: Stage I
utterance, Stage II context §3.5 / MiSTER-E experts §4.3, Stage III fusion §3.6, the gate weights), the masked
softmax, the causal mask, the turn-mask checks and scattering (real turns first, §6), the flag that marks the
conversation-level modules for their weight init, and the `init` import shim. Section numbers refer to
`shared/spec/papers.md`.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.utils import ModelOutput


# `init`: the weight-init functions of `MeritsPreTrainedModel` (modeling_merits.py imports them from here)
try:  # transformers >= 5: init functions that respect already-loaded weights
    from transformers import initialization as init  # noqa: F401
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init  # noqa: F401


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


def _mark_conversation_level(module: nn.Module) -> None:
    """Flag every layer of a conversation-level module (context encoder, co-attention fusion, gate) for `_init_weights`."""
    for submodule in module.modules():
        submodule._conversation_level = True


__all__ = [
    "MeritsConversationClassifierOutput",
    "MeritsDropout",
    "causal_mask",
    "check_turn_mask",
    "float32_region",
    "masked_softmax",
    "scatter_turns",
]
