"""Exceptions that carry a message meant for the person running the service.

Everything the CLI or the HTTP layer should report as one readable line (instead of a
stack trace) derives from `TwostageError`.
"""


class TwostageError(Exception):
    """Base class: the message is complete and safe to show to a user as it is."""


class InputError(TwostageError, ValueError):
    """The caller passed something unusable (empty query, wrong type, too long for the model)."""


class TooLarge(InputError):
    """A request over a size limit (HTTP 413); the message names the limit."""


class ModelError(TwostageError):
    """A loaded model failed on a request, or returned unusable output (NaN, infinity)."""


class ModelOverloaded(ModelError):
    """The model's device ran out of memory; the request may succeed when retried (HTTP 503)."""


class ModelLoading(TwostageError):
    """The models a request needs are loading in the background (HTTP 503 + Retry-After)."""


class ModelLoadError(TwostageError):
    """A model could not be found, downloaded or loaded; the message says how to fix it."""


class RemoteUnavailable(TwostageError):
    """A remote model server is down, slow, or answered something unusable (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DatabaseUnavailable(TwostageError):
    """The search log's database cannot be reached (HTTP 503 + Retry-After on feedback; searches are
    still answered, without a search id)."""

    retry_after_s = 5.0


class RateLimited(TwostageError):
    """A client over its request rate (HTTP 429 + Retry-After); nothing of the request was kept."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(TwostageError):
    """No API key, or one that is unknown or revoked, where the route needs one (HTTP 401)."""


class Forbidden(TwostageError):
    """A valid key without the scope, collection or delegation the request needs (HTTP 403)."""


class NotFound(TwostageError):
    """A job, document or other named thing the request refers to does not exist (HTTP 404)."""


class Overloaded(TwostageError):
    """A queue is full (a model's batcher, the job queue): the caller should retry after
    `retry_after_s` seconds (HTTP 503 + Retry-After); nothing of the request was admitted."""

    def __init__(self, name: str, retry_after_s: int, waiting: int, limit: int) -> None:
        super().__init__(
            f"{name} is busy: {waiting} items queued, at most {limit} (api.max_pending); "
            f"retry in {retry_after_s}s"
        )
        self.retry_after_s = retry_after_s
