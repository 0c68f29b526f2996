"""Every error kind's HTTP answer, in one table (`ERRORS`), looked up by the error's class.

The lookup walks the error's class hierarchy from the most specific class up and takes the first
class the table names, so an entry never depends on the order of the others: a subclass that
must answer differently from its parents gets an entry of its own (`InvalidCollectionName` is a
`StoreError`, 409, and an `InputError`, 400: it is a bad name, so 400). Routes raise these
errors, never an ad hoc `HTTPException`; errors outside `TwostageError` are bugs: a 500 with a
request id, the traceback only in the log.

503 and 429 mean "retry": each carries `Retry-After` (the error's own `retry_after_s` where it
knows better, e.g. a model server's answer, else `RETRY_AFTER_S`). A full queue is a 503 too,
like out of memory and loading models: the server is busy, not the client over a quota.
"""

from dataclasses import dataclass, field

from twostage.retrieval.core.errors import (
    InputError,
    ModelError,
    ModelLoadError,
    ModelLoading,
    ModelOverloaded,
    NotFound,
    Overloaded,
    RateLimited,
    RemoteUnavailable,
    TooLarge,
    TwostageError,
)
from twostage.retrieval.store.vector_store import (
    CollectionNotFound,
    InvalidCollectionName,
    StoreError,
    StoreLockedError,
    StoreUnavailable,
)

RETRY_AFTER_S = 5


class Unauthorized(TwostageError):
    """A write route without a valid API key (HTTP 401)."""


class Forbidden(TwostageError):
    """A write route while no API keys are configured (HTTP 403)."""


@dataclass(frozen=True)
class Answer:
    """An error kind's status code and the headers that go with it."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def retry(self) -> bool:
        return self.status in (429, 503)


ERRORS: dict[type[TwostageError], Answer] = {
    # the caller's mistakes
    InputError: Answer(400),
    InvalidCollectionName: Answer(400),
    Unauthorized: Answer(401, {"WWW-Authenticate": "Bearer"}),
    Forbidden: Answer(403),
    NotFound: Answer(404),
    CollectionNotFound: Answer(404),
    StoreError: Answer(409),  # the store's state refuses it: another embedder's index, a running job
    TooLarge: Answer(413),
    RateLimited: Answer(429),  # one client over its rate (a flood of feedback)
    # the service's own failures
    ModelError: Answer(500),  # a model failed on the batch or answered NaN
    # busy or not ready: retry
    Overloaded: Answer(503),
    ModelOverloaded: Answer(503),
    ModelLoading: Answer(503),
    ModelLoadError: Answer(503),
    RemoteUnavailable: Answer(503),
    StoreUnavailable: Answer(503),
    StoreLockedError: Answer(503),
    TwostageError: Answer(400),  # any other complete, user-facing message
}


def answer(exc: TwostageError) -> tuple[int, dict[str, str]]:
    """The status code and headers for `exc`: its most specific class in `ERRORS`."""
    found = next(ERRORS[kind] for kind in type(exc).__mro__ if kind in ERRORS)
    headers = dict(found.headers)
    if found.retry:
        headers["Retry-After"] = str(max(1, round(getattr(exc, "retry_after_s", RETRY_AFTER_S))))
    return found.status, headers
