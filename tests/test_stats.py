"""casimg stats: the figures, from a real index, queue and blob store."""

from __future__ import annotations

import json

import pytest

from casimg.index import Index
from casimg.queue import JobQueue
from casimg.schema import KeySpace
from casimg.stats import collect, human_bytes
from tests.origin import image_bytes


@pytest.mark.gen_test(timeout=60)
async def test_stats_count_urls_blobs_bytes_dedup_queue_and_jobs(api, services, origin):
    empty = await collect(services.index, services.queue, services.blobs)
    assert (empty.urls, empty.blobs, empty.bytes_on_disk, empty.dedup_ratio) == (0, 0, 0, 1.0)
    urls = [origin.url("/img/600.png"), origin.url("/dup/s1.jpg"), origin.url("/dup/s2.jpg"),
            origin.url("/dup/s3.jpg"), origin.url("/status/404")]
    assert (await api("POST", "/api/images?wait=30", json_body={"image_urls": urls})).code == 200

    found = await collect(services.index, services.queue, services.blobs)
    assert (found.urls, found.blobs, found.blob_files) == (4, 2, 2)
    assert found.bytes_on_disk == len(image_bytes(600, "png")) + len(image_bytes(999_999))
    assert found.dedup_ratio == 2.0
    assert (found.queue_waiting, found.queue_in_progress) == (0, 0)
    assert found.jobs == {"queued": 0, "running": 0, "done": 1}
    lines = found.lines()
    assert "dedup ratio:   2.00 URLs per blob" in lines and "jobs:          0 queued, 0 running, 1 done" in lines
    assert json.loads(json.dumps(found.as_json()))["dedup_ratio"] == 2.0


@pytest.mark.gen_test(timeout=60)
async def test_jobs_waiting_in_the_queue_are_counted(services, settings):
    # A key space no worker reads, so the entries stay waiting.
    keys = KeySpace(settings.key_prefix + "idle:")
    queue = JobQueue(services.redis, keys, 60)
    await queue.ensure_group()
    await queue.submit(["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"])
    found = await collect(Index(services.redis, keys), queue, services.blobs)
    assert (found.queue_waiting, found.queue_in_progress) == (2, 0)
    assert found.jobs == {"queued": 1, "running": 0, "done": 0}


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 15 * 1024**3)] == ["0 B", "1023 B", "1.0 KiB", "15.0 GiB"]
