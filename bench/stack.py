"""The casimg under test: a Redis like the one casimg embeds, and `casimg serve` processes on it, all
with one admin key."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from bench import log
from bench.procs import ROOT, Popen, Procs, free_port, start_redis_server, start_serve, tree_cpu, wait_settled

BENCH_KEY = "bench_" + secrets.token_hex(16)  # one admin key for every server of the run (bootstrap)


@dataclass
class Casimg:
    proc: Popen
    port: int
    key: str
    data_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_redis(procs: Procs, directory: Path, persistent: bool) -> tuple[Popen, str]:
    """A redis-server like casimg's embedded one (AOF, everysec) or, for the listing fill, without AOF."""
    from casimg.embedded import COMPACT_HASH_ENTRIES, COMPACT_HASH_VALUE, COMPACT_ZSET_ENTRIES, COMPACT_ZSET_VALUE

    proc = procs.add(start_redis_server(
        directory, "--unixsocketperm", "700", "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "everysec", "--hash-max-ziplist-entries", str(COMPACT_HASH_ENTRIES),
        "--hash-max-ziplist-value", str(COMPACT_HASH_VALUE), "--zset-max-ziplist-entries", str(COMPACT_ZSET_ENTRIES),
        "--zset-max-ziplist-value", str(COMPACT_ZSET_VALUE), new_session=True))
    return proc, f"unix://{directory / 'redis.sock'}"


def start_casimg(procs: Procs, data_dir: Path, redis_url: str, *, workers: bool = True,
                 extra_env: dict[str, str] | None = None, key_prefix: str = "casimg:",
                 processes: int = 1) -> Casimg:
    """`casimg serve` on `data_dir` and the Redis at `redis_url`, configured through its environment;
    returned once it has finished starting (``wait_settled``: its render pool and filler start after its
    first answer), so that a run timed from then measures the work, not the start."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "CASIMG_DATA_DIR": str(data_dir), "CASIMG_PORT": str(port), "CASIMG_REDIS_URL": redis_url,
        "CASIMG_BOOTSTRAP_KEY": BENCH_KEY, "CASIMG_ALLOW_NETWORKS": "127.0.0.0/8", "CASIMG_KEY_PREFIX": key_prefix,
        "CASIMG_WORKERS": "true" if workers else "false",
        # One key drives thousands of requests a second here, which the per-key rate limit exists to refuse.
        "CASIMG_RATE_LIMIT": "0",
        # The corpus comes from one local address at thousands of images a second: a real per-origin rate
        # would measure the rate, not casimg. This one never binds, but each URL still takes its token.
        "CASIMG_ORIGIN_RATE": "1000000", "CASIMG_ORIGIN_BURST": "1000000", **(extra_env or {}),
    }
    args = ["--processes", str(processes)]  # explicit: the default is one per core
    proc = procs.add(start_serve(args, port, data_dir.parent / f"casimg-{port}.log", env=env, cwd=ROOT,
                                 new_session=True))
    answering = tree_cpu(proc.pid)
    waited = wait_settled(proc)
    log(f"  casimg on port {port} answered after {answering:.2f} s of CPU, and finished starting {waited:.1f} s "
        f"and {tree_cpu(proc.pid) - answering:.2f} s of CPU later")
    return Casimg(proc, port, BENCH_KEY, data_dir)
