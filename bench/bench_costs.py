"""Per-utterance costs of the corpus-scale jobs, for the projection (bench/bench_projection.py).

    python bench/bench_costs.py --device cpu --sizes small  --out bench/costs_cpu.json     # here (2 cores)
    python bench/bench_costs.py --device cuda --sizes real  --out bench/costs_h200.json    # on a GPU machine

Models are built from configs with random weights at the published sizes (no download; the cost of a forward
pass does not depend on the weights' values). Random weights never stop generating on their own, so every
generation is forced to a fixed number of new tokens on both sides of a comparison (Whisper: the end-of-text
token suppressed and ``sample_len`` = ``--asr-tokens``; transformers: ``min_new_tokens = max_new_tokens``).

- ``asr``: Whisper on ``--asr-seconds`` clips (MSP-Podcast's mean segment: 230 h / ~149k segments = 5.6 s),
  from 16 kHz waveforms to tokens (log-mel included), two engines on the same dimensions and batch sizes, in
  alternating rounds: openai-whisper's batched ``whisper.decode`` (what ``merits.labelling.asr`` runs) and
  transformers' ``WhisperForConditionalGeneration`` (the model the ``automatic-speech-recognition`` pipeline
  calls; greedy ``generate`` with the same 4-token start prompt, SDPA attention, the feature extractor on
  the same device). ``small`` = Whisper-base dimensions, ``real`` = large-v3.
- ``stage_step``: a training step (forward, backward, AdamW) of a RoBERTa sequence classifier (stage 0 / stage
  I of MERITS-L): ``real`` = roberta-large, bf16 autocast on a GPU.
- ``llm_request`` (``real`` on a GPU only): Llama-3-8B dimensions, a batch of labelling requests of
  ``--llm-prompt-tokens`` prompt tokens and ``--llm-new-tokens`` reply tokens through transformers'
  ``generate`` (static batching, no paged KV cache): an upper bound on vLLM's cost per request.
- ``lora_step`` (``real`` on a GPU only): a LoRA training step of a Qwen2.5-7B-sized decoder (MiSTER-E's text
  expert's utterance encoder), bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

WHISPER_DIMS = {
    "small": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6, n_vocab=51865,
                  n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6),  # whisper-base
    "real": dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32, n_vocab=51866,
                 n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32),  # whisper-large-v3
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- ASR


def bench_asr(device: str, sizes: str, batch_sizes: list[int], tokens: int, seconds: float, rounds: int) -> dict:
    import whisper
    from whisper.model import ModelDimensions, Whisper
    from transformers import GenerationMixin, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    dims = WHISPER_DIMS[sizes]
    half = device.startswith("cuda")
    dtype = torch.float16 if half else torch.float32
    torch.manual_seed(0)
    # as whisper.load_model leaves it: float32 parameters; fp16=True casts them at each call (openai-whisper's way)
    ow = Whisper(ModelDimensions(**dims)).to(device).eval()
    multilingual = dims["n_vocab"] >= 51865
    tokenizer = whisper.tokenizer.get_tokenizer(multilingual, num_languages=dims["n_vocab"] - 51765 - int(multilingual),
                                                language="en", task="transcribe")
    options = whisper.DecodingOptions(task="transcribe", language="en", temperature=0.0, fp16=half,
                                      without_timestamps=True, sample_len=tokens,
                                      suppress_tokens=[-1, tokenizer.eot])

    config = WhisperConfig(
        vocab_size=dims["n_vocab"], num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"], decoder_layers=dims["n_text_layer"],
        encoder_attention_heads=dims["n_audio_head"], decoder_attention_heads=dims["n_text_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"], decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"], max_target_positions=dims["n_text_ctx"],
        decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
        attn_implementation="sdpa",
    )
    hf = WhisperForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    extractor = WhisperFeatureExtractor(feature_size=dims["n_mels"])
    prompt = torch.tensor(list(tokenizer.sot_sequence_including_notimestamps), device=device)

    rng = np.random.default_rng(0)
    clip = int(seconds * 16000)

    def run_openai(arrays):
        mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a).to(device)),
                                                       n_mels=dims["n_mels"]) for a in arrays])
        with torch.inference_mode():
            results = whisper.decode(ow, mel.to(dtype), options)
        return [len(r.tokens) for r in results]

    def run_transformers(arrays):
        features = extractor(arrays, sampling_rate=16000, return_tensors="pt", device=device).input_features
        with torch.inference_mode():
            out = GenerationMixin.generate(hf, input_features=features.to(device=device, dtype=dtype),
                                           decoder_input_ids=prompt.expand(len(arrays), -1), max_new_tokens=tokens,
                                           min_new_tokens=tokens, do_sample=False, num_beams=1)
        return out.shape[1] - prompt.numel()

    figures: dict = {"dims": sizes, "asr_tokens": tokens, "clip_seconds": seconds, "dtype": str(dtype)}
    for batch in batch_sizes:
        arrays = [(0.1 * rng.standard_normal(clip)).astype(np.float32) for _ in range(batch)]
        ow_tokens = run_openai(arrays)  # warm-up; checks the forced length
        hf_tokens = run_transformers(arrays)
        assert min(ow_tokens) == tokens and hf_tokens == tokens, (ow_tokens, hf_tokens)
        times = {"openai_whisper": [], "transformers": []}
        for _ in range(rounds):
            times["openai_whisper"].append(timed(lambda: run_openai(arrays), device))
            times["transformers"].append(timed(lambda: run_transformers(arrays), device))
        for engine, values in times.items():
            best = min(values)
            figures[f"{engine}_batch{batch}_seconds"] = best
            figures[f"{engine}_batch{batch}_utterances_per_second"] = batch / best
        figures[f"transformers_over_openai_whisper_batch{batch}"] = min(times["openai_whisper"]) / min(times["transformers"])
    return figures


# ---------------------------------------------------------------------------------------------- training steps


def bench_stage_step(device: str, sizes: str, batch: int, length: int, steps: int) -> dict:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    if sizes == "real":
        config = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                               vocab_size=50265, max_position_embeddings=514, num_labels=3, attn_implementation="sdpa")
    else:
        config = RobertaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                               vocab_size=50265, max_position_embeddings=514, num_labels=3, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, 50000, (batch, length), device=device)
    labels = torch.randint(0, 3, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    seconds = timed(step, device, repeats=steps)
    params = sum(p.numel() for p in model.parameters())
    return {"model": "roberta-large" if sizes == "real" else "roberta 4x256", "parameters": params, "batch": batch,
            "tokens_per_utterance": length, "step_seconds": seconds, "utterances_per_second": batch / seconds,
            "achieved_tflops": 6 * params * batch * length / seconds / 1e12}


def bench_llm_request(device: str, batch: int, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, 120000, (batch, prompt_tokens), device=device)

    def run():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)

    assert run().shape[1] == prompt_tokens + new_tokens
    seconds = min(timed(run, device) for _ in range(rounds))
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"model": "Llama-3-8B dims", "parameters": params, "batch": batch, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "batch_seconds": seconds, "requests_per_second": batch / seconds}


def bench_lora_step(device: str, batch: int, length: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, num_labels=6, pad_token_id=0,
                         attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2ForSequenceClassification(config)
    torch.set_default_dtype(torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="SEQ_CLS"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(3, 150000, (batch, length), device=device)
    labels = torch.randint(0, 6, (batch,), device=device)

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    seconds = timed(step, device, repeats=steps)
    return {"model": "Qwen2.5-7B dims + LoRA r16 (q,k,v,o)", "batch": batch, "tokens_per_utterance": length,
            "step_seconds": seconds, "utterances_per_second": batch / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", choices=("small", "real"), default="small")
    parser.add_argument("--parts", default="asr,stage_step,llm_request,lora_step")
    parser.add_argument("--asr-batch-sizes", default="1,8")
    parser.add_argument("--asr-tokens", type=int, default=24, help="tokens per clip (MSP-Podcast: ~15 words)")
    parser.add_argument("--asr-seconds", type=float, default=5.6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stage-batch", type=int, default=32)
    parser.add_argument("--stage-length", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--llm-batch", type=int, default=256)
    parser.add_argument("--llm-prompt-tokens", type=int, default=80)
    parser.add_argument("--llm-new-tokens", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = args.parts.split(",")
    gpu = args.device.startswith("cuda")
    figures: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "load_average_before": load_average(), "sizes": args.sizes}
    if "asr" in parts:
        figures["asr"] = bench_asr(args.device, args.sizes, [int(b) for b in args.asr_batch_sizes.split(",")],
                                   args.asr_tokens, args.asr_seconds, args.rounds)
        print(json.dumps(figures["asr"]), flush=True)
    if "stage_step" in parts:
        figures["stage_step"] = bench_stage_step(args.device, args.sizes, args.stage_batch, args.stage_length, args.steps)
        print(json.dumps(figures["stage_step"]), flush=True)
    if gpu and args.sizes == "real":
        if "llm_request" in parts:
            figures["llm_request"] = bench_llm_request(args.device, args.llm_batch, args.llm_prompt_tokens,
                                                       args.llm_new_tokens, args.rounds)
            print(json.dumps(figures["llm_request"]), flush=True)
        if "lora_step" in parts:
            figures["lora_step"] = bench_lora_step(args.device, 16, 64, args.steps)
            print(json.dumps(figures["lora_step"]), flush=True)
    figures["load_average_after"] = load_average()
    figures["command"] = "python " + " ".join(sys.argv)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
