"""What the OpenTelemetry Python SDK itself costs per span on this machine: the floor under casimg's tracing.

    .venv/bin/python -m bench.tracing_floor                 # 20,000 of each, sink started here
    .venv/bin/python -m bench.tracing_floor --count 50000

Each figure is the process's CPU (every thread: the batch processor's export thread included, flushed at
the end of each case) divided by the operations, so it is what one more span costs the casimg process.
The exporter is the one casimg uses (OTLP over HTTP/protobuf, BatchSpanProcessor with the SDK's
defaults) sending to bench.otlp_sink started in a process of its own, once decoding like a receiver and
once dropping; the receiver's own CPU is not counted. Cases:

- a kept span: start_as_current_span + 4 attributes + end, exported (what casimg.download... cost);
- a span event: add_event with one attribute on a kept span (what a Redis script as an event costs);
- a dropped root: a root span the sampler drops (ParentBased(TraceIdRatio(0))), started and ended;
- a dropped child: a child started under a dropped root (what casimg avoids by testing is_recording);
- the test: get_current_span().is_recording();
- attach/detach: context.attach(set_span_in_context(...)) + detach, the churn of start_as_current_span.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

from bench import log
from bench.procs import free_port, wait_port

ATTRIBUTES = {"url.full": "http://127.0.0.1:8080/img/123.jpg", "casimg.outcome": "downloaded",
              "casimg.size": 123456, "network.peer.address": "127.0.0.1"}


def per_op_us(count: int, op: Callable[[], None], flush: Callable[[], None] | None = None) -> float:
    for _ in range(min(count // 10, 1000)):  # warm up
        op()
    if flush:
        flush()
    start = time.process_time()
    for _ in range(count):
        op()
    if flush:
        flush()
    return (time.process_time() - start) / count * 1e6


def run(count: int, endpoint: str, label: str) -> list[tuple[str, float]]:
    from opentelemetry import context, trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    kept = TracerProvider()
    # A queue that holds every span of the case: the SDK's 2,048 would drop most of them here (they come
    # far faster than casimg makes them), and a dropped span skips the export this is meant to count.
    kept.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces"),
                                               max_queue_size=2 * count + 2000))
    tracer = kept.get_tracer("floor")
    flush = kept.force_flush

    def span() -> None:
        with tracer.start_as_current_span("casimg.download", attributes=ATTRIBUTES):
            pass

    figures = [(f"kept span, 4 attributes ({label})", per_op_us(count, span, flush))]
    with tracer.start_as_current_span("holder") as holder:
        figures.append((f"span event, 1 attribute ({label})",
                        per_op_us(count, lambda: holder.add_event("redis store", {"db.system": "redis"}))))
        # the events go out with the holder: its export is part of their cost, at most 128 are kept
    flush()

    dropping = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    dropping.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces")))
    dropper = dropping.get_tracer("floor")

    def dropped_root() -> None:
        with dropper.start_as_current_span("casimg.process", attributes=ATTRIBUTES):
            pass

    figures.append(("dropped root span", per_op_us(count, dropped_root)))
    with dropper.start_as_current_span("casimg.process"):
        def dropped_child() -> None:
            with dropper.start_as_current_span("casimg.store", attributes=ATTRIBUTES):
                pass

        figures.append(("dropped child span", per_op_us(count, dropped_child)))
        figures.append(("is_recording() of the current span",
                        per_op_us(count, lambda: trace.get_current_span().is_recording() and None)))
        current = trace.get_current_span()

        def attach_detach() -> None:
            context.detach(context.attach(trace.set_span_in_context(current)))

        figures.append(("context attach + detach", per_op_us(count, attach_detach)))
    kept.shutdown()
    dropping.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    results: list[tuple[str, float]] = []
    for decode in (True, False):
        port = free_port()
        sink = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", "--port", str(port)]
                                + (["--decode"] if decode else []))
        try:
            wait_port(port)
            figures = run(args.count, f"http://127.0.0.1:{port}", "receiver decodes" if decode else "receiver drops")
            results.extend(figures if decode else figures[:2])
        finally:
            sink.terminate()
            sink.wait()
    log(f"done; load average {os.getloadavg()[0]:.1f}")
    print(f"\n{args.count:,} of each, Python {sys.version.split()[0]}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| operation | CPU µs each |")
    print("|---|---|")
    for name, us in results:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
