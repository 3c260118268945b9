"""Content-addressed storage of uploaded document files on the local file system.

A file lives at `root/ab/cd/<sha256>` (the first two byte pairs of its hash as directories, so
no directory grows to millions of entries). The name is the content's hash, which makes a
write idempotent (the same bytes land on the same path), makes concurrent writers of the same
bytes harmless, and lets a reader check what it got. Writes are atomic and durable: a temporary
file in the target directory is fsynced, renamed over the final name and the directory fsynced,
so after a crash a path holds either nothing or the whole file, never a torn one.

Whether a stored file is still wanted is the database's business (a documents row references
its hash); services.uploads keeps the two in step.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from services.errors import InvalidInput, ServiceError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TEMP_PREFIX = ".tmp-"


class FileStoreError(ServiceError):
    """The file store cannot give back what a document row says it holds."""


class StoredFileMissing(FileStoreError):
    """No file is stored under this hash."""


class StoredFileCorrupt(FileStoreError):
    """The stored bytes no longer hash to their name (disk corruption or tampering)."""


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise InvalidInput(
                f"sha256 must be 64 lowercase hexadecimal characters; got {sha256!r}",
                field="sha256", rule="sha256_hex",
            )
        return self.root / sha256[0:2] / sha256[2:4] / sha256

    def write(self, content: bytes, *, expected_sha256: str | None = None) -> str:
        """Stores `content` and returns its sha256. Writing bytes that are already stored
        changes nothing (not even the file's mtime, which the orphan sweep reads).

        expected_sha256: refuse (ValueError, nothing written) if the content hashes otherwise;
        a caller that hashed the bytes earlier passes it so a mix-up cannot store one file
        under the name the database will record for another.
        """
        sha256 = hashlib.sha256(content).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise ValueError(f"content hashes to {sha256}, not the expected {expected_sha256}")
        final = self.path_of(sha256)
        if final.is_file():
            return sha256
        self._make_directories(final.parent)
        fd, temporary = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(final.parent)
        return sha256

    def read(self, sha256: str) -> bytes:
        path = self.path_of(sha256)
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            raise StoredFileMissing(f"no stored file for sha256 {sha256}") from None
        if hashlib.sha256(content).hexdigest() != sha256:
            raise StoredFileCorrupt(f"the stored file {sha256} no longer matches its hash")
        return content

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def discard(self, sha256: str) -> bool:
        """Removes the file if it is there; says whether it was. Callers decide that no row
        references it (services.uploads does, under the file's advisory lock)."""
        path = self.path_of(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_directory(path.parent)
        return True

    def stored(self) -> Iterator[tuple[str, float]]:
        """Every stored file as (sha256, mtime), in no particular order; temporaries and
        anything else that is not a stored file are skipped."""
        if not self.root.is_dir():
            return
        for path in self.root.glob("??/??/*"):
            name = path.name
            if _SHA256.match(name) and path.parent.parent.name == name[0:2] and path.parent.name == name[2:4]:
                try:
                    yield name, path.stat().st_mtime
                except FileNotFoundError:
                    continue

    def discard_stale_temporaries(self, older_than: timedelta) -> int:
        """Removes temporary files a killed writer left behind (none is younger than any write
        in progress can be); returns how many."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than.total_seconds()
        removed = 0
        for path in self.root.glob(f"??/??/{_TEMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _make_directories(self, directory: Path) -> None:
        """Creates root/ab/cd as needed, fsyncing each parent whose entries changed, so a
        renamed file is not lost with a directory entry that never reached the disk."""
        missing = []
        current = directory
        while not current.is_dir():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
