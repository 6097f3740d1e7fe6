"""A real HTTP origin on 127.0.0.1 for the download path: generated images and hostile cases.

It runs in a thread of the test process (``with Origin() as origin: origin.url("/img/1.jpg")``) and
counts the hits on each path in ``origin.hits``, so tests can tell whether casimg fetched something
(``origin.agents`` keeps the User-Agent of each path's last request).

Paths:
  /img/N.EXT               an image generated from N (jpg, png, gif, webp, avif, bmp); distinct N, distinct bytes
                           (any query is ignored, so /img/N.jpg?copy=K is another URL for the same bytes;
                           ``?delay=S`` waits S seconds before answering, to keep an import in flight)
  /robots.txt              ``origin.robots_txt`` (a 404 while None), see ``Origin`` for its status and delay
  /tagged/N.jpg?tag=V      an image sent with one X-Robots-Tag header per ``tag`` value
  /dup/NAME.jpg            the same bytes whatever NAME is
  /file/NAME               ``origin.files[NAME]``: (bytes, content type) a test put there
  /animated.gif?frames=N   an animated GIF of N frames (``/animated.webp?frames=N``: the same as WebP)
  /oriented/O.jpg          a 60x30 JPEG, red on its left half and blue on its right as stored, with EXIF
                           orientation O (1-8): upright, it shows ``oriented_colours(O)``
  /alpha.png               a 40x30 RGBA PNG, opaque green on its left half and transparent on its right
  /photo/N.jpg?w=W&h=H     a photo-like JPEG of W x H pixels (gradient, shapes and grain), distinct for each N
  /status/CODE             that status (``?retry_after=S`` adds Retry-After)
  /flaky/KEY?fail=N&status=CODE   CODE for the first N hits on KEY, then an image
  /reset/KEY?fail=N        the connection is reset (TCP RST) for the first N hits on KEY, then an image
  /stall/KEY?fail=N&seconds=S   no answer for S seconds (default 30) on the first N hits on KEY, then an image
  /html                    an HTML page served as 200
  /truncated.jpg           a JPEG cut in half
  /bomb.png                a small PNG that declares 30000x30000 pixels
  /big?bytes=N             N bytes; ``&chunked=1`` sends them without a Content-Length
  /slow                    headers, then a byte every 100 ms for up to a minute
  /loop                    redirects to itself
  /redirect/N              a chain of N redirects ending at an image (``?delay=S``: each hop waits S seconds)
  /redirect-to?url=U       one redirect to U
  /redirect-raw?hex=H      one redirect whose Location is the bytes H (hex), written as they are: bytes
                           that are not UTF-8, or no valid URL at all
  /trickle/KEY?seconds=S   headers, then a byte every S seconds (default 5) for up to a minute

POST, a receiver of casimg's job callbacks:
  /hook/KEY?fail=N&status=CODE&stall=M&seconds=S   keeps each request's headers and body in
                           ``origin.posts[KEY]`` (before answering); no answer for S seconds (default 30) to
                           the first M, CODE (default 500) to the first N, then 200
"""

from __future__ import annotations

import io
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw

FORMATS = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "gif": ("GIF", "image/gif"),
           "webp": ("WEBP", "image/webp"), "avif": ("AVIF", "image/avif"), "bmp": ("BMP", "image/bmp")}
SLOW_LIMIT = 60.0  # seconds /slow keeps trickling before it gives up on its own


@lru_cache(maxsize=4096)
def image_bytes(seed: int, ext: str = "jpg", size: tuple[int, int] | None = None) -> bytes:
    """A small picture drawn from `seed`: its size and colours differ for every seed."""
    width, height = size or (48 + seed % 61, 32 + seed % 47)
    picture = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    draw = ImageDraw.Draw(picture)
    for i in range(6):
        x, y = (seed * (i + 3) * 7) % width, (seed * (i + 5) * 11) % height
        draw.rectangle((x, y, x + width // 3, y + height // 4), fill=((seed + i * 40) % 256, i * 40, 255 - i * 30))
    picture.putpixel((0, 0), (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256))
    buffer = io.BytesIO()
    picture.save(buffer, FORMATS[ext][0], **({"quality": 90} if ext == "jpg" else {}))
    return buffer.getvalue()


@lru_cache(maxsize=16)
def animated_gif(frames: int) -> bytes:
    images = [Image.new("P", (8, 8), i % 256) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=10, optimize=False)
    return buffer.getvalue()


@lru_cache(maxsize=16)
def animated_webp(frames: int) -> bytes:
    images = [Image.new("RGB", (16, 12), ((i * 60) % 256, 100, 200)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "WEBP", save_all=True, append_images=images[1:], duration=50, lossless=True)
    return buffer.getvalue()


@lru_cache(maxsize=8)
def oriented_jpeg(orientation: int) -> bytes:
    picture = Image.new("RGB", (60, 30), (255, 0, 0))
    picture.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def oriented_colours(orientation: int) -> tuple[str, str]:
    """(where red is, where blue is) in the upright picture of /oriented/O.jpg: left/right/top/bottom."""
    return {1: ("left", "right"), 2: ("right", "left"), 3: ("right", "left"), 4: ("left", "right"),
            5: ("top", "bottom"), 6: ("top", "bottom"), 7: ("bottom", "top"), 8: ("bottom", "top")}[orientation]


@lru_cache(maxsize=1)
def alpha_png() -> bytes:
    picture = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    picture.paste((0, 200, 0, 255), (0, 0, 20, 30))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


@lru_cache(maxsize=8)
def photo_jpeg(seed: int, width: int, height: int) -> bytes:
    picture = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for i in range(20):
        x, y = (seed * 7919 + i * 104729) % width, (seed * 104729 + i * 7919) % height
        radius = width // 12 + i
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=((seed + i * 50) % 256, i * 12, 200))
    picture = Image.blend(picture, Image.effect_noise((width, height), 30).convert("RGB"), 0.2)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def pixel_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header for a huge greyscale image, with a tiny IDAT: a few hundred bytes on the wire."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # tests read results, not access logs
        return

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.server.origin.count(path)
        self.server.origin.agents[path] = self.headers.get("User-Agent", "")
        self.server.origin.requests.append((time.monotonic(), path))
        segments = path.strip("/").split("/")
        head = segments[0]
        if head == "img" and len(segments) == 2 and "." in segments[1]:
            stem, ext = segments[1].rsplit(".", 1)
            if ext in FORMATS and stem.isdigit():
                if "delay" in query:
                    self.server.stopping.wait(float(query["delay"]))
                size = (int(query["w"]), int(query["h"])) if "w" in query else None  # ?w=&h=: a big picture
                return self.send(200, image_bytes(int(stem), ext, size), FORMATS[ext][1])
        if path == "/robots.txt":
            origin = self.server.origin
            if origin.robots_stall:
                self.server.stopping.wait(origin.robots_stall)
            if origin.robots_txt is None:
                return self.send(origin.robots_status or 404, b"no robots.txt", "text/plain")
            return self.send(origin.robots_status or 200, origin.robots_txt.encode(), "text/plain")
        if head == "tagged" and len(segments) == 2:  # /tagged/N.jpg?tag=V&tag=W: an image with X-Robots-Tag V, W
            tags = parse_qs(parts.query).get("tag", [])
            return self.send(200, image_bytes(int(segments[1].split(".")[0])), "image/jpeg",
                             headers=[("X-Robots-Tag", tag) for tag in tags])
        if head == "file" and len(segments) == 2 and segments[1] in self.server.origin.files:
            return self.send(200, *self.server.origin.files[segments[1]])
        if head == "dup":
            return self.send(200, image_bytes(999_999), "image/jpeg")
        if head == "animated.gif":
            return self.send(200, animated_gif(int(query.get("frames", "2"))), "image/gif")
        if head == "animated.webp":
            return self.send(200, animated_webp(int(query.get("frames", "2"))), "image/webp")
        if head == "oriented" and len(segments) == 2:
            return self.send(200, oriented_jpeg(int(segments[1].split(".")[0])), "image/jpeg")
        if head == "alpha.png":
            return self.send(200, alpha_png(), "image/png")
        if head == "photo" and len(segments) == 2:
            picture = photo_jpeg(int(segments[1].split(".")[0]), int(query.get("w", "800")), int(query.get("h", "600")))
            return self.send(200, picture, "image/jpeg")
        if head == "status" and len(segments) == 2:
            extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
            return self.send(int(segments[1]), b"status page", "text/plain", extra)
        if head == "flaky" and len(segments) == 2:
            if self.server.origin.count("flaky:" + segments[1]) <= int(query.get("fail", "1")):
                extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
                return self.send(int(query.get("status", "503")), b"try later", "text/plain", extra)
            return self.send(200, image_bytes(zlib.crc32(segments[1].encode()) % 100_000), "image/jpeg")
        if head == "reset" and len(segments) == 2:
            if self.server.origin.count("reset:" + segments[1]) <= int(query.get("fail", "1")):
                return self.reset()
            return self.send(200, image_bytes(zlib.crc32(segments[1].encode()) % 100_000), "image/jpeg")
        if head == "stall" and len(segments) == 2:
            if self.server.origin.count("stall:" + segments[1]) <= int(query.get("fail", "1")):
                self.server.stopping.wait(float(query.get("seconds", "30")))
                self.close_connection = True
                return
            return self.send(200, image_bytes(zlib.crc32(segments[1].encode()) % 100_000), "image/jpeg")
        if head == "html":
            return self.send(200, b"<!doctype html><title>not an image</title>", "text/html")
        if head == "truncated.jpg":
            whole = image_bytes(7, "jpg", (400, 300))
            return self.send(200, whole[: len(whole) // 2], "image/jpeg")
        if head == "bomb.png":
            return self.send(200, pixel_bomb(), "image/png")
        if head == "big":
            return self.send_big(int(query.get("bytes", "1000")), query.get("chunked") == "1")
        if head == "slow":
            return self.send_slow()
        if head == "loop":
            return self.redirect(path)
        if head == "redirect" and len(segments) == 2 and segments[1].isdigit():
            left = int(segments[1])
            suffix = ""
            if "delay" in query:
                self.server.stopping.wait(float(query["delay"]))
                suffix = f"?delay={query['delay']}"
            return self.redirect(f"/redirect/{left - 1}{suffix}") if left > 0 else \
                self.send(200, image_bytes(123_456), "image/jpeg")
        if head == "redirect-to":
            return self.redirect(query["url"])
        if head == "redirect-raw":
            return self.send_raw(b"HTTP/1.1 302 Found\r\nLocation: " + bytes.fromhex(query["hex"]) +
                                 b"\r\nContent-Length: 0\r\n\r\n")
        if head == "trickle" and len(segments) == 2:
            return self.send_slow(float(query.get("seconds", "5")))
        self.send(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        segments = parts.path.strip("/").split("/")
        if segments[0] != "hook" or len(segments) != 2:
            return self.send(404, b"not found", "text/plain")
        origin = self.server.origin
        with origin._lock:
            origin.posts.setdefault(segments[1], []).append(({k.lower(): v for k, v in self.headers.items()}, body))
        hit = origin.count("hook:" + segments[1])
        if hit <= int(query.get("stall", "0")):
            self.server.stopping.wait(float(query.get("seconds", "30")))
            self.close_connection = True
            return
        if hit <= int(query.get("fail", "0")):
            return self.send(int(query.get("status", "500")), b"not now", "text/plain")
        self.send(200, b"ok", "text/plain")

    def send(self, status: int, body: bytes, content_type: str,
             headers: dict[str, str] | list[tuple[str, str]] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers.items() if isinstance(headers, dict) else headers or []):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a killed casimg, say): not the origin's problem

    def reset(self) -> None:
        """Abort the connection with a TCP RST: SO_LINGER on, timeout 0, then close."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def redirect(self, location: str) -> None:
        self.send(302, b"", "text/plain", {"Location": location})

    def send_big(self, size: int, chunked: bool) -> None:
        block = b"\xff\xd8\xff" + b"\0" * (64 * 1024 - 3)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size))
        self.end_headers()
        sent = 0
        try:
            while sent < size:
                piece = block[: min(len(block), size - sent)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_raw(self, response: bytes) -> None:
        """A whole response written byte for byte: what http.server would refuse to spell."""
        self.wfile.write(response)
        self.close_connection = True

    def send_slow(self, interval: float = 0.1) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + SLOW_LIMIT
        try:
            while time.monotonic() < deadline and not self.server.stopping.is_set():
                self.wfile.write(b"1\r\n\0\r\n")
                self.wfile.flush()
                self.server.stopping.wait(interval)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    origin: Origin
    stopping: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client killed mid-request (the fault tests do that): nothing to report
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class Origin:
    """The origin server; a context manager that serves on 127.0.0.1 on a free port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        server_class = _Server6 if ":" in host else _Server
        self.server = server_class((host, 0), _Handler)
        self.server.origin = self
        self.server.stopping = threading.Event()
        self.host = host
        self.port = self.server.server_address[1]
        self.hits: Counter[str] = Counter()
        # /robots.txt: these rules (None: a 404), with this status if set, after this many seconds.
        self.robots_txt: str | None = None
        self.robots_status = 0
        self.robots_stall = 0.0
        self.requests: list[tuple[float, str]] = []  # (time.monotonic(), path) of every request, in order
        self.agents: dict[str, str] = {}  # path -> the User-Agent of its last request
        self.posts: dict[str, list[tuple[dict[str, str], bytes]]] = {}  # /hook/KEY: (headers, body) of each POST
        self.files: dict[str, tuple[bytes, str]] = {}  # /file/NAME: (body, content type)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.server.serve_forever, name="origin", daemon=True)

    def count(self, key: str) -> int:
        with self._lock:
            self.hits[key] += 1
            return self.hits[key]

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> Origin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
