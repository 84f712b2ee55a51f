"""A local vLLM OpenAI-compatible server for tests and benchmarks (127.0.0.1 only).

- :func:`vllm_python` finds the python of the vLLM venv (``MERITS_VLLM_PYTHON``, else
  ``${MERITS_VLLM_VENV:-~/.cache/merits-vllm-venv}/bin/python``; ``scripts/setup_vllm_venv.sh`` makes it).
- :func:`build_tiny_llama` saves a tiny random Llama and a locally trained byte-level BPE tokenizer
  with a chat template: enough for vLLM to serve it (no downloads).
- :class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` on a free port with
  ``VLLM_CPU_KVCACHE_SPACE=1`` and ``--enforce-eager``, waits (bounded) until ``/v1/models`` answers,
  and stops it (its whole process group) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

DEFAULT_VENV = Path.home() / ".cache" / "merits-vllm-venv"

#: The chat template of the tiny test model (role-tagged turns, then the assistant prompt).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _terminate_with_parent() -> None:
    """In the forked child (Linux): ask the kernel for SIGTERM when the parent process exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def vllm_python() -> Path | None:
    """The vLLM venv's python, or ``None`` when it does not exist."""
    explicit = os.environ.get("MERITS_VLLM_PYTHON")
    if explicit:
        return Path(explicit) if Path(explicit).exists() else None
    venv = Path(os.environ.get("MERITS_VLLM_VENV", DEFAULT_VENV))
    python = venv / "bin" / "python"
    return python if python.exists() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_llama(directory: str | os.PathLike, seed: int = 0, hidden_size: int = 128, num_layers: int = 2,
                     vocab_size: int = 512, extra_corpus: Sequence[str] = ()) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` + a locally trained tokenizer (with a chat template).

    The three sentiment words are single tokens of the tokenizer (a random model under a choice
    constraint may still spell them in pieces: see :func:`merits.labelling.llm.choice_token_budget`).
    Head size 64: vLLM's CPU attention kernels reject smaller heads (``hidden_size`` must be a multiple
    of 64). ``vocab_size`` and ``extra_corpus`` (e.g. the transcripts to label) give a tokenizer that
    compresses text about as a real LLM's does (~1.2 tokens per English word instead of ~3).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "You are a sentiment classification bot. Given the [sentence], classify as positive, negative or neutral "
        "sentiment. Please give the sentiment and no extra text as output.",
        "[sentence]: this is a tiny test sentence about how people speak and feel",
        "positive", "negative", "neutral", "system", "user", "assistant",
    ] * 50 + list(extra_corpus)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=max(1, hidden_size // 128),
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


class VLLMServer:
    """A vLLM OpenAI server process on ``127.0.0.1``; use as a context manager.

    Args:
        model_dir: the model folder to serve.
        served_name: the name clients pass as ``model``.
        python: the vLLM venv's python (default :func:`vllm_python`).
        port: default a free port.
        log_path: where the server's output goes (default ``model_dir/../vllm-server.log``).
        startup_timeout: seconds to wait for ``/v1/models``.
        extra_args: more server arguments, e.g. ``("--max-num-seqs=128",)``.
        env: more environment variables for the server, e.g. ``{"VLLM_SERVER_DEV_MODE": "1"}`` (which
            adds ``POST /reset_prefix_cache``) or ``{"VLLM_CPU_OMP_THREADS_BIND": "0-1"}``.
    """

    def __init__(self, model_dir, served_name: str = "tiny-llama", python=None, port: int | None = None,
                 log_path=None, startup_timeout: float = 300.0, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.python = Path(python) if python else vllm_python()
        if self.python is None:
            raise FileNotFoundError("no vLLM venv: run `bash scripts/setup_vllm_venv.sh` (or set MERITS_VLLM_PYTHON)")
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else self.model_dir.parent / f"vllm-server-{self.port}.log"
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VLLMServer":
        import httpx

        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
        env.update(self.env)
        command = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # appended: a restarted server keeps the earlier log
        # a process group of its own, so that stop() ends the engine worker processes too; and SIGTERM when
        # the starting process dies without stopping it (a test run killed by a timeout), so no server leaks
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            returncode = self.process.poll()
            if returncode is not None:
                self.stop()
                raise RuntimeError(f"the vLLM server exited with code {returncode} at start-up; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the vLLM server did not answer within {self.startup_timeout:.0f} s; log: {self.log_path}\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._log.close()
        self.process = None

    def kill(self) -> None:
        """Crash the server: SIGKILL its whole process group (API server and engine core) at once."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        self.stop()

    def restart(self) -> "VLLMServer":
        """Stop the server if it runs and start it again on the same port (clients keep their URL)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
