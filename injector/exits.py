"""Exit codes of `rucio-injector`, and the ONE line that explains a failure: what, where, what to do.

`explain` maps an exception to (code, line); anything it does not know is a bug and keeps its traceback.
No line ever carries a password: every `scheme://user:password@` is cut down to `scheme://`.
"""

from __future__ import annotations

from injector import topology, transport
from injector.config import Settings
from injector.errors import (
    BrokerUnavailable,
    ConfigError,
    InjectorError,
    OutboxFull,
    PublishFailed,
    RucioDown,
    RucioUnavailable,
)
from injector.logs import masked

OK = 0
NEEDS_A_PERSON = 1
BAD_CONFIG = 2
BROKER = 3
RUCIO = 4
INTERRUPTED = 130

TABLE = (
    (OK, "done"),
    (NEEDS_A_PERSON, "done, but something needs a person: reconcile findings, dead letters a replay could not "
                     "move, a purge without --yes"),
    (BAD_CONFIG, "bad configuration or usage: the config file, an option, an unknown id, queue or stream"),
    (BROKER, "broker unreachable or refusing us, or a queue/exchange missing or declared differently "
             "(run `rucio-injector broker setup`)"),
    (RUCIO, "Rucio unreachable or refusing our account (RUCIO_CONFIG)"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)

def epilog() -> str:
    """The exit codes, for `--help`."""
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in TABLE)


def explain(exc: BaseException, settings: Settings | None = None) -> tuple[int, str] | None:
    """The exit code and the one line for a failure, or None for an unexpected error (a bug)."""
    found = _classify(exc, settings)
    if found is None:
        return None
    code, text = found
    text = " ".join([text, *getattr(exc, "__notes__", [])])  # e.g. publish: how many events wait in the outbox
    if code != BAD_CONFIG:  # an invalid config lists every bad field, one per line; the rest is one line
        text = " ".join(text.split())
    return code, masked(text)


def _classify(exc: BaseException, settings: Settings | None) -> tuple[int, str] | None:
    broker = topology.where(settings.broker.urls[0]) if settings else "the broker"
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    if isinstance(exc, topology.TopologyMissing | topology.TopologyMismatch):
        return BROKER, str(exc)
    if isinstance(exc, OutboxFull):  # the broker has been away too long: what to do is in the text
        return BROKER, str(exc)
    if isinstance(exc, BrokerUnavailable | PublishFailed):
        return BROKER, f"{exc} (is the broker running, and are [broker] urls / [cleanup] stomp_hosts right?)"
    if isinstance(exc, RucioUnavailable | RucioDown):
        return RUCIO, f"Rucio unreachable: {exc} (is the server up; are rucio_host and auth in RUCIO_CONFIG right?)"
    if isinstance(exc, ConfigError | InjectorError):
        return BAD_CONFIG, str(exc)
    return _protocol(exc, broker) or _rucio(exc) or _network(exc, broker)


def _protocol(exc: BaseException, broker: str) -> tuple[int, str] | None:
    """A broker protocol's own exception, as the transport plug-in that speaks it explains it."""
    for name in transport.PLUGINS:
        text = transport.plugin(name).explain(exc, broker)
        if text is not None:
            return BROKER, text
    return None


def _rucio(exc: BaseException) -> tuple[int, str] | None:
    from rucio.common import exception as rx

    from injector.gateway import CLIENT_CONFIG

    if not isinstance(exc, rx.RucioException):
        return None
    if isinstance(exc, CLIENT_CONFIG):
        return BAD_CONFIG, f"Rucio client configuration: {exc} (set RUCIO_CONFIG to a rucio.cfg with [client])"
    name = type(exc).__name__
    return RUCIO, f"Rucio unreachable or refusing us: {name}: {exc} (check rucio_host and auth in RUCIO_CONFIG)"


def _network(exc: BaseException, broker: str) -> tuple[int, str] | None:
    if isinstance(exc, OSError):
        return BROKER, f"cannot reach {broker}: {exc} (is the broker running, and are [broker] urls right?)"
    return None
