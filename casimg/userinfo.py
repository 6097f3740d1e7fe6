"""Credentials in URLs (``http://user:secret@host/``): found, and cut out.

casimg never downloads with credentials: a submitted URL that carries any is refused (queue.py keeps it
with its userinfo replaced by ``***`` and fails it with ``CREDENTIALS``), because the URL is what the
index and the job results hold, and those are listed to every read key and kept in Redis in clear. The
same replacement runs over every log line (logtext.py), for URLs that reach a log by another way (an
``/api/image?url=`` query, an exception's message).

What counts as userinfo is read the widest way any parser reads it: everything between ``scheme://``
(or ``scheme:\\\\``) and the *last* ``@`` before the first ``/``, ``?`` or ``#``. urllib and yarl take
the last ``@`` too, so no secret a downloader would send is left in; a URL read the narrow way by some
other parser (one that stops at ``\\``, say) is only refused more often.
"""

from __future__ import annotations

import re

CREDENTIALS = "credentials in URL"
MASK = "***"

# A URL as submitted: leading C0 controls and spaces are skipped, as a WHATWG parser skips them.
_URL = re.compile(r"[\x00-\x20]*[A-Za-z][A-Za-z0-9+.\-]*:[/\\]{2}(?P<userinfo>[^/?#]*)@")
# URLs inside free text, raw or percent-encoded once (a query parameter's value in the access log).
# Whitespace ends a URL in text; the greedy span backs off to the last @ of the authority.
_IN_TEXT = re.compile(
    r"(?P<raw>[A-Za-z][A-Za-z0-9+.\-]*:[/\\]{2})[^/?#\s]*@"
    r"|(?P<encoded>[A-Za-z][A-Za-z0-9+.\-]*%3[Aa](?:%2[Ff]|%5[Cc]){2})(?:(?!%2[Ff]|%3[Ff]|%23)[^/?#&\s])*%40"
)


def has_userinfo(url: str) -> bool:
    """Whether `url` has a userinfo part (credentials), even an empty one."""
    return _URL.match(url) is not None


def without_userinfo(url: str) -> str:
    """`url` with its userinfo replaced by MASK: http://user:secret@host/ -> http://***@host/."""
    match = _URL.match(url)
    if match is None:
        return url
    return url[:match.start("userinfo")] + MASK + url[match.end("userinfo"):]


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by MASK, raw or percent-encoded."""
    if "@" not in text and "%40" not in text:  # the common case, a line with no URL credentials, costs a scan
        return text
    return _IN_TEXT.sub(_masked, text)


def _masked(match: re.Match[str]) -> str:
    if match.group("raw"):
        return f"{match.group('raw')}{MASK}@"
    return f"{match.group('encoded')}{MASK}%40"
