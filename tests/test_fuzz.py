"""Property-based fuzzing of the HTTP API against its own /openapi.json document (schemathesis).

A real `casimg serve` (without download workers, so no generated URL is ever fetched) answers a bounded,
derandomized set of generated requests per operation; every answer must be documented (status, content
type, headers, body schema) and none may be a server error.

Left to the document alone, the generator never meets the inputs that once made 500s: a Range header with
a bound of thousands of digits (past int()'s digit limit), a lone surrogate in a submitted URL (which
Redis cannot encode), a URL over CASIMG_MAX_URL_LENGTH. The fuzzed copy of the document gives those
parameters formats of this module, whose strategies mix such values in; and one image is stored before
the fuzzing starts, so that its URL and digest (also mixed in) get past the 404 to the Range handling.
"""

from __future__ import annotations

import copy
import hashlib
import json
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
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from casimg.openapi import openapi_document
from casimg.schema import RECENT_CURSOR_PREFIX, Order
from tests.origin import Origin, image_bytes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 30  # per operation: enough to walk every parameter's edge cases, few enough for CI
WAIT_CAP = 0.5  # no worker runs here, so a job never finishes: ?wait=S would only hold the answer S seconds
STORED_PATH = "/img/7.png"  # the origin's image stored before the fuzzing (its port is known only then)
STORED_DIGEST = hashlib.sha256(image_bytes(7, "png")).hexdigest()
STORED = "casimg-fuzz:the-stored-url"  # stands for the stored URL, whose port is known only once it is stored

# A Range bound: small, absent, zero-padded, or thousands of digits.
_bound = st.one_of(st.just(""), st.integers(0, 10**6).map(str), st.integers(4000, 6000).map(lambda n: "9" * n),
                   st.integers(1, 5000).map(lambda n: "0" * n + "12"))
RANGES = st.one_of(st.builds(lambda a, b: f"bytes={a}-{b}", _bound, _bound), st.text(max_size=30))
# A submitted URL: any text, lone surrogates mixed in, or longer than CASIMG_MAX_URL_LENGTH.
_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
URLS = st.one_of(st.lists(st.one_of(st.characters(), _surrogates), max_size=20).map("".join),
                 st.integers(8193, 9000).map(lambda n: "http://127.0.0.1:9/" + "x" * n))
STORED_URL = st.one_of(st.just(STORED), st.text(min_size=1))
DIGESTS = st.one_of(st.just(STORED_DIGEST), st.from_regex(r"\A[0-9a-f]{64}\Z"))
schemathesis.openapi.format("casimg-fuzz-range", RANGES)
schemathesis.openapi.format("casimg-fuzz-submitted-url", URLS)
schemathesis.openapi.format("casimg-fuzz-stored-url", STORED_URL)
schemathesis.openapi.format("casimg-fuzz-digest", DIGESTS)


def fuzzed_document() -> dict:
    """openapi_document() with this module's formats on the parameters they feed."""
    document = copy.deepcopy(openapi_document())
    paths = document["paths"]
    for operation in (*paths["/api/image"].values(), *paths["/api/image/meta"].values(),
                      *paths["/api/blobs/{digest}"].values()):
        for parameter in operation["parameters"]:
            parameter["schema"] = {**parameter["schema"], "format": {
                "Range": "casimg-fuzz-range", "url": "casimg-fuzz-stored-url", "digest": "casimg-fuzz-digest",
            }[parameter["name"]]}
            parameter["schema"].pop("pattern", None)
            parameter["schema"].pop("minLength", None)
    submit = document["components"]["schemas"]["Submit"]["properties"]["image_urls"]
    submit["items"] = {"type": "string", "format": "casimg-fuzz-submitted-url"}
    return document


schema = schemathesis.openapi.from_dict(fuzzed_document())



@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(base URL, admin key, the URL of its one stored image) of a real server on a fresh data dir."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = f"casimg_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    base = f"http://127.0.0.1:{port}"
    with Origin() as origin:  # one image, stored by a first server with workers
        stored_url = origin.url(STORED_PATH)
        storing = _serve(data_dir, port, key, allow="127.0.0.1/32")
        request = urllib.request.Request(base + "/api/images?wait=30", method="POST",
                                         data=json.dumps({"image_urls": [stored_url]}).encode(),
                                         headers={"X-API-Key": key, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert json.loads(answer.read())["stored"] == 1
        storing.send_signal(signal.SIGTERM)
        assert storing.wait(20) == 0
    process = _serve(data_dir, port, key, "--no-workers")
    yield base, key, stored_url
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0


def _serve(data_dir: Path, port: int, key: str, *extra: str, allow: str = "") -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "casimg", "serve", "--data-dir", str(data_dir), "--port", str(port), *extra],
        # The fuzzer's deliberate requests with bad keys would soon turn 401s into 429s (tests/test_limits.py
        # covers that limit); here every bad key must be answered 401.
        cwd=ROOT, env={**os.environ, "CASIMG_BOOTSTRAP_KEY": key, "CASIMG_AUTH_FAILURE_LIMIT": "0",
                       "CASIMG_ALLOW_NETWORKS": allow},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "casimg serve did not start"
            time.sleep(0.1)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case, live):
    base, key, stored_url = live
    if case.query and case.query.get("url") == STORED:
        case.query["url"] = stored_url
    if case.query and _seconds(case.query.get("wait")) > WAIT_CAP:
        case.query["wait"] = WAIT_CAP
    if _cursor_of_another_order(case.query):
        # Each order has its cursor (both forms are in the document, which cannot tie one parameter to
        # another): one of the other order is a 400.
        response = case.call_and_validate(base_url=base, headers={"X-API-Key": key},
                                          excluded_checks=[positive_data_acceptance])
        assert response.status_code == 400, response.text
        return
    if _has_callback(case.body):
        # This server has no CASIMG_WEBHOOK_SECRET, so it takes no callback: a 400 naming the setting.
        response = case.call_and_validate(base_url=base, headers={"X-API-Key": key},
                                          excluded_checks=[positive_data_acceptance])
        assert response.status_code == 400, response.text
        return
    if not _has_lone_surrogate(case.body):
        case.call_and_validate(base_url=base, headers={"X-API-Key": key})
        return
    # A lone surrogate is a JSON string, so the schema allows it, but no URL: a 400, never a 500.
    response = case.call_and_validate(base_url=base, headers={"X-API-Key": key},
                                      excluded_checks=[positive_data_acceptance])
    assert response.status_code == 400, response.text


def _cursor_of_another_order(query: dict | None) -> bool:
    if not query or not isinstance(query.get("cursor"), str):
        return False
    return query["cursor"].startswith(RECENT_CURSOR_PREFIX) != (query.get("order") == Order.RECENT)


def _has_callback(body: object) -> bool:
    return isinstance(body, dict) and body.get("callback_url") not in (None, "")


def _has_lone_surrogate(body: object) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("image_urls"), list):
        return False
    return any(isinstance(url, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in url) for url in body["image_urls"])


def _seconds(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
