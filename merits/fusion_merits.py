# coding=utf-8
"""Stage III: co-attention fusion of the text and speech streams (MERITS-L §3.6; the MiSTER-E cross-modal expert §4.3).

Shipped to the Hugging Face Hub as remote code (flat, next to `modeling_merits.py`): imports only torch and its
siblings. `MeritsAttention` (multi-head attention over turns), `MeritsCoAttentionBlock` (cross-attention then
self-attention per stream) and `MeritsCoAttentionFusion` (the blocks and the fusion head; its two representations are
the pairs of the MiSTER-E SupCon loss). Section numbers refer to `shared/spec/papers.md`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_merits import MeritsConfig
from .common_merits import MeritsDropout, _mark_conversation_level, causal_mask, masked_softmax
from .context_merits import MeritsTurnPlan


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


__all__ = ["MeritsAttention", "MeritsCoAttentionBlock", "MeritsCoAttentionFusion"]
