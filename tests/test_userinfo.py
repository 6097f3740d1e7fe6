"""Credentials in URLs: what counts as userinfo, and how it is cut out of one URL and out of free text."""

from __future__ import annotations

import pytest
from yarl import URL

from casimg.userinfo import has_userinfo, redact, without_userinfo


@pytest.mark.parametrize(("url", "kept"), [
    ("http://user:secret@host/x", "http://***@host/x"),
    ("HTTPS://secret@host:8443", "HTTPS://***@host:8443"),
    ("http://a@b:c@host/x?y=1@2", "http://***@host/x?y=1@2"),  # the last @ of the authority, as urllib reads it
    ("http://u:p%40x@host/", "http://***@host/"),
    ("http://@host/", "http://***@host/"),  # empty, refused all the same
    ("  http://u:p@host/", "  http://***@host/"),  # leading spaces, which a WHATWG parser skips
    ("http:\\\\u:p@host/", "http:\\\\***@host/"),
    ("http://host\\@evil/", "http://***@evil/"),  # read the wide way: refused, never sent
])
def test_userinfo_is_found_the_widest_way_a_parser_reads_it(url, kept):
    assert has_userinfo(url)
    assert without_userinfo(url) == kept


@pytest.mark.parametrize("url", ["http://host/x@y", "http://host?x=@", "http://host#@", "mailto:a@b", "http://h/"])
def test_an_at_sign_outside_the_authority_is_not_userinfo(url):
    assert not has_userinfo(url)
    assert without_userinfo(url) == url


def test_whatever_yarl_reads_as_userinfo_is_found():
    for url in ["http://user:secret@host/x", "http://a@b@host/", "http://u:p%40x@host/", "http://u:@h/"]:
        parsed = URL(url)
        assert parsed.raw_user is not None or parsed.raw_password is not None
        assert has_userinfo(url)


@pytest.mark.parametrize(("text", "logged"), [
    ("failed http://u:p@h:80/a@b: x", "failed http://***@h:80/a@b: x"),
    ("url=http%3A%2F%2Fuser%3Asecret%40host%2Fx 200", "url=http%3A%2F%2F***%40host%2Fx 200"),
    ("GET /api/image?url=https%3a%2f%2fa%3Ab%40h%2Fz%40q", "GET /api/image?url=https%3a%2f%2f***%40h%2Fz%40q"),
    ("GET /api/image?url=http://u:s@h/x&limit=1", "GET /api/image?url=http://***@h/x&limit=1"),
    ("two: http://a:1@h/ and ftp://b:2@g/", "two: http://***@h/ and ftp://***@g/"),
    ("mail me at a@b, see http://h/x", "mail me at a@b, see http://h/x"),
])
def test_every_url_in_a_text_loses_its_userinfo(text, logged):
    assert redact(text) == logged
