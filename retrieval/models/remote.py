"""HTTP to a remote model server: retries with backoff and jitter, a circuit breaker, metrics.

Shared by the remote embedder and the remote reranker. One `RemoteClient` per backend: a
pooled `httpx.Client` (thread-safe; model calls run in worker threads), and a breaker that,
after `breaker_failures` failed calls in a row, answers at once with `RemoteUnavailable`
(HTTP 503 + Retry-After) for `breaker_reset_s` instead of making every request wait out
timeouts, then lets one call through to see whether the server is back (half-open) and
closes on its success: recovery needs no restart. Failures worth retrying are 429, 5xx,
timeouts and connection errors; another 4xx is the server refusing the request, which a
retry would not change (nor does it count against the server: one bad request must not open
the circuit for everyone). Latency by outcome and errors by kind are Prometheus metrics
labelled with the role (embedder, reranker).
"""

import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from twostage.retrieval.core.errors import RemoteUnavailable
from twostage.retrieval.models.qwen_vocab import special_token_ids
from twostage.retrieval.models.settings import RemoteSettings

log = logging.getLogger(__name__)

_RETRY_STATUS = {429, 500, 502, 503, 504}
_MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class RemoteMetrics:
    """Per-backend latency and errors; registered in the service's registry, or in none."""

    seconds: Histogram
    errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "RemoteMetrics":
        return cls(
            Histogram(
                "twostage_remote_request_seconds", "HTTP calls to remote model servers",
                ["role", "outcome"], registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
            Counter(
                "twostage_remote_errors_total", "failed calls to remote model servers, by kind",
                ["role", "kind"], registry=registry,
            ),
        )  # fmt: skip


class CircuitBreaker:
    """closed -> open after `failures` in a row -> half-open after `reset_s` -> closed on a success."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False  # a half-open call is in flight
        self.recoveries = 0  # times the circuit closed again after opening

    def before_call(self) -> float | None:
        """None: go ahead. Otherwise the seconds until a call will be let through again."""
        with self._lock:
            if self._opened_at is None:
                return None
            waited = time.monotonic() - self._opened_at
            if waited >= self._reset_s and not self._trial:
                self._trial = True
                return None
            return max(0.5, self._reset_s - waited)

    def succeeded(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                self.recoveries += 1
            self._failures, self._opened_at, self._trial = 0, None, False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self._threshold:
                self._opened_at, self._trial = time.monotonic(), False


class RemoteClient:
    """POSTs JSON to one server with retries and a breaker; raises `RemoteUnavailable`."""

    def __init__(self, cfg: RemoteSettings, role: str, metrics: RemoteMetrics | None = None) -> None:
        assert cfg.url, "validated by the settings"
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.role = role
        self.metrics = metrics or RemoteMetrics.create()
        headers = {"Authorization": f"Bearer {cfg.api_key.get_secret_value()}"} if cfg.api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=cfg.timeout_s)
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """The decoded JSON answer of a successful call."""
        wait = self.breaker.before_call()
        if wait is not None:
            raise RemoteUnavailable(
                f"{self.role} server {self.url} is failing (circuit open); retrying it in {wait:.0f} s",
                retry_after_s=wait,
            )
        problem, retry_after = "", None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            started = time.perf_counter()
            try:
                response = self._http.post(path, json=body)
            except httpx.TimeoutException:
                problem, retry_after = f"no answer within {self.cfg.timeout_s:g} s", None
                self._count(started, "timeout")
                continue
            except httpx.RequestError as exc:  # connection, protocol, decoding: the server is not usable
                problem, retry_after = f"unreachable ({type(exc).__name__}: {exc})", None
                self._count(started, "connection")
                continue
            if response.status_code in _RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                retry_after = _retry_after(response)
                self._count(started, f"http_{response.status_code}")
                continue
            if response.status_code >= 400:  # the server is up and refuses this request: no retry, and
                self._count(started, f"http_{response.status_code}")  # no reason to fail fast for others
                self.breaker.succeeded()
                raise RemoteUnavailable(
                    f"{self.role} server {self.url}{path} refused the request: HTTP {response.status_code}: "
                    f"{response.text[:300]}"
                )
            try:
                answer = response.json()
            except ValueError:
                self._count(started, "not_json")
                self.breaker.failed()
                raise RemoteUnavailable(f"{self.role} server {self.url}{path} did not answer JSON") from None
            self.metrics.seconds.labels(self.role, "ok").observe(time.perf_counter() - started)
            self.breaker.succeeded()
            return answer
        self.breaker.failed()
        raise RemoteUnavailable(
            f"{self.role} server {self.url}{path} failed {self.cfg.retries + 1} times; last: {problem}"
        )

    def bad_answer(self, why: str) -> RemoteUnavailable:
        """An answer of the wrong shape (dimensions, number of scores): counted, and fatal for the call."""
        self.metrics.errors.labels(self.role, "bad_answer").inc()
        self.breaker.failed()
        return RemoteUnavailable(f"{self.role} server {self.url} answered something unusable: {why}")

    def close(self) -> None:
        self._http.close()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with +-50% jitter, or the server's Retry-After (capped) if it said one."""
        if retry_after is not None:
            return retry_after
        return float(self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))

    def _count(self, started: float, kind: str) -> None:
        self.metrics.seconds.labels(self.role, "error").observe(time.perf_counter() - started)
        self.metrics.errors.labels(self.role, kind).inc()
        log.warning("%s server %s: %s", self.role, self.url, kind)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return None


_MARKERS = re.compile("|".join(re.escape(t) for t in sorted(special_token_ids(), key=len, reverse=True)))


def escape_markers(text: str) -> str:
    """Qwen3's chat markers in untrusted text, with a zero-width space after the `<`.

    A remote server (vLLM, TEI) tokenizes the text it is sent with special tokens parsed, so a
    document carrying `<|im_end|>...yes` would close the prompt there; escaped, it stays text.
    """
    return _MARKERS.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)
