"""Read latency while clients flood casimg with submits of the largest size it accepts.

    git worktree add ../casimg-before <commit>      # the code to compare against (optional)
    .venv/bin/python -m bench.submit_flood --other ../casimg-before

For each checkout (this one, then --other if given) on a fresh redis-server (AOF on, as the embedded
one) and data directory: one image is stored through `casimg serve`, then two `casimg serve
--no-workers` share that Redis, A and B. Two readers, each its own process on one kept-alive
connection, GET the image by URL in a loop: one from A, one from B. They read alone for --idle
seconds, then while --flooders processes each POST --submits bodies of 10,000 URLs of 1,660
characters (16.6 MB, just under CASIMG_MAX_BODY_BYTES) to A. No worker runs, so no flood URL is
fetched; every submit is recorded (the rate and in-flight limits are off). Redis's SLOWLOG, set to
keep every call, gives the time Redis spent in each of its calls during the phase.

Reader B sees what the Redis calls of a submit cost everyone; reader A adds what the submit costs the
process that parses it. Only loopback and unix sockets are used; bounded by --submits and --timeout.
Prints a markdown table; writes nothing to the repository.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from bench import log, workspace
from bench.procs import ROOT, Procs
from bench.report import platform_line
from bench.stack import start_casimg, start_redis

URLS_PER_SUBMIT = 10_000  # CASIMG_MAX_URLS_PER_REQUEST
URL_CHARACTERS = 1_660  # 10,000 of them, JSON-quoted, stay under CASIMG_MAX_BODY_BYTES (16 MiB)
SLOWLOG_LENGTH = 500_000  # SLOWLOG keeps every Redis call of a phase (a submit makes about 600)


def _image() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 90)).save(out, "PNG")
    return out.getvalue()


def start_origin() -> tuple[ThreadingHTTPServer, str]:
    """One PNG at /a.png on 127.0.0.1, in a thread of this process."""
    body = _image()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/a.png"


def read_loop(base: str, key: str, url: str, stop: Any, timeout: float) -> list[float]:
    """GET the image until `stop` (or `timeout`); the latency of each read in ms."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    path, headers = f"/api/image?url={quote(url, safe='')}", {"X-API-Key": key}
    taken: list[float] = []
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        started = time.perf_counter()
        connection.request("GET", path, headers=headers)
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"read answered {answer.status}")
        taken.append((time.perf_counter() - started) * 1000)
    connection.close()
    return taken


def flood(base: str, key: str, tag: int, count: int, timeout: float) -> list[tuple[int, float]]:
    """POST `count` largest submits (distinct URLs in each); the status and seconds of each."""
    parts = urlsplit(base)
    taken: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    for n in range(count):
        if time.monotonic() > deadline:
            break
        stem = f"http://127.0.0.1:9/{tag}-{n}/"
        urls = [stem + f"{i:05d}/" + "x" * (URL_CHARACTERS - len(stem) - 6) for i in range(URLS_PER_SUBMIT)]
        body = json.dumps({"image_urls": urls}).encode()
        connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                                timeout=max(1.0, deadline - time.monotonic()))
        started = time.perf_counter()
        connection.request("POST", "/api/images", body=body,
                           headers={"X-API-Key": key, "Content-Type": "application/json"})
        answer = connection.getresponse()
        reply = answer.read()
        connection.close()
        if answer.status != 202:
            # A 503: casimg gave up waiting for Redis (which still records the job, later).
            print(f"submit answered {answer.status}: {reply[:200]!r}", file=sys.stderr)
        taken.append((answer.status, time.perf_counter() - started))
    return taken


def percentiles(samples: list[float]) -> tuple[float, float, float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98], max(samples)


def run_one(label: str, checkout: Path, work: Path, args: argparse.Namespace) -> list[str]:
    """This checkout's rows of the table."""
    import redis

    procs = Procs()
    # PYTHONSAFEPATH: `python -m` would put the working directory ahead of PYTHONPATH.
    code = {"PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1", "CASIMG_MAX_JOBS_IN_FLIGHT": "100000",
            "CASIMG_MAX_QUEUED_BYTES": "0"}
    origin, image_url = start_origin()
    try:
        _, redis_url = start_redis(procs, work / f"redis-{label}", persistent=True)
        data = work / f"data-{label}"
        storing = start_casimg(procs, data, redis_url, extra_env=code)
        request = http.client.HTTPConnection("127.0.0.1", storing.port, timeout=60)
        request.request("POST", "/api/images?wait=30", body=json.dumps({"image_urls": [image_url]}),
                        headers={"X-API-Key": storing.key, "Content-Type": "application/json"})
        stored = json.loads(request.getresponse().read())
        if stored.get("stored") != 1:
            raise RuntimeError(f"the image was not stored: {stored}")
        procs.stop(storing.proc)
        a = start_casimg(procs, data, redis_url, workers=False, extra_env=code)
        b = start_casimg(procs, data, redis_url, workers=False, extra_env=code)
        client = redis.Redis.from_url(redis_url)
        rows: list[str] = []
        with ProcessPoolExecutor(max_workers=2 + args.flooders) as pool:
            manager = multiprocessing.Manager()
            for phase in ("idle", "flood"):
                stop = manager.Event()
                readers = [pool.submit(read_loop, server.base, server.key, image_url, stop, args.timeout)
                           for server in (a, b)]
                client.config_set("latency-monitor-threshold", 10)
                client.execute_command("LATENCY", "RESET")
                client.config_set("slowlog-log-slower-than", 0)
                client.config_set("slowlog-max-len", SLOWLOG_LENGTH)
                client.slowlog_reset()
                submits: list[tuple[int, float]] = []
                if phase == "idle":
                    time.sleep(args.idle)
                else:
                    time.sleep(1.0)  # the readers are under way
                    floods = [pool.submit(flood, a.base, a.key, n, args.submits, args.timeout)
                              for n in range(args.flooders)]
                    submits = [submit for future in floods for submit in future.result()]
                stop.set()
                samples = [future.result() for future in readers]  # before SLOWLOG GET, a call of its own
                slow = client.slowlog_get(SLOWLOG_LENGTH)
                durations = [entry["duration"] / 1000 for entry in slow]
                call_p99, longest = statistics.quantiles(durations, n=100)[98], max(durations)
                over_10 = sum(1 for duration in durations if duration > 10)
                if args.show_slow:
                    log(f"{label} {phase}: latency events over 10 ms (event, time, latest ms, max ms): "
                              f"{client.execute_command('LATENCY', 'LATEST')}")
                for entry in sorted(slow, key=lambda entry: -entry["duration"])[:args.show_slow]:
                    log(f"{label} {phase}: {entry['duration']} us {entry['command'][:80]!r}")
                for name, taken in zip(("A (parses the submits)", "B (another process)"), samples, strict=True):
                    p50, p90, p99, top = percentiles(taken)
                    refused = sum(1 for status, _ in submits if status != 202)
                    flood_text = "none"
                    if submits:
                        flood_text = (f"{len(submits)} x 16.6 MB, {statistics.mean(s for _, s in submits):.1f} s "
                                      f"each" + (f" ({refused} not 202)" if refused else ""))
                    rows.append(f"| {label} | {flood_text} | {name} | {len(taken)} | {p50:.1f} | "
                                f"{p90:.1f} | {p99:.1f} | {top:.0f} | {len(durations)} | {call_p99:.2f} | "
                                f"{longest:.1f} | {over_10} |")
                log(f"{label} {phase}: done")
            manager.shutdown()
        return rows
    finally:
        procs.stop_all()
        origin.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", help="another checkout of casimg to measure the same way (e.g. the code before)")
    parser.add_argument("--other-label", default="before")
    parser.add_argument("--label", default="after")
    parser.add_argument("--flooders", type=int, default=3, help="processes submitting at once (default 3)")
    parser.add_argument("--submits", type=int, default=3, help="submits per flooder (default 3)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of reads before the flood (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a phase may take at most")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, data)")
    parser.add_argument("--show-slow", type=int, default=0, help="log this many of the slowest Redis calls")
    args = parser.parse_args()
    runs = [(args.label, ROOT)]
    if args.other:
        runs.append((args.other_label, Path(args.other).resolve()))
    rows: list[str] = []
    with workspace(args.keep, prefix="casimg-flood-") as work:
        for label, checkout in runs:
            rows += run_one(label, checkout, work, args)
    print(f"{os.cpu_count()} cores, {platform_line()}, {time.strftime('%Y-%m-%d')}\n")
    print("| code | submits during the reads | reader | reads | p50 ms | p90 ms | p99 ms | max ms | "
          "Redis calls | their p99 ms | longest ms | calls over 10 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
