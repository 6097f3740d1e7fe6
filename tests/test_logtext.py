"""Log lines: a client cannot forge one or read a credential in one, in either format.

The formatters are tested on records made here; then a real `casimg serve`, in each log format, is sent
URLs holding CR LF and credentials and credential query parameters, and its log file is read back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from urllib.parse import quote

import pytest
import tornado.web

from casimg.cli import Formatter, JsonFormatter
from casimg.embedded import EmbeddedRedis
from casimg.handlers import BaseHandler, log_request
from casimg.logtext import loggable
from tests.procs import Server

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORGED = "2026-12-02 06:00:00,000 INFO casimg.access: GET /forged-line 200 0.1ms key=admin 127.0.0.1"
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def record(message: str, *args: object, fields: dict[str, object] | None = None,
           exc: BaseException | None = None) -> logging.LogRecord:
    made = logging.LogRecord("casimg.worker", logging.INFO, __file__, 1, message, args,
                             (type(exc), exc, exc.__traceback__) if exc else None)
    if fields is not None:
        made.fields = fields
    return made


@pytest.mark.parametrize(("text", "logged"), [
    ("a\r\nb", "a\\r\\nb"),
    ("tab\there", "tab\\there"),
    ("nul\x00 esc\x1b[31m del\x7f", "nul\\x00 esc\\x1b[31m del\\x7f"),
    ("c1\x85 ls\u2028 ps\u2029", "c1\\x85 ls\\u2028 ps\\u2029"),
    ("bidi\u202e\u2066", "bidi\\u202e\\u2066"),
    ("plain é ü 漢字 text", "plain é ü 漢字 text"),
    ("http://u:pw@h/\r\n", "http://***@h/\\r\\n"),
])
def test_control_characters_are_escaped_and_credentials_cut(text, logged):
    assert loggable(text) == logged


def test_a_text_record_is_one_line_and_its_traceback_is_indented():
    url = "http://user:hunter2@h/img.jpg?a=\r\n" + FORGED
    try:
        raise ValueError(f"bad URL {url}\n{FORGED}")
    except ValueError as exc:
        line = Formatter(TEXT_FORMAT).format(record("failed %s: %s", url, "invalid URL", exc=exc))
    first, *rest = line.split("\n")
    assert RECORD_START.match(first) and "\\r\\n" + FORGED in first
    assert rest and all(more.startswith("    ") for more in rest), rest  # no line a client shaped starts a record
    assert "hunter2" not in line and "http://***@h/img.jpg" in line


def test_a_json_record_holds_the_same_cleaned_message_and_fields():
    url = "http://user:hunter2@h/img.jpg?a=\r\n" + FORGED
    try:
        raise ValueError(url)
    except ValueError as exc:
        line = JsonFormatter().format(record("failed %s", url, fields={"url": url, "attempts": 1}, exc=exc))
    assert "\n" not in line
    entry = json.loads(line)
    cleaned = "http://***@h/img.jpg?a=\\r\\n" + FORGED
    assert entry["message"] == f"failed {cleaned}" and entry["url"] == cleaned and entry["attempts"] == 1
    assert "hunter2" not in line
    # The traceback keeps its lines (JSON escapes the line breaks); within each, the same escapes.
    assert entry["exc"].startswith("Traceback") and entry["exc"].endswith("?a=\\r\n" + FORGED)


class Failing(BaseHandler):
    """A handler with a bug: its unexpected exception is logged by BaseHandler, as any handler's is."""

    def get(self) -> None:
        raise RuntimeError("a bug")


@pytest.fixture
def app(services):
    return tornado.web.Application([(r"/fails", Failing, {"services": services, "route": "/fails"})],
                                   log_function=log_request)


@pytest.mark.gen_test
async def test_an_uncaught_exceptions_line_masks_key_like_parameters(http_client, base_url, caplog):
    with caplog.at_level(logging.ERROR):
        answer = await http_client.fetch(base_url + "/fails?x-api-key=SECRET1&api_key=SECRET2&limit=5",
                                          raise_error=False)
    assert answer.code == 500
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/fails?x-api-key=REDACTED&api_key=REDACTED&limit=5" in logged and "a bug" in caplog.text
    assert "SECRET" not in caplog.text


# -- a real server's log --------------------------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_servers_log_cannot_be_forged_and_holds_no_credentials(tmp_path, origin, log_format):
    secret = "hunter2-" + os.urandom(8).hex()
    keys = {name: f"{name}-{os.urandom(8).hex()}" for name in ("x-api-key", "api-key", "apikey", "API_KEY", "key")}
    crlf_url = origin.url("/img/401.jpg") + "?a=\r\n" + FORGED
    credential_url = f"http://user:{secret}@127.0.0.1:{origin.port}/img/402.jpg"
    server = Server(tmp_path / "data", "--log-format", log_format)
    try:
        job = server.submit([crlf_url, credential_url])
        assert job["results"][1] == {"url": f"http://***@127.0.0.1:{origin.port}/img/402.jpg",
                                     "status": "failed", "error": "credentials in URL", "attempts": 0}
        assert job["results"][0]["status"] == "stored"  # the URL is fine to fetch; only its log line is not
        assert server.call("GET", "/api/image?url=" + quote(credential_url, safe=""))[0] == 404
        query = "&".join(f"{name}={value}" for name, value in keys.items())
        assert server.call("GET", f"/api/images?{query}&limit=5")[0] == 200
        log = wait_for(server, "limit=5")
    finally:
        assert server.terminate() == 0
        if EmbeddedRedis(server.data_dir).alive():
            EmbeddedRedis(server.data_dir).stop()
    lines = server.output().splitlines()
    assert not any(line.startswith(FORGED) for line in lines), "a client wrote a log line of its own"
    assert FORGED in log  # it is there, inside the line of the URL that held it
    for value in [secret, *keys.values()]:
        assert value not in log
    assert all(f"{name}=REDACTED" in log for name in keys)
    assert f"http://***@127.0.0.1:{origin.port}/img/402.jpg" in log or "http%3A%2F%2F***%40127.0.0.1" in log
    if log_format == "json":
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        assert any(entry.get("url", "").endswith("\\r\\n" + FORGED) for entry in entries)
    # Nor did the secret ever reach Redis: its append-only file holds every write it was sent.
    for path in (server.data_dir / "redis").rglob("*"):
        if path.is_file() and not path.name.endswith(".sock"):
            assert secret.encode() not in path.read_bytes(), path


def wait_for(server: Server, text: str) -> str:
    """The server's log once `text` is in it (a request's line is written just after its answer)."""
    deadline = time.monotonic() + 10
    while text not in (log := server.output()):
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log}"
        time.sleep(0.05)
    return log

