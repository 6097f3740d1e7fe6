"""Text a client chose, as a log line may hold it: cut to a bounded length.

A URL may be 8,192 characters (CASIMG_MAX_URL_LENGTH) and a request target tens of kilobytes; written
whole, one client's requests would fill the log, and a line no longer fits a log shipper's limits.
"""

from __future__ import annotations

LOGGED_CHARACTERS = 512  # of a URL or request target; enough to tell URLs apart by their host and path


def clip(text: str, limit: int = LOGGED_CHARACTERS) -> str:
    """`text`, or its first `limit` characters and a marker saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text)} characters]"
