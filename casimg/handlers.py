"""Thin Tornado handlers: parse the request, call the services, render JSON or bytes.

Every error, whatever raised it, is rendered once, by ``BaseHandler.write_error``, as
``application/problem+json``; the mapping from domain exceptions to statuses is ``_status_of``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import orjson
import tornado.web

from casimg import errors
from casimg.clock import MILLIS
from casimg.index import ImageRecord, ListingFilter
from casimg.keys import ApiKey, Scope
from casimg.lifecycle import delete_url
from casimg.logtext import clip
from casimg.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from casimg.openapi import openapi_document
from casimg.queue import Limits
from casimg.schema import CURSOR_DIGITS, RECENT_CURSOR_PREFIX, RECENT_KEY_BYTES, Order
from casimg.services import Services
from casimg.storage import BlobNotFound, Storage
from casimg.storage.file import FileStore
from casimg.validation import FORMATS, HEAD_BYTES, content_type_from_head, content_type_of
from casimg.variants import VariantSpec
from casimg.views import image_json
from casimg.webhooks import check_callback_url

log = logging.getLogger("casimg.http")
access_log = logging.getLogger("casimg.access")

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_WAIT = 60.0  # seconds a POST ?wait= may hold the answer
WAIT_POLL_FIRST, WAIT_POLL_MAX = 0.02, 0.5  # job polling interval while waiting, growing
SEND_CHUNK = 512 * 1024  # larger images are sent in pieces so memory per response stays bounded
IMAGE_CACHE = "private, no-cache"  # a URL may be deleted and stored again with other bytes: revalidate
BLOB_CACHE = "private, max-age=31536000, immutable"  # bytes named by their hash never change
IMAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"
EXTENSIONS = {fmt.content_type: fmt.extension for fmt in FORMATS.values()}  # of a served file's name
JOB_ID_RE = re.compile(r"^[0-9a-f]{24}$")
CURSOR_RE = re.compile(rf"[0-9a-f]{{{CURSOR_DIGITS}}}")
FILTERS = ("prefix", "contains", "host")  # the listing's filters, as ListingFilter's fields
RECENT_CURSOR_RE = re.compile(rf"{re.escape(RECENT_CURSOR_PREFIX)}[0-9a-f]{{{RECENT_KEY_BYTES * 2}}}")
RANGE_RE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
# Digits of a Range bound read as a number; a longer one is past any file (and past int()'s digit limit,
# whose ValueError was a 500). 18 digits is an exabyte.
RANGE_DIGITS = 18
# Query parameters whose values are never written to a log, should a client put a credential there (casimg
# never reads them): a name that, lowercased and without separators, holds one of SECRET_WORDS (key,
# api_key, x-api-key, api-key, apiKey, access_token, client_secret, X-Amz-Signature, ...) or is one of
# SECRET_NAMES. A list of names would miss the next spelling; a harmless parameter masked costs nothing.
SECRET_WORDS = ("key", "token", "secret", "passw", "pwd", "auth", "signature", "credential", "session", "cookie")
SECRET_NAMES = frozenset({"sig", "pass", "jwt", "sid"})
UNMATCHED = "unmatched"  # the route label of requests no route matched: their paths must not become labels


def _status_of(exc: BaseException) -> tuple[int, str, float | None]:
    """(HTTP status, detail for the client, Retry-After) for any exception; the one mapping."""
    table: list[tuple[type[BaseException], int]] = [
        (errors.BadRequest, 400),
        (errors.Unauthorized, 401),
        (errors.Forbidden, 403),
        (errors.NotFound, 404),
        (errors.TooLarge, 413),
        (errors.RangeNotSatisfiable, 416),
        (errors.Unrenderable, 422),
        (errors.TooManyRequests, 429),
        (errors.Unavailable, 503),
    ]
    for kind, status in table:
        if isinstance(exc, kind):
            return status, str(exc), getattr(exc, "retry_after", None)
    if isinstance(exc, errors.REDIS_ERRORS):
        return 503, "the index is unavailable; try again shortly", 2.0
    if isinstance(exc, tornado.web.HTTPError):
        return exc.status_code, exc.reason or HTTPStatus(exc.status_code).phrase, None
    return 500, "internal error", None


class BaseHandler(tornado.web.RequestHandler):
    """Holds the services; authenticates every request whose method has a scope in `scopes`."""

    scopes: dict[str, Scope] = {}

    def initialize(self, services: Services, route: str = UNMATCHED) -> None:
        self.services = services
        self.route = route
        self.api_key: ApiKey | None = None

    async def prepare(self) -> None:
        needed = self.scopes.get(self.request.method or "")
        if needed is None:
            return
        try:
            self.api_key = await self.services.api_keys.authenticate(self._presented_key(), needed)
        except errors.Unauthorized:
            await self.services.auth_failures.record(self.request.remote_ip or "unknown")
            raise
        await self.services.rate.take(self.api_key.id)

    def _presented_key(self) -> str | None:
        key = self.request.headers.get("X-API-Key")
        if key:
            return key.strip()
        scheme, _, value = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        return None

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        # orjson: a listing page is encoded an order of magnitude faster than with json.dumps.
        self.finish(orjson.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        status, _, _ = _status_of(value) if value else (500, "", None)
        if status == 503:
            log.warning("%s %s: %s", self.request.method, clip(self.request.path), type(value).__name__)
        elif status >= 500 and isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)  # its line names the request by _request_summary
        elif status >= 500:
            # Not tornado's own line: it repeats the raw request target, key-like parameters and all.
            log.error("uncaught exception in %s", self._request_summary(), exc_info=(typ, value, tb))

    def _request_summary(self) -> str:
        """The request as error lines name it: the target as the access log writes it."""
        target = clip(_loggable_uri(self.request.path, self.request.query))
        return f"{self.request.method} {target} ({self.request.remote_ip})"

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        status, detail, retry_after = _status_of(exc) if exc else (status_code, HTTPStatus(status_code).phrase, None)
        self.clear()
        self.set_status(status)
        if isinstance(exc, errors.RangeNotSatisfiable):
            self.set_header("Content-Range", f"bytes */{exc.size}")  # a 416 says the size it could not satisfy
        if retry_after is not None:
            self.set_header("Retry-After", str(max(1, round(retry_after))))
        if status == 401:
            self.set_header("WWW-Authenticate", 'Token realm="casimg"')
        if status == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_header("Content-Type", "application/problem+json")
        body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                                "detail": detail}
        if isinstance(exc, errors.BadVariant):
            body["parameter"] = exc.parameter  # the query parameter to change, for a client to point at
        self.finish(json.dumps(body))

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this handler implements, for the Allow header of a 405."""
        return [method for method in cls.SUPPORTED_METHODS
                if getattr(cls, method.lower()) is not getattr(tornado.web.RequestHandler, method.lower())]

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise errors.BadRequest(f"{name} must be a whole number") from None
        if not low <= value <= high:
            raise errors.BadRequest(f"{name} must be between {low} and {high}")
        return value


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The app's log_function: once per request, count it for /metrics and write one access log line.

    The line names the API key by its name, never the key, and masks credential-like query parameters.
    """
    request = handler.request
    status = handler.get_status()
    seconds = request.request_time()
    method = request.method or "-"
    # Anyone can send any method name, and is answered 405: only the ones tornado serves become labels.
    method_label = method if method in handler.SUPPORTED_METHODS else "other"
    route = getattr(handler, "route", UNMATCHED)
    services: Services | None = getattr(handler, "services", None)
    if services is not None and services.metrics is not None:
        services.metrics.observe_request(route, method_label, status, seconds)
    api_key: ApiKey | None = getattr(handler, "api_key", None)
    key_name = api_key.name if api_key is not None else "-"
    target = clip(_loggable_uri(request.path, request.query))
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        access_log.log(
            level, "%s %s %d %.1fms key=%s %s", method, target, status, seconds * 1000, key_name, request.remote_ip,
            extra={"fields": {"event": "request", "method": method, "path": target, "route": route,
                              "status": status, "duration_ms": round(seconds * 1000, 3), "key": key_name,
                              "remote": request.remote_ip}},
        )


def _loggable_uri(path: str, query: str) -> str:
    if not query:
        return path
    if any(_is_secret(part.partition("=")[0]) for part in query.split("&")):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(name, "REDACTED" if _is_secret(name) else value) for name, value in pairs])
    return f"{path}?{query}"


def _is_secret(name: str) -> bool:
    """Whether a query parameter's name carries a credential; the usual short names are remembered (every
    request's line asks again about the same few: url, w, ...), a long one is looked at each time, so no
    client can fill the cache with big entries."""
    return _is_secret_short(name) if len(name) <= 64 else _looks_secret(name)


@functools.lru_cache(maxsize=1024)
def _is_secret_short(name: str) -> bool:
    return _looks_secret(name)


def _looks_secret(name: str) -> bool:
    """Whether a query parameter's name (raw or decoded) is one that carries a credential. Only the
    names are decoded to look: the values, a whole URL for /api/image, are left as they are."""
    if "%" in name or "+" in name:
        name = unquote_plus(name)
    folded = "".join(c for c in name.lower() if c.isalnum())
    return folded in SECRET_NAMES or any(word in folded for word in SECRET_WORDS)


class MetricsHandler(BaseHandler):
    """Prometheus text format. Open unless CASIMG_METRICS_REQUIRE_KEY; then any key (scope read) may scrape."""

    async def prepare(self) -> None:
        if self.services.settings.metrics_require_key:
            self.api_key = await self.services.api_keys.authenticate(self._presented_key(), Scope.read)

    async def get(self) -> None:
        metrics = self.services.metrics
        if metrics is None:
            raise errors.NotFound("metrics are off in this process")
        body = await metrics.render(self.services)
        self.set_header("Content-Type", METRICS_CONTENT_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    async def get(self) -> None:
        try:
            await self.services.redis.ping()
        except errors.REDIS_ERRORS:
            raise errors.Unavailable("redis does not answer") from None
        await self.services.blobs.check()  # StorageUnavailable (a 503) names what is wrong
        self.write_json({"status": "ready", "redis": "ok", "blobs": "ok"})


class OpenApiHandler(BaseHandler):
    def get(self) -> None:
        policy = self.services.variants.policy
        self.write_json(openapi_document(list(policy.presets) if policy.mode != "off" else []))


@tornado.web.stream_request_body
class ImagesHandler(BaseHandler):
    """GET lists stored images; POST submits URLs to download. The body streams so size is checked early."""

    scopes = {"GET": Scope.read, "POST": Scope.write}

    async def prepare(self) -> None:
        await super().prepare()
        self._body = bytearray()
        if self.request.method == "POST":
            limit = self.services.settings.max_body_bytes
            declared = self.request.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise errors.TooLarge(f"request body over {limit} bytes")
            self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self._body += chunk

    async def get(self) -> None:
        limit = self.query_int("limit", DEFAULT_PAGE, 1, MAX_PAGE)
        order = self._order()
        cursor = self.get_query_argument("cursor", None)
        if cursor is not None:
            self._check_cursor(cursor, order)
        where = ListingFilter(**{name: self._filter_value(name) for name in FILTERS})
        page = await self.services.index.page(cursor, limit, order, where)
        self.set_header("X-Total-Count", str(page.total))
        if page.next_cursor is not None:
            # A query-only reference (RFC 3986 4.2), resolved by the client against the URL it asked for:
            # it keeps the scheme, host and any path prefix of a proxy in front, none of which casimg
            # knows for sure (the Host header is the client's to write, and TLS ends at the proxy).
            params: dict[str, str | int] = {"limit": limit}
            if order is not Order.SHA1:
                params["order"] = order.value
            params |= {name: value for name in FILTERS if (value := getattr(where, name))}
            query = urlencode({**params, "cursor": page.next_cursor})
            self.set_header("Link", f'<?{query}>; rel="next"')
        self.write_json([image_json(*image) for image in page.images])

    def _filter_value(self, name: str) -> str:
        """A filter's value, read raw (get_query_argument strips whitespace, and a URL prefix may end in
        one); '' when absent."""
        values = self.request.query_arguments.get(name)
        if not values:
            return ""
        try:
            value = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise errors.BadRequest(f"{name} is not UTF-8") from None
        return value

    def _order(self) -> Order:
        raw = self.get_query_argument("order", None)
        if raw is None:
            return Order.SHA1
        try:
            return Order(raw)
        except ValueError:
            raise errors.BadRequest(f"order must be one of {', '.join(o.value for o in Order)}") from None

    @staticmethod
    def _check_cursor(cursor: str, order: Order) -> None:
        """A cursor is the one the Link header gave for this order: each order has its own form."""
        if order is Order.RECENT and not RECENT_CURSOR_RE.fullmatch(cursor):
            raise errors.BadRequest(f"cursor must be {RECENT_CURSOR_PREFIX!r} and {RECENT_KEY_BYTES * 2} lowercase "
                                    "hex digits with order=recent, as the Link header gives it; leave it out "
                                    "to start from the first page")
        if order is Order.SHA1 and not CURSOR_RE.fullmatch(cursor):
            raise errors.BadRequest(f"cursor must be {CURSOR_DIGITS} lowercase hex digits, as the Link header "
                                    "gives it; leave it out to start from the first page")

    async def post(self) -> None:
        document = self._parse_body(bytes(self._body))
        urls = self._parse_urls(document)
        callback = self._callback_url(document)
        wait = self._wait_seconds()
        key_id = self.api_key.id if self.api_key else ""
        settings = self.services.settings
        limits = Limits(max_in_flight=settings.max_jobs_in_flight, max_bytes=settings.max_queued_bytes,
                        max_url_length=settings.max_url_length)
        job_id, total = await self.services.queue.submit(urls, key_id, limits, callback=callback)
        self.set_header("Location", f"/api/jobs/{job_id}")
        if wait > 0:
            await _wait_for_job(self.services, job_id, wait)
            job = await self.services.queue.get(job_id)
            self.write_json(job.as_json(), 200 if job.status == "done" else 202)
            return
        self.write_json({"job_id": job_id, "status": "queued", "total": total}, 202)

    @staticmethod
    def _parse_body(body: bytes) -> dict[str, Any]:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise errors.BadRequest('body must be JSON: {"image_urls": ["https://...", ...]}') from None
        if not isinstance(document, dict) or "image_urls" not in document:
            raise errors.BadRequest('body must be a JSON object with an "image_urls" list')
        return document

    def _callback_url(self, document: dict[str, Any]) -> str:
        """The job's callback URL: the body's "callback_url" ("" or null for none), else CASIMG_WEBHOOK_URL."""
        settings = self.services.settings
        if "callback_url" not in document:
            return settings.webhook_url
        url = document["callback_url"]
        if url is None or url == "":
            return ""
        if not settings.webhook_secret:
            raise errors.BadRequest('"callback_url" needs CASIMG_WEBHOOK_SECRET set on the server: callbacks are '
                                    "always signed, and this server has no secret to sign them with")
        return check_callback_url(url, settings.allow_networks)

    def _parse_urls(self, document: dict[str, Any]) -> list[str]:
        urls = document["image_urls"]
        if not isinstance(urls, list):
            raise errors.BadRequest('"image_urls" must be a list of URL strings')
        if not urls:
            raise errors.BadRequest('"image_urls" is empty')
        limit = self.services.settings.max_urls_per_request
        if len(urls) > limit:
            raise errors.TooLarge(f'"image_urls" has {len(urls)} items; at most {limit} per request')
        for position, url in enumerate(urls):
            if not isinstance(url, str):
                raise errors.BadRequest(f'"image_urls"[{position}] is not a string')
            if not url.isascii():
                try:
                    url.encode()
                except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON allows it, UTF-8 and Redis do not
                    detail = f'"image_urls"[{position}] is not valid Unicode (a lone surrogate)'
                    raise errors.BadRequest(detail) from None
        return urls

    def _wait_seconds(self) -> float:
        raw = self.get_query_argument("wait", None)
        if raw is None:
            return 0.0
        try:
            wait = float(raw)
        except ValueError:
            raise errors.BadRequest("wait must be a number of seconds") from None
        if not 0 <= wait <= MAX_WAIT:
            raise errors.BadRequest(f"wait must be between 0 and {MAX_WAIT:.0f} seconds")
        return wait


async def _wait_for_job(services: Services, job_id: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    interval = WAIT_POLL_FIRST
    while time.monotonic() < deadline:
        if await services.queue.status(job_id) == "done":
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 2, WAIT_POLL_MAX)


class JobHandler(BaseHandler):
    """GET a job (any key may read any job); DELETE cancels it (its own key, or an admin key)."""

    scopes = {"GET": Scope.read, "DELETE": Scope.write}

    async def get(self, job_id: str) -> None:
        if not JOB_ID_RE.match(job_id):
            raise errors.NotFound(f"no job {job_id!r}")
        job = await self.services.queue.get(job_id)
        self.write_json(job.as_json())

    async def delete(self, job_id: str) -> None:
        """Cancel: each unfinished URL fails with "cancelled", the job ends done. A done job answers 200 as it
        is. Another key's job is a 403, not a 404: any key may read it, so its existence is no secret."""
        if not JOB_ID_RE.match(job_id):
            raise errors.NotFound(f"no job {job_id!r}")
        queue = self.services.queue
        job = await queue.get(job_id, with_results=False)
        assert self.api_key is not None
        if job.key != self.api_key.id and self.api_key.scope < Scope.admin:
            raise errors.Forbidden("this job was submitted with another key; only that key or an admin key may "
                                   "cancel it")
        if await queue.cancel(job_id):
            log.info("job %s cancelled by key %s", job_id, self.api_key.name,
                     extra={"fields": {"event": "cancel", "job": job_id, "key": self.api_key.name}})
        self.write_json((await queue.get(job_id)).as_json())


@functools.lru_cache(maxsize=4096)
def _http_date(stored_at_ms: int) -> str:
    """Last-Modified for a stored_at; cached, as the same images are asked for again and again."""
    return format_datetime(datetime.fromtimestamp(stored_at_ms / MILLIS, tz=UTC), usegmt=True)


class _BytesHandler(BaseHandler):
    """Sends a stored blob with the HTTP rules of tornado's StaticFileHandler: ETag, 304, Range, 206, 416;
    or, when the query asks for a variant (w, h, format, variant=...), that variant's blob."""

    def variant_spec(self) -> VariantSpec | None:
        """The variant the query asks for, None for the original; BadVariant (a 400) names a bad parameter."""
        return self.services.variants.queries.spec(self.request.query_arguments)

    async def send_variant(self, image: ImageRecord, spec: VariantSpec, cache_control: str,
                           include_body: bool) -> None:
        """Send the stored variant `spec` of `image` (made now if need be). A variant this process knew
        whose blob has gone since (its source deleted and stored again) is asked for afresh, once."""
        for fresh in (False, True):
            variant = await self.services.variants.get(image.sha256, spec, self.request.headers.get("Accept"),
                                                       fresh=fresh)
            if variant.vary_accept:
                self.set_header("Vary", "Accept")
            record = ImageRecord(image.url, variant.digest, variant.size, variant.content_type, 0, 0,
                                 image.stored_at_ms)
            try:
                await self.send_blob(record, cache_control, include_body)
                return
            except errors.NotFound:
                if fresh:
                    raise

    async def send_blob(self, image: ImageRecord, cache_control: str, include_body: bool) -> None:
        size = image.size
        self.set_header("ETag", f'"{image.sha256}"')
        if image.stored_at_ms:
            self.set_header("Last-Modified", _http_date(image.stored_at_ms))
        self.set_header("Cache-Control", cache_control)
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("Content-Type", image.content_type)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", IMAGE_CSP)
        extension = EXTENSIONS.get(image.content_type, "bin")
        self.set_header("Content-Disposition", f'inline; filename="{image.sha256[:16]}.{extension}"')
        if self._not_modified(image.sha256):
            self.set_status(304)
            self.clear_header("Content-Type")
            self.finish()
            return
        if include_body:
            # An object store may hand the client a short-lived URL of its own (CASIMG_S3_REDIRECT=presigned),
            # which then answers Range itself. The redirect is not cached: the URL expires.
            location = await self.services.blobs.redirect_url(
                image.sha256, image.content_type, f"{image.sha256[:16]}.{extension}")
            if location is not None:
                self.set_status(302)
                self.set_header("Location", location)
                self.set_header("Cache-Control", "no-store")
                self.clear_header("Content-Type")
                self.finish()
                return
        accel = self.services.settings.accel_redirect
        if accel and include_body:
            # nginx in front (config/nginx.conf) sends the file with sendfile, and answers Range itself;
            # an unsatisfiable one is still refused here, with the size.
            self._range(size)
            self.set_header("X-Accel-Redirect", accel + FileStore.relative_name(image.sha256))
            self.finish()
            return
        start, end = 0, size
        requested = self._range(size)
        if requested is not None:
            start, end = requested
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.set_header("Content-Length", str(end - start))
        if not include_body:
            self.finish()
            return
        blobs = self.services.blobs
        position = start
        while position < end:
            length = min(SEND_CHUNK, end - position)
            try:
                chunk = await blobs.read_range(image.sha256, position, length)
            except BlobNotFound:
                raise errors.NotFound("image bytes are missing; run casimg fsck") from None
            self.write(chunk)
            position += length
            if position < end:
                await self.flush()
        self.finish()

    def _not_modified(self, digest: str) -> bool:
        header = self.request.headers.get("If-None-Match")
        if not header:
            return False
        tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
        return "*" in tags or f'"{digest}"' in tags

    def _range(self, size: int) -> tuple[int, int] | None:
        """(start, end) of a single satisfiable byte range; None to send everything; 416 if unsatisfiable."""
        header = self.request.headers.get("Range")
        if not header:
            return None
        match = RANGE_RE.match(header.strip())
        if not match or match.groups() == ("", ""):
            return None  # several ranges or another unit: the whole body is a valid answer
        first, last = (_range_bound(digits) for digits in match.groups())
        if first is not None and last is not None and last < first:
            return None  # not a valid range (RFC 9110 14.1.1): ignore the header, send everything
        if first is None:
            assert last is not None
            start, end = max(0, size - last), size
        else:
            start = first
            end = min(size, last + 1) if last is not None else size
        if start >= size or start >= end:
            raise errors.RangeNotSatisfiable(size)
        if (start, end) == (0, size):
            return None  # the whole file: a 200, as tornado's StaticFileHandler answers
        return start, end


def _range_bound(digits: str) -> int | None:
    """A Range bound's value (None where absent); one of more than RANGE_DIGITS digits counts as 10**18,
    which is past any file, so that a bound of thousands of digits is answered like any other too large."""
    if not digits:
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= RANGE_DIGITS else 10**RANGE_DIGITS


def _url_argument(handler: BaseHandler) -> str:
    """The `url` query parameter, read raw: get_query_argument strips whitespace and replaces control
    characters, and the URL must match exactly what was submitted."""
    values = handler.request.query_arguments.get("url")
    if not values or not values[-1]:
        raise errors.BadRequest(f"query parameter 'url' is required: {handler.request.path}?url=<the URL as submitted>")
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadRequest("query parameter 'url' is not UTF-8") from None


class ImageMetaHandler(BaseHandler):
    """GET what the index holds about a URL's image, as a listing row shows it, and how many URLs share its
    bytes (their reference count: which URLs those are is not indexed, see docs/api.md)."""

    scopes = {"GET": Scope.read}

    async def get(self) -> None:
        url = _url_argument(self)
        image = await self.services.index.lookup(url)
        if image is None:
            raise errors.NotFound(f"no image stored for {url}")
        # Read after the lookup, not in one step with it: a URL released meanwhile may show 0.
        references = await self.services.index.refs_of(image.sha256)
        image = image._replace(placeholder=await self.services.index.placeholder_of(image.sha256))
        self.write_json({**image_json(*image), "references": references})


class ImageHandler(_BytesHandler):
    """GET/HEAD the bytes stored for a URL; DELETE the URL."""

    scopes = {"GET": Scope.read, "HEAD": Scope.read, "DELETE": Scope.write}

    def _url(self) -> str:
        return _url_argument(self)

    async def get(self, include_body: bool = True) -> None:
        url = self._url()
        spec = self.variant_spec()
        image = await self.services.index.lookup(url)
        if image is None:
            raise errors.NotFound(f"no image stored for {url}")
        if spec is not None:
            await self.send_variant(image, spec, IMAGE_CACHE, include_body)
            return
        await self.send_blob(image, IMAGE_CACHE, include_body)

    async def head(self) -> None:
        await self.get(include_body=False)

    async def delete(self) -> None:
        url = self._url()
        if await delete_url(self.services.blobs, self.services.index, url) is None:
            raise errors.NotFound(f"no image stored for {url}")
        self.set_status(204)
        self.finish()


class BlobHandler(_BytesHandler):
    scopes = {"GET": Scope.read, "HEAD": Scope.read}

    async def get(self, digest: str, include_body: bool = True) -> None:
        spec = self.variant_spec()
        if await self.services.index.refs_of(digest) == 0:
            raise errors.NotFound(f"no blob {digest}")
        if spec is not None:
            source = ImageRecord(url="", sha256=digest, size=0, content_type="", width=0, height=0, stored_at_ms=0)
            await self.send_variant(source, spec, BLOB_CACHE, include_body)
            return
        content_type, size = "application/octet-stream", 0
        if not self._not_modified(digest):  # a 304 needs only the digest, its ETag
            # The metadata lives with the URLs; by digest, the type comes from the file's header.
            try:
                content_type, size = await _type_and_size(self.services.blobs, digest)
            except BlobNotFound:
                raise errors.NotFound("image bytes are missing; run casimg fsck") from None
        image = ImageRecord(url="", sha256=digest, size=size, content_type=content_type, width=0, height=0,
                            stored_at_ms=0)
        await self.send_blob(image, BLOB_CACHE, include_body)

    async def head(self, digest: str) -> None:
        await self.get(digest, include_body=False)


async def _type_and_size(blobs: Storage, digest: str) -> tuple[str, int]:
    """A blob's content type, from its header (its whole bytes for a format the header does not name), and size."""
    size = await blobs.stat(digest)
    head = await blobs.read_range(digest, 0, HEAD_BYTES)
    known = content_type_from_head(head)
    if known is None:  # Pillow's open may need more than the header
        known = content_type_of(head if len(head) == size else await blobs.read_range(digest))
    return known, size


class KeyHandler(BaseHandler):
    """The presented key's name and scope: what a client (the gallery) may offer its user to do."""

    scopes = {"GET": Scope.read}

    def get(self) -> None:
        assert self.api_key is not None
        self.write_json({"id": self.api_key.id, "name": self.api_key.name, "scope": self.api_key.scope.name})


class BlobUrlsHandler(BaseHandler):
    """How many URLs share a content's bytes (one HGET), and which, up to `limit`: a walk of the index,
    about a second per million URLs, so limit=0 asks for the count alone."""

    scopes = {"GET": Scope.read}

    async def get(self, digest: str) -> None:
        limit = self.query_int("limit", DEFAULT_PAGE, 0, MAX_PAGE)
        count = await self.services.index.refs_of(digest)
        if count == 0:
            raise errors.NotFound(f"no blob {digest}")
        urls = await self.services.index.urls_of(digest, min(limit, count)) if limit else []
        self.write_json({"sha256": digest, "count": count, "urls": sorted(urls)})


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise errors.NotFound(f"no route for {self.request.path}")
