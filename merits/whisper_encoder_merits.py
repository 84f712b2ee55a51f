"""The Whisper encoder on each clip's own mel frames (shipped to the Hub; imports only torch).

transformers' ``WhisperEncoder`` insists on 30 s of mel frames (3000): a 2-5 s utterance padded to 30 s costs 6-15x
the compute, and its padding frames take part in every attention. Whisper was trained on 30 s windows, but its
encoder is a convolutional front end + absolute positional embeddings + self-attention, so a clip of L mel frames can
run on exactly those frames with the first ceil(L/2) positional embeddings (what openai-whisper's own encoder would do
with a shorter input if it did not assert the length). Several clips run as one padded batch with

- the padded mel frames zeroed (conv1 then sees the zeros its own padding would give at the clip's end),
- conv1's output zeroed at padded frames (the same for conv2),
- padded positions masked out of every attention as keys,

which gives each clip's real frames the values of running that clip alone (tests/test_real_models.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_whisper_encoder(module) -> bool:
    return type(module).__name__ == "WhisperEncoder" and hasattr(module, "conv2") and hasattr(module, "embed_positions")


def encoder_frame_mask(feature_mask: torch.Tensor, frames: int) -> torch.Tensor:
    """Mel-frame mask [N, F] -> encoder-frame mask [N, frames] (conv2 has stride 2: frame j covers mel 2j)."""
    return feature_mask[:, ::2][:, :frames].bool()


def whisper_encoder_own_frames(encoder, input_features: torch.Tensor, feature_mask: torch.Tensor | None = None,
                               trim: bool = True):
    """Run a transformers ``WhisperEncoder`` on each clip's own frames.

    Args:
        encoder: ``WhisperEncoder`` (``WhisperModel.get_encoder()``).
        input_features: [N, n_mels, F] log-mel frames, any F up to 2 x max_source_positions.
        feature_mask: [N, F], 1 at a clip's real mel frames (None: every frame is real).
        trim: drop the frames that are padding in every clip first (a 30 s-padded batch of short clips runs on
            its longest clip's frames only).

    Returns:
        (hidden_states, frame_mask): the encoder's hidden states as transformers reports them (the embeddings,
        every layer's output, the last one after the final layer norm), each [N, T, d_model], and the
        encoder-frame mask [N, T] (bool).
    """
    n, _, length = input_features.shape
    if feature_mask is None:
        feature_mask = torch.ones(n, length, dtype=torch.bool, device=input_features.device)
    feature_mask = feature_mask.bool()
    if feature_mask.shape != (n, length):
        raise ValueError(f"feature_mask has shape {tuple(feature_mask.shape)}, expected {(n, length)}")
    lengths = feature_mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"clip {int(torch.nonzero(lengths == 0)[0])} has no mel frame")
    if trim:
        keep = int(lengths.max())
        keep += keep % 2  # an even count keeps conv2's stride-2 grid
        keep = min(keep, length)
        input_features, feature_mask = input_features[..., :keep], feature_mask[:, :keep]
    max_frames = encoder.embed_positions.weight.shape[0] * encoder.conv1.stride[0] * encoder.conv2.stride[0]
    if input_features.shape[-1] > max_frames:
        raise ValueError(f"{input_features.shape[-1]} mel frames are more than this encoder's {max_frames}")
    ragged = not bool(feature_mask.all())
    dtype = input_features.dtype
    mel_mask = feature_mask.unsqueeze(1).to(dtype)
    x = input_features * mel_mask if ragged else input_features
    x = F.gelu(encoder.conv1(x))
    if ragged:
        x = x * mel_mask
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)  # [N, T, d]
    frames = x.shape[1]
    frame_mask = encoder_frame_mask(feature_mask, frames)
    hidden = x + encoder.embed_positions.weight[:frames].to(x.dtype)
    hidden = F.dropout(hidden, p=encoder.dropout, training=encoder.training)
    attention_mask = None
    if ragged:
        attention_mask = torch.zeros(n, 1, 1, frames, dtype=hidden.dtype, device=hidden.device)
        attention_mask.masked_fill_(~frame_mask[:, None, None, :], torch.finfo(hidden.dtype).min)
    states = [hidden]
    for layer in encoder.layers:
        hidden = layer(hidden, attention_mask)
        if isinstance(hidden, tuple):  # older transformers return (hidden_states, ...)
            hidden = hidden[0]
        states.append(hidden)
    states[-1] = encoder.layer_norm(hidden)
    return tuple(states), frame_mask
