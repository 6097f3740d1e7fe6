"""The blob store on a real directory."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from casimg.blobs import BlobStore, is_digest


@pytest.fixture
def blobs(tmp_path):
    store = BlobStore(tmp_path)
    store.create_dirs()
    return store


def _temp(blobs: BlobStore, data: bytes):
    path = blobs.tmp_dir / f"dl-{hashlib.md5(data).hexdigest()}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("digest", "relative"), [
    ("ab" + "cd" + "e" * 60, "blobs/ab/cd/abcd" + "e" * 60),
    ("0" * 64, "blobs/00/00/" + "0" * 64),
    ("f" * 64, "blobs/ff/ff/" + "f" * 64),
])
def test_blob_path_fans_out_by_the_first_two_byte_pairs(blobs, tmp_path, digest, relative):
    assert blobs.blob_path(digest) == tmp_path / relative


@pytest.mark.parametrize(
    "bad", ["", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "a" * 32 + "/" + "a" * 31]
)
def test_blob_path_refuses_anything_but_a_hex_digest(blobs, bad):
    assert not is_digest(bad)
    with pytest.raises(ValueError):
        blobs.blob_path(bad)


def test_link_in_places_a_read_only_file_and_tolerates_an_existing_one(blobs):
    tmp, digest = _temp(blobs, b"bytes")
    blobs.link_in(tmp, digest)
    target = blobs.blob_path(digest)
    assert target.read_bytes() == b"bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    again, _ = _temp(blobs, b"bytes")
    blobs.link_in(again, digest)  # same name, same bytes: success
    assert target.read_bytes() == b"bytes"
    assert list(blobs.iter_digests()) == [digest]


def test_trash_and_restore(blobs):
    tmp, digest = _temp(blobs, b"abc")
    blobs.link_in(tmp, digest)
    trash = blobs.move_to_trash(digest)
    assert trash is not None and not blobs.exists(digest)
    assert blobs.move_to_trash(digest) is None
    blobs.restore_from_trash(trash, digest)
    assert blobs.read(digest) == b"abc"
    blobs.discard(trash)
    blobs.discard(trash)  # already gone is fine
    assert [left.kind for left in blobs.leftovers()] == ["tmp"]


def test_trash_works_in_a_data_dir_without_a_trash_directory(tmp_path):
    store = BlobStore(tmp_path)  # what `casimg serve` has: tmp/ and blobs/ appear on use, trash/ never did
    store.tmp_dir.mkdir()
    tmp, digest = _temp(store, b"abc")
    store.link_in(tmp, digest)
    trash = store.move_to_trash(digest)
    assert trash is not None and trash.read_bytes() == b"abc"
    assert not store.exists(digest)


def test_ensure_present_relinks_only_when_missing(blobs):
    tmp, digest = _temp(blobs, b"xyz")
    blobs.link_in(tmp, digest)
    assert blobs.ensure_present(tmp, digest) is False
    os.rename(blobs.blob_path(digest), blobs.trash_dir / f"{digest}.1")
    assert blobs.ensure_present(tmp, digest) is True
    assert blobs.read(digest, 1, 1) == b"y"


def test_leftovers_name_trash_digests(blobs):
    digest = "a" * 64
    (blobs.trash_dir / f"{digest}.abc").write_bytes(b"")
    (blobs.tmp_dir / "dl-1.part").write_bytes(b"")
    found = {(left.kind, left.digest) for left in blobs.leftovers()}
    assert found == {("trash", digest), ("tmp", None)}


def test_hash_file_matches_hashlib(blobs):
    tmp, digest = _temp(blobs, os.urandom(3 * 1024 * 1024 + 5))
    assert blobs.hash_file(tmp) == digest
