"""LLM sentiment pseudo-labelling (MERITS-L pre-training, papers.md §3.2).

Two engines label a transcript as ``positive`` / ``negative`` / ``neutral``:

- :class:`OpenAICompatibleLabeller`: any OpenAI-compatible chat-completions endpoint (a local vLLM
  server in this project). Several requests are kept in flight with ``asyncio`` + ``httpx``; failed
  requests are retried with exponential backoff; the reply is constrained with vLLM structured
  outputs (``"structured_outputs": {"choice": [...]}`` in the request body).
- :class:`InProcessVLLMLabeller`: ``vllm.LLM`` in this process (imported lazily), the same prompt and
  the same ``structured_outputs`` constraint through ``SamplingParams``.

The reply budget (``max_tokens``) never cuts a constrained label: by default it is
:func:`choice_token_budget` (the longest label's UTF-8 length, raised by the served tokenizer's canonical
counts from vLLM's ``/tokenize`` when available, + 1 for EOS; 16 when the tokenizer cannot be asked);
the paper reproducer's 4 tokens is the default only without the constraint (GPT-style endpoints).

Two decodings (:attr:`PromptTemplate.decoding`):

- ``"choice"``: the reply is generated under the choice constraint and parsed (the paper's route).
- ``"logprobs"``: one token is generated with ``logprobs``/``top_logprobs`` (OpenAI fields, served by vLLM as
  the *raw* model distribution), each label is scored by the log-probability of its word at the reply's first
  position (:func:`label_scores_from_top_logprobs`), and the label is the argmax after subtracting a log-prior
  (:attr:`PromptTemplate.calibration`): ``"mean"`` = each label's mean log-probability over the labelled rows
  (applied once all rows are scored, :func:`mean_calibrated_labels`), ``"content-free"`` = the label
  probabilities the prompt gives content-free inputs (Zhao et al. 2021, "Calibrate before use";
  :data:`CONTENT_FREE_INPUTS`), ``"none"``. A small instruct model's bias towards one label (SmolLM2-135M
  never answers ``neutral`` under the paper's prompt) is what the calibration removes.

Both return :class:`LabelResult` objects; :func:`parse_label` maps a reply to a label defensively
(papers.md §6 #4: the first label word the reply contains), and an unparseable reply is kept with
``label=None`` so that it is recorded, never silently lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Sequence

#: The three pseudo-label classes of MERITS-L, in the order the prompt names them.
SENTIMENT_LABELS: tuple[str, ...] = ("positive", "negative", "neutral")

#: The labelling prompt of papers.md §3.2, sent as the system message.
DEFAULT_SYSTEM_PROMPT = (
    "You are a sentiment classification bot. Given the [sentence], classify as positive, "
    "negative or neutral sentiment. Please give the sentiment and no extra text as output."
)
#: The user message; ``{text}`` is replaced by the transcript.
DEFAULT_USER_TEMPLATE = "[sentence]: {text}"

#: The reply budget of an *unconstrained* GPT-style endpoint (the reproducer's setting, papers.md §3.2):
#: a chat model answers "Negative." in 1-3 tokens and 4 stops a chatty one early. Used when
#: ``max_tokens`` is ``None`` and structured outputs are off.
UNCONSTRAINED_MAX_TOKENS = 4
#: The choice-constrained budget when the served tokenizer cannot be asked (no ``/tokenize`` endpoint).
FALLBACK_CHOICE_MAX_TOKENS = 16

#: ``choice``: a constrained reply, parsed; ``logprobs``: the labels scored by their first-position log-probability.
DECODINGS: tuple[str, ...] = ("choice", "logprobs")
#: How the log-probability scores are calibrated before the argmax (``decoding="logprobs"`` only).
CALIBRATIONS: tuple[str, ...] = ("none", "mean", "content-free")
#: Content-free inputs of contextual calibration (Zhao et al. 2021): their mean label probabilities are the prior.
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "", "[MASK]")
#: ``top_logprobs`` asked for: vLLM's default ``--max-logprobs`` (20) is the most a stock server returns.
DEFAULT_TOP_LOGPROBS = 20
#: ``label_with_llm.py``'s defaults (the winner of the prompt / decoding comparison on MELD train, README).
DEFAULT_DECODING = "logprobs"
DEFAULT_CALIBRATION = "mean"


def choice_token_budget(labels: Sequence[str], token_counts: dict[str, int] | None = None) -> int:
    """A ``max_tokens`` that can never cut a choice-constrained reply.

    Under a ``choice`` constraint the model may spell a label in *any* token sequence the grammar
    accepts, not only the tokenizer's canonical one: a small or random model often writes
    ``n`` + ``eu`` + ``tral`` although ``neutral`` is one token (measured with the test model: replies
    cut to ``neutr`` at 4 tokens). Every token the grammar allows decodes to at least one byte, so the
    UTF-8 length of the longest label bounds the reply; ``token_counts`` (the canonical counts from the
    served tokenizer, when known) only ever raise it. One more token lets the model emit EOS, so the
    reply ends with ``finish_reason="stop"``. Without ``token_counts`` the budget is at least
    :data:`FALLBACK_CHOICE_MAX_TOKENS`.
    """
    if not labels:
        raise ValueError("no labels")
    longest = max(max(len(label.encode("utf-8")), (token_counts or {}).get(label, 0)) for label in labels)
    budget = longest + 1
    return budget if token_counts else max(budget, FALLBACK_CHOICE_MAX_TOKENS)


class LLMServerError(RuntimeError):
    """The LLM endpoint cannot be used (down, wrong model name, bad request); the message says why."""


@dataclass(frozen=True)
class PromptTemplate:
    """The labelling prompt and decoding settings. Everything that changes a reply enters :meth:`hash`.

    ``max_tokens=None`` (the default) means: with ``structured_outputs`` (a ``choice`` constraint),
    enough tokens for the longest label (:func:`choice_token_budget`, resolved by the labeller against
    the served tokenizer), so that no reply is ever cut; without it, :data:`UNCONSTRAINED_MAX_TOKENS`
    (4, the GPT-style setting of the paper's reproducer). An explicit integer is used as given.
    """

    system: str = DEFAULT_SYSTEM_PROMPT
    user: str = DEFAULT_USER_TEMPLATE
    labels: tuple[str, ...] = SENTIMENT_LABELS
    temperature: float = 0.0
    max_tokens: int | None = None
    structured_outputs: bool = True
    #: example ``(text, label)`` pairs, sent as user / assistant turns before the transcript (few-shot)
    few_shot: tuple[tuple[str, str], ...] = ()
    decoding: str = "choice"
    calibration: str = "none"
    top_logprobs: int = DEFAULT_TOP_LOGPROBS

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.calibration != "none" and self.decoding != "logprobs":
            raise ValueError(f"calibration {self.calibration!r} needs decoding='logprobs' (it calibrates label scores)")
        if not 1 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in 1..20 (vLLM's default --max-logprobs), got {self.top_logprobs}")
        object.__setattr__(self, "few_shot", tuple((str(text), str(label)) for text, label in self.few_shot))
        for text, label in self.few_shot:
            if label not in self.labels:
                raise ValueError(f"few-shot example {text!r} has label {label!r}, not one of {self.labels}")
        if "{text}" not in self.user:
            raise ValueError(f"the user template must contain '{{text}}', got {self.user!r}")
        if len(set(self.labels)) != len(self.labels) or not self.labels:
            raise ValueError(f"labels must be distinct and non-empty, got {self.labels!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")

    def default_max_tokens(self, token_counts: dict[str, int] | None = None) -> int:
        """The budget actually requested: ``max_tokens`` if set, else the default of the mode (see the class)."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.decoding == "logprobs":
            return 1
        if self.structured_outputs:
            return choice_token_budget(self.labels, token_counts)
        return UNCONSTRAINED_MAX_TOKENS

    def messages(self, text: str) -> list[dict[str, str]]:
        """Chat messages for one transcript: the system prompt, the few-shot turns, then ``[sentence]: <text>``."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for example, label in self.few_shot:
            messages.append({"role": "user", "content": self.user.replace("{text}", example)})
            messages.append({"role": "assistant", "content": label})
        messages.append({"role": "user", "content": self.user.replace("{text}", text)})
        return messages

    def hash(self) -> str:
        """A short sha256 of the prompt, label set and decoding settings (stored with every label).

        Settings added later (few-shot, decoding, calibration, top_logprobs) enter only when they differ
        from their defaults, so the hash of a plain choice-decoded prompt, and the journals keyed by it,
        stay as they were.
        """
        settings = {
            "system": self.system,
            "user": self.user,
            "labels": list(self.labels),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "structured_outputs": self.structured_outputs,
        }
        if self.few_shot:
            settings["few_shot"] = [list(pair) for pair in self.few_shot]
        if self.decoding != "choice":
            settings.update(decoding=self.decoding, calibration=self.calibration, top_logprobs=self.top_logprobs)
        payload = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def read_few_shot_csv(path) -> tuple[tuple[str, str], ...]:
    """Few-shot examples from a CSV with columns ``text`` and ``label`` (one of the sentiment labels)."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a few-shot CSV needs columns text and label, has {reader.fieldnames}")
        pairs = []
        for line, row in enumerate(reader, start=2):
            if row["label"] not in SENTIMENT_LABELS:
                raise ValueError(f"{path}, line {line}: label {row['label']!r} is not one of {SENTIMENT_LABELS}")
            pairs.append((row["text"], row["label"]))
    if not pairs:
        raise ValueError(f"{path}: no few-shot examples")
    return tuple(pairs)


def parse_label(reply: str | None, labels: Sequence[str] = SENTIMENT_LABELS) -> str | None:
    """Map an LLM reply to a label: the label word that occurs *first* in the reply, or ``None``.

    Matching is case-insensitive and on whole words ("Negative." and "sentiment: neutral" parse; "non-
    positive" parses as positive, as the spec's rule says; "positi" — a reply cut by ``max_tokens`` —
    does not).
    """
    if not reply:
        return None
    lowered = reply.lower()
    best: tuple[int, str] | None = None
    for label in labels:
        match = re.search(rf"(?<![a-z]){re.escape(label.lower())}(?![a-z])", lowered)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), label)
    return best[1] if best else None


@dataclass
class LabelResult:
    """The outcome of labelling one transcript.

    ``error`` is set (and ``reply`` is ``None``) when the request failed for this row after retries
    with a row-specific error (e.g. HTTP 400: prompt too long); such rows are retried on a rerun.
    """

    reply: str | None
    label: str | None
    error: str | None = None
    #: ``decoding="logprobs"``: each label's raw log-probability (before calibration)
    scores: dict[str, float] | None = None


def label_surface_forms(label: str) -> tuple[str, ...]:
    """The spellings a chat model starts a one-word label reply with: ``neutral``, ``Neutral``, with or without a space.

    Upper case is left out: its first tokens are generic (``N``, ``NE``, ``POS`` in SmolLM2's vocabulary).
    """
    forms = []
    for word in (label.lower(), label.capitalize()):
        for form in (word, " " + word):
            if form not in forms:
                forms.append(form)
    return tuple(forms)


def first_token_map(first_tokens: dict[str, Iterable[str]]) -> dict[str, str]:
    """token text -> label, from each label's canonical first tokens; a token two labels share is dropped."""
    owners: dict[str, set[str]] = {}
    for label, tokens in first_tokens.items():
        for token in tokens:
            owners.setdefault(token, set()).add(label)
    return {token: next(iter(labels)) for token, labels in owners.items() if len(labels) == 1}


def label_scores_from_top_logprobs(
    entries: Sequence[dict], labels: Sequence[str] = SENTIMENT_LABELS, token_labels: dict[str, str] | None = None
) -> tuple[dict[str, float], tuple[str, ...]]:
    """Each label's log-probability at one position, from that position's ``top_logprobs`` entries.

    ``entries`` are OpenAI ``{"token": str, "logprob": float}`` dicts. With ``token_labels`` (token text ->
    label: the first token of each of :func:`label_surface_forms` under the served tokenizer, see
    :func:`first_token_map`) a token counts for the label it starts, so SmolLM2's ``Ne`` (+ ``utral``) counts
    for neutral. Without it, a token counts for a label when its text, stripped and lower-cased, is the label
    or a prefix of it of at least 3 characters that starts no other label. A label's score is the log of the
    summed probabilities of its tokens. A label none of whose tokens is among the entries gets the smallest
    logprob returned (an upper bound on its own) and is named in the second element of the result.
    """
    if not entries:
        raise ValueError("no top_logprobs entries (is logprobs enabled on the server?)")
    lowered = [label.lower() for label in labels]
    mass: dict[str, list[float]] = {label: [] for label in labels}
    for entry in entries:
        token = str(entry["token"])
        if token_labels is not None:
            label = token_labels.get(token)
            if label in mass:
                mass[label].append(float(entry["logprob"]))
            continue
        word = token.strip().lower()
        matches = [label for label, low in zip(labels, lowered) if low == word or (len(word) >= 3 and low.startswith(word))]
        if len(matches) == 1:
            mass[matches[0]].append(float(entry["logprob"]))
    floor = min(float(entry["logprob"]) for entry in entries)
    scores, missing = {}, []
    for label in labels:
        if mass[label]:
            top = max(mass[label])
            scores[label] = top + math.log(sum(math.exp(value - top) for value in mass[label]))
        else:
            scores[label] = floor
            missing.append(label)
    return scores, tuple(missing)


def decide_label(scores: dict[str, float], prior: dict[str, float] | None = None,
                 labels: Sequence[str] = SENTIMENT_LABELS) -> str:
    """The label with the highest ``score - prior`` (ties go to the earlier label in ``labels``)."""
    prior = prior or {}
    return max(labels, key=lambda label: (scores[label] - prior.get(label, 0.0), -labels.index(label)))


def mean_log_prior(score_rows: Iterable[dict[str, float]], labels: Sequence[str] = SENTIMENT_LABELS) -> dict[str, float]:
    """``calibration="mean"``: each label's mean raw log-probability over the scored rows."""
    rows = [row for row in score_rows if row]
    if not rows:
        raise ValueError("no scored rows to estimate the label prior from")
    return {label: sum(row[label] for row in rows) / len(rows) for label in labels}


def content_free_log_prior(score_rows: Sequence[dict[str, float]], labels: Sequence[str] = SENTIMENT_LABELS) -> dict[str, float]:
    """``calibration="content-free"``: log of the mean label distribution (renormalised over the labels)."""
    if not score_rows:
        raise ValueError("no content-free scores")
    mean = {label: 0.0 for label in labels}
    for row in score_rows:
        top = max(row[label] for label in labels)
        total = sum(math.exp(row[label] - top) for label in labels)
        for label in labels:
            mean[label] += math.exp(row[label] - top) / total / len(score_rows)
    return {label: math.log(max(mean[label], 1e-12)) for label in labels}


def mean_calibrated_labels(score_rows: Sequence[dict[str, float] | None],
                           labels: Sequence[str] = SENTIMENT_LABELS) -> tuple[list[str | None], dict[str, float]]:
    """``calibration="mean"`` over a finished run: the labels after subtracting :func:`mean_log_prior`.

    Rows without scores (failed requests) stay ``None``. Returns the labels and the prior used.
    """
    prior = mean_log_prior([row for row in score_rows if row], labels)
    return [decide_label(row, prior, labels) if row else None for row in score_rows], prior


@dataclass
class RetryPolicy:
    """Exponential backoff: wait ``base * 2**attempt`` (capped, with jitter) between attempts."""

    max_retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * (0.75 + 0.5 * random.random())


class _Retryable(Exception):
    """A transient failure (connection refused/reset, timeout, HTTP 429/5xx)."""


class OpenAICompatibleLabeller:
    """Labels transcripts through ``POST {base_url}/chat/completions`` with several requests in flight.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name (as listed by ``GET {base_url}/models``).
        prompt: the :class:`PromptTemplate`.
        concurrency: requests kept in flight at once.
        retry: the :class:`RetryPolicy` for transient failures.
        timeout: seconds per request.
        api_key: sent as a bearer token when given (a local vLLM server needs none).
        transport: an ``httpx.AsyncBaseTransport`` to use instead of the network (tests).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: PromptTemplate | None = None,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        api_key: str | None = None,
        transport=None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.prompt = prompt or PromptTemplate()
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = transport
        #: the ``max_tokens`` sent; resolved by :meth:`resolve_max_tokens` (or at the start of labelling)
        self.max_tokens: int | None = self.prompt.max_tokens if self.prompt.max_tokens is not None else (
            None if self.prompt.structured_outputs else UNCONSTRAINED_MAX_TOKENS)
        if self.prompt.decoding == "logprobs":
            self.max_tokens = 1
        #: the log-prior subtracted from the label scores (content-free calibration; set by resolve_prior)
        self.prior: dict[str, float] | None = None
        #: token text -> label for ``decoding="logprobs"`` (from the served tokenizer; set by resolve_label_tokens)
        self.token_labels: dict[str, str] | None = None

    @property
    def name(self) -> str:
        return self.model

    def _client(self):
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        return httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers, transport=self.transport)

    @property
    def server_root(self) -> str:
        """``base_url`` without its ``/v1`` suffix: where vLLM serves ``/tokenize``."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    async def label_token_counts(self, client) -> dict[str, int] | None:
        """Canonical token counts of the labels from the server's ``POST /tokenize`` (vLLM), or ``None``.

        ``None`` when the endpoint does not exist or does not answer as vLLM's does (another
        OpenAI-compatible server); never an error: the budget then falls back to a safe constant.
        """
        import httpx

        counts: dict[str, int] = {}
        for label in self.prompt.labels:
            try:
                response = await client.post(
                    f"{self.server_root}/tokenize",
                    json={"model": self.model, "prompt": label, "add_special_tokens": False},
                )
                count = int(response.json()["count"]) if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                count = None
            if count is None:
                return None
            counts[label] = count
        return counts

    async def resolve_max_tokens(self, client=None) -> int:
        """Fix :attr:`max_tokens` (once): the prompt's value, else a budget no label can exceed."""
        if self.max_tokens is None:
            own_client = client is None
            client = client or self._client()
            try:
                counts = await self.label_token_counts(client)
            finally:
                if own_client:
                    await client.aclose()
            self.max_tokens = self.prompt.default_max_tokens(counts)
        return self.max_tokens

    def request_body(self, text: str) -> dict:
        """The JSON body of one chat-completions request (temperature 0, choice-constrained, ``max_tokens``).

        ``max_tokens`` is :attr:`max_tokens` once resolved; before that, the safe constant budget.
        """
        body = {
            "model": self.model,
            "messages": self.prompt.messages(text),
            "temperature": self.prompt.temperature,
            "max_tokens": self.max_tokens if self.max_tokens is not None else self.prompt.default_max_tokens(),
        }
        if self.prompt.decoding == "logprobs":
            # one token, the raw distribution's top entries at the reply's first position (no constraint:
            # vLLM returns raw log-probabilities, which a choice constraint would not change)
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.prompt.top_logprobs)
            return body
        if self.prompt.structured_outputs:
            # vLLM >= 0.11 structured outputs; the older "guided_choice" key is silently ignored by vLLM.
            body["structured_outputs"] = {"choice": list(self.prompt.labels)}
        return body

    async def served_models(self, client=None) -> list[str]:
        """The model names served at ``base_url`` (``GET /models``); :class:`LLMServerError` if unreachable."""
        import httpx

        own_client = client is None
        client = client or self._client()
        try:
            last_error: Exception | None = None
            for attempt in range(self.retry.max_retries + 1):
                try:
                    response = await client.get(f"{self.base_url}/models")
                except (httpx.TransportError, httpx.TimeoutException) as error:
                    last_error = error
                else:
                    if response.status_code < 500:
                        break
                    last_error = LLMServerError(f"HTTP {response.status_code}: {response.text[:200]}")
                if attempt < self.retry.max_retries:
                    await asyncio.sleep(self.retry.delay(attempt))
            else:
                raise LLMServerError(
                    f"cannot reach the LLM server at {self.base_url} ({type(last_error).__name__}: {last_error}); "
                    f"is it running? (start one with `python -m vllm.entrypoints.openai.api_server --model ...`)"
                )
            if response.status_code != 200:
                raise LLMServerError(
                    f"{self.base_url}/models answered HTTP {response.status_code}: {response.text[:300]}"
                )
            try:
                return [entry["id"] for entry in response.json()["data"]]
            except (ValueError, KeyError, TypeError) as error:
                raise LLMServerError(
                    f"{self.base_url}/models did not return an OpenAI model list: {response.text[:300]}"
                ) from error
        finally:
            if own_client:
                await client.aclose()

    async def check(self, client=None) -> None:
        """Fail early and clearly: the server must answer and serve ``self.model``."""
        models = await self.served_models(client)
        if self.model not in models:
            raise LLMServerError(
                f"the LLM server at {self.base_url} does not serve a model named {self.model!r}; "
                f"served models: {', '.join(models) or '(none)'} (pass one of them with --llm-model)"
            )

    async def _post(self, client, body: dict, base_url: str | None = None) -> str:
        import httpx

        try:  # base_url: the endpoint merits.labelling.endpoints picked for this request (several --llm-url)
            response = await client.post(f"{base_url or self.base_url}/chat/completions", json=body)
        except (httpx.TransportError, httpx.TimeoutException) as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from error
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code == 404:
            raise LLMServerError(f"{self.base_url}/chat/completions answered 404: {response.text[:300]}")
        if response.status_code != 200:
            raise _RowError(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            choice = response.json()["choices"][0]
            choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            kind = response.headers.get("content-type", "no content type")
            raise _RowError(f"malformed reply (HTTP {response.status_code}, {kind}; not an OpenAI chat completion: a "
                            f"proxy or web page at --llm-url?): {response.text[:300]}") from error
        return choice

    def result_from_choice(self, choice: dict) -> LabelResult:
        """A :class:`LabelResult` from one OpenAI ``choices[0]``: the parsed reply, or the scored labels."""
        reply = choice["message"]["content"] or ""
        if self.prompt.decoding != "logprobs":
            return LabelResult(reply=reply, label=parse_label(reply, self.prompt.labels))
        try:
            entries = choice["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError) as error:
            raise _RowError(f"the reply has no logprobs.content[0].top_logprobs (the server ignored logprobs?): "
                            f"{json.dumps(choice)[:300]}") from error
        try:
            scores, _ = label_scores_from_top_logprobs(entries, self.prompt.labels, self.token_labels)
        except (ValueError, KeyError, TypeError) as error:
            raise _RowError(f"unusable top_logprobs: {json.dumps(entries)[:300]}") from error
        return LabelResult(reply=reply, label=decide_label(scores, self.prior, self.prompt.labels), scores=scores)

    async def resolve_label_tokens(self, client) -> dict[str, str] | None:
        """The first token of every :func:`label_surface_forms` spelling under the served tokenizer (vLLM's
        ``/tokenize`` + ``/detokenize``), as text -> label; ``None`` (the text rule) when the server has no such
        endpoints."""
        import httpx

        if self.prompt.decoding != "logprobs" or self.token_labels is not None:
            return self.token_labels
        first: dict[str, set[str]] = {}
        try:
            for label in self.prompt.labels:
                for form in label_surface_forms(label):
                    response = await client.post(f"{self.server_root}/tokenize",
                                                 json={"model": self.model, "prompt": form, "add_special_tokens": False})
                    if response.status_code != 200:
                        return None
                    ids = response.json()["tokens"][:1]
                    response = await client.post(f"{self.server_root}/detokenize", json={"model": self.model, "tokens": ids})
                    if response.status_code != 200:
                        return None
                    first.setdefault(label, set()).add(response.json()["prompt"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        self.token_labels = first_token_map(first)
        return self.token_labels

    async def resolve_prior(self, client=None) -> dict[str, float] | None:
        """``calibration="content-free"``: score :data:`CONTENT_FREE_INPUTS` once and fix :attr:`prior`."""
        if self.prompt.calibration != "content-free" or self.prior is not None:
            return self.prior
        own_client = client is None
        client = client or self._client()
        try:
            await self.resolve_label_tokens(client)
            rows = []
            for text in CONTENT_FREE_INPUTS:
                result = await self.label_one(client, text)
                if result.scores is None:
                    raise LLMServerError(f"cannot score the content-free input {text!r}: {result.error}")
                rows.append(result.scores)
        finally:
            if own_client:
                await client.aclose()
        self.prior = content_free_log_prior(rows, self.prompt.labels)
        return self.prior

    async def label_one(self, client, text: str) -> LabelResult:
        """Label one transcript, retrying transient failures; :class:`LLMServerError` when retries run out."""
        body = self.request_body(text)
        for attempt in range(self.retry.max_retries + 1):
            try:
                choice = await self._post(client, body)
                result = self.result_from_choice(choice)
            except _Retryable as error:
                if attempt == self.retry.max_retries:
                    raise LLMServerError(
                        f"the LLM server at {self.base_url} kept failing after {attempt + 1} attempts "
                        f"(last: {error}); finished rows are kept, rerun the same command to resume"
                    ) from error
                await asyncio.sleep(self.retry.delay(attempt))
            except _RowError as error:
                return LabelResult(reply=None, label=None, error=str(error))
            else:
                return result
        raise AssertionError("unreachable")

    async def label_stream(
        self,
        items: Iterable[tuple[str, str]],
        on_result: Callable[[str, LabelResult], Awaitable[None] | None],
        check: bool = True,
    ) -> None:
        """Label ``(id, text)`` pairs with ``concurrency`` workers; ``on_result(id, result)`` as each arrives.

        The first fatal error (server gone after retries) stops all workers and is raised; results
        already delivered to ``on_result`` stay delivered.
        """
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        async with self._client() as client:
            if check:
                await self.check(client)
            await self.resolve_max_tokens(client)
            await self.resolve_label_tokens(client)
            await self.resolve_prior(client)

            async def worker():
                while True:
                    try:
                        row_id, text = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    result = await self.label_one(client, text)
                    outcome = on_result(row_id, result)
                    if asyncio.iscoroutine(outcome):
                        await outcome

            workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, max(queue.qsize(), 1)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def label(self, items: Iterable[tuple[str, str]], on_result: Callable[[str, LabelResult], None]) -> None:
        """Synchronous wrapper around :meth:`label_stream`."""
        asyncio.run(self.label_stream(items, on_result))

    def check_sync(self) -> None:
        """Check the server and model (:meth:`check`), then fix the reply budget (:meth:`resolve_max_tokens`)."""

        async def check_and_resolve():
            async with self._client() as client:
                await self.check(client)
                await self.resolve_max_tokens(client)
                await self.resolve_label_tokens(client)
                await self.resolve_prior(client)

        asyncio.run(check_and_resolve())


class _RowError(Exception):
    """A failure specific to one row (HTTP 4xx other than 404/429, a malformed reply)."""


@dataclass
class InProcessVLLMLabeller:
    """Labels with ``vllm.LLM`` loaded in this process (``--engine inprocess``).

    ``vllm`` is imported only when this class is used. ``model`` is a local model folder (or a name
    vLLM resolves); ``batch_size`` rows are submitted per ``LLM.chat`` call and reported as a batch.
    """

    model: str
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    batch_size: int = 64
    engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        try:
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError as error:
            raise LLMServerError(
                "--engine inprocess needs the `vllm` package in this Python; run label_with_llm.py with the "
                "vLLM venv's python (bash scripts/setup_vllm_venv.sh prints it) or use --engine http"
            ) from error
        kwargs = {"enforce_eager": True, **self.engine_kwargs}
        self._llm = LLM(model=self.model, **kwargs)
        structured = StructuredOutputsParams(choice=list(self.prompt.labels)) if self.prompt.structured_outputs else None
        tokenizer = self._llm.get_tokenizer()
        counts = {label: len(tokenizer.encode(label, add_special_tokens=False)) for label in self.prompt.labels}
        self.max_tokens = self.prompt.default_max_tokens(counts)
        self.prior: dict[str, float] | None = None
        self.token_labels = first_token_map({
            label: {tokenizer.decode(tokenizer.encode(form, add_special_tokens=False)[:1]) for form in label_surface_forms(label)}
            for label in self.prompt.labels
        })
        if self.prompt.decoding == "logprobs":
            self._sampling = SamplingParams(temperature=self.prompt.temperature, max_tokens=1,
                                            logprobs=self.prompt.top_logprobs)
            if self.prompt.calibration == "content-free":
                rows = [result.scores for result in self._label_batch(list(CONTENT_FREE_INPUTS))]
                self.prior = content_free_log_prior(rows, self.prompt.labels)
        else:
            self._sampling = SamplingParams(
                temperature=self.prompt.temperature, max_tokens=self.max_tokens, structured_outputs=structured
            )

    def _label_batch(self, texts: list[str]) -> list[LabelResult]:
        outputs = self._llm.chat([self.prompt.messages(text) for text in texts], self._sampling, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0] if output.outputs else None
            reply = completion.text if completion else ""
            if self.prompt.decoding != "logprobs":
                results.append(LabelResult(reply=reply, label=parse_label(reply, self.prompt.labels)))
                continue
            if not completion or not completion.logprobs:
                results.append(LabelResult(reply=reply, label=None, error="no logprobs in the engine output"))
                continue
            entries = [{"token": logprob.decoded_token or "", "logprob": logprob.logprob}
                       for logprob in completion.logprobs[0].values()]
            scores, _ = label_scores_from_top_logprobs(entries, self.prompt.labels, self.token_labels)
            results.append(LabelResult(reply=reply, label=decide_label(scores, self.prior, self.prompt.labels),
                                       scores=scores))
        return results

    @property
    def name(self) -> str:
        return self.model

    def label(self, items: Iterable[tuple[str, str]], on_result: Callable[[str, LabelResult], None]) -> None:
        items = list(items)
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            for (row_id, _), result in zip(batch, self._label_batch([text for _, text in batch])):
                on_result(row_id, result)
