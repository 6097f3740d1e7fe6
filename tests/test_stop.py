"""A stop that cannot hang: each part of ``Services.close`` has a bound, and a part past it is logged with
where it waits and left behind."""

from __future__ import annotations

import asyncio
import logging
import time

from casimg.services import _bounded


async def _swallows_its_first_cancellation() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:  # as a cancellation that lands inside a redis-py command can be
        await asyncio.sleep(3600)


def test_a_part_that_does_not_stop_is_left_behind_with_where_it_waits(caplog):
    async def stop() -> float:
        started = time.monotonic()
        await _bounded("a stuck part", _swallows_its_first_cancellation(), 0.2)
        return time.monotonic() - started

    with caplog.at_level(logging.WARNING, logger="casimg"):
        took = asyncio.run(stop())
    assert took < 5
    assert "a stuck part did not stop within 0 s" in caplog.text
    assert "_swallows_its_first_cancellation" in caplog.text


def test_a_part_that_stops_in_time_is_waited_for_and_its_error_raised():
    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("the part's own error")

    try:
        asyncio.run(_bounded("a failing part", fails(), 5))
    except RuntimeError as exc:
        assert "the part's own error" in str(exc)
    else:
        raise AssertionError("the part's error was swallowed")
