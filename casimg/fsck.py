"""`casimg fsck`: check the invariant between the index and the blob store, and mend what is safe.

The invariant: every indexed URL has its blob on disk, every reference count equals the number of URLs and
variant relations pointing at its digest (and its count of relation references, the latter), every URL carries
its content's metadata, with the content type its bytes name (an earlier casimg recorded a WebP as
application/octet-stream on a fresh server), no record with references is pointed at by no URL, the count hash
holds the numbers of URLs and of referenced contents, every URL and record sits in the bucket its hash names
(lookups look nowhere else), the newest-first order holds as many URLs as the index (its members are not
compared one by one: --repair drops those of URLs gone or stored again, and places those missing), and every
blob's bytes hash to its name. Breaking any of these is a *problem* (exit 1).
What a crash may leave (an unreferenced blob, a temp or trash file) is a *note*, and so is, with placeholders
on, a content that has no placeholder and is not queued for one (--repair queues it). It runs beside a live
server: the index is read in one MULTI, and anything that looks wrong between disk and index is checked again
live before it is reported, since a store or delete may have happened in between.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from casimg.errors import InvalidImage
from casimg.index import BlobMeta, Index
from casimg.lifecycle import remove_if_unreferenced, sweep_tombs
from casimg.migrate import backfill_recent
from casimg.placeholder_queue import PlaceholderQueue
from casimg.relations import Relations, StoredVariant
from casimg.schema import url_bucket
from casimg.storage import BlobNotFound, Storage
from casimg.storage.file import FileStore
from casimg.validation import content_type_of, validate_image

SWEEP_BATCH = 1000  # reference counts read per Redis round trip while looking for orphans


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems



async def fsck(index: Index, blobs: Storage, *, repair: bool = False, tmp_grace: float = 3600.0) -> Report:
    report = Report()
    if repair:
        report.repaired += await _repair(index, blobs, tmp_grace)
    snap = await index.snapshot()
    counts = Counter(snap.urls.values())  # references by URLs
    expected, dangling = references(counts, snap.variants)  # ... and by the relations of referenced sources
    on_disk = set(await blobs.walk())
    relations = Relations(index.redis, index.keys)
    for source in sorted(dangling):
        report.problems.append(f"{len(snap.variants[source])} variant relation(s) of {source} dangle: nothing "
                               "references their source")
    for source, canonical, variant in _live_relations(snap.variants, dangling):
        missing = variant.digest not in on_disk and not await _present(blobs, variant.digest)
        if missing and await relations.find(source, canonical) == variant:
            report.problems.append(f"missing variant blob {variant.digest} ({canonical} of {source})")

    for url, digest in snap.urls.items():
        # The listing of files and the index snapshot are moments apart: ask again before calling it missing.
        missing = digest not in on_disk and not await _present(blobs, digest)
        if missing and await index.digest_of(url) == digest:
            report.problems.append(f"missing blob {digest} for URL {url}")
    for url, bucket in snap.misplaced.items():
        report.problems.append(f"URL {url} is in bucket {bucket}, not in {url_bucket(url)} where lookups look")
    for digest, bucket in snap.stray.items():
        report.problems.append(f"the record of {digest} is in bucket {bucket}, not in its own")
    for digest, count in expected.items():
        refs = snap.refs.get(digest, 0)
        if refs != count:
            report.problems.append(f"refs[{digest}] is {refs}, but {count} URL(s) or variant relation(s) point at it")
    as_variant = expected - counts  # the references that are relations
    for digest in sorted(set(as_variant) | set(snap.variant_refs)):
        recorded, count = snap.variant_refs.get(digest, 0), as_variant.get(digest, 0)
        if recorded != count:
            report.problems.append(f"variant-refs[{digest}] is {recorded}, but {count} variant relation(s) "
                                   "point at it")
    for digest, bucket in snap.variant_refs_stray.items():
        report.problems.append(f"the relation count of {digest} is in bucket {bucket}, not in its own")
    for url in sorted(snap.bare):
        report.problems.append(f"no metadata for URL {url}")
    for digest, refs in snap.refs.items():
        if refs > 0 and digest not in expected:
            report.problems.append(f"refs[{digest}] is {refs}, but no URL or variant relation points at it")
    referenced = sum(1 for refs in snap.refs.values() if refs > 0)
    for name, actual in (("urls", len(snap.urls)), ("blobs", referenced)):
        if snap.counts[name] != actual:
            report.problems.append(f"count {name} is {snap.counts[name]}, but the index holds {actual}")

    if index.placeholders:
        await _check_placeholders(index, sorted(counts), report, repair)

    placed = await index.recent_size()
    if placed != len(snap.urls) and await index.recent_size() != await index.count():  # again, live
        report.problems.append(f"the newest-first order holds {placed} URLs, but the index {len(snap.urls)}")

    types: dict[str, str] = {}  # digest -> the content type its bytes name, for the sound referenced blobs
    for digest in sorted(on_disk):
        try:
            source = await _source(blobs, digest)
            actual = await asyncio.to_thread(_sha256, blobs, source)
            if actual == digest and digest in counts:
                types[digest] = await asyncio.to_thread(content_type_of, source)
        except (FileNotFoundError, BlobNotFound):
            continue  # deleted while we looked
        if actual != digest:
            report.problems.append(f"damaged blob {digest}: its bytes hash to {actual}")
        elif digest not in expected and await index.refs_of(digest) == 0:
            report.notes.append(f"orphan blob {digest} (no URL or variant relation points at it)")
    for url, recorded in sorted(snap.types.items()):
        digest = snap.urls[url]
        if digest in types and recorded != types[digest] and await _recorded_type(index, url, digest) == recorded:
            report.problems.append(f"URL {url} records content type {recorded}, but its bytes are {types[digest]}")
    for leftover in await blobs.leftovers():
        if leftover.kind == "trash":
            report.notes.append(f"trash file {leftover.path.name} (an interrupted delete)")
        elif leftover.kind == "upload":
            report.notes.append(f"unfinished upload {leftover.path} ({leftover.age / 3600:.1f} h old)")
        elif leftover.age > tmp_grace:
            report.notes.append(f"stale temp file {leftover.path.name} ({leftover.age / 3600:.1f} h old)")
    return report


def references(urls: Counter[str], variants: dict[str, dict[str, str]]) -> tuple[Counter[str], set[str]]:
    """The references each digest should have: its URLs, plus one per variant relation of a referenced
    source (which a variant becomes in turn); and the sources whose relations nothing reaches (dangling)."""
    expected = Counter(urls)
    waiting = set(variants)
    reached = True
    while reached:
        reached = False
        for source in [source for source in waiting if expected[source] > 0]:
            waiting.discard(source)
            reached = True
            for value in variants[source].values():
                variant = StoredVariant.decode(value).digest
                if variant != source:
                    expected[variant] += 1
    return +expected, waiting


async def _check_placeholders(index: Index, digests: list[str], report: Report, repair: bool) -> None:
    """With placeholders on: a content with URLs has its placeholder, or is queued for one. One with
    neither (an entry lost, or stored while placeholders were off) is a note: its images are served
    all the same; --repair queues it for the fillers."""
    queue = PlaceholderQueue(index.redis, index.keys)
    missing = await queue.missing(digests)
    if not missing:
        return
    if repair:
        await queue.queue(missing)
        report.repaired += [f"queued the placeholder of {digest}" for digest in missing]
    else:
        report.notes += [f"no placeholder for {digest}, and none queued" for digest in missing]


def _live_relations(variants: dict[str, dict[str, str]], dangling: set[str]
                    ) -> list[tuple[str, str, StoredVariant]]:
    return [(source, canonical, StoredVariant.decode(value)) for source, entries in sorted(variants.items())
            if source not in dangling for canonical, value in sorted(entries.items())]


async def _repair(index: Index, blobs: Storage, tmp_grace: float) -> list[str]:
    """Fix what is safe: references, counts and buckets, dangling variant relations, relations whose
    variant blob is missing (the next request renders it again), missing metadata, trash, orphans, stale
    temp files."""
    done = [f"index: {fix}" for fix in await index.repair()]
    if dropped := await index.prune_recent():
        done.append(f"newest-first order: dropped {dropped} URL(s) no longer indexed as placed")
    if placed := await backfill_recent(index.redis, index.keys, again=True):
        done.append(f"newest-first order: placed {placed} URL(s) it lacked")
    done += await sweep(index, blobs, tmp_grace)  # first: it puts back blobs a URL without metadata may use
    snap = await index.snapshot()
    relations = Relations(index.redis, index.keys)
    for source, canonical, variant in _live_relations(snap.variants, set()):
        if await _present(blobs, variant.digest):
            continue
        removed, freed = await relations.drop(source, canonical, variant)
        if removed:
            done.append(f"dropped the relation {canonical} of {source}: its variant blob {variant.digest} is missing")
        for digest in freed:
            await remove_if_unreferenced(blobs, index, digest)
    described: dict[str, BlobMeta] = {}  # digest -> its metadata, each blob read once
    for url in sorted(snap.bare):
        digest = snap.urls[url]
        if digest not in described:
            try:
                described[digest] = await _meta_from_blob(blobs, digest)
            except (FileNotFoundError, BlobNotFound, InvalidImage):
                continue  # a missing or damaged blob, which the check reports
        if await index.ensure_meta(url, digest, described[digest]):
            done.append(f"rebuilt metadata of {url}")
    done += await _correct_types(index, blobs, snap.urls, snap.types, described)
    return done


async def _correct_types(
    index: Index, blobs: Storage, urls: dict[str, str], recorded: dict[str, str], described: dict[str, str]
) -> list[str]:
    """Rewrite the metadata of URLs whose recorded content type is not the one their blob's bytes name,
    from the blob itself (`described`: digest -> metadata, shared with the caller)."""
    done, types = [], {}  # types: digest -> the content type its bytes name, each blob read once
    for url, kind in sorted(recorded.items()):
        digest = urls[url]
        if digest not in types:
            try:
                types[digest] = await asyncio.to_thread(content_type_of, await _source(blobs, digest))
            except (FileNotFoundError, BlobNotFound):
                types[digest] = kind  # a missing blob, which the check reports
        if types[digest] == kind:
            continue
        if digest not in described:
            try:
                described[digest] = await _meta_from_blob(blobs, digest)
            except (FileNotFoundError, BlobNotFound, InvalidImage):
                continue
        if await index.correct_meta(url, digest, described[digest]):
            done.append(f"corrected the content type of {url}: {kind} -> {types[digest]}")
    return done


async def _recorded_type(index: Index, url: str, digest: str) -> str | None:
    """The content type `url` records now, if it still points at `digest` (the snapshot may be stale)."""
    record = await index.lookup(url)
    return record.content_type if record is not None and record.sha256 == digest else None


async def _present(blobs: Storage, digest: str) -> bool:
    try:
        await blobs.stat(digest)
    except BlobNotFound:
        return False
    return True


async def _source(blobs: Storage, digest: str) -> Path | bytes:
    """What to read a blob from: its file where the driver has one, else its bytes (BlobNotFound if gone)."""
    path = blobs.local_path(digest)
    return path if path is not None else await blobs.read_range(digest)


def _sha256(blobs: Storage, source: Path | bytes) -> str:
    return hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else blobs.hash_file(source)


async def _meta_from_blob(blobs: Storage, digest: str) -> BlobMeta:
    """A stored blob's metadata, read again from its bytes (it was valid when stored, so no limits
    apply). FileNotFoundError or BlobNotFound when it is not stored, InvalidImage when its bytes are damaged."""
    source = await _source(blobs, digest)
    info = await asyncio.to_thread(validate_image, source, max_pixels=2**62, max_frames=2**31)
    size = len(source) if isinstance(source, bytes) else (await asyncio.to_thread(source.stat)).st_size
    return BlobMeta(size, info.content_type, info.width, info.height)


async def sweep(index: Index, blobs: Storage, grace: float) -> list[str]:
    """Clear what crashes leave: trash (restored first if still referenced), orphan blobs, old temp files.

    Safe beside live stores and deletes: a trash or temp file younger than `grace` may belong to an
    operation in progress and is left alone, and orphans go through the delete protocol, which puts a
    blob back if a store references it meanwhile. On an object store, ``_sweep_objects``.
    """
    if not isinstance(blobs, FileStore):
        return await _sweep_objects(index, blobs, grace)
    done = []
    for leftover in await asyncio.to_thread(lambda: list(blobs.iter_leftovers())):
        if leftover.kind == "trash" and leftover.digest:
            if await index.refs_of(leftover.digest) > 0 and not await asyncio.to_thread(blobs.exists, leftover.digest):
                await asyncio.to_thread(blobs.restore_from_trash, leftover.path, leftover.digest)
                done.append(f"restored blob {leftover.digest} from the trash")
        if leftover.age > grace:
            await asyncio.to_thread(blobs.discard, leftover.path)
            done.append(f"removed {'trash' if leftover.kind == 'trash' else 'stale temp'} file {leftover.path.name}")
    on_disk = await asyncio.to_thread(lambda: list(blobs.iter_digests()))
    for start in range(0, len(on_disk), SWEEP_BATCH):
        batch = on_disk[start:start + SWEEP_BATCH]
        for digest, refs in zip(batch, await index.refs_many(batch), strict=True):
            if refs == 0 and await remove_if_unreferenced(blobs, index, digest):
                done.append(f"removed orphan blob {digest}")
    return done


async def _sweep_objects(index: Index, blobs: Storage, grace: float) -> list[str]:
    """An object store's sweep: stale temp files and abandoned uploads go; every object that no URL, claim
    or tombstone names is tombstoned (it is deleted a grace period later, if still unused); the objects of
    due tombstones are deleted (lifecycle.sweep_tombs)."""
    done = []
    for leftover in await blobs.leftovers():
        if leftover.age > grace:
            await blobs.clear(leftover)
            done.append(f"removed {'stale temp file' if leftover.kind == 'tmp' else 'unfinished upload'} "
                        f"{leftover.path.name}")
    stored = await blobs.walk()
    tombstoned = await index.tombstoned()
    for start in range(0, len(stored), SWEEP_BATCH):
        batch = [digest for digest in stored[start:start + SWEEP_BATCH] if digest not in tombstoned]
        for digest, refs in zip(batch, await index.refs_many(batch), strict=True):
            if refs == 0:
                await remove_if_unreferenced(blobs, index, digest)  # tombstoned, deleted a grace period later
                done.append(f"tombstoned orphan object {digest}")
    return done + await sweep_tombs(blobs, index)
