"""An OTLP/HTTP trace receiver on 127.0.0.1 for the tracing benchmarks, in a process of its own so its CPU
is not counted as casimg's.

    .venv/bin/python -m bench.otlp_sink --port 4318            # answers every export, decodes nothing
    .venv/bin/python -m bench.otlp_sink --port 4318 --decode   # parses each export, counts the spans

A casimg with ``OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`` exports here
instead of retrying against a closed port. With --decode the spans received are counted by name, and
the counts printed at exit (SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EMPTY_REPLY = b""  # an ExportTraceServiceResponse with no field set serialises to no bytes


def serve(port: int, decode: bool) -> None:
    spans: Counter[str] = Counter()
    if decode:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

        def do_POST(self) -> None:  # the name http.server calls
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if decode:
                request = ExportTraceServiceRequest.FromString(body)
                spans.update(span.name for r in request.resource_spans for s in r.scope_spans for span in s.spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(EMPTY_REPLY)))
            self.end_headers()
            self.wfile.write(EMPTY_REPLY)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def stop(*_: Any) -> None:
        names = ", ".join(f"{name} {count}" for name, count in spans.most_common())
        print(f"otlp_sink: {spans.total()} spans ({names})", file=sys.stderr, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--decode", action="store_true", help="parse every export (a receiver's work)")
    args = parser.parse_args()
    serve(args.port, args.decode)


if __name__ == "__main__":
    main()
