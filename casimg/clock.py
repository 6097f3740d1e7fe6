"""Times as casimg records them in Redis: milliseconds since the epoch, and ISO 8601 in UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime

MILLIS = 1000  # per second


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return iso(datetime.now(UTC))


def now_ms() -> int:
    return time.time_ns() // 1_000_000
