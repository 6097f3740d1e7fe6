"""A small, typed client for the casimg HTTP API, on the standard library alone.

    from casimg.client import Client

    client = Client("http://127.0.0.1:9000", key)
    job = client.wait(client.submit(["https://example.com/a.jpg"]).job_id, timeout=60)
    for image in client.images():
        print(image.url, image.sha256, image.size)
    data = client.image("https://example.com/a.jpg")
    client.delete("https://example.com/a.jpg")
    client.cancel(job_id)  # its unfinished URLs fail "cancelled"; the job is done

The key goes only to the origin (scheme, host and port) the client was created for: a Link or a path
that names another origin raises ``ForeignOrigin`` before anything is sent, and a redirect to another
origin is followed without the key.

It is synchronous: a script reads top to bottom, and a caller that wants several requests in flight
(``casimg import`` does) uses threads, one ``Client`` shared by all of them. 429, 502, 503, 504 and
connection errors are retried with jittered exponential backoff (a server's ``Retry-After`` is honoured);
anything else raises at once. Every failure is a ``ClientError``:

- ``ApiUnreachable``: no answer from the API (refused, DNS, timeout), after the retries;
- ``AuthError``: the key is missing, unknown, revoked (401) or its scope too small (403);
- ``NotFoundError``: no such image or job (404);
- ``ApiError``: any other error answer; ``status``, ``title`` and ``detail`` come from its problem+json;
- ``ForeignOrigin``: a request (a Link header's, say) would have sent the key to another origin.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_TIMEOUT = 60.0  # seconds for one HTTP exchange; a submit of 10,000 URLs stays well under it
MAX_SERVER_WAIT = 60.0  # the API holds a POST ?wait= at most this long
LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')
# Headers that carry the key: never sent to an origin other than the API's, on a redirect either.
KEY_HEADERS = frozenset({"x-api-key", "authorization"})
DEFAULT_PORTS = {"http": 80, "https": 443}


class ClientError(Exception):
    """Base of every error this client raises."""


class ApiUnreachable(ClientError):
    """The API did not answer: connection refused, name not found, or a timeout, after the retries."""


class ForeignOrigin(ClientError):
    """A request would have gone, with the key, to an origin other than the API's; nothing was sent."""


class ApiError(ClientError):
    """The API answered with an error (problem+json)."""

    def __init__(self, status: int, title: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {title}: {detail}" if detail and detail != title else f"HTTP {status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.retry_after = retry_after


class AuthError(ApiError):
    """401: no key, or an unknown or revoked one; 403: the key's scope does not allow the operation."""


class NotFoundError(ApiError):
    """404: no such image, blob or job (a job may also have expired)."""


class JobTimeout(ClientError):
    """`Client.wait` gave up before the job was done; `job` is its last known state."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.job_id} not done in time ({job.done} of {job.total} URLs finished)")
        self.job = job


@dataclass(frozen=True)
class Result:
    """The outcome of one URL in a job."""

    url: str
    status: str  # pending, stored, exists or failed
    sha256: str | None = None
    deduplicated: bool = False
    error: str | None = None
    attempts: int | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Result:
        return cls(url=body["url"], status=body["status"], sha256=body.get("sha256"),
                   deduplicated=bool(body.get("deduplicated", False)), error=body.get("error"),
                   attempts=body.get("attempts"))


@dataclass(frozen=True)
class Job:
    job_id: str
    status: str  # queued, running or done
    total: int
    done: int = 0
    stored: int = 0
    existed: int = 0
    failed: int = 0
    created: str | None = None
    finished: str | None = None
    results: list[Result] = field(default_factory=list)

    @property
    def is_done(self) -> bool:
        return self.status == "done"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        return cls(
            job_id=body["job_id"], status=body["status"], total=int(body["total"]),
            done=int(body.get("done", 0)), stored=int(body.get("stored", 0)), existed=int(body.get("existed", 0)),
            failed=int(body.get("failed", 0)), created=body.get("created"), finished=body.get("finished"),
            results=[Result.from_json(item) for item in body.get("results", [])],
        )


@dataclass(frozen=True)
class Image:
    url: str
    sha256: str
    size: int
    content_type: str
    width: int
    height: int
    stored_at: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Image:
        return cls(url=body["url"], sha256=body["sha256"], size=int(body["size"]),
                   content_type=body["content_type"], width=int(body["width"]), height=int(body["height"]),
                   stored_at=body["stored_at"])


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """The casimg API at `api` (e.g. http://127.0.0.1:9000), used with `key`. Safe to share between threads."""

    def __init__(self, api: str, key: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        if not api.startswith(("http://", "https://")):
            raise ValueError(f"API address must start with http:// or https://, not {api!r}")
        self.api = api.rstrip("/")
        self.origin = origin_of(self.api)
        self.key = key
        self._opener = urllib.request.build_opener(_KeyKeepingRedirects(self.origin))
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    # -- the API ----------------------------------------------------------------------------------

    def submit(self, urls: Sequence[str], wait: float = 0.0, callback_url: str | None = None) -> Job:
        """Submit URLs; with `wait` (seconds, at most 60) the server holds the answer until the job is done.

        Without `wait` the returned Job has only job_id, status and total; follow it with `job` or `wait`.
        With `callback_url` the server POSTs the job there when it is done, signed (``verify_signature``).
        """
        path = "/api/images" + (f"?wait={min(wait, MAX_SERVER_WAIT):g}" if wait > 0 else "")
        body: dict[str, Any] = {"image_urls": list(urls)}
        if callback_url is not None:
            body["callback_url"] = callback_url
        response = self.request("POST", path, body,
                                timeout=self.timeout + (min(wait, MAX_SERVER_WAIT) if wait > 0 else 0))
        return Job.from_json(response.json())

    def job(self, job_id: str) -> Job:
        return Job.from_json(self.request("GET", f"/api/jobs/{job_id}").json())

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> Job:
        """Poll a job until it is done; JobTimeout after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.is_done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(job)
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def images(self, limit: int = 100) -> Iterator[Image]:
        """Every stored image, in the index's order (by the SHA-1 of the URL, so not by time), fetched a page of
        `limit` at a time (following Link: rel=next). Each image present throughout comes exactly once."""
        url: str | None = self.api + f"/api/images?{urlencode({'limit': limit})}"
        while url is not None:
            response = self.request("GET", url)
            for item in response.json():
                yield Image.from_json(item)
            match = LINK_NEXT_RE.search(response.headers.get("link", ""))
            # A reference, resolved against the URL asked for (RFC 8288 3.2); request() refuses it if it
            # leads to another origin.
            url = urljoin(url, match.group(1)) if match else None

    def count(self) -> int:
        """How many URLs are stored (the X-Total-Count of the listing)."""
        return int(self.request("GET", "/api/images?limit=1").headers.get("x-total-count", "0"))

    def image(self, url: str) -> bytes:
        """The bytes stored for `url` (exactly as submitted); NotFoundError if none."""
        return self.request("GET", "/api/image?" + urlencode({"url": url})).body

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: its unfinished URLs fail with "cancelled" and it is done. A done job comes back as it is."""
        return Job.from_json(self.request("DELETE", f"/api/jobs/{job_id}").json())

    def delete(self, url: str) -> bool:
        """Forget `url`; True if it was stored, False if it was not."""
        try:
            self.request("DELETE", "/api/image?" + urlencode({"url": url}))
        except NotFoundError:
            return False
        return True

    # -- HTTP -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Response:
        """One API call with retries; `path` may also be an absolute URL of the API's origin."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._once(method, path, body, timeout or self.timeout)
            except ApiUnreachable:
                if attempt > self.retries:
                    raise
                time.sleep(self._delay(attempt, None))
                continue
            if response.status < 400:
                return response
            error = _error_of(response)
            if response.status not in RETRY_STATUSES or attempt > self.retries:
                raise error
            time.sleep(self._delay(attempt, error.retry_after))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return random.uniform(0.5, 1.0) * min(self.max_backoff, self.backoff * 2 ** (attempt - 1))

    def _once(self, method: str, path: str, body: Any, timeout: float) -> Response:
        headers = {"X-API-Key": self.key, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        # An API behind a path prefix (https://host/casimg) keeps it: paths are appended, not resolved.
        url = path if path.startswith(("http://", "https://")) else self.api + path
        if origin_of(url) != self.origin:
            raise ForeignOrigin(f"refusing to send the API key to {_origin_text(url)}: this client is for "
                                f"{_origin_text(self.api)}")
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=timeout) as answer:
                return Response(answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read())
        except urllib.error.HTTPError as answer:
            with answer:
                return Response(answer.code, {k.lower(): v for k, v in answer.headers.items()}, answer.read())
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            cause = getattr(exc, "reason", exc)
            raise ApiUnreachable(f"no answer from {self.api}: {cause}") from None


SIGNATURE_TOLERANCE = 300.0  # seconds a signed callback stays acceptable: a replay of an old one is refused


def verify_signature(secret: str | bytes, header: str, body: bytes | str, tolerance: float = SIGNATURE_TOLERANCE,
                     *, now: float | None = None) -> bool:
    """Whether a casimg callback is genuine: `header` is its X-Casimg-Signature (``t=<unix seconds>,v1=<hex>``),
    `body` its raw body, exactly as received (before any JSON parsing), `secret` the server's
    CASIMG_WEBHOOK_SECRET.

    True when one v1 value is the HMAC-SHA256 of "<t>.<body>" under `secret` and t is within `tolerance`
    seconds of `now` (the clock; 0 or less: any age). Compared in constant time.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    raw = body.encode() if isinstance(body, str) else body
    timestamp, signatures = None, []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    if tolerance > 0 and abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = hmac.new(key, b"%d." % timestamp + raw, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, signature) for signature in signatures)


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of an absolute URL, with the default port of http and https filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number: an origin no other URL shares
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def _origin_text(url: str) -> str:
    scheme, host, port = origin_of(url)
    return f"{scheme}://{host}:{port}"


class _KeyKeepingRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but drops the key headers on a hop to another origin (urllib
    copies every header but the body's to the redirected request)."""

    def __init__(self, origin: tuple[str, str, int | None]) -> None:
        self.origin = origin

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        follow = super().redirect_request(req, fp, code, msg, headers, newurl)
        if follow is not None and origin_of(follow.full_url) != self.origin:
            for name in [name for name in follow.headers if name.lower() in KEY_HEADERS]:
                del follow.headers[name]
            for name in [name for name in follow.unredirected_hdrs if name.lower() in KEY_HEADERS]:
                del follow.unredirected_hdrs[name]
        return follow


def _error_of(response: Response) -> ApiError:
    title, detail = f"HTTP {response.status}", ""
    try:
        problem = response.json()
        title, detail = str(problem.get("title", title)), str(problem.get("detail", ""))
    except (ValueError, AttributeError):
        detail = response.body[:200].decode(errors="replace")
    retry_after = None
    raw = response.headers.get("retry-after")
    if raw and raw.strip().isdigit():
        retry_after = float(raw)
    kind = AuthError if response.status in (401, 403) else NotFoundError if response.status == 404 else ApiError
    return kind(response.status, title, detail, retry_after)
