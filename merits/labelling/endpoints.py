"""Several OpenAI-compatible LLM endpoints used together (``--llm-url A --llm-url B`` or ``A,B``).

A corpus-scale labelling job talks to several servers at once: one vLLM server per GPU, a server per node,
or the ranks of vLLM's own data parallelism behind separate ports. :class:`EndpointPool` spreads the
requests over them and keeps a failed one out of the way:

- **spread**: each request goes to the healthy endpoint with the fewest requests in flight (ties: round
  robin), so a slow server receives less work than a fast one;
- **out of rotation**: a transient failure at an endpoint (connection refused/reset, timeout, HTTP 429/5xx)
  takes it out at once, for ``cooldown`` seconds, doubled at each further failure (capped at
  ``max_cooldown``); the request is retried (by the client's own :class:`~merits.labelling.llm.RetryPolicy`)
  and goes to another endpoint;
- **retried later**: when its cooldown has passed, an endpoint is given *one* probe request (half-open);
  a success puts it back into rotation, a failure doubles its cooldown;
- when every endpoint is out, the one whose cooldown ends first is used, so the job neither hangs nor
  spins: the client's retries and backoff then decide, as with a single server, and a job whose servers
  are all gone stops with an error after its retries (finished rows stay in the journal; rerun to resume).

:class:`MultiEndpointLabeller` is :class:`~merits.labelling.llm.OpenAICompatibleLabeller` over a pool:
``concurrency`` requests in flight *per endpoint*, every endpoint checked at the start (one that does not
answer is taken out of rotation and the job starts on the rest; one that answers without the model is an
error). :func:`http_labeller` returns the plain client for one URL, the pool client for several.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .llm import LLMServerError, OpenAICompatibleLabeller, _Retryable


def split_urls(values: str | Sequence[str] | None, default: str | None = None) -> list[str]:
    """``--llm-url`` values (repeated and/or comma-separated) → distinct URLs without a trailing ``/``."""
    if values is None:
        values = [default] if default else []
    elif isinstance(values, str):
        values = [values]
    urls: list[str] = []
    for value in values:
        for part in str(value).split(","):
            url = part.strip().rstrip("/")
            if not url:
                continue
            if not url.startswith(("http://", "https://")):
                raise LLMServerError(f"--llm-url {part.strip()!r} is not an http(s) URL")
            if url not in urls:
                urls.append(url)
    if not urls:
        raise LLMServerError("no --llm-url given")
    return urls


@dataclass
class EndpointState:
    url: str
    in_flight: int = 0
    requests: int = 0
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0  # monotonic time; 0 = in rotation
    probing: bool = False
    last_error: str | None = None

    @property
    def in_rotation(self) -> bool:
        return self.down_until == 0.0


@dataclass
class EndpointPool:
    """Least-in-flight spreading over ``urls`` with a per-endpoint circuit breaker (see the module doc).

    Not thread-safe: used from one asyncio event loop (every method is synchronous, so no await interleaves).
    """

    urls: Sequence[str]
    cooldown: float = 5.0
    max_cooldown: float = 120.0
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] | None = None
    states: dict = field(init=False)

    def __post_init__(self):
        if not self.urls:
            raise ValueError("an endpoint pool needs at least one URL")
        self.states = {url: EndpointState(url) for url in self.urls}
        self._turn = 0

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def acquire(self) -> str:
        """The endpoint for the next request (count it in flight until :meth:`release`)."""
        now = self.clock()
        order = list(self.urls[self._turn :]) + list(self.urls[: self._turn])
        self._turn = (self._turn + 1) % len(self.urls)
        healthy = [self.states[url] for url in order if self.states[url].in_rotation]
        chosen: EndpointState | None = None
        # an endpoint whose cooldown is over gets one probe request at a time (half-open)
        for state in (self.states[url] for url in order):
            if not state.in_rotation and not state.probing and state.down_until <= now:
                state.probing = True
                chosen = state
                self._say(f"retrying endpoint {state.url} (out of rotation since: {state.last_error})")
                break
        if chosen is None and healthy:
            chosen = min(healthy, key=lambda s: s.in_flight)  # min() keeps the first (round-robin order) on ties
        if chosen is None:
            # every endpoint is out: use the one that comes back first; the caller's retries and backoff decide
            chosen = min(self.states.values(), key=lambda s: s.down_until)
        chosen.in_flight += 1
        chosen.requests += 1
        return chosen.url

    def release(self, url: str, error: str | None = None) -> None:
        """Report the outcome of a request to ``url``: ``error`` for a transient failure, ``None`` for an answer."""
        state = self.states[url]
        state.in_flight = max(0, state.in_flight - 1)
        was_probe = state.probing
        state.probing = False
        if error is None:
            state.successes += 1
            state.consecutive_failures = 0
            if not state.in_rotation:
                state.down_until = 0.0
                self._say(f"endpoint {url} answers again: back in rotation")
            return
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = error
        if state.in_rotation or was_probe:
            delay = min(self.max_cooldown, self.cooldown * 2 ** (state.consecutive_failures - 1))
            state.down_until = self.clock() + delay
            left = sum(1 for s in self.states.values() if s.in_rotation)
            self._say(f"endpoint {url} failed ({error}): out of rotation for {delay:.0f} s; {left} endpoint(s) left")

    def abandon(self, url: str) -> None:
        """A request to ``url`` was cancelled before it had an outcome."""
        state = self.states[url]
        state.in_flight = max(0, state.in_flight - 1)
        state.probing = False

    def mark_down(self, url: str, error: str) -> None:
        """Take ``url`` out of rotation without a request in flight (e.g. it did not answer the start check)."""
        state = self.states[url]
        state.consecutive_failures += 1
        state.failures += 1
        state.last_error = error
        state.down_until = self.clock() + min(self.max_cooldown, self.cooldown * 2 ** (state.consecutive_failures - 1))

    def healthy(self) -> list[str]:
        return [url for url in self.urls if self.states[url].in_rotation]

    def stats(self) -> dict[str, dict]:
        """Per endpoint: requests, successes, failures, and whether it is in rotation now."""
        return {
            url: {"requests": s.requests, "successes": s.successes, "failures": s.failures, "in_rotation": s.in_rotation}
            for url, s in self.states.items()
        }


class MultiEndpointLabeller(OpenAICompatibleLabeller):
    """:class:`OpenAICompatibleLabeller` spreading its requests over several endpoints (see the module doc).

    ``concurrency`` is per endpoint: ``concurrency * len(urls)`` requests are kept in flight in all.
    The other arguments are those of :class:`OpenAICompatibleLabeller`; ``cooldown`` / ``max_cooldown`` those of
    :class:`EndpointPool`.
    """

    def __init__(self, urls: Sequence[str], model: str, *, concurrency: int = 16, cooldown: float = 5.0,
                 max_cooldown: float = 120.0, log: Callable[[str], None] | None = None, **kwargs):
        urls = split_urls(list(urls))
        super().__init__(urls[0], model, concurrency=concurrency * len(urls), **kwargs)
        self.urls = urls
        self.per_endpoint_concurrency = concurrency
        self.pool = EndpointPool(urls, cooldown=cooldown, max_cooldown=max_cooldown, log=log)
        self.base_url = ", ".join(urls)  # for messages; every request names its own endpoint

    @property
    def server_root(self) -> str:
        url = (self.pool.healthy() or self.urls)[0]
        return url[: -len("/v1")] if url.endswith("/v1") else url

    async def check(self, client=None) -> None:
        """Every endpoint must serve ``model``; one that does not answer is left out (at least one must answer)."""
        own_client = client is None
        client = client or self._client()
        try:
            answered = []
            for url in self.urls:
                try:
                    models = await OpenAICompatibleLabeller(url, self.model, retry=self.retry).served_models(client)
                except LLMServerError as error:
                    self.pool.mark_down(url, str(error))
                    if self.pool.log:
                        self.pool.log(f"endpoint {url} does not answer: out of rotation for now ({error})")
                    continue
                if self.model not in models:
                    raise LLMServerError(
                        f"the LLM server at {url} does not serve a model named {self.model!r}; "
                        f"served models: {', '.join(models) or '(none)'} (every --llm-url must serve --llm-model)"
                    )
                answered.append(url)
            if not answered:
                raise LLMServerError(f"none of the LLM servers answers: {', '.join(self.urls)}; are they running?")
        finally:
            if own_client:
                await client.aclose()

    async def _post(self, client, body: dict, base_url: str | None = None) -> str:
        url = base_url or self.pool.acquire()
        try:
            reply = await super()._post(client, body, base_url=url)
        except _Retryable as error:
            self.pool.release(url, error=str(error))
            raise
        except LLMServerError as error:  # 404: this endpoint does not serve the route/model
            self.pool.release(url, error=str(error))
            raise
        except asyncio.CancelledError:
            self.pool.abandon(url)
            raise
        except BaseException:
            self.pool.release(url)  # a row error (HTTP 400, malformed reply): the server answered
            raise
        self.pool.release(url)
        return reply


def http_labeller(urls: str | Sequence[str], model: str, **kwargs) -> OpenAICompatibleLabeller:
    """One URL: :class:`OpenAICompatibleLabeller`; several: :class:`MultiEndpointLabeller` (``log`` only for those)."""
    urls = split_urls(urls)
    log = kwargs.pop("log", None)
    if len(urls) == 1:
        return OpenAICompatibleLabeller(urls[0], model, **kwargs)
    return MultiEndpointLabeller(urls, model, log=log, **kwargs)
