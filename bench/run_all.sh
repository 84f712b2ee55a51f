#!/usr/bin/env bash
# Run every benchmark once; each records its own figures in bench/results.json and bench/RESULTS.md.
#   bash bench/run_all.sh            # full runs (the accuracy benchmark trains on MELD/MOSI/EmoDB: the longest)
#   bash bench/run_all.sh --quick    # smoke sizes of the benchmarks that have a --quick mode
# Run them one after the other on an otherwise idle machine: they time themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=""
if [[ "${1:-}" == "--quick" ]]; then QUICK="--quick"; fi

python bench/bench_extraction.py $QUICK
ROUNDS="--rounds 2"  # alternating rounds: the host's speed drifts (bench/README.md)
if [[ -n "$QUICK" ]]; then ROUNDS=""; fi
python bench/bench_training.py --profile $ROUNDS $QUICK
python bench/bench_accuracy.py $QUICK
# the other engineers' benchmarks (labelling, inference, streaming)
for script in bench/bench_labelling.py bench/bench_inference.py bench/bench_streaming.py; do
  if [[ -f "$script" ]]; then
    if [[ -z "$QUICK" ]]; then python "$script"
    elif grep -q -- "--quick" "$script"; then python "$script" --quick
    else echo "run_all.sh: $script has no --quick mode, skipped in a quick run" >&2; fi
  else
    echo "run_all.sh: $script not found, skipped" >&2
  fi
done
