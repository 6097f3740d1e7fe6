"""The OpenAPI 3.1 document served at /openapi.json, one entry per route in app.routes.

tests/test_openapi.py fails when a route and this document disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from casimg import __version__
from casimg.schema import CURSOR_DIGITS, RECENT_CURSOR_PREFIX, RECENT_KEY_BYTES, Order


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


AUTH_ERRORS = {
    "401": _problem("No API key, or an unknown or revoked one"),
    "403": _problem("The key's scope does not allow this"),
    "429": _problem("Over the key's request rate, or too many failed authentications from this address; "
                    "retry after Retry-After seconds"),
    "503": _problem("Redis or the blob directory is unavailable; retry after Retry-After seconds"),
}
RANGE_PARAM = {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
               "description": "One byte range, bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX: a 206 of that part "
                              "(a 200 when it is the whole), a 416 when it starts past the end or is bytes=-0. "
                              "Anything else is ignored (a 200)."}
URL_PARAM = {"name": "url", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1},
             "description": "The image's original URL, exactly as it was submitted"}
PLACEHOLDER_TEXT = ("ThumbHash (base64) of the image, to paint before it loads; made shortly after the image is "
                    "stored, so null until then, and when none was made")
IMAGE_HEADERS = {
    "ETag": {"schema": {"type": "string"}, "description": 'The quoted SHA-256 of the bytes (of the variant, for one)'},
    "Vary": {"schema": {"type": "string"}, "description": "Accept, for format=auto"},
    "Content-Length": {"schema": {"type": "integer"}},
}
# The next page, while there is one: a query-only reference (RFC 3986 4.2) to resolve against the URL
# of the request, so it keeps that URL's scheme, host and path (a proxy's prefix included).
# Each order has a cursor of its own form: the default's is 40 hex digits, the newest-first's "r." and 52.
RECENT_CURSOR_PATTERN = f"{RECENT_CURSOR_PREFIX.replace('.', '[.]')}[0-9a-f]{{{RECENT_KEY_BYTES * 2}}}"
CURSOR_PATTERN = f"([0-9a-f]{{{CURSOR_DIGITS}}}|{RECENT_CURSOR_PATTERN})"
LINK_PATTERN = (f'^<\\?limit=[0-9]+(&order=recent)?(&prefix=[^&>]*)?(&contains=[^&>]*)?(&host=[^&>]*)?'
                f'&cursor={CURSOR_PATTERN}>; rel="next"$')
FILTER_TEXT = ("Filters, combinable with each other and with either order: a page looks at up to 10,000 URLs "
               "and may then end with fewer rows than limit (none, even) and a Link to go on from; "
               "X-Total-Count stays the number of URLs indexed")
LINK_TEXT = ('The next page, while there is one: <?limit=N&cursor=C>; rel="next" (with the order and filters '
             "asked for before the cursor), a query-only reference to resolve against the URL of this request "
             "(it never names a scheme, host or path)")
IMAGE_FIELDS = ["url", "sha256", "size", "content_type", "width", "height", "stored_at"]
IMAGE_PROPERTIES = {
    "url": {"type": "string"}, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "size": {"type": "integer"}, "content_type": {"type": "string"},
    "width": {"type": "integer"}, "height": {"type": "integer"},
    "stored_at": {"type": "string", "format": "date-time"},
    "placeholder": {"type": ["string", "null"], "description": PLACEHOLDER_TEXT},
}
BYTES = {"image/*": {"schema": {"type": "string", "format": "binary"}}}
VARIANT_PARAMS = [
    {"name": "w", "in": "query", "schema": {"type": "integer", "minimum": 1},
     "description": "A variant's width (at most CASIMG_VARIANT_MAX_SIDE); never above the original's unless enlarge=1"},
    {"name": "h", "in": "query", "schema": {"type": "integer", "minimum": 1}, "description": "A variant's height"},
    {"name": "fit", "in": "query", "schema": {"type": "string", "enum": ["inside", "cover", "fill", "pad"]},
     "description": "inside (default): within w x h, aspect kept; cover: fills it, cropped around the centre; "
                    "fill: stretched; pad: inside, letterboxed with bg"},
    {"name": "bg", "in": "query", "schema": {"type": "string", "pattern": "^#?[0-9a-fA-F]{6}$"},
     "description": "RRGGBB: pad's letterbox, and transparency flattened into JPEG (default ffffff)"},
    {"name": "enlarge", "in": "query", "schema": {"type": "string", "enum": ["0", "1", "false", "true"]}},
    {"name": "format", "in": "query",
     "schema": {"type": "string", "enum": ["jpeg", "jpg", "png", "webp", "avif", "gif", "auto"]},
     "description": "auto: AVIF or WebP as Accept allows, else JPEG (PNG with transparency), with Vary: Accept"},
    {"name": "q", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100},
     "description": "Quality; defaults JPEG 85, WebP 80, AVIF 60"},
    {"name": "animated", "in": "query", "schema": {"type": "string", "enum": ["0", "1", "false", "true"]},
     "description": "1: keep an animation's frames (WebP or GIF output)"},
    {"name": "variant", "in": "query", "schema": {"type": "string"},
     "description": "A preset from CASIMG_VARIANT_PRESETS; alone (with other variant parameters: a 400)"},
]
VARIANT_ERRORS = {
    "400": _problem("A bad variant parameter or one past a limit (the problem's parameter names it), no url, "
                    "or a new variant asked of a variant's digest (parameter: digest)"),
    "422": _problem("The image cannot be made into the variant: its decode would need more than "
                    "CASIMG_RENDER_MAX_MEMORY, or it does not decode"),
    "503": _problem("A render ran past CASIMG_RENDER_TIMEOUT, or Redis or the blob store is unavailable; "
                    "retry after Retry-After seconds"),
}


# GET only (handlers._BytesHandler.send_blob): a HEAD is answered with the object's headers, not sent away.
PRESIGNED_REDIRECT = {
    "302": {"description": "With CASIMG_S3_REDIRECT=presigned: the object store's own URL for the bytes, valid "
                           "for 5 minutes, which answers Range itself (Cache-Control: no-store)",
            "headers": {"Location": {"schema": {"type": "string"}, "description": "A presigned URL"}}},
}


def _bytes_responses(cache: str) -> dict[str, Any]:
    return {
        "200": {"description": f"The bytes; Cache-Control: {cache}", "headers": IMAGE_HEADERS, "content": BYTES},
        "206": {"description": "The single byte range asked for with Range", "content": BYTES},
        "304": {"description": "If-None-Match matched the ETag"},
        "404": _problem("Not stored"),
        "416": _problem("The Range cannot be satisfied"),
        **AUTH_ERRORS,
    }


def _variant_params(presets: Sequence[str]) -> list[dict[str, Any]]:
    """VARIANT_PARAMS, with the configured preset names as the variant parameter's enum (none configured:
    no enum, since an empty one would say that no value is valid in a way most tools reject)."""
    if not presets:
        return VARIANT_PARAMS
    named = {"name": "variant", "in": "query", "schema": {"type": "string", "enum": list(presets)},
             "description": "A preset of CASIMG_VARIANT_PRESETS; alone (with other variant parameters: a 400)"}
    return [named if param["name"] == "variant" else param for param in VARIANT_PARAMS]


def openapi_document(presets: Sequence[str] = ()) -> dict[str, Any]:
    """The API document; `presets`: the variant preset names this server accepts, listed as an enum."""
    job_response = _json("The job and one result per distinct URL", _ref("Job"))
    variant_params = _variant_params(presets)
    return {
        "openapi": "3.1.0",
        "info": {"title": "casimg", "version": __version__,
                 "description": "Download images by URL, store each distinct content once, fetch them back by URL."},
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "token": {"type": "http", "scheme": "bearer",
                          "description": "Authorization: Bearer KEY (or the older form Token KEY)"},
            },
            "schemas": {
                "Problem": {
                    "type": "object", "additionalProperties": False, "required": ["title", "status", "detail"],
                    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                   "status": {"type": "integer"}, "detail": {"type": "string"},
                                   "parameter": {"type": "string", "description": "The bad variant parameter"}},
                },
                "Submit": {
                    # A URL over CASIMG_MAX_URL_LENGTH is no request error: it fails in the job ("URL too long").
                    # Other members are ignored, so clients that send more than image_urls keep working.
                    "type": "object", "additionalProperties": True, "required": ["image_urls"],
                    "properties": {
                        "image_urls": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                        "callback_url": {
                            "type": ["string", "null"], "maxLength": 2048,
                            "description": "http(s) URL POSTed the job (as GET /api/jobs/{job_id} answers it, "
                                           "without callback; past 64 KiB without results and with results_url) "
                                           "when it is done, signed in X-Casimg-Signature: t=<unix seconds>,"
                                           "v1=<hex HMAC-SHA256 of '<t>.<body>' under CASIMG_WEBHOOK_SECRET>. "
                                           "Retried with backoff until a 2xx, for CASIMG_WEBHOOK_RETRY_FOR "
                                           "seconds. Absent: CASIMG_WEBHOOK_URL; empty or null: none. A 400 when "
                                           "the server has no CASIMG_WEBHOOK_SECRET, or the address is refused.",
                        },
                    },
                },
                "Accepted": {
                    "type": "object", "additionalProperties": False, "required": ["job_id", "status", "total"],
                    "properties": {"job_id": {"type": "string"}, "status": {"type": "string", "enum": ["queued"]},
                                   "total": {"type": "integer", "minimum": 1}},
                },
                "Result": {
                    "type": "object", "additionalProperties": False, "required": ["url", "status"],
                    "properties": {
                        "url": {"type": "string"},
                        "status": {"type": "string", "enum": ["pending", "stored", "exists", "failed"]},
                        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        "deduplicated": {"type": "boolean"},
                        "error": {"type": "string"},
                        "attempts": {"type": "integer"},
                        "width": {"type": "integer"}, "height": {"type": "integer"},
                        "placeholder": {"type": ["string", "null"], "description": PLACEHOLDER_TEXT},
                    },
                },
                "Job": {
                    "type": "object", "additionalProperties": False,
                    "required": ["job_id", "status", "total", "done", "stored", "existed", "failed", "results"],
                    "properties": {
                        "job_id": {"type": "string"},
                        "status": {"type": "string", "enum": ["queued", "running", "done"]},
                        "total": {"type": "integer"}, "done": {"type": "integer"}, "stored": {"type": "integer"},
                        "existed": {"type": "integer"}, "failed": {"type": "integer"},
                        "created": {"type": "string", "format": "date-time"},
                        "finished": {"type": ["string", "null"], "format": "date-time"},
                        "callback": _ref("Callback"),
                        "results": {"type": "array", "items": _ref("Result")},
                    },
                },
                "Callback": {
                    # Only on jobs submitted with a callback URL: other jobs answer as they always did.
                    "type": "object", "additionalProperties": False, "required": ["state", "attempts", "last_status"],
                    "properties": {
                        "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                        "attempts": {"type": "integer", "minimum": 0},
                        "last_status": {"type": ["integer", "null"],
                                        "description": "HTTP status of the last attempt; null if none answered"},
                        "last_error": {"type": "string",
                                       "description": "Why the last attempt got no answer (timeout, refused address)"},
                    },
                },
                "Key": {
                    "type": "object", "additionalProperties": False, "required": ["id", "name", "scope"],
                    "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                   "scope": {"type": "string", "enum": ["read", "write", "admin"]}},
                },
                "SharedUrls": {
                    "type": "object", "additionalProperties": False, "required": ["sha256", "count", "urls"],
                    "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                   "count": {"type": "integer", "minimum": 1},
                                   "urls": {"type": "array", "items": {"type": "string"}}},
                },
                "Image": {
                    "type": "object", "additionalProperties": False,
                    "required": IMAGE_FIELDS, "properties": IMAGE_PROPERTIES,
                },
                "ImageMeta": {
                    "type": "object", "additionalProperties": False,
                    "required": [*IMAGE_FIELDS, "references"],
                    "properties": {**IMAGE_PROPERTIES, "references": {
                        "type": "integer", "minimum": 0,
                        "description": "How many URLs point at these bytes, this one included (0 only if "
                                       "it was deleted while answering)"}},
                },
            },
        },
        "security": [{"apiKey": []}, {"token": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "security": [],
                                 "responses": {"200": _json("Alive", {"type": "object"})}}},
            "/readyz": {"get": {"summary": "Redis answers and the blob directory is writable", "security": [],
                                "responses": {"200": _json("Ready", {"type": "object"}),
                                              "503": _problem("Not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format); on CASIMG_METRICS_PORT when set, "
                                            "and needing a read key when CASIMG_METRICS_REQUIRE_KEY is on",
                                 "security": [],
                                 "responses": {"200": {"description": "Prometheus text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **AUTH_ERRORS}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})}}},
            "/api/images": {
                "get": {
                    "summary": "List stored images in the index's order (by the SHA-1 of the URL) or newest first, "
                               "paginated with Link: rel=next",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "order", "in": "query", "schema": {"type": "string", "enum": [o.value for o in Order]},
                         "description": "sha1 (the default): by the SHA-1 of the URL. recent: newest first, by "
                                        "(stored_at, SHA-1 of the URL) descending"},
                        {"name": "cursor", "in": "query",
                         "schema": {"type": "string", "pattern": f"^{CURSOR_PATTERN}$"},
                         "description": "Opaque; take it from the Link header. Each order has its own form "
                                        "(40 hex digits; r. and 52 with order=recent), and a cursor of the other "
                                        "order is a 400"},
                        {"name": "prefix", "in": "query", "schema": {"type": "string"},
                         "description": "Only URLs that start with this, byte for byte. " + FILTER_TEXT},
                        {"name": "contains", "in": "query", "schema": {"type": "string"},
                         "description": "Only URLs that hold this, byte for byte (no pattern). " + FILTER_TEXT},
                        {"name": "host", "in": "query", "schema": {"type": "string"},
                         "description": "Only URLs on this host (without the port; ASCII letters in any case). "
                                        + FILTER_TEXT},
                    ],
                    "responses": {
                        "200": {**_json("A page of images", {"type": "array", "items": _ref("Image")}),
                                "headers": {"X-Total-Count": {"schema": {"type": "integer"}},
                                            "Link": {"schema": {"type": "string", "pattern": LINK_PATTERN},
                                                     "description": LINK_TEXT}}},
                        "400": _problem("Bad limit, order or cursor, or a filter that is not UTF-8"),
                        **AUTH_ERRORS,
                    },
                },
                "post": {
                    "summary": "Submit image URLs to download",
                    "parameters": [{"name": "wait", "in": "query",
                                    "schema": {"type": "number", "minimum": 0, "maximum": 60},
                                    "description": "Hold the answer up to this many seconds for the job to finish"}],
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref("Submit")}}},
                    "responses": {
                        "200": job_response,
                        "202": _json("Accepted (or, with wait, not finished yet)",
                                     {"oneOf": [_ref("Accepted"), _ref("Job")]}),
                        "400": _problem("The body is not what is described"),
                        "413": _problem("Too many URLs, too large a body, or more bytes of URLs than the key "
                                        "may have in unfinished jobs (CASIMG_MAX_QUEUED_BYTES)"),
                        **AUTH_ERRORS,
                        "429": _problem("Over the request rate, or the key's unfinished jobs are too many "
                                        "(CASIMG_MAX_JOBS_IN_FLIGHT) or hold too many bytes of URLs "
                                        "(CASIMG_MAX_QUEUED_BYTES); retry after Retry-After seconds"),
                    },
                },
            },
            "/api/jobs/{job_id}": {
                "get": {
                    "summary": "A job's progress and per-URL results",
                    "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": job_response, "404": _problem("Unknown or expired job"), **AUTH_ERRORS},
                },
                "delete": {
                    "summary": "Cancel a job: its unfinished URLs fail with 'cancelled' (downloads in flight are "
                               "abandoned, nothing of them is stored), images already stored stay, the job is done "
                               "(its callback, if any, is sent). A key cancels its own jobs; an admin key any job",
                    "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json("The job, now done; a job done already is answered as it is (idempotent)",
                                     _ref("Job")),
                        "404": _problem("Unknown or expired job"),
                        **AUTH_ERRORS,
                        "403": _problem("The key's scope is read, or the job was submitted with another key "
                                        "(any key may read a job, so a 403 tells nothing new)"),
                    },
                },
            },
            "/api/image": {
                "get": {"summary": "The bytes stored for a URL, or a variant of them (w, h, format, ...)",
                        "parameters": [URL_PARAM, RANGE_PARAM, *variant_params],
                        "responses": {**_bytes_responses("private, no-cache"), **PRESIGNED_REDIRECT,
                                      **VARIANT_ERRORS}},
                "head": {"summary": "The headers of GET", "parameters": [URL_PARAM, RANGE_PARAM, *variant_params],
                         "responses": {**_bytes_responses("private, no-cache"), **VARIANT_ERRORS}},
                "delete": {"summary": "Forget a URL; its bytes go with their last URL", "parameters": [URL_PARAM],
                           "responses": {"204": {"description": "Deleted"}, "400": _problem("No url given"),
                                         "404": _problem("Not stored"), **AUTH_ERRORS}},
            },
            "/api/image/meta": {
                "get": {"summary": "What the index holds about the image stored for a URL, and how many URLs "
                                   "share its bytes", "parameters": [URL_PARAM],
                        "responses": {"200": _json("The image, as a listing row, with its reference count",
                                                   _ref("ImageMeta")),
                                      "400": _problem("No url given"), "404": _problem("Not stored"), **AUTH_ERRORS}},
            },
            "/api/key": {
                "get": {"summary": "The presented key's id, name and scope (read, write or admin)",
                        "responses": {"200": _json("The key", _ref("Key")), **AUTH_ERRORS}},
            },
            "/api/blobs/{digest}/urls": {
                "get": {"summary": "How many URLs share a content, and which: the count is one lookup, the URLs a "
                                   "walk of the whole index in steps of about a millisecond of Redis (a second or "
                                   "more per million URLs; docs/gallery.md)",
                        "parameters": [{"name": "digest", "in": "path", "required": True,
                                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                                       {"name": "limit", "in": "query",
                                        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                                        "description": "Most URLs listed (default 100; 0: the count alone, "
                                                       "without the walk); count is always exact"}],
                        "responses": {"200": _json("The count and the URLs, sorted", _ref("SharedUrls")),
                                      "400": _problem("Bad limit"), "404": _problem("Not stored"),
                                      **AUTH_ERRORS}},
            },
            "/api/blobs/{digest}": {
                "get": {"summary": "The bytes of a stored content (an original or a variant), by digest, or a "
                                   "variant of them",
                        "parameters": [{"name": "digest", "in": "path", "required": True,
                                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}, RANGE_PARAM,
                                       *variant_params],
                        "responses": {**_bytes_responses("private, max-age=31536000, immutable"),
                                      **PRESIGNED_REDIRECT, **VARIANT_ERRORS}},
                "head": {"summary": "The headers of GET",
                         "parameters": [{"name": "digest", "in": "path", "required": True,
                                         "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}, RANGE_PARAM,
                                        *variant_params],
                         "responses": {**_bytes_responses("private, max-age=31536000, immutable"),
                                       **VARIANT_ERRORS}},
            },
        },
    }
