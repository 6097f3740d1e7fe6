"""What the index and the service hold in memory: Redis bytes per indexed URL, split by key family, and
the resident memory of a casimg process with the server processes it forked."""

from __future__ import annotations

from pathlib import Path

import redis

from bench.procs import Popen, status_kib


def redis_used_memory(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).info("memory")["used_memory"])


def index_memory(redis_url: str, size: int) -> dict[str, float]:
    """Bytes per URL of the URL buckets, of the blob buckets and of the newest-first order (its directory
    and leaves), and bytes of the count hash (MEMORY USAGE)."""
    from casimg.schema import BUCKETS, KeySpace

    keys, client = KeySpace(), redis.Redis.from_url(redis_url)
    leaves = list(client.scan_iter(keys.recent_leaf("*"), count=1000))
    with client.pipeline(transaction=False) as pipe:
        for bucket in BUCKETS:
            pipe.memory_usage(keys.url(bucket), samples=0).memory_usage(keys.blob(bucket), samples=0)
        for name in [keys.recent, *leaves]:
            pipe.memory_usage(name, samples=0)
        pipe.memory_usage(keys.count, samples=0)
        *sizes, count = pipe.execute()
    client.close()
    buckets, recent = sizes[:2 * len(BUCKETS)], sizes[2 * len(BUCKETS):]
    return {"url": sum(int(n or 0) for n in buckets[0::2]) / size,
            "blob": sum(int(n or 0) for n in buckets[1::2]) / size,
            "recent": sum(int(n or 0) for n in recent) / size, "count": int(count or 0)}


def service_rss_kib(proc: Popen) -> int:
    """RSS of the casimg process and its forked server processes (not the Redis it may start)."""
    total = status_kib(proc.pid, "VmRSS")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    if children.exists():
        for pid in children.read_text().split():
            try:
                if "casimg" in Path(f"/proc/{pid}/cmdline").read_text() or "python" in Path(
                        f"/proc/{pid}/cmdline").read_text():
                    total += status_kib(int(pid), "VmRSS")
            except OSError:
                pass
    return total
