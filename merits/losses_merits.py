# coding=utf-8
"""The loss functions of MERITS-L and MiSTER-E, masked over the real turns without host-device syncs.

Shipped to the Hugging Face Hub as remote code (flat, next to `modeling_merits.py`): imports only torch and its
siblings. `focal_loss` (the classification loss of every stage, cross-entropy at gamma 0; padding and unlabelled turns
left out, §6 #14), `supervised_contrastive_loss` (MiSTER-E SupCon between the paired speech / text representations of
the cross-modal expert, §4.3) and `symmetric_kl_loss` (MiSTER-E agreement between the experts, §4.3). Section numbers
refer to `shared/spec/papers.md`.
"""

import torch
import torch.nn.functional as F

from .common_merits import float32_region


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

__all__ = ["focal_loss", "supervised_contrastive_loss", "symmetric_kl_loss"]
