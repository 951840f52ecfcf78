"""The batch loop's stop on a broker that refills its prefetch window: a SIGTERM that lands while a batch is being
settled must still cancel the consumer before handing the rest back, or what the broker sends after the ack (the
refill, in transit) comes back counted when the channel closes."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from injector.messages import Delivery
from injector.metrics import Metrics
from injector.settle import Outcome, Route
from injector.testing import MemorySession, delivery
from injector.worker import Batching, BatchWorker


class RefillingSession(MemorySession):
    """Each ack makes the broker send as many new deliveries (the prefetch window refills); `on_ack` runs after
    it (here: the signal landing during settle)."""

    def __init__(self, link: RefillingLink) -> None:
        super().__init__()
        self.link = link

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        super().ack(deliveries)
        self.link.in_transit.extend(delivery(b"{}") for _ in deliveries)
        self.link.on_ack()


class RefillingLink:
    """A Link whose deliveries sent but not yet read sit `in_transit`: pump reads them; pause (basic.cancel waiting
    for cancel-ok) reads them too, since the broker sends cancel-ok after every delivery it made before."""

    def __init__(self, buffer: list[Delivery], initial: int, on_ack: threading.Event) -> None:
        self.buffer = buffer
        self.in_transit: list[Delivery] = [delivery(b"{}") for _ in range(initial)]
        self.stop_on_ack = on_ack
        self.session = RefillingSession(self)
        self.paused = False
        self.events: list[str] = []

    def on_ack(self) -> None:
        self.stop_on_ack.set()

    def _read(self) -> None:
        self.buffer.extend(self.in_transit)
        self.in_transit.clear()

    def pump(self, timeout: float) -> None:
        if not self.paused:
            self._read()

    def pause(self) -> None:
        self._read()
        self.paused = True
        self.events.append("pause")

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.events.append("close")


def test_a_stop_landing_while_a_batch_is_settled_cancels_before_handing_back_so_the_refill_is_not_counted():
    stop = threading.Event()
    links: list[RefillingLink] = []

    def connect(generation: int, buffer: list[Delivery]) -> RefillingLink:
        links.append(RefillingLink(buffer, initial=6, on_ack=stop))
        return links[-1]

    def process(batch: list[Delivery]) -> list[Outcome]:
        return [Outcome("done", "registered", None) for _ in batch]

    worker = BatchWorker(connect, Route("q", "dlx", 5), process, Batching(4, 0.01, 6), Metrics("t"))
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive()
    (link,) = links
    session = link.session
    assert len(session.acked) == 4, "the batch in progress is finished and settled"
    assert not link.in_transit, "what the broker sent after the ack was read before the link closed"
    assert len(session.handed_back) == 2 + 4, "the rest and the refill go back uncounted"
    assert link.events == ["pause", "close"]
