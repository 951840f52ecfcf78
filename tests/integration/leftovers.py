"""What a stopped program can leave behind, read from /proc, PostgreSQL and RabbitMQ (for the demo's tests)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid reused by another process is not the same one


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ... starttime
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[0] != "Z" and st[3] == proc[1]


def descendants(root: int) -> set[Proc]:
    """Every living process below `root` (children, grandchildren, ...), root excluded."""
    children: dict[int, list[Proc]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None and st[0] != "Z":
            children.setdefault(st[1], []).append((pid, st[3]))
    out: set[Proc] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child[0])
    return out


def in_session(sid: int) -> set[Proc]:
    """Living processes of session `sid`."""
    out = set()
    for pid in _pids():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and st[2] == sid:
            out.add((pid, st[3]))
    return out


def referring_to(directory: Path) -> set[Proc]:
    """Living processes whose RUCIO_CONFIG, working directory or command line points into `directory`
    (the Rucio server's gunicorn runs in a session of its own, so only this finds it once orphaned)."""
    mark = str(directory).encode()
    out = set()
    for pid in _pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
        except OSError:
            continue
        config = next((e for e in env if e.startswith(b"RUCIO_CONFIG=")), b"")
        st = _stat(pid)
        if st is not None and st[0] != "Z" and (mark in config or mark in cmdline or cwd.startswith(mark)):
            out.add((pid, st[3]))
    return out


def databases() -> set[str]:
    done = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "select datname from pg_database"],
                          capture_output=True, text=True, timeout=30, check=True)
    return set(done.stdout.split())


def rabbit_names(prefix: str) -> set[str]:
    """Queues and exchanges of the local RabbitMQ's default vhost whose name starts with `prefix`."""
    names: set[str] = set()
    for what in ("list_queues", "list_exchanges"):
        done = subprocess.run(["rabbitmqctl", "-q", what, "name"], capture_output=True, text=True, timeout=60,
                              check=True)
        names |= {n for n in done.stdout.split() if n.startswith(prefix)}
    return names


def remove_rabbit_names(prefix: str) -> None:
    import kombu

    names = rabbit_names(prefix)
    queues = set(subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split())
    with kombu.Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
        for name in names:
            ch = conn.channel()
            if name in queues:
                ch.queue_delete(name)
            else:
                ch.exchange_delete(name)
