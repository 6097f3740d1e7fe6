"""Domain exceptions. They know nothing of HTTP: handlers.py maps them to responses in one place."""

from __future__ import annotations


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
