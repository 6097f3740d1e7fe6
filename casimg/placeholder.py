"""Placeholders: a ThumbHash of each image, a few dozen bytes a page can paint before the image arrives.

ThumbHash (Evan Wallace's format, https://evanw.github.io/thumbhash/, MIT) keeps the average colour,
the aspect ratio, transparency and a handful of low-frequency DCT terms of the picture: lightness as up
to 7x7 terms, two colour-difference channels as 3x3, alpha as 5x5, each quantised to 4 bits. Any
ThumbHash decoder (JavaScript, Swift, Kotlin, Rust ports of the reference) renders it back as a blurred
32-pixel picture. ``placeholder`` returns it base64-encoded, as the reference demo shows it: 25-35 bytes
raw, 36-48 characters.

Written here rather than taken from PyPI: the ``thumbhash`` package (0.1.2) fails on any image with
transparency (an operator-precedence slip leaves the alpha channel a tuple) and computes every term
pixel by pixel (about 100 ms an image); ``thumbhash-python`` pins Pillow < 11. This encoder keeps the
reference's bit layout and rounding, and uses two facts to stay cheap in pure Python:

- The DCT is linear, so the terms of L = (R+G+B)/3, P = (R+G)/2 - B and Q = R - G are those same sums of
  the R, G and B bands' terms: each band is transformed once, straight from Pillow's bytes.
- The 2-D cosine basis is separable: each row is projected onto the horizontal cosines (``sum(map())``
  in C over a row of bytes), then the row results onto the vertical ones.

Transparency follows the reference: pixels are composited over the image's own average colour (from
Pillow's premultiplied "RGBa" bands, which are linear in alpha too). On opaque images the bytes equal
those of the PyPI package's straightforward encoder (checked when this was written). Measured cost (a
1-Mpx JPEG: draft decode at 1/8, box filter to 16 px, hash) is in BENCHMARKS.md, "Variants: render cost".
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Sequence
from operator import mul
from pathlib import Path

from PIL import Image

from casimg.errors import Unrenderable
from casimg.render import TRANSPOSE, has_alpha, open_image, orientation_of

MAX_SIDE = 100  # the reference encoder's bound on its input
# What is hashed: 16 pixels a side. The terms are at most 3 cosine cycles across the picture (7 lightness
# terms: 3.5 cycles), which 16 samples still resolve; against a 32-px input the hash moves by 0-4 4-bit
# steps in total over ~25 terms (on the bench corpus), invisible after decoding, for half the arithmetic
# (0.38 against 0.78 ms a hash).
HASH_SIDE = 16


def _round(value: float) -> int:
    """Round half up, as the reference's Math.round does (Python's round() goes to even)."""
    return math.floor(value + 0.5)


@functools.lru_cache(maxsize=64)
def _cosines(n: int, count: int) -> list[list[float]]:
    """cos(pi c (i+.5)/n) for c < count, i < n: one axis's basis. Pictures of a few sizes recur (the
    picture's side is HASH_SIDE), so the tables are kept rather than made for each hash."""
    return [[math.cos(math.pi / n * c * (i + 0.5)) for i in range(n)] for c in range(count)]


def _terms(band: bytes, w: int, h: int, nx: int, ny: int) -> list[list[float]]:
    """terms[cy][cx] = mean over pixels of band * cos(pi cx (x+.5)/w) * cos(pi cy (y+.5)/h), for cx<nx, cy<ny."""
    fx, fy = _cosines(w, nx), _cosines(h, ny)
    rows = [band[y * w:(y + 1) * w] for y in range(h)]
    projected = [[sum(map(mul, row, basis)) for row in rows] for basis in fx]  # [cx][y]
    area = w * h
    return [[sum(map(mul, column, fy[cy])) / area for column in projected] for cy in range(ny)]


def _channel(terms: list[list[float]], nx: int, ny: int) -> tuple[float, list[float], float]:
    """(DC, AC terms normalised to 0..1, their scale) in the reference's order: a triangle, row by row."""
    dc, ac = 0.0, []
    for cy in range(ny):
        cx = 0
        while cx * ny < nx * (ny - cy):
            if cx or cy:
                ac.append(terms[cy][cx])
            else:
                dc = terms[cy][cx]
            cx += 1
    scale = max((abs(value) for value in ac), default=0.0)
    if scale:
        ac = [0.5 + 0.5 / scale * value for value in ac]
    return dc, ac, scale


def _combine(weights: Sequence[float], grids: Sequence[list[list[float]]], dc_offset: float = 0.0
             ) -> list[list[float]]:
    """sum(weight * grid), plus dc_offset on the DC term: a channel's terms from the bands' terms."""
    ny, nx = len(grids[0]), len(grids[0][0])
    out = [[sum(weight * grid[cy][cx] for weight, grid in zip(weights, grids, strict=True)) for cx in range(nx)]
           for cy in range(ny)]
    out[0][0] += dc_offset
    return out


def encode(image: Image.Image) -> bytes:
    """The ThumbHash of an RGB or RGBA image of at most 100x100 pixels."""
    w, h = image.size
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ValueError(f"{w}x{h} does not fit in {MAX_SIDE}x{MAX_SIDE}")
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A").tobytes()
    alpha_sum = sum(alpha) / 255
    has_alpha = alpha_sum < w * h
    l_limit = 5 if has_alpha else 7  # fewer lightness terms when alpha needs the room
    lx = max(1, _round(l_limit * w / max(w, h)))
    ly = max(1, _round(l_limit * h / max(w, h)))
    nx, ny = max(3, lx), max(3, ly)
    size_x, size_y = max(nx, 5 if has_alpha else 3), max(ny, 5 if has_alpha else 3)
    bands = rgba.convert("RGBa").split()[:3] if has_alpha else rgba.split()[:3]
    terms = [_terms(band.tobytes(), w, h, size_x, size_y) for band in bands]
    if has_alpha:
        # Composite over the average colour: c' = avg*(1 - a) + premultiplied c, all over 255.
        a_terms = _terms(alpha, w, h, size_x, size_y)
        averages = [sum(band.tobytes()) / 255 / alpha_sum if alpha_sum else 0.0 for band in bands]
        terms = [_combine((1 / 255, -avg / 255), (grid, a_terms), avg) for grid, avg in zip(terms, averages,
                                                                                            strict=True)]
    else:
        terms = [_combine((1 / 255,), (grid,)) for grid in terms]
    l_dc, l_ac, l_scale = _channel(_combine((1 / 3, 1 / 3, 1 / 3), terms), nx, ny)
    p_dc, p_ac, p_scale = _channel(_combine((0.5, 0.5, -1.0), terms), 3, 3)
    q_dc, q_ac, q_scale = _channel(_combine((1.0, -1.0, 0.0), terms), 3, 3)
    landscape = w > h
    header24 = (_round(63 * l_dc) | _round(31.5 + 31.5 * p_dc) << 6 | _round(31.5 + 31.5 * q_dc) << 12
                | _round(31 * l_scale) << 18 | int(has_alpha) << 23)
    header16 = ((ly if landscape else lx) | _round(63 * p_scale) << 3 | _round(63 * q_scale) << 9
                | int(landscape) << 15)
    out = bytearray(header24.to_bytes(3, "little") + header16.to_bytes(2, "little"))
    ac = l_ac + p_ac + q_ac
    if has_alpha:
        a_dc, a_ac, a_scale = _channel(_combine((1 / 255,), (a_terms,)), 5, 5)
        out.append(_round(15 * a_dc) | _round(15 * a_scale) << 4)
        ac += a_ac
    start = len(out)
    out.extend(bytes((len(ac) + 1) // 2))
    for index, value in enumerate(ac):
        out[start + index // 2] |= _round(15 * value) << ((index & 1) * 4)
    return bytes(out)


def small_decode(source: bytes | Path | str) -> Image.Image:
    """The picture upright as RGB(A) within HASH_SIDE a side: a JPEG decoded at the smallest DCT scale that
    still covers it (1/8 for any photo), the rest shrunk by Pillow's box filter (C, no Python per pixel)."""
    with open_image(source) as im:
        orientation = orientation_of(im)
        im.draft("RGB", (HASH_SIDE, HASH_SIDE))  # JPEG only: DCT scaling, never below HASH_SIDE
        try:
            small = im.convert("RGBA" if has_alpha(im) else "RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Unrenderable(f"the stored image cannot be decoded: {exc}") from None
    small.thumbnail((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX, reducing_gap=None)
    return small.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else small


def placeholder(source: bytes | Path | str) -> str:
    """The image's ThumbHash, base64: what a listing row's ``placeholder`` field carries."""
    return base64.b64encode(encode(small_decode(source))).decode("ascii")
