"""Politeness to origins: the X-Robots-Tag grammar, robots.txt, and the per-origin rate and cool-downs."""

from __future__ import annotations

from casimg.politeness import opted_out

REFUSED = ("noimageindex", "noai", "noimageai")


def test_x_robots_tag_directives_are_read_per_robot():
    assert opted_out(["noai"], REFUSED) == "noai"
    assert opted_out(["noindex , NOIMAGEAI"], REFUSED) == "noimageai"
    assert opted_out(["casimg: noimageindex"], REFUSED) == "noimageindex"
    assert opted_out(["otherbot: noai, noimageai"], REFUSED) is None
    assert opted_out(["otherbot: noindex", "noai"], REFUSED) == "noai"  # each header value starts anew
    assert opted_out(["max-image-preview: none, noai"], REFUSED) == "noai"  # a valued directive, not a robot
    assert opted_out(["unavailable_after: 25 Jun 2030 15:00:00 PST"], REFUSED) is None
    assert opted_out(["noai"], ()) is None
    assert opted_out([], REFUSED) is None
