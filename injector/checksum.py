"""Streaming size and adler32 of a file, without reading it into memory."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

CHUNK = 4 * 1024 * 1024


def adler32_hex(value: int) -> str:
    """Rucio's form: 8 lower-case hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


class Cancelled(Exception):
    """The caller asked to stop reading (a shutdown while a big file was being read)."""


def size_and_adler32(path: str | Path, cancelled: Callable[[], bool] | None = None) -> tuple[int, str]:
    """Read in CHUNK pieces (bounded memory); `cancelled` is asked between pieces."""
    size = 0
    value = 1
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            if cancelled is not None and cancelled():
                raise Cancelled(f"reading {path} stopped after {size} bytes")
            value = zlib.adler32(view[:n], value)
            size += n
    return size, adler32_hex(value)
