"""Sharded labelling, several LLM endpoints, merge, and the two README recipes (issue 21).

Every server here is tests/fake_llm_server.py on a free 127.0.0.1 port (a deterministic OpenAI-compatible
stand-in: any server labels a row alike), so that N shard processes, a dying endpoint and a killed shard can be
run in seconds; tests/test_labelling_vllm.py covers the client against a real vLLM server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from merits.labelling.endpoints import EndpointPool, MultiEndpointLabeller, split_urls
from merits.labelling.llm import LLMServerError, RetryPolicy
from merits.labelling.run import main
from merits.labelling.shards import ShardError, check_shard_arguments, merge_shards, shard_dir, shard_of
from merits.labelling.vllm_server import free_port

REPO = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).resolve().parent / "fake_llm_server.py"
WORDS = ["good", "bad", "plain"]


# ---------------------------------------------------------------------------------------------- helpers


class FakeLLM:
    """tests/fake_llm_server.py in a subprocess on a free port; stopped on exit."""

    def __init__(self, delay: float = 0.0, die_after: int | None = None, model: str = "m"):
        self.port = free_port()
        command = [sys.executable, str(FAKE_SERVER), "--port", str(self.port), "--delay", str(delay), "--model", model]
        if die_after is not None:
            command += ["--die-after", str(die_after)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the fake LLM server on port {self.port} did not start")
            time.sleep(0.05)

    def chat_count(self) -> int:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json()["chat"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def servers():
    started = []

    def start(**kwargs) -> FakeLLM:
        server = FakeLLM(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def write_csv(path: Path, n: int) -> Path:
    lines = ["id,text,valence"] + [f"u{i:03d},a {WORDS[i % 3]} day number {i},{(i % 7) + 1}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args, env_extra=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "label_with_llm.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def labelled(out: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(out)).to_list()


def journal_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- shard assignment


def test_shard_assignment_is_deterministic_disjoint_covering_and_balanced():
    ids = [f"MSP-PODCAST_{i:04d}_{j:04d}" for i in range(40) for j in range(50)]
    for n in (1, 3, 8):
        shards = [shard_of(row_id, n) for row_id in ids]
        assert shards == [shard_of(row_id, n) for row_id in reversed(ids)][::-1]  # order does not matter
        counts = Counter(shards)
        assert set(counts) == set(range(n)) and sum(counts.values()) == len(ids)  # each id in exactly one shard
        assert max(counts.values()) - min(counts.values()) <= 6 * (len(ids) / n) ** 0.5  # binomial spread
    # a fixed value: the assignment must not change between versions (a resumed shard would lose its rows)
    assert [shard_of(f"u{i}", 4) for i in range(8)] == [shard_of(f"u{i}", 4) for i in range(8)]
    assert shard_of("u0", 4) == int.from_bytes(__import__("hashlib").sha256(b"u0").digest()[:8], "big") % 4


def test_shard_arguments_are_checked():
    check_shard_arguments(None, None)
    check_shard_arguments(4, 3)
    with pytest.raises(ShardError, match="go together"):
        check_shard_arguments(4, None)
    with pytest.raises(ShardError, match=r"must be in 0\.\.3"):
        check_shard_arguments(4, 4)
    with pytest.raises(ShardError, match=">= 1"):
        check_shard_arguments(0, 0)


# ---------------------------------------------------------------------------------------------- endpoint pool


def test_pool_spreads_by_in_flight_and_takes_a_failed_endpoint_out_then_back():
    now = [0.0]
    pool = EndpointPool(["a", "b", "c"], cooldown=10, clock=lambda: now[0])
    first = [pool.acquire() for _ in range(6)]
    assert Counter(first) == {"a": 2, "b": 2, "c": 2}  # least in flight, round robin on ties
    for url in first:
        pool.release(url)
    pool.release(pool.acquire(), error="ConnectError")  # "a" fails: out of rotation
    assert pool.healthy() == ["b", "c"]
    assert {pool.acquire() for _ in range(8)} == {"b", "c"}
    now[0] = 10.5  # cooldown over: exactly one probe request goes to "a"
    picks = [pool.acquire() for _ in range(4)]
    assert picks.count("a") == 1
    pool.release("a", error="ConnectError")  # the probe fails: twice the cooldown
    assert pool.states["a"].down_until == pytest.approx(10.5 + 20)
    now[0] = 31.0
    assert pool.acquire() == "a"
    pool.release("a")  # the probe answers: back in rotation
    assert pool.healthy() == ["a", "b", "c"] and pool.stats()["a"]["failures"] == 2


def test_pool_with_every_endpoint_out_uses_the_first_to_come_back():
    now = [0.0]
    pool = EndpointPool(["a", "b"], cooldown=10, clock=lambda: now[0])
    pool.release(pool.acquire(), error="x")  # a: down until 10
    now[0] = 1.0
    pool.release(pool.acquire(), error="x")  # b: down until 11
    assert pool.healthy() == [] and pool.acquire() == "a"


def test_split_urls():
    assert split_urls(["http://h:1/v1/, http://h:2/v1", "http://h:1/v1"]) == ["http://h:1/v1", "http://h:2/v1"]
    assert split_urls(None, "http://127.0.0.1:8000/v1") == ["http://127.0.0.1:8000/v1"]
    with pytest.raises(LLMServerError, match="not an http"):
        split_urls(["localhost:8000"])


def _mock_endpoints(dead: set[str]):
    """One httpx transport for several fake endpoints; the hosts in ``dead`` refuse connections."""
    counts = Counter()

    async def handle(request: httpx.Request) -> httpx.Response:
        host = f"{request.url.host}:{request.url.port}"
        if host in dead:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path == "/tokenize":
            return httpx.Response(404)
        counts[host] += 1
        await asyncio.sleep(0.002)
        text = json.loads(request.content)["messages"][-1]["content"]
        return httpx.Response(200, json={"choices": [{"message": {"content": "Positive." if "good" in text else "neutral"}}]})

    return httpx.MockTransport(handle), counts


def test_multi_endpoint_client_spreads_requests_and_survives_a_dead_endpoint():
    transport, counts = _mock_endpoints(dead=set())
    urls = [f"http://127.0.0.1:{port}/v1" for port in (9001, 9002, 9003)]
    labeller = MultiEndpointLabeller(urls, "m", concurrency=2, transport=transport,
                                     retry=RetryPolicy(max_retries=3, base_delay=0.001))
    assert labeller.concurrency == 6
    results = {}
    labeller.label([(f"r{i}", "good" if i % 2 else "x") for i in range(60)], lambda i, r: results.__setitem__(i, r))
    assert len(results) == 60 and results["r1"].label == "positive" and results["r0"].label == "neutral"
    assert set(counts) == {"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"} and min(counts.values()) >= 10

    # one endpoint refuses connections from the start: checked out at the start, the job runs on the rest
    transport, counts = _mock_endpoints(dead={"127.0.0.1:9002"})
    messages = []
    labeller = MultiEndpointLabeller(urls, "m", concurrency=2, transport=transport, log=messages.append,
                                     retry=RetryPolicy(max_retries=1, base_delay=0.001))
    results = {}
    labeller.label([(f"r{i}", "good") for i in range(40)], lambda i, r: results.__setitem__(i, r))
    assert len(results) == 40 and all(r.label == "positive" for r in results.values())
    assert "127.0.0.1:9002" not in counts and any("9002" in m and "does not answer" in m for m in messages)

    # none answers: a clear error naming them
    transport, _ = _mock_endpoints(dead={"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"})
    labeller = MultiEndpointLabeller(urls, "m", transport=transport, retry=RetryPolicy(max_retries=0))
    with pytest.raises(LLMServerError, match="none of the LLM servers answers"):
        labeller.check_sync()


# ---------------------------------------------------------------------------------------------- N processes


@pytest.mark.slow
def test_shards_with_a_killed_shard_and_a_dying_endpoint_merge_to_the_unsharded_result(tmp_path, servers):
    """3 shard processes over 2 endpoints; one endpoint dies mid-job, one shard is SIGKILLed and resumed; merge."""
    csv_path = write_csv(tmp_path / "t.csv", 90)
    steady, dying = servers(delay=0.15), servers(delay=0.15, die_after=12)
    out = tmp_path / "out"
    common = ["--transcripts", csv_path, "--out", out, "--llm-model", "m", "--decoding", "choice", "--llm-url", f"{steady.url},{dying.url}",
              "--concurrency", "2", "--max-retries", "3", "--retry-base-delay", "0.05", "--num-shards", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = {i: subprocess.Popen([sys.executable, str(REPO / "label_with_llm.py"), *map(str, common),
                                      "--shard-index", str(i)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for i in range(3)}
    # kill shard 1 once it has journalled a few labels (it has ~30 rows at 4 in flight x 150 ms)
    journal = shard_dir(out, 1, 3) / "journal" / "labels.jsonl"
    deadline = time.monotonic() + 200
    while len(journal_ids(journal)) < 5 and time.monotonic() < deadline and processes[1].poll() is None:
        time.sleep(0.02)
    processes[1].send_signal(signal.SIGKILL)
    logs = {i: p.communicate(timeout=600) for i, p in processes.items()}
    assert processes[1].returncode == -signal.SIGKILL
    assert not (shard_dir(out, 1, 3) / "journal" / "summary.json").exists()  # killed before it finished
    for i in (0, 2):
        assert processes[i].returncode == 0, logs[i][1]
    assert dying.process.wait(timeout=10) == 0  # the endpoint died mid-job ...
    assert any("out of rotation" in logs[i][1] for i in (0, 2))  # ... and the shards went on without it
    killed_at = journal_ids(journal)
    assert 5 <= len(killed_at) < 30

    # merging now is refused, naming the unfinished shard (the CLI's exit code and message: the slurm test)
    with pytest.raises(ShardError, match=r"shard\(s\) 1 have not finished"):
        merge_shards(out)

    # shard 1 resumes on its own (the dead endpoint still listed: it is taken out again), redoing nothing
    before = steady.chat_count()
    assert main([*common, "--shard-index", 1]) == 0
    ids = journal_ids(journal)
    assert ids[: len(killed_at)] == killed_at and len(ids) == len(set(ids))  # nothing labelled twice
    assert steady.chat_count() - before == len(ids) - len(killed_at)

    assert main(["merge", "--out", out]) == 0
    summary = json.loads((out / "merge.json").read_text())
    assert summary["rows"] == 90 and sum(summary["rows_per_shard"]) == 90 and summary["num_shards"] == 3

    # the same input unsharded, one endpoint: the identical dataset
    assert main(["--transcripts", csv_path, "--out", tmp_path / "single", "--llm-model", "m", "--decoding", "choice", "--llm-url",
                 steady.url, "--concurrency", "8"]) == 0
    assert labelled(out) == labelled(tmp_path / "single")


def test_merge_refuses_overlaps_gaps_foreign_and_missing_shards(tmp_path, servers):
    import datasets

    server = servers()
    csv_path = write_csv(tmp_path / "t.csv", 24)
    out = tmp_path / "out"
    common = ["--transcripts", csv_path, "--out", out, "--llm-model", "m", "--decoding", "choice", "--llm-url", server.url, "--num-shards", "2"]
    assert main([*common, "--shard-index", "0"]) == 0

    with pytest.raises(ShardError, match=r"shard\(s\) 1 never started of 2"):
        merge_shards(out)
    # a shard started with other settings is refused, naming them
    assert main(["--transcripts", csv_path, "--out", out, "--llm-model", "m", "--decoding", "choice", "--llm-url", server.url,
                 "--num-shards", "3", "--shard-index", "1"]) == 2
    assert main([*common, "--shard-index", "1", "--user-template", "say: {text}"]) == 2
    assert main([*common, "--shard-index", "1", "--limit", "10"]) == 2
    assert main([*common, "--shard-index", "1"]) == 0
    assert merge_shards(out)["rows"] == 24

    folder0, folder1 = shard_dir(out, 0, 2), shard_dir(out, 1, 2)
    rows0, rows1 = labelled(folder0), labelled(folder1)
    features = datasets.load_from_disk(str(folder0)).features

    def rewrite(folder: Path, rows: list[dict]) -> None:
        # save beside, then swap: save_to_disk cannot overwrite the dataset it was loaded from
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder) + ".new")
        for item in Path(str(folder) + ".new").iterdir():
            shutil.move(str(item), folder / item.name)

    # an id in two shards
    rewrite(folder1, rows1 + [rows0[0]])
    with pytest.raises(ShardError, match=rf"1 id\(s\) in two shards: \"'{rows0[0]['id']}' in shards 0 and 1\""):
        merge_shards(out)
    # a gap: shard 1 lost a row
    rewrite(folder1, rows1[1:])
    with pytest.raises(ShardError, match=rf"shard 1 lacks 1 row\(s\): '{rows1[0]['id']}'"):
        merge_shards(out)
    # a failed row is refused unless --allow-failed
    rewrite(folder1, [{**rows1[0], "label": -1, "llm_reply": None, "llm_error": "HTTP 400: too long"}] + rows1[1:])
    with pytest.raises(ShardError, match=r"shard 1 has 1 row\(s\) whose LLM request failed"):
        merge_shards(out)
    assert merge_shards(out, allow_failed=True)["counts"]["failed"] == 1
    # a folder of another --num-shards
    (out / "shards" / "00001-of-00004").mkdir()
    with pytest.raises(ShardError, match="00001-of-00004 do not belong to this 2-shard run"):
        merge_shards(out)


def test_an_empty_shard_is_finished_and_merges(tmp_path, servers):
    server = servers()
    csv_path = write_csv(tmp_path / "t.csv", 3)
    out = tmp_path / "out"
    ids = [f"u{i:03d}" for i in range(3)]
    num = 8
    empty = next(i for i in range(num) if all(shard_of(x, num) != i for x in ids))
    for index in range(num):
        code = main(["--transcripts", csv_path, "--out", out, "--llm-model", "m", "--decoding", "choice", "--llm-url", server.url,
                     "--num-shards", num, "--shard-index", index])
        assert code == 0
    assert (shard_dir(out, empty, num) / "journal" / "summary.json").exists()
    assert merge_shards(out)["rows"] == 3 and [row["id"] for row in labelled(out)] == ids


# ---------------------------------------------------------------------------------------------- README recipes


@pytest.mark.slow
def test_multi_gpu_recipe_script_runs_shards_and_merges(tmp_path, servers):
    first, second = servers(delay=0.01), servers(delay=0.01)
    csv_path = write_csv(tmp_path / "t.csv", 40)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "DEVICE": "cpu", "CONCURRENCY": "4",
           "LLM_URLS": f"{first.url},{second.url}"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "label_multi_gpu.sh"), str(out), "3", "--transcripts",
                             str(csv_path), "--llm-model", "m", "--decoding", "choice"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "merged 3 shards: 40 rows" in result.stderr
    assert len(labelled(out)) == 40 and first.chat_count() > 0 and second.chat_count() > 0


@pytest.mark.slow
def test_slurm_array_recipe_script_each_task_with_its_own_server(tmp_path):
    """The sbatch script run as 3 array tasks at once (SLURM_ARRAY_TASK_ID), each starting its own "vLLM"
    server (tests/fake_vllm stands in for the vllm package), then the merge job's command."""
    csv_path = write_csv(tmp_path / "t.csv", 30)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'fake_vllm'}", "PYTHON": sys.executable,
           "VLLM_PYTHON": sys.executable, "OUT": str(out),
           "LLM_MODEL": "m", "NUM_SHARDS": "3", "DEVICE": "cpu", "SERVER_WAIT": "120",
           # the stand-in server answers text only (no log-probabilities): the choice route
           "INPUT_ARGS": f"--transcripts {csv_path} --decoding choice"}
    env.pop("LLM_URLS", None)
    tasks = [subprocess.Popen(["bash", str(REPO / "scripts" / "label_slurm_array.sbatch")],
                              env={**env, "SLURM_ARRAY_TASK_ID": str(i), "PORT": str(free_port())},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for task in tasks:
        _, err = task.communicate(timeout=600)
        assert task.returncode == 0, err
    merged = cli("merge", "--out", out)
    assert merged.returncode == 0, merged.stderr
    assert "merged 3 shards: 30 rows" in merged.stderr
    assert [row["id"] for row in labelled(out)] == [f"u{i:03d}" for i in range(30)]
    assert {row["llm_model"] for row in labelled(out)} == {"m"}


def test_slurm_array_recipe_script_refuses_what_it_cannot_run(tmp_path):
    """The sbatch script's own failures, without Slurm: not an array task; a missing setting; a vLLM server that
    exits at once (its task fails at once, naming the server's log, instead of waiting SERVER_WAIT seconds)."""
    script = str(REPO / "scripts" / "label_slurm_array.sbatch")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "LLM_MODEL": "m", "NUM_SHARDS": "2", "DEVICE": "cpu", "SERVER_WAIT": "60", "INPUT_ARGS": "--transcripts x.csv"}
    for name in ("LLM_URLS", "SLURM_ARRAY_TASK_ID"):
        env.pop(name, None)
    run = lambda **more: subprocess.run(["bash", script], env={**env, **more}, capture_output=True, text=True, timeout=120)
    result = run()
    assert result.returncode != 0 and "not an array task (submit with sbatch --array=0-N)" in result.stderr
    result = run(SLURM_ARRAY_TASK_ID="1", NUM_SHARDS="")
    assert result.returncode != 0 and "NUM_SHARDS: set NUM_SHARDS" in result.stderr
    result = run(SLURM_ARRAY_TASK_ID="1", VLLM_PYTHON="false", PORT=str(free_port()))
    assert result.returncode == 1, result.stderr
    assert f"the vLLM server of task 1 did not come up; see {tmp_path / 'out' / 'logs' / 'vllm-1.log'}" in result.stderr
    assert not (tmp_path / "out" / "shards").exists()  # no labelling started
