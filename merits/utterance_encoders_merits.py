# coding=utf-8
"""Stage I: the utterance encoders, one vector + logits per utterance.

Shipped to the Hugging Face Hub as remote code (flat, next to `modeling_merits.py`): imports only torch, transformers
and its siblings. `MeritsTextEncoder` (any `AutoModel` text backbone, RoBERTa-FT §3.3 or the MiSTER-E LLM encoders
§4.2, with `MeritsAttentiveStatisticsPooling` §4.2) and `MeritsSpeechEncoder` (a frozen speech backbone or precomputed
features, layers mixed as CARE does, the light head of §2.3 / §3.4), with the helpers that make a batched pass of a
wav2vec2-family backbone exact and fast (`batch_friendly`, `masked_group_norm`). Section numbers refer to
`shared/spec/papers.md`.
"""

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from .whisper_encoder_merits import is_whisper_encoder, whisper_encoder_own_frames
from .configuration_merits import MeritsConfig, _backbone_hidden_size, speech_backbone_layers
from .common_merits import MeritsDropout, masked_softmax


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


__all__ = [
    "MeritsAttentiveStatisticsPooling",
    "MeritsSpeechEncoder",
    "MeritsTextEncoder",
    "batch_friendly",
    "masked_group_norm",
]
