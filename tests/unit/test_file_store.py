"""The content-addressed file store on a real (temporary) file system."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

import pytest

from services.errors import InvalidInput, ServiceError
from services.file_store import FileStore, StoredFileCorrupt, StoredFileMissing

CONTENT = b"Landlord Gas Safety Record\n"
SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "files")


def test_a_written_file_is_stored_under_its_hash_in_two_levels_of_directories(store: FileStore) -> None:
    sha = store.write(CONTENT)

    assert sha == SHA
    assert store.path_of(sha) == store.root / SHA[:2] / SHA[2:4] / SHA
    assert store.path_of(sha).read_bytes() == CONTENT
    assert store.read(sha) == CONTENT
    assert store.exists(sha)


def test_writing_the_same_bytes_again_changes_nothing_not_even_the_mtime(store: FileStore) -> None:
    store.write(CONTENT)
    path = store.path_of(SHA)
    os.utime(path, (1_000_000, 1_000_000))

    assert store.write(CONTENT) == SHA
    assert path.stat().st_mtime == 1_000_000
    assert sorted(p.name for p in path.parent.iterdir()) == [SHA]


def test_a_write_leaves_no_temporary_file_behind(store: FileStore) -> None:
    store.write(CONTENT)
    store.write(b"other")

    files = sorted(p.name for p in store.root.rglob("*") if p.is_file())
    assert files == sorted([SHA, hashlib.sha256(b"other").hexdigest()])


def test_a_write_that_fails_before_the_rename_leaves_neither_a_file_nor_a_temporary(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write(CONTENT)

    assert not store.exists(SHA)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_a_write_whose_content_does_not_hash_to_the_expected_value_stores_nothing(store: FileStore) -> None:
    with pytest.raises(ValueError, match="not the expected"):
        store.write(CONTENT, expected_sha256="0" * 64)

    assert not store.exists(SHA)


@pytest.mark.parametrize(
    "bad", ["", "abc", SHA.upper(), SHA[:-1], SHA + "0", "../" + SHA[3:], "g" * 64, SHA[:63] + "/"]
)
def test_a_path_is_only_made_from_64_lowercase_hex_characters(store: FileStore, bad: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        store.path_of(bad)

    assert refused.value.field == "sha256"
    assert refused.value.rule == "sha256_hex"


def test_reading_a_hash_that_is_not_stored_raises_stored_file_missing(store: FileStore) -> None:
    with pytest.raises(StoredFileMissing) as missing:
        store.read(SHA)

    assert isinstance(missing.value, ServiceError)
    assert not store.exists(SHA)


def test_reading_a_file_whose_bytes_changed_on_disk_raises_stored_file_corrupt(store: FileStore) -> None:
    store.write(CONTENT)
    store.path_of(SHA).write_bytes(b"tampered")

    with pytest.raises(StoredFileCorrupt):
        store.read(SHA)


def test_discard_removes_a_file_and_says_whether_it_was_there(store: FileStore) -> None:
    store.write(CONTENT)

    assert store.discard(SHA) is True
    assert not store.exists(SHA)
    assert store.discard(SHA) is False


def test_stored_lists_every_stored_file_and_skips_temporaries_and_strangers(store: FileStore) -> None:
    store.write(CONTENT)
    directory = store.path_of(SHA).parent
    (directory / ".tmp-abandoned").write_bytes(b"half")
    (directory / "notes.txt").write_bytes(b"not ours")
    misplaced = hashlib.sha256(b"misplaced").hexdigest()
    (directory / misplaced).write_bytes(b"misplaced")

    assert [sha for sha, _mtime in store.stored()] == [SHA]


def test_stored_is_empty_before_anything_was_written(store: FileStore) -> None:
    assert list(store.stored()) == []


def test_stale_temporaries_are_removed_and_fresh_ones_kept(store: FileStore) -> None:
    store.write(CONTENT)
    directory = store.path_of(SHA).parent
    stale = directory / ".tmp-stale"
    fresh = directory / ".tmp-fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (1_000_000, 1_000_000))

    assert store.discard_stale_temporaries(timedelta(hours=1)) == 1
    assert not stale.exists()
    assert fresh.exists()
    assert store.exists(SHA)
