"""No secret ever leaks: a full run with a broker user whose password comes from a file (and the cleanup's from the
environment) and a Rucio account of its own (userpass), every verb at DEBUG, a dead letter, its export, status
--json, /metrics, and a refused login with a wrong password; every artefact is searched for the passwords (raw and
URL-quoted) and the Rucio token, and the test fails on any hit."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from injector.messages import Outgoing
from injector.testbed.rucio import free_port
from injector.transport.amqp import Publisher, connection
from tests.integration.cli import run, service
from tests.integration.conftest import Lab
from tests.integration.rabbit import declared, rabbitmqctl, wait_for
from tests.integration.test_ingest_rucio import settings_for, stream_toml

pytestmark = pytest.mark.integration


@pytest.fixture
def broker_user() -> Iterator[tuple[str, str]]:
    """A RabbitMQ user of this test only, with a password no other text could contain by chance."""
    user, password = f"t-{secrets.token_hex(4)}", f"Pw:{secrets.token_hex(12)}/@%"
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


def rucio_account(lab: Lab, tmp_path: Path) -> tuple[Path, str, Path]:
    """A Rucio account of this test with a userpass identity no other text could contain: its client config, its
    password and where its token is kept."""
    account, password = f"t{secrets.token_hex(4)}", f"Rucio-{secrets.token_hex(12)}"
    lab.client.add_account(account, "USER", "ops@example.org")
    lab.client.add_identity(account, identity=account, authtype="USERPASS", email="ops@example.org",
                            password=password)
    lab.client.add_account_attribute(account, "admin", "True")
    tokens = tmp_path / "tokens"
    text = lab.server.client_config.read_text().splitlines()
    cfg = tmp_path / "rucio.cfg"
    cfg.write_text("\n".join(f"username = {account}" if line.startswith("username") else
                             f"password = {password}" if line.startswith("password") else
                             f"account = {account}" if line.startswith("account") else
                             f"auth_token_file_path = {tokens}/token" if line.startswith("auth_token_file_path")
                             else line for line in text)
                   # the rucio client's own debug lines (which print the X-Rucio-Password header) switched on
                   + "\n[logging]\nforceloglevelDEBUG = rucio.client.baseclient\n")
    return cfg, password, tokens


def test_no_password_appears_in_any_log_dead_letter_export_status_or_metrics(lab: Lab, tmp_path: Path,
                                                                             broker_user: tuple[str, str]):
    user, password = broker_user
    stomp_password = f"stomp-{secrets.token_hex(12)}"
    rucio_cfg, rucio_password, tokens = rucio_account(lab, tmp_path)
    s = settings_for(lab)
    password_file = tmp_path / "broker.password"
    password_file.write_text(password + "\n")
    port = free_port()
    config = tmp_path / "injector.toml"
    config.write_text(
        f'[broker]\nurls = ["amqp://{user}@127.0.0.1:5672//"]\npassword_file = "{password_file}"\n'
        f'daq_exchange = "{s.broker.daq_exchange}"\ndead_letter_exchange = "{s.broker.dead_letter_exchange}"\n'
        f'[ingest]\nqueue = "{s.ingest.queue}"\nbatch_window = 0.1\n[outbox]\npath = "{tmp_path / "outbox"}"\n'
        f'[cleanup]\nqueue = "{s.cleanup.queue}"\nhermes_destination = "{s.cleanup.hermes_destination}"\n'
        f'username = "{user}"\n[metrics]\ningest_port = {port}\n' + stream_toml(lab))
    env = {**os.environ, "RUCIO_INJECTOR_CONFIG": str(config), "RUCIO_INJECTOR_CLEANUP_PASSWORD": stomp_password,
           "RUCIO_CONFIG": str(rucio_cfg)}
    debug = ("--log-level", "DEBUG")
    artefacts: dict[str, str] = {}

    def keep(name: str, done: subprocess.CompletedProcess[str]) -> None:
        artefacts[name] = done.stdout + done.stderr

    path = lab.write("20261124/LST-1.1.Run00007.fits.fz", b"secret-free data" * 100)
    with declared(s):
        keep("broker setup", run(*debug, "broker", "setup", env=env))
        keep("config check", run(*debug, "config", "check", env=env))
        log = tmp_path / "ingest.log"
        with service(*debug, "ingest", env=env, log=log):
            keep("publish", run(*debug, "publish", str(path), "--site", "ORM", "--instrument", "LST1", "--night",
                                "20261124", env=env))
            conn = connection(s.broker)  # a bad event from elsewhere: dead-lettered, then exported
            Publisher(conn).publish([Outgoing(s.broker.daq_exchange, "file.closed.ORM.LST1", b'{"schema": 1}',
                                              {}, "bad-1")])
            conn.release()
            wait_for(lambda: lab.content(f"LST1_{lab.tag}_20261124_raw") == [str(path)], timeout=60,
                     what="the file attached")
            wait_for(lambda: "invalid-event" in run("dlq", "list", env=env).stdout, timeout=30,
                     what="the bad event dead-lettered")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                artefacts["metrics"] = r.read().decode()
        artefacts["ingest log"] = log.read_text()
        keep("dlq list", run(*debug, "dlq", "list", env=env))
        export = tmp_path / "dead.jsonl"
        keep("dlq export", run(*debug, "dlq", "export", str(export), env=env))
        artefacts["dlq export file"] = export.read_text()
        assert json.loads(artefacts["dlq export file"].splitlines()[0])["reason"] == "invalid-event"
        keep("status --json", run(*debug, "status", "--json", env=env))
        keep("reconcile --dry-run", run(*debug, "reconcile", "--dry-run", env=env))
        keep("refused login", run(*debug, "publish", "--flush", env={
            **env, "RUCIO_INJECTOR_BROKER_PASSWORD": f"wrong-{password}"}, expect=3))
    assert "refused our login" in artefacts["refused login"]
    assert "registered" in artefacts["ingest log"] and "rucio_injector_events_total" in artefacts["metrics"]
    token = next(p for p in tokens.rglob("*") if p.is_file()).read_text().strip()
    assert len(token) > 20, "the CLI authenticated as the test's own Rucio account"
    for name, text in artefacts.items():
        for secret in (password, quote(password, safe=""), stomp_password, rucio_password, token):
            assert secret not in text, f"a secret leaked into {name}"
