"""Pillow validation on real files of every supported format and the ways they go wrong."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bench import validation_worst as worst  # the generators of BENCHMARKS.md's worst cases
from casimg import validation
from casimg.config import Settings
from casimg.errors import InvalidImage
from casimg.validation import (
    MAP_BYTES,
    MAX_CHUNKS,
    MAX_FILL_BYTES,
    MAX_HEADER_BLOCKS,
    MAX_HEADER_CHUNKS,
    MAX_SEGMENTS,
    content_type_of,
    validate_image,
)
from tests.origin import animated_gif, image_bytes, pixel_bomb

ALLOWED = frozenset({"JPEG", "PNG", "GIF", "WEBP"})
LIMITS = {"max_pixels": 50_000_000, "allowed_formats": ALLOWED, "max_frames": 100}


def written(tmp_path: Path, data: bytes, name: str = "image") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("ext", "fmt", "content_type"), [
    ("jpg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png"), ("gif", "GIF", "image/gif"),
    ("webp", "WEBP", "image/webp"),
])
def test_each_supported_format_is_accepted_with_its_metadata(tmp_path, ext, fmt, content_type):
    info = validate_image(written(tmp_path, image_bytes(5, ext, (120, 80))), **LIMITS)
    assert (info.format, info.content_type, info.width, info.height, info.frames) == (fmt, content_type, 120, 80, 1)


@pytest.mark.parametrize("ext", ["jpg", "png", "gif", "webp"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_files_are_refused(tmp_path, ext, keep):
    whole = image_bytes(11, ext, (400, 300))
    with pytest.raises(InvalidImage) as refused:
        validate_image(written(tmp_path, whole[: int(len(whole) * keep)]), **LIMITS)
    assert refused.value.reason.startswith(("truncated or corrupt", "not an image"))


def test_a_jpeg_cut_anywhere_in_its_scan_data_is_refused(tmp_path):
    whole = image_bytes(12, "jpg", (400, 300))
    scan_start = whole.index(b"\xff\xda")  # start of scan: everything after it is entropy-coded data
    for cut in range(scan_start + 16, len(whole) - 8, max(1, (len(whole) - scan_start) // 25)):
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            validate_image(written(tmp_path, whole[:cut]), **LIMITS)


@pytest.mark.parametrize("data", [b"", b"<!doctype html><p>hello", b"GIF89a", b"\x89PNG\r\n\x1a\n"])
def test_what_is_not_an_image_is_refused(tmp_path, data):
    with pytest.raises(InvalidImage) as refused:
        validate_image(written(tmp_path, data), **LIMITS)
    assert refused.value.reason.startswith(("not an image", "truncated or corrupt"))
    assert refused.value.permanent


def test_pixel_bomb_is_refused_from_its_header(tmp_path):
    with pytest.raises(InvalidImage, match=r"too many pixels \(10000x10000 over 50000000\)"):
        validate_image(written(tmp_path, pixel_bomb(10_000, 10_000)), **LIMITS)


def test_pillow_own_bomb_guard_also_reads_as_too_many_pixels(tmp_path):
    with pytest.raises(InvalidImage, match="too many pixels"):
        validate_image(written(tmp_path, pixel_bomb(100_000, 100_000)), max_pixels=2**62)


def test_pixel_limit_is_inclusive(tmp_path):
    path = written(tmp_path, image_bytes(3, "png", (100, 50)))
    assert validate_image(path, max_pixels=5000).width == 100
    with pytest.raises(InvalidImage, match="too many pixels"):
        validate_image(path, max_pixels=4999)


def test_formats_off_the_allowlist_are_refused_and_any_format_passes_without_one(tmp_path):
    path = written(tmp_path, image_bytes(4, "bmp"))
    with pytest.raises(InvalidImage, match="format BMP not allowed"):
        validate_image(path, **LIMITS)
    assert validate_image(path, max_pixels=10**9).content_type == "image/bmp"


def test_an_allowed_format_outside_the_walks_is_read_by_pillow_and_typed_from_casimgs_table(tmp_path):
    # TGA has no signature Pillow could check: it is read by trying to open it, and only if allowed.
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(6, "png", (40, 30)))).save(buffer, "TGA")
    path = written(tmp_path, buffer.getvalue())
    info = validate_image(path, max_pixels=10**6, allowed_formats={"JPEG", "TGA"})
    assert (info.format, info.content_type, info.width) == ("TGA", "application/octet-stream", 40)
    bmp = written(tmp_path, image_bytes(4, "bmp"), "b")
    assert content_type_of(bmp) == validate_image(bmp, max_pixels=10**6).content_type == "image/bmp"
    with pytest.raises(InvalidImage, match="not allowed"):  # named by the first signature that fits (CUR)
        validate_image(path, **LIMITS)


def test_animated_images_are_counted_against_the_frame_limit(tmp_path):
    assert validate_image(written(tmp_path, animated_gif(5)), **LIMITS).frames == 5
    with pytest.raises(InvalidImage, match=r"too many frames \(101 over 100\)"):
        validate_image(written(tmp_path, animated_gif(101)), **LIMITS)


def test_a_multi_picture_jpeg_from_a_phone_is_a_jpeg(tmp_path):
    first, second = (Image.open(io.BytesIO(image_bytes(seed, "jpg", (64, 48)))) for seed in (21, 22))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    info = validate_image(written(tmp_path, buffer.getvalue()), **LIMITS)
    assert (info.format, info.content_type, info.width, info.height) == ("JPEG", "image/jpeg", 64, 48)


# -- the two modes (CASIMG_VALIDATION): structure is the default, decode also decodes the pixels -----

@pytest.mark.parametrize("mode", ["structure", "decode"])
@pytest.mark.parametrize("ext", ["jpg", "png", "gif", "webp"])
def test_both_modes_accept_whole_files_and_refuse_cut_ones(tmp_path, mode, ext):
    whole = image_bytes(13, ext, (300, 200))
    assert validate_image(written(tmp_path, whole), mode=mode, **LIMITS).width == 300
    for keep in (0.3, 0.7):
        with pytest.raises(InvalidImage, match=r"truncated or corrupt|not an image"):
            validate_image(written(tmp_path, whole[: int(len(whole) * keep)]), mode=mode, **LIMITS)


@pytest.mark.parametrize("ext", ["jpg", "png", "gif", "webp"])
def test_structure_mode_refuses_a_file_missing_only_its_last_bytes(tmp_path, ext):
    # A decode can finish without them (a PNG whose IEND is cut off decodes fine); the structure walk cannot.
    whole = image_bytes(15, ext, (300, 200))
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        validate_image(written(tmp_path, whole[:-2]), **LIMITS)


def test_structure_mode_walks_progressive_jpegs_and_allows_bytes_after_the_end_marker(tmp_path):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(14, "jpg", (320, 240)))).save(buffer, "JPEG", progressive=True, quality=80)
    progressive = buffer.getvalue()
    assert progressive.count(b"\xff\xda") > 1  # several scans
    assert validate_image(written(tmp_path, progressive), **LIMITS).format == "JPEG"
    assert validate_image(written(tmp_path, progressive + b"camera trailer"), **LIMITS).width == 320
    for cut in range(progressive.index(b"\xff\xda"), len(progressive) - 1, len(progressive) // 20):
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            validate_image(written(tmp_path, progressive[:cut]), **LIMITS)


# -- WebP in structure mode is read from its headers, not through Pillow's decoder ------------------

def webp_variants() -> dict[str, bytes]:
    """Lossy (VP8), lossless (VP8L), with alpha (VP8X + ALPH) and animated (VP8X + ANMF) WebP files."""
    picture = Image.open(io.BytesIO(image_bytes(16, "png", (90, 60)))).convert("RGB")
    with_alpha = picture.convert("RGBA")
    with_alpha.putalpha(128)
    frames = [picture.rotate(angle) for angle in (0, 90, 180)]
    out = {}
    for name, image, options in [
        ("lossy", picture, {"quality": 70}),
        ("lossless", picture, {"lossless": True}),
        ("alpha", with_alpha, {"quality": 70}),
        ("animated", frames[0], {"save_all": True, "append_images": frames[1:], "duration": 100}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, "WEBP", **options)
        out[name] = buffer.getvalue()
    return out


@pytest.mark.parametrize("variant", ["lossy", "lossless", "alpha", "animated"])
def test_webp_headers_give_what_pillow_reads(variant):
    data = webp_variants()[variant]
    with Image.open(io.BytesIO(data)) as image:
        expected = ("WEBP", "image/webp", *image.size, getattr(image, "n_frames", 1))
    info = validate_image(data, **LIMITS)
    assert (info.format, info.content_type, info.width, info.height, info.frames) == expected
    assert info.frames == (3 if variant == "animated" else 1)
    for cut in (len(data) // 3, len(data) - 3):
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            validate_image(data[:cut], **LIMITS)


def test_webp_pixel_bomb_and_frame_limit_are_read_from_the_headers():
    lossy = webp_variants()["lossy"]
    # The VP8 frame header holds 14-bit dimensions at bytes 26-29 of the file: claim 16383 x 16383.
    bomb = lossy[:26] + (16383).to_bytes(2, "little") * 2 + lossy[30:]
    with pytest.raises(InvalidImage, match=r"too many pixels \(16383x16383 over 1000000\)"):
        validate_image(bomb, max_pixels=1_000_000)
    with pytest.raises(InvalidImage, match=r"too many frames \(3 over 2\)"):
        validate_image(webp_variants()["animated"], max_pixels=10**6, max_frames=2)


def test_a_webp_without_an_image_header_is_not_an_image():
    lossy = webp_variants()["lossy"]
    renamed = lossy[:12] + b"JUNK" + lossy[16:]
    with pytest.raises(InvalidImage, match="not an image"):
        validate_image(renamed, **LIMITS)
    with pytest.raises(InvalidImage, match="format WEBP not allowed"):
        validate_image(lossy, max_pixels=10**6, allowed_formats={"JPEG"})


# -- hostile structure: refused by casimg's own walk before Pillow reads it, in bounded time and memory -----


SECONDS = 5.0  # generous: the walks refuse each of these in milliseconds; before them it took seconds


def costs(path: Path, **limits: object) -> tuple[str, float, int]:
    """The refusal's reason, its CPU seconds, and the peak of Python's allocations in a second run (tracing
    them slows every allocation down, so the time is taken without it)."""
    def refusal() -> str:
        with pytest.raises(InvalidImage) as refused:
            validate_image(path, **{**LIMITS, "max_frames": 1000, **limits})
        return refused.value.reason

    started = time.process_time()
    reason = refusal()
    seconds = time.process_time() - started
    tracemalloc.start()
    try:
        assert refusal() == reason
        return reason, seconds, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["structure", "decode"])
@pytest.mark.parametrize(("build", "count", "reason"), [
    (worst.hostile_jpeg, 300_000, f"too many segments (over {MAX_SEGMENTS})"),
    (worst.hostile_webp, 200_000, f"too many chunks (over {MAX_CHUNKS})"),
    (worst.hostile_png, 200_000, f"too many chunks (over {MAX_CHUNKS})"),
    (worst.hostile_gif, 200_000, "too many frames (1001 over 1000)"),
], ids=["jpeg-comments", "webp-chunks", "png-text-after-idat", "gif-frames"])
def test_absurd_structure_is_refused_early_in_bounded_time_and_memory(tmp_path, mode, build, count, reason):
    path = written(tmp_path, build(count))
    assert path.stat().st_size > MAP_BYTES
    got, seconds, peak = costs(path, mode=mode)
    assert got == reason
    assert seconds < SECONDS
    # A body over MAP_BYTES is mapped, not read: the walk allocates a few headers, no copy, no list per item.
    assert peak < path.stat().st_size / 10, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"


def test_every_cap_names_what_it_counted(tmp_path):
    real_jpeg, real_gif = worst.small_picture("JPEG"), worst.small_picture("GIF")
    fill = real_jpeg[:2] + b"\xff" * (MAX_FILL_BYTES + 1) + real_jpeg[2:]
    assert costs(written(tmp_path, fill))[0] == f"too many fill bytes (over {MAX_FILL_BYTES})"
    png = worst.small_picture("PNG")
    first_idat = png.index(b"IDAT") - 4
    text_first = png[:first_idat] + worst.png_chunk(b"tEXt", b"k\x00") * (MAX_HEADER_CHUNKS + 1) + png[first_idat:]
    reason = f"too many chunks before the image data (over {MAX_HEADER_CHUNKS})"
    assert costs(written(tmp_path, text_first))[0] == reason
    screen = 13 + 3 * 2 ** ((real_gif[10] & 7) + 1)
    comment = real_gif[:screen] + b"\x21\xfe" + b"\x01x" * MAX_HEADER_BLOCKS + b"\x00" + real_gif[screen:]
    assert costs(written(tmp_path, comment))[0] == f"too many blocks before the first image (over {MAX_HEADER_BLOCKS})"
    free_boxes = worst.small_picture("AVIF") + b"\x00\x00\x00\x08free" * MAX_CHUNKS
    assert costs(written(tmp_path, free_boxes), allowed_formats={"AVIF"})[0] == f"too many boxes (over {MAX_CHUNKS})"


def test_files_just_under_the_caps_are_accepted(tmp_path):
    # The caps refuse absurd structure, not busy files: a JPEG with thousands of segments, a PNG with
    # hundreds of text chunks before its image data and 90,000 after it are still images.
    jpeg = written(tmp_path, worst.hostile_jpeg(MAX_SEGMENTS - 50), "a.jpg")
    assert validate_image(jpeg, **LIMITS).format == "JPEG"
    png = worst.small_picture("PNG")
    first_idat = png.index(b"IDAT") - 4
    busy = (png[:first_idat] + worst.png_chunk(b"tEXt", b"k\x00") * (MAX_HEADER_CHUNKS - 10) + png[first_idat:-12]
            + worst.png_chunk(b"tEXt", b"k\x00") * 90_000 + png[-12:])
    started = time.process_time()
    assert validate_image(written(tmp_path, busy, "b.png"), **LIMITS).format == "PNG"
    assert time.process_time() - started < SECONDS


# -- content types from casimg's own table; AVIF --------------------------------------------------------

def test_a_fresh_process_stores_a_webp_as_image_webp(tmp_path):
    # Pillow registers image/webp only once its WebP plugin is loaded, which the structure walk never
    # does: in a fresh process (a freshly started server) the type must still be right.
    path = written(tmp_path, webp_variants()["lossy"], "fresh.webp")
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from casimg.validation import content_type_of, validate_image\n"
        "print(Image.MIME.get('WEBP'))\n"  # the premise: Pillow has not registered it yet
        "info = validate_image(sys.argv[1], max_pixels=10**6, allowed_formats={'WEBP'})\n"
        "print(info.content_type, content_type_of(sys.argv[1]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split("\n")[:2] == ["None", "image/webp image/webp"]


def avif_variants() -> dict[str, bytes]:
    picture = Image.open(io.BytesIO(image_bytes(17, "png", (90, 60)))).convert("RGB")
    frames = [picture.rotate(angle) for angle in (0, 90, 180)]
    out = {}
    for name, options in [("still", {"quality": 60}),
                          ("animated", {"save_all": True, "append_images": frames[1:], "duration": 100})]:
        buffer = io.BytesIO()
        (picture if name == "still" else frames[0]).save(buffer, "AVIF", **options)
        out[name] = buffer.getvalue()
    return out


@pytest.mark.parametrize("mode", ["structure", "decode"])
def test_avif_is_accepted_by_default_and_checked(tmp_path, mode):
    defaults = Settings()
    assert "AVIF" in defaults.allowed_formats
    limits = {"max_pixels": defaults.max_pixels, "allowed_formats": frozenset(defaults.allowed_formats), "mode": mode}
    still, animated = avif_variants()["still"], avif_variants()["animated"]
    info = validate_image(written(tmp_path, still), **limits)
    assert (info.format, info.content_type, info.width, info.height, info.frames) == ("AVIF", "image/avif", 90, 60, 1)
    assert content_type_of(written(tmp_path, still)) == "image/avif"
    assert validate_image(animated, **limits).frames == 3
    with pytest.raises(InvalidImage, match=r"too many frames \(3 over 2\)"):
        validate_image(animated, **limits | {"max_frames": 2})
    with pytest.raises(InvalidImage, match=r"too many pixels \(90x60 over 5000\)"):
        validate_image(still, **limits | {"max_pixels": 5000})
    for cut in (len(still) // 2, len(still) - 1):
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            validate_image(written(tmp_path, still[:cut]), **limits)
    # The AV1 data cut short with its box's size rewritten to match: the boxes add up, and only a decode
    # follows the item's extent into the missing bytes (structure mode's known blind spot).
    mdat = still.rindex(b"mdat") - 4
    rewritten = still[:mdat] + (20).to_bytes(4, "big") + still[mdat + 4:mdat + 20]
    if mode == "decode":
        with pytest.raises(InvalidImage, match="truncated or corrupt"):
            validate_image(rewritten, **limits)
    else:
        assert validate_image(rewritten, **limits).width == 90


def test_decode_mode_catches_damaged_pixel_data_that_structure_mode_lets_through(tmp_path):
    """What CASIMG_VALIDATION=decode is for: a PNG whose compressed pixels are damaged but whose chunks,
    lengths and CRCs are all intact (the CRC recomputed over the damage, as a broken encoder writes it)."""
    whole = image_bytes(21, "png", (120, 80))
    at = whole.index(b"IDAT") - 4
    length = int.from_bytes(whole[at:at + 4], "big")
    data = bytearray(whole[at + 8:at + 8 + length])
    data[2:] = bytes(len(data) - 2)  # keep the zlib header, zero the deflate stream after it
    chunk = b"IDAT" + bytes(data)
    damaged = whole[:at + 4] + chunk + zlib.crc32(chunk).to_bytes(4, "big") + whole[at + 12 + length:]
    assert len(damaged) == len(whole)
    path = written(tmp_path, damaged)
    assert validate_image(path, mode="structure", **LIMITS).width == 120  # every chunk checks out
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        validate_image(path, mode="decode", **LIMITS)


# -- a plain JPEG's header read without Pillow (validation._plain_jpeg_size) --------------------------

def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _jpeg(mode: str = "RGB", size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 90, 10)[:len(mode)] if mode != "L" else 120).save(out, "JPEG", **save)
    return out.getvalue()


def _after_soi(data: bytes, *segments: bytes) -> bytes:
    return data[:2] + b"".join(segments) + data[2:]


def _replace_sof(data: bytes, payload: bytes) -> bytes:
    at = data.index(b"\xff\xc0") if b"\xff\xc0" in data else data.index(b"\xff\xc2")
    end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return data[:at] + _segment(data[at + 1], payload) + data[end:]


def _sof(data: bytes) -> bytes:
    at = data.index(b"\xff\xc0") if b"\xff\xc0" in data else data.index(b"\xff\xc2")
    return data[at + 4:at + 2 + int.from_bytes(data[at + 2:at + 4], "big")]


def _outcome(data: bytes) -> object:
    try:
        return validate_image(data, **LIMITS)
    except InvalidImage as exc:
        return f"refused: {exc}"


def _with_and_without_the_plain_read(data: bytes, monkeypatch) -> tuple[object, object]:
    read = _outcome(data)
    with monkeypatch.context() as patched:
        patched.setattr(validation, "_plain_jpeg_size", lambda data: None)  # Pillow reads every header
        return read, _outcome(data)


def _exif(dpi: bool = False) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "casimg"  # Make
    if dpi:
        exif[0x0128], exif[0x011A] = 2, 300.0
    return exif.tobytes()


PLAIN = {
    "baseline, JFIF": _jpeg(),
    "progressive, optimized": _jpeg(progressive=True, optimize=True),
    "grey": _jpeg("L"),
    "CMYK, Adobe segment": _jpeg("CMYK"),
    "ICC profile, EXIF, JFIF density": _jpeg(icc_profile=b"\0" * 300, exif=_exif(), dpi=(96, 96)),
    "restart markers": _jpeg(restart_marker_blocks=1),
    "a comment": _jpeg(comment=b"made by casimg's tests"),
    "60 Mpx declared, over max_pixels": _replace_sof(
        _jpeg(), bytes([8, 0x17, 0x70, 0x27, 0x10, 3]) + _sof(_jpeg())[6:]),
    "200 Mpx declared, over Pillow's backstop": _replace_sof(
        _jpeg(), bytes([8, 0x27, 0x10, 0x4E, 0x20, 3]) + _sof(_jpeg())[6:]),
    "no rows": _replace_sof(_jpeg(), bytes([8, 0, 0, 0, 64, 3]) + _sof(_jpeg())[6:]),
    "exactly Pillow's backstop (5461x32770)": _replace_sof(
        _jpeg(), bytes([8, 0x80, 0x02, 0x15, 0x55, 3]) + _sof(_jpeg())[6:]),
}
NOT_AN_IMAGE = "refused: not an image"  # what Pillow's open says of a header its JPEG reader refuses
LEFT_TO_PILLOW = {  # each with what Pillow's open makes of it: a refusal, or (width, height, frames)
    "EXIF without a JFIF density": (_jpeg(exif=_exif(dpi=True)), (64, 48, 1)),
    "EXIF whose DPI is no number": (_jpeg(exif=_exif()[:-4] + b"\xff\xff\xff\xff"), (64, 48, 1)),
    "MPO, two pictures": (None, (32, 24, 2)),
    "Photoshop resources cut short": (
        _after_soi(_jpeg(), _segment(0xED, b"Photoshop 3.0\0" + b"8BIM\x03\xed")), NOT_AN_IMAGE),
    "JFIF segment too short": (_after_soi(_jpeg(), _segment(0xE0, b"JFIF\0\x01")), NOT_AN_IMAGE),
    "Adobe segment too short": (_after_soi(_jpeg("CMYK"), _segment(0xEE, b"Adobe\0")), NOT_AN_IMAGE),
    "ICC piece without its sequence bytes": (
        _after_soi(_jpeg(), _segment(0xE2, b"ICC_PROFILE\0\x01")), NOT_AN_IMAGE),
    "quantization table cut short": (_after_soi(_jpeg(), _segment(0xDB, b"\x00" + b"\x01" * 40)), NOT_AN_IMAGE),
    "12-bit components": (_replace_sof(_jpeg(), b"\x0c" + _sof(_jpeg())[1:]), NOT_AN_IMAGE),
    "two components": (
        _replace_sof(_jpeg("L"), _sof(_jpeg("L"))[:5] + b"\x02" + _sof(_jpeg("L"))[6:] * 2), NOT_AN_IMAGE),
    "a component cut short": (_replace_sof(_jpeg(), _sof(_jpeg()) + b"\x04"), NOT_AN_IMAGE),
    "an unknown marker": (_after_soi(_jpeg(), _segment(0x02, b"reserved")), NOT_AN_IMAGE),
    "a hierarchical marker": (
        _after_soi(_jpeg(), _segment(0xDE, bytes([8, 0, 48, 0, 64, 3]) + _sof(_jpeg())[6:])), (64, 48, 1)),
    "fill bytes": (_jpeg()[:2] + b"\xff\xff\xff" + _jpeg()[2:], (64, 48, 1)),
    "two frame headers": (
        _after_soi(_jpeg(), _segment(0xC0, bytes([8, 0, 9, 0, 9, 1, 1, 0x11, 0]))), (64, 48, 1)),
}


def _mpo() -> bytes:
    out = io.BytesIO()
    first, second = (Image.new("RGB", (32, 24), colour) for colour in ("red", "blue"))
    first.save(out, "MPO", save_all=True, append_images=[second])
    return out.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, for the 179 Mpx one
@pytest.mark.parametrize("name", sorted(PLAIN))
def test_a_plain_jpeg_header_is_read_without_pillow_to_the_same_result(name, monkeypatch):
    data = PLAIN[name]
    assert validation._plain_jpeg_size(data) is not None
    read, by_pillow = _with_and_without_the_plain_read(data, monkeypatch)
    assert read == by_pillow


def test_the_plain_read_gives_the_frame_header_size():
    assert validate_image(_jpeg(size=(301, 17)), **LIMITS) == validation.ImageInfo("JPEG", "image/jpeg", 301, 17)
    assert _outcome(PLAIN["no rows"]) == "refused: not an image"
    assert _outcome(PLAIN["60 Mpx declared, over max_pixels"]).startswith("refused: too many pixels (10000x6000")
    assert _outcome(PLAIN["200 Mpx declared, over Pillow's backstop"]) == "refused: too many pixels"
    assert Image.MAX_IMAGE_PIXELS * 2 == 5461 * 32770  # at it, not over: max_pixels refuses it
    assert _outcome(PLAIN["exactly Pillow's backstop (5461x32770)"]) == (
        "refused: too many pixels (5461x32770 over 50000000)")


@pytest.mark.parametrize("name", sorted(LEFT_TO_PILLOW))
def test_a_jpeg_header_with_anything_else_is_left_to_pillow(name):
    data, expected = LEFT_TO_PILLOW[name]
    data = data or _mpo()
    assert validation._plain_jpeg_size(data) is None
    if isinstance(expected, tuple):
        width, height, frames = expected
        expected = validation.ImageInfo("JPEG", "image/jpeg", width, height, frames)
    assert _outcome(data) == expected


def test_a_jpeg_its_reader_refuses_is_not_read_as_another_format(tmp_path):
    """Pillow, left to itself, tries every reader once the JPEG one refuses a file, and some check no
    signature: this JPEG without rows, with "PCD_" at byte 2048, opened as a Kodak Photo CD (768x512),
    and was stored although PCD is not an allowed format."""
    image = _replace_sof(_jpeg(), bytes([8, 0, 0, 0, 64, 3]) + _sof(_jpeg())[6:])
    data = image[:2] + _segment(0xFE, b"\0" * 2042 + b"PCD_" + b"\0" * 1600) + image[2:]
    assert data[2048:2052] == b"PCD_"
    for lifted in (False, True):  # with the plain read, and with Pillow reading every header
        with pytest.MonkeyPatch.context() as patched:
            if lifted:
                patched.setattr(validation, "_plain_jpeg_size", lambda data: None)
            assert _outcome(data) == NOT_AN_IMAGE
            with pytest.raises(InvalidImage, match=r"^not an image$"):
                validate_image(written(tmp_path, data), max_pixels=50_000_000)  # any format allowed


def test_jpeg_headers_with_random_damage_read_the_same_with_and_without_pillow(monkeypatch):
    """Bytes of a header changed at random (a seeded sample): whatever the plain read accepts, Pillow
    gives the same size and frames for; whatever Pillow refuses, the plain read left to it."""
    import random

    chance = random.Random(20261203)
    bases = [PLAIN["ICC profile, EXIF, JFIF density"], PLAIN["CMYK, Adobe segment"], PLAIN["progressive, optimized"]]
    plain = damaged = 0
    for trial in range(3000):
        base = bytearray(bases[trial % len(bases)])
        header_end = base.index(b"\xff\xda")
        for _ in range(chance.randint(1, 3)):
            base[chance.randrange(2, header_end)] = chance.choice((0, 1, 2, 3, 8, 12, 0xFF, chance.randrange(256)))
        data = bytes(base)
        read, by_pillow = _with_and_without_the_plain_read(data, monkeypatch)
        assert read == by_pillow, (trial, data[:header_end].hex())
        plain += validation._plain_jpeg_size(data) is not None if not str(read).startswith("refused") else 0
        damaged += str(by_pillow).startswith("refused")
    assert plain > 1000 and damaged > 200  # both kinds were met, many times
