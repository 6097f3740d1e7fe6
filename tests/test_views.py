"""The API's JSON shape of an image and its time format."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from casimg.clock import iso
from casimg.index import ImageRecord
from casimg.views import image_json, iso_ms


@pytest.mark.parametrize(
    "ms", [0, 999, 86_399_999, 86_400_000, 1_764_612_345_123, 1_764_612_345_999, 4_102_444_800_000])
def test_iso_ms_is_iso_of_the_same_moment(ms):
    assert iso_ms(ms) == iso(datetime.fromtimestamp(ms / 1000, tz=UTC))


def test_image_json_names_a_record_s_fields_in_order():
    record = ImageRecord(url="http://a/1", sha256="a" * 64, size=3, content_type="image/png", width=4, height=5,
                         stored_at_ms=1_764_612_345_123)
    assert image_json(*record) == {"url": "http://a/1", "sha256": "a" * 64, "size": 3, "content_type": "image/png",
                                   "width": 4, "height": 5, "stored_at": "2025-12-01T18:05:45.123000Z",
                                   "placeholder": None}
