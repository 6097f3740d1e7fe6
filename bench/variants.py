#!/usr/bin/env python3
"""What a variant costs: the renderer alone, and (``--http``) thumbnails through HTTP against thumbor.

    .venv/bin/python -m bench.variants                 # prints the markdown tables
    .venv/bin/python -m bench.variants --runs 60 --pool-renders 80
    .venv/bin/python -m bench.variants --http --thumbor /tmp/thumbor-venv/bin/thumbor   # + the HTTP run
    .venv/bin/python -m bench.variants --warm-only --rounds 8 --other ../casimg-before  # warm vs original

- Render latency, in this process on one core: a 12-megapixel JPEG (4000x3000, photo-like: noise over
  gradients and shapes, lightly blurred) to a 256-pixel WebP thumbnail, with JPEG DCT scaling (draft)
  and without; also to AVIF and JPEG, and a cover crop, for scale. p50 and p99 over ``--runs``.
- Pool throughput: ``--pool-renders`` thumbnails submitted at once to a RenderPool of ``--workers``
  processes (started and warmed first), renders per second of wall time.
- Placeholder cost per image: a 1-megapixel JPEG through casimg.placeholder (1/8 draft decode,
  32-px thumbnail, ThumbHash), p50 and p99.

- With ``--http``: ``--images`` distinct 12-megapixel JPEGs from a loopback origin (bench.origin), each
  made into a 256x256 (fit inside) WebP at quality 80, by ``casimg serve`` (one process,
  ``--workers`` render processes) and by thumbor 7 (``--thumbor``: its own virtualenv, since it pins
  Pillow < 13; ``--workers`` processes, file storage for originals, no result storage), both at
  ``--connections`` requests in flight. Cold: each image's first thumbnail, after the originals are in
  (ingested by casimg; fetched once at 16x16 by thumbor), renders per second and the request latency.
  Warm: wrk over the same thumbnail URLs (casimg serves its stored variants; thumbor renders again,
  having no result storage), beside casimg's GET of originals of the thumbnails' size, interleaved.
  The cold run's CPU is taken apart: the serving process alone (casimg's `serve`, without its render
  processes) beside everything under it; and the floor, ``bench/render_floor.py`` (Pillow alone making
  the same thumbnails, no service around it), is run in both virtualenvs, so each server's CPU per
  thumbnail reads against what its own Pillow needs. ``--other CHECKOUT`` adds a casimg of another
  checkout (the code before a change) to the same rotating turns; ``--no-warm`` skips the wrk part.

- With ``--warm-only``: a cached variant's GET (``--query``, default ``variant=thumb``) against the
  original's GET (``--accept``: both send that Accept header, as a browser would), ``--warm-images``
  photo-like JPEGs of about 32 KB, one ``casimg serve --processes 1`` per checkout (this one, and
  ``--other``'s for a before/after in the same run), wrk with the same ``--connections`` for both.
  Each round runs a checkout's original and variant back to back (which first alternates), the
  checkouts rotating; per checkout: the median requests/s of each, the median over rounds of
  variant/original, and the server's CPU ms per request (its CPU time over the requests wrk counted),
  the steadier figure on a shared machine.

Not part of ``python -m bench``'s run (which rewrites BENCHMARKS.md): its tables are pasted into the
hand-written section "Variants: render cost". Each function takes its inputs and returns figures, so a
scenario of the main run can call them later; nothing is written to disk. The images are made here with
Pillow from a fixed seed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import PIL
from PIL import Image, ImageDraw, ImageFilter

from bench.procs import own_cpu, tree_cpu
from casimg.placeholder import placeholder
from casimg.render import probe, render
from casimg.render_pool import RenderPool
from casimg.variants import VariantPolicy, VariantSpec

BUDGET = 1024 * 2**20
POLICY = VariantPolicy()


def photo(width: int, height: int, seed: int = 1) -> bytes:
    """A JPEG (quality 90) with a photo's mix of smooth areas, edges and grain, about 0.3 bytes/pixel."""
    rng = random.Random(seed)
    im = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(60):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(width // 40, width // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    im = im.filter(ImageFilter.GaussianBlur(2))
    grain = Image.effect_noise((width, height), 24).convert("RGB")
    im = Image.blend(im, grain, 0.15)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


def timed(action: Callable[[], object], runs: int) -> tuple[list[float], float]:
    """Wall-clock ms of each run, and the median CPU ms of a run: on a shared machine the wall clock
    also counts time waiting for a core, CPU time does not."""
    action()  # warm: imports, codec initialisation
    samples, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        action()
        samples.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    return samples, statistics.median(cpu)


def spec_for(source: bytes, **params: str) -> VariantSpec:
    spec = POLICY.parse(params)
    assert spec is not None
    return POLICY.resolve(spec, probe(source), "image/avif,image/webp")


def latency(source: bytes, runs: int) -> list[tuple[str, float, float, float, int]]:
    """(case, p50 ms, p99 ms, CPU ms p50, output bytes) for the thumbnail cases, in this process."""
    cases = [
        ("256-px WebP, draft (default)", spec_for(source, w="256", h="256", format="webp"), True),
        ("256-px WebP, no draft (full decode)", spec_for(source, w="256", h="256", format="webp"), False),
        ("256-px AVIF, draft", spec_for(source, w="256", h="256", format="avif"), True),
        ("256-px JPEG, draft", spec_for(source, w="256", h="256", format="jpeg"), True),
        ("256x256 cover WebP, draft", spec_for(source, w="256", h="256", fit="cover", format="webp"), True),
        ("1600-px WebP, draft", spec_for(source, w="1600", format="webp"), True),
    ]
    rows = []
    for name, spec, draft in cases:
        size = len(render(source, spec, max_memory=BUDGET, jpeg_draft=draft).data)
        samples, cpu = timed(lambda s=spec, d=draft: render(source, s, max_memory=BUDGET, jpeg_draft=d), runs)
        rows.append((name, *percentiles(samples), cpu, size))
    return rows


async def pool_rate(source: bytes, workers: int, renders: int) -> tuple[float, float]:
    """(renders per second, seconds) for `renders` thumbnails submitted at once to a warmed pool."""
    spec = spec_for(source, w="256", h="256", format="webp")
    pool = RenderPool(workers, 120.0, max_memory=BUDGET)
    pool.start()
    try:
        await asyncio.gather(*(pool.render(source, spec) for _ in range(workers)))  # warm every worker
        started = time.perf_counter()
        await asyncio.gather(*(pool.render(source, spec) for _ in range(renders)))
        elapsed = time.perf_counter() - started
    finally:
        pool.close()
    return renders / elapsed, elapsed


# -- through HTTP, against thumbor -----------------------------------------------------------------------

THUMB = 256
WARM_SECONDS = 8
COLD_CHUNK = 10  # images per turn of the cold run, casimg and thumbor alternating: drift weighs on both


def distinct_photos(base: bytes, count: int, directory: Path) -> list[str]:
    """`count` JPEGs of the base photo's size, each with its own mark (so each is a distinct content), and
    as many small ones of a thumbnail's size (originals to compare a stored thumbnail's GET with)."""
    names = []
    with Image.open(io.BytesIO(base)) as im:
        picture = im.convert("RGB")
    for n in range(count):
        marked = picture.copy()
        ImageDraw.Draw(marked).rectangle((n * 40, 0, n * 40 + 30, 30), fill=(n * 5 % 256, 255 - n, 0))
        out = io.BytesIO()
        marked.save(out, "JPEG", quality=90)
        (directory / f"{n}.jpg").write_bytes(out.getvalue())
        small = marked.resize((THUMB, THUMB * 3 // 4))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80)
        (directory / f"small-{n}.jpg").write_bytes(out.getvalue())
        names.append(f"{n}.jpg")
    return names


def fetch_all(base: str, paths: list[str], connections: int, key: str | None = None,
              extra_headers: dict[str, str] | None = None) -> tuple[float, list[float]]:
    """GET every path once, `connections` at a time on keep-alive connections: (seconds, latencies in ms)."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    headers = ({"X-API-Key": key} if key else {}) | (extra_headers or {})
    todo = list(paths)
    latencies: list[float] = []

    def worker() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        while todo:
            path = todo.pop()
            started = time.perf_counter()
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{path}: HTTP {answer.status}")
            latencies.append((time.perf_counter() - started) * 1000)
        connection.close()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        for future in [pool.submit(worker) for _ in range(connections)]:
            future.result()
    return time.perf_counter() - started, latencies


def start_thumbor(procs: object, work: Path, executable: str, workers: int) -> tuple[Any, int, str]:
    from bench.procs import free_port, wait_http

    port = free_port()
    conf = work / "thumbor.conf"
    conf.write_text(f"""LOADER = 'thumbor.loaders.http_loader'
STORAGE = 'thumbor.storages.file_storage'
FILE_STORAGE_ROOT_PATH = '{work / "thumbor-storage"}'
RESULT_STORAGE = None
ALLOW_UNSAFE_URL = True
QUALITY = 80
AUTO_WEBP = False
MAX_AGE = 0
""")
    process = procs.start([executable, "-p", str(port), "-i", "127.0.0.1", "-c", str(conf),  # type: ignore[attr-defined]
                           "--processes", str(workers), "-l", "error"], work / "thumbor.log")
    wait_http(f"http://127.0.0.1:{port}/healthcheck", process)
    pillow = subprocess.run([str(Path(executable).parent / "python"), "-c", "import PIL; print(PIL.__version__)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return process, port, pillow


@dataclass
class Side:
    """One server of the cold run: its thumbnail paths and what its requests cost."""

    name: str
    base: str
    paths: list[str]
    key: str | None
    pid: int
    seconds: float = 0.0
    cpu: float = 0.0  # the server and every process under it
    own_cpu: float = 0.0  # the server process alone (casimg: the serve process, not its render processes)
    latencies: list[float] = field(default_factory=list)

    def cold_chunk(self, start: int, connections: int) -> None:
        cpu, own = tree_cpu(self.pid), own_cpu(self.pid)
        seconds, latencies = fetch_all(self.base, self.paths[start:start + COLD_CHUNK], connections, self.key)
        self.cpu += tree_cpu(self.pid) - cpu
        self.own_cpu += own_cpu(self.pid) - own
        self.seconds += seconds
        self.latencies += latencies


def floor(python: str, images: list[Path]) -> dict[str, Any]:
    """bench/render_floor.py run by `python` (so with its Pillow) over `images`."""
    script = Path(__file__).with_name("render_floor.py")
    answer = subprocess.run([python, str(script), *map(str, images)], capture_output=True, text=True, check=True)
    return json.loads(answer.stdout)


def http_comparison(args: argparse.Namespace) -> None:
    from bench import log, workspace
    from bench.origin import image_url, serve_image_set
    from bench.procs import Procs
    from bench.retrieval import run_wrk
    from bench.stack import start_casimg, start_redis

    procs = Procs()
    checkouts = {"casimg": None, **({"casimg before": Path(args.other).resolve()} if args.other else {})}
    with workspace(keep=False) as work:
        try:
            images = work / "set"
            images.mkdir()
            log(f"making {args.images} distinct 12-Mpx JPEGs")
            names = distinct_photos(photo(4000, 3000), args.images, images)
            origin_port, origin_kind = serve_image_set(procs, work, images)
            urls = [image_url(origin_port, n, name) for n, name in enumerate(names)]
            smalls = [image_url(origin_port, n, f"small-{name}") for n, name in enumerate(names)]
            _, redis_url = start_redis(procs, work / "redis", persistent=True)
            sides: list[Side] = []
            casimg = None
            for number, (name, checkout) in enumerate(checkouts.items()):
                env = {"CASIMG_RENDER_WORKERS": str(args.workers)}
                if checkout is not None:
                    env.update(PYTHONPATH=str(checkout), PYTHONSAFEPATH="1")
                server = start_casimg(procs, work / f"data-{number}", redis_url, extra_env=env,
                                      key_prefix=f"casimg{number}:")
                casimg = casimg or server
                log(f"ingesting into {name}")
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
                connection.request("POST", "/api/images?wait=60", json.dumps({"image_urls": urls + smalls}),
                                   {"X-API-Key": server.key, "Content-Type": "application/json"})
                job = json.loads(connection.getresponse().read())
                assert job["status"] == "done" and job["failed"] == 0, job
                paths = [f"/api/image?url={quote(url, safe='')}&w={THUMB}&h={THUMB}&format=webp" for url in urls]
                # warm its render pool with one small render
                fetch_all(server.base, [f"/api/image?url={quote(smalls[0], safe='')}&w=16"], 1, server.key)
                sides.append(Side(name, server.base, paths, server.key, server.proc.pid))
            assert casimg is not None
            variant = sides[0].paths
            originals = [f"/api/image?url={quote(url, safe='')}" for url in smalls]

            thumbor_proc, thumbor_port, thumbor_pillow = start_thumbor(procs, work, args.thumbor, args.workers)
            thumbor = f"http://127.0.0.1:{thumbor_port}"
            bare = [url.removeprefix("http://") for url in urls]
            log("thumbor: loading the originals into its storage")
            fetch_all(thumbor, [f"/unsafe/16x16/{url}" for url in bare], args.connections)
            thumbor_paths = [f"/unsafe/fit-in/{THUMB}x{THUMB}/filters:format(webp):quality(80)/{url}" for url in bare]
            sides.append(Side("thumbor", thumbor, thumbor_paths, None, thumbor_proc.pid))

            load_before = os.getloadavg()[0]
            log(f"cold: {', '.join(side.name for side in sides)} in rotating chunks of {COLD_CHUNK} images")
            for chunk, start in enumerate(range(0, len(urls), COLD_CHUNK)):
                shift = chunk % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    side.cold_chunk(start, args.connections)
            log("the floor: Pillow alone, in casimg's and thumbor's environments")
            floors = {"casimg": floor(sys.executable, [images / name for name in names]),
                      "thumbor": floor(str(Path(args.thumbor).parent / "python"), [images / name for name in names])}
            log("warm: wrk, interleaved")
            rows: dict[str, list[float]] = {"variant": [], "original": [], "thumbor": []}
            for _ in range(2 if args.warm else 0):
                rows["original"].append(run_wrk(work, casimg.base, originals, casimg.key, WARM_SECONDS,
                                                args.connections).rps)
                rows["variant"].append(run_wrk(work, casimg.base, variant, casimg.key, WARM_SECONDS,
                                               args.connections).rps)
            if args.warm:
                rows["thumbor"].append(run_wrk(work, thumbor, thumbor_paths, None, WARM_SECONDS,
                                               args.connections).rps)
            load_after = os.getloadavg()[0]
        finally:
            procs.stop_all()

    count = len(urls)
    print(f"\nThrough HTTP. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load "
          f"average {load_before:.2f} before, {load_after:.2f} after; origin: {origin_kind}. casimg: 1 `serve` "
          f"process, {args.workers} render processes, Pillow {PIL.__version__}; thumbor 7 "
          f"({args.workers} processes, Pillow {thumbor_pillow}). {count} distinct 4000x3000 JPEGs to a "
          f"{THUMB}x{THUMB} (fit inside) WebP at quality 80, {args.connections} requests in flight, the "
          f"servers taking turns by {COLD_CHUNK} images. `python -m bench.variants --http-only --images "
          f"{args.images} --workers {args.workers} --connections {args.connections}"
          f"{' --other ' + args.other if args.other else ''}`.\n")
    print("| | " + " | ".join(side.name for side in sides) + " |\n|---|" + "---|" * len(sides))
    thumbor_side = sides[-1]
    floor_ms = floors["casimg"]["ms_per_thumbnail"]["total"]

    def row(label: str, cell: Callable[[Side], str]) -> None:
        print(f"| {label} | " + " | ".join(cell(side) for side in sides) + " |")

    row("cold thumbnails/s (first render of each image)", lambda side: f"{count / side.seconds:.1f}")
    row("vs thumbor", lambda side: f"{thumbor_side.seconds / side.seconds:.2f}x")
    row("cold request latency p50 / p99 ms", lambda side: "{:.0f} / {:.0f}".format(*percentiles(side.latencies)))
    row("cold CPU ms per thumbnail (all the server's processes)", lambda side: f"{side.cpu / count * 1000:.1f}")
    row("of which the serving process (casimg: not its render processes)",
        lambda side: f"{side.own_cpu / count * 1000:.1f}" if side is not thumbor_side else "(all)")

    def share(side: Side) -> str:
        own_floor = floors["thumbor" if side is thumbor_side else "casimg"]["ms_per_thumbnail"]["total"]
        return f"{own_floor / (side.cpu / count * 1000):.0%}"

    row("the floor's share of that CPU", share)
    print(f"\nThe floor (`bench/render_floor.py`, Pillow alone: open, draft, load, Lanczos resize, WebP "
          f"q80 method 4, CPU ms per thumbnail, median of 3 passes over the same {count} images): "
          + "; ".join(f"{name} Pillow {f['pillow']} (libjpeg-turbo {f['libjpeg_turbo']}, libwebp {f['webp']}): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in f["ms_per_thumbnail"].items())
                      for name, f in floors.items()) + ".")
    if floor_ms and thumbor_side.cpu:
        decode = floors["casimg"]["ms_per_thumbnail"]["decode"]
        print(f"\nA server at the floor exactly would make {thumbor_side.cpu / count * 1000 / floor_ms:.2f}x "
              f"thumbor's thumbnails per CPU second; 2x thumbor needs {thumbor_side.cpu / count * 500:.1f} ms of "
              f"CPU per thumbnail, against a floor of {floor_ms:.1f} ms, {decode:.1f} of it the JPEG decode.")
    if args.warm:
        warm = statistics.median(rows["variant"])
        original = statistics.median(rows["original"])
        print(f"\ncasimg warm: stored thumbnail GETs {', '.join(f'{r:.0f}' for r in rows['variant'])} req/s, "
              f"against GETs of originals of a thumbnail's size {', '.join(f'{r:.0f}' for r in rows['original'])} "
              f"req/s (interleaved): {warm / original:.2f}x; thumbor (renders again) {rows['thumbor'][0]:.0f} req/s.")


WARM_SIDE = 432, 324  # a photo-like JPEG of about 32 KB: a typical stored image


def warm_comparison(args: argparse.Namespace) -> None:
    """A cached variant's GET beside the original's, on one `casimg serve --processes 1` per checkout (this
    one, and ``--other``'s), same images, same wrk connections, the (checkout, original|variant) runs
    rotating every round so a drift in the machine's load weighs on all alike. CPU per request is the
    server process's CPU time over the requests wrk counted."""
    from bench import log, workspace
    from bench.origin import image_url, serve_image_set
    from bench.procs import ROOT, Procs
    from bench.retrieval import run_wrk
    from bench.stack import start_casimg, start_redis

    checkouts = {"this": ROOT} | ({"other": Path(args.other).resolve()} if args.other else {})
    procs = Procs()
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with workspace(keep=False) as work:
        try:
            images = work / "set"
            images.mkdir()
            for n in range(args.warm_images):
                (images / f"{n}.jpg").write_bytes(photo(*WARM_SIDE, seed=100 + n))
            size = statistics.median((images / f"{n}.jpg").stat().st_size for n in range(args.warm_images))
            origin_port, _ = serve_image_set(procs, work, images)
            urls = [image_url(origin_port, n, f"{n}.jpg") for n in range(args.warm_images)]
            _, redis_url = start_redis(procs, work / "redis", persistent=False)
            loader = start_casimg(procs, work / "data", redis_url)
            connection = http.client.HTTPConnection("127.0.0.1", loader.port, timeout=120)
            connection.request("POST", "/api/images?wait=60", json.dumps({"image_urls": urls}),
                               {"X-API-Key": loader.key, "Content-Type": "application/json"})
            job = json.loads(connection.getresponse().read())
            assert job["status"] == "done" and job["failed"] == 0, job
            procs.stop(loader.proc)
            servers = {label: start_casimg(procs, work / "data", redis_url, workers=False, extra_env={
                "PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}) for label, checkout in checkouts.items()}
            originals = [f"/api/image?url={quote(url, safe='')}" for url in urls]
            variants = [f"{path}&{args.query}" for path in originals]
            headers = {"Accept": args.accept} if args.accept else {}
            for server in servers.values():  # rendered by the first, found by the others; then each remembers
                for _ in range(2):
                    fetch_all(server.base, variants + originals, 1, server.key, headers)
            labels = list(servers)
            runs = {(label, kind): [] for label in labels for kind in ("original", "variant")}
            load_before = os.getloadavg()
            for number in range(args.rounds):
                # Each checkout's two runs back to back, which first alternating; the checkouts rotating.
                kinds = ("original", "variant") if number % 2 == 0 else ("variant", "original")
                turn = labels[number % len(labels):] + labels[:number % len(labels)]
                for label, kind in [(label, kind) for label in turn for kind in kinds]:
                    server = servers[label]
                    cpu = tree_cpu(server.proc.pid)
                    result = run_wrk(work, server.base, originals if kind == "original" else variants, server.key,
                                     args.duration, args.connections, args.accept)  # both: as a browser
                    cpu = tree_cpu(server.proc.pid) - cpu
                    if result.errors or not result.requests:
                        raise RuntimeError(f"{label} {kind}: {result.errors} errors in {result.requests} requests")
                    runs[label, kind].append((result.rps, cpu * 1000 / result.requests))
                    log(f"round {number + 1}, {label} {kind}: {result.rps:.0f} requests/s, "
                        f"{runs[label, kind][-1][1]:.3f} CPU ms per request")
            load_after = os.getloadavg()
        finally:
            procs.stop_all()

    accept = f" (Accept: {args.accept}, on both)" if args.accept else ""
    print(f"\nWarm variants: `GET /api/image?url=U&{args.query}`{accept} once stored, beside `GET "
          f"/api/image?url=U`, {args.warm_images} JPEGs of {WARM_SIDE[0]}x{WARM_SIDE[1]} "
          f"(median {size / 1000:.0f} KB). {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} "
          f"cores, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. One `casimg serve "
          f"--processes 1` per checkout, wrk -t2 -c{args.connections} -d{args.duration}s, {args.rounds} rounds "
          f"interleaved. `python -m bench.variants --warm-only --rounds {args.rounds} --duration {args.duration} "
          f"--connections {args.connections}{' --other ' + args.other if args.other else ''}"
          f"{' --query ' + repr(args.query) if args.query != 'variant=thumb' else ''}"
          f"{' --accept ' + repr(args.accept) if args.accept else ''}`.\n")
    print("| checkout | original req/s (per round) | variant req/s (per round) | variant/original, median of "
          "rounds (range) | CPU ms/request original | CPU ms/request variant | CPU variant/original, median of "
          "rounds (range) |")
    print("|---|---|---|---|---|---|---|")
    for label, checkout in checkouts.items():
        original, variant = runs[label, "original"], runs[label, "variant"]
        rates = [v / o for (v, _), (o, _) in zip(variant, original, strict=True)]
        costs = [v / o for (_, v), (_, o) in zip(variant, original, strict=True)]
        print(f"| {label} ({checkout}) | {statistics.median(r for r, _ in original):.0f} "
              f"({', '.join(f'{r:.0f}' for r, _ in original)}) | {statistics.median(r for r, _ in variant):.0f} "
              f"({', '.join(f'{r:.0f}' for r, _ in variant)}) | {statistics.median(rates):.2f}x "
              f"({min(rates):.2f}-{max(rates):.2f}) | {statistics.median(c for _, c in original):.3f} | "
              f"{statistics.median(c for _, c in variant):.3f} | {statistics.median(costs):.2f}x "
              f"({min(costs):.2f}-{max(costs):.2f}) |")


def placeholder_bytes(urls: int) -> tuple[float, float, int]:
    """Redis bytes per URL (used_memory) of `urls` URLs, one content each, stored without placeholders and
    with a typical one, on a Redis like casimg's embedded one: (without, with, placeholder characters)."""
    import hashlib
    import tempfile

    from bench.procs import Procs
    from bench.stack import start_redis
    from casimg.index import BlobMeta, Index
    from casimg.schema import KeySpace
    from casimg.services import connect_redis

    hash_text = placeholder(photo(640, 480, seed=3))
    meta = BlobMeta(140_000, "image/jpeg", 1024, 768)

    async def fill(url: str, prefix: str, text: str | None) -> float:
        client = connect_redis(url, 8)
        index = Index(client, KeySpace(prefix))
        before = int((await client.info("memory"))["used_memory"])
        for start in range(0, urls, 500):
            await asyncio.gather(*(index.store(f"https://example.com/images/{n:08d}.jpg",
                                               hashlib.sha256(str(n).encode()).hexdigest(), meta, placeholder=text)
                                   for n in range(start, start + 500)))
        after = int((await client.info("memory"))["used_memory"])
        await client.aclose()
        return (after - before) / urls

    procs = Procs()
    work = Path(tempfile.mkdtemp())
    try:
        _, url = start_redis(procs, work / "redis", persistent=False)
        without = asyncio.run(fill(url, "a:", None))
        with_placeholders = asyncio.run(fill(url, "b:", hash_text))
    finally:
        procs.stop_all()
    return without, with_placeholders, len(hash_text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="renders per latency case")
    parser.add_argument("--workers", type=int, default=2, help="pool processes")
    parser.add_argument("--pool-renders", type=int, default=60, help="thumbnails submitted to the pool")
    parser.add_argument("--http", action="store_true", help="also thumbnails through HTTP, against thumbor")
    parser.add_argument("--http-only", action="store_true", help="only the HTTP comparison")
    parser.add_argument("--thumbor", default="/tmp/thumbor-venv/bin/thumbor", help="thumbor's executable")
    parser.add_argument("--images", type=int, default=40, help="distinct 12-Mpx images for the HTTP run")
    parser.add_argument("--connections", type=int, default=4, help="HTTP requests in flight")
    parser.add_argument("--other", metavar="CHECKOUT",
                        help="also a casimg of another checkout, in the same turns (--http, --warm-only)")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm (wrk) part")
    parser.add_argument("--warm-only", action="store_true",
                        help="only: a cached variant's GET beside the original's, wrk rounds interleaved")
    parser.add_argument("--query", default="variant=thumb", help="--warm-only: the variant's query parameters")
    parser.add_argument("--accept", default=None, help="--warm-only: the Accept header of every request")
    parser.add_argument("--warm-images", type=int, default=16, help="--warm-only: distinct JPEGs of about 32 KB")
    parser.add_argument("--rounds", type=int, default=3, help="--warm-only: wrk runs of each kind per checkout")
    parser.add_argument("--duration", type=int, default=5, help="--warm-only: seconds per wrk run")
    parser.add_argument("--redis-bytes", type=int, default=0, metavar="URLS",
                        help="only: Redis bytes per URL with and without placeholders, over URLS URLs")
    args = parser.parse_args()
    if args.redis_bytes:
        without, with_placeholders, length = placeholder_bytes(args.redis_bytes)
        print(f"{args.redis_bytes:,} URLs, one content each: {without:.0f} Redis bytes per URL without "
              f"placeholders, {with_placeholders:.0f} with ({with_placeholders - without:+.0f}; the placeholder "
              f"is {length} characters).")
        return
    if args.warm_only:
        warm_comparison(args)
        return
    if args.http_only:
        http_comparison(args)
        return

    load_before = os.getloadavg()[0]
    twelve = photo(4000, 3000)
    one = photo(1155, 866, seed=2)
    rows = latency(twelve, args.runs)
    rate, seconds = asyncio.run(pool_rate(twelve, args.workers, args.pool_renders))
    hash_samples, hash_cpu = timed(lambda: placeholder(one), args.runs * 5)
    hash_p50, hash_p99 = percentiles(hash_samples)
    hash_len = len(placeholder(one))
    load_after = os.getloadavg()[0]

    print(f"Renderer only (no HTTP, Redis or storage). {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, Pillow {PIL.__version__}; load "
          f"average {load_before:.2f} before, {load_after:.2f} after. `python -m bench.variants "
          f"--runs {args.runs} --workers {args.workers} --pool-renders {args.pool_renders}`.\n")
    print(f"Source: a 4000x3000 JPEG (quality 90, {len(twelve) / 1e6:.1f} MB), photo-like. Latency in one "
          f"process, {args.runs} renders a case:\n")
    print("| render | p50 ms | p99 ms | CPU ms (p50) | output bytes |\n|---|---|---|---|---|")
    for name, p50, p99, cpu, size in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {cpu:.1f} | {size:,} |")
    print(f"\nDCT scaling (draft) makes the 256-px thumbnail {rows[1][1] / rows[0][1]:.1f}x faster at p50 "
          f"({rows[1][3] / rows[0][3]:.1f}x less CPU).\n")
    print("| pool | workers | renders | seconds | renders/s |\n|---|---|---|---|---|")
    print(f"| 256-px WebP from the 12-Mpx JPEG | {args.workers} | {args.pool_renders} | {seconds:.2f} | {rate:.1f} |")
    print(f"\nPlaceholder (ThumbHash) of a 1155x866 JPEG ({len(one) / 1e3:.0f} KB): p50 {hash_p50:.2f} ms, "
          f"p99 {hash_p99:.2f} ms, CPU {hash_cpu:.2f} ms (p50) over {args.runs * 5} images; {hash_len} base64 "
          "characters.")
    if args.http:
        http_comparison(args)


if __name__ == "__main__":
    main()
