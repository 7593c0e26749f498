"""File fingerprints: the sha256 that checkpoint manifests and evaluation records carry."""

from __future__ import annotations

import hashlib

from interleaf.fingerprint import file_digest, file_hash


def test_a_file_is_its_size_and_sha256_read_in_chunks(tmp_path):
    data = bytes(range(256)) * 20_000  # 5 MB: more than one chunk
    f = tmp_path / "weights.bin"
    f.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_digest(f) == (len(data), expected)
    assert file_digest(f, sync=True) == (len(data), expected)
    assert file_hash(f) == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_digest(empty) == (0, hashlib.sha256(b"").hexdigest())


def test_a_folder_is_the_sha256_of_its_listing(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("one")
    (tmp_path / "d" / "sub" / "b.txt").write_text("three")
    listing = "a.txt:3\nsub/b.txt:5\n"
    assert file_hash(tmp_path / "d") == "listing:" + hashlib.sha256(listing.encode()).hexdigest()
    (tmp_path / "d" / "a.txt").write_text("two")  # same size: the listing does not read contents
    assert file_hash(tmp_path / "d") == "listing:" + hashlib.sha256(listing.encode()).hexdigest()
    (tmp_path / "d" / "a.txt").write_text("four")
    assert file_hash(tmp_path / "d") != "listing:" + hashlib.sha256(listing.encode()).hexdigest()
