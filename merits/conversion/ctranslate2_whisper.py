"""CTranslate2 (faster-whisper) Whisper checkpoints -> transformers ``WhisperForConditionalGeneration``
and openai-whisper ``{"dims", "model_state_dict"}`` checkpoints.

A CTranslate2 model folder holds ``model.bin`` (the variables), ``config.json`` (suppress ids, language ids,
alignment heads), ``tokenizer.json`` (the Hugging Face tokenizer) and ``vocabulary.txt``. ``model.bin`` is read
here directly (the ``ctranslate2`` package is not needed): a little-endian stream of

    uint32 binary version (>= 5), string spec name, uint32 spec revision, uint32 variable count,
    per variable: string name, uint8 rank, uint32 dims[rank], uint8 dtype id, uint32 byte count, bytes,
    uint32 alias count, per alias: string alias, string target,

where a string is a uint16 length (including a trailing NUL) and the bytes. Weights stay in their stored
dtype until the caller asks for another (``dtype=``); a float16 checkpoint converted to float32 is the float16
values exactly.

Layout mapping (CTranslate2's own transformers converter, inverted): self-attention ``linear_0`` is the fused
[q; k; v] projection (k's bias is stored as zeros: Whisper's key projection has none), cross-attention
``linear_0`` is q and ``linear_1`` the fused [k; v], the last linear is the output projection; ``ffn/linear_0``
and ``ffn/linear_1`` are fc1 and fc2; ``decoder/projection`` is an alias of the token embedding (tied).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

#: CTranslate2's DataType enum order (include/ctranslate2/types.h).
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file and the variable."""


@dataclass
class CTranslate2Model:
    """The variables of a CTranslate2 ``model.bin``."""

    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ConversionError(f"CTranslate2 model ({self.spec}) has no variable {name!r}")
        return self.variables[name]


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_ctranslate2_model(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CTranslate2Model:
    """Reads a CTranslate2 ``model.bin`` (or its parts, concatenated in the order given)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names = ", ".join(str(p) for p in paths)
    data = b"".join(Path(p).read_bytes() for p in paths)
    offset = 0

    def take(fmt: str):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise ConversionError(f"{names}: truncated CTranslate2 model (ends at byte {len(data)})")
        value = struct.unpack_from(fmt, data, offset)
        offset += size
        return value[0] if len(value) == 1 else value

    def take_string() -> str:
        nonlocal offset
        length = take("<H")
        raw = data[offset: offset + length]
        if len(raw) != length or not raw.endswith(b"\0"):
            raise ConversionError(f"{names}: malformed string at byte {offset}")
        offset += length
        return raw[:-1].decode("utf-8")

    version = take("<I")
    if version < 5 or version > 6:
        raise ConversionError(f"{names}: CTranslate2 binary version {version} is not supported (5 or 6)")
    spec = take_string()
    revision = take("<I")
    count = take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = take_string()
        rank = take("<B")
        shape = tuple(take("<I") for _ in range(rank))
        type_id = take("<B")
        num_bytes = take("<I")
        if type_id >= len(_DTYPES):
            raise ConversionError(f"{names}: variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        raw = data[offset: offset + num_bytes]
        if len(raw) != num_bytes:
            raise ConversionError(f"{names}: variable {name!r} is truncated")
        offset += num_bytes
        if dtype == "bfloat16":
            array = _bfloat16_to_float32(np.frombuffer(raw, dtype="<u2"))
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        expected = int(np.prod(shape)) if shape else 1
        if array.size != expected:
            raise ConversionError(f"{names}: variable {name!r} has {array.size} values for shape {shape}")
        variables[name] = array.reshape(shape)
    aliases = {}
    for _ in range(take("<I")):
        alias = take_string()
        aliases[alias] = take_string()
    if offset != len(data):
        raise ConversionError(f"{names}: {len(data) - offset} trailing bytes after the CTranslate2 model")
    return CTranslate2Model(spec, revision, version, variables, aliases)


def write_ctranslate2_model(path: str | os.PathLike, spec: str, revision: int, variables: dict[str, np.ndarray],
                            aliases: dict[str, str] | None = None) -> None:
    """Writes variables in CTranslate2's ``model.bin`` layout (binary version 6); used to build test models."""

    def string(value: str) -> bytes:
        raw = value.encode("utf-8")
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = [struct.pack("<I", 6), string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value)
        if value.dtype == np.bool_:
            value = value.astype(np.int8)
        out += [string(name), struct.pack("<B", value.ndim)] + [struct.pack("<I", d) for d in value.shape]
        out += [struct.pack("<B", _DTYPES.index(value.dtype.name)), struct.pack("<I", value.nbytes),
                np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    Path(path).write_bytes(b"".join(out))


# ----------------------------------------------------------------------------------------------------------
# sizes and state dicts


def _count_layers(model: CTranslate2Model, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    layers = {int(m.group(1)) for m in map(pattern.match, model.variables) if m}
    if layers != set(range(len(layers))):
        raise ConversionError(f"{prefix} layers are not numbered 0..n-1: {sorted(layers)}")
    return len(layers)


def whisper_sizes(model: CTranslate2Model) -> dict:
    """The architecture sizes stored in a CTranslate2 Whisper model (what ``WhisperConfig`` needs)."""
    if model.spec != "WhisperSpec":
        raise ConversionError(f"not a CTranslate2 Whisper model: spec {model.spec!r}")
    conv1 = model.get("encoder/conv1/weight")
    embeddings = model.get("decoder/embeddings/weight")
    return dict(
        num_mel_bins=int(conv1.shape[1]),
        d_model=int(conv1.shape[0]),
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=int(model.get("encoder/num_heads")),
        decoder_attention_heads=int(model.get("decoder/num_heads")),
        encoder_ffn_dim=int(model.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(model.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(model.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.get("decoder/position_encodings/encodings").shape[0]),
        vocab_size=int(embeddings.shape[0]),
    )


def _split(array: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise ConversionError(f"{name}: first dimension {array.shape[0]} does not split into {parts}")
    return np.split(array, parts, axis=0)


def to_transformers_state_dict(model: CTranslate2Model) -> dict[str, np.ndarray]:
    """``WhisperForConditionalGeneration`` state dict (names without the tied ``proj_out``)."""
    sizes = whisper_sizes(model)
    state: dict[str, np.ndarray] = {}
    v = model.get

    def linear(dst: str, src: str, bias: bool = True):
        state[f"{dst}.weight"] = v(f"{src}/weight")
        if bias:
            state[f"{dst}.bias"] = v(f"{src}/bias")

    def norm(dst: str, src: str):
        state[f"{dst}.weight"] = v(f"{src}/gamma")
        state[f"{dst}.bias"] = v(f"{src}/beta")

    def fused(dst_names: Iterable[str], src: str):
        dst_names = list(dst_names)
        weights = _split(v(f"{src}/weight"), len(dst_names), src)
        biases = _split(v(f"{src}/bias"), len(dst_names), src)
        for dst, weight, bias in zip(dst_names, weights, biases):
            state[f"{dst}.weight"] = weight
            if dst.endswith("k_proj"):
                if np.any(bias != 0):
                    raise ConversionError(f"{src}: the key projection has a non-zero bias; Whisper's has none")
            else:
                state[f"{dst}.bias"] = bias

    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        linear(f"{e}.conv{i}", f"encoder/conv{i}")
    state[f"{e}.embed_positions.weight"] = v("encoder/position_encodings/encodings")
    for i in range(sizes["encoder_layers"]):
        src, dst = f"encoder/layer_{i}", f"{e}.layers.{i}"
        fused([f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], f"{src}/self_attention/linear_0")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm(f"{e}.layer_norm", "encoder/layer_norm")

    state[f"{d}.embed_tokens.weight"] = v("decoder/embeddings/weight")
    state[f"{d}.embed_positions.weight"] = v("decoder/position_encodings/encodings")
    for i in range(sizes["decoder_layers"]):
        src, dst = f"decoder/layer_{i}", f"{d}.layers.{i}"
        fused([f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], f"{src}/self_attention/linear_0")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        fused([f"{dst}.encoder_attn.q_proj"], f"{src}/attention/linear_0")
        fused([f"{dst}.encoder_attn.{p}" for p in ("k_proj", "v_proj")], f"{src}/attention/linear_1")
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm(f"{d}.layer_norm", "decoder/layer_norm")

    projection = model.aliases.get("decoder/projection/weight")
    if projection is None and "decoder/projection/weight" in model.variables:
        if not np.array_equal(model.variables["decoder/projection/weight"], v("decoder/embeddings/weight")):
            raise ConversionError("decoder/projection/weight differs from the token embedding (Whisper ties them)")
    return state


# ----------------------------------------------------------------------------------------------------------
# tokens, configs, folders


def _special_token_ids(tokenizer_json: dict) -> dict[str, int]:
    return {token["content"]: int(token["id"]) for token in tokenizer_json.get("added_tokens", [])}


def whisper_config_dicts(model: CTranslate2Model, ct2_config: dict, tokenizer_json: dict) -> tuple[dict, dict]:
    """(``WhisperConfig`` kwargs, ``GenerationConfig`` kwargs) from the CTranslate2 model and its files."""
    sizes = whisper_sizes(model)
    special = _special_token_ids(tokenizer_json)
    required = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    missing = [t for t in required if t not in special]
    if missing:
        raise ConversionError(f"tokenizer.json lacks the special tokens {missing}")
    eot, sot, no_ts = (special[t] for t in required)
    lang_ids = set(ct2_config.get("lang_ids") or [])
    lang_to_id = {tok: i for tok, i in special.items() if i in lang_ids}
    multilingual = sizes["vocab_size"] >= 51865
    suppress = list(ct2_config.get("suppress_ids") or [])
    begin_suppress = list(ct2_config.get("suppress_ids_begin") or [])
    config = dict(
        sizes,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        architectures=["WhisperForConditionalGeneration"],
    )
    generation = dict(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=sizes["max_target_positions"],
        no_timestamps_token_id=no_ts,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        is_multilingual=multilingual,
        alignment_heads=[list(map(int, pair)) for pair in ct2_config.get("alignment_heads") or []],
        return_timestamps=False,
    )
    if "<|startofprev|>" in special:
        generation["prev_sot_token_id"] = special["<|startofprev|>"]
    if multilingual:
        generation["lang_to_id"] = lang_to_id
        generation["task_to_id"] = {task: special[f"<|{task}|>"] for task in ("transcribe", "translate")
                                    if f"<|{task}|>" in special}
    # the first timestamp may be at most 1 s (openai-whisper's max_initial_timestamp)
    generation["max_initial_timestamp_index"] = 50
    return config, generation


def convert_ctranslate2_whisper(model_files: str | os.PathLike | Sequence[str | os.PathLike],
                                resource_dir: str | os.PathLike, output_dir: str | os.PathLike,
                                dtype: str = "float32") -> Path:
    """Writes a transformers Whisper folder (model, config, generation config, tokenizer, feature extractor).

    Args:
        model_files: ``model.bin`` or its parts in order.
        resource_dir: the folder with the CTranslate2 ``config.json`` and ``tokenizer.json``.
        output_dir: created if needed; ``WhisperForConditionalGeneration.from_pretrained`` loads it.
        dtype: the stored dtype (``float32``: float16 checkpoints keep their values exactly).
    """
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizer)

    resource_dir, output_dir = Path(resource_dir), Path(output_dir)
    model = read_ctranslate2_model(model_files)
    for name in ("config.json", "tokenizer.json"):
        if not (resource_dir / name).is_file():
            raise ConversionError(f"{resource_dir / name} is missing (the CTranslate2 Whisper folder has it)")
    ct2_config = json.loads((resource_dir / "config.json").read_text())
    tokenizer_json = json.loads((resource_dir / "tokenizer.json").read_text())
    config_kwargs, generation_kwargs = whisper_config_dicts(model, ct2_config, tokenizer_json)
    config = WhisperConfig(**config_kwargs)
    state = to_transformers_state_dict(model)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        hf_model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.array(a, dtype=np.float32)).to(torch_dtype) for k, a in state.items()}
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise ConversionError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(**generation_kwargs)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(output_dir)

    (output_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    eot = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer", "model_max_length": 1024, "errors": "replace",
        "add_prefix_space": False, "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    tokenizer = WhisperTokenizer.from_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------------
# openai-whisper checkpoints

_OPENAI_NAMES = {"self_attn": "attn", "encoder_attn": "cross_attn", "q_proj": "query", "k_proj": "key",
                 "v_proj": "value", "out_proj": "out", "self_attn_layer_norm": "attn_ln",
                 "encoder_attn_layer_norm": "cross_attn_ln", "final_layer_norm": "mlp_ln", "fc1": "mlp.0",
                 "fc2": "mlp.2"}


def to_openai_whisper_checkpoint(model: CTranslate2Model, dtype: str = "float16") -> dict:
    """``{"dims": ModelDimensions fields, "model_state_dict": ...}`` as ``whisper.load_model(path)`` reads it."""
    import torch

    sizes = whisper_sizes(model)
    for side in ("encoder", "decoder"):
        if sizes[f"{side}_ffn_dim"] != 4 * sizes["d_model"]:
            raise ConversionError(f"openai-whisper fixes the MLP at 4 x d_model; the {side} has "
                                  f"{sizes[f'{side}_ffn_dim']} for d_model {sizes['d_model']}")
    dims = dict(n_mels=sizes["num_mel_bins"], n_vocab=sizes["vocab_size"], n_audio_ctx=sizes["max_source_positions"],
                n_audio_state=sizes["d_model"], n_audio_head=sizes["encoder_attention_heads"],
                n_audio_layer=sizes["encoder_layers"], n_text_ctx=sizes["max_target_positions"],
                n_text_state=sizes["d_model"], n_text_head=sizes["decoder_attention_heads"],
                n_text_layer=sizes["decoder_layers"])
    out = {}
    for name, array in to_transformers_state_dict(model).items():
        parts = name.split(".")[1:]  # drop "model."
        tower = parts[0]
        if parts[1] == "embed_positions":
            key = f"{tower}.positional_embedding"
        elif parts[1] == "embed_tokens":
            key = "decoder.token_embedding.weight"
        elif parts[1] == "layer_norm":
            key = f"{tower}.{'ln_post' if tower == 'encoder' else 'ln'}.{parts[2]}"
        elif parts[1].startswith("conv"):
            key = name[len("model."):]
        elif parts[1] == "layers":
            rest = [_OPENAI_NAMES.get(p, p) for p in parts[3:]]
            key = ".".join([tower, "blocks", parts[2]] + rest)
        else:
            raise ConversionError(f"no openai-whisper name for {name}")
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32)).to(getattr(torch, dtype))
    return {"dims": dims, "model_state_dict": out}
