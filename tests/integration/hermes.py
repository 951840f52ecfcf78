"""Hand-written hermes frames over STOMP, sent as hermes sends them, for the cases real hermes cannot produce."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import stomp

from injector.config import Settings


class HermesSender:
    """Sends frames as hermes does (persistent, to the topic the cleanup consumers listen to), but with
    receipts awaited before disconnecting: RabbitMQ's STOMP plugin drops the last frames of a connection
    that closes before it routed them (measured here: 6 of 610 frames lost without receipts, 0 with).
    Hand-written frames are for what real hermes cannot produce (forged, foreign, malformed, chosen times, floods);
    the pipeline tests run Rucio's own hermes. Leaving the `with` block waits for every receipt."""

    def __init__(self, settings: Settings) -> None:
        host, _, port = settings.cleanup.stomp_hosts[0].rpartition(":")
        self.destination = settings.cleanup.hermes_destination
        self.pending: set[str] = set()
        self.receipted = threading.Condition()
        hermes = self

        class Receipts(stomp.ConnectionListener):  # type: ignore[misc]
            def on_receipt(self, frame: Any) -> None:
                with hermes.receipted:
                    hermes.pending.discard(frame.headers.get("receipt-id"))
                    hermes.receipted.notify_all()

        self.conn = stomp.Connection12([(host, int(port))], vhost="/")
        tls = settings.cleanup.tls
        if tls is not None:  # as hermes does with [messaging-hermes] use_ssl and its certificate
            self.conn.set_ssl(for_hosts=[(host, int(port))], key_file=tls.file("key_file"),
                              cert_file=tls.file("cert_file"), ca_certs=tls.file("ca_file"))
        self.conn.set_listener("receipts", Receipts())
        self.conn.connect("guest", "guest", wait=True)

    def send(self, event_type: str, payload: dict[str, Any], created_at: str = "2026-11-25 01:02:03.000000") -> None:
        body = json.dumps({"event_type": event_type, "payload": payload, "created_at": created_at})
        self.send_raw(body, {"event_type": event_type})

    def send_raw(self, body: str, headers: dict[str, str] | None = None) -> None:
        receipt = uuid.uuid4().hex
        with self.receipted:
            self.pending.add(receipt)
        self.conn.send(self.destination, body, headers={**(headers or {}), "persistent": "true"}, receipt=receipt)

    def close(self) -> None:
        with self.receipted:
            done = self.receipted.wait_for(lambda: not self.pending, timeout=30)
        self.conn.disconnect()
        assert done, f"the broker did not receipt {len(self.pending)} frame(s)"

    def __enter__(self) -> HermesSender:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.close()
        else:  # the block failed: keep its failure, just hang up
            self.conn.disconnect()
