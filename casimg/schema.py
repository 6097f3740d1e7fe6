"""The Redis schema: the name of every key casimg writes, the bucket naming, the stream group.

Nothing else builds a key name: modules take a ``KeySpace`` and ask it. The Lua scripts build the bucket
names a digest or URL leads to from the prefixes they are given (``KeySpace.url("")``, ``blob("")``,
``job("")``, ``key_queue("")``), in the same way. Under the prefix (``casimg:`` by default)::

    url:{3 hex}        hash    URL -> "<sha256 hex> <stored_at ms> <size> <width> <height> <content_type>"
    blob:{3 hex}       hash    raw 32-byte SHA-256 -> references
    count              hash    urls, blobs
    recent             zset    the lower bounds of the newest-first order's leaves (raw 26-byte keys)
    recent:{hex}       zset    one leaf: "<stored_at 6 bytes><SHA-1 20 bytes><URL>" members, score 0
    migrations         hash    migration name -> when it finished (ms)
    queue              stream  keyless jobs' entries; queue:{key id} one API key's (group QUEUE_GROUP)
    queue-owners       zset    key id -> +inf while its stream holds entries, else when it emptied (ms)
    queue-wake         stream  an entry each time a key's queue stops being empty: wakes one worker
    enqueuing          zset    jobs whose entries are still being added
    job:{id}           hash    status, counters, times, callback state; job:{id}:urls list, job:{id}:results hash
    webhooks           zset    job id -> when its callback is due (ms); a claim moves it past its lease
    inflight:{key id}  zset    one API key's unfinished jobs
    rate:{key id}      hash    one API key's token bucket
    authfail:{address} string  401s given to one address this minute
    apikeys            hash    key id -> JSON {name, scope, secret_sha256, created}
    worker:{name}      string  a live worker's heartbeat
    sweep-lock         string  held by the worker running the periodic sweep
    placeholder:{3 hex} hash   raw 32-byte SHA-256 -> its ThumbHash (base64), once per content
    placeholder-todo   zset    hex SHA-256 of a content awaiting its placeholder -> when due (ms); a claim
                               moves it past its lease
    placeholders-made  string  "1" from the first placeholder written: until then listings read none
    variants:{sha256}  hash    canonical variant parameters -> "<variant sha256 hex> <size>"
    variant-refs:{3 hex} hash  raw 32-byte SHA-256 -> how many of its references are variant relations
    variant-claim:{sha256}:{canonical}  string  held by the process rendering that variant
    claims:{digest}    zset    an object-store blob's stores in flight: token -> expiry (ms)
    deleting:{digest}  string  present while an object-store blob's DELETE may be in flight
    tomb               zset    object-store digests whose count reached 0 -> when they may be deleted (ms)
    store              hash    the active blob store, a migration's target, epoch, id (storage/active.py)
    store-acks         hash    process name -> "<epoch> <ms>": the store record's epoch each process follows
    store-copied:{id}  set     digests a store migration has copied and verified (migrate_store.py)

The key table in docs/operations.md mirrors ``KeySpace`` (tests/test_docs.py holds them together).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

# Buckets are named by 3 hex digits: 4,096 of them. At 1,000,000 URLs that is about 244 entries each,
# under the 512 that keep a hash compact (embedded.COMPACT_HASH_ENTRIES); past about 2 million URLs or
# contents Redis converts the fuller buckets to plain hashes, which only costs memory. The Lua in
# lua/ (bucket_name, the 0..4095 walks) is written for 3 digits.
BUCKET_DIGITS = 3
BUCKETS = [f"{n:03x}" for n in range(16**BUCKET_DIGITS)]
CURSOR_DIGITS = 40  # a listing cursor is the SHA-1 (hex) of the last URL of the page before
# The newest-first listing's cursor: this prefix, then the hex of the last row's (stored_at, SHA-1) key,
# 6 + 20 bytes. The prefix keeps it visibly apart from the default order's 40 hex digits.
RECENT_CURSOR_PREFIX = "r."
RECENT_KEY_BYTES = 26  # lua/lib_recent.lua's RECENT_KEY


@dataclass(frozen=True)
class KeySpace:
    """The name of every Redis key casimg uses, all built here from one prefix."""

    prefix: str = "casimg:"

    def url(self, bucket: str) -> str:
        """hash: URL -> "<sha256 hex> <stored_at in ms> <size> <width> <height> <content_type>" (the last
        four missing while the metadata is), for the URLs whose SHA-1 starts with `bucket`."""
        return f"{self.prefix}url:{bucket}"

    def blob(self, bucket: str) -> str:
        """hash: raw 32-byte SHA-256 -> references (> 0), for the digests whose hex starts with `bucket`."""
        return f"{self.prefix}blob:{bucket}"

    @property
    def count(self) -> str:
        """hash: ``urls`` (URLs indexed) and ``blobs`` (contents with refs > 0), kept by the index scripts."""
        return self.prefix + "count"

    @property
    def recent(self) -> str:
        """sorted set, score 0: the lower bounds of the newest-first order's leaves, each the raw 26-byte
        (stored_at, SHA-1) key of its first member ('' for the first leaf); see lua/lib_recent.lua."""
        return self.prefix + "recent"

    def recent_leaf(self, bound_hex: str) -> str:
        """sorted set, score 0: one leaf of the newest-first order, members "<stored_at ms, 6 bytes
        big-endian><SHA-1 of the URL, 20 bytes><URL>" from its bound (hex; ``first`` for '') on."""
        return f"{self.prefix}recent:{bound_hex}"

    @property
    def migrations(self) -> str:
        """hash: name of a finished migration of the index (migrate.py) -> when it finished, in ms."""
        return self.prefix + "migrations"

    @property
    def queue(self) -> str:
        """stream: one entry per URL to download, for jobs submitted without an API key (and those
        queued before each key had a stream of its own); read by the consumer group ``QUEUE_GROUP``."""
        return self.prefix + "queue"

    def key_queue(self, key_id: str) -> str:
        """stream: one entry per URL to download, for the jobs of one API key; group ``QUEUE_GROUP``."""
        return f"{self.prefix}queue:{key_id}"

    @property
    def queue_owners(self) -> str:
        """sorted set: API key id -> +inf while its queue stream holds entries, else the time in ms it
        became empty (dropped an hour after, see queue.OWNER_KEEP)."""
        return self.prefix + "queue-owners"

    @property
    def queue_wake(self) -> str:
        """stream: a ``key`` entry each time a key's queue stream stops being empty (a little over 100 kept
        at most: MAXLEN ~ 32, and Redis trims whole nodes of 100). Workers read it with their entries and
        idle ones block on it (group ``QUEUE_GROUP``), so the one it goes to reads a key new to it at once."""
        return self.prefix + "queue-wake"

    def job(self, job_id: str) -> str:
        """hash: a job's status, counters and times."""
        return f"{self.prefix}job:{job_id}"

    def job_urls(self, job_id: str) -> str:
        """list: the job's distinct URLs in submission order."""
        return f"{self.prefix}job:{job_id}:urls"

    def job_results(self, job_id: str) -> str:
        """hash: position in the job's URL list -> JSON outcome, for the URLs that are finished."""
        return f"{self.prefix}job:{job_id}:results"

    @property
    def webhooks(self) -> str:
        """sorted set: job id -> the time in ms its callback is next due, while it is neither delivered nor
        failed; a claim moves the time on by the claim's lease (webhooks.py)."""
        return self.prefix + "webhooks"

    def worker(self, name: str) -> str:
        """string with a TTL: present while the named worker is alive."""
        return f"{self.prefix}worker:{name}"

    @property
    def sweep_lock(self) -> str:
        """string with a TTL: held by the worker running the periodic sweep, so only one does."""
        return self.prefix + "sweep-lock"

    def claims(self, digest: str) -> str:
        """sorted set with a TTL: the stores of `digest` between their upload and their index step, on any
        node, for a driver without link/rename (storage/s3.py): claim token -> expiry in ms (Redis time)."""
        return f"{self.prefix}claims:{digest}"

    def deleting(self, digest: str) -> str:
        """string with a TTL: present while the sweep's DELETE of `digest`'s object may be in flight; a
        store of the same content waits for it to go."""
        return f"{self.prefix}deleting:{digest}"

    @property
    def tomb(self) -> str:
        """sorted set: digests of an object store whose count reached 0 -> when the sweep may delete them (ms)."""
        return self.prefix + "tomb"

    @property
    def enqueuing(self) -> str:
        """sorted set: published jobs whose queue entries are still being added, scored by publish time in ms."""
        return self.prefix + "enqueuing"

    def inflight(self, key_id: str) -> str:
        """sorted set: the unfinished jobs of one API key, scored by submission time in ms."""
        return f"{self.prefix}inflight:{key_id}"

    def rate(self, key_id: str) -> str:
        """hash with a TTL: one API key's token bucket, {tokens, ts}."""
        return f"{self.prefix}rate:{key_id}"

    def robots(self, origin: str) -> str:
        """string with a TTL: an origin's robots.txt as politeness.RobotsFile.encode() gives it. `origin` is
        scheme://host[:port] percent-encoded whole (politeness.Robots), so it holds no ':'."""
        return f"{self.prefix}robots:{origin}"

    def robots_claim(self, origin: str) -> str:
        """string with a TTL: held by the process fetching an origin's robots.txt, so only it does."""
        return f"{self.prefix}robots-claim:{origin}"

    def origin_rate(self, origin: str) -> str:
        """hash with a TTL: one origin's request-rate token bucket, {tokens, ts}. `origin` is a registrable
        domain or an address, percent-encoded (politeness.OriginPace)."""
        return f"{self.prefix}origin-rate:{origin}"

    def origin_cool(self, origin: str) -> str:
        """string with a TTL: present while an origin cools down after a 429 or 503; holds the streak."""
        return f"{self.prefix}origin-cool:{origin}"

    def origin_backoff(self, origin: str) -> str:
        """string with a TTL: an origin's cool-downs in a row, forgotten after a quiet spell."""
        return f"{self.prefix}origin-backoff:{origin}"

    def auth_failures(self, address: str) -> str:
        """string with a 60 s TTL: 401 answers given to one client address in the current minute."""
        return f"{self.prefix}authfail:{address}"

    def placeholder(self, bucket: str) -> str:
        """hash: raw 32-byte SHA-256 -> the content's ThumbHash, base64 (placeholder.py), for the digests
        whose hex starts with `bucket`; written by a filler (filler.py) after the store, dropped with the
        content's last reference."""
        return f"{self.prefix}placeholder:{bucket}"

    @property
    def placeholder_todo(self) -> str:
        """sorted set: hex SHA-256 of a stored content without a placeholder -> when it is due (ms): queued
        by the store script, claimed by a filler by moving it to the end of its lease (so a filler that
        dies leaves it due again), removed when its placeholder is written or cannot be made."""
        return f"{self.prefix}placeholder-todo"

    @property
    def placeholders_made(self) -> str:
        """string "1", set with the first placeholder ever written: while it is absent, a listing page
        skips reading its rows' placeholders (a round trip that would find none)."""
        return f"{self.prefix}placeholders-made"

    def variants(self, source: str) -> str:
        """hash: a variant's canonical parameters (variants.VariantSpec.canonical) -> "<variant sha256 hex>
        <size>", for the variants made of the content `source` (hex). Each entry counts as one reference
        of the variant's digest in its blob record; the hash goes with the source's last reference."""
        return f"{self.prefix}variants:{source}"

    def variant_refs(self, bucket: str) -> str:
        """hash: raw 32-byte SHA-256 -> how many of the references in its ``blob`` record are variant
        relations (absent when none), for the digests whose hex starts with `bucket`. A content whose every
        reference is a relation is a variant only, and variants are not made of it (variant_add.lua)."""
        return f"{self.prefix}variant-refs:{bucket}"

    def variant_claim(self, source: str, canonical: str) -> str:
        """string with a TTL: held by the process rendering one variant, so the cluster renders it once;
        after a failed render it holds "error <status> <detail>" for a few seconds instead."""
        return f"{self.prefix}variant-claim:{source}:{canonical}"

    @property
    def api_keys(self) -> str:
        """hash: API key id -> JSON {name, scope, secret_sha256, created}."""
        return self.prefix + "apikeys"

    @property
    def store(self) -> str:
        """hash: {active, target, epoch, id}: the blob store every process reads and deletes in, the one a
        migration fills beside it, a counter of changes, the migration's id (storage/active.py). Absent
        until the first migration: each process's settings name the store."""
        return self.prefix + "store"

    @property
    def store_acks(self) -> str:
        """hash: process name -> "<epoch> <Redis time in ms>": the epoch of the store record each running
        process follows with nothing older in flight, and when it last said so."""
        return self.prefix + "store-acks"

    def store_copied(self, migration: str) -> str:
        """set: the hex digests a store migration has copied to its target and read back intact."""
        return f"{self.prefix}store-copied:{migration}"


QUEUE_GROUP = "workers"


class Order(StrEnum):
    """The orders of the listing (``GET /api/images?order=``)."""

    SHA1 = "sha1"  # by the SHA-1 of the URL: the index's own order, and the default
    RECENT = "recent"  # newest first: by (stored_at, SHA-1 of the URL), descending


class Outcome(StrEnum):
    """What became of one URL of a job: the ``status`` of its result in ``job:{id}:results``, what the
    store script returns, what the worker logs and what /metrics counts."""

    STORED = "stored"
    DEDUPLICATED = "deduplicated"  # stored under a content already there: its result is "stored"
    EXISTS = "exists"  # the URL was indexed already
    FAILED = "failed"
    CANCELLED = "cancelled"  # its job was cancelled first: its result is "failed", with the error "cancelled"

    @property
    def status(self) -> Outcome:
        """The status a job's result records: a deduplicated URL was stored."""
        if self is Outcome.CANCELLED:
            return Outcome.FAILED
        return Outcome.STORED if self is Outcome.DEDUPLICATED else self

    @property
    def counter(self) -> str:
        """The job hash's counter of this outcome."""
        return {Outcome.EXISTS: "existed", Outcome.FAILED: "failed"}.get(self.status, "stored")


def queue_stream(keys: KeySpace, owner: str) -> str:
    """The queue stream of one API key's entries; the keyless stream for ""."""
    return keys.key_queue(owner) if owner else keys.queue


def url_bucket(url: str) -> str:
    """The bucket of a URL: the first hex digits of the SHA-1 of its UTF-8 bytes (Lua's redis.sha1hex)."""
    return hashlib.sha1(url.encode()).hexdigest()[:BUCKET_DIGITS]


def url_key(keys: KeySpace, url: str) -> str:
    return keys.url(url_bucket(url))


def blob_key(keys: KeySpace, digest: str) -> str:
    return keys.blob(digest[:BUCKET_DIGITS])


def placeholder_key(keys: KeySpace, digest: str) -> str:
    return keys.placeholder(digest[:BUCKET_DIGITS])


@dataclass(frozen=True)
class OldKeySpace:
    """The keys of the casimg 0.1 index, under the same prefix as KeySpace."""

    prefix: str

    @property
    def urls(self) -> str:
        return self.prefix + "urls"

    @property
    def order(self) -> str:
        return self.prefix + "order"

    @property
    def refs(self) -> str:
        return self.prefix + "refs"

    @property
    def clock(self) -> str:
        return self.prefix + "clock"

    def meta(self, bucket: str) -> str:
        return f"{self.prefix}meta:{bucket}"

    def markers(self) -> list[str]:
        """The keys of which one exists while any of the old index is left: one DEL removes them and the
        meta buckets together, so the meta buckets never outlive them."""
        return [self.urls, self.order, self.refs, self.clock]
