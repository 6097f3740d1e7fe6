"""OpenTelemetry traces: a real `casimg serve` exporting over OTLP/HTTP to a receiver the test runs, and the
span tree of one URL from its submit (a link) to its store; off by default, with nothing of OpenTelemetry loaded."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from casimg.tracing import configured
from tests.origin import image_bytes
from tests.procs import ROOT, Processes


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    service: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id) of each
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, attributes) of each

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (POST /v1/traces, protobuf), keeping every span it gets."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    receiver._add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    with self._lock:
                        self.spans.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                               s.kind, {a.key: _value(a.value) for a in s.attributes},
                                               resource.get("service.name", ""),
                                               [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                               [(e.name, {a.key: _value(a.value) for a in e.attributes})
                                                for e in s.events]))

    def wait_for(self, *prefixes: str, timeout: float = 30) -> list[Span]:
        """Every span so far, once one whose name starts with each of `prefixes` has come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(any(s.name.startswith(p) for s in self.spans) for p in prefixes):
                    return list(self.spans)
            time.sleep(0.1)
        raise AssertionError(f"not all of {prefixes} within {timeout} s; got {sorted({s.name for s in self.spans})}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    tracked = Processes()
    yield tracked
    tracked.cleanup()


def one(spans: list[Span], **wanted: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in wanted.items())]
    assert len(found) == 1, (wanted, [(s.name, s.parent_id) for s in spans])
    return found[0]


@pytest.mark.slow
def test_one_url_is_traced_from_its_submit_to_its_store(tmp_path, origin, receiver, procs):
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_SERVICE_NAME": "casimg-under-test", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
           "CASIMG_ORIGIN_RATE": "100"}  # the origin's pacing on, so its script runs
    server = procs.server(tmp_path / "data", env=env)
    url = origin.url("/img/640.jpg?traced")
    assert server.submit([url])["stored"] == 1
    spans = receiver.wait_for("casimg.store", "POST /api/images")  # ?wait: the POST ends last

    process = one(spans, name="casimg.process")
    assert process.attributes["url.full"] == url
    assert process.attributes["casimg.outcome"] == "stored"
    assert process.service == "casimg-under-test"
    # A trace of its own, linked to the submit's span: its context went through the job and the queue entry.
    assert process.parent_id == ""
    submit = one(spans, span_id=process.links[0][1])
    assert process.links == [(submit.trace_id, submit.span_id)] and submit.trace_id != process.trace_id
    assert submit.name.startswith("POST /api/images") and submit.kind == SpanProto.SPAN_KIND_SERVER
    # A Redis script is an event of the span it runs in, named by its script, with its time.
    assert "redis publish" in submit.event_names()

    children = {s.name: s for s in spans if s.parent_id == process.span_id}
    assert set(children) == {"casimg.download", "casimg.validate", "casimg.store"}
    # The download is the request's client span: no GET span of its own for the image.
    download = children["casimg.download"]
    assert download.kind == SpanProto.SPAN_KIND_CLIENT
    assert download.attributes["network.peer.address"] == "127.0.0.1"
    assert download.attributes["http.response.status_code"] == 200
    assert download.attributes["casimg.outcome"] == "downloaded"
    assert download.attributes["casimg.size"] == len(image_bytes(640))
    # The origin's robots.txt, fetched once by this first download, is a client span under it.
    robots = one(spans, parent_id=download.span_id)
    assert (robots.name, robots.kind, robots.attributes["url.full"]) == \
        ("GET", SpanProto.SPAN_KIND_CLIENT, origin.url("/robots.txt"))
    assert "redis origin_pace" in process.event_names()  # the origin's first tokens, taken before the download
    store_events = dict(children["casimg.store"].events)
    assert store_events["redis store"]["db.system"] == "redis"
    assert store_events["redis store"]["casimg.duration_ms"] >= 0
    assert not any(s.name.startswith("redis ") for s in spans)
    assert {s.trace_id for s in spans if s.name.startswith("casimg.")} == {process.trace_id}


def test_tracing_is_off_by_default_and_loads_nothing_of_opentelemetry():
    # redis-py imports opentelemetry's API and metrics SDK by itself when they are installed: what casimg
    # alone would load is the tracing SDK, the instrumentations and the exporters.
    ours = ("opentelemetry.sdk.trace", "opentelemetry.instrumentation", "opentelemetry.exporter")
    script = ("import sys, casimg.runtime, casimg.tracing as t; on = t.setup(); "
              f"print(on, any(m.startswith({ours!r}) for m in sys.modules))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_an_exporter_in_the_environment_turns_tracing_on(environ, on):
    assert configured(environ) is on


@pytest.mark.slow
def test_a_redirect_is_an_event_of_the_download(tmp_path, origin, receiver, procs):
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    server = procs.server(tmp_path / "data", env=env)
    url = origin.url("/redirect/1")
    assert server.submit([url])["stored"] == 1
    spans = receiver.wait_for("casimg.store", "POST /api/images")
    download = one(spans, name="casimg.download")
    hops = [attributes for name, attributes in download.events if name == "redirect"]
    assert [hop["url.full"] for hop in hops] == [url]
    assert hops[0]["http.response.status_code"] in (301, 302, 303, 307, 308)
    assert download.attributes["http.response.status_code"] == 200
    assert {s.name for s in spans if s.parent_id == download.span_id} == {"GET"}  # robots.txt alone


# Run in a process of its own: the SDK's tracer provider is set once per process.
SAMPLED_SCRIPT = """
import casimg.tracing as t
from opentelemetry import trace
assert t.setup()
with t.span("casimg.process", {"url.full": "u"}, link=""):
    print("dropped:", trace.get_current_span() is trace.INVALID_SPAN, t.span("casimg.store") is t._OFF,
          t.leaf("casimg.validate") is t._OFF)
"""


@pytest.mark.parametrize(("sampler", "made"), [("always_on", True), ("always_off", False)])
def test_a_url_the_sampler_drops_switches_no_context_and_makes_no_span(sampler, made):
    env = {"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1", "PYTHONPATH": str(ROOT),
           "OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": sampler}
    out = subprocess.run([sys.executable, "-c", SAMPLED_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("dropped:"))  # the console exporter's too
    assert line.split()[1:] == [str(not made)] * 3


@pytest.mark.slow
def test_a_request_is_a_server_span_under_the_callers_traceparent(tmp_path, receiver, procs):
    # The sampler drops every trace of casimg's own; a caller's sampled parent is honoured all the same.
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    server = procs.server(tmp_path / "data", env=env)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    status, _, _ = server.call("GET", "/api/jobs/00000000000000000000000a",
                               headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert status == 404
    spans = receiver.wait_for("GET /api/jobs")
    request = one(spans, name="GET /api/jobs/{job_id}")
    assert (request.trace_id, request.parent_id, request.kind) == (trace_id, parent_id, SpanProto.SPAN_KIND_SERVER)
    assert request.attributes["http.response.status_code"] == 404
    assert request.attributes["http.route"] == "/api/jobs/{job_id}"
    assert [s.name for s in spans] == [request.name]  # the startup's own requests were dropped by the sampler
