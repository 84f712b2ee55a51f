"""Batch-exact speech with a `feat_extract_norm="group"` backbone (issue 18): the masked GroupNorm vs the per-length
regrouping it replaced, side by side in one process, wavlm-base-plus sizes (WavLMConfig defaults: 12 x 768, 7-layer
conv feature encoder of 512 channels, GroupNorm in layer 0), random weights, float32 on the CPU.

    python bench/bench_group_norm.py [--batch 8] [--rounds 3] [--record]

Three ways to pool one padded batch of `--batch` utterances of different lengths (`pool_backbone`):

- `regrouping`: the replaced code, every utterance run alone on its own samples (all lengths differ, so each is a
  batch of 1): exact by construction, the reference for the differences;
- `masked_batched`: the current code on the GPU route (`MeritsSpeechEncoder.feature_encoder_per_utterance = False`):
  one batched pass, layer 0's GroupNorm over each row's valid frames;
- `masked_cpu_route`: the current code on a CPU (the feature encoder per utterance on its own samples, the
  transformer batched with the attention mask).

Rounds alternate the three; the figure is each one's median seconds per batch. A CPU figure only: the GPU's is
the device check's `extraction/speech` row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min_seconds", type=float, default=2.0)
    parser.add_argument("--max_seconds", type=float, default=5.0)
    parser.add_argument("--record", action="store_true", help="store the figures in bench/results.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import WavLMConfig

    from merits import MeritsConfig
    from merits.modeling_merits import MeritsSpeechEncoder

    torch.manual_seed(0)
    config = MeritsConfig(audio_config=WavLMConfig(), id2label={0: "a", 1: "b"})
    encoder = MeritsSpeechEncoder(config).eval()
    assert encoder.backbone.config.feat_extract_norm == "group"
    generator = torch.Generator().manual_seed(1)
    # distinct lengths, evenly spread over [min, max] seconds at 16 kHz
    lengths = [int(16000 * (args.min_seconds + (args.max_seconds - args.min_seconds) * i / max(1, args.batch - 1)))
               + i for i in range(args.batch)]
    lengths = lengths[::-1]
    values = torch.zeros(args.batch, max(lengths))
    mask = torch.zeros(args.batch, max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        values[row, :length] = torch.randn(length, generator=generator)
        mask[row, :length] = 1

    def regrouping():  # the replaced per-length regrouping: each row alone, unpadded (all lengths differ here)
        return torch.cat([encoder.pool_backbone(values[row : row + 1, :length]) for row, length in enumerate(lengths)])

    def masked(route):
        def run():
            MeritsSpeechEncoder.feature_encoder_per_utterance = route
            try:
                return encoder.pool_backbone(values, audio_attention_mask=mask)
            finally:
                MeritsSpeechEncoder.feature_encoder_per_utterance = None
        return run

    ways = {"regrouping": regrouping, "masked_batched": masked(False), "masked_cpu_route": masked(None)}
    seconds = {name: [] for name in ways}
    outputs = {}
    with torch.no_grad():
        for name, way in ways.items():  # warm-up
            outputs[name] = way()
        for _ in range(args.rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values_) for name, values_ in seconds.items()}
    figures = {
        "batch": args.batch,
        "lengths_seconds": ",".join(f"{length / 16000:.2f}" for length in lengths),
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
    }
    for name in ways:
        figures[f"{name}/median_seconds_per_batch"] = median[name]
        figures[f"{name}/utterances_per_second"] = args.batch / median[name]
        figures[f"{name}/round_seconds"] = ",".join(f"{s:.3f}" for s in seconds[name])
    for name in ("masked_batched", "masked_cpu_route"):
        figures[f"speedup_{name}_vs_regrouping"] = median["regrouping"] / median[name]
        figures[f"{name}/max_abs_diff_vs_regrouping"] = float((outputs[name] - outputs["regrouping"]).abs().max())
    figures["pooled_max_abs"] = float(outputs["regrouping"].abs().max())
    if args.record:
        sys.path.insert(0, str(REPO / "bench"))
        from common import record

        return record("group_norm_masked_vs_regrouping_cpu", figures,
                      notes="wavlm-base-plus sizes, random weights, float32, CPU; medians of alternating rounds")
    for key, value in figures.items():
        print(f"{key}: {value}")
    return figures


if __name__ == "__main__":
    main()
