"""Pillow checks: is a downloaded file a complete image casimg accepts, and what are its format and size.

``validate_image`` runs in a worker thread (Pillow releases the GIL while it decodes). It reads the
header first, so a decompression bomb is refused before any pixel is decoded, then makes one pass
over the whole image data so a truncated or corrupt file is caught, not just a bad header:

- JPEG is decoded in draft mode at 1/8 scale: libjpeg still walks the entire entropy-coded stream
  (a cut file raises "image file is truncated"), but skips most of the inverse DCT work.
- PNG, GIF and WebP are decoded in full (the first frame). Animated images have their frames counted
  against ``max_frames``; counting seeks through every frame, so a frame cut short is caught too.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's format name: JPEG, PNG, GIF, WEBP, ...
    content_type: str
    width: int
    height: int
    frames: int = 1


def validate_image(
    path: Path | str,
    *,
    max_pixels: int,
    allowed_formats: Collection[str] | None = None,
    max_frames: int = 1000,
) -> ImageInfo:
    """The image's format and size, or InvalidImage with a short reason for the job's results.

    `allowed_formats` holds Pillow format names (upper case); None accepts any format Pillow reads.
    """
    try:
        with Image.open(path) as image:
            fmt = image.format or "unknown"
            if fmt == "MPO":
                # Pillow names a JPEG with extra pictures (a phone's depth map, a preview) MPO; it is
                # a JPEG to every browser and is stored and served as one.
                fmt = "JPEG"
            if allowed_formats is not None and fmt not in allowed_formats:
                raise InvalidImage(f"format {fmt} not allowed")
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidImage("not an image (no pixels)")
            if width * height > max_pixels:
                raise InvalidImage(f"too many pixels ({width}x{height} over {max_pixels})")
            frames = getattr(image, "n_frames", 1)
            if frames > max_frames:
                raise InvalidImage(f"too many frames ({frames} over {max_frames})")
            if fmt == "JPEG":
                image.draft(image.mode, (max(1, width // JPEG_DRAFT_SCALE), max(1, height // JPEG_DRAFT_SCALE)))
            image.seek(0)
            image.load()
            content_type = Image.MIME.get(fmt, "application/octet-stream")
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not an image") from None
    except Image.DecompressionBombError:
        raise InvalidImage("too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Pillow reports a file that ends early or holds bad data through any of these.
        raise InvalidImage(f"truncated or corrupt image ({_short(exc)})") from None
    return ImageInfo(format=fmt, content_type=content_type, width=width, height=height, frames=frames)


def _short(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    return text[:80] if text else type(exc).__name__
