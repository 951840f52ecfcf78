"""Passwords from files or the environment, never shown: the settings' repr, log lines and dead-letter errors hide
every secret the process loaded (injector.config.load, injector.logs.masked)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from injector import deadletter, logs
from injector.config import load
from injector.errors import ConfigError

PASSWORD = "Zq7-broker-pässwörd/with@odd:chars"  # quoting in URLs must not let it through either
STOMP_PASSWORD = "stomp-secret-4d1e"


def config(tmp_path: Path, broker: str = "", cleanup: str = "") -> Path:
    path = tmp_path / "injector.toml"
    path.write_text(f'[broker]\nurls = ["amqp://ingest@rabbit1:5672//", "amqp://ingest@rabbit2:5672/lst"]\n{broker}'
                    f'[cleanup]\nusername = "cleanup"\n{cleanup}')
    return path


def test_a_password_file_fills_every_broker_url_and_the_settings_never_show_it(tmp_path: Path):
    secret = tmp_path / "broker.password"
    secret.write_text(PASSWORD + "\n")
    s = load(config(tmp_path, broker=f'password_file = "{secret}"\n'), env={})
    assert s.broker.password is not None and s.broker.password.get_secret_value() == PASSWORD
    from urllib.parse import unquote, urlparse
    assert [unquote(urlparse(u).password or "") for u in s.broker.connect_urls] == [PASSWORD, PASSWORD]
    assert [urlparse(u).hostname for u in s.broker.connect_urls] == ["rabbit1", "rabbit2"]
    assert s.broker.connect_urls[1].endswith("/lst") and s.broker.urls[0] == "amqp://ingest@rabbit1:5672//"
    assert PASSWORD not in repr(s) and PASSWORD not in str(s) and PASSWORD not in s.model_dump_json()


def test_the_environment_wins_over_the_file_and_a_file_can_be_named_by_the_environment(tmp_path: Path):
    secret = tmp_path / "cleanup.password"
    secret.write_text(STOMP_PASSWORD)
    path = config(tmp_path, broker='password_file = "/nonexistent"\n')
    s = load(path, env={"RUCIO_INJECTOR_BROKER_PASSWORD": PASSWORD,
                        "RUCIO_INJECTOR_CLEANUP_PASSWORD_FILE": str(secret)})
    assert s.broker.password is not None and s.broker.password.get_secret_value() == PASSWORD
    assert s.cleanup.server.password == STOMP_PASSWORD and s.cleanup.server.username == "cleanup"
    assert STOMP_PASSWORD not in repr(s) and STOMP_PASSWORD not in repr(s.cleanup.server)


def test_an_unreadable_password_file_stops_the_start_naming_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"\[cleanup\] password: cannot read the password file /nope/pw"):
        load(config(tmp_path, cleanup='password_file = "/nope/pw"\n'), env={})


def test_every_loaded_password_is_hidden_from_log_lines_and_dead_letter_errors(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture):
    load(config(tmp_path), env={"RUCIO_INJECTOR_BROKER_PASSWORD": PASSWORD,
                                "RUCIO_INJECTOR_CLEANUP_PASSWORD": STOMP_PASSWORD})
    from urllib.parse import quote
    line = f"refused: {PASSWORD} / {quote(PASSWORD, safe='')} / {STOMP_PASSWORD} / amqp://u:{PASSWORD}@h//"
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        record = logging.LogRecord("x", logging.DEBUG, __file__, 1, line, None, None)
        out = formatter.format(record)
        assert PASSWORD not in out and STOMP_PASSWORD not in out and quote(PASSWORD, safe="") not in out
        assert logs.HIDDEN in out
    h = deadletter.headers({}, reason="x", error=line, exchange="e", routing_key="r", queue="q", attempts=1)
    assert PASSWORD not in h[deadletter.ERROR] and STOMP_PASSWORD not in h[deadletter.ERROR]


def test_config_show_prints_the_effective_settings_with_every_password_masked(tmp_path: Path, capsys,
                                                                             monkeypatch: pytest.MonkeyPatch):
    import json

    from injector.cli import main

    path = tmp_path / "injector.toml"
    path.write_text('[broker]\nurls = ["amqp://ingest:inline-Pw-123@rabbit:5672//"]\n[cleanup]\nusername = "c"\n')
    monkeypatch.setenv("RUCIO_INJECTOR_CLEANUP_PASSWORD", STOMP_PASSWORD)
    assert main(["--config", str(path), "config", "show"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert shown["broker"]["urls"] == ["amqp://rabbit:5672//"] and shown["cleanup"]["password"] == "**********"
    assert "inline-Pw-123" not in out and STOMP_PASSWORD not in out
