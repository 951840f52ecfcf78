"""The watcher's hashing pool on the real RabbitMQ: small files closed while a big one is being read are announced
before it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from injector.checksum import size_and_adler32
from injector.events import decode_file_closed
from tests.integration.rabbit import declared, depth, get_all, wait_for
from tests.integration.test_watch import watch_settings, watching

pytestmark = pytest.mark.integration

BLOCK = os.urandom(4 * 1024 * 1024)
WANTED = 3.0  # seconds the big file should take to read: far longer than reading a small one (ms)
MOST = 2 * 1024**3


def write_blocks(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(size // len(BLOCK)):
            fh.write(BLOCK)


def big_enough(sample: Path) -> int:
    """A size that takes about WANTED seconds to read here, measured on a 128 MiB sample (at most 2 GiB)."""
    write_blocks(sample, 128 * 1024**2)
    started = time.monotonic()
    size_and_adler32(sample)
    rate = 128 * 1024**2 / (time.monotonic() - started)
    sample.unlink()
    return min(int(rate * WANTED) // len(BLOCK) * len(BLOCK), MOST)


def bytes_read() -> int:
    """Bytes this process (the watcher runs on a thread of it) has read so far, from the kernel's count."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_small_files_closed_while_a_big_one_is_read_are_announced_before_it(tmp_path):
    root = tmp_path / "buffer"
    night = root / "20261124"
    night.mkdir(parents=True)
    size = big_enough(tmp_path / "sample")
    write_blocks(night / "LST-1.Run00200.fits.tmp", size)
    s = watch_settings(root)
    with declared(s):
        with watching(s, hash_workers=2) as code:
            before = bytes_read()
            os.rename(night / "LST-1.Run00200.fits.tmp", night / "LST-1.Run00200.fits")  # the big file closed
            wait_for(lambda: bytes_read() - before > 64 << 20, timeout=30, what="the big file's read under way")
            small = [night / f"LST-1.Run0030{n}.fits" for n in range(3)]
            for path in small:
                path.write_bytes(b"small")
            wait_for(lambda: depth(s, s.ingest.queue) >= 4, timeout=60, what="4 files announced")
        order = [decode_file_closed(m.body).path for m in get_all(s, s.ingest.queue)]
    assert code == [0]
    assert sorted(order[:3]) == [str(p) for p in small] and order[3:] == [str(night / "LST-1.Run00200.fits")], (
        f"big file {size} bytes", order)
