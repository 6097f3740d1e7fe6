"""OpenTelemetry traces: off unless an exporter is configured through the standard ``OTEL_*`` variables.

On when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``; ``none`` keeps it off) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), unless
``OTEL_SDK_DISABLED=true``. Everything else is the SDK's own reading of the environment: the service name
(``OTEL_SERVICE_NAME``, "casimg" when unset), the sampler (``OTEL_TRACES_SAMPLER``), the batch
processor (``OTEL_BSP_*``), the exporter's endpoint, headers and protocol (``http/protobuf``, the
default; ``grpc`` needs opentelemetry-exporter-otlp-proto-grpc installed). The packages come with
``pip install 'casimg[tracing]'``; without them a configured exporter is reported once and ignored.

Off, this module imports nothing of OpenTelemetry and each hook below is a test of ``enabled`` or an
empty context manager: the default install pays nothing for it. On, the sampler decides once per URL,
at its root span (``span`` with a link): a URL it drops costs that decision (a non-recording root that
is never made current), and every later hook finds no recording span and returns at once.

What a span costs sets the tree's shape: about 50 µs of CPU each with the Python SDK and its OTLP
exporter (bench.tracing_floor), against about 1.5 ms of CPU for a whole image; an event on a span
about 3 µs. So a URL the sampler keeps has four spans, one per step where its time can go (process,
download, validate, store), and its Redis scripts and redirects are events of the span they happen in.

The spans, for one URL (``setup`` is called by each ``casimg serve`` and ``casimg worker`` process)::

    POST /api/images                    server span, one per HTTP request (method and route; _patch_requests)
    ┆  · redis enqueue, redis publish   events: one per Redis script, with its time (casimg.duration_ms)
    ┆  (link)
    casimg.process                      the URL's processing by a worker, a trace of its own with a link
       │                                to the submit: the submit's context rides in the job and in each
       │                                queue entry ("tp"). Not a child: a job of 100,000 URLs would be
       │                                one trace of half a million spans, sampled all or nothing.
       │                                Event: redis origin_pace (a refill of the origin's tokens).
       ├─ casimg.download               client span, per attempt: url.full, network.peer.address (the
       │  │                             address connected to), http.response.status_code, casimg.outcome,
       │  │                             casimg.reason, casimg.size; event: redirect (a hop's url.full and
       │  │                             status).
       │  │                             casimg's own span, not opentelemetry-instrumentation-aiohttp-
       │  │                             client's, which sends a traceparent header to every origin (an
       │  │                             internal id to third parties) and cost a tenth of the event loop
       │  └─ GET                        the origin's robots.txt, when this download fetched it
       ├─ casimg.validate               validation, temp file and link, in a thread
       └─ casimg.store                  made durable, indexed, settled; event: redis store
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger("casimg.tracing")

enabled = False  # True once setup() found an exporter and installed the SDK; read by the hooks below
TRACEPARENT = "traceparent"  # the W3C header, and the name of the one field a stored context holds
_tracer: Any = None
_provider: Any = None
_api: Any = None  # opentelemetry.trace, once on (imported in setup: an import per call costs a lookup each)
_propagate: Any = None  # opentelemetry.propagate
_root: Any = None  # an empty context: a span started in it begins a trace
_script_names: dict[str, str] = {}
_in_script: contextvars.ContextVar[bool] = contextvars.ContextVar("casimg_in_script", default=False)
# What the hooks return while off: one shared object, nothing made per call.
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()
Attributes = Mapping[str, str | int | float | bool]


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (see the module's docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup() -> bool:
    """Install the tracer provider and casimg's hooks if the environment asks for traces; True if on.

    Once per process, before the Tornado application and the download session are made (a forked
    ``serve --processes`` child calls it for itself: the exporter's thread does not survive a fork).
    """
    global enabled, _tracer, _provider
    if enabled or not configured():
        return enabled
    try:
        provider = _provider_from_environment()
    except ImportError as missing:
        log.warning("tracing is configured (OTEL_*) but its packages are missing (%s): "
                    "pip install 'casimg[tracing]'; running without traces", missing.name)
        return False
    global _api, _propagate, _root
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context

    _api, _propagate, _root = trace, propagate, Context()
    trace.set_tracer_provider(provider)
    _patch_requests()
    _patch_scripts()
    _tracer = provider.get_tracer("casimg")
    _provider = provider
    enabled = True
    log.info("tracing on: exporter %s", os.environ.get("OTEL_TRACES_EXPORTER") or "otlp")
    return True


def shutdown() -> None:
    """Export what is left, at stop."""
    if _provider is not None:
        _provider.shutdown()


def _provider_from_environment() -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from casimg import __version__

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "casimg"}))
    provider = TracerProvider(resource=resource)  # the sampler and span limits come from OTEL_* too
    names = [name.strip().lower() for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    for name in filter(None, names):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (casimg knows otlp and console)")
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    return OTLPSpanExporter()


# -- hooks for the rest of casimg: each a no-op while tracing is off ------------------------------------


def span(name: str, attributes: Attributes | None = None, link: str | None = None,
         client: bool = False) -> contextlib.AbstractContextManager[Any]:
    """A span around the block, a child of the current span; an exception leaving the block is recorded.

    With `link` (a traceparent from ``current()``, "" if none was stored), the span starts a trace of its
    own instead, linked to the span `link` names: how a URL's processing refers to its job's submit. That
    is where the sampler decides, once per URL: a root it drops is never made current, so every later
    hook of the URL finds no recording span and returns at once, with no span object made and no
    context switched (bench.tracing_floor: a dropped child span costs 6 µs, the test 0.3 µs).
    `client` makes it a client span (an outgoing request: a download).
    """
    if not enabled:
        return _OFF
    kind = _api.SpanKind.CLIENT if client else _api.SpanKind.INTERNAL
    if link is None:
        if not _api.get_current_span().is_recording():
            return _OFF  # under a span the sampler dropped: its children would be dropped too, at a cost
        return _tracer.start_as_current_span(name, attributes=attributes, kind=kind)
    root = _tracer.start_span(name, context=_root, attributes=attributes, kind=kind)
    if not root.is_recording():
        return _OFF
    # The link is read only for a kept URL (the sampler casimg is configured with does not look at links).
    linked = _api.get_current_span(_propagate.extract({TRACEPARENT: link})).get_span_context() if link else None
    if linked is not None and linked.is_valid:
        root.add_link(linked)
    return _api.use_span(root, end_on_exit=True, record_exception=True, set_status_on_exception=True)


def leaf(name: str) -> contextlib.AbstractContextManager[Any]:
    """A span with no children around the block (validation), not made current: one context switch less."""
    if not enabled or not _api.get_current_span().is_recording():
        return _OFF
    return _Leaf(_tracer.start_span(name))


class _Leaf:
    __slots__ = ("span",)

    def __init__(self, started: Any) -> None:
        self.span = started

    def __enter__(self) -> Any:
        return self.span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: Any) -> None:
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(_api.Status(_api.StatusCode.ERROR, f"{kind.__name__}: {error}" if kind else ""))
        self.span.end()


def annotate(attributes: Attributes) -> None:
    """Set `attributes` on the current span (the download's address, a URL's outcome)."""
    if enabled:
        _api.get_current_span().set_attributes(attributes)


def event(name: str, attributes: Attributes) -> None:
    """An event on the current span, if it is recorded (a redirect of a download)."""
    if enabled:
        current = _api.get_current_span()
        if current.is_recording():
            current.add_event(name, attributes)


def current() -> str:
    """The current span's context as a W3C traceparent, to store with a job; "" when off or outside a span."""
    if not enabled:
        return ""
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def request_span(url: object) -> contextlib.AbstractAsyncContextManager[Any]:
    """A client span around one HTTP request that is not the download itself (robots.txt), ``async with``."""
    if not enabled or not _api.get_current_span().is_recording():
        return _OFF  # nullcontext serves ``async with`` too
    return _AsyncSpan(_tracer.start_as_current_span("GET", kind=_api.SpanKind.CLIENT,
                                                    attributes={"url.full": str(url), "http.request.method": "GET"}))


class _AsyncSpan:
    """A span's context manager for ``async with``: entered and left in the same task, as the sync one."""

    def __init__(self, manager: contextlib.AbstractContextManager[Any]) -> None:
        self._manager = manager

    async def __aenter__(self) -> Any:
        return self._manager.__enter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        return self._manager.__exit__(*exc)


async def script_call(script: Any, call: Callable[[], Awaitable[Any]]) -> Any:
    """``await call()``, a call of the Redis script `script`, recorded as an event of the current span.

    An event, not a span: a script runs inside a step that has its span already (``redis store`` in
    ``casimg.store``), and an event costs a fifteenth of a span (bench.tracing_floor). It carries the
    script's name, its time (``casimg.duration_ms``) and, if it failed, the error's type.
    """
    current = _api.get_current_span() if enabled else None
    if current is None or _in_script.get() or not current.is_recording():
        return await call()
    marker = _in_script.set(True)  # a batch task copies this context: its own call adds no second event
    started = time.time_ns()
    attributes: dict[str, str | float] = {"db.system": "redis"}
    try:
        return await call()
    except BaseException as error:
        attributes["error.type"] = type(error).__name__
        raise
    finally:
        _in_script.reset(marker)
        attributes["casimg.duration_ms"] = round((time.time_ns() - started) / 1e6, 3)
        current.add_event(f"redis {script_name(script.sha)}", attributes, timestamp=started)


def script_name(sha: str) -> str:
    """casimg's name for a Lua script (its file in casimg/lua, or the constant it is built from)."""
    if not _script_names:
        from casimg import lua, politeness

        sources = {name: lua.source(name) for name in lua.SCRIPTS}
        sources.update(origin_pace=politeness.PACE_LUA, origin_cool=politeness.COOL_LUA)
        for name, text in sources.items():
            _script_names[hashlib.sha1(text.encode()).hexdigest()] = name
    return _script_names.get(sha, "script " + sha[:8])


def _patch_scripts() -> None:
    """An event per direct script call (``await script(keys=..., args=...)``) made inside a recorded span:
    a call outside one (the workers' polling) would have nothing to go with, and one queued on a
    pipeline is not sent yet."""
    from redis.asyncio.client import Pipeline
    from redis.commands.core import AsyncScript

    plain = AsyncScript.__call__

    async def traced(self: AsyncScript, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        if isinstance(client, Pipeline):
            return await plain(self, keys, args, client)
        return await script_call(self, lambda: plain(self, keys, args, client))

    AsyncScript.__call__ = traced  # type: ignore[method-assign]


def _patch_requests() -> None:
    """A server span per HTTP request, around the handler's whole run (``RequestHandler._execute``).

    casimg's own rather than opentelemetry-instrumentation-tornado's: that one builds a dozen attributes
    and four metric records for every request before the sampler is asked, about 60 µs of CPU per request
    even when the sampler drops it (a third of what a GET /api/image costs at 10% sampling). Here the
    sampler decides first (a caller's ``traceparent`` is honoured), and only a kept request gets its name
    (method and route, as /metrics labels it), attributes and context.
    """
    import tornado.web

    plain = tornado.web.RequestHandler._execute
    server = _api.SpanKind.SERVER

    async def traced(self: tornado.web.RequestHandler, transforms: Any, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        parent = _propagate.extract(request.headers) if TRACEPARENT in request.headers else _root
        method = request.method or "HTTP"
        started = _tracer.start_span(method, context=parent, kind=server)
        if not started.is_recording():
            return await plain(self, transforms, *args, **kwargs)
        route = getattr(self, "route", None)
        started.update_name(f"{method} {route}" if route and route != "unmatched" else method)
        started.set_attributes({"http.request.method": method, "url.path": request.path,
                                "http.route": route or "", "client.address": request.remote_ip or ""})
        with _api.use_span(started, end_on_exit=True):
            try:
                return await plain(self, transforms, *args, **kwargs)
            finally:
                status = self.get_status()
                started.set_attribute("http.response.status_code", status)
                if status >= 500:
                    started.set_status(_api.Status(_api.StatusCode.ERROR))

    tornado.web.RequestHandler._execute = traced  # type: ignore[method-assign]
