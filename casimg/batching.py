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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from casimg import tracing

Call = tuple[AsyncScript, list[Any], list[Any], "asyncio.Future[Any]"]  # a queued script call
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

    async def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """What ``script(keys=keys, args=args)`` returns, sent with the other calls of this loop turn."""
        if tracing.enabled:
            return await tracing.script_call(script, lambda: self._join(script, keys, args))
        return await self._join(script, keys, args)

    def _send(self, batch: list[Call]) -> None:
        task = asyncio.ensure_future(self._run(batch))
        self._sending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._sending.discard)

    async def _run(self, batch: list[Call]) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                results: list[Any] = [await script(keys=keys, args=args)]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # Redis away: every caller gets the error, and retries as it would
            _fail_all(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (script, keys, args, answer), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):
                # Redis lost its script cache (a restart): the plain call loads the script and runs it.
                try:
                    result = await script(keys=keys, args=args)
                except Exception as exc:  # handed to the caller, who sees it raised
                    result = exc
            _answer(answer, not isinstance(result, Exception), result)


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
