"""The storage drivers' own cost per stored image: the file driver against the s3 driver on moto.

    .venv/bin/python -m bench.s3_store --images 300 --size 102400 --concurrency 16 --rounds 2

In one process, with a real redis-server and a `moto_server` behind a counting loopback proxy (both on
loopback), each driver stores `images` distinct contents under new URLs (``lifecycle.store_blob``, the
worker's store step: claim, upload, index, unclaim for s3; link, flush, index, settle for files), then
the same contents again under other URLs (a repeat), in interleaved rounds. No download and no
validation: what is measured is the driver and the index. Reported per image: this process's CPU
(every thread, obstore's included; moto and Redis run apart and are not counted), the requests that
reached the endpoint, and the bytes sent to it. moto is an emulator: its requests per second say
nothing of a real object store, and none are reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import S3Proxy, free_port, start_moto, start_redis_server, stop

BUCKET = "bench"
CREDENTIALS = {"access_key_id": "bench", "secret_access_key": "bench-secret"}


async def one_pass(store: Any, index: Any, contents: list[bytes], tag: str, concurrency: int) -> float:
    """Store every content under a new URL; the CPU seconds this process spent."""
    from casimg.index import BlobMeta
    from casimg.lifecycle import store_blob

    gate = asyncio.Semaphore(concurrency)

    async def one(n: int, data: bytes) -> None:
        async with gate:
            tmp, digest = await asyncio.to_thread(store.write_temp, data)
            await store_blob(store, index, tmp, f"http://origin/{tag}/{n}", digest,
                             BlobMeta(len(data), "image/jpeg", 1, 1))

    started = time.process_time()
    await asyncio.gather(*(one(n, data) for n, data in enumerate(contents)))
    return time.process_time() - started


async def run_driver(kind: str, work: Path, redis_url: str, endpoint: str, contents: list[bytes],
                     concurrency: int, label: str) -> tuple[float, float]:
    """(CPU ms per new image, CPU ms per repeat image) for one driver."""
    from casimg.index import Index
    from casimg.schema import KeySpace
    from casimg.services import connect_redis
    from casimg.storage.file import FileStore
    from casimg.storage.s3 import S3Store

    client = connect_redis(redis_url, concurrency + 8)
    index = Index(client, KeySpace(f"bench-{label}:"))
    store: Any
    if kind == "file":
        store = FileStore(work / f"data-{label}")
    else:
        store = S3Store(work / f"tmp-{label}", bucket=BUCKET, prefix=f"{label}/", endpoint=endpoint,
                        credentials=CREDENTIALS)
    store.create_dirs()
    try:
        new = await one_pass(store, index, contents, "new", concurrency)
        repeat = await one_pass(store, index, contents, "repeat", concurrency)
    finally:
        await store.close()
        await client.aclose()
    return new * 1000 / len(contents), repeat * 1000 / len(contents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=100 * 1024)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "redis").mkdir()
        redis_proc = start_redis_server(work / "redis")
        port = free_port()
        moto = start_moto(port, work / "moto.log", new_session=True)
        proxy = S3Proxy(f"http://127.0.0.1:{port}")
        try:
            import urllib.request
            urllib.request.urlopen(urllib.request.Request(f"{proxy.endpoint}/{BUCKET}", method="PUT")).close()
            redis_url = f"unix://{work / 'redis' / 'redis.sock'}"
            cpu: dict[str, list[tuple[float, float]]] = {"file": [], "s3": []}
            direct = f"http://127.0.0.1:{port}"  # the proxy's threads would count as this process's CPU
            for round_number in range(args.rounds):
                for kind in ("file", "s3", "s3", "file"):
                    contents = [os.urandom(args.size) for _ in range(args.images)]
                    label = f"{kind}{round_number}{len(cpu[kind])}"
                    cpu[kind].append(asyncio.run(run_driver(kind, work, redis_url, direct, contents,
                                                            args.concurrency, label)))
            contents = [os.urandom(args.size) for _ in range(args.images)]
            asyncio.run(run_driver("s3", work, redis_url, proxy.endpoint, contents, args.concurrency, "counted"))
            half = len(proxy.seen)
        finally:
            proxy.close()
            stop(moto)
            stop(redis_proc)
    print(f"{args.images} images of {args.size} bytes, {args.concurrency} at once, {args.rounds} rounds "
          "(moto_server is an emulator: no throughput is claimed for S3)\n")
    print("| driver | CPU ms per new image | CPU ms per repeat image | runs (new) |")
    print("|---|---|---|---|")
    for kind, runs in cpu.items():
        print(f"| {kind} | {statistics.median(n for n, _ in runs):.2f} | {statistics.median(r for _, r in runs):.2f} "
              f"| {', '.join(f'{n:.2f}' for n, _ in runs)} |")
    new = proxy.seen[1:half]  # the first request made the bucket
    puts = sum(1 for method, _, _ in new if method == "PUT")
    sent = sum(int({k.lower(): v for k, v in h.items()}.get("content-length") or 0) for _, _, h in new)
    print(f"\ns3, counted through a loopback proxy: {len(new) / args.images:.2f} requests per image over a new "
          f"and a repeat pass of {args.images} ({puts} PUTs), {sent / args.images / 1024:.0f} KiB sent per image")

if __name__ == "__main__":
    main()
