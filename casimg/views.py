"""What the HTTP API shows of an image: its JSON shape, with stored_at in ISO 8601."""

from __future__ import annotations

import functools
import time
from typing import Any

from casimg.clock import MILLIS

DAY = 86_400  # seconds


def image_json(
    url: str, sha256: str, size: int, content_type: str, width: int, height: int, stored_at_ms: int,
    placeholder: str | None = None,
) -> dict[str, Any]:
    """An image as the API shows it; index.ImageRecord's fields, in order. `placeholder`: the content's
    ThumbHash (base64), null where none was made yet (the filler makes it shortly after the store) or at
    all (stored with placeholders off, or pixels that do not decode)."""
    return {
        "url": url,
        "sha256": sha256,
        "size": size,
        "content_type": content_type,
        "width": width,
        "height": height,
        "stored_at": iso_ms(stored_at_ms),
        "placeholder": placeholder,
    }


def iso_ms(ms: int) -> str:
    """clock.iso() of a time in ms since the epoch, in integer steps: a listing page formats a thousand,
    and strftime consults the time zone on each call (BENCHMARKS.md, "Figures behind design choices")."""
    seconds, millis = divmod(ms, MILLIS)
    day, second = divmod(seconds, DAY)
    return f"{_iso_date(day)}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}.{millis:03d}000Z"


@functools.lru_cache(maxsize=1024)
def _iso_date(day: int) -> str:
    """YYYY-MM-DD of a day number since the epoch."""
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY))
