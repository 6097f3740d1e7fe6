"""fsck in-process: every kind of problem it must report, and what --repair mends."""

from __future__ import annotations

import hashlib
import os

import pytest

from casimg.fsck import fsck
from casimg.index import BlobMeta, Index
from casimg.lifecycle import store_blob
from casimg.relations import Added, Relations, StoredVariant
from casimg.schema import Order, blob_key, url_bucket
from casimg.storage.file import FileStore
from tests.conftest import png
from tests.origin import image_bytes


async def put(blobs: FileStore, index: Index, url: str, data: bytes) -> str:
    tmp = blobs.tmp_dir / f"dl-{os.urandom(4).hex()}.part"
    tmp.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    meta = BlobMeta(size=len(data), content_type="image/png", width=4, height=3)
    await store_blob(blobs, index, tmp, url, digest, meta)
    return digest


@pytest.mark.gen_test
async def test_clean_store_has_no_problems_or_notes(world):
    blobs, index = world
    await put(blobs, index, "http://a/1", png(1))
    await put(blobs, index, "http://a/2", png(1))
    report = await fsck(index, blobs)
    assert report.ok and report.notes == []


@pytest.mark.gen_test
async def test_problems_are_reported_and_repair_mends_what_is_safe(world):
    blobs, index = world
    shared = await put(blobs, index, "http://a/1", png(1))
    await put(blobs, index, "http://a/2", png(1))
    lost = await put(blobs, index, "http://a/3", png(2))
    no_meta = await put(blobs, index, "http://a/4", png(3))
    await index.redis.hset(blob_key(index.keys, shared), bytes.fromhex(shared), "7")
    bucket = index.keys.url(url_bucket("http://a/4"))
    await index.redis.hset(bucket, "http://a/4", " ".join((await index.redis.hget(bucket, "http://a/4")).split()[:2]))
    await index.redis.hset(index.keys.count, "urls", 3)
    os.rename(blobs.blob_path(lost), blobs.trash_dir / f"{lost}.crashed")  # a delete died after its move
    os.utime(blobs.trash_dir / f"{lost}.crashed", (0, 0))
    orphan_tmp = blobs.tmp_dir / "dl-old.part"
    orphan_tmp.write_bytes(b"x")
    os.utime(orphan_tmp, (0, 0))
    orphan = hashlib.sha256(png(9)).hexdigest()
    blobs.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    blobs.blob_path(orphan).write_bytes(png(9))

    report = await fsck(index, blobs, tmp_grace=60)
    text = "\n".join(report.problems)
    assert f"refs[{shared}] is 7, but 2 URL(s)" in text
    assert f"missing blob {lost}" in text
    assert "no metadata for URL http://a/4" in text
    assert "count urls is 3, but the index holds 4" in text
    notes = "\n".join(report.notes)
    assert f"orphan blob {orphan}" in notes and "trash file" in notes and "stale temp file dl-old.part" in notes

    repaired = await fsck(index, blobs, repair=True, tmp_grace=60)
    assert repaired.ok, repaired.problems
    assert repaired.notes == []
    assert blobs.read(lost) == png(2)
    assert not blobs.exists(orphan)
    assert await index.refs_of(shared) == 2
    record = await index.lookup("http://a/4")
    assert (record.sha256, record.width, record.content_type) == (no_meta, 4, "image/png")
    assert await index.count() == 4


@pytest.mark.gen_test
async def test_a_url_outside_its_bucket_is_a_problem_repair_moves_it_back(world):
    blobs, index = world
    digest = await put(blobs, index, "http://a/1", png(1))
    right = index.keys.url(url_bucket("http://a/1"))
    wrong = index.keys.url("000" if url_bucket("http://a/1") != "000" else "001")
    value = await index.redis.hget(right, "http://a/1")
    await index.redis.hdel(right, "http://a/1")
    await index.redis.hset(wrong, "http://a/1", value)
    assert await index.lookup("http://a/1") is None

    report = await fsck(index, blobs)
    assert [p for p in report.problems if p.startswith("URL http://a/1 is in bucket")], report.problems
    assert (await fsck(index, blobs, repair=True)).ok
    assert (await index.lookup("http://a/1")).sha256 == digest


@pytest.mark.gen_test
async def test_damaged_blob_is_a_problem_repair_cannot_hide(world):
    blobs, index = world
    digest = await put(blobs, index, "http://a/1", png(1))
    path = blobs.blob_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"bit rot")
    report = await fsck(index, blobs, repair=True)
    assert [p for p in report.problems if p.startswith(f"damaged blob {digest}")]


@pytest.mark.gen_test
async def test_a_record_with_the_wrong_content_type_is_a_problem_repair_corrects(world):
    # What casimg wrote for a WebP on a fresh server, before the type came from its own format table.
    blobs, index = world
    webp = image_bytes(7, "webp", (30, 20))
    tmp = blobs.tmp_dir / "dl-webp.part"
    tmp.write_bytes(webp)
    digest = hashlib.sha256(webp).hexdigest()
    wrong = BlobMeta(size=len(webp), content_type="application/octet-stream", width=30, height=20)
    await store_blob(blobs, index, tmp, "http://a/w", digest, wrong)
    await put(blobs, index, "http://a/p", png(1))  # a right record, left alone
    stored_at = (await index.lookup("http://a/w")).stored_at_ms

    report = await fsck(index, blobs)
    assert report.problems == [
        "URL http://a/w records content type application/octet-stream, but its bytes are image/webp"]
    repaired = await fsck(index, blobs, repair=True)
    assert repaired.ok, repaired.problems
    assert repaired.repaired == ["corrected the content type of http://a/w: application/octet-stream -> image/webp"]
    record = await index.lookup("http://a/w")
    assert (record.content_type, record.width, record.height, record.size, record.stored_at_ms) == (
        "image/webp", 30, 20, len(webp), stored_at)
    assert (await index.lookup("http://a/p")).content_type == "image/png"
    assert (await fsck(index, blobs, repair=True)).repaired == []


@pytest.mark.gen_test
async def test_a_newest_first_order_out_of_step_is_a_problem_repair_mends(world):
    # What a process older than the newest-first order leaves after the migration: a URL stored without
    # its place (written here as that process would), and a place whose URL it deleted.
    blobs, index = world
    await put(blobs, index, "http://a/1", png(1))
    await put(blobs, index, "http://a/2", png(2))
    k, digest = index.keys, await put(blobs, index, "http://a/3", png(3))
    await index.redis.hset(k.url(url_bucket("http://a/4")), "http://a/4", f"{digest} 1764000000000")
    await index.redis.hincrby(blob_key(k, digest), bytes.fromhex(digest), 1)
    await index.redis.hincrby(k.count, "urls", 1)
    await index.redis.hdel(k.url(url_bucket("http://a/2")), "http://a/2")  # gone, its place left
    await index.redis.hincrby(k.count, "urls", -1)
    await index.redis.hincrby(k.count, "blobs", -1)
    assert await index.recent_size() == 3 and await index.count() == 3  # the sizes agree: not seen
    await index.redis.hset(k.url(url_bucket("http://a/5")), "http://a/5", f"{digest} 1764000000001")
    await index.redis.hincrby(blob_key(k, digest), bytes.fromhex(digest), 1)
    await index.redis.hincrby(k.count, "urls", 1)
    report = await fsck(index, blobs)
    assert "the newest-first order holds 3 URLs, but the index 4" in report.problems
    repaired = await fsck(index, blobs, repair=True)
    assert "newest-first order: dropped 1 URL(s) no longer indexed as placed" in repaired.repaired
    assert "newest-first order: placed 2 URL(s) it lacked" in repaired.repaired
    assert repaired.ok, repaired.problems
    page = await index.page(None, 100, Order.RECENT)
    newest = [image[0] for image in page.images]
    assert newest[-2:] == ["http://a/5", "http://a/4"] and sorted(newest) == [
        "http://a/1", "http://a/3", "http://a/4", "http://a/5"]


@pytest.mark.gen_test
async def test_a_wrong_count_of_relation_references_is_a_problem_repair_recounts(world):
    """variant-refs counts the references of a digest that are variant relations: what tells an original
    from a variant only, of which no variant is made."""
    blobs, index = world
    source = await put(blobs, index, "http://a/1", png(1))
    variant = hashlib.sha256(png(2)).hexdigest()
    blobs.blob_path(variant).parent.mkdir(parents=True, exist_ok=True)
    blobs.blob_path(variant).write_bytes(png(2))
    relations = Relations(index.redis, index.keys)
    added = await relations.add(source, "v1:w=2", StoredVariant(variant, len(png(2))), 10, "no-claim")
    assert added == (Added.RECORDED, StoredVariant(variant, len(png(2))))
    counts, raw = index.keys.variant_refs(variant[:3]), bytes.fromhex(variant)
    assert await index.redis.hget(counts, raw) == "1"
    assert (await fsck(index, blobs)).ok
    # Nothing is made of a variant only.
    deeper = await relations.add(variant, "v1:w=1", StoredVariant(hashlib.sha256(png(3)).hexdigest(), 9), 10, "x")
    assert deeper == (Added.VARIANT_ONLY, None)
    assert await index.redis.exists(index.keys.variants(variant)) == 0

    for wrong, recorded in (("5", 5), (None, 0)):
        if wrong is None:
            await index.redis.hdel(counts, raw)  # as a variant made before casimg counted them
        else:
            await index.redis.hset(counts, raw, wrong)
        report = await fsck(index, blobs)
        assert f"variant-refs[{variant}] is {recorded}, but 1 variant relation(s) point at it" in report.problems
        repaired = await fsck(index, blobs, repair=True)
        assert any(f"relation references of {variant}" in line for line in repaired.repaired), repaired.repaired
        assert (await fsck(index, blobs)).ok
        assert await index.redis.hget(counts, raw) == "1"
    # A count on a digest that no relation names would make an original look like a variant only.
    await index.redis.hset(index.keys.variant_refs(source[:3]), bytes.fromhex(source), "1")
    report = await fsck(index, blobs)
    assert f"variant-refs[{source}] is 1, but 0 variant relation(s) point at it" in report.problems
    await fsck(index, blobs, repair=True)
    assert (await fsck(index, blobs)).ok
    assert await index.redis.hget(index.keys.variant_refs(source[:3]), bytes.fromhex(source)) is None

    # A count in another bucket than its digest's own is one that lookups never find.
    other = "000" if variant[:3] != "000" else "fff"
    await index.redis.hdel(counts, raw)
    await index.redis.hset(index.keys.variant_refs(other), raw, "1")
    report = await fsck(index, blobs)
    assert f"the relation count of {variant} is in bucket {other}, not in its own" in report.problems
    await fsck(index, blobs, repair=True)
    assert (await fsck(index, blobs)).ok
    assert await index.redis.hget(counts, raw) == "1"
    assert await index.redis.exists(index.keys.variant_refs(other)) == 0

    # A second source with the same variant: each of its sources' last URL takes one count.
    second = await put(blobs, index, "http://a/2", png(4))
    assert (await relations.add(second, "v1:w=2", StoredVariant(variant, len(png(2))), 10, "y"))[0] is Added.RECORDED
    assert await index.redis.hget(counts, raw) == "2"
    released = await index.release("http://a/1")
    assert released is not None and released.freed == ()
    assert await index.redis.hget(counts, raw) == "1"
    assert (await fsck(index, blobs)).ok
    released = await index.release("http://a/2")
    assert released is not None and released.freed == (variant,)
    assert await index.redis.hget(counts, raw) is None
