"""Domain exceptions. They know nothing of HTTP: handlers.py maps them to responses in one place."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Redis is away or too slow, as opposed to refusing a command: callers wait it out, or answer 503.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)


class CasimgError(Exception):
    """Base of every error casimg raises on purpose."""


class BadRequest(CasimgError):
    """The client sent something unusable (bad JSON, wrong types, a missing parameter)."""


class TooLarge(CasimgError):
    """The request is over a configured size limit (body bytes, URLs per request)."""


class NotFound(CasimgError):
    """No such image, blob or job."""


class Unauthorized(CasimgError):
    """No API key, or one that is unknown or revoked."""


class Forbidden(CasimgError):
    """The API key is valid but its scope does not allow the operation."""


class RangeNotSatisfiable(CasimgError):
    """A Range header asks only for bytes past the end of the content, which has `size` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable: the content has {size} bytes")
        self.size = size


class TooManyRequests(CasimgError):
    """A rate or in-flight limit was hit; the client may retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(CasimgError):
    """A dependency (Redis, the blob directory) is not answering; the client may retry."""

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(CasimgError):
    """A setting has a value casimg cannot use."""


class DataDirBusy(CasimgError):
    """Another live casimg server owns this data directory."""


class DownloadFailed(CasimgError):
    """One URL could not be turned into a stored image.

    `reason` is the short human text shown in the job's results ("HTTP 404", "not an image",
    "blocked address", ...). `permanent` is False for failures worth retrying (connection reset,
    timeout, HTTP 429 and 5xx); `retry_after` carries an origin's Retry-After, in seconds.
    """

    def __init__(self, reason: str, *, permanent: bool = True, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after


class InvalidImage(DownloadFailed):
    """The bytes arrived but are not an acceptable image (not an image, truncated, too many pixels...)."""


class BadVariant(BadRequest):
    """A variant parameter (w, h, fit, format, ...) is unusable or over a limit; `parameter` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # raised in render workers: must pickle
        return (type(self), (self.parameter, str(self)))


class Unrenderable(CasimgError):
    """A stored image cannot be made into the variant asked for (it does not decode, or is too big to)."""


class RenderOverBudget(Unrenderable):
    """Decoding and resizing would need more memory than `budget` bytes (the estimate, read from the header)."""

    def __init__(self, message: str, *, estimate: int, budget: int) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.budget = budget

    def __reduce__(self) -> tuple[Any, ...]:  # raised in render workers: must pickle
        return (_over_budget, (str(self), self.estimate, self.budget))


def _over_budget(message: str, estimate: int, budget: int) -> RenderOverBudget:
    return RenderOverBudget(message, estimate=estimate, budget=budget)


class RenderTimeout(Unavailable):
    """A render ran past its time and was abandoned (its worker process killed); retrying may succeed."""
