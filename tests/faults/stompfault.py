"""A STOMP proxy between hermes and the broker that misbehaves like a network and a flaky hermes do: for a while
it duplicates every SEND frame, holds them and lets them go in shuffled order, or drops them (hermes sends without
receipts and deletes each message once written to its socket: a dropped frame is a lost Rucio event, which the
reconcile loop must finish). Frames are split on the NUL byte that ends each (hermes' bodies are JSON: no NUL)."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from typing import Literal

from tests.integration.netfault import Proxy

Mode = Literal["pass", "duplicate", "shuffle", "drop"]


def _is_send(frame: bytes) -> bool:
    return frame.lstrip(b"\r\n").startswith(b"SEND")


class HermesFault(Proxy):
    def __init__(self, upstream: tuple[str, int], seed: int = 0) -> None:
        self.mode: Mode = "pass"
        self.rng = random.Random(seed)
        self.counts = {"duplicated": 0, "shuffled": 0, "dropped": 0, "sent": 0}
        super().__init__(upstream)

    def set(self, mode: Mode) -> None:
        self.mode = mode

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._frames, args=(client, upstream), daemon=True, name="hermes-fault").start()
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        """hermes → broker, frame by frame, each SEND treated by the mode of the moment."""
        buffer, held = b"", list[bytes]()
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                buffer += data
                *frames, buffer = buffer.split(b"\x00")
                out = [g for f in frames for g in self._treat(f + b"\x00", held)]
                if not out and held and self.mode != "shuffle":
                    out = self._release(held)
                self.counts["sent"] += sum(1 for f in out if _is_send(f))
                if out:
                    dst.sendall(b"".join(out))
        with contextlib.suppress(OSError):
            if held:
                dst.sendall(b"".join(self._release(held)))
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _treat(self, frame: bytes, held: list[bytes]) -> list[bytes]:
        """What goes out for one frame now (a frame other than SEND lets every held one go first)."""
        if not _is_send(frame):
            return [*self._release(held), frame]
        mode = self.mode
        if mode == "drop":
            self.counts["dropped"] += 1
            return []
        if mode == "duplicate":
            self.counts["duplicated"] += 1
            return [frame, frame]
        if mode == "shuffle":
            held.append(frame)
            return self._release(held) if len(held) >= 20 else []
        return [*self._release(held), frame]

    def _release(self, held: list[bytes]) -> list[bytes]:
        if not held:
            return []
        out = list(held)
        self.rng.shuffle(out)
        self.counts["shuffled"] += len(out)
        held.clear()
        return out
