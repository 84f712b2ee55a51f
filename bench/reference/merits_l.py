"""A faithful re-implementation of the MERITS-L reference Stage II and Stage III modules (papers.md §3.5-§3.6).

Stage II follows the authors' ICASSP'22 code (iiscleap/multimodal_emotion_recognition,
``model_lstm_tranformers.py``: ``GRUModel`` with self-attention), quirks included:

- ``nn.GRU(D_in, H, num_layers=2, bidirectional=True)`` on zero-padded conversations, no packing;
- each direction's half is projected by its own Linear(H, H); unscaled dot-product scores over the
  utterances, softmax over **dim=1** (the query axis: the quirk), no padding mask;
- the declared Dropout(0.2) is never applied; loss = CE over each conversation's real turns,
  averaged over the conversations of the batch.

Stage III uses the authors' later co-attention block (MiSTER-E ``FusionModel`` without its skip from
the utterance embeddings, as §3.6 describes) on the frozen Stage II sequences, no padding mask, CE.
Both stages: AdamW (§3.1, §3.7), the same batch as ours.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mister_e import ReferenceCrossAttentionBlock


class ReferenceBiGRUSelfAttention(nn.Module):
    """Stage II context encoder of one modality (ICASSP'22 ``GRUModel``)."""

    def __init__(self, input_dim: int, hidden_dim: int, num_classes: int, num_layers: int = 2):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gru = nn.GRU(input_dim, hidden_dim, num_layers=num_layers, bidirectional=True, batch_first=True)
        self.attention_forward = nn.Linear(hidden_dim, hidden_dim)
        self.attention_backward = nn.Linear(hidden_dim, hidden_dim)
        self.classifier = nn.Linear(2 * hidden_dim, num_classes)
        self.dropout = nn.Dropout(0.2)  # declared, never applied

    def attention(self, hidden: torch.Tensor) -> torch.Tensor:
        forward_half = self.attention_forward(hidden[..., : self.hidden_dim])
        backward_half = self.attention_backward(hidden[..., self.hidden_dim :])
        out = []
        for half in (forward_half, backward_half):
            scores = torch.bmm(half, half.transpose(1, 2))  # unscaled, unmasked
            out.append(torch.bmm(F.softmax(scores, dim=1), half))  # softmax over dim=1, as in the code
        return torch.cat(out, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.gru(x)
        features = self.attention(hidden)
        return features, self.classifier(features)


class ReferenceCoAttentionFusion(nn.Module):
    """Stage III: Linear in, N co-attention blocks on [T, B, d], LN(concat) -> Linear -> ReLU -> Linear."""

    def __init__(self, audio_dim: int, text_dim: int, num_classes: int, dim: int = 1024, num_blocks: int = 4):
        super().__init__()
        self.audio_in = nn.Linear(audio_dim, dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(ReferenceCrossAttentionBlock(dim, 120, 3) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(2 * dim, eps=1e-6)
        self.hidden = nn.Linear(2 * dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, audio_context: torch.Tensor, text_context: torch.Tensor) -> torch.Tensor:
        audio = self.audio_in(audio_context).transpose(0, 1)
        text = self.text_in(text_context).transpose(0, 1)
        for block in self.blocks:
            text, audio = block(audio, text)
        joint = self.norm(torch.cat([text.transpose(0, 1), audio.transpose(0, 1)], dim=-1))
        return self.classifier(F.relu(self.hidden(joint)))


def conversation_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ICASSP'22 loss: CE over each conversation's real turns, then the mean over conversations."""
    total = 0.0
    for b in range(logits.shape[0]):
        n = int((labels[b] >= 0).sum())
        total = total + F.cross_entropy(logits[b, :n], labels[b, :n])
    return total / logits.shape[0]


class ReferenceMeritsL(nn.Module):
    """Both Stage II encoders and the Stage III fusion, trained one stage at a time."""

    def __init__(self, text_dim: int, audio_dim: int, num_classes: int, text_hidden: int = 512, audio_hidden: int = 512,
                 fusion_dim: int = 1024, fusion_blocks: int = 4):
        super().__init__()
        self.text_context = ReferenceBiGRUSelfAttention(text_dim, text_hidden, num_classes)
        self.audio_context = ReferenceBiGRUSelfAttention(audio_dim, audio_hidden, num_classes)
        self.fusion = ReferenceCoAttentionFusion(2 * audio_hidden, 2 * text_hidden, num_classes, fusion_dim, fusion_blocks)

    def stage_parameters(self, stage: str):
        if stage == "context":
            return list(self.text_context.parameters()) + list(self.audio_context.parameters())
        if stage == "fusion":
            return list(self.fusion.parameters())
        raise ValueError(f"unknown stage {stage!r} (expected 'context' or 'fusion')")

    def forward(self, audio: torch.Tensor, text: torch.Tensor, stage: str) -> dict[str, torch.Tensor]:
        if stage == "context":
            _, text_logits = self.text_context(text)
            _, audio_logits = self.audio_context(audio)
            return {"text_logits": text_logits, "audio_logits": audio_logits, "logits": text_logits}
        # Stage III: the Stage II encoders are frozen (computed without a graph, eval mode)
        self.text_context.eval()
        self.audio_context.eval()
        with torch.no_grad():
            text_features, _ = self.text_context(text)
            audio_features, _ = self.audio_context(audio)
        return {"logits": self.fusion(audio_features, text_features)}


def make_optimizer(model: ReferenceMeritsL, stage: str, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.stage_parameters(stage), lr=lr)


def train_step(model: ReferenceMeritsL, optimizer: torch.optim.Optimizer, audio, text, labels, stage: str) -> float:
    model.train()
    optimizer.zero_grad()
    out = model(audio, text, stage)
    if stage == "context":
        loss = conversation_ce(out["text_logits"], labels) + conversation_ce(out["audio_logits"], labels)
    else:
        loss = conversation_ce(out["logits"], labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model: ReferenceMeritsL, audio, text, labels, stage: str, modality: str = "text") -> tuple[list[int], list[int]]:
    """Argmax per real turn. Stage II reports ``modality``'s context head; Stage III the fusion head."""
    model.eval()
    out = model(audio, text, stage)
    logits = out[f"{modality}_logits"] if stage == "context" else out["logits"]
    pred = logits.argmax(-1).reshape(-1)
    gold = labels.reshape(-1)
    keep = gold >= 0
    return pred[keep].tolist(), gold[keep].tolist()
