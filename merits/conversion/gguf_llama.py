"""A GGUF Llama-family checkpoint (e.g. llama.cpp's Q4_1) -> a plain transformers Llama folder.

transformers reads GGUF itself (``from_pretrained(..., gguf_file=...)``: the ``gguf`` package dequantises every
tensor and undoes llama.cpp's q/k row permutation); this module writes the result as an ordinary folder that
any Llama reader loads (vLLM, older transformers): float32 ``model.safetensors``, a ``config.json`` that carries
the RoPE base both as transformers 5's ``rope_parameters`` and as the older top-level ``rope_theta`` /
``rope_scaling``, ``generation_config.json`` and the tokenizer (``tokenizer.json`` + a ``tokenizer_config.json``
with the chat template and a tokenizer class that transformers 4 and 5 both know).

The weights are the *dequantised* values: they differ from the original float model by the quantisation error,
so the folder is named for what it is (``SmolLM2-135M-Instruct-Q4_1-dequantised``), never filed under the
original model's Hub id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .ctranslate2_whisper import ConversionError


def convert_gguf_llama(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, name: str | None = None,
                       source: str | None = None) -> Path:
    """Dequantises ``gguf_path`` into ``output_dir`` (created); returns the folder.

    Args:
        name: recorded as ``_name_or_path`` in config.json (default: the folder name).
        source: where the GGUF came from (recorded in ``config.json`` under ``merits_source``).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path} does not exist")
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except Exception as error:  # transformers names the unsupported architecture / quantisation type
        raise ConversionError(f"{gguf_path}: cannot read the GGUF checkpoint: {error}") from error
    if model.config.model_type != "llama":
        raise ConversionError(f"{gguf_path}: a {model.config.model_type!r} model, not a Llama")

    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(output_dir / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "id2label", "label2id", "problem_type"):
        config.pop(key, None)
    config["_name_or_path"] = name or output_dir.name
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = config["torch_dtype"] = "float32"
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta"))
    if rope_theta is None:
        raise ConversionError(f"{gguf_path}: no RoPE base (rope_theta) in the checkpoint")
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{gguf_path}: RoPE scaling {rope!r} is not written for older readers")
    config["rope_theta"] = float(rope_theta)
    config["rope_scaling"] = None
    config["rope_parameters"] = {"rope_theta": float(rope_theta), "rope_type": "default"}
    if source:
        config["merits_source"] = source
    (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(output_dir)

    tokenizer.save_pretrained(output_dir)
    tokenizer_config_path = output_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    # the GGUF tokenizer is byte-level BPE (tokenizer.json); "GPT2Tokenizer" loads it in transformers 4 and 5
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    tokenizer_config["model_max_length"] = int(config["max_position_embeddings"])
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    if tokenizer.chat_template and not tokenizer_config.get("chat_template"):
        tokenizer_config["chat_template"] = tokenizer.chat_template
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if not (output_dir / "tokenizer.json").is_file():
        raise ConversionError(f"{gguf_path}: the tokenizer was not written as tokenizer.json")
    for file in output_dir.iterdir():
        file.chmod(0o644)
    return output_dir
