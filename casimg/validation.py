"""The format checks: is a downloaded file a complete image casimg accepts, and what are its format and size.

``validate_image`` runs in a worker thread, on the body in memory (or, for bodies too large to hold, on
a file, which it maps rather than reads). It names the format from the file's first bytes, then walks
the file's own structure to its end before Pillow sees a byte, so that a file made of millions of
empty segments, chunks or frames is refused by a cheap walk with a reason such as ``too many segments``
(Pillow's own readers spend Python time, and for JPEG a list entry, on every segment). Then Pillow reads
the header, so a decompression bomb is refused before any pixel is decoded; a JPEG's plain header (the
segments every encoder writes, ``_plain_jpeg_size``) is read by casimg instead, to the same result, for
a third less CPU per JPEG. Two modes (``CASIMG_VALIDATION``):

- ``structure`` (the default) stops there for JPEG, PNG, WebP and AVIF: every JPEG segment and every
  scan up to the end-of-image marker, every PNG chunk with its CRC up to IEND, the WebP RIFF chunks and
  the AVIF top-level ISO-BMFF boxes against the file's length (libavif has parsed the boxes inside, for
  the size and frames). Non-images and truncated files are refused; what it cannot see is bit-level
  damage inside compressed pixel data that keeps the structure intact (JPEG, WebP and AV1 data carry no
  checksum), or an AVIF whose boxes were rewritten to end early (the walk does not follow the item
  extents into the AV1 data: libavif's decode would, at about 35 ms and 10 bytes per pixel, a 12 Mpx
  file of 430 KB costing 0.4 s and 114 MB). GIF is walked block by block to its trailer and has its
  first frame decoded as well, since the walk does not follow the LZW codes.
- ``decode`` also decodes the pixels: JPEG in draft mode at 1/8 scale (libjpeg still walks the entire
  entropy-coded stream but skips most of the inverse DCT), the others in full (the first frame).

Formats outside these five (when an operator allows them) are read by Pillow alone, with its own limits.

The walks are linear in the file, hold no list per segment and copy nothing bigger than a header: each
counts what it meets against a cap (``MAX_SEGMENTS`` ...), so the worst file costs a bounded number of
Python steps, and memory stays the file itself (mapped, for a path) plus Pillow's reading of the header.

WebP in ``structure`` mode is read without Pillow: Pillow's WebP plugin creates its decoder when it opens
a file, and the decoder allocates and clears the whole canvas, 4 bytes per pixel, before anything is
asked of it (about 5 ms for a 4.5 Mpx picture, fifty times a JPEG's structure walk). The RIFF walk reads
the same facts from the VP8, VP8L or VP8X header: the canvas size and, for animations, the frames.

A decode costs tens of times the structure walk (JPEG, PNG) and hundreds of times for WebP; on two
cores the decode alone would cap the ingest below what the download path fetches, hence the default
(the figures: BENCHMARKS.md, "Figures behind design choices").
The worst files, and what they cost before and after the walks came first: BENCHMARKS.md, "Validation
worst cases" (bench/validation_worst.py).

Animated images have their frames counted against ``max_frames`` in both modes.

The content type comes from ``FORMATS``, casimg's own table, never from Pillow's ``Image.MIME``: Pillow
fills that registry only as it loads each plugin, so a fresh process that never opened a WebP with
Pillow would have called a WebP application/octet-stream.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from PIL import Image, UnidentifiedImageError, features

from casimg.errors import InvalidImage

if TYPE_CHECKING:
    from casimg.config import Settings

# casimg applies its own pixel limit (max_pixels) before decoding; Pillow's built-in guard stays as a
# backstop (above twice its limit Image.open raises DecompressionBombError), but its warning for
# images between the two limits would only add noise to the logs.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Format:
    name: str  # Pillow's format name
    content_type: str
    extension: str  # of the file name a download is served under


# What casimg stores each format as. The first five are walked below; the others are named so that an
# operator who allows them (CASIMG_ALLOWED_FORMATS) gets a true content type; a format missing here is
# stored as application/octet-stream.
FORMATS = {fmt.name: fmt for fmt in (
    Format("JPEG", "image/jpeg", "jpg"),
    Format("PNG", "image/png", "png"),
    Format("GIF", "image/gif", "gif"),
    Format("WEBP", "image/webp", "webp"),
    Format("AVIF", "image/avif", "avif"),
    Format("BMP", "image/bmp", "bmp"),
    Format("TIFF", "image/tiff", "tif"),
    Format("ICO", "image/x-icon", "ico"),
    Format("JPEG2000", "image/jp2", "jp2"),
)}
UNKNOWN_TYPE = "application/octet-stream"

# Caps on what a walk counts, each far above what real files hold and low enough that the walk and
# Pillow's header reading stay well under a second for the worst file of the default 50 MiB:
# - JPEG: tens of segments in a camera file, a few hundred in a progressive one with an ICC profile cut
#   into 64 KB pieces. Pillow's JPEG open spends about 4 us and a list entry on each segment before the
#   first scan (10 million empty comments: 30 s and 730 MiB).
MAX_SEGMENTS = 10_000
# - fill bytes (0xFF) before JPEG markers: legal padding, a handful in real files; Pillow reads them one
#   at a time (about 1 us each).
MAX_FILL_BYTES = 65_536
# - PNG chunks, RIFF chunks, ISO-BMFF boxes: libpng writes IDAT in 8 KB chunks, about 6,400 for 50 MB;
#   a WebP or AVIF holds a handful plus one per frame (and max_frames caps those first by default).
MAX_CHUNKS = 100_000
# - PNG chunks before the first IDAT, which Pillow's open reads one by one in Python, keeping each text
#   chunk in a dict (about 7 us each): a real file has a dozen (IHDR, PLTE, gAMA, iCCP, tEXt, eXIf ...).
MAX_HEADER_CHUNKS = 1_000
# - GIF blocks and sub-blocks: encoders fill sub-blocks to 255 bytes, about 200,000 for 50 MB.
MAX_BLOCKS = 1_000_000
# - GIF sub-blocks before the first image, which Pillow's open reads one by one (about 0.5 us each): a
#   loop count, a comment, XMP (whose bytes read as sub-block lengths: about 1,300 for 100 KB of it).
MAX_HEADER_BLOCKS = 10_000

JPEG_DRAFT_SCALE = 8  # the smallest scale libjpeg decodes to; it still reads every coefficient
# Inside JPEG entropy-coded data 0xFF is followed by 0x00 (stuffing), 0xD0-0xD7 (restart markers) or more
# 0xFF (fill); anything else is the next marker, where the scan ends.
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # markers without a length field
GIF_TAIL = 64  # padding (NUL, CR, LF, space) allowed after a GIF's trailer
_GIF_PADDING = b"\x00\r\n "
# Files from this size on are mapped rather than read. Below it a read and a walk cost less (an 80 KB
# file: 90 against 180 us); about 1 MB they cost the same, and above it the mapping also saves the copy.
MAP_BYTES = 1024 * 1024
HEAD_BYTES = 256  # enough to name any format, an AVIF's list of brands included
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNK_TYPE = re.compile(rb"\w{4}")  # what Pillow accepts as a chunk type (the standard says letters)
_PNG_CHUNK = struct.Struct(">I4s")  # a chunk's length and type
_PNG_CRC = struct.Struct(">I")
_RIFF_CHUNK = struct.Struct("<4sI")  # a chunk's type and length
_AVIF_BRANDS = (b"avif", b"avis")

Data = bytes | mmap.mmap  # the file's bytes, in memory or mapped


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's format name: JPEG, PNG, GIF, WEBP, AVIF, ...
    content_type: str
    width: int
    height: int
    frames: int = 1


def validator(settings: Settings) -> Callable[[bytes | Path], ImageInfo]:
    """``validate_image`` with the limits, formats and mode of `settings`: how a download is checked."""
    allowed = frozenset(name.upper() for name in settings.allowed_formats)

    def validate(source: bytes | Path) -> ImageInfo:
        return validate_image(source, max_pixels=settings.max_pixels, allowed_formats=allowed,
                              max_frames=settings.max_frames, mode=settings.validation)
    return validate


def validate_image(
    source: bytes | Path | str,
    *,
    max_pixels: int,
    allowed_formats: Collection[str] | None = None,
    max_frames: int = 1000,
    mode: str = "structure",
) -> ImageInfo:
    """The image's format and size, or InvalidImage with a short reason for the job's results.

    `source` is the file's bytes or its path. `allowed_formats` holds Pillow format names (upper case);
    None accepts any format Pillow reads.
    """
    with _contents(source) as (data, stream):
        fmt = format_of(data[:HEAD_BYTES])
        if fmt in _WALKS:
            _check_allowed(fmt, allowed_formats)
        elif allowed_formats is not None and set(allowed_formats) <= _WALKS.keys():
            # Refused before any plugin opens it. Otherwise Pillow's open decides, as a signature may
            # name the wrong plugin (a TGA passes CUR's check) and some plugins have no signature check.
            raise InvalidImage(f"format {fmt} not allowed" if fmt else "not an image")
        try:
            if fmt == "WEBP":
                info = _check_webp(data, max_pixels, max_frames)
                if mode == "structure":
                    return info
                return _with_pillow(stream, fmt, max_pixels, max_frames, decode=True, frames=info.frames)
            frames = _walk(fmt, data, max_frames)
            if fmt == "JPEG" and mode == "structure":
                size = _plain_jpeg_size(data)
                if size is not None:
                    return _jpeg_info(*size, max_pixels)
            decode = mode == "decode" or fmt == "GIF" or fmt not in _WALKS
            return _with_pillow(stream, fmt, max_pixels, max_frames, decode=decode, frames=frames,
                                allowed_formats=allowed_formats)
        except InvalidImage:
            raise
        except UnidentifiedImageError:
            raise InvalidImage("not an image") from None
        except Image.DecompressionBombError:
            raise InvalidImage("too many pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            # Pillow reports a file that ends early or holds bad data through any of these.
            raise InvalidImage(f"truncated or corrupt image ({_short(exc)})") from None


def content_type_of(path: Path | str | bytes) -> str:
    """The content type of a stored image (a file, or its bytes) from its header, without reading or
    checking the rest: what GET /api/blobs/{digest} sends, which knows only the bytes, and what fsck
    checks the index against. A walked format is named from its signature; any other by Pillow's open,
    as validate_image names it. application/octet-stream for a format casimg does not know."""
    with (io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb")) as handle:
        fmt = format_of(handle.read(HEAD_BYTES))
        if fmt in _WALKS:
            return content_type_for(fmt)
        handle.seek(0)
        try:
            with Image.open(handle) as image:
                return content_type_for(_pillow_format(image))
        except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError,
                EOFError, IndexError, TypeError, struct.error):
            return UNKNOWN_TYPE


def content_type_from_head(head: bytes) -> str | None:
    """The content type the first HEAD_BYTES of a stored image name, or None when only Pillow's open of
    the whole image can tell (``content_type_of``): how a reader of an object store reads a header alone."""
    fmt = format_of(head)
    return content_type_for(fmt) if fmt in _WALKS else None


def content_type_for(fmt: str | None) -> str:
    known = FORMATS.get(fmt or "")
    return known.content_type if known is not None else UNKNOWN_TYPE


def format_of(head: bytes) -> str | None:
    """The format a file's first bytes name (HEAD_BYTES of them): one of the walked formats from their
    signatures, any other from Pillow's plugins' signature checks (no plugin opens anything), or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == _PNG_SIGNATURE:
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if _is_avif(head):
        return "AVIF"
    Image.init()  # every plugin, so the answer does not depend on what this process opened before
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in _WALKS or accept is None:
            continue
        try:
            accepted = accept(head)
        except (SyntaxError, IndexError, TypeError, struct.error):  # a check reading past a short head
            continue
        if accepted and not isinstance(accepted, str):  # a string explains a refusal
            return name
    return None


def _is_avif(head: bytes) -> bool:
    """An ISO-BMFF file whose ftyp box lists an AVIF brand (a HEIC file has the same box, other brands)."""
    if head[4:8] != b"ftyp":
        return False
    end = min(int.from_bytes(head[:4], "big"), len(head))
    brands = [head[8:12]] + [head[at:at + 4] for at in range(16, end - 3, 4)]
    return any(brand in _AVIF_BRANDS for brand in brands)


@contextmanager
def _contents(source: bytes | Path | str) -> Iterator[tuple[Data, IO[bytes]]]:
    """The bytes to walk and a stream for Pillow. A large file is mapped, not read: its pages are the page
    cache's, where the download just wrote them, so it costs no copy; a small one is read once."""
    if isinstance(source, bytes):
        yield source, io.BytesIO(source)
        return
    with open(source, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < MAP_BYTES:
            data = handle.read()
            yield data, io.BytesIO(data)
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped, handle


def _with_pillow(
    stream: IO[bytes], fmt: str | None, max_pixels: int, max_frames: int, *, decode: bool,
    frames: int | None, allowed_formats: Collection[str] | None = None,
) -> ImageInfo:
    """What Pillow reads from the header (the size, the frames of formats not walked), and the decode.

    A walked format is opened by its own reader only: when that reader refuses the file, Pillow would
    try every other one, and some check no signature (PCD, TGA ...), so a JPEG that the JPEG reader
    refuses could have been stored as another format, allowed or not. It is "not an image" instead."""
    stream.seek(0)
    walked = fmt is not None and fmt in _WALKS
    with Image.open(stream, formats=[fmt] if walked else None) as image:
        name = _pillow_format(image)
        if not walked:
            _check_allowed(name, allowed_formats)  # a format named by a signature may open as another
        width, height = image.size
        _check_pixels(width, height, max_pixels)
        if frames is None:  # JPEG (a phone's MPO: its index), PNG (APNG: its acTL), AVIF, others
            frames = getattr(image, "n_frames", 1)
            _check_frames(frames, max_frames)
        if decode:
            if name == "JPEG":
                image.draft(image.mode, (max(1, width // JPEG_DRAFT_SCALE), max(1, height // JPEG_DRAFT_SCALE)))
            image.seek(0)
            image.load()
    return ImageInfo(format=name, content_type=content_type_for(name), width=width, height=height, frames=frames)


def _pillow_format(image: Image.Image) -> str:
    # Pillow names a JPEG with extra pictures (a phone's depth map, a preview) MPO; it is a JPEG to every
    # browser and is stored and served as one.
    return "JPEG" if image.format == "MPO" else image.format or "unknown"


def _check_allowed(fmt: str, allowed_formats: Collection[str] | None) -> None:
    if allowed_formats is not None and fmt not in allowed_formats:
        raise InvalidImage(f"format {fmt} not allowed")
    if fmt == "AVIF" and not features.check("avif"):
        raise InvalidImage("format AVIF not readable (Pillow was built without libavif)")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidImage("not an image (no pixels)")
    if width * height > max_pixels:
        raise InvalidImage(f"too many pixels ({width}x{height} over {max_pixels})")


def _check_frames(frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise InvalidImage(f"too many frames ({frames} over {max_frames})")


def _too_many(what: str, cap: int) -> InvalidImage:
    return InvalidImage(f"too many {what} (over {cap})")


def _short(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    return text[:80] if text else type(exc).__name__


def _truncated(what: str) -> InvalidImage:
    return InvalidImage(f"truncated or corrupt image ({what})")


# -- the walks: each raises unless the structure runs complete to its end, under its caps ---------------

def _walk(fmt: str | None, data: Data, max_frames: int) -> int | None:
    """The frames a walk counted (GIF), or None where Pillow gives them."""
    walk = _WALKS.get(fmt or "")
    return walk(data, max_frames) if walk is not None else None


def _walk_jpeg(data: Data, max_frames: int) -> None:
    """Every segment and scan from SOI to EOI; bytes after EOI (camera trailers, an MPO's pictures) are
    allowed."""
    size, at, segments, fill = len(data), 2, 0, 0
    while True:
        if at + 2 > size:
            raise _truncated("no end-of-image marker")
        if data[at] != 0xFF:
            raise _truncated(f"no marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            fill += 1
            if fill > MAX_FILL_BYTES:
                raise _too_many("fill bytes", MAX_FILL_BYTES)
            at += 1
            continue
        if marker == 0xD9:
            return
        segments += 1
        if segments > MAX_SEGMENTS:
            raise _too_many("segments", MAX_SEGMENTS)
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if at + 4 > size:
            raise _truncated("no end-of-image marker")
        length = (data[at + 2] << 8) | data[at + 3]
        if length < 2:
            raise _truncated(f"bad segment length at byte {at}")
        at += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            found = _JPEG_MARKER_IN_SCAN.search(data, at)
            if found is None:
                raise _truncated("scan data ends without a marker")
            at = found.start()


# SOF0-2 (baseline, extended, progressive: what encoders write), DHT, DRI, DQT, APP0-15 and COM: the
# segments of a plain header, which _plain_jpeg_size reads as Pillow's JPEG open would.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2})
_JPEG_PLAIN = frozenset({*_JPEG_SOF, 0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
_JPEG_LAYERS = frozenset({1, 3, 4})  # L, RGB, CMYK: what Pillow reads


def _plain_jpeg_size(data: Data) -> tuple[int, int] | None:
    """A walked JPEG's (width, height) from its frame header, when every segment before the first scan is
    one that Pillow's open reads without a failure or a fact of its own; None otherwise, and Pillow reads
    the header. Pillow's JPEG open spent about half as long as the whole walk on what a photo's header
    says in a few bytes (BENCHMARKS.md, "Figures behind design choices").

    Left to Pillow: fill bytes, markers outside _JPEG_PLAIN, a second frame header, an MPO's index
    (APP2 "MPF": more pictures), Photoshop resources (APP13, whose parse can fail), an EXIF block with no
    JFIF density (Pillow then reads the EXIF for the DPI), and any segment Pillow would refuse: a JFIF or
    Adobe segment too short for its fields, an ICC piece without its sequence bytes, a quantization
    table cut short, a frame header of other than 8 bits or 1, 3 or 4 components, or with a component
    cut short."""
    at, size, has_exif, has_density = 2, None, False, False
    while True:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xDA:
            return size if size is not None and (has_density or not has_exif) else None
        if marker not in _JPEG_PLAIN:
            return None
        end = at + 2 + ((data[at + 2] << 8) | data[at + 3])  # within the file: the walk checked it
        length = end - at - 4  # of the segment's payload, which Pillow's handler reads
        if 0xE0 <= marker <= 0xEF:
            head = data[at + 4:min(end, at + 18)]  # what Pillow's checks of the segment's start see
            if marker == 0xE0 and head.startswith(b"JFIF"):
                if length < 7:
                    return None
                has_density = has_density or (length >= 12 and data[at + 11] in (1, 2))
            elif marker == 0xE1 and head.startswith(b"Exif\0\0"):
                has_exif = True
            elif marker == 0xE2 and (head.startswith(b"MPF\0")
                                     or (head.startswith(b"ICC_PROFILE\0") and length < 14)):
                return None
            elif marker == 0xED and head.startswith(b"Photoshop 3.0\0"):
                return None
            elif marker == 0xEE and head.startswith(b"Adobe") and length < 7:
                return None
        elif marker == 0xDB:
            table = at + 4
            while table < end:
                table += 65 if data[table] < 16 else 129
            if table != end:
                return None
        elif marker in _JPEG_SOF:
            if (size is not None or length < 6 or (length - 6) % 3 or data[at + 4] != 8
                    or data[at + 9] not in _JPEG_LAYERS):
                return None
            size = (data[at + 7] << 8) | data[at + 8], (data[at + 5] << 8) | data[at + 6]
        at = end


def _jpeg_info(width: int, height: int, max_pixels: int) -> ImageInfo:
    """What _with_pillow gives for a JPEG of this size, without opening it."""
    if width == 0 or height == 0:  # Pillow's open takes no plugin's word for a file without pixels
        raise InvalidImage("not an image")
    limit = Image.MAX_IMAGE_PIXELS  # Pillow's backstop, as Image.open applies it (see the top)
    if limit is not None and width * height > 2 * limit:
        raise InvalidImage("too many pixels")
    _check_pixels(width, height, max_pixels)
    return ImageInfo(format="JPEG", content_type=content_type_for("JPEG"), width=width, height=height)


def _walk_png(data: Data, max_frames: int) -> None:
    """Every chunk with its CRC, from the signature to IEND (what Pillow's verify checks, without its list
    of chunk names)."""
    size, at, chunks, seen_data = len(data), len(_PNG_SIGNATURE), 0, False
    with memoryview(data) as view:
        while True:
            if at + 12 > size:
                raise _truncated("no complete IEND chunk")
            length, kind = _PNG_CHUNK.unpack_from(data, at)
            end = at + 12 + length
            if not (kind.isalpha() or _PNG_CHUNK_TYPE.fullmatch(kind)):
                raise _truncated(f"no PNG chunk at byte {at}")
            if end > size:
                raise _truncated(f"chunk {kind.decode()} cut at byte {size}")
            chunks += 1
            if chunks > MAX_CHUNKS:
                raise _too_many("chunks", MAX_CHUNKS)
            if not seen_data:
                seen_data = kind == b"IDAT"
                if not seen_data and chunks > MAX_HEADER_CHUNKS:
                    raise _too_many("chunks before the image data", MAX_HEADER_CHUNKS)
            if zlib.crc32(view[at + 4:end - 4]) != _PNG_CRC.unpack_from(data, end - 4)[0]:
                raise _truncated(f"bad CRC in chunk {kind.decode()} at byte {at}")
            if kind == b"IEND":
                return
            at = end


def _walk_gif(data: Data, max_frames: int) -> int:
    """Every block and sub-block from the screen descriptor to the trailer; the frames, counted as met."""
    size = len(data)
    if size < 13:
        raise _truncated("no GIF screen descriptor")
    at, frames, blocks = 13 + _gif_colour_table(data[10]), 0, 0
    while True:
        if at >= size:
            raise _truncated("no GIF trailer")
        kind = data[at]
        if kind == 0x3B:
            break
        if kind == 0x2C:  # an image descriptor: a frame
            frames += 1
            _check_frames(frames, max_frames)
            if at + 10 > size:
                raise _truncated("no GIF trailer")
            at += 10 + _gif_colour_table(data[at + 9]) + 1  # + the LZW minimum code size
        elif kind == 0x21:  # an extension: introducer and label
            at += 2
        else:
            raise _truncated(f"no GIF block at byte {at}")
        while True:  # sub-blocks, up to one of length 0
            if at >= size:
                raise _truncated("no GIF trailer")
            length = data[at]
            at += 1 + length
            blocks += 1
            if blocks > MAX_BLOCKS:
                raise _too_many("blocks", MAX_BLOCKS)
            if blocks > MAX_HEADER_BLOCKS and frames == 0:
                raise _too_many("blocks before the first image", MAX_HEADER_BLOCKS)
            if length == 0:
                break
    tail = data[at + 1:at + 1 + GIF_TAIL]
    if len(tail) == GIF_TAIL or tail.strip(_GIF_PADDING):
        raise _truncated("data after the GIF trailer")
    return max(frames, 1)


def _gif_colour_table(packed: int) -> int:
    """The bytes of the colour table a screen or image descriptor's packed field announces."""
    return 3 << ((packed & 7) + 1) if packed & 0x80 else 0


def _walk_avif(data: Data, max_frames: int) -> None:
    """The top-level ISO-BMFF boxes, from ftyp, against the file's length."""
    size, at, boxes = len(data), 0, 0
    while at < size:
        if at + 8 > size:
            raise _truncated(f"box header cut at byte {at}")
        length, header = int.from_bytes(data[at:at + 4], "big"), 8
        if length == 1:  # a 64-bit size follows the type
            if at + 16 > size:
                raise _truncated(f"box header cut at byte {at}")
            length, header = int.from_bytes(data[at + 8:at + 16], "big"), 16
        elif length == 0:  # the last box runs to the end of the file
            length = size - at
        if length < header:
            raise _truncated(f"bad box size at byte {at}")
        if at + length > size:
            raise _truncated(f"{size} of {at + length} bytes")
        boxes += 1
        if boxes > MAX_CHUNKS:
            raise _too_many("boxes", MAX_CHUNKS)
        at += length


_WALKS = {"JPEG": _walk_jpeg, "PNG": _walk_png, "GIF": _walk_gif, "AVIF": _walk_avif, "WEBP": None}


def _check_webp(data: Data, max_pixels: int, max_frames: int) -> ImageInfo:
    """A WebP file's canvas and frames from its headers, the RIFF chunks checked to the end (no decoder)."""
    size = len(data)
    if size < 12:
        raise _truncated("no RIFF header")
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > size:
        raise _truncated(f"{size} of {end} bytes")
    at, chunks, frames, first, has_data = 12, 0, 0, b"", False
    header = b""
    while at < end:
        if at + 8 > end:
            raise _truncated(f"chunk header cut at byte {at}")
        kind, length = _RIFF_CHUNK.unpack_from(data, at)
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise _too_many("chunks", MAX_CHUNKS)
        if chunks == 1:
            first, header = kind, data[at + 8:at + 8 + min(length, 10)]
        elif kind == b"ANMF":
            frames += 1
            _check_frames(frames, max_frames)
        has_data = has_data or kind in (b"VP8 ", b"VP8L")
        at += 8 + length + (length & 1)
    if at != end and at != end + 1:  # the last chunk's pad byte may be missing
        raise _truncated("chunk sizes do not add up to the RIFF size")
    if not chunks:
        raise InvalidImage("not an image (a WebP file without chunks)")
    width, height = _webp_canvas(first, header)
    _check_pixels(width, height, max_pixels)
    if frames == 0 and not has_data:
        raise _truncated("no image data")
    return ImageInfo(format="WEBP", content_type=content_type_for("WEBP"), width=width, height=height,
                     frames=max(frames, 1))


def _webp_canvas(kind: bytes, header: bytes) -> tuple[int, int]:
    """Width and height from the first chunk's first 10 bytes: a VP8 frame, a VP8L or a VP8X header."""
    if kind == b"VP8 " and len(header) == 10 and header[3:6] == b"\x9d\x01\x2a":
        return (int.from_bytes(header[6:8], "little") & 0x3FFF, int.from_bytes(header[8:10], "little") & 0x3FFF)
    if kind == b"VP8L" and len(header) >= 5 and header[0] == 0x2F:
        bits = int.from_bytes(header[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(header) == 10:
        return int.from_bytes(header[4:7], "little") + 1, int.from_bytes(header[7:10], "little") + 1
    raise InvalidImage("not an image (no VP8, VP8L or VP8X header in a WebP file)")
