"""The origin the ingest downloads from: the image set served on 8 loopback addresses, by nginx when it
is installed, else by an aiohttp static server (``python -m bench _origin PORT DIR``)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from bench.procs import Procs, free_port, start_nginx, wait_http

HOSTS = [f"127.0.0.{i}" for i in range(1, 9)]  # 8 origin hosts x casimg's 8 per host = its 64 downloads
PER_HOST = 8
CONCURRENCY = PER_HOST * len(HOSTS)


def start_origin(procs: Procs, work: Path, images: Path) -> tuple[int, str]:
    """The image origin on all HOSTS: nginx if installed, else an aiohttp static server. (port, kind)"""
    port = free_port()
    if shutil.which("nginx"):
        listens = " ".join(f"listen {host}:{port};" for host in HOSTS)
        server = f"""server {{ {listens}
          location /img/ {{ alias {images}/; }}
          location /dup/ {{ alias {images}/; }}
          location = / {{ return 200 "origin"; }} }}"""
        procs.add(start_nginx(work / "nginx-origin", server, [port], new_session=True))
        return port, "nginx 1 worker"
    procs.start([sys.executable, "-m", "bench", "_origin", str(port), str(images)], work / "origin.log")
    wait_http(f"http://127.0.0.1:{port}/")
    return port, "aiohttp static server (nginx not installed)"


def run_origin(port: int, images: str) -> None:
    """The aiohttp origin, in the process `python -m bench _origin` starts."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="origin"))
    app.router.add_static("/img/", images)
    app.router.add_static("/dup/", images)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for host in HOSTS:
            await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_image_set(procs: Procs, work: Path, images: Path) -> tuple[int, str]:
    """The origin (start_origin) serving the image set in the directory `images` under /img/; (port, kind)."""
    served = work / "images"
    served.symlink_to(images.resolve())
    images.resolve().chmod(0o755)
    return start_origin(procs, work, served)


def image_url(port: int, number: int, name: str, prefix: str = "img") -> str:
    """The URL of image `name` of the set, the `number`th URL spread over the origin's HOSTS."""
    return f"http://{HOSTS[number % len(HOSTS)]}:{port}/{prefix}/{name}"


def image_urls(port: int, files: list[tuple[str, int]]) -> tuple[list[str], list[str], dict[str, int]]:
    """The URLs of a job of the whole set, one per image; of a job of the same size whose second half
    names the first half's images again (under /dup/, another URL for the same bytes); and the size of
    each URL's body."""
    urls = [image_url(port, n, name) for n, (name, _) in enumerate(files)]
    sizes = {url: size for url, (_, size) in zip(urls, files, strict=True)}
    half = files[: len(files) // 2]
    duplicates = urls[: len(half)] + [image_url(port, n + 1, name, "dup") for n, (name, _) in enumerate(half)]
    sizes.update({image_url(port, n + 1, name, "dup"): size for n, (name, size) in enumerate(half)})
    return urls, duplicates, sizes
