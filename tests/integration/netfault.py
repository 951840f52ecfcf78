"""A TCP proxy whose connections a test can cut: a broker (or network) dropping its clients."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # upstream down: the client sees its connection closed, as without a proxy
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            self.relay(client, upstream)

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Carry one connection's bytes both ways (a subclass may treat what the client sends)."""
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> int:
        """Cut every connection open now; new ones are accepted again."""
        with self.lock:
            cut, self.sockets = self.sockets, []
        for s in cut:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()
        return len(cut) // 2

    def close(self) -> None:
        self.server.close()
        self.drop()
