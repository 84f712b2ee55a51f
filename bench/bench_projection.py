"""A projection of corpus-scale labelling and of the papers' training runs on 1, 8 and 64 GPUs.

    python bench/bench_projection.py            # reads bench/costs_h200.json, writes bench/projection.md

Inputs: per-utterance costs measured on one H200 by ``bench/bench_costs.py --device cuda --sizes real`` (random
weights at the published sizes: Whisper large-v3, Llama-3-8B, RoBERTa-large, Qwen2.5-7B + LoRA), the corpus
sizes of shared/spec/papers.md, and the scaling assumptions written beside the table (not measured here).
"""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent
GPUS = (1, 8, 64)
#: DDP efficiency per GPU count for the training runs (ASSUMED, not measured: one GPU was available).
TRAIN_EFFICIENCY = {1: 1.0, 8: 0.9, 64: 0.75}
#: Sharded labelling is embarrassingly parallel; the largest hash shard of n/G rows is ~ +3 sqrt(n/G) rows.
MSP_SEGMENTS, MSP_MEAN_SECONDS = 149_000, 5.6  # papers.md: ~149k segments (release 1.11), 230 h


def main() -> int:
    costs = json.loads((BENCH / "costs_h200.json").read_text())
    asr = costs["asr"]
    batches = sorted(int(k.split("batch")[1].split("_")[0]) for k in asr if k.startswith("openai_whisper_batch") and k.endswith("per_second"))
    best_batch = max(batches, key=lambda b: asr[f"openai_whisper_batch{b}_utterances_per_second"])
    asr_rate = asr[f"openai_whisper_batch{best_batch}_utterances_per_second"]
    hf_rate = asr[f"transformers_batch{best_batch}_utterances_per_second"]
    llm_rate = costs["llm_request"]["requests_per_second"]
    stage_rate = costs["stage_step"]["utterances_per_second"]
    lora_rate = costs["lora_step"]["utterances_per_second"]
    seconds_per_utt = 1 / asr_rate + 1 / llm_rate  # Whisper and the LLM take turns on each GPU
    label_gpu_hours = MSP_SEGMENTS * seconds_per_utt / 3600
    runs = [  # name, utterances per epoch, epochs, utterances/s per GPU
        ("MERITS-L stage 0: RoBERTa-large on MSP-Podcast pseudo-labels (80 % train, 10 epochs)", int(0.8 * MSP_SEGMENTS), 10, stage_rate),
        ("MERITS-L stage I text: RoBERTa-FT on MELD train (9,989 utt., 50 epochs)", 9989, 50, stage_rate),
        ("MiSTER-E text utterance stage: Qwen2.5-7B + LoRA on MELD train (9,989 utt., 10 epochs)", 9989, 10, lora_rate),
    ]
    lines = ["# Projection: labelling MSP-Podcast and the papers' training runs on 1, 8 and 64 GPUs", "",
             "Written by `python bench/bench_projection.py` from `bench/costs_h200.json` (measured on one "
             f"{costs['device']} with `{costs['command']}`). Do not edit by hand.", "",
             "## Labelling MSP-Podcast (Whisper large-v3 transcripts + Llama-3-8B labels)", "",
             "| GPUs | wall time | GPU hours |", "|---|---|---|"]
    for g in GPUS:
        per_shard = MSP_SEGMENTS / g + 3 * (MSP_SEGMENTS / g) ** 0.5
        wall = per_shard * seconds_per_utt / 3600
        lines.append(f"| {g} | {wall:.2f} h ({wall * 60:.0f} min) | {label_gpu_hours:.2f} |")
    lines += ["", "## Training", "", "| run | GPUs | wall time | GPU hours |", "|---|---|---|---|"]
    for name, utts, epochs, rate in runs:
        for g in GPUS:
            wall = utts * epochs / (rate * g * TRAIN_EFFICIENCY[g]) / 3600
            lines.append(f"| {name} | {g} | {wall:.2f} h | {wall * g:.2f} |")
    lines += ["", "MERITS-L stages II/III and the MiSTER-E MoE train on cached embeddings (a few million parameters): "
              "minutes on one GPU, not worth spreading.", "", "## Measured inputs (one H200, random weights at the published sizes)", "",
              f"- ASR, openai-whisper large-v3 batched `whisper.decode`, fp16, {asr['clip_seconds']} s clips, "
              f"{asr['asr_tokens']} tokens each: {asr_rate:.1f} utt/s at batch {best_batch} (best of batches {batches}); "
              f"transformers' WhisperForConditionalGeneration at the same batch {hf_rate:.1f} utt/s; by batch: "
              + ", ".join(f"{b}: {asr[f'openai_whisper_batch{b}_utterances_per_second']:.1f} vs "
                          f"{asr[f'transformers_batch{b}_utterances_per_second']:.1f}" for b in batches) + " (openai-whisper vs transformers, utt/s).",
              f"- LLM request, Llama-3-8B dimensions, transformers `generate`, batch {costs['llm_request']['batch']}, "
              f"{costs['llm_request']['prompt_tokens']} prompt + {costs['llm_request']['new_tokens']} reply tokens: "
              f"{llm_rate:.0f} requests/s.",
              f"- Stage 0 / I step, RoBERTa-large, bf16 autocast, batch {costs['stage_step']['batch']} x "
              f"{costs['stage_step']['tokens_per_utterance']} tokens, AdamW: {stage_rate:.0f} utt/s "
              f"({costs['stage_step']['achieved_tflops']:.0f} TFLOP/s).",
              f"- LoRA step, Qwen2.5-7B dimensions, r 16 on q/k/v/o, bf16, batch 16 x 64 tokens: {lora_rate:.0f} utt/s.",
              "", "## Assumptions (not measured)", "",
              f"- MSP-Podcast: {MSP_SEGMENTS:,} segments of {MSP_MEAN_SECONDS} s mean (230 h; papers.md decision 2); every "
              "segment <= 30 s, so one Whisper window each, and ~15 words = 24 tokens per transcript.",
              "- Random weights never emit end-of-text, so every generation is forced to the token counts above; real "
              "replies of the choice-constrained LLM are 2-3 tokens, real transcripts vary around the mean.",
              "- Whisper and the LLM share each GPU and take turns (per utterance: 1/ASR rate + 1/LLM rate); running "
              "them concurrently on separate GPUs gives the same GPU hours.",
              "- The LLM cost is transformers' static-batch `generate`; vLLM (continuous batching, paged KV cache) is "
              "expected to be faster, so labelling time is an upper bound on that side.",
              "- Sharding is embarrassingly parallel: wall time = the largest hash shard (n/G + 3 sqrt(n/G) rows) x the "
              "per-utterance time; model loading (minutes per shard) and audio decoding on the CPU are not counted.",
              "- Training: DDP efficiency 100 % / 90 % / 75 % at 1 / 8 / 64 GPUs (assumed, not measured: one GPU was "
              "available); the per-GPU batch is the measured one (32 utterances x 48 tokens for RoBERTa-large); "
              "validation passes, checkpointing and data loading are not counted; 64 GPUs on MELD-sized runs are "
              "shown for completeness but a 10k-utterance epoch is only ~5 optimizer steps per GPU there.",
              "- H200 figures; an A100 runs bf16 matrix products at roughly 1/3 of an H200's rate.", ""]
    (BENCH / "projection.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
