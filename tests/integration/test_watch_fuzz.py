"""The watcher fuzzed with hostile file names on the real RabbitMQ: it stays alive, every good file is announced
exactly once, every bad one recorded exactly once. WATCH_FUZZ_FILES=10000 (default 200) for the long run,
WATCH_FUZZ_SEED to replay one."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from injector import topology
from injector.config import Settings
from tests.integration.rabbit import declared, depth, get_all, wait_for
from tests.integration.test_watch import watch_settings, watching

pytestmark = pytest.mark.integration

FILES = int(os.environ.get("WATCH_FUZZ_FILES", "200"))
SEED = int(os.environ.get("WATCH_FUZZ_SEED", "20261129"))
OLD = time.time() - 3600
SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# The test's own statement of a Rucio name (the stream's did_name is "path": the DID name is the whole path).
RUCIO_NAME = re.compile(r"[/A-Za-z0-9][/A-Za-z0-9._-]{0,249}")
UNICODE = ["é", "日本", "😀", "Ω", "\u200b", "\u202e"]  # a zero-width space, a right-to-left override
PUNCTUATION = ";:,=+!@#$%^&*()[]{}~`?<>|\\\"'"


def hostile(rng: random.Random, i: int, room: int) -> bytes:
    """A file name of one random kind (never hidden nor temporary: those are never announced by design); `room`
    is how long a name may be for its path to stay a Rucio name."""
    tag = f"{i:06d}"
    kind = rng.choice(["good", "good", "good", "bytes", "newline", "control", "unicode", "space", "dash", "dots",
                       "long", "edge", "other"])
    word = "".join(rng.choice(SAFE + "._-") for _ in range(rng.randint(0, 20)))
    name = {
        "good": f"{tag}{word}.fits", "dash": f"-{tag}{word}", "dots": f"{tag}..{word}..",
        "newline": f"{tag}{word}\n{word}" if rng.random() < 0.5 else f"{tag}{word}\n",
        "control": f"{tag}{chr(rng.choice([*range(1, 32), 127]))}{word}",
        "unicode": f"{tag}{rng.choice(UNICODE)}{word}",
        "space": f"{tag} {word}" if rng.random() < 0.5 else f"{tag}{word} ",
        "long": tag + "L" * rng.randint(room - len(tag) - 3, 255 - len(tag)),
        "edge": tag + "E" * (room - len(tag) + rng.choice([0, 1])),  # the last good length, or one more
        "other": f"{tag}{rng.choice(PUNCTUATION)}{word}",
    }.get(kind)
    if name is not None:
        return name[:255].encode()
    raw = bytearray(f"{tag}{word}".encode())  # "bytes": not UTF-8 somewhere in it
    raw.insert(rng.randint(0, len(raw)), rng.choice([0x80, 0xBF, 0xC0, 0xC3, 0xE2, 0xF0, 0xFE, 0xFF]))
    return bytes(raw)


def good(path: bytes) -> bool:
    try:
        return RUCIO_NAME.fullmatch(path.decode()) is not None
    except UnicodeDecodeError:
        return False


def write(directory: Path, name: bytes, old: bool) -> bytes:
    path = os.path.join(os.fsencode(directory), name)
    with open(path, "wb") as fh:
        fh.write(name)
    if old:
        os.utime(path, (OLD, OLD))
    return path


def settled(s: Settings, dlq: str, paths: list[bytes]) -> None:
    """Until every file is announced or recorded (or more)."""
    n_good = sum(map(good, paths))
    wait_for(lambda: depth(s, s.ingest.queue) >= n_good and depth(s, dlq) >= len(paths) - n_good,
             timeout=30 + len(paths) / 20, what=f"{len(paths)} files announced or recorded (seed {SEED})")


def test_hostile_names_never_stop_the_watcher_good_files_are_announced_once_and_bad_ones_recorded_once(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "buffer"
    night = root / "20261124"
    night.mkdir(parents=True)
    room = 250 - len(str(night)) - 1
    s = watch_settings(root)
    dlq = topology.dead_letter_queue(s.ingest.queue)
    before = [write(night, hostile(rng, i, room), old=True) for i in range(FILES // 2)]
    with declared(s):
        with watching(s, existing=True) as code:
            settled(s, dlq, before)
            during = [write(night, hostile(rng, i, room), old=False) for i in range(FILES // 2, FILES)]
            settled(s, dlq, before + during)
            time.sleep(2.0)  # quiet: a second event for any file would arrive now
        announced = Counter(json.loads(m.body)["path"] for m in get_all(s, s.ingest.queue))
        recorded = Counter(base64.b64decode(json.loads(m.body)["path_base64"]) for m in get_all(s, dlq))
    assert code == [0]
    paths = before + during
    assert len(set(paths)) == len(paths) == FILES
    assert announced == Counter(p.decode() for p in paths if good(p)), f"seed {SEED}"
    assert recorded == Counter(p for p in paths if not good(p)), f"seed {SEED}"
