#!/usr/bin/env python3
"""What a variant costs the renderer alone (no HTTP, no Redis, no storage): a standalone measurement.

    .venv/bin/python -m bench.variants                 # prints the markdown tables
    .venv/bin/python -m bench.variants --runs 60 --pool-renders 80

- Render latency, in this process on one core: a 12-megapixel JPEG (4000x3000, photo-like: noise over
  gradients and shapes, lightly blurred) to a 256-pixel WebP thumbnail, with JPEG DCT scaling (draft)
  and without; also to AVIF and JPEG, and a cover crop, for scale. p50 and p99 over ``--runs``.
- Pool throughput: ``--pool-renders`` thumbnails submitted at once to a RenderPool of ``--workers``
  processes (started and warmed first), renders per second of wall time.
- Placeholder cost per image: a 1-megapixel JPEG through casimg.placeholder (1/8 draft decode,
  32-px thumbnail, ThumbHash), p50 and p99.

Not part of ``python -m bench``'s run (which rewrites BENCHMARKS.md): its tables are pasted into the
hand-written section "Variants: render cost". Each function takes its inputs and returns figures, so a
scenario of the main run can call them later; nothing is written to disk. The images are made here with
Pillow from a fixed seed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import PIL
from PIL import Image, ImageDraw, ImageFilter

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="renders per latency case")
    parser.add_argument("--workers", type=int, default=2, help="pool processes")
    parser.add_argument("--pool-renders", type=int, default=60, help="thumbnails submitted to the pool")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
