"""The quick checks before a command starts: how a Rucio that does not answer is told from a bad configuration
(the CLI's answers end to end: tests/integration/test_cli_errors.py)."""

import pytest
import requests
import rucio.client
from rucio.common import exception as rx

from injector import prerequisites
from injector.errors import RucioUnavailable


def failing_client(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    class Client:
        def __init__(self) -> None:
            raise exc

    monkeypatch.setattr(rucio.client, "Client", Client)


@pytest.mark.parametrize("exc", [
    rx.ServerConnectionException("refused"), rx.CannotAuthenticate("bad token"), rx.ServiceUnavailable("503"),
    rx.RucioException("a 500 without a class"), requests.ConnectionError("refused"),
    ConnectionRefusedError(111, "Connection refused"),
])
def test_a_rucio_that_does_not_answer_or_refuses_us_is_unavailable(monkeypatch, exc: Exception) -> None:
    failing_client(monkeypatch, exc)
    with pytest.raises(RucioUnavailable, match=type(exc).__name__):
        prerequisites.rucio_reachable()


@pytest.mark.parametrize("exc", [rx.ConfigNotFound("no rucio.cfg"), rx.MissingClientParameter("rucio_host"),
                                 rx.RSENotFound("NOPE"), KeyError("a bug")])
def test_anything_else_is_raised_as_it_is_for_exits_to_name(monkeypatch, exc: Exception) -> None:
    failing_client(monkeypatch, exc)
    with pytest.raises(type(exc)):
        prerequisites.rucio_reachable()


def test_logging_is_on_again_after_the_check(monkeypatch) -> None:
    import logging

    failing_client(monkeypatch, rx.ServerConnectionException("refused"))
    with pytest.raises(RucioUnavailable):
        prerequisites.rucio_reachable()
    assert logging.root.manager.disable == logging.NOTSET
