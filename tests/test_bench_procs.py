"""bench/procs.py, which starts the children of the benchmark and of the end-to-end tests: a child that
never serves is stopped and its log quoted; a forking child's whole group is stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from bench.procs import Procs, free_port, start, wait_port


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_exits_before_it_serves_fails_the_start_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    with pytest.raises(RuntimeError, match=r"(?s)exited 3 while waiting for port \d+ to accept.*no config here"):
        start(python("import sys; print('no config here', flush=True); sys.exit(3)"), log,
              lambda child: wait_port(free_port(), child))


def test_a_child_that_never_serves_is_killed_when_the_wait_gives_up(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(RuntimeError, match="waited 1 s"):
        start(python(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"),
              tmp_path / "child.log", lambda child: wait_port(free_port(), child, timeout=1))
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the child outlived its failed start"


def test_stopping_a_session_child_stops_the_children_it_forked(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    code = (f"import os, time\nif os.fork() == 0:\n    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "    time.sleep(60)\nelse:\n    time.sleep(60)\n")
    procs = Procs()
    child = procs.start(python(code), tmp_path / "child.log")
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child did not fork"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    procs.stop_all()
    assert child.poll() is not None and not procs.children
    deadline = time.monotonic() + 30
    while Path(f"/proc/{grandchild}").exists() and b"Z" not in _state(grandchild):
        assert time.monotonic() < deadline, "the forked child outlived the stop"
        time.sleep(0.05)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"
