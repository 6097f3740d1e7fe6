"""Property-based fuzzing of the HTTP API against its own /openapi.json document (schemathesis).

A real `casimg serve` (without download workers, so no generated URL is ever fetched) answers a bounded,
derandomized set of generated requests per operation; every answer must be documented (status, content
type, headers, body schema) and none may be a server error.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from casimg.openapi import openapi_document

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 30  # per operation: enough to walk every parameter's edge cases, few enough for CI

schema = schemathesis.openapi.from_dict(openapi_document())
WAIT_CAP = 0.5  # no worker runs here, so a job never finishes: ?wait=S would only hold the answer S seconds



@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, admin key) of a real server on a fresh data dir."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = f"casimg_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "casimg", "serve", "--data-dir", str(data_dir), "--port", str(port), "--no-workers"],
        # The fuzzer's deliberate requests with bad keys would soon turn 401s into 429s (tests/test_limits.py
        # covers that limit); here every bad key must be answered 401.
        cwd=ROOT, env={**os.environ, "CASIMG_BOOTSTRAP_KEY": key, "CASIMG_AUTH_FAILURE_LIMIT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "casimg serve did not start"
            time.sleep(0.1)
    yield base, key
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case, live):
    base, key = live
    if case.query and _seconds(case.query.get("wait")) > WAIT_CAP:
        case.query["wait"] = WAIT_CAP
    case.call_and_validate(base_url=base, headers={"X-API-Key": key})


def _seconds(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
