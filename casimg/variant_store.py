"""Variants made once and kept: from a request's parameters to a stored variant blob.

``VariantStore.get(source, spec, accept)`` answers with the variant's digest, size and type. The path:

1. Resolve the spec against the source's header (``render.probe``, cached per process: a digest's
   header never changes) and the Accept header: the canonical string names the variant.
2. Look the relation up (``relations.py``): found, it is a cache hit, one HGET.
3. Missing: one render for the cluster. In this process, requests for the same variant share one task;
   across processes, a Redis claim lets one render while the others poll for the relation (or for the
   error the render ended with, which they answer too).
4. Render in the pool (``render_pool.py``: worker processes, a time limit, a memory estimate checked
   before decoding), then store the bytes as a blob under their own digest with the store protocol of
   blobs.py, the relation standing where a URL stands: write and link in (one trip to a thread), record
   the relation (one Lua step that also ends the claim), make sure the file is there, remove the temp file.

Durability: the variant's file and its directory entry are fsynced before the relation is recorded, as a
download's are. A variant could be rendered again, but a relation is a reference that Redis keeps across
a crash (its AOF), and one that outlived its blob would answer 404 for that variant until fsck --repair
dropped it. The fsync costs ~0.9 ms of CPU and ~15 ms of latency per cold variant on the bench machine's
disk (BENCHMARKS.md, "Variants: through HTTP"), spent in a thread: neither the event loop nor a render
process waits for it. Downloads share one syncfs per batch instead
(``FlushGroup``); a cold variant arrives alone, so a shared flush would batch little and sync the whole
file system.

All blob I/O of variants is the two functions at the end, ``source_for_render`` and ``keep_variant``:
the render reads the source as the file store's path (the render worker opens it; from a store without
local files, its bytes, fetched whole), and the variant's bytes go in through the lifecycle's store
steps (``lifecycle.store_referenced``), with the relation where a URL would be.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from casimg.errors import BadVariant, NotFound, RenderTimeout, Unavailable, Unrenderable
from casimg.index import Index
from casimg.lifecycle import store_referenced
from casimg.relations import ERROR_MARK, Added, Relations, StoredVariant
from casimg.render import Source, probe
from casimg.render_pool import RenderPool
from casimg.storage import Storage
from casimg.storage.file import FileStore
from casimg.variants import QueryParser, SourceInfo, VariantPolicy, VariantSpec

log = logging.getLogger("casimg.variants")

# A claim outlives the render's own limit by this much: the wait for a pool slot, the source read and
# the blob write. Past it, a holder that died is replaced by the next request.
CLAIM_MARGIN = 10.0
ERROR_KEEP = 10.0  # seconds a failed render's error answers that variant without rendering it again
WAIT_FIRST, WAIT_MAX = 0.02, 0.25  # seconds between polls of a request waiting for another process's render
PROBE_CACHE = 4096  # source headers kept per process
# Variants found, kept per process: a warm request then costs what an original's does (one Redis lookup, of
# the URL), not a second round trip for the relation. An entry may outlive its relation (its source deleted
# and stored again): the answer's blob read then fails, and the handler asks again with fresh=True. The
# time bounds how long an answer served without reading (HEAD, 304, nginx's X-Accel-Redirect) may be stale.
FOUND_CACHE = 16384
FOUND_SECONDS = 30.0
# Statuses a failed render leaves for the requests that waited on it, and the error each raises again.
ERRORS: dict[int, Callable[[str], Exception]] = {
    400: lambda detail: BadVariant("variant", detail),
    404: NotFound,
    422: Unrenderable,
    503: RenderTimeout,
}


@dataclass(frozen=True)
class Variant:
    """A stored variant, as an answer needs it."""

    digest: str
    size: int
    content_type: str
    vary_accept: bool  # format=auto: the answer depends on the Accept header


def variant_of_a_variant(source: str) -> BadVariant:
    """The 400 for variant parameters on a digest whose every reference is a variant relation. Each original
    makes at most ``variants_per_original`` variants; variants of those would each bring an allowance of
    their own, and a read key could make variants without bound by asking one level deeper each time."""
    return BadVariant("digest", f"{source} is the digest of a variant, and variants are made of originals only: "
                                "ask with the original's digest or URL")


def _status_of(exc: Exception) -> int:
    if isinstance(exc, BadVariant):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unrenderable):
        return 422
    return 503


class VariantStore:
    """Finds or makes variants. One per process; ``close()`` stops its render pool."""

    def __init__(self, policy: VariantPolicy, pool: RenderPool, relations: Relations, index: Index,
                 blobs: Callable[[], Storage], *, on_render: Callable[[float], None] | None = None,
                 on_hit: Callable[[], None] | None = None) -> None:
        self.policy = policy
        self.queries = QueryParser(policy)  # a request's query to its spec
        self.pool = pool
        self.relations = relations
        self.index = index
        self.blobs = blobs  # the active blob store, asked each time: a store migration may change it
        self.on_render = on_render or (lambda seconds: None)
        self.on_hit = on_hit or (lambda: None)
        self.renders = 0  # renders made by this process, for tests and diagnostics
        self._probed: collections.OrderedDict[str, SourceInfo] = collections.OrderedDict()
        self._making: dict[tuple[str, str], asyncio.Future[StoredVariant]] = {}
        self._found: collections.OrderedDict[tuple[str, VariantSpec, str | None], tuple[Variant, float]] = (
            collections.OrderedDict())

    def close(self) -> None:
        self.pool.close()

    async def get(self, source: str, spec: VariantSpec, accept: str | None, *, fresh: bool = False) -> Variant:
        """The variant `spec` of the content `source` (hex digest), made if it is not stored yet; `fresh`
        asks Redis even when this process has the answer.

        Raises BadVariant (a parameter or limit, a 400), NotFound (the source's bytes are gone),
        Unrenderable (422), RenderTimeout or Unavailable (503).
        """
        key = (source, spec, accept if spec.varies_on_accept else None)
        known = self._found.get(key)
        if known is not None and not fresh and known[1] > time.monotonic():
            self.on_hit()
            return known[0]
        variant = await self._get(source, spec, accept)
        self._found[key] = (variant, time.monotonic() + FOUND_SECONDS)
        self._found.move_to_end(key)
        if len(self._found) > FOUND_CACHE:
            self._found.popitem(last=False)
        return variant

    async def _get(self, source: str, spec: VariantSpec, accept: str | None) -> Variant:
        info = await self._probe(source)
        concrete = self.policy.resolve(spec, info, accept)
        canonical = concrete.canonical
        found = await self.relations.find(source, canonical)
        if found is not None:
            self.on_hit()
        else:
            found = await self._make_once(source, concrete, canonical)
        return Variant(found.digest, found.size, concrete.content_type, spec.varies_on_accept)

    async def _probe(self, source: str) -> SourceInfo:
        info = self._probed.get(source)
        if info is not None:
            self._probed.move_to_end(source)
            return info
        info = await asyncio.to_thread(probe, await source_for_render(self.blobs(), source))
        self._probed[source] = info
        if len(self._probed) > PROBE_CACHE:
            self._probed.popitem(last=False)
        return info

    async def _make_once(self, source: str, spec: VariantSpec, canonical: str) -> StoredVariant:
        """One making per variant in this process: later requests share the first one's task, shielded
        so that a client going away does not cancel it under the others."""
        key = (source, canonical)
        task = self._making.get(key)
        if task is None:
            task = asyncio.ensure_future(self._make(source, spec, canonical))
            self._making[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: tuple[str, str], task: asyncio.Future[StoredVariant]) -> None:
        self._making.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every request that waited on it may have gone away

    async def _make(self, source: str, spec: VariantSpec, canonical: str) -> StoredVariant:
        """Render it here, or wait for the process that claimed it; in a loop, since a claim may end
        without a relation (its holder died, or the source went) and the next request must take over."""
        claim_seconds = self.pool.timeout + CLAIM_MARGIN
        deadline = time.monotonic() + 2 * claim_seconds
        while True:
            # The relation, the source's variant count and references, and the claim in one round trip. The
            # claim is taken before the count is known: over the limit, or found after all (recorded by
            # another process since the caller's lookup), it is given back at once, which is rare; a render
            # is never made.
            # The claim is given back too when the source is a variant only: nothing is made of it.
            seen = await self.relations.find_count_claim(source, canonical, claim_seconds)
            if seen.found is not None or seen.count >= self.policy.per_original or seen.variant_only:
                if seen.token is not None:
                    await self.relations.release(source, canonical, seen.token)
                if seen.found is not None:
                    return seen.found
                if seen.variant_only:
                    raise variant_of_a_variant(source)
                self.policy.check_count(seen.count)
            if seen.token is not None:
                return await self._render_and_keep(source, spec, canonical, seen.token)
            await self._wait_for_claim(source, canonical, deadline)

    async def _wait_for_claim(self, source: str, canonical: str, deadline: float) -> None:
        """Return once another process's claim has ended (the relation is then recorded, or nobody holds
        it); raise the error its render ended with."""
        interval = WAIT_FIRST
        while True:
            if time.monotonic() > deadline:
                raise Unavailable("the variant is still being made; try again shortly")
            await asyncio.sleep(interval)
            interval = min(interval * 2, WAIT_MAX)
            held = await self.relations.claimed(source, canonical)
            if held is None:
                return
            if held.startswith(ERROR_MARK):
                status, _, detail = held[len(ERROR_MARK):].partition(" ")
                raise ERRORS.get(int(status), Unavailable)(detail)

    async def _render_and_keep(self, source: str, spec: VariantSpec, canonical: str, token: str) -> StoredVariant:
        try:
            path = await source_for_render(self.blobs(), source)
            await self.start()
            started = time.perf_counter()
            rendered = await self.pool.render(path, spec)
            self.renders += 1
            self.on_render(time.perf_counter() - started)
            return await keep_variant(self.blobs(), self.index, self.relations, source, canonical, rendered.data,
                                      rendered.content_type, self.policy, token)
        except (BadVariant, NotFound, Unrenderable, Unavailable) as exc:
            # Those that waited answer with the same error, and so does the next request for a moment.
            with contextlib.suppress(Exception):
                await self.relations.fail(source, canonical, token, _status_of(exc), str(exc), ERROR_KEEP)
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                await self.relations.release(source, canonical, token)
            raise

    async def start(self) -> None:
        """Start the render pool's processes (a no-op once started, without a trip to a thread)."""
        if not self.pool.started:
            await asyncio.to_thread(self.pool.start)


# -- blob I/O: everything variants read from or write to the blob store -------------------------------------

async def source_for_render(blobs: Storage, digest: str) -> Source:
    """What the renderer reads for the content `digest`: for the file store, its path, which the render
    worker opens itself (no copy through this process, and not checked here: the open raises NotFound, a
    404, when the file has gone); for any other driver, its bytes, fetched whole (an original is at most
    max_image_bytes), or BlobNotFound (a 404)."""
    if isinstance(blobs, FileStore):
        return blobs.blob_path(digest)
    return await blobs.read_range(digest)


async def keep_variant(blobs: Storage, index: Index, relations: Relations, source: str, canonical: str,
                       data: bytes, content_type: str, policy: VariantPolicy, token: str) -> StoredVariant:
    """Store a rendered variant as a blob under its own digest, its relation the reference (which also ends
    the claim `token`). Returns the relation recorded: ours, or another render's that came first."""
    # The file store's step 1 in the same trip to a thread as the write: the bytes and their name are on
    # disk (fsync of the file and its directory) before the relation is recorded, since a relation must
    # never point at a missing blob after a power loss, even though the variant could be made again.
    linked = isinstance(blobs, FileStore)
    if isinstance(blobs, FileStore):
        tmp, digest = await asyncio.to_thread(_write_temp_and_link, blobs, data)
    else:
        tmp, digest = await asyncio.to_thread(blobs.write_temp, data)
    outcome, recorded = await store_referenced(
        blobs, index, tmp, digest, content_type,
        lambda: relations.add(source, canonical, StoredVariant(digest, len(data)), policy.per_original, token),
        lambda answer: answer[0] is Added.RECORDED, linked=linked)
    if recorded is not None and outcome in (Added.RECORDED, Added.EXISTS):
        return recorded
    if outcome is Added.FULL:
        policy.check_count(policy.per_original)
    if outcome is Added.VARIANT_ONLY:  # its last original URL went while the variant was made
        raise variant_of_a_variant(source)
    raise NotFound("the image was deleted while its variant was made")


def _write_temp_and_link(blobs: FileStore, data: bytes) -> tuple[Path, str]:
    tmp, digest = blobs.write_temp(data)
    blobs.link_in_or_discard(tmp, digest)
    return tmp, digest
