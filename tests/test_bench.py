"""The benchmark's two ingest references (scripts/bench.py), against the real origin.

The limit and the required work are what casimg's ingest is measured against, so each must do what
its row in BENCHMARKS.md says: the limit keeps any body, the required work only a valid image.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from casimg.errors import InvalidImage
from tests.origin import Origin, image_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench

URLS = ["/img/1.jpg", "/img/2.png", "/img/3.webp", "/img/4.gif"]


@pytest.mark.parametrize("fetch", [bench.plain_fetch, bench.required_work_fetch])
def test_a_reference_keeps_every_body(fetch, origin: Origin, tmp_path: Path) -> None:
    result = asyncio.run(fetch([origin.url(path) for path in URLS], tmp_path))
    bodies = [image_bytes(n, path.rsplit(".", 1)[1]) for n, path in enumerate(URLS, 1)]
    assert result.images == len(URLS)
    assert result.bytes == sum(map(len, bodies))
    assert sorted(path.read_bytes() for path in tmp_path.glob("*.bin")) == sorted(bodies)


def test_the_required_work_validates_as_casimg_does(origin: Origin, tmp_path: Path) -> None:
    urls = [origin.url("/img/1.jpg"), origin.url("/truncated.jpg")]
    (tmp_path / "limit").mkdir()
    (tmp_path / "required").mkdir()
    asyncio.run(bench.plain_fetch(urls, tmp_path / "limit"))  # the limit takes the half JPEG
    with pytest.raises(InvalidImage, match="truncated"):
        asyncio.run(bench.required_work_fetch(urls, tmp_path / "required"))
