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

Every measured run starts from the same cache state a real (single-pass) labelling job has: the
benchmark's server runs with ``VLLM_SERVER_DEV_MODE=1`` and each run first resets vLLM's prefix
cache (``POST /reset_prefix_cache``), then sends one request on a sentence outside the measured rows,
so that only the shared instruction prefix is cached. Without the reset, the rows labelled by the
previous run would be cached whole (the same rows are labelled by every run), which no real job sees.

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
#: 32 is the smallest block vLLM-CPU's attention accepts ("No common block size for 16").
DEFAULT_SERVER_ARGS = ("--block-size=32", "--disable-uvicorn-access-log")
#: A sentence outside the measured rows: its request caches the shared instruction prefix after a reset.
PRIMING_SENTENCE = "a sentence outside the measured rows, labelled once so that the shared prefix is cached"
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


def reset_prefix_cache(root: str, url: str, model: str) -> bool:
    """Empty vLLM's prefix cache (dev-mode endpoint), then cache the shared prompt prefix with one request
    on :data:`PRIMING_SENTENCE`. ``False`` (nothing reset) when the server has no such endpoint."""
    import httpx

    response = httpx.post(f"{root}/reset_prefix_cache", timeout=60)
    if response.status_code != 200:
        return False
    timed_run(url, model, [("priming", PRIMING_SENTENCE)], 1)
    return True


def shared_prefix_tokens(root: str, model: str) -> dict:
    """How many prompt tokens every row shares (system prompt + the user template's head), from the served
    tokenizer and chat template (vLLM's ``POST /tokenize``), and how many of them vLLM can cache: only
    whole KV blocks are cached, so the rest is computed again for every row. Empty when not vLLM."""
    import httpx

    from merits.labelling import PromptTemplate

    prompt, tokens = PromptTemplate(), []
    for text in ("first sentence to compare", "another one"):
        response = httpx.post(f"{root}/tokenize", timeout=30, json={
            "model": model, "messages": prompt.messages(text), "add_generation_prompt": True})
        if response.status_code != 200:
            return {}
        tokens.append(response.json()["tokens"])
    shared = 0
    while shared < min(map(len, tokens)) and tokens[0][shared] == tokens[1][shared]:
        shared += 1
    return {"shared_prompt_prefix_tokens": shared}


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
        try:  # vLLM names its processes (setproctitle): the model runs in "VLLM::Worker"
            if b"Worker" in (stat.parent / "cmdline").read_bytes():
                totals["worker"] = totals.get("worker", 0.0) + seconds
        except OSError:
            pass
    return totals


def cpu_stats(before: dict, after: dict, rows: int, wall: float) -> dict:
    api = after["api_server"] - before["api_server"]
    engine = after["engine"] - before["engine"]
    stats = {"api_server_cpu_ms_per_request": 1000 * api / rows, "engine_cpu_ms_per_request": 1000 * engine / rows,
             "server_cores_used": (api + engine) / wall}
    if "worker" in after:  # the model's forward passes (the rest of "engine" is the engine core's scheduler loop)
        worker = after["worker"] - before.get("worker", 0.0)
        stats["worker_cpu_ms_per_request"] = 1000 * worker / rows
        stats["worker_cores_used"] = worker / wall
    return stats


def model_parameters(model_dir: Path) -> int:
    """Parameter count of a saved model, from its safetensors headers (no weights loaded)."""
    import json
    import struct

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for size in tensor["shape"]:
                    count *= size
                total += count
    return total


def work_stats(stats: dict, rows: int, parameters: int, bytes_per_parameter: int = 2) -> dict:
    """What one request costs the model: tokens actually computed (prompt tokens not served from the
    prefix cache + generated ones), the matmul GFLOP they need (2 x parameters per token; attention over
    ~60 tokens is negligible), the GFLOP/s the worker achieved, and the weights it read (one full read
    per engine step: what a batch of one pays per token, and what batching shares)."""
    out = {}
    if "prompt_tokens_per_request" in stats:
        uncached = stats["prompt_tokens_per_request"] * (1 - stats.get("prompt_tokens_cached_fraction", 0.0))
        computed = uncached + stats.get("generated_tokens_per_request", 0.0)
        out["uncached_prompt_tokens_per_request"] = uncached
        out["forward_gflop_per_request"] = 2 * parameters * computed / 1e9
        if stats.get("worker_cpu_ms_per_request"):
            out["worker_gflop_per_cpu_s"] = out["forward_gflop_per_request"] / (stats["worker_cpu_ms_per_request"] / 1000)
    if "engine_steps" in stats:
        out["weights_gb_read_per_request"] = stats["engine_steps"] / rows * bytes_per_parameter * parameters / 1e9
    return out


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
                        ("decode", "vllm:request_decode_time_seconds"), ("e2e", "vllm:e2e_request_latency_seconds"),
                        ("time_to_first_token", "vllm:time_to_first_token_seconds"),
                        ("inter_token", "vllm:inter_token_latency_seconds")):
        count = delta(f"{metric}_count")
        if count:
            per = "token" if key == "inter_token" else "request"
            stats[f"engine_{key}_ms_per_{per}"] = 1000 * delta(f"{metric}_sum") / count
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
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable of the started server (repeatable), e.g. "
                             "--server-env VLLM_CPU_OMP_THREADS_BIND=0-1")
    parser.add_argument("--repeats", type=int, default=3, help="alternating sequential/concurrent pairs; medians reported")
    parser.add_argument("--client-delay", type=float, default=0.05,
                        help="per-request delay of the fixed-latency server of the client-only measurement")
    parser.add_argument("--name", default="labelling_throughput", help="the results.json entry")
    args = parser.parse_args()
    if args.server_arg is None:
        args.server_arg = list(DEFAULT_SERVER_ARGS)
    if not any(a.startswith("--dtype") for a in args.server_arg):
        # vLLM-CPU serves bfloat16 by default, which is emulated (many times slower than float32) on a CPU without
        # AVX512-BF16/AMX: the dtype a user of that CPU would serve with
        from merits.pipeline_merits import cpu_has_native_bf16

        args.server_arg.append("--dtype=bfloat16" if cpu_has_native_bf16() is not False else "--dtype=float32")

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
            server_env = {"VLLM_SERVER_DEV_MODE": "1"}  # POST /reset_prefix_cache between runs
            for pair in args.server_env:
                key, sep, value = pair.partition("=")
                if not sep:
                    parser.error(f"--server-env takes KEY=VALUE, got {pair!r}")
                server_env[key] = value
            server = VLLMServer(model_dir, served_name=args.model, log_path=Path(tmp) / "server.log",
                                extra_args=tuple(args.server_arg), env=server_env).start()
            startup = time.perf_counter() - started
            url = server.url
            parameters = model_parameters(model_dir)
        else:
            parameters = 0
        root = url[: -len("/v1")] if url.endswith("/v1") else url
        try:
            timed_run(url, args.model, items[:32], args.concurrency)  # warm-up (also fills the prefix cache)
            sequential_times, concurrent_times, sequential_stats, concurrent_stats = [], [], [], []
            loads = []
            pgid = server.process.pid if server is not None else None

            resets = []

            def measured_run(concurrency: int):
                resets.append(reset_prefix_cache(root, url, args.model))
                before, cpu_before = scrape(root), group_cpu_seconds(pgid) if pgid else None
                elapsed, results, budget = timed_run(url, args.model, items, concurrency)
                stats = engine_stats(before, scrape(root), len(items), elapsed)
                if pgid:
                    stats.update(cpu_stats(cpu_before, group_cpu_seconds(pgid), len(items), elapsed))
                if parameters:
                    stats.update(work_stats(stats, len(items), parameters,
                                            4 if "--dtype=float32" in args.server_arg else 2))
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
            prefix = shared_prefix_tokens(root, args.model)
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
        "concurrent_wall_ms_per_request": 1000 * concurrent / len(items),
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
        "server_env": args.server_env,
        "prefix_cache_reset_before_each_run": all(resets),
        **prefix,
    }
    if server is not None:
        figures["server_startup_s"] = startup
        figures["model_parameters"] = parameters
        worker = figures["concurrent_engine"].get("worker_cpu_ms_per_request")
        if worker:
            # the model runs on one core (vLLM-CPU binds its OpenMP threads and reserves a core for the API
            # server and scheduler): with N in flight, each request still costs its forward passes' CPU time
            figures["speedup_bound_by_concurrent_worker_cpu"] = figures["sequential_wall_ms_per_request"] / worker
    notes = (f"{source}; random Llama {args.hidden_size}x{args.layers}, {args.vocab_size}-token tokenizer "
             f"(vLLM-CPU, server args {' '.join(args.server_arg) or 'default'}"
             f"{', server env ' + ' '.join(args.server_env) if args.server_env else ''}) "
             f"{'started by the benchmark' if server else 'at ' + url}, temperature 0, structured_outputs choice, "
             f"max_tokens {max_tokens}; "
             f"{'prefix cache reset before each run (only the shared prefix cached)' if all(resets) else 'prefix cache NOT reset between runs'}"
             f"; client and server share the machine's {os.cpu_count()} cores with other jobs")
    record(args.name, figures, notes)
    print(f"speedup {figures['speedup']:.2f}x ({figures['sequential_rows_per_s']:.1f} -> "
          f"{figures['concurrent_rows_per_s']:.1f} rows/s), load {load_before[0]:.1f} -> {load_after[0]:.1f}")


if __name__ == "__main__":
    main()
