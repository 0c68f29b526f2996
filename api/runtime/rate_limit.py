"""A token bucket per client (its API key, else its address): floods of feedback get 429."""

import math
import threading
import time

from twostage.retrieval.core.errors import RateLimited

_MAX_CLIENTS = 100_000  # buckets kept; past it the full ones (idle clients) are forgotten


class RateLimiter:
    """`rate_per_s` requests a second per client, `burst` at once; the buckets behind one lock."""

    def __init__(self, what: str, rate_per_s: float, burst: int) -> None:
        self.what, self.rate, self.burst = what, rate_per_s, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> None:
        """Spend one token of `client`'s bucket, or raise `RateLimited` saying when to retry."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, when = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens < 1:
                wait = (1 - tokens) / self.rate
                raise RateLimited(
                    f"too many {self.what} requests from this client (at most {self.rate:g} a second, "
                    f"{self.burst:g} at once); retry in {math.ceil(wait)}s", wait,
                )  # fmt: skip
            if len(self._buckets) >= _MAX_CLIENTS and client not in self._buckets:
                self._forget_idle(now)
            self._buckets[client] = (tokens - 1, now)

    def _forget_idle(self, now: float) -> None:
        full = [c for c, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
        for client in full:
            del self._buckets[client]
