"""Stage I embedding extraction at full size: batched (sorted by length) vs the naive per-utterance loop.

    python bench/bench_extraction.py          # roberta-large text + wavlm-base-plus speech, a few minutes
    python bench/bench_extraction.py --quick  # tiny configs: exercises every code path in seconds

Backbones are built from configs with the published sizes and RANDOM weights (no download; a
random network costs exactly the same FLOPs). Both paths call the model's
``get_utterance_embeddings`` under ``torch.inference_mode()``:

- naive: one utterance per call, no padding; timed on every ``--text_naive_every``-th text utterance in
  length order (a systematic sample with the same length distribution) so that the text set can be large
  enough for fine length buckets; the speed-up is the ratio of per-utterance rates;
- batched: the batches of ``merits.data.cache.build_embedding_cache`` (its own planner,
  ``merits.data.cache.length_batches``): utterances sorted by length, cut into batches of at most
  ``--batch_size`` utterances and ``--max_tokens`` padded positions (rows x the longest row; speech
  counted in 20 ms frames like the cache does), each padded to its longest row.

Reported: utterances/s of each path, the speed-up, and the achieved GFLOP/s of the batched path as a
fraction of a float32 ``torch.mm`` peak (2048 x 2048, best of 5, same thread count) measured in the
same run (the headline), and as a fraction of the best ``torch.mm`` of the shape the model's FFN runs
at the token budget ([max_tokens, hidden] x [hidden, intermediate]); where the CPU has bfloat16
instructions (avx512_bf16 / amx_bf16) also the batched path under ``torch.autocast(bfloat16)``
against a bfloat16 ``torch.mm`` peak (``--bf16 auto``; autocast casts the float32 weights on every
call, so it gains less than the bf16 matmul peak suggests); on a shared machine also the same
ratios in process CPU time (``*_cpu_time``), which do not depend on the share of the cores we got.
``max_relative_diff_naive_vs_batched`` shows whether padding changes the embeddings (it does for
wav2vec2/WavLM-base style ``feat_extract_norm="group"`` encoders: GroupNorm spans the padded time axis). FLOPs are counted analytically on
the REAL (unpadded) tokens/frames only, so padding waste lowers the achieved figure:
transformer = 2 * encoder-layer parameters * tokens + 4 * layers * length^2 * hidden (QK^T and AV);
WavLM adds its convolutional feature encoder and positional convolution.

Utterances: text token lengths drawn like MELD/IEMOCAP transcripts (4-60 tokens, mean ~18), speech
durations 1-8 s (mean ~3.5 s), fixed seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, shape: tuple[int, int, int] | None = None, dtype=None) -> float:
    """Best-of-``repeats`` ``torch.mm`` throughput in GFLOP/s: n x n matrices, or [m, k] x [k, n] for
    ``shape=(m, k, n)``; float32 unless ``dtype`` is given."""
    import torch

    m, k, n = shape if shape is not None else (n, n, n)
    dtype = dtype or torch.float32
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises bfloat16 matrix instructions (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_gflop_per_cpu_second(n: int = 2048, repeats: int = 5) -> float:
    """The same matmul measured in process CPU time (all threads): GFLOP per CPU-second.

    On a shared machine wall time depends on the share of the cores we get; CPU time does not, so
    (achieved GFLOP per CPU-second) / (matmul GFLOP per CPU-second) is the load-independent fraction.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.process_time()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.process_time() - start) / 1e9


# ----------------------------------------------------------------------------------------------------- FLOPs


def transformer_layer_params(hidden: int, intermediate: int) -> int:
    """Weights of one post-/pre-LN encoder layer that multiply every token (q,k,v,o + the 2 FFN matrices)."""
    return 4 * hidden * hidden + 2 * hidden * intermediate


def transformer_flops(lengths, layers: int, hidden: int, intermediate: int) -> float:
    """2 * params * tokens + attention score/mix (4 * L * T^2 * d) summed over sequences of ``lengths``."""
    per_layer = transformer_layer_params(hidden, intermediate)
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(layers * (2 * per_layer * lengths.sum() + 4 * hidden * (lengths**2).sum()))


def wav2vec_frames(num_samples: int, conv_kernel, conv_stride) -> list[int]:
    """Output lengths of each conv layer of the feature encoder."""
    lengths, length = [], num_samples
    for k, s in zip(conv_kernel, conv_stride):
        length = (length - k) // s + 1
        lengths.append(length)
    return lengths


def wavlm_flops(num_samples_list, config) -> float:
    """Conv feature encoder + feature projection + positional conv + transformer, for each waveform."""
    total = 0.0
    frames_all = []
    for num_samples in num_samples_list:
        lengths = wav2vec_frames(num_samples, config.conv_kernel, config.conv_stride)
        c_in = 1
        for c_out, k, t in zip(config.conv_dim, config.conv_kernel, lengths):
            total += 2 * c_in * c_out * k * t
            c_in = c_out
        frames = lengths[-1]
        frames_all.append(frames)
        total += 2 * config.conv_dim[-1] * config.hidden_size * frames  # feature projection
        total += 2 * config.hidden_size * (config.hidden_size // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings * frames
    total += transformer_flops(frames_all, config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    return total


# ----------------------------------------------------------------------------------------------------- runs


def text_lengths(count: int, seed: int, max_len: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(v) for v in np.clip(4 + rng.gamma(2.0, 7.0, size=count), 4, max_len)]


def speech_seconds(count: int, seed: int, max_seconds: float) -> list[float]:
    rng = np.random.default_rng(seed + 1)
    return [float(v) for v in np.clip(1.0 + rng.gamma(2.0, 1.25, size=count), 1.0, max_seconds)]


def _time_paths(model, inputs: list[dict], pad, batch_size: int, max_tokens: int | None, key: str, plan_length,
                bf16: bool = False, naive_every: int = 1) -> dict:
    """Run the naive loop and the batched path (the embedding cache's batches) over ``inputs``; return both timings.

    ``plan_length(item)`` is the item's length in the cache's units (text tokens, speech frames at 50 per second).
    With ``bf16`` the batched path runs a second time under ``torch.autocast("cpu", torch.bfloat16)``.
    The naive loop runs on every ``naive_every``-th utterance in length order (a systematic sample with the
    same length distribution; all of them with 1): its per-utterance rate is what the batched path is compared with.
    """
    import torch

    from merits.data.cache import length_batches

    batches = length_batches([plan_length(item) for item in inputs], batch_size, max_tokens)
    real = sum(item["length"] for item in inputs)
    by_length = sorted(range(len(inputs)), key=lambda i: inputs[i]["length"])
    naive_indices = by_length[naive_every // 2 :: naive_every] if naive_every > 1 else list(range(len(inputs)))
    padded = sum(len(batch) * max(inputs[i]["length"] for i in batch) for batch in batches)

    def batched_run(autocast: bool):
        out_rows = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            start, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                out = model.get_utterance_embeddings(**pad([inputs[i] for i in batch]))[key]
                for row, i in enumerate(batch):
                    out_rows[int(i)] = out[row].float()
            return out_rows, time.perf_counter() - start, time.process_time() - cpu

    with torch.inference_mode():
        model.get_utterance_embeddings(**pad(inputs[:1]))  # warm-up (allocator, kernels)
        start, cpu = time.perf_counter(), time.process_time()
        naive = {i: model.get_utterance_embeddings(**pad([inputs[i]]))[key] for i in naive_indices}
        naive_seconds, naive_cpu = time.perf_counter() - start, time.process_time() - cpu
        batched, batched_seconds, batched_cpu = batched_run(False)
        result = {"naive_seconds": naive_seconds, "batched_seconds": batched_seconds, "naive_cpu_seconds": naive_cpu,
                  "batched_cpu_seconds": batched_cpu, "batches": len(batches), "padded_per_real": padded / real,
                  "naive_indices": naive_indices}
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # warm-up of the bf16 kernels
                model.get_utterance_embeddings(**pad(inputs[:2]))
            bf16_rows, result["batched_bf16_seconds"], _ = batched_run(True)
    scale = max(float(naive[i][0].abs().max()) for i in naive_indices)
    worst = max(float((naive[i][0] - batched[i]).abs().max()) for i in naive_indices)
    result |= {"max_abs_diff_naive_vs_batched": worst, "max_relative_diff_naive_vs_batched": worst / max(scale, 1e-12)}
    if bf16:
        worst = max(float((naive[i][0] - bf16_rows[i]).abs().max()) for i in naive_indices)
        result["max_relative_diff_naive_vs_batched_bf16"] = worst / max(scale, 1e-12)
    return result


def run_text(args) -> dict:
    import torch
    from transformers import RobertaConfig

    from merits import MeritsConfig, MeritsForConversationClassification

    if args.quick:
        text_config = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=130)
    else:  # roberta-large
        text_config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1)
    config = MeritsConfig(architecture="merits-l", text_config=text_config, id2label={0: "a", 1: "b"})
    model = MeritsForConversationClassification(config).eval()
    rng = np.random.default_rng(args.seed)
    lengths = text_lengths(args.text_utterances, args.seed, 60 if not args.quick else 20)
    inputs = [{"ids": rng.integers(3, text_config.vocab_size, size=n), "length": n} for n in lengths]

    def pad(items):
        longest = max(it["length"] for it in items)
        ids = torch.full((len(items), longest), text_config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, it in enumerate(items):
            ids[row, : it["length"]] = torch.as_tensor(it["ids"])
            ids[row, 0] = text_config.bos_token_id
            mask[row, : it["length"]] = 1
        return {"input_ids": ids, "attention_mask": mask}

    timing = _time_paths(model, inputs, pad, args.batch_size, args.max_tokens, "text", lambda item: item["length"], args.bf16,
                         args.text_naive_every)

    def flops(indices):
        return transformer_flops([lengths[i] for i in indices], text_config.num_hidden_layers, text_config.hidden_size,
                                 text_config.intermediate_size)

    return _summarise("text", timing, flops, inputs) | {
        "text/ffn_matmul_shape": (args.max_tokens or args.batch_size * max(lengths), text_config.hidden_size,
                                  text_config.intermediate_size),
        "text/utterances": len(inputs), "text/mean_tokens": float(np.mean(lengths)),
        "text/encoder_params_m": sum(p.numel() for p in model.text_encoder.backbone.parameters()) / 1e6}


def run_speech(args) -> dict:
    import torch
    from transformers import WavLMConfig

    from merits import MeritsConfig, MeritsForConversationClassification
    from merits.data.cache import AUDIO_FRAMES_PER_SECOND

    if args.quick:
        audio_config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_buckets=32,
                                   max_bucket_distance=100)
    else:  # microsoft/wavlm-base-plus sizes (the WavLMConfig defaults are wavlm-base(-plus))
        audio_config = WavLMConfig(feat_extract_norm="group", do_stable_layer_norm=False)
    config = MeritsConfig(architecture="merits-l", audio_config=audio_config, id2label={0: "a", 1: "b"})
    model = MeritsForConversationClassification(config).eval()
    rng = np.random.default_rng(args.seed)
    seconds = speech_seconds(args.speech_utterances, args.seed, 8.0 if not args.quick else 2.0)
    samples = [int(s * 16000) for s in seconds]
    inputs = [{"wave": rng.standard_normal(n).astype(np.float32) * 0.1, "length": n} for n in samples]

    def pad(items):
        longest = max(it["length"] for it in items)
        values = torch.zeros(len(items), longest)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, it in enumerate(items):
            values[row, : it["length"]] = torch.as_tensor(it["wave"])
            mask[row, : it["length"]] = 1
        return {"input_values": values, "audio_attention_mask": mask}

    frames = lambda item: item["length"] / 16000 * AUDIO_FRAMES_PER_SECOND  # noqa: E731  the cache's length unit
    timing = _time_paths(model, inputs, pad, args.speech_batch_size, args.speech_max_tokens, "audio", frames, args.bf16,
                         args.speech_naive_every)

    def flops(indices):
        return wavlm_flops([samples[i] for i in indices], audio_config)

    return _summarise("speech", timing, flops, inputs) | {
        "speech/ffn_matmul_shape": (args.speech_max_tokens or args.speech_batch_size * int(max(seconds) * 50),
                                    audio_config.hidden_size, audio_config.intermediate_size),
        "speech/utterances": len(inputs), "speech/mean_seconds": float(np.mean(seconds)),
        "speech/encoder_params_m": sum(p.numel() for p in model.speech_encoder.backbone.parameters()) / 1e6}


def _summarise(name: str, timing: dict, flops_of, inputs: list[dict]) -> dict:
    """Figures of one modality; ``flops_of(indices)`` counts the useful FLOPs of those utterances."""
    count, sampled = len(inputs), timing["naive_indices"]
    flops, naive_flops = flops_of(range(count)), flops_of(sampled)
    naive_rate, batched_rate = len(sampled) / timing["naive_seconds"], count / timing["batched_seconds"]
    naive_cpu_rate, batched_cpu_rate = len(sampled) / timing["naive_cpu_seconds"], count / timing["batched_cpu_seconds"]
    mean_length = float(np.mean([item["length"] for item in inputs]))
    figures = {
        f"{name}/naive_utterances_timed": len(sampled),
        f"{name}/naive_sample_mean_length_ratio": float(np.mean([inputs[i]["length"] for i in sampled])) / mean_length,
        f"{name}/naive_utterances_per_second": naive_rate,
        f"{name}/batched_utterances_per_second": batched_rate,
        f"{name}/speedup_batched_vs_naive": batched_rate / naive_rate,
        f"{name}/batches": timing["batches"],
        f"{name}/padded_per_real_positions": timing["padded_per_real"],
        f"{name}/useful_gflop": flops / 1e9,
        f"{name}/batched_gflops_per_second": flops / timing["batched_seconds"] / 1e9,
        f"{name}/naive_gflops_per_second": naive_flops / timing["naive_seconds"] / 1e9,
        f"{name}/max_abs_diff_naive_vs_batched": timing["max_abs_diff_naive_vs_batched"],
        f"{name}/max_relative_diff_naive_vs_batched": timing["max_relative_diff_naive_vs_batched"],
        f"{name}/speedup_batched_vs_naive_cpu_time": batched_cpu_rate / naive_cpu_rate,
        f"{name}/batched_gflop_per_cpu_second": flops / timing["batched_cpu_seconds"] / 1e9,
    }
    if "batched_bf16_seconds" in timing:
        figures[f"{name}/batched_bf16_gflops_per_second"] = flops / timing["batched_bf16_seconds"] / 1e9
        figures[f"{name}/speedup_batched_bf16_vs_naive"] = count / timing["batched_bf16_seconds"] / naive_rate
        figures[f"{name}/max_relative_diff_naive_vs_batched_bf16"] = timing["max_relative_diff_naive_vs_batched_bf16"]
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--text_utterances", type=int, default=256)
    parser.add_argument("--text_naive_every", type=int, default=4,
                        help="time the naive loop on every N-th text utterance in length order (1: all)")
    parser.add_argument("--speech_utterances", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64, help="at most this many text utterances per batch")
    parser.add_argument("--max_tokens", type=int, default=768,
                        help="at most this many padded text tokens per batch (0: fixed --batch_size batches)")
    parser.add_argument("--speech_batch_size", type=int, default=16)
    parser.add_argument("--speech_naive_every", type=int, default=1,
                        help="time the naive loop on every N-th speech utterance in length order (1: all)")
    parser.add_argument("--speech_max_tokens", type=int, default=1024,
                        help="at most this many padded speech frames (50 per second) per batch (0: fixed batches)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="also time the batched path under bfloat16 autocast (auto: when the CPU has bf16 instructions)")
    parser.add_argument("--modalities", default="text,speech")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no_record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.text_utterances, args.speech_utterances = 6, 4
        args.text_naive_every = min(args.text_naive_every, 2)
        args.max_tokens, args.speech_max_tokens = min(args.max_tokens, 40), min(args.speech_max_tokens, 200)
    args.max_tokens = args.max_tokens or None
    args.speech_max_tokens = args.speech_max_tokens or None
    args.bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_bf16())
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    figures: dict = {"load_average_before": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}
    size = 512 if args.quick else 2048
    peak_before = matmul_peak_gflops(size)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    for modality in modalities:
        if modality == "text":
            figures.update(run_text(args))
        elif modality == "speech":
            figures.update(run_speech(args))
        else:
            raise SystemExit(f"unknown modality {modality!r} (expected text or speech)")
    peak_after = matmul_peak_gflops(size)
    peak_cpu = matmul_gflop_per_cpu_second(size)
    figures["matmul_gflop_per_cpu_second"] = peak_cpu
    peak = max(peak_before, peak_after)  # measured around the runs: the same machine state
    figures["matmul_peak_gflops_per_second"] = peak
    figures["matmul_peak_before_after"] = f"{peak_before:.1f} / {peak_after:.1f}"
    if args.bf16:
        figures["matmul_bf16_peak_gflops_per_second"] = matmul_peak_gflops(size, dtype=torch.bfloat16)
    for modality in modalities:
        figures[f"{modality}/batched_fraction_of_matmul_peak"] = figures[f"{modality}/batched_gflops_per_second"] / peak
        figures[f"{modality}/batched_fraction_of_matmul_cpu_time"] = figures[f"{modality}/batched_gflop_per_cpu_second"] / peak_cpu
        shape = tuple(figures[f"{modality}/ffn_matmul_shape"])
        shape_peak = matmul_peak_gflops(shape=shape)
        figures[f"{modality}/ffn_shape_matmul_gflops_per_second"] = shape_peak
        figures[f"{modality}/batched_fraction_of_ffn_shape_matmul"] = figures[f"{modality}/batched_gflops_per_second"] / shape_peak
        figures[f"{modality}/ffn_matmul_shape"] = "x".join(map(str, shape))
        if args.bf16:
            figures[f"{modality}/batched_bf16_fraction_of_bf16_matmul_peak"] = (
                figures[f"{modality}/batched_bf16_gflops_per_second"] / figures["matmul_bf16_peak_gflops_per_second"])
    figures["load_average_after"] = os.getloadavg()[0]
    notes = (f"random-weight roberta-large (24x1024) and wavlm-base-plus (12x768) configs; {args.text_utterances} text "
             f"utterances (batches of <= {args.batch_size} and <= {args.max_tokens} padded tokens; naive loop timed on "
             f"every {args.text_naive_every}-th in length order), "
             f"{args.speech_utterances} speech utterances (<= {args.speech_batch_size} and <= {args.speech_max_tokens} "
             f"padded frames; naive every {args.speech_naive_every}-th), batches planned by merits.data.cache.length_batches; float32 (bf16 rows: autocast), "
             f"{args.threads} torch threads, inference_mode; FLOPs on real tokens only; the machine is shared, see "
             "load_average_*")
    if args.quick:
        notes = "QUICK smoke sizes, not a measurement. " + notes
    if not args.no_record:
        from bench.common import record

        record("extraction_quick" if args.quick else "extraction", figures, notes)
    else:
        import json

        print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
