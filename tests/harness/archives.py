"""Zip archives for upload tests: honest ones through zipfile, hostile ones byte by byte.

zipfile refuses to write some of what an attacker sends (a NUL in a name, an encrypted flag
without encryption, sizes that lie, a pre-built deflate stream), so `raw_zip` writes the local
headers, the central directory and the end record itself, exactly as the format lays them out.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

MiB = 1 << 20
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_END = struct.Struct("<4s4H2LH")
_UTF8_NAME = 0x800
_ENCRYPTED = 0x1
_DOS_DATE_1980_01_01 = (1 << 5) | 1


def zip_of(entries: Iterable[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """An honest archive of (path, content) pairs, written by zipfile."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in entries:
            archive.writestr(name, content)
    return buffer.getvalue()


def zip_with_infos(entries: Iterable[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    """An archive whose entries carry the given ZipInfo attributes (modes, directories)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, content in entries:
            archive.writestr(info, content)
    return buffer.getvalue()


@dataclass(frozen=True)
class RawEntry:
    """One entry as it will be written: `data` is already compressed with `method`."""

    name: bytes
    data: bytes
    file_size: int
    crc: int
    method: int = zipfile.ZIP_STORED
    flag_bits: int = 0
    external_attr: int = 0
    create_system: int = 3

    @classmethod
    def stored(cls, name: str | bytes, content: bytes, **overrides: int) -> RawEntry:
        raw_name = name.encode("utf-8") if isinstance(name, str) else name
        flags = _UTF8_NAME if not raw_name.isascii() else 0
        fields = {"file_size": len(content), "crc": zlib.crc32(content), "flag_bits": flags, **overrides}
        return cls(name=raw_name, data=content, **fields)


def raw_zip(entries: Iterable[RawEntry]) -> bytes:
    out = bytearray()
    central = bytearray()
    count = 0
    for entry in entries:
        offset = len(out)
        out += _LOCAL.pack(
            b"PK\x03\x04", 20, 0, entry.flag_bits, entry.method, 0, _DOS_DATE_1980_01_01,
            entry.crc, len(entry.data), entry.file_size, len(entry.name), 0,
        )
        out += entry.name + entry.data
        central += _CENTRAL.pack(
            b"PK\x01\x02", 20, entry.create_system, 20, 0, entry.flag_bits, entry.method, 0,
            _DOS_DATE_1980_01_01, entry.crc, len(entry.data), entry.file_size, len(entry.name), 0, 0, 0, 0,
            entry.external_attr, offset,
        )
        central += entry.name
        count += 1
    directory_at = len(out)
    out += central
    out += _END.pack(b"PK\x05\x06", 0, 0, count, count, len(central), directory_at, 0)
    return bytes(out)


def traversal_zip(name: str = "../gas_safety/evil.txt", content: bytes = b"escaped\n") -> bytes:
    """An entry whose path leaves the extraction directory (or is otherwise unsafe)."""
    return raw_zip([RawEntry.stored(name, content)])


def symlink_zip(name: str = "gas_safety/cert.txt", target: str = "/etc/passwd") -> bytes:
    """A Unix symlink entry: its content is the link target, its mode says S_IFLNK."""
    return raw_zip([RawEntry.stored(name, target.encode(), external_attr=(stat.S_IFLNK | 0o777) << 16)])


def encrypted_zip(name: str = "gas_safety/cert.txt", content: bytes = b"Gas safety record\n") -> bytes:
    """An entry with the 'encrypted' flag set (the bytes need not really be encrypted)."""
    return raw_zip([RawEntry.stored(name, content, flag_bits=_ENCRYPTED)])


def nested_zip(name: str = "gas_safety/inner.zip") -> bytes:
    """An archive inside an archive."""
    inner = zip_of([("gas_safety/cert.txt", b"Gas safety record\n")])
    return zip_of([(name, inner)])


def bomb_zip(
    uncompressed_bytes: int = 200 * MiB,
    name: str = "gas_safety/zeros.txt",
    *,
    crc: int | None = None,
    declared_size: int | None = None,
) -> bytes:
    """One deflated entry of `uncompressed_bytes` zeros in about a thousandth of the space.

    The deflate stream is one compressed MiB of zeros repeated (each ends with a full flush, so
    the copies are independent blocks), so building a 200 MiB bomb never touches 200 MiB.
    crc=None computes the true CRC; pass a wrong one to prove a reader stopped before the end
    (reading to the end would fail on the CRC instead). declared_size lets the header lie.
    """
    if uncompressed_bytes % MiB:
        raise ValueError("uncompressed_bytes must be a whole number of MiB")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    blocks = uncompressed_bytes // MiB
    stream = block * blocks + compressor.flush()
    if crc is None:
        crc = 0
        zeros = bytes(MiB)
        for _ in range(blocks):
            crc = zlib.crc32(zeros, crc)
    size = uncompressed_bytes if declared_size is None else declared_size
    entry = RawEntry(
        name=name.encode(), data=stream, file_size=size, crc=crc, method=zipfile.ZIP_DEFLATED
    )
    return raw_zip([entry])
