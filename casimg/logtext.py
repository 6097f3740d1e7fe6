"""Text a client chose, as a log line may hold it: cut to a bounded length, credentials cut out, control
characters escaped.

A URL may be 8,192 characters (CASIMG_MAX_URL_LENGTH) and a request target tens of kilobytes; written
whole, one client's requests would fill the log, and a line no longer fits a log shipper's limits.

A URL may also hold a CR LF, and a line that a client can end can be followed by one it wrote whole: a
forged log line. So every record goes through ``loggable`` in the log formatters (cli.py), whatever logged
it: each control character becomes an escape (``\\r``, ``\\n``, ``\\x1b``, ``\\u2028``), and the userinfo
of every URL is replaced by ``***`` (userinfo.py). One record is one line; a traceback's lines follow it
indented, so no line a client shaped can start where a record starts.
"""

from __future__ import annotations

import re

from casimg.userinfo import redact

LOGGED_CHARACTERS = 512  # of a URL or request target; enough to tell URLs apart by their host and path
# C0 and C1 controls and DEL; the Unicode line and paragraph separators, which some viewers break lines
# at; and the bidirectional overrides and marks, which can show a line's text in another order than it has.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
CONTINUATION = "    "  # in front of each further line of a record (a traceback's)


def clip(text: str, limit: int = LOGGED_CHARACTERS) -> str:
    """`text`, or its first `limit` characters and a marker saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text)} characters]"


def loggable(text: str) -> str:
    """`text` as one line of a log may hold it: no credentials, no control characters."""
    text = redact(text)
    if CONTROL.search(text) is None:
        return text
    return CONTROL.sub(_escape, text)


def loggable_lines(text: str, indent: str = CONTINUATION) -> str:
    """A multi-line text (a traceback) for the lines after a record's first: each line cleaned as by
    ``loggable`` and preceded by `indent`."""
    return "\n".join(indent + loggable(line) for line in text.split("\n"))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
