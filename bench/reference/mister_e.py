"""A faithful re-implementation of the MiSTER-E reference MoE training loop (papers.md §4.3).

This mirrors the authors' ``hierarchical_moe.py`` / ``train_moe.py`` (iiscleap/MiSTER-E @ bb4bff9)
*behaviour*, including its quirks, so that the benchmark compares our model against what the
released code actually does:

- conversations are zero-padded to the longest one in the batch, labels are -1 at the pads;
- no packing and no masking anywhere (GRUs, convolutions and attention all see the pads);
- focal loss with gamma 3 on the mixture and on the 3 experts, averaged over all B*T positions
  (pads contribute zeros to the mean);
- supervised contrastive loss (temperature 1) over all B*T rows of both modalities, pads included;
- symmetric KL between the 3 experts' softmaxes with ``reduction="batchmean"``, pads included;
- Adam lr 1e-5, gradient-norm clip 1.0, batch 8 conversations;
- the per-step extras of the authors' loop, which cost time but change nothing: the gate entropy (computed,
  unused), a softmax and a log-softmax of each side of every KL pair, the step's predictions and labels read back
  to the host and ``loss.item()``; the unused ``proj``/``classifier`` layers sit in the optimiser and the clip.

It is written independently (it is not a copy) and only depends on torch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceGRUExpert(nn.Module):
    """Context expert: conv 1/3/5 over the utterance axis, 3-layer Bi-GRU, linear skip from the input."""

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 512, num_classes: int = 6, num_layers: int = 3):
        super().__init__()
        width = 2 * hidden_dim
        self.conv1 = nn.Conv1d(input_dim, width, kernel_size=1)
        self.conv3 = nn.Conv1d(input_dim, width, kernel_size=3, padding=1)
        self.conv5 = nn.Conv1d(input_dim, width, kernel_size=5, padding=2)
        self.gru = nn.GRU(width, hidden_dim, num_layers=num_layers, bidirectional=True, batch_first=True)
        self.skip = nn.Linear(input_dim, width)
        self.classifier = nn.Linear(width, num_classes)
        self.dropout = nn.Dropout(0.2)  # declared but never applied, as in the reference

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels_first = x.transpose(1, 2)  # [B, D, T]
        conv = F.relu(self.conv1(channels_first)) + F.relu(self.conv3(channels_first)) + F.relu(self.conv5(channels_first))
        hidden, _ = self.gru(conv.transpose(1, 2))  # no packing: the pads run through the GRU
        hidden = hidden + self.skip(x)
        return hidden, self.classifier(hidden)


class ReferenceCrossAttentionBlock(nn.Module):
    """One co-attention block: cross-attention in both directions, then self-attention, on [T, B, d]."""

    def __init__(self, dim: int = 1024, attention_dim: int = 120, num_heads: int = 3):
        super().__init__()

        def proj() -> nn.Linear:
            return nn.Linear(dim, attention_dim)

        # cross-attention projections (text queries speech, speech queries text)
        self.text_q, self.text_k, self.text_v = proj(), proj(), proj()
        self.audio_q, self.audio_k, self.audio_v = proj(), proj(), proj()
        # self-attention projections
        self.text_q_self, self.text_k_self, self.text_v_self = proj(), proj(), proj()
        self.audio_q_self, self.audio_k_self, self.audio_v_self = proj(), proj(), proj()

        self.text_cross_attention = nn.MultiheadAttention(attention_dim, num_heads, dropout=0.1)
        self.audio_cross_attention = nn.MultiheadAttention(attention_dim, num_heads, dropout=0.1)
        self.text_self_attention = nn.MultiheadAttention(attention_dim, num_heads, dropout=0.1)
        self.audio_self_attention = nn.MultiheadAttention(attention_dim, num_heads, dropout=0.1)

        self.text_out = nn.Linear(attention_dim, dim)
        self.audio_out = nn.Linear(attention_dim, dim)
        self.text_out_self = nn.Linear(attention_dim, dim)
        self.audio_out_self = nn.Linear(attention_dim, dim)
        self.dropout = nn.Dropout(0.5)
        self.text_norm = nn.LayerNorm(dim, eps=1e-6)
        self.audio_norm = nn.LayerNorm(dim, eps=1e-6)
        self.text_norm_self = nn.LayerNorm(dim, eps=1e-6)
        self.audio_norm_self = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, audio: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # cross: no key-padding mask, as in the reference
        text_cross = self.text_cross_attention(self.text_q(text), self.audio_k(audio), self.audio_v(audio), need_weights=False)[0]
        audio_cross = self.audio_cross_attention(self.audio_q(audio), self.text_k(text), self.text_v(text), need_weights=False)[0]
        text = self.text_norm(text + self.dropout(self.text_out(text_cross)))
        audio = self.audio_norm(audio + self.dropout(self.audio_out(audio_cross)))
        # self
        text_self = self.text_self_attention(self.text_q_self(text), self.text_k_self(text), self.text_v_self(text), need_weights=False)[0]
        audio_self = self.audio_self_attention(self.audio_q_self(audio), self.audio_k_self(audio), self.audio_v_self(audio), need_weights=False)[0]
        text = self.text_norm_self(text + self.dropout(self.text_out_self(text_self)))
        audio = self.audio_norm_self(audio + self.dropout(self.audio_out_self(audio_self)))
        return text, audio


class ReferenceFusionExpert(nn.Module):
    """Cross-modal expert: input projections, N co-attention blocks, linear skips, LN-MLP head."""

    def __init__(self, input_dim: int = 2048, num_blocks: int = 4, num_classes: int = 6, dim: int = 1024):
        super().__init__()
        self.audio_in = nn.Linear(input_dim, dim)
        self.text_in = nn.Linear(input_dim, dim)
        self.audio_skip = nn.Linear(input_dim, dim)
        self.text_skip = nn.Linear(input_dim, dim)
        self.blocks = nn.ModuleList(ReferenceCrossAttentionBlock(dim, 120, 3) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(2 * dim, eps=1e-6)
        self.hidden = nn.Linear(2 * dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, audio_in: torch.Tensor, text_in: torch.Tensor):
        audio = self.audio_in(audio_in).transpose(0, 1)  # [T, B, d]: sequence-first attention
        text = self.text_in(text_in).transpose(0, 1)
        for block in self.blocks:
            text, audio = block(audio, text)
        audio = audio.transpose(0, 1) + self.audio_skip(audio_in)
        text = text.transpose(0, 1) + self.text_skip(text_in)
        joint = self.norm(torch.cat([text, audio], dim=-1))
        logits = self.classifier(F.relu(self.hidden(joint)))
        return audio, text, logits


def symmetric_kl(stacked_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over expert pairs of KL(p_i||p_j)+KL(p_j||p_i), ``batchmean`` over [B, T, C] (pads included)."""
    num_experts = stacked_logits.shape[2]
    total, pairs = 0.0, 0
    for i in range(num_experts):
        for j in range(i + 1, num_experts):
            p, q = stacked_logits[:, :, i] / temperature, stacked_logits[:, :, j] / temperature
            # log-softmax AND softmax of each side, as the authors' compute_symmetric_kl computes them
            log_p, log_q = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
            total = total + F.kl_div(log_p, F.softmax(q, dim=-1), reduction="batchmean") + F.kl_div(log_q, F.softmax(p, dim=-1), reduction="batchmean")
            pairs += 1
    return total / pairs


class ReferenceAttentionMoE(nn.Module):
    """Speech expert + text expert + cross-modal expert, mixed per utterance by a logit gate (tau = 2)."""

    def __init__(self, input_dim: int = 2048, num_classes: int = 6, hidden_dim: int = 512, fusion_dim: int = 1024, num_blocks: int = 4):
        super().__init__()
        self.audio_expert = ReferenceGRUExpert(input_dim, hidden_dim, num_classes)
        self.text_expert = ReferenceGRUExpert(input_dim, hidden_dim, num_classes)
        self.fusion_expert = ReferenceFusionExpert(input_dim, num_blocks, num_classes, fusion_dim)
        self.gate = nn.Sequential(nn.Linear(3 * num_classes, 10), nn.ReLU(), nn.Linear(10, 3))
        self.temperature = 2.0
        # present but unused in the reference forward
        self.proj = nn.Linear(fusion_dim, 768)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, audio: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        _, audio_logits = self.audio_expert(audio)
        _, text_logits = self.text_expert(text)
        audio_pair, text_pair, fusion_logits = self.fusion_expert(audio, text)
        weights = F.softmax(self.gate(torch.cat([audio_logits, text_logits, fusion_logits], dim=-1)) / self.temperature, dim=-1)
        entropy = -torch.sum(weights * torch.log(weights + 1e-8), dim=-1).mean()  # computed, unused, as in the reference
        stacked = torch.stack([audio_logits, text_logits, fusion_logits], dim=-2)  # [B, T, 3, C]
        mixture = (weights.unsqueeze(-1) * stacked).sum(dim=-2)
        return {
            "logits": mixture,
            "audio_logits": audio_logits,
            "text_logits": text_logits,
            "fusion_logits": fusion_logits,
            "audio_pair": audio_pair,
            "text_pair": text_pair,
            "kl": symmetric_kl(stacked),
            "gate_weights": weights,
            "gate_entropy": entropy,
        }


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 3.0) -> torch.Tensor:
    """Focal loss averaged over *all* B*T positions; pads (label -1) add zeros to the mean."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-1, reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


def supcon_loss(audio: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SupCon over the 2*B*T rows of both views; positives = same label (pads, label -1, included)."""
    dim = audio.shape[-1]
    flat_labels = labels.reshape(-1)
    reps = torch.cat([F.normalize(audio.reshape(-1, dim), dim=-1), F.normalize(text.reshape(-1, dim), dim=-1)], dim=0)
    all_labels = torch.cat([flat_labels, flat_labels], dim=0)
    similarity = reps @ reps.T / temperature
    not_self = ~torch.eye(reps.shape[0], dtype=torch.bool, device=reps.device)
    positives = (all_labels.unsqueeze(0) == all_labels.unsqueeze(1)) & not_self
    log_prob = similarity - torch.log((torch.exp(similarity) * not_self.float()).sum(dim=1, keepdim=True) + 1e-12)
    mean_log_prob_pos = (log_prob * positives.float()).sum(dim=1) / (positives.sum(dim=1) + 1e-12)
    return -mean_log_prob_pos.mean()


def moe_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, supcon_weight: float = 2.0, kl_weight: float = 0.1) -> torch.Tensor:
    """Total = focal(mixture) + focal(speech) + focal(text) + focal(fusion) + 2 SupCon + 0.1 KL."""
    loss = focal_loss(outputs["logits"], labels)
    loss = loss + focal_loss(outputs["audio_logits"], labels) + focal_loss(outputs["text_logits"], labels) + focal_loss(outputs["fusion_logits"], labels)
    loss = loss + supcon_weight * supcon_loss(outputs["audio_pair"], outputs["text_pair"], labels)
    return loss + kl_weight * outputs["kl"]


def pad_batch(conversations: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad ``[{"audio": [T, D], "text": [T, D], "labels": [T]}, ...]`` to the longest; labels -1 at pads."""
    longest = max(len(c["labels"]) for c in conversations)
    dim_a = conversations[0]["audio"].shape[-1]
    dim_t = conversations[0]["text"].shape[-1]
    audio = torch.zeros(len(conversations), longest, dim_a)
    text = torch.zeros(len(conversations), longest, dim_t)
    labels = torch.full((len(conversations), longest), -1, dtype=torch.long)
    for i, conv in enumerate(conversations):
        n = len(conv["labels"])
        audio[i, :n] = torch.as_tensor(conv["audio"])
        text[i, :n] = torch.as_tensor(conv["text"])
        labels[i, :n] = torch.as_tensor(conv["labels"])
    return audio, text, labels


def make_optimizer(model: nn.Module, lr: float = 1e-5) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model: ReferenceAttentionMoE, optimizer: torch.optim.Optimizer, audio, text, labels) -> float:
    """One reference step as `train_moe.py` takes it: forward, the summed losses, the step's predictions and labels
    read back to the host (its running training accuracy), `loss.item()`, backward, clip to 1.0, Adam step."""
    model.train()
    model.zero_grad()
    outputs = model(audio, text)
    loss = moe_loss(outputs, labels)
    predictions = outputs["logits"].argmax(-1).detach().cpu().reshape(-1).tolist()  # noqa: F841 - the per-step readback
    gold = labels.detach().cpu().reshape(-1).tolist()  # noqa: F841
    float(loss.detach())
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: ReferenceAttentionMoE, audio, text, labels) -> tuple[list[int], list[int]]:
    """Argmax of the mixture; pads dropped afterwards (as the reference does before its wF1)."""
    model.eval()
    pred = model(audio, text)["logits"].argmax(-1).reshape(-1)
    gold = labels.reshape(-1)
    keep = gold >= 0
    return pred[keep].tolist(), gold[keep].tolist()
