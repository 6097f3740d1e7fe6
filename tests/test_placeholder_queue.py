"""The placeholder queue and the filler's loop, in the test's IOLoop (conftest's services run the loop as
a filler process does): what happens to contents whose placeholder cannot be made."""

from __future__ import annotations

import asyncio
import os

import pytest

from casimg.fsck import fsck
from casimg.index import BlobMeta

META = BlobMeta(size=12, content_type="image/png", width=1, height=1)


async def until_empty(services) -> None:
    for _ in range(400):
        if not await services.placeholders.pending():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the placeholder queue did not empty")


@pytest.mark.gen_test(timeout=60)
async def test_undecodable_pixels_give_no_placeholder_once_and_a_lost_blob_none(services):
    blobs = services.blobs
    tmp, garbage = blobs.write_temp(b"not an image")  # indexed as if it had passed validation
    blobs.link_in(tmp, garbage)
    await services.index.store("http://x/garbage.png", garbage, META)
    tmp, lost = blobs.write_temp(b"bytes that go")
    blobs.link_in(tmp, lost)
    os.unlink(blobs.blob_path(lost))  # referenced, its bytes gone before the filler comes
    await services.index.store("http://x/lost.png", lost, META)
    await until_empty(services)

    # Undecodable: recorded as '' (none can be made), shown as null, and not queued again by fsck.
    raw = await services.redis.hget(services.index.keys.placeholder(garbage[:3]), bytes.fromhex(garbage))
    assert raw == "" and await services.index.placeholder_of(garbage) is None
    # Gone: the entry ends with nothing recorded, so fsck notes it (beside the missing blob).
    assert await services.redis.hexists(services.index.keys.placeholder(lost[:3]), bytes.fromhex(lost)) == 0
    report = await fsck(services.index, blobs)
    assert f"no placeholder for {lost}, and none queued" in report.notes
    assert not [note for note in report.notes if garbage in note]
