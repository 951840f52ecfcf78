"""The start-up checks against the real Rucio server: `config check --rucio` as operators run it before deploying,
and `ingest` / `cleanup` refusing to start on a stream Rucio would refuse, but waiting out a Rucio outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from injector.config import load, parse
from injector.errors import RucioDown
from injector.gateway import ClientGateway
from injector.preflight import check
from injector.testbed.rses import file_protocol
from tests.integration.cli import run
from tests.integration.conftest import Lab
from tests.integration.rabbit import AMQP_URL, declared, wait_for

pytestmark = pytest.mark.integration


def toml(streams: list[dict[str, Any]], head: str = "", tag: str = "preflight") -> str:
    """A config file: the test's own exchange and queue names, metrics off, the streams."""
    out = [head, f'[broker]\nurls = ["{AMQP_URL}"]\ndaq_exchange = "t-{tag}.daq"\n'
                 f'dead_letter_exchange = "t-{tag}.dlx"\n[metrics]\ningest_port = 0\ncleanup_port = 0\n']
    for s in streams:
        out.append("[[streams]]\n")
        for key, value in s.items():
            if key == "rules":
                rules = ", ".join("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in r.items()) + " }"
                                  for r in value)
                out.append(f"rules = [{rules}]\n")
            else:
                out.append(f"{key} = {json.dumps(value)}\n")
    return "".join(out)


def cli(config: Path, *args: str, env: dict[str, str] | None = None, expect: int = 0
        ) -> subprocess.CompletedProcess[str]:
    return run(*args, config=config, env=env, expect=expect)


def bad_streams(lab: Lab, tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """stream name → (stream, words its one problem line must say)."""
    tag = lab.tag.upper()
    tomb, det = f"TOMB-{tag}", f"DET-{tag}"
    for rse, deterministic in ((tomb, False), (det, True)):  # both over the test's buffer directory
        lab.client.add_rse(rse, deterministic=deterministic)
        lab.client.add_protocol(rse, file_protocol(lab.root))
    lab.client.add_rse_attribute(tomb, "tombstone_delay", 3600)
    outside = tmp_path / "not-under-the-protocol-prefix"
    cases = {
        "unknown-rse": ({"source_rse": f"NOPE-{tag}"}, f"source_rse NOPE-{tag}: no such RSE in Rucio"),
        "deterministic": ({"source_rse": det}, f"source_rse {det}: it is deterministic"),
        "tombstone": ({"source_rse": tomb}, f"source_rse {tomb}: it has the attribute tombstone_delay=3600"),
        "outside": ({"storage_root": str(outside)}, f"Rucio would refuse these PFNs: {outside}/ is not under its "
                                                    f"file protocol's prefix {lab.client.source_dir}/"),
        "no-scope": ({"scope": f"nope{lab.tag}"}, f"scope nope{lab.tag}: no such scope in Rucio"),
        "no-archive": ({"rules": [{"rse_expression": f"NOWHERE-{tag}"}]},
                       f"rule 'NOWHERE-{tag}' x1: the RSE expression matches no RSE: "),
    }
    # Each stream its own directory: overlapping roots are refused at load.
    return {name: (lab.stream(name=name, instrument=name.replace("-", "").upper(),
                              **{"storage_root": str(lab.root / name), **over}), words)
            for name, (over, words) in cases.items()}


def test_config_check_rucio_names_each_bad_stream_and_exits_1_and_passes_good_ones_with_0(lab, tmp_path):
    bad = bad_streams(lab, tmp_path)
    good = lab.stream(name="good", storage_root=str(lab.root / "good"))
    config = tmp_path / "injector.toml"
    config.write_text(toml([good, *(s for s, _ in bad.values())]))
    done = cli(config, "config", "check", "--rucio", expect=1)
    lines = done.stdout.splitlines()
    for name, (_, words) in bad.items():
        (line,) = [line for line in lines if line.startswith(f"ERROR   {name}: ")]
        assert words in line and ". Fix: " in line, line
    assert not [line for line in lines if " good: " in line], "the good stream has no problem"
    assert lines[-1] == "rucio: 6 error(s), 0 warning(s) in 7 stream(s)"

    config.write_text(toml([good]))
    fine = cli(config, "config", "check", "--rucio")
    assert fine.stdout.splitlines()[-1] == "rucio: 0 error(s), 0 warning(s) in 1 stream(s)"


def test_config_check_without_rucio_validates_the_file_and_exits_2_when_it_cannot_be_used(lab, tmp_path):
    config = tmp_path / "injector.toml"
    config.write_text(toml([lab.stream()]))
    cli(config, "config", "check")
    config.write_text("[broker\n")
    broken = cli(config, "config", "check", "--rucio", expect=2)
    assert "is not valid TOML" in broken.stderr
    missing = cli(tmp_path / "nope.toml", "config", "check", expect=2)
    assert "does not exist" in missing.stderr


@pytest.mark.parametrize("verb", ["ingest", "cleanup"])
def test_ingest_and_cleanup_refuse_to_start_naming_each_problem(lab, tmp_path, verb):
    bad = bad_streams(lab, tmp_path)
    config = tmp_path / "injector.toml"
    config.write_text(toml([s for s, _ in bad.values()], f'[ingest]\nqueue = "t-{lab.tag}.ingest"\n'
                           f'[cleanup]\nqueue = "t-{lab.tag}.cleanup"\n', lab.tag))
    with declared(load(config)):  # the broker side is fine: what is refused is the streams
        done = cli(config, verb, expect=2)
    assert f"{verb} refuses to start" in done.stderr
    concerns = {"ingest": set(bad), "cleanup": {"unknown-rse", "no-scope", "no-archive"}}[verb]
    for name, (_, words) in bad.items():
        assert (words in done.stderr) == (name in concerns), (name, done.stderr)


def test_a_rucio_outage_at_start_up_is_waited_out_not_reported_as_a_config_error(lab, tmp_path):
    settings = parse({"streams": [lab.stream()], "rucio": {"retry_attempts": 1}})
    with pytest.raises(RucioDown):  # the breaker's probe fails too: an outage, not a config error
        check(settings, ClientGateway(settings.rucio, factory=_dead_client))

    dead = tmp_path / "rucio-dead.cfg"  # the same client config, pointing at a port where nothing answers
    dead.write_text(lab.server.client_config.read_text().replace(lab.server.url, "http://127.0.0.1:9"))
    config = tmp_path / "injector.toml"
    config.write_text(toml([lab.stream()], f'[ingest]\nqueue = "t-{lab.tag}.ingest"\n[rucio]\nretry_attempts = 1\n',
                           lab.tag))
    with declared(load(config)):
        proc = subprocess.Popen([sys.executable, "-m", "injector.cli", "--config", str(config), "ingest"],
                                env={**os.environ, "RUCIO_CONFIG": str(dead)}, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        stderr = proc.stderr
        err: list[str] = []
        threading.Thread(target=lambda: err.extend(iter(stderr.readline, "")), daemon=True).start()
        try:
            wait_for(lambda: "Rucio does not answer" in "".join(err), timeout=60, what="the check waiting for Rucio")
            time.sleep(1)
            assert proc.poll() is None, "still waiting for Rucio, not refusing to start"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert proc.returncode == 0 and "refuses to start" not in "".join(err), "".join(err)


def _dead_client() -> Any:
    from rucio.client import Client

    return Client(rucio_host="http://127.0.0.1:9", auth_host="http://127.0.0.1:9", account="root",
                  auth_type="userpass", creds={"username": "ddmlab", "password": "secret"}, timeout=2)


def test_an_account_owning_no_scope_is_checked_not_refused_as_unknown(lab, tmp_path):
    """Rucio answers "no scopes found" (ScopeNotFound) for an account that owns none: that account is known, and
    an admin one may write any scope. `config check --rucio` and the consumers' start-up check must go on, not say
    Rucio refused to tell who we are."""
    name, password = f"noscope{lab.tag}", "s3cret-noscope"
    lab.client.add_account(name, "USER", f"{name}@example.org")
    lab.client.add_identity(name, name, "USERPASS", f"{name}@example.org", password=password)
    lab.client.add_account_attribute(name, "admin", "True")
    rucio_cfg = tmp_path / "rucio.cfg"  # the session's client config, as that account, with its own token file
    rucio_cfg.write_text(f"[client]\nrucio_host = {lab.server.url}\nauth_host = {lab.server.url}\n"
                         f"auth_type = userpass\nusername = {name}\npassword = {password}\naccount = {name}\n"
                         f"auth_token_file_path = {tmp_path}/token\nrequest_retries = 2\n")
    config = tmp_path / "injector.toml"
    config.write_text(toml([lab.stream()]))
    done = cli(config, "config", "check", "--rucio", env={"RUCIO_CONFIG": str(rucio_cfg)})
    assert "who we are" not in done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "rucio: 0 error(s), 0 warning(s) in 1 stream(s)", done.stdout
