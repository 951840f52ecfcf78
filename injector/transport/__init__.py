"""Broker transports as plug-ins: the interface the batch worker consumes through, and the lookup of a plug-in.

The batch worker (injector.worker) pumps a `Link` and settles through the link's `Session` (injector.settle's
contract); it never knows which protocol is behind them. The composition (consumers.services) chooses a plug-in
by name and hands the worker its `Connect`. A plug-in module (injector.transport.amqp, injector.transport.stomp)
provides the same two functions:

    link(settings, queue, prefetch, at=None) -> Connect
                                                   a worker's connect: (generation, buffer) → a Link consuming
                                                   `queue` on the DAQ broker ([broker] urls), or on the STOMP
                                                   server `at` (hermes' ActiveMQ, for the cleanup)
    sender(broker, routes) -> Sender               confirmed publishing to the DAQ broker; `routes` (the declared
                                                   topology's bindings) routes where the broker has no exchanges
                                                   (`sender_for(broker, routes)` picks the broker's plug-in)
    explain(exc, where) -> str | None              the one line for one of that protocol's own exceptions
                                                   (injector.exits gives it the broker's exit code)

Importing this module imports no broker library: `plugin(name)` imports the one named, when it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from injector.errors import BrokerUnavailable
from injector.messages import Delivery

if TYPE_CHECKING:
    from collections.abc import Sequence

    from injector.config import Broker, Settings, StompServer
    from injector.messages import Outgoing
    from injector.settle import Session
    from injector.topology import Routes

PLUGINS = ("amqp", "stomp")

# What a lost connection looks like, whatever the transport (links raise BrokerUnavailable): reconnect.
CONNECTION_LOST: tuple[type[BaseException], ...] = (BrokerUnavailable, OSError)


class Link(Protocol):
    """One broker connection consuming one queue. `pump` moves received deliveries into the buffer given at
    connect time (waiting up to `timeout`) and raises BrokerUnavailable when the connection is lost; `pause`
    stops intake (what was received stays valid to settle) and returns once every delivery the broker made before
    it is in the buffer (AMQP: cancel-ok), so a stop hands back everything it holds; `resume` restarts it."""

    @property
    def session(self) -> Session: ...

    def pump(self, timeout: float) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


Connect = Callable[[int, list[Delivery]], Link]  # (generation, buffer) → a consuming link


class Sender(Protocol):
    """Confirmed publishing on one connection. `publish` returns once the broker took every message (PublishFailed
    otherwise; its `failed` names the messages the broker answered for: unroutable, refused); `service` keeps an
    idle connection alive and raises when it is lost; `close` ends it."""

    def publish(self, messages: Sequence[Outgoing]) -> None: ...
    def service(self) -> None: ...
    def close(self) -> None: ...


class Plugin(Protocol):
    """What a transport plug-in module provides."""

    def link(self, settings: Settings, queue: str, prefetch: int, at: StompServer | None = None) -> Connect: ...
    def sender(self, broker: Broker, routes: Routes | None) -> Sender: ...
    def explain(self, exc: BaseException, where: str) -> str | None: ...


def sender_for(broker: Broker, routes: Routes | None) -> Sender:
    """A confirmed publisher to the DAQ broker, by its own transport ([broker] urls: amqp:// or stomp://)."""
    return plugin(broker.transport).sender(broker, routes)


def plugin(name: str) -> Plugin:
    """The transport plug-in called `name` ("amqp", "stomp"), imported now."""
    if name not in PLUGINS:
        raise ValueError(f"no transport plug-in {name!r} (known: {', '.join(PLUGINS)})")
    return cast(Plugin, importlib.import_module(f"{__name__}.{name}"))


if TYPE_CHECKING:  # mypy holds each plug-in module to the Plugin protocol
    from injector.transport import amqp as _amqp
    from injector.transport import stomp as _stomp

    _PLUGINS: tuple[Plugin, ...] = (_amqp, _stomp)
