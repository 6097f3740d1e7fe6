"""Calls made during one turn of the event loop, sent together: Redis scripts as one pipeline
(``ScriptBatcher``), blocking file calls as one trip to a thread (``ThreadBatcher``).

A download worker finishes its stores in bursts: one disk flush (storage.file.FlushGroup) lets dozens of them
go on at once, and each then makes one Lua call. Sent one by one, every call pays redis-py's own cost (a
connection from the pool, the retry wrapper, a write and a read), which py-spy put at an eighth of the
ingest's CPU. ``ScriptBatcher.call`` queues the call and sends everything queued in the same turn of
the loop in one pipeline: one connection, one write, one read for all of them.

GET /api/image's lookups go the same way: under load, one turn of the loop reads several requests, and
their lookups share a pipeline (the gain measured with wrk: BENCHMARKS.md, "Figures behind design
choices").

Each call is still its own Lua script run, atomic on its own; the pipeline is not a transaction (nothing
needs the calls to be atomic together), and one call's error is that caller's alone.

A script with a batched form (``ScriptBatcher.batch``, lua.batched) goes further: its calls of one turn are
one command, which runs the script once per call. redis-py packs and parses each command of a pipeline in
Python, per command, and for the ingest's store step that was most of what the pipeline cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from casimg import tracing

Call = tuple[AsyncScript, list[Any], list[Any], "asyncio.Future[Any]"]  # a queued script call
# One command of a batch: the script to run, its keys and args, the calls it answers, and whether it is a
# batched form (answering each call) or one call's own script.
Unit = tuple[AsyncScript, list[Any], list[Any], list[Call], bool]
Blocking = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]  # a queued blocking call


class _TurnBatcher:
    """What both batchers share: calls queued during one turn of the loop, sent together by ``_send``."""

    def __init__(self) -> None:
        self._queued: list[Any] = []  # (what to call..., the caller's future)

    async def _join(self, *call: Any) -> Any:
        """Queue `call` with the others of this loop turn; what ``_send`` answers for it."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._queued.append((*call, answer))
        if len(self._queued) == 1:
            # After the callbacks already due in this turn, so the tasks they resume join the batch.
            loop.call_soon(self._send_queued)
        return await answer

    def _send_queued(self) -> None:
        batch, self._queued = self._queued, []
        self._send(batch)

    def _send(self, batch: list[Any]) -> None:
        raise NotImplementedError


def _answer(answer: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Give a caller its result (ok) or its exception, unless it was cancelled meanwhile."""
    if answer.done():
        return
    if ok:
        answer.set_result(value)
    else:
        answer.set_exception(value)


def _fail_all(batch: list[Any], error: BaseException) -> None:
    for *_, answer in batch:
        _answer(answer, False, error)


class ScriptBatcher(_TurnBatcher):
    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__()
        self.redis = redis
        self._sending: set[asyncio.Task[None]] = set()
        self._batched: dict[str, AsyncScript] = {}  # a script's sha -> its batched form

    def batch(self, script: AsyncScript, batched_source: str) -> None:
        """Send the calls of `script` made in one turn as one call of `batched_source` (lua.batched(name))."""
        self._batched[script.sha] = self.redis.register_script(batched_source)

    async def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """What ``script(keys=keys, args=args)`` returns, sent with the other calls of this loop turn."""
        with tracing.script_span(script):
            return await self._join(script, keys, args)

    def _send(self, batch: list[Call]) -> None:
        task = asyncio.ensure_future(self._run(self._units(batch)))
        self._sending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._sending.discard)

    def _units(self, batch: list[Call]) -> list[Unit]:
        """The commands to send for `batch`: each call alone, except the calls of a script with a batched
        form, which become one call of that form (when they all have the same numbers of keys and args)."""
        units: list[Unit] = []
        groups: dict[str, list[Call]] = {}
        for call in batch:
            if call[0].sha in self._batched:
                groups.setdefault(call[0].sha, []).append(call)
            else:
                units.append((call[0], call[1], call[2], [call], False))
        for sha, calls in groups.items():
            shapes = {(len(keys), len(args)) for _, keys, args, _ in calls}
            if len(calls) == 1 or len(shapes) > 1:
                units.extend((call[0], call[1], call[2], [call], False) for call in calls)
                continue
            ((per_keys, per_args),) = shapes
            keys = [key for _, call_keys, _, _ in calls for key in call_keys]
            args = [per_keys, per_args, len(calls), *(arg for _, _, call_args, _ in calls for arg in call_args)]
            units.append((self._batched[sha], keys, args, calls, True))
        return units

    async def _run(self, units: list[Unit]) -> None:
        try:
            if len(units) == 1:
                script, keys, args, _, _ = units[0]
                results: list[Any] = [await script(keys=keys, args=args)]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for script, keys, args, _, _ in units:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # Redis away: every caller gets the error, and retries as it would
            for *_, calls, _ in units:
                _fail_all(calls, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (script, keys, args, calls, batched), result in zip(units, results, strict=True):
            if isinstance(result, NoScriptError):
                # Redis lost its script cache (a restart): the plain call loads the script and runs it.
                try:
                    result = await script(keys=keys, args=args)
                except Exception as exc:  # handed to the caller, who sees it raised
                    result = exc
            if not batched or isinstance(result, Exception):
                for *_, answer in calls:
                    _answer(answer, not isinstance(result, Exception), result)
                continue
            for (*_, answer), reply in zip(calls, result, strict=True):
                value = reply[1] if len(reply) > 1 else None  # {1} alone: the call answered nil
                if reply[0] != 1:
                    value = ResponseError(value)
                _answer(answer, not isinstance(value, Exception), value)


class ThreadBatcher(_TurnBatcher):
    """Blocking calls made during one turn of the loop, run one after the other in one trip to a thread.

    Each trip to a thread costs a hand-off of the GIL both ways. Short calls that many tasks make at
    the same moment, such as the last file step of the stores that one Redis pipeline answered, need
    one trip between them, not one each: for the ingest's settle step, one trip for the twenty or so
    stores of a loop turn (the gain: BENCHMARKS.md, "Figures behind design choices").

    Like ``ScriptBatcher``, one call's exception is that caller's alone. The calls run in order, so a
    long one delays the rest of its batch: this is for calls of a few system calls each.
    """

    def __init__(self, executor: Executor | None = None) -> None:
        super().__init__()
        self.executor = executor  # None: the loop's default executor

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        """What ``func(*args)`` returns, run in a thread with the other calls of this loop turn."""
        return await self._join(func, args)

    def _send(self, batch: list[Blocking]) -> None:
        try:
            running = asyncio.get_running_loop().run_in_executor(self.executor, _run_each, batch)
        except RuntimeError as exc:  # the executor is shut down: nothing of the batch ran
            _fail_all(batch, exc)
            return

        def answer_all(done: asyncio.Future[list[tuple[bool, Any]]]) -> None:
            if done.cancelled():  # the executor dropped the trip before it ran; the callers were not cancelled
                _fail_all(batch, RuntimeError("the thread's work was dropped before it ran"))
                return
            # _run_each catches each call's exception, so each caller gets its own outcome; only an
            # error outside the calls (the trip itself failing) goes to all of them.
            error = done.exception()
            outcomes = done.result() if error is None else [(False, error)] * len(batch)
            for (*_, answer), (ok, value) in zip(batch, outcomes, strict=True):
                _answer(answer, ok, value)

        running.add_done_callback(answer_all)


def _run_each(batch: list[Blocking]) -> list[tuple[bool, Any]]:
    """In the thread: every call of the batch, each with its own outcome (True, result) or (False, error)."""
    outcomes: list[tuple[bool, Any]] = []
    for func, args, _ in batch:
        try:
            outcomes.append((True, func(*args)))
        except Exception as exc:
            outcomes.append((False, exc))
    return outcomes
