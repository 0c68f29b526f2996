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
    DatabaseUnavailable,
    Forbidden,
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
    Unauthorized,
)
from twostage.retrieval.store.vector_store import (
    CollectionNotFound,
    InvalidCollectionName,
    StoreError,
    StoreLockedError,
    StoreUnavailable,
)

RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Answer:
    """An error kind's status code and the headers that go with it."""

    status: int
    when: str  # for the table in docs/service.md (`error_table`), which is made from this one
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def retry(self) -> bool:
        return self.status in (429, 503)


ERRORS: dict[type[TwostageError], Answer] = {
    # the caller's mistakes
    InputError: Answer(400, "bad input: a value, a filter, a query the service cannot take"),
    InvalidCollectionName: Answer(400, "an invalid collection name"),
    Unauthorized: Answer(401, "no, an unknown or a revoked API key", {"WWW-Authenticate": "Bearer"}),
    Forbidden: Answer(
        403,
        "a key without the scope the route needs (named), a collection or an "
        "`on_behalf_of` the key may not use; write routes without any key configured",
    ),
    NotFound: Answer(
        404,
        "an unknown job or document; feedback on a search id the log does not hold "
        "(unknown, or past `feedback.retention_days`)",
    ),
    CollectionNotFound: Answer(404, "an unknown collection"),
    StoreError: Answer(409, "the store refuses it: an index built by another embedder, a running job"),
    TooLarge: Answer(413, "over a size limit (body, items per request, events per feedback batch)"),
    RateLimited: Answer(429, "a client over its feedback rate (`feedback.rate_per_s`, `feedback.burst`)"),
    # the service's own failures
    ModelError: Answer(500, "a model failed on the batch or answered NaN (named; traceback in the log)"),
    # busy or not ready: retry
    Overloaded: Answer(503, "a full queue (`api.max_pending`, `Retry-After: 1`)"),
    ModelOverloaded: Answer(503, "the device is out of memory for this batch"),
    ModelLoading: Answer(503, "models still loading"),
    ModelLoadError: Answer(503, "a model failed to load (`/readyz` says why)"),
    RemoteUnavailable: Answer(503, "a model server unreachable (its own delay where it says one)"),
    StoreUnavailable: Answer(503, "the Qdrant server unreachable"),
    DatabaseUnavailable: Answer(503, "the search log's database unreachable (feedback; searches go on)"),
    StoreLockedError: Answer(503, "the store or the registry is held by another process or a retrain"),
    TwostageError: Answer(400, "any other complete, user-facing message"),
}
# answers that come from outside the table: the framework's validation, and bugs
OUTSIDE_THE_TABLE = (
    (422, "(FastAPI)", "a body the schema refuses"),
    (500, "(any other exception)", "a bug: answered with a request id, the traceback only in the log"),
)


def answer(exc: TwostageError) -> tuple[int, dict[str, str]]:
    """The status code and headers for `exc`: its most specific class in `ERRORS`."""
    found = next(ERRORS[kind] for kind in type(exc).__mro__ if kind in ERRORS)
    headers = dict(found.headers)
    if found.retry:
        headers["Retry-After"] = str(max(1, round(getattr(exc, "retry_after_s", RETRY_AFTER_S))))
    return found.status, headers


def error_table() -> str:
    """`ERRORS` as the Markdown table docs/service.md carries (tests/test_docs.py keeps them equal)."""
    rows = [(a.status, f"`{kind.__name__}`", a.when + ("" if not a.retry else " (+ `Retry-After`)"))
            for kind, a in ERRORS.items()] + list(OUTSIDE_THE_TABLE)  # fmt: skip
    lines = ["| status | error | when |", "|---|---|---|"]
    lines += [f"| {status} | {kind} | {when} |" for status, kind, when in sorted(rows, key=lambda r: r[0])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(error_table(), end="")
