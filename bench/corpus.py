"""The image set: distinct photo-like pictures in the format mix of a real ingest, generated once and
kept in a cache directory, so every run (and every checkout compared) downloads the same bytes."""

from __future__ import annotations

import io
import json
import random
import time
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from bench import log

SIZE_RANGE = (20 * 1024, 300 * 1024)
# Rough encoded bytes per pixel of the generated pictures, to aim at a file size.
BYTES_PER_PIXEL = {"JPEG": 0.16, "PNG": 0.9, "WEBP": 0.06}
FORMAT_MIX = [("JPEG", 0.8), ("PNG", 0.1), ("WEBP", 0.1)]
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
BASES = {"JPEG": 400, "PNG": 100}  # encoded pictures per format; the rest differ by a comment (see variant)


def _picture(width: int, height: int, rng: random.Random) -> Image.Image:
    """A photo-like picture: a rotated gradient, grain, shapes, a slight blur (compresses like a photo)."""
    base = Image.linear_gradient("L").resize((width, height)).rotate(rng.uniform(0, 360))
    channels = [Image.blend(base, Image.effect_noise((width, height), rng.uniform(20, 60)), rng.uniform(0.2, 0.6))
                for _ in range(3)]
    picture = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse([x, y, x + rng.randrange(20, max(21, width // 2)), y + rng.randrange(20, max(21, height // 2))],
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    return picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))


def _encode(fmt: str, rng: random.Random) -> bytes:
    """A picture of `fmt` whose encoded size is drawn from SIZE_RANGE (resized until it lands there)."""
    target = rng.uniform(*SIZE_RANGE)
    pixels = target / BYTES_PER_PIXEL[fmt]
    picture = None
    for _ in range(4):
        width = max(64, int((pixels * 4 / 3) ** 0.5))
        height = max(48, int(width * 3 / 4))
        picture = _picture(width, height, rng) if picture is None else picture.resize((width, height))
        out = io.BytesIO()
        if fmt == "PNG":
            picture.save(out, "PNG", compress_level=6)
        else:
            picture.save(out, fmt, quality=85)
        data = out.getvalue()
        if SIZE_RANGE[0] <= len(data) <= SIZE_RANGE[1]:
            break
        pixels *= target / len(data)
    return data


def variant(fmt: str, data: bytes, tag: int) -> bytes:
    """Distinct bytes for the same picture: a JPEG comment segment, or a PNG tEXt chunk. Decoding (and so
    validation) costs exactly what the picture costs; only the content hash differs."""
    text = f"casimg-bench {tag}".encode()
    if fmt == "JPEG":
        return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]
    if fmt == "PNG":
        body = b"tEXt" + b"Comment\x00" + text
        chunk = (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        return data[:-12] + chunk + data[-12:]  # before IEND
    raise ValueError(fmt)


def make_images(directory: Path, count: int, seed: int = 6) -> list[tuple[str, int]]:
    """(file name, size) of `count` distinct images in `directory`, generated once and kept (cached)."""
    manifest = directory / "manifest.json"
    if manifest.exists():
        return [tuple(item) for item in json.loads(manifest.read_text())]  # type: ignore[misc]
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bases: dict[str, list[bytes]] = {"JPEG": [], "PNG": []}
    files: list[tuple[str, int]] = []
    started = time.monotonic()
    for number in range(count):
        pick, fmt = rng.random(), "JPEG"
        for name, share in FORMAT_MIX:
            if pick < share:
                fmt = name
                break
            pick -= share
        if fmt == "WEBP":  # no cheap way to vary WebP bytes without changing the picture: encode each
            data = _encode(fmt, rng)
        elif len(bases[fmt]) < BASES[fmt]:
            data = _encode(fmt, rng)
            bases[fmt].append(data)
        else:
            data = variant(fmt, rng.choice(bases[fmt]), number)
        name = f"{number:06d}.{EXT[fmt]}"
        (directory / name).write_bytes(data)
        files.append((name, len(data)))
        if number and number % 1000 == 0:
            log(f"generated {number} images ({time.monotonic() - started:.0f} s)")
    manifest.write_text(json.dumps(files))
    return files


def set_directory(cache: Path, count: int) -> Path:
    """Where the set of `count` images is kept under the cache directory `cache` (the version names the
    generator: a change to it must name a new set)."""
    return cache / f"images-v1-{count}"
