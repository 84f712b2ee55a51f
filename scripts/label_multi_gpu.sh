#!/usr/bin/env bash
# Label a corpus on one machine with several GPUs: one shard per GPU (Whisper on that GPU), the LLM requests of
# every shard spread over every LLM endpoint, then one merge. Each shard resumes on its own: rerun the same
# command after a kill and only unfinished rows are redone.
#
#   LLM_URLS=http://127.0.0.1:8000/v1,http://127.0.0.1:8001/v1 \
#     bash scripts/label_multi_gpu.sh OUT NUM_GPUS --audio /data/MSP-Podcast/Audios \
#       --llm-model meta-llama/Meta-Llama-3-8B-Instruct --whisper-model large-v3 --language en
#
# Start the LLM servers first, e.g. one vLLM server per GPU beside Whisper (it needs ~0.5 of an 80 GB GPU):
#   for g in 0 1 2 3 4 5 6 7; do CUDA_VISIBLE_DEVICES=$g python -m vllm.entrypoints.openai.api_server \
#     --model meta-llama/Meta-Llama-3-8B-Instruct --host 127.0.0.1 --port $((8000+g)) \
#     --gpu-memory-utilization 0.5 & done
# or one server over all GPUs with vLLM's own data parallelism (--data-parallel-size 8, one URL).
#
# Environment: LLM_URLS (comma-separated; default http://127.0.0.1:8000/v1), DEVICE (cuda; cpu to try it
# without a GPU), PYTHON (python), CONCURRENCY (requests in flight per shard and endpoint; 16).
# Every other argument goes to label_with_llm.py unchanged. Logs: OUT/logs/shard-<i>.log.
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 OUT NUM_GPUS LABEL_WITH_LLM_ARGS..." >&2
    exit 2
fi
OUT="$1"; NUM="$2"; shift 2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT/logs"
pids=()
for ((i = 0; i < NUM; i++)); do
    CUDA_VISIBLE_DEVICES="$i" "$PYTHON" "$REPO/label_with_llm.py" "$@" --out "$OUT" \
        --llm-url "${LLM_URLS:-http://127.0.0.1:8000/v1}" --concurrency "${CONCURRENCY:-16}" \
        --device "${DEVICE:-cuda}" --num-shards "$NUM" --shard-index "$i" >"$OUT/logs/shard-$i.log" 2>&1 &
    pids+=($!)
done
failed=()
for ((i = 0; i < NUM; i++)); do
    wait "${pids[$i]}" || failed+=("$i")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "shard(s) ${failed[*]} failed (see $OUT/logs/shard-<i>.log); rerun this command to resume them" >&2
    exit 1
fi
exec "$PYTHON" "$REPO/label_with_llm.py" merge --out "$OUT"
