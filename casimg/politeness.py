"""Politeness to origins: what an origin's owner asks of casimg, and how often casimg may ask it.

- **Opt-out headers** (``opted_out``): an ``X-Robots-Tag`` naming one of the refused directives
  (``noimageindex``, ``noai``, ``noimageai`` by default), for every robot or for casimg's token, fails the
  download before its body is read.
"""

from __future__ import annotations

from collections.abc import Iterable

ROBOTS_TOKEN = "casimg"  # the product token matched against robots.txt groups and X-Robots-Tag prefixes
# X-Robots-Tag directives that carry a value after a colon: their colon is not a user-agent prefix.
VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def opted_out(values: Iterable[str], refused: Iterable[str], token: str = ROBOTS_TOKEN) -> str | None:
    """The first refused directive that the X-Robots-Tag header `values` set for casimg, else None.

    Each value is a comma-separated list of directives, optionally after a user-agent prefix
    (``casimg: noai, noimageai``) that applies to the directives after it in that value; directives
    without a prefix are for every robot, those after another robot's prefix are not casimg's.
    """
    wanted = {directive.strip().lower() for directive in refused}
    if not wanted:
        return None
    for value in values:
        agent: str | None = None
        for part in value.split(","):
            directive = part.strip().lower()
            name, colon, rest = directive.partition(":")
            if colon and name.strip() not in VALUED_DIRECTIVES:
                agent, directive = name.strip(), rest.strip()
            if agent not in (None, token):
                continue
            if directive in wanted:
                return directive
    return None
