#!/usr/bin/env python3
"""The floor of a cold thumbnail: CPU ms for Pillow alone to make it, with no service around it.

    .venv/bin/python -m bench.render_floor IMAGE.jpg ... [--size 256] [--quality 80] [--runs 3]
    /tmp/thumbor-venv/bin/python bench/render_floor.py IMAGE.jpg ...   # thumbor's Pillow, same calls

For each JPEG: open (header only), ``draft`` to the smallest DCT scale that still gives at least the
target box, load (the decode), a Lanczos resize to fit inside ``--size`` x ``--size``, and a WebP encode
at ``--quality``, method 4: the calls casimg's renderer and thumbor's PIL engine both make for this case.
Each stage's CPU time is taken apart, the median over ``--runs`` passes over all images, so the part
that no image service can avoid (the entropy decode of the whole file, which libjpeg does at any scale)
is visible beside what the service adds. Imports nothing but Pillow, so either virtualenv can run it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import PIL
from PIL import Image, features

STAGES = ("open", "decode", "resize", "encode")


def fit_inside(size: tuple[int, int], box: int) -> tuple[int, int]:
    scale = min(box / size[0], box / size[1], 1.0)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def thumbnail(path: str, box: int, quality: int, method: int = 4, gap: float = 1.0,
              resample: Image.Resampling = Image.Resampling.LANCZOS,
              clock: Callable[[], float] = time.process_time) -> tuple[dict[str, float], bytes]:
    """CPU seconds of each stage for one thumbnail, and the WebP bytes. `gap` asks draft for that many
    times the target size (1.0: the smallest scale that still covers the target)."""
    times: dict[str, float] = {}
    started = clock()
    with Image.open(path) as im:
        target = fit_inside(im.size, box)
        im.draft(None, (round(target[0] * gap), round(target[1] * gap)))
        times["open"] = clock() - started
        started = clock()
        im.load()
        times["decode"] = clock() - started
        started = clock()
        small = im.resize(target, resample, reducing_gap=3.0)
        times["resize"] = clock() - started
    started = clock()
    out = io.BytesIO()
    small.save(out, "WEBP", quality=quality, method=method)
    times["encode"] = clock() - started
    return times, out.getvalue()


def measure(paths: list[str], box: int, quality: int, runs: int, **options: Any) -> dict[str, Any]:
    thumbnail(paths[0], box, quality, **options)  # warm: codec initialisation
    passes: list[dict[str, float]] = []
    size = 0
    for _ in range(runs):
        totals = dict.fromkeys(STAGES, 0.0)
        for path in paths:
            times, data = thumbnail(path, box, quality, **options)
            for stage in STAGES:
                totals[stage] += times[stage]
            size = len(data)
        passes.append(totals)
    per = {stage: statistics.median(p[stage] for p in passes) / len(paths) * 1000 for stage in STAGES}
    per["total"] = sum(per[stage] for stage in STAGES)
    return {"ms_per_thumbnail": {k: round(v, 2) for k, v in per.items()}, "last_bytes": size}


def versions() -> dict[str, Any]:
    return {"pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "webp": features.version("webp")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--method", type=int, default=4, help="WebP encoder effort, 0-6")
    parser.add_argument("--gap", type=float, default=1.0, help="draft to this many times the target size")
    args = parser.parse_args()
    result = measure(args.images, args.size, args.quality, args.runs, method=args.method, gap=args.gap)
    print(json.dumps({**versions(), **result}))


if __name__ == "__main__":
    main()
