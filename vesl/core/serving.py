"""A client of OpenAI-compatible chat-completions endpoints (`vllm serve`, SGLang, TGI, `transformers serve`,
hosted APIs), for the generative stages' `openai` backend.

- Requests run concurrently (asyncio + aiohttp), at most `max_concurrency` in flight, spread round-robin
  over the endpoints; a retry goes to the next endpoint.
- A transient failure (no connection, a timeout, HTTP 408, 425, 429, 500, 502, 503, 504) is retried with
  exponential backoff, or after the server's `Retry-After`. A request still failing after `max_retries`
  retries raises `EndpointUnavailableError`: an outage is never a row's reject, it stops the job.
- 401/403 (the key refused) raises `EndpointAuthError` (exit 4); any other 4xx refuses that request alone:
  its `Answer.error` holds the status and the server's message. So does a 500 on every try of one request
  while the server answered other requests of this client meanwhile: an input that breaks the server is that
  row's reject, not an outage that would stop every re-run at the same row.
- A 200 whose body has no message text is an `Answer` with `text` None and `error` None: the stage's
  empty-output reject.
- The API key is read from an environment variable and sent as a bearer token; it is never part of a
  message, a log line or what `describe` returns.

`check` is the preflight before any work: each endpoint reachable, the model served where the server lists
its models (`/v1/models`), and one real request of the stage's shape (one token) accepted.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from vesl.core.text import describe_error
from vesl.errors import EndpointAuthError, EndpointCheckError, EndpointUnavailableError

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After is waited for this long, then retried
MESSAGE_CHARS = 300  # of a server's error message kept in a reject


def normalise_endpoint(url: str) -> str:
    """The chat API's base URL: 'http://host:8000', '.../v1', '.../v1/' and '.../v1/chat/completions' all give
    'http://host:8000/v1'.
    A URL with a user, password, query or fragment is refused: a key belongs in `api_key_env`."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {url!r} is not an http(s) URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"endpoint {parts.scheme}://{parts.hostname}...: no user, password, query or fragment in an "
                         "endpoint URL; give the API key's environment variable in api_key_env")
    path = parts.path.rstrip("/").removesuffix("/chat/completions")  # the full route given: its base
    return f"{parts.scheme}://{parts.netloc}{path if path.endswith('/v1') else path + '/v1'}"


def endpoint_host(url: str) -> str:
    """host:port of an endpoint, what the footer records."""
    return urlsplit(url).netloc


def server_message(body: str) -> str:
    """The error message in a server's answer body (OpenAI's error.message, FastAPI's detail), one line."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        found = ((error.get("message") if isinstance(error, dict) else error) or data.get("detail")
                 or data.get("message"))
        if found:
            body = found if isinstance(found, str) else json.dumps(found)
    text = " ".join(str(body).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), at most MAX_RETRY_AFTER_S."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class Answer:
    """One request's outcome: the first choice's text, or a permanent refusal of this request."""

    text: str | None = None
    error: str | None = None  # "HTTP 400: <the server's message>"
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    model: str | None = None  # the served model's id, as the server names it
    problem: str | None = None  # why TEXT is None on a 200 (no choices, no content, not JSON)


def parse_answer(body: str) -> Answer:
    """A 200 chat-completions body as an Answer (text None, with the problem, when it holds no text)."""
    try:
        data = json.loads(body)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Answer(problem=f"the server's answer holds no message: {server_message(body)[:120]}")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Answer(text=content if isinstance(content, str) and content.strip() else None,
                  usage={k: int(v) for k, v in usage.items() if isinstance(v, int)}, model=data.get("model"),
                  problem=None if isinstance(content, str) and content.strip() else "the server answered no text")


@dataclass
class ChatClient:
    """Chat completions against ENDPOINTS for MODEL (the API's `model` field). LABEL names the stage in errors."""

    endpoints: Sequence[str]
    model: str
    api_key_env: str | None = None
    max_concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 8
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    label: str = "endpoint"

    def __post_init__(self) -> None:
        self._answered = 0  # requests answered (200) so far: a server that answers others is up
        self.endpoints = [normalise_endpoint(u) for u in self.endpoints]
        if not self.endpoints:
            raise ValueError(f"{self.label}: no endpoint")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise EndpointCheckError(f"{self.label}.api_key_env names {self.api_key_env}, which is not set here")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def delay_s(self, attempt: int, retry_after: str | None) -> float:
        wait = retry_after_s(retry_after)
        if wait is not None:
            return wait
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.75, 1.25)

    def complete(self, bodies: Sequence[dict[str, Any]]) -> list[Answer]:
        """One Answer per request body (messages and sampling fields; `model` is added), in order."""
        return asyncio.run(self._complete_all(list(bodies))) if bodies else []

    async def _complete_all(self, bodies: list[dict[str, Any]]) -> list[Answer]:
        import aiohttp

        limit = asyncio.Semaphore(self.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers()) as session:
            return list(await asyncio.gather(*(self._one(session, limit, body, k) for k, body in enumerate(bodies))))

    async def _one(self, session, limit: asyncio.Semaphore, body: dict[str, Any], k: int) -> Answer:
        import aiohttp

        payload = {"model": self.model, **body}
        failures: list[str] = []
        started, answered_before = time.monotonic(), self._answered
        status, text = None, ""
        async with limit:
            for attempt in range(self.max_retries + 1):
                url = self.endpoints[(k + attempt) % len(self.endpoints)]
                retry_after, status = None, None
                try:
                    async with session.post(f"{url}/chat/completions", json=payload) as response:
                        status, text = response.status, await response.text()
                        retry_after = response.headers.get("Retry-After")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    failures.append(f"{endpoint_host(url)}: {describe_error(e) or type(e).__name__}")
                else:
                    if status == 200:
                        self._answered += 1
                        return parse_answer(text)
                    if status in (401, 403):  # the key, not the row: every request would be refused
                        raise EndpointAuthError(f"{self.label}: {endpoint_host(url)} refused the API key (HTTP "
                                                f"{status}; {self.label}.api_key_env={self.api_key_env}): "
                                                f"{server_message(text)}")
                    if status not in TRANSIENT_STATUS:
                        return Answer(error=f"HTTP {status}: {server_message(text)}")
                    failures.append(f"{endpoint_host(url)}: HTTP {status}")
                if attempt < self.max_retries:
                    await asyncio.sleep(self.delay_s(attempt, retry_after))
            if status == 500 and self._answered > answered_before:
                # an internal error on every try of this request while the server answered others: this row
                # breaks it (with nothing else answered, it may be the server: an outage, never a reject)
                return Answer(error=f"HTTP 500 on each of {self.max_retries + 1} tries while the server answered "
                                    f"other requests: {server_message(text)}")
        raise EndpointUnavailableError(
            f"{self.label}: the inference server stayed unavailable through {self.max_retries + 1} tries over "
            f"{time.monotonic() - started:.0f} s ({self.label}.max_retries={self.max_retries}); last: {failures[-1]}. "
            "Committed units stay; run the same command again once the server answers")

    def check(self, probe: dict[str, Any]) -> dict[str, Any]:
        """Before any work: every endpoint reachable, MODEL among the models it lists (when it lists any), and
        the PROBE request (the stage's shape) accepted. Returns what the footer records. EndpointCheckError
        (exit 2) names the endpoint and what is wrong."""
        return asyncio.run(self._check(probe))

    async def _check(self, probe: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        served = None
        timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, 60.0))
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers()) as session:
            for url in self.endpoints:
                listed = await self._listed_models(session, url)
                if listed and self.model not in listed:
                    raise EndpointCheckError(f"{self.label}.endpoint {url} does not serve {self.model!r} "
                                             f"(it lists {sorted(listed)[:10]}); set {self.label}.model to one of them")
                served = await self._probe(session, url, probe) or served
        return {"backend": "openai", "model": self.model, "served_model": served or self.model,
                "endpoints": [endpoint_host(u) for u in self.endpoints]}

    async def _listed_models(self, session, url: str) -> set[str]:
        import aiohttp

        try:
            async with session.get(f"{url}/models") as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise EndpointCheckError(f"{self.label}.endpoint {url} is unreachable: "
                                     f"{describe_error(e) or e!r}") from None
        if status in (401, 403):
            raise EndpointCheckError(f"{self.label}.endpoint {url} refused the API key (HTTP {status}; "
                                     f"{self.label}.api_key_env={self.api_key_env}): {server_message(text)}")
        try:
            data = json.loads(text).get("data") if status == 200 else None
        except (ValueError, AttributeError):
            data = None
        # a server that lists nothing, or cannot list (transformers serve loads models on demand): the probe decides
        return {m.get("id") for m in data if isinstance(m, dict)} if isinstance(data, list) else set()

    async def _probe(self, session, url: str, probe: dict[str, Any]) -> str | None:
        import aiohttp

        for attempt in range(3):
            try:
                async with session.post(f"{url}/chat/completions",
                                        json={"model": self.model, **probe, "max_tokens": 1}) as response:
                    status, text = response.status, await response.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                status, text = None, describe_error(e) or repr(e)
            if status == 200:
                return parse_answer(text).model
            if status is not None and status not in TRANSIENT_STATUS:
                raise EndpointCheckError(f"{self.label}.endpoint {url} refused the stage's request for {self.model!r}: "
                                         f"HTTP {status}: {server_message(text)}")
            await asyncio.sleep(self.delay_s(attempt, None))
        raise EndpointCheckError(f"{self.label}.endpoint {url} does not answer a request for {self.model!r}: "
                                 f"{f'HTTP {status}: {server_message(text)}' if status else text}")
