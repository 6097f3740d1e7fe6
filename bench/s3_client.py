"""Which async S3 client the s3 driver uses: aiobotocore against obstore, measured against moto.

    .venv/bin/pip install aiobotocore      # the other candidate; casimg does not depend on it
    .venv/bin/python -m bench.s3_client --objects 300 --size 102400 --concurrency 16 --rounds 2

Each client puts `objects` distinct objects of `size` bytes with ``If-None-Match: *`` (the driver's
commit), `concurrency` at once, to a moto_server on loopback, in interleaved rounds (a-b-b-a). Reported
per client: puts per second and the client process's CPU per put (process time: every thread, obstore's
Rust runtime included; moto runs in its own process and is not counted). moto is an emulator that spends
far more CPU per request than the client, so the puts per second are moto's ceiling as much as the
client's; the CPU per put is the client's own figure. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.procs import free_port, start_moto, stop

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


async def with_aiobotocore(endpoint: str, payloads: list[bytes], prefix: str, concurrency: int) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=concurrency, request_checksum_calculation="when_required",
                       response_checksum_validation="when_required")
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=config,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    ) as client:
        if prefix == "warm/a/":
            await client.create_bucket(Bucket=BUCKET)

        async def put(n: int, data: bytes) -> None:
            await client.put_object(Bucket=BUCKET, Key=f"{prefix}{n}", Body=data, IfNoneMatch="*")

        await _all(put, payloads, concurrency)


async def with_obstore(endpoint: str, payloads: list[bytes], prefix: str, concurrency: int) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", virtual_hosted_style_request=False,
                    access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], client_options={"allow_http": True})

    async def put(n: int, data: bytes) -> None:
        await obstore.put_async(store, f"{prefix}{n}", data, mode="create")

    await _all(put, payloads, concurrency)


async def _all(put: Callable[[int, bytes], Awaitable[None]], payloads: list[bytes], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int, data: bytes) -> None:
        async with gate:
            await put(n, data)

    await asyncio.gather(*(one(n, data) for n, data in enumerate(payloads)))


CLIENTS = {"aiobotocore": with_aiobotocore, "obstore": with_obstore}


def measure(client: str, endpoint: str, payloads: list[bytes], prefix: str, concurrency: int) -> tuple[float, float]:
    """(puts/s, client CPU ms per put) of one run."""
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(CLIENTS[client](endpoint, payloads, prefix, concurrency))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(payloads) / wall, cpu * 1000 / len(payloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--size", type=int, default=100 * 1024)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        moto = start_moto(port, Path(work) / "moto.log", new_session=True)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            warm = [os.urandom(args.size) for _ in range(20)]
            for name in ("aiobotocore", "obstore"):  # the bucket, the imports, the first connections
                measure(name, endpoint, warm, f"warm/{name[0]}/", args.concurrency)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
            for round_number in range(args.rounds):
                for name in ("aiobotocore", "obstore", "obstore", "aiobotocore"):
                    payloads = [os.urandom(args.size) for _ in range(args.objects)]
                    prefix = f"r{round_number}/{name}/{len(results[name])}/"
                    results[name].append(measure(name, endpoint, payloads, prefix, args.concurrency))
        finally:
            stop(moto)
    print(f"| client | puts/s (median of {2 * args.rounds}) | client CPU ms per put | runs (puts/s) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        rates = ", ".join(f"{rate:.0f}" for rate, _ in runs)
        print(f"| {name} | {statistics.median(r for r, _ in runs):.0f} "
              f"| {statistics.median(c for _, c in runs):.2f} | {rates} |")


if __name__ == "__main__":
    main()
