"""The exit code and the one line for each kind of failure (the CLI's answers end to end:
tests/integration/test_cli_errors.py)."""

import amqp
import pytest
import stomp.exception
from rucio.common import exception as rx

from injector import exits
from injector.config import parse
from injector.errors import BrokerUnavailable


@pytest.mark.parametrize(("exc", "code", "words"), [
    (rx.CannotAuthenticate("bad token"), exits.RUCIO, "Rucio unreachable or refusing us: CannotAuthenticate"),
    (rx.ServerConnectionException("refused"), exits.RUCIO, "ServerConnectionException: Cannot connect"),
    (rx.RSENotFound("NOPE"), exits.RUCIO, "RSENotFound: RSE does not exist"),
    (rx.RucioException("a 500"), exits.RUCIO, "check rucio_host and auth in RUCIO_CONFIG"),
    (rx.ConfigNotFound("no rucio.cfg"), exits.BAD_CONFIG, "Rucio client configuration: Configuration not found"),
    (rx.MissingClientParameter("rucio_host"), exits.BAD_CONFIG, "set RUCIO_CONFIG to a rucio.cfg with [client]"),
    (rx.NoAuthInformation("none"), exits.BAD_CONFIG, "Rucio client configuration"),
])
def test_a_rucio_exception_is_named_by_its_class(exc: Exception, code: int, words: str) -> None:
    found = exits.explain(exc)
    assert found is not None
    assert found[0] == code
    assert words in found[1]


def test_a_rucio_client_configuration_error_subclass_is_still_a_configuration_error() -> None:
    class Custom(rx.ConfigNotFound):
        pass

    assert exits.explain(Custom("x")) is not None
    assert exits.explain(Custom("x"))[0] == exits.BAD_CONFIG  # type: ignore[index]


def test_an_exception_named_like_rucios_but_not_rucios_is_a_bug() -> None:
    CannotAuthenticate = type("CannotAuthenticate", (Exception,), {"__module__": "rucio.common.exception"})
    assert exits.explain(CannotAuthenticate("imposter")) is None


@pytest.mark.parametrize(("exc", "words"), [
    (amqp.exceptions.NotFound("NOT_FOUND - no queue 'q' in vhost '/'"), "no queue 'q'"),
    (amqp.exceptions.AccessRefused("ACCESS_REFUSED"), "refused our login"),
    (amqp.exceptions.PreconditionFailed("PRECONDITION_FAILED"), "declaration differs from ours"),
    (stomp.exception.ConnectFailedException(), "STOMP broker: ConnectFailedException"),
    (BrokerUnavailable("broker unreachable"), "is the broker running"),
    (ConnectionRefusedError(111, "Connection refused"), "cannot reach amqp://rabbit:5672/"),
])
def test_a_broker_failure_exits_with_the_broker_code_and_says_which(exc: BaseException, words: str) -> None:
    settings = parse({"broker": {"urls": ["amqp://user:secret@rabbit:5672//"]}})
    found = exits.explain(exc, settings)
    assert found is not None
    assert found[0] == exits.BROKER
    assert words in found[1]
    assert "secret" not in found[1]


def test_an_unexpected_error_is_a_bug_with_its_traceback() -> None:
    assert exits.explain(KeyError("x")) is None
