"""Pillow checks: is a downloaded file a complete image casimg accepts, and what are its format and size.

``validate_image`` runs in a worker thread, on the body in memory (or on a file, for bodies too large to
hold). It reads the header first, so a decompression bomb is refused before any pixel is decoded, then
checks that the whole file is there, so a truncated file is caught, not just a bad header. Two modes
(``CASIMG_VALIDATION``):

- ``structure`` (the default) walks the file's own structure to its end: every JPEG segment and every
  scan up to the end-of-image marker, every PNG chunk with its CRC up to IEND (Pillow's ``verify``), the
  WebP RIFF chunks against the file's length. Non-images and truncated files are refused; what it
  cannot see is bit-level damage inside compressed pixel data that keeps the structure intact (JPEG and
  WebP carry no checksum). GIF and other formats are decoded as in ``decode``.
- ``decode`` also decodes the pixels: JPEG in draft mode at 1/8 scale (libjpeg still walks the entire
  entropy-coded stream but skips most of the inverse DCT), PNG, GIF and WebP in full (the first frame).

WebP in ``structure`` mode is read without Pillow: Pillow's WebP plugin creates its decoder when it opens
a file, and the decoder allocates and clears the whole canvas, 4 bytes per pixel, before anything is
asked of it (about 5 ms for a 4.5 Mpx picture, fifty times a JPEG's structure walk). The RIFF walk reads
the same facts from the VP8, VP8L or VP8X header: the canvas size and, for animations, the frames.

Measured on the benchmark's image set (scripts/bench.py, about 110 KB JPEG photos of 1 Mpx): a full JPEG
decode costs about 5 ms, the 1/8 draft decode about 3 ms, the structure walk about 0.1 ms; a PNG decode
about 7 ms against 0.2 ms for the CRC walk; a WebP decode 30-60 ms. On two cores the decode alone caps
ingest at a few hundred images per second, below what the download path can fetch, hence the default.

Animated images have their frames counted against ``max_frames`` in both modes.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from casimg.errors import InvalidImage

# casimg applies its own pixel limit (max_pixels) before decoding; Pillow's built-in guard stays as a
# backstop (above twice its limit Image.open raises DecompressionBombError), but its warning for
# images between the two limits would only add noise to the logs.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

JPEG_DRAFT_SCALE = 8  # the smallest scale libjpeg decodes to; it still reads every coefficient
# Inside JPEG entropy-coded data 0xFF is followed by 0x00 (stuffing), 0xD0-0xD7 (restart markers) or more
# 0xFF (fill); anything else is the next marker, where the scan ends.
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole IEND chunk: length 0, type, CRC
GIF_TAIL = 64  # bytes read from a GIF's end to find its trailer past any padding
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # markers without a length field


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's format name: JPEG, PNG, GIF, WEBP, ...
    content_type: str
    width: int
    height: int
    frames: int = 1


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
    data = source if isinstance(source, bytes) else _read(source)
    if mode == "structure" and _is_webp(data):
        return _check_webp(data, max_pixels, allowed_formats, max_frames)
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = _format_of(image)
            _check_allowed(fmt, allowed_formats)
            width, height = image.size
            _check_pixels(width, height, max_pixels)
            frames = getattr(image, "n_frames", 1)
            _check_frames(frames, max_frames)
            if mode == "structure" and fmt in ("JPEG", "PNG"):
                if fmt == "PNG":
                    image.seek(0)
                    image.verify()  # every chunk's CRC, up to IEND
                _check_structure(fmt, data)
            else:
                if fmt == "JPEG":
                    image.draft(image.mode, (max(1, width // JPEG_DRAFT_SCALE), max(1, height // JPEG_DRAFT_SCALE)))
                image.seek(0)
                image.load()
                if mode == "structure" and fmt == "GIF":
                    _check_gif_trailer(data)
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not an image") from None
    except Image.DecompressionBombError:
        raise InvalidImage("too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Pillow reports a file that ends early or holds bad data through any of these.
        raise InvalidImage(f"truncated or corrupt image ({_short(exc)})") from None
    return ImageInfo(format=fmt, content_type=_content_type(fmt), width=width, height=height, frames=frames)


def content_type_of(path: Path | str) -> str:
    """The content type of a stored image from its header, without reading or checking the rest: what
    GET /api/blobs/{digest} sends, which knows only the bytes. application/octet-stream for a format
    Pillow does not know, and above Pillow's own pixel guard (twice Image.MAX_IMAGE_PIXELS)."""
    with open(path, "rb") as handle:
        if _is_webp(handle.read(12)):
            return "image/webp"  # Pillow's WebP open would decode the whole canvas
        handle.seek(0)
        try:
            with Image.open(handle) as image:
                fmt = _format_of(image)
        except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError,
                EOFError, IndexError, TypeError, struct.error):
            return "application/octet-stream"
    return _content_type(fmt)


def _is_webp(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _format_of(image: Image.Image) -> str:
    # Pillow names a JPEG with extra pictures (a phone's depth map, a preview) MPO; it is a JPEG to every
    # browser and is stored and served as one.
    return "JPEG" if image.format == "MPO" else image.format or "unknown"


def _read(path: Path | str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _content_type(fmt: str) -> str:
    return Image.MIME.get(fmt, "application/octet-stream")


def _check_allowed(fmt: str, allowed_formats: Collection[str] | None) -> None:
    if allowed_formats is not None and fmt not in allowed_formats:
        raise InvalidImage(f"format {fmt} not allowed")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidImage("not an image (no pixels)")
    if width * height > max_pixels:
        raise InvalidImage(f"too many pixels ({width}x{height} over {max_pixels})")


def _check_frames(frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise InvalidImage(f"too many frames ({frames} over {max_frames})")


def _short(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    return text[:80] if text else type(exc).__name__


def _check_structure(fmt: str, data: bytes) -> None:
    """Raise unless a JPEG's or PNG's structure runs complete to its end (see the module docstring)."""
    if fmt == "PNG":
        if data.rfind(_PNG_IEND) < 0:  # verify stops at IEND's type and never reads its CRC
            raise _truncated("no complete IEND chunk")
    else:
        _check_jpeg(data)


def _check_gif_trailer(data: bytes) -> None:
    if not data[-GIF_TAIL:].rstrip(b"\x00\r\n ").endswith(b";"):
        raise _truncated("no GIF trailer")


def _truncated(what: str) -> InvalidImage:
    return InvalidImage(f"truncated or corrupt image ({what})")


def _check_jpeg(data: bytes) -> None:
    """Walk the segments and scans from SOI to EOI; bytes after EOI (camera trailers) are allowed."""
    size, at = len(data), 2
    while True:
        if at + 2 > size:
            raise _truncated("no end-of-image marker")
        if data[at] != 0xFF:
            raise _truncated(f"no marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker == 0xD9:
            return
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if at + 4 > size:
            raise _truncated("no end-of-image marker")
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2:
            raise _truncated(f"bad segment length at byte {at}")
        at += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
            found = _JPEG_MARKER_IN_SCAN.search(data, at)
            if found is None:
                raise _truncated("scan data ends without a marker")
            at = found.start()


def _riff_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload length) of each chunk; raises unless the chunks fill the RIFF size."""
    if len(data) < 12 or data[:4] != b"RIFF":
        raise _truncated("no RIFF header")
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > len(data):
        raise _truncated(f"{len(data)} of {end} bytes")
    chunks, at = [], 12
    while at < end:
        if at + 8 > end:
            raise _truncated(f"chunk header cut at byte {at}")
        length = int.from_bytes(data[at + 4:at + 8], "little")
        chunks.append((data[at:at + 4], at + 8, length))
        at += 8 + length + (length & 1)
    if at != end and at != end + 1:  # the last chunk's pad byte may be missing
        raise _truncated("chunk sizes do not add up to the RIFF size")
    return chunks


def _check_webp(
    data: bytes, max_pixels: int, allowed_formats: Collection[str] | None, max_frames: int
) -> ImageInfo:
    """A WebP file's canvas and frames from its headers, the RIFF chunks checked to the end (no decoder)."""
    _check_allowed("WEBP", allowed_formats)
    chunks = _riff_chunks(data)
    if not chunks:
        raise InvalidImage("not an image (a WebP file without chunks)")
    kind, at, length = chunks[0]
    header = data[at:at + min(length, 10)]
    if kind == b"VP8 " and len(header) == 10 and header[3:6] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(header[6:8], "little") & 0x3FFF,
                         int.from_bytes(header[8:10], "little") & 0x3FFF)
    elif kind == b"VP8L" and len(header) >= 5 and header[0] == 0x2F:
        bits = int.from_bytes(header[1:5], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8X" and len(header) == 10:
        width, height = int.from_bytes(header[4:7], "little") + 1, int.from_bytes(header[7:10], "little") + 1
    else:
        raise InvalidImage("not an image (no VP8, VP8L or VP8X header in a WebP file)")
    _check_pixels(width, height, max_pixels)
    kinds = [chunk[0] for chunk in chunks]
    frames = kinds.count(b"ANMF")
    if frames == 0 and b"VP8 " not in kinds and b"VP8L" not in kinds:
        raise _truncated("no image data")
    frames = max(frames, 1)
    _check_frames(frames, max_frames)
    return ImageInfo(format="WEBP", content_type=_content_type("WEBP"), width=width, height=height, frames=frames)
