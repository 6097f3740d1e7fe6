"""Job callbacks: when a job with a callback URL finishes, POST its summary there, signed, at least once.

The job's last step (lua/lib_complete.lua ``finish_job``, run by the store, complete, publish and cancel
scripts) puts the job in the ``webhooks`` sorted set, due at once, in the same atomic step that ends it:
a job is never done without its callback queued. Any worker process delivers:

1. claim (lua/webhook_claim.lua): the due callbacks' times move on by a lease (the POST's timeout and
   ``LEASE_MARGIN``), the attempt is counted and a claim token kept in the job. No other process takes
   them during the lease; when a process dies mid-delivery the lease ends and the next one takes over.
2. POST the job's summary through the download path's address guard (fetcher.Fetcher.post), signed.
3. record (lua/webhook_done.lua), only if the token is still the job's: ``delivered`` on a 2xx; else
   ``pending``, due again after a jittered exponential backoff, until ``webhook_retry_for`` seconds after
   the job finished; then, or at once for an address or URL no retry can help, ``failed``.

A receiver may thus get a callback twice (a process killed after the POST, before step 3): the job id in
the body is the key to deduplicate on.

The body is the job as ``GET /api/jobs/{id}`` answers it, without its ``callback`` member, when it is at most
``INLINE_BYTES``; a larger job is sent without ``results`` and with ``results_url``, its path in the API.
The signature is Stripe's scheme: ``X-Casimg-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under CASIMG_WEBHOOK_SECRET>``; ``casimg.client.verify_signature`` checks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis

from casimg.config import Settings
from casimg.errors import REDIS_ERRORS, BadRequest, DownloadFailed, NotFound
from casimg.fetcher import AddressGuard, Fetcher, parse_address
from casimg.lua import source as lua_source
from casimg.queue import JobQueue
from casimg.schema import KeySpace

log = logging.getLogger("casimg.webhooks")

SIGNATURE_HEADER = "X-Casimg-Signature"
# A job's body is sent whole up to this size. Receivers often cap a request body: Express's JSON parser
# at 100 kB by default, nginx at 1 MiB. 64 KiB passes both, and holds a job of about 300 URLs of typical
# length; a larger one would also be read from Redis in several steps (queue.STEP_BYTES, the same size).
INLINE_BYTES = 64 * 1024
RESULT_BYTES = 160  # a result's JSON besides its URL ({"url":..,"status":"stored","sha256":64 hex,...})
LEASE_MARGIN = 5.0  # seconds a claim outlasts the POST's timeout: reading the job and recording the outcome
POLL_INTERVAL = 1.0  # seconds between looks for due callbacks when none was due: one Redis call a second
CLAIM_BATCH = 16  # callbacks one process claims, and POSTs at once, per look
MAX_CALLBACK_LENGTH = 2048  # characters of a callback URL
# An attempt's recorded state -> its result in casimg_webhook_deliveries_total: "pending" after a POST
# is a failed attempt to be retried.
RESULTS = {"delivered": "delivered", "pending": "retried", "failed": "failed"}


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Casimg-Signature value of `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def check_callback_url(url: Any, allow_networks: tuple[str, ...]) -> str:
    """`url` if it may be a callback URL, else BadRequest saying why.

    A numeric host is put to the download guard here, so a refused address is a 400 at once; a host
    name is resolved, and its address checked, at each delivery (the answer may change meanwhile).
    """
    if not isinstance(url, str):
        raise BadRequest('"callback_url" must be a string')
    if len(url) > MAX_CALLBACK_LENGTH:
        raise BadRequest(f'"callback_url" is over {MAX_CALLBACK_LENGTH} characters')
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise BadRequest('"callback_url" is not a valid URL') from None
    if parts.scheme not in ("http", "https") or not host or not url.isascii():
        raise BadRequest('"callback_url" must be an absolute http:// or https:// URL (ASCII, IDNA for names)')
    if parts.username is not None or parts.password is not None:
        raise BadRequest('"callback_url" must not hold credentials: the signature authenticates casimg')
    if parse_address(host) is not None:
        refusal = AddressGuard(allow_networks).refusal(host)
        if refusal is not None:
            raise BadRequest(f'"callback_url": {refusal}; CASIMG_ALLOW_NETWORKS lists the networks allowed')
    return url


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    url: str
    since_ms: int  # when the job finished (the callback became due)
    total: int = 0  # the job's URLs
    size: int = 0  # ... and their bytes: whether its body is sent whole


class Deliverer:
    """The callback delivery of one worker process (see the module's docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, queue: JobQueue, fetcher: Fetcher,
                 settings: Settings, on_result: Callable[[str], None] | None = None) -> None:
        """`on_result` is told each recorded attempt's result: delivered, retried (failed, due again) or
        failed (given up): the counter of /metrics (metrics.Metrics.on_webhook)."""
        self.on_result = on_result
        self.redis = redis
        self.keys = keys
        self.queue = queue
        self.fetcher = fetcher
        self.secret = settings.webhook_secret
        self.timeout = settings.webhook_timeout
        self.retry_for = settings.webhook_retry_for
        self.backoff = settings.webhook_backoff
        self.backoff_max = settings.webhook_backoff_max
        self.lease = settings.webhook_timeout + LEASE_MARGIN
        self._claim = redis.register_script(lua_source("webhook_claim"))
        self._done = redis.register_script(lua_source("webhook_done"))

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver due callbacks until `stopping` is set; Redis outages are waited out."""
        while not stopping.is_set():
            try:
                claimed = await self.deliver_due()
            except REDIS_ERRORS as exc:
                log.warning("webhooks: redis unavailable (%s)", type(exc).__name__)
                claimed = 0
            except Exception:
                log.exception("webhooks: delivery loop error")
                claimed = 0
            if claimed < CLAIM_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), POLL_INTERVAL)

    async def deliver_due(self) -> int:
        """Claim the callbacks due now (CLAIM_BATCH at most) and deliver them; how many were claimed."""
        reply = await self._claim(
            keys=[self.keys.webhooks],
            args=[time.time_ns() // 1_000_000, int(self.lease * 1000), CLAIM_BATCH, self.keys.job(""),
                  token := secrets.token_hex(8)],
        )
        claims = [Claim(reply[i], int(reply[i + 1]), reply[i + 2], *map(int, reply[i + 3:i + 6]))
                  for i in range(0, len(reply), 6)]
        await asyncio.gather(*(self._deliver(claim, token) for claim in claims))
        return len(claims)

    async def payload(self, job_id: str, total: int, size: int) -> bytes:
        """The body POSTed for a job of `total` URLs of `size` bytes: as GET /api/jobs/{id} answers, or
        without results past INLINE_BYTES."""
        inline = size + total * RESULT_BYTES <= INLINE_BYTES
        job = await self.queue.get(job_id, with_results=inline)
        body = job.as_json(with_results=inline)
        body.pop("callback", None)
        encoded = orjson.dumps(body)
        if len(encoded) > INLINE_BYTES:  # long error texts: the estimate fell short
            body.pop("results")
            inline, encoded = False, b""
        if not inline:
            encoded = orjson.dumps({**body, "results_url": f"/api/jobs/{job_id}"})
        return encoded

    async def _deliver(self, claim: Claim, token: str) -> None:
        try:
            body = await self.payload(claim.job_id, claim.total, claim.size)
        except NotFound:  # the job expired since the claim: nothing left to tell
            await self.redis.zrem(self.keys.webhooks, claim.job_id)
            return
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
                   "X-Casimg-Job": claim.job_id, "X-Casimg-Attempt": str(claim.attempt)}
        status, error, permanent = 0, "", False
        try:
            status = await self.fetcher.post(claim.url, body, headers, self.timeout)
        except DownloadFailed as failure:
            error, permanent = failure.reason, failure.permanent
        now_ms = time.time_ns() // 1_000_000
        due_ms = now_ms + int(self._delay(claim.attempt) * 1000)
        if 200 <= status < 300:
            state = "delivered"
        elif permanent or due_ms > claim.since_ms + self.retry_for * 1000:
            state = "failed"
        else:
            state = "pending"
        recorded = await self._done(
            keys=[self.keys.job(claim.job_id), self.keys.webhooks],
            args=[claim.job_id, token, state, status or "", error, due_ms],
        )
        if recorded and self.on_result is not None:
            self.on_result(RESULTS[state])
        outcome = f"HTTP {status}" if status else error
        fields = {"event": "webhook", "job": claim.job_id, "state": state, "attempt": claim.attempt,
                  "outcome": outcome}
        if not recorded:
            log.warning("webhook of job %s: %s, but its claim had run out (another process took it over)",
                        claim.job_id, outcome, extra={"fields": fields})
        elif state == "delivered":
            log.info("webhook of job %s delivered (attempt %d)", claim.job_id, claim.attempt, extra={"fields": fields})
        else:
            log.warning("webhook of job %s: %s (attempt %d; %s)", claim.job_id, outcome, claim.attempt, state,
                        extra={"fields": fields})

    def _delay(self, attempt: int) -> float:
        """Seconds before the try after `attempt`: doubled at each one, half of it random, capped."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** min(attempt - 1, 30))
        return ceiling * random.uniform(0.5, 1.0)
