"""What a command needs before it starts, checked once and quickly: the broker answers, the queues and
exchanges it uses exist, Rucio answers. A missing piece is then ONE clear line (`injector.exits`) instead of
minutes of retries or a traceback.

Long-running consumers (`ingest`, `cleanup`, `watch`, `reconcile --every`) wait for an unreachable broker or
Rucio instead (they retry and log); if the broker answers, their queue must exist all the same.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

from injector import topology
from injector.config import Settings, StompServer
from injector.errors import BrokerUnavailable, RucioUnavailable

if TYPE_CHECKING:
    import kombu

CONNECT_TIMEOUT = 5.0


def check(verb: str, settings: Settings, *, action: str | None = None, looping: bool = False,
          streams: list[str] | None = None) -> None:
    """Raise the error that explains what `verb` lacks; return when it has what it needs. Usage comes first:
    an unknown --stream is named before the broker or Rucio is asked anything."""
    if streams:
        settings.selected_streams(streams)
    if verb in ("ingest", "cleanup") or (verb == "reconcile" and looping):
        _if_reachable(settings, _consumer_queues(verb, settings))
        return
    needs_rucio = verb in ("status", "reconcile")
    if needs_rucio:
        rucio_reachable()
    if verb in ("publish", "reconcile", "status", "dlq") or (verb == "broker" and action == "setup"):
        if settings.broker.transport == "stomp":  # ActiveMQ makes its queues on first use: nothing to require
            stomp_reachable(settings.broker.stomp)
            return
        exchanges, queues = _needs(verb, settings)
        with _connection(settings) as conn:
            topology.require(conn, exchanges, queues)


def _needs(verb: str, settings: Settings) -> tuple[list[str], list[str]]:
    b = settings.broker
    if verb in ("publish", "reconcile"):
        return [b.daq_exchange], []
    # status reports each missing queue in its table (and exits 3); broker setup: reachable is enough;
    # dlq: each DLQ is checked where it is read
    return [], []


def _consumer_queues(verb: str, settings: Settings) -> list[str]:
    if verb == "ingest":
        return [settings.ingest.queue]
    if verb == "cleanup" and settings.cleanup.flavour == "rabbitmq":
        return [settings.cleanup.queue]
    return []


def _if_reachable(settings: Settings, queues: list[str]) -> None:
    if settings.broker.transport == "stomp":
        return  # ActiveMQ makes a queue on first use
    try:
        with _connection(settings) as conn:
            topology.require(conn, [], queues)
    except BrokerUnavailable:
        return  # the consumer waits for the broker, logging each attempt


@contextlib.contextmanager
def _connection(settings: Settings) -> Iterator[kombu.Connection]:
    """The first broker URL that answers (one attempt each), else BrokerUnavailable naming each failure."""
    from injector.transport import amqp

    with amqp.first_answering(settings.broker, CONNECT_TIMEOUT) as conn:
        yield conn


def stomp_reachable(server: StompServer) -> None:
    """A TCP connection to one of the STOMP server's hosts (ActiveMQ is read over STOMP)."""
    errors = []
    for host, port in server.addresses:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
            return
        except OSError as exc:
            errors.append(f"{host}:{port} ({exc})")
    raise BrokerUnavailable(f"STOMP broker unreachable: {'; '.join(errors)}")


def rucio_reachable() -> None:
    """Authenticate and ping once. rucio-clients logs its own errors: silenced here, the one line is ours."""
    logging.disable(logging.CRITICAL)
    try:
        import requests
        from rucio.client import Client
        from rucio.common import exception as rx

        # Nothing answered, or it refused our credentials. A configuration error (rx.ConfigNotFound...) is
        # raised as it is: injector.exits names it as one. A bare RucioException is a server error without a class.
        unreachable = (rx.ServerConnectionException, rx.CannotAuthenticate, rx.ServiceUnavailable,
                       requests.ConnectionError, ConnectionError)
        try:
            Client().ping()
        except Exception as exc:
            if isinstance(exc, unreachable) or type(exc) is rx.RucioException:
                raise RucioUnavailable(f"{_rucio_host()}: {type(exc).__name__}: {exc}") from None
            raise
    finally:
        logging.disable(logging.NOTSET)


def _rucio_host() -> str:
    with contextlib.suppress(Exception):
        from rucio.common.config import config_get

        return str(config_get("client", "rucio_host"))
    return "the Rucio server"
