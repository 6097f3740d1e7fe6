"""Rendering variants with Pillow, and the process pool that keeps renders off the event loop.

``render(source, spec)`` turns an original's bytes into one concrete variant (casimg/variants.py says
what the parameters mean). The steps, cheapest first, so an image too big to render is refused before a
pixel is decoded:

1. Open: only the header is read. The EXIF orientation is read from it too.
2. JPEG DCT scaling (``draft``): libjpeg decodes at 1/2, 1/4 or 1/8 scale, skipping most of the inverse
   DCT; the scale kept leaves at least ``DRAFT_GAP`` times the output size for the resampling filter.
   A 12-megapixel photo to a 256-pixel thumbnail decodes 1/64 of its pixels (BENCHMARKS.md, "Variants:
   render cost"); Huffman decoding of the whole file remains, and is most of what is left.
3. Memory estimate, from the (scaled) header: the decoded frame at its bands plus its working copy,
   plus every output frame kept. Over ``max_memory`` is ``RenderOverBudget`` (a 422), before decoding.
4. Decode, convert to RGB or RGBA, orient (EXIF 2-8), then one Lanczos resize whose ``reducing_gap``
   first shrinks by whole factors with ``reduce()`` (box averaging in C) where the factor is large.
5. Crop (cover), letterbox (pad) or flatten onto ``bg`` (transparency into JPEG), convert an embedded
   ICC profile's colours to sRGB, and encode with no metadata: no EXIF (so no GPS), no XMP, no ICC.
   An untagged image is sRGB to every browser, so after the conversion a profile would only add its
   bytes (0.5-3 KB, more than a small thumbnail's pixels) and nothing a viewer would show differently.

Animated GIF and WebP give their first frame, unless ``animated=1`` and the output is WebP or GIF: then
every frame is rendered the same way, with its duration, up to ``max_frames``.

``probe`` reads what ``VariantPolicy.resolve`` needs from the header alone. Both run anywhere; the
service runs ``render`` through casimg/render_pool.py, in worker processes with a time limit.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import (
    AvifImagePlugin,
    GifImagePlugin,
    Image,
    ImageCms,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from casimg.errors import BadVariant, NotFound, RenderOverBudget, Unrenderable
from casimg.variants import ALPHA_FORMATS, CONTENT_TYPES, Layout, SourceInfo, VariantSpec, layout

Source = bytes | Path | str  # the original's bytes, or the path of its blob file

# The render's own estimate (render_max_memory) decides what is too big; Pillow's warning between its
# limit and twice it would only add noise. Above twice it Image.open still refuses (a RenderOverBudget).
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF")  # never hand stored bytes to other decoders
# Those formats' plugins, imported here rather than by Pillow on a first use: the render pool's forkserver
# imports this module once, so every worker starts with them (each worker used to import WebP's plugin,
# and Image.init() all thirty or so, on its first render: ~0.1 s of its CPU).
PLUGINS = (AvifImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin)
# JPEG DCT scaling keeps at least 1.5x the output for Lanczos to filter. Pillow's thumbnail keeps 2x;
# 1.5 lets a 4000-px photo decode at 1/8 rather than 1/4 for a 256-px thumbnail, which quarters the
# resize's input for a mean difference from a full decode of 0.28 of 255 (0.20 at 2x), and ~15% less time.
DRAFT_GAP = 1.5
# resize(reducing_gap=3): reduce() by whole factors while at least 3x the output remains, then Lanczos;
# Pillow documents 3.0 as indistinguishable from a plain resize in most cases, and it is several times
# faster from a large decode (a PNG, a WebP, a JPEG whose 1/8 scale is still far larger than asked).
REDUCING_GAP = 3.0
ORIENTATION_KEY = 0x0112
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose does).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
WORK_BANDS = 4  # RGBA, the widest working mode, for the estimate
# AVIF speed 8: a 256-px photo thumbnail in 33 ms of CPU and 4,472 bytes, against 128 ms and 4,213 at
# libavif's default 6, 53 ms and 4,194 at 7, 8 ms and 5,817 at 9. One thread per encode: the pool's
# processes already fill the cores.
AVIF_OPTIONS = {"speed": 8, "max_threads": 1}
WEBP_METHOD = 4  # libwebp's default effort; 6 is ~2x slower for ~3% fewer bytes
SRGB = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class Rendered:
    data: bytes
    content_type: str
    width: int
    height: int
    frames: int = 1


def open_image(source: Source) -> Image.Image:
    fp: IO[bytes] | Path | str = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return Image.open(fp, formats=OPEN_FORMATS)
    except FileNotFoundError:
        # The blob's path is handed over unchecked (a check would cost the caller a trip to a thread);
        # gone (its last URL deleted meanwhile) is a 404, as the check would have said.
        raise NotFound("the image's stored bytes are gone") from None
    except Image.DecompressionBombError as exc:
        raise RenderOverBudget(f"the image is too large to decode ({exc})", estimate=0, budget=0) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Unrenderable(f"the stored image cannot be decoded: {exc}") from None


def orientation_of(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ORIENTATION_KEY, 1)
    except Exception:  # a damaged EXIF block: show the picture as stored rather than refuse it
        return 1
    return value if value in TRANSPOSE else 1


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info


def probe(source: Source) -> SourceInfo:
    """What resolving a variant needs to know of an original, from its header (no pixels decoded)."""
    with open_image(source) as im:
        orientation = orientation_of(im)
        width, height = im.size if orientation < 5 else im.size[::-1]
        frames = getattr(im, "n_frames", 1)
        return SourceInfo(format=str(im.format), width=width, height=height, has_alpha=has_alpha(im),
                          frames=frames, orientation=orientation)


def _rgb(im: Image.Image) -> Image.Image:
    """The frame as RGB or RGBA, whatever it was stored as (palette, grey, 16-bit, CMYK)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = im.convert("I").point(lambda value: value / 256).convert("L")  # 16-bit grey -> 8-bit
    mode = "RGBA" if has_alpha(im) else "RGB"
    return im if im.mode == mode else im.convert(mode)


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    if not icc:
        return im
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, profile, SRGB, outputMode=im.mode) or im
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im  # a broken profile: keep the numbers, as a browser ignoring it would


def _centre(size: tuple[int, int], aspect: tuple[int, int]) -> tuple[float, float, float, float]:
    """The largest box of the given aspect ratio centred in an image of ``size``."""
    width, height = size
    if width * aspect[1] > height * aspect[0]:  # wider than the box: crop the sides
        crop = height * aspect[0] / aspect[1]
        return ((width - crop) / 2, 0.0, (width + crop) / 2, float(height))
    crop = width * aspect[1] / aspect[0]
    return (0.0, (height - crop) / 2, float(width), (height + crop) / 2)


def _frame(im: Image.Image, spec: VariantSpec, plan: Layout, orientation: int, icc: bytes | None) -> Image.Image:
    """One decoded frame through orient, resize, crop or pad, colour conversion and flattening.

    ``plan`` was made from the source's full size; the frame may be smaller (a JPEG decoded at 1/8),
    which changes nothing: it is resized to the plan's absolute sizes, and a crop keeps the box's aspect.
    """
    frame = _rgb(im)
    if orientation in TRANSPOSE:
        frame = frame.transpose(TRANSPOSE[orientation])
    box = _centre(frame.size, plan.canvas) if plan.crop else None
    if frame.size != plan.image or box is not None:
        frame = frame.resize(plan.image, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    frame = _to_srgb(frame, icc)
    flatten = frame.mode == "RGBA" and spec.format not in ALPHA_FORMATS
    if plan.canvas != plan.image or flatten:
        # pad and flattening both lay the picture on a solid card of bg; its transparency shows bg.
        canvas = Image.new("RGB", plan.canvas, "#" + spec.bg)
        offset = ((plan.canvas[0] - plan.image[0]) // 2, (plan.canvas[1] - plan.image[1]) // 2)
        canvas.paste(frame, offset, frame if frame.mode == "RGBA" else None)
        frame = canvas
    if frame is im:
        # Nothing changed it (an RGB frame of an animation at its own size): the frame must still be an
        # image of its own, not the open file, which the encoder would read as all of its frames again.
        frame = frame.copy()
    frame.info = {}  # nothing of the source's metadata may reach the encoder
    return frame


def _estimate(im: Image.Image, canvas: tuple[int, int], frames: int) -> int:
    decoded = im.size[0] * im.size[1]
    return decoded * (len(im.getbands()) + WORK_BANDS) + canvas[0] * canvas[1] * WORK_BANDS * frames


def _save(frames: list[Image.Image], spec: VariantSpec, durations: list[int], loop: int) -> bytes:
    out = io.BytesIO()
    fmt = str(spec.format)
    options: dict[str, Any] = {}
    if fmt == "jpeg":
        options = {"quality": spec.q}
    elif fmt == "webp":
        options = {"quality": spec.q, "method": WEBP_METHOD}
    elif fmt == "avif":
        options = {"quality": spec.q, **AVIF_OPTIONS}
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:], duration=durations, loop=loop)
        if fmt == "gif":
            options["disposal"] = 2  # each frame is a whole picture: clear before drawing the next
    frames[0].save(out, fmt.upper(), **options)
    return out.getvalue()


def render(source: Source, spec: VariantSpec, *, max_memory: int, max_frames: int = 1000,
           jpeg_draft: bool = True) -> Rendered:
    """The variant ``spec`` (concrete, from VariantPolicy.resolve) of the image in ``source``.

    Raises RenderOverBudget before decoding when the estimate is over ``max_memory`` bytes, Unrenderable
    when the stored image does not decode or has more than ``max_frames`` frames to keep.
    ``jpeg_draft=False`` decodes JPEGs in full: only to measure what DCT scaling saves.
    """
    if not spec.is_concrete:
        raise BadVariant("format", f"format {spec.format!r} must be resolved before rendering")
    with open_image(source) as im:
        orientation = orientation_of(im)
        size = im.size if orientation < 5 else im.size[::-1]
        plan = layout(*size, spec)
        frames = getattr(im, "n_frames", 1) if spec.animated else 1
        if frames > max_frames:
            raise Unrenderable(f"the image has {frames} frames, over max_frames ({max_frames})")
        if jpeg_draft and im.format == "JPEG" and plan.image != size:
            wanted = plan.image if orientation < 5 else plan.image[::-1]
            # cover crops: the whole picture is scaled by the larger ratio, so ask for that much.
            ratio = max(wanted[0] / im.size[0], wanted[1] / im.size[1])
            im.draft(None, (round(im.size[0] * ratio * DRAFT_GAP), round(im.size[1] * ratio * DRAFT_GAP)))
        estimate = _estimate(im, plan.canvas, frames)
        if estimate > max_memory:
            raise RenderOverBudget(
                f"rendering needs about {estimate // 2**20} MiB, over render_max_memory "
                f"({max_memory // 2**20} MiB)", estimate=estimate, budget=max_memory)
        icc = im.info.get("icc_profile")
        try:
            return _render_frames(im, spec, plan, orientation, icc, frames)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Unrenderable(f"the stored image cannot be decoded: {exc}") from None


def _render_frames(im: Image.Image, spec: VariantSpec, plan: Layout, orientation: int, icc: bytes | None,
                   frames: int) -> Rendered:
    out: list[Image.Image] = []
    durations: list[int] = []
    for index in range(frames):
        if index:
            im.seek(index)
        out.append(_frame(im, spec, plan, orientation, icc))
        durations.append(int(im.info.get("duration", 100)))
    loop = int(im.info.get("loop", 0))
    data = _save(out, spec, durations, loop)
    return Rendered(data, CONTENT_TYPES[str(spec.format)], out[0].width, out[0].height, len(out))

