"""Which CPUs a casimg process runs on.

``casimg serve`` that forks one server process per CPU it may use (``--processes auto``, the default)
pins each to a CPU of its own (``serve_plan``, ``pin``): each process's event loop and threads then stay
on one core, instead of the scheduler moving them between the cores the other process uses too. Side by
side, the ingest with 2 processes on 2 cores went up by 5-27% over four runs, with up to a quarter less
CPU per image (BENCHMARKS.md, "Figures behind design choices"). ``CASIMG_PIN_PROCESSES=false`` leaves them free to
move, for a machine whose cores other work holds.

Only the server processes are pinned. The host's filler and the embedded Redis are the parent's
children, never pinned; the render pool's workers, forked from a pinned server, go back to every CPU
the parent could use (``release``), so that a burst of renders still spreads over all of them.
"""

from __future__ import annotations

import os

_before_pin: frozenset[int] | None = None  # in a pinned process: the CPUs it could use before


def usable() -> list[int]:
    """The CPUs this process may run on (a container's cpuset, taskset); empty where that is unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return []


def serve_plan(processes: int, pin: bool) -> list[int] | None:
    """The CPU for each of `processes` forked servers, or None to leave them free: pinned only when there
    is exactly one process per usable CPU, and more than one."""
    cpus = usable()
    if not pin or processes < 2 or len(cpus) != processes:
        return None
    return cpus


def pin(cpu: int) -> bool:
    """Run this process (its calling thread, and every thread and child it starts from now on) on `cpu`;
    False, and nothing changed, if the system refused (the CPU went offline since ``serve_plan``, say)."""
    global _before_pin
    try:
        before = frozenset(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return False
    _before_pin = before
    return True


def before_pin() -> frozenset[int] | None:
    """The CPUs this process could use before ``pin``; None if it was not pinned."""
    return _before_pin


def release(cpus: frozenset[int] | None) -> None:
    """Let this process run on `cpus` again (a child of a pinned process); None leaves it as it is."""
    if cpus:
        os.sched_setaffinity(0, cpus)
