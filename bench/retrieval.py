"""Scenario 3, retrieval with wrk: casimg's GET /api/image beside the minimal handler (the floor of the
stack: one HGET, one read on the loop, no ETag) and the threaded one the runs before used, nginx
serving the same blob files (the physical limit) and the nginx front (config/nginx.conf with
CASIMG_ACCEL_REDIRECT), at each process count."""

from __future__ import annotations

import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import log
from bench.procs import Popen, Procs, free_port, nginx_front_config, start_nginx, wait_http
from bench.stack import Casimg, start_casimg

WRK_SCRIPT = """
local paths, i = {}, 0
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  if args[2] and args[2] ~= "" then wrk.headers["X-API-Key"] = args[2] end
  if args[3] then wrk.headers["Accept"] = args[3] end
  i = math.random(#paths)
end
function request()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
"""
SAMPLE_SEED = 3  # the stored URLs wrk cycles through are the same in every run


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mb_per_second: float
    rounds: list[float] = field(default_factory=list)  # requests/s of each round, for the medians
    requests: int = 0  # answered in the run, for a cost per request


@dataclass
class Retrieval:
    """wrk's figures by "kind@processes" (kind: casimg, bare, nginx, front), over `sample` stored URLs;
    empty, with a note, when wrk is not installed."""

    results: dict[str, WrkResult]
    sample: int
    notes: list[str] = field(default_factory=list)


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _mb(text: str) -> float:
    match = re.match(r"([\d.]+)(B|KB|MB|GB)", text)
    if not match:
        return float("nan")
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[match.group(2)]
    return float(match.group(1)) * scale / 1e6


def run_wrk(work: Path, base: str, paths: list[str], key: str | None, duration: int, connections: int,
            accept: str | None = None) -> WrkResult:
    """wrk cycling through `paths` (from a random start per thread), with the API key and, if given, an
    Accept header."""
    script = work / "wrk.lua"
    script.write_text(WRK_SCRIPT)
    listing = work / f"paths-{secrets.token_hex(4)}.txt"
    listing.write_text("\n".join(paths) + "\n")
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), base, "--",
            str(listing), key or ""] + ([accept] if accept else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?timeout (\d+)"):
        found = re.search(pattern, out)
        if found:
            errors += int(found.group(1))
    transfer = re.search(r"Transfer/sec:\s+(\S+)", out)
    requests = re.search(r"(\d+) requests in", out)
    return WrkResult(rps, p50, p99, errors, _mb(transfer.group(1)) if transfer else float("nan"),
                     requests=int(requests.group(1)) if requests else 0)


def indexed_urls(redis_url: str) -> dict[str, str]:
    """URL -> digest for every indexed URL, read bucket by bucket."""
    from casimg.schema import BUCKETS, KeySpace

    keys, client = KeySpace(), redis.Redis.from_url(redis_url, decode_responses=True)
    with client.pipeline(transaction=False) as pipe:
        for bucket in BUCKETS:
            pipe.hgetall(keys.url(bucket))
        buckets = pipe.execute()
    client.close()
    return {url: value[:64] for entries in buckets for url, value in entries.items()}


def retrieval(procs: Procs, work: Path, server: Casimg, redis_url: str, *, processes: int, multi: int,
              urls: int, duration: int, connections: int, repeat: int) -> Retrieval:
    """wrk against every server of each process count (`processes`, and `multi` when more), reading
    `urls` of the images `server` stored, on the Redis at `redis_url`."""
    stored = indexed_urls(redis_url)
    sample = random.Random(SAMPLE_SEED).sample(sorted(stored), min(len(stored), urls))
    if not shutil.which("wrk"):
        return Retrieval({}, len(sample),
                         ["wrk is not installed: no retrieval figures (`apt-get install wrk`, Debian package)"])
    image_paths = ["/api/image?url=" + urllib.parse.quote(u, safe="") for u in sample]
    blob_paths = [f"/_static/{d[0:2]}/{d[2:4]}/{d}" for d in (stored[u] for u in sample)]
    blob_dir = server.data_dir / "blobs"
    results: dict[str, WrkResult] = {}
    for count in [processes] + ([multi] if multi > processes else []):
        # Every server of this process count runs at once, and the wrk runs go round them --repeat
        # times, so a drift in the machine's load hits all of them alike.
        started: list[Popen] = []
        targets: dict[str, tuple[str, list[str], str | None]] = {}
        if count == processes:
            targets["casimg"] = (server.base, image_paths, server.key)
        else:
            more = start_casimg(procs, server.data_dir, redis_url, processes=count)
            started.append(more.proc)
            targets["casimg"] = (more.base, image_paths, server.key)
        bare_port = free_port()
        started.append(procs.start([sys.executable, "-m", "bench", "_bare", str(bare_port), redis_url,
                                    str(blob_dir), str(count)], work / "bare.log"))
        wait_http(f"http://127.0.0.1:{bare_port}/healthz")
        targets["bare"] = (f"http://127.0.0.1:{bare_port}", image_paths, None)
        threaded_port = free_port()
        started.append(procs.start([sys.executable, "-m", "bench", "_threaded", str(threaded_port), redis_url,
                                    str(blob_dir), str(count)], work / "threaded.log"))
        wait_http(f"http://127.0.0.1:{threaded_port}/healthz")
        targets["threaded"] = (f"http://127.0.0.1:{threaded_port}", image_paths, None)
        if shutil.which("nginx"):
            front = start_casimg(procs, server.data_dir, redis_url, workers=False,
                                 extra_env={"CASIMG_ACCEL_REDIRECT": "/_blobs/"}, processes=count)
            static_port, front_port = free_port(), free_port()
            static = f"""server {{ listen 127.0.0.1:{static_port};
              location /_static/ {{ alias {blob_dir}/; }}
              location = / {{ return 200 "static"; }} }}"""
            servers = static + "\n" + nginx_front_config(front.port, front_port, blob_dir)
            started += [front.proc, procs.add(start_nginx(work / f"nginx-serve-{count}", servers, [static_port],
                                                          workers=count, new_session=True))]
            wait_http(f"http://127.0.0.1:{front_port}/healthz")
            targets["nginx"] = (f"http://127.0.0.1:{static_port}", blob_paths, None)
            targets["front"] = (f"http://127.0.0.1:{front_port}", image_paths, server.key)
        runs: dict[str, list[WrkResult]] = {kind: [] for kind in targets}
        kinds = list(targets)
        for round_number in range(repeat):
            shift = round_number % len(kinds)  # each round starts one server later
            for kind in kinds[shift:] + kinds[:shift]:
                base, paths, key = targets[kind]
                log(f"3. retrieval, {count} process(es), round {round_number + 1}: {kind}")
                runs[kind].append(run_wrk(work, base, paths, key, duration, connections))
        for kind, measured in runs.items():
            results[f"{kind}@{count}"] = WrkResult(
                statistics.median(r.rps for r in measured), statistics.median(r.p50_ms for r in measured),
                statistics.median(r.p99_ms for r in measured), sum(r.errors for r in measured),
                statistics.median(r.mb_per_second for r in measured), [r.rps for r in measured])
        for proc in reversed(started):
            procs.stop(proc)
    notes = [] if shutil.which("nginx") else [
        "nginx is not installed: no nginx static and no nginx front figures (`apt-get install nginx`)"]
    return Retrieval(results, len(sample), notes)
