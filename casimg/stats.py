"""What an operator asks of a running casimg: how much is stored, how much is shared, what is waiting.

``casimg stats`` prints these; GET /metrics exports the same numbers as gauges (metrics.py). Every
figure comes from a fixed number of Redis calls, except the job counts (a SCAN over the job keys) and
the bytes on disk (a walk of the blob tree, run in a thread).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from casimg.index import Index
from casimg.queue import JobQueue
from casimg.storage import Storage


@dataclass(frozen=True)
class Stats:
    urls: int  # URLs in the index
    blobs: int  # distinct contents referenced by the index
    blob_files: int  # files in the blob tree (an orphan left by a crash counts here, not in `blobs`)
    bytes_on_disk: int  # sum of the blob files' sizes
    queue_waiting: int  # queue entries no worker has read yet
    queue_in_progress: int  # entries a worker has read and not finished
    jobs: dict[str, int]  # unexpired jobs by status: queued, running, done

    @property
    def dedup_ratio(self) -> float:
        """URLs per stored content: 1.0 when nothing is shared, 2.0 when each content serves two URLs."""
        return self.urls / self.blobs if self.blobs else 1.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "dedup_ratio": round(self.dedup_ratio, 4)}

    def lines(self) -> list[str]:
        jobs = ", ".join(f"{count} {status}" for status, count in self.jobs.items())
        return [
            f"urls:          {self.urls}",
            f"blobs:         {self.blobs} ({self.blob_files} files)",
            f"bytes on disk: {self.bytes_on_disk} ({human_bytes(self.bytes_on_disk)})",
            f"dedup ratio:   {self.dedup_ratio:.2f} URLs per blob",
            f"queue:         {self.queue_waiting} waiting, {self.queue_in_progress} in progress",
            f"jobs:          {jobs}",
        ]


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


async def collect(index: Index, queue: JobQueue, blobs: Storage) -> Stats:
    (urls, contents), depth, jobs, (files, size) = await asyncio.gather(
        index.sizes(),
        queue.depth(),
        queue.count_by_status(),
        blobs.usage(),
    )
    return Stats(urls=urls, blobs=contents, blob_files=files, bytes_on_disk=size,
                 queue_waiting=depth["waiting"], queue_in_progress=depth["in_progress"], jobs=jobs)
