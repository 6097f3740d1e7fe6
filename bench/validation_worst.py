"""What the worst files cost validation: CPU seconds and memory over baseline, one fresh process each.

    .venv/bin/python -m bench.validation_worst              # hostile files, files just under the caps, normal images
    .venv/bin/python -m bench.validation_worst --modes structure --only hostile
    git worktree add /tmp/before <commit> && .venv/bin/python -m bench.validation_worst --code /tmp/before
    .venv/bin/python -m bench.validation_worst --only normal --against /tmp/before   # the two timed side by side

The hostile files are built in a temp dir, each the size of a real attack that fits under the default
CASIMG_MAX_IMAGE_BYTES (50 MiB): a JPEG of 10 million empty COM segments after its SOI, a WebP of 6
million empty RIFF chunks, a PNG of 2 million tEXt chunks after its IDAT, a GIF of 2 million frames.
Beside them, the costliest files that casimg's caps (casimg/validation.py) still let through. Each is
validated from its path (as a large download is) by ``validate_image`` in a new Python process with the
default settings; the process reports its CPU time and the growth of its peak RSS (VmHWM) over what it
had just before the call, with casimg and Pillow already imported. Normal images (a 1 Mpx picture with
edges and texture) are timed with timeit, in a new process too, from their bytes in memory.
``--code`` runs the casimg of another checkout (its validation, its default settings).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

# Run in the child: validate one file and print what it cost, as JSON.
# Peak RSS is read from VmHWM, which belongs to the new process image: ru_maxrss would start from the RSS of
# the forked copy of this (large) process.
CHILD = """
import json, sys, time
from casimg.config import Settings
from casimg.errors import InvalidImage
from casimg.validation import validate_image
settings = Settings()
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
path, mode = sys.argv[1], sys.argv[2]
before_rss = peak_kib()
before_cpu = time.process_time()
try:
    info = validate_image(path, max_pixels=settings.max_pixels, allowed_formats=frozenset(settings.allowed_formats),
                          max_frames=settings.max_frames, mode=mode)
    outcome = f"accepted ({info.format}, {info.frames} frame(s))"
except InvalidImage as refused:
    outcome = f"refused: {refused.reason}"
cpu = time.process_time() - before_cpu
peak = peak_kib()
print(json.dumps({"outcome": outcome, "cpu": cpu, "rss_kib": peak - before_rss}))
"""


# Run in the child: time validate_image on the bytes of each file named, print one JSON line per file. With
# a second checkout (--against), its casimg/validation.py is loaded beside this one and the two are timed
# in alternating rounds, each first in turn, so that a busy machine slows both alike.
TIMER = """
import importlib.util, json, sys, timeit
from pathlib import Path
from casimg.config import Settings
from casimg import validation
settings = Settings()
mode, against, names = sys.argv[1], sys.argv[2], sys.argv[3:]
modules = {"this": validation}
if against:
    spec = importlib.util.spec_from_file_location("against_validation", Path(against) / "casimg" / "validation.py")
    modules["against"] = sys.modules["against_validation"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules["against"])
allowed = frozenset(settings.allowed_formats)
for name in names:
    data = Path(name).read_bytes()
    best = {}
    for round in range(10):
        for key, module in sorted(modules.items(), reverse=round % 2 == 1):  # each goes first in turn
            def once():
                module.validate_image(data, max_pixels=settings.max_pixels, allowed_formats=allowed,
                                      max_frames=settings.max_frames, mode=mode)
            try:
                once()
            except Exception as refused:
                best[key] = str(refused)
                continue
            runs = 50 if mode == "structure" else 5
            best[key] = min(best.get(key, float("inf")), timeit.timeit(once, number=runs) / runs * 1000)
    print(json.dumps(best))
"""


def small_picture(fmt: str, size: tuple[int, int] = (64, 48), **options: object) -> bytes:
    picture = Image.new("RGB", size, (200, 80, 40))
    ImageDraw.Draw(picture).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=(20, 120, 220))
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def hostile_jpeg(segments: int = 10_000_000) -> bytes:
    """A real JPEG with `segments` empty comments (FF FE 00 02) between its SOI and the rest."""
    real = small_picture("JPEG")
    return real[:2] + b"\xff\xfe\x00\x02" * segments + real[2:]


def hostile_webp(chunks: int = 6_000_000) -> bytes:
    """A real lossy WebP followed by `chunks` empty chunks, the RIFF size covering them all."""
    real = small_picture("WEBP", quality=70)
    body = real[12:] + b"JUNK\x00\x00\x00\x00" * chunks
    return b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WEBP" + body


def hostile_png(chunks: int = 2_000_000) -> bytes:
    """A real PNG with `chunks` tEXt chunks (each a one-letter key and no text) between IDAT and IEND."""
    real = small_picture("PNG")
    iend = real.rindex(b"IEND") - 4
    return real[:iend] + png_chunk(b"tEXt", b"k\x00") * chunks + real[iend:]


def hostile_gif(frames: int = 2_000_000) -> bytes:
    """A GIF of `frames` one-pixel frames, each an image descriptor and a one-block LZW stream."""
    header = b"GIF89a" + (1).to_bytes(2, "little") * 2 + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + b"\x00\x00" * 2 + b"\x01\x00" * 2 + b"\x00" + b"\x02\x02\x44\x01\x00"
    return header + frame * frames + b"\x3b"


def dense_gif(frames: int, blocks_per_frame: int) -> bytes:
    """A real one-frame GIF followed by `frames` - 1 one-pixel frames, each of `blocks_per_frame` one-byte
    sub-blocks: the most blocks per byte (Pillow decodes only the first frame; the walk reads every block)."""
    real = small_picture("GIF")
    frame = b"\x2c" + b"\x00\x00" * 2 + b"\x01\x00" * 2 + b"\x00" + b"\x02" + b"\x01\x44" * blocks_per_frame + b"\x00"
    return real[:-1] + frame * (frames - 1) + b"\x3b"


def under_the_caps_png() -> bytes:
    """990 text chunks before IDAT (Pillow's open reads those) and 99,000 after it: under both chunk caps."""
    real = small_picture("PNG")
    idat, iend = real.index(b"IDAT") - 4, real.rindex(b"IEND") - 4
    text = png_chunk(b"tEXt", b"k\x00")
    return real[:idat] + text * 990 + real[idat:iend] + text * 99_000 + real[iend:]


# label -> (file name, builder); the first four are issue 13's, the rest the costliest the caps allow.
HOSTILE = {
    "JPEG, 10 million empty COM segments": ("worst.jpg", hostile_jpeg),
    "WebP, 6 million empty RIFF chunks": ("worst.webp", hostile_webp),
    "PNG, 2 million tEXt chunks after IDAT": ("worst.png", hostile_png),
    "GIF, 2 million frames": ("worst.gif", hostile_gif),
    "JPEG, 9,990 empty COM segments": ("under.jpg", lambda: hostile_jpeg(9_990)),
    "WebP, 99,990 empty RIFF chunks": ("under.webp", lambda: hostile_webp(99_990)),
    "PNG, 990 tEXt before IDAT, 99,000 after": ("under.png", under_the_caps_png),
    "GIF, 1,000 frames of 990 one-byte sub-blocks": ("under.gif", lambda: dense_gif(1_000, 990)),
}


def measure(code: Path, path: Path, mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], cwd=code, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def normal_images() -> dict[str, bytes]:
    """A 1 Mpx picture with edges and texture, saved as a camera or a web page would."""
    picture = Image.effect_mandelbrot((1200, 850), (-2.0, -1.2, 1.0, 1.2), 200).convert("RGB")
    picture = Image.merge("RGB", (picture.getchannel(0), picture.filter(ImageFilter.FIND_EDGES).getchannel(1),
                                  Image.linear_gradient("L").resize(picture.size)))
    out = {}
    for name, fmt, options in [("JPEG", "JPEG", {"quality": 85}), ("PNG", "PNG", {}),
                               ("WebP", "WEBP", {"quality": 80}), ("GIF", "GIF", {}),
                               ("AVIF", "AVIF", {"quality": 60})]:
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        out[name] = buffer.getvalue()
    return out


def time_normal(code: Path, against: Path | None, tmp: Path, mode: str) -> list[str]:
    paths = {}
    for name, data in normal_images().items():
        paths[name] = tmp / f"normal.{name.lower()}"
        paths[name].write_bytes(data)
    out = subprocess.run([sys.executable, "-c", TIMER, mode, str(against or ""), *map(str, paths.values())],
                         cwd=code, check=True, capture_output=True, text=True)
    rows = []
    for (name, path), line in zip(paths.items(), out.stdout.splitlines(), strict=True):
        got = json.loads(line)
        costs = [f"{got[key]:.3f}" if isinstance(got[key], float) else got[key]
                 for key in ("against", "this") if key in got]
        rows.append(f"| {name} | {path.stat().st_size / 1024:.0f} KB | {mode} | {' | '.join(costs)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="structure,decode", help="comma-separated validation modes")
    parser.add_argument("--only", choices=("hostile", "normal"), help="only the hostile files, or only normal images")
    parser.add_argument("--code", type=Path, default=ROOT, help="the casimg checkout to measure (default: this one)")
    parser.add_argument("--against", type=Path, help="another checkout whose validation normal images are also "
                        "timed with, in alternating rounds (its column comes first)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "normal":
            print("| file | size MB | mode | outcome | CPU s | peak RSS over baseline MB | of the file size |")
            print("|---|---|---|---|---|---|---|")
        for label, (name, build) in HOSTILE.items() if args.only != "normal" else ():
            path = Path(tmp) / name
            path.write_bytes(build())
            size = path.stat().st_size
            for mode in modes:
                got = measure(args.code, path, mode)
                extra = float(got["rss_kib"]) * 1024  # type: ignore[arg-type]
                print(f"| {label} | {size / MIB:.1f} | {mode} | {got['outcome']} | {got['cpu']:.2f} | "
                      f"{extra / MIB:.0f} | {extra / size:.2f}x |", flush=True)
            path.unlink()
        if args.only != "hostile":
            columns = ["--against, ms", "--code, ms"] if args.against else ["ms per validation"]
            print(f"\n| normal image | size | mode | {' | '.join(columns)} (best of 10 rounds) |")
            print("|---|---|---|" + "---|" * len(columns))
            for mode in modes:
                print("\n".join(time_normal(args.code, args.against, Path(tmp), mode)), flush=True)


if __name__ == "__main__":
    main()
