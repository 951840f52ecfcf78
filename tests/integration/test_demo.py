"""The README's first command, small: the whole pipeline on its own throw-away Rucio server."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration import leftovers
from tests.integration.cli import run, service
from tests.integration.leftovers import Proc

pytestmark = pytest.mark.integration


LEFTOVERS = ("rucio-injector-demo-", "injector.testbed.broker")


def running(pattern: str) -> set[str]:
    return set(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split())


def demo(*args: str) -> str:
    before = {p: running(p) for p in LEFTOVERS}  # this test session's own embedded broker is no leftover
    done = subprocess.run([sys.executable, "-m", "injector.cli", "demo", "--files", "3", "--size", "4096",
                           "--timeout", "150", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "proof: buffer holds 0 file(s); archive holds 6/6 files with the DAQ's adler32" in out, out[-4000:]
    assert "rucio replica list file --all-states" in out
    for pattern in LEFTOVERS:
        left = running(pattern) - before[pattern]
        assert not left, f"the demo left processes running: {pattern} (pids {sorted(left)})"
    return out


def test_demo_archives_every_file_and_proves_it():
    out = demo()
    assert "broker: RabbitMQ, AMQP amqp://127.0.0.1:5672//" in out and "guest:guest" not in out


def test_on_a_machine_with_only_python_the_demo_runs_on_the_embedded_broker_and_sqlite():
    # Nothing answers on port 1: to the demo, this machine has no RabbitMQ STOMP plugin.
    out = demo("--stomp-port", "1", "--database", "sqlite")
    assert "(SQLite /" in out
    assert "RabbitMQ's STOMP plugin (for hermes; enable it: rabbitmq-plugins enable rabbitmq_stomp) is not " \
           "reachable on 127.0.0.1:1" in out, out[-4000:]
    assert "using the embedded broker instead" in out and "broker: embedded (in memory)" in out


# Stopped by a signal (kill, systemd, a closed terminal): everything the demo started is stopped and removed, in
# every phase, exactly as after Ctrl-C.

TAG = re.compile(r"logs of every component: \S*rucio-injector-demo-([0-9a-f]{6})")


class Demo:
    """`rucio-injector demo` in a session of its own, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "injector.cli", "demo", "--files", "2", "--size", "1024", "--timeout", "150",
             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.seen: set[Proc] = set()  # the demo's processes, as last looked at
        self.database: str | None = None
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: self.lines.extend(iter(stdout.readline, "")), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"the demo exited (code {self.proc.returncode}) before {what}:\n" \
                                             f"{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s:\n{self.output[-4000:]}"
            time.sleep(0.05)

    @property
    def tag(self) -> str:
        self.wait_for(lambda: TAG.search(self.output) is not None, "temp dir announced")
        match = TAG.search(self.output)
        assert match is not None
        return match.group(1)

    @functools.cached_property
    def tmp(self) -> Path:
        """The demo's temp dir (rucio-injector-demo-<tag>-XXXX); its log file is named on the first line."""
        found = list(Path(tempfile.gettempdir()).glob(f"rucio-injector-demo-{self.tag}-*"))
        assert len(found) == 1, found
        return found[0]

    def log(self) -> str:
        assert self.tag
        path = Path(self.output.split("logs of every component: ", 1)[1].split()[0])
        return path.read_text(errors="replace") if path.exists() else ""

    def look(self) -> None:
        """Note the demo's processes and database now, to check (and tidy) after it exited."""
        config = self.tmp / "rucio" / "rucio-server.cfg"
        text = config.read_text() if config.exists() else ""
        if "5432/" in text:
            self.database = text.split("5432/", 1)[1].split()[0]
        self.seen |= leftovers.descendants(self.proc.pid) | leftovers.referring_to(self.tmp)

    def left(self) -> set[Proc]:
        alive = {p for p in self.seen if leftovers.alive(p)}
        return alive | leftovers.in_session(self.proc.pid) | leftovers.referring_to(self.tmp)

    def tidy(self) -> None:
        """Remove whatever a failed test left, so that it does not linger on a shared machine."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if not TAG.search(self.output):
            return
        for pid, _ in self.left():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.database:
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc",
                            f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'], capture_output=True, timeout=60)
        for path in Path(tempfile.gettempdir()).glob(f"rucio-injector-demo-{self.tag}*"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        leftovers.remove_rabbit_names(f"demo-{self.tag}.")


@pytest.fixture
def start_demo() -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        started.append(Demo(*args))
        return started[-1]

    yield start
    for demo in started:
        demo.tidy()


def stop(demo: Demo, signum: int) -> str:
    """Send `signum` to the demo (its pid only, as `kill` does); check it left nothing behind; its output."""
    tmp, tag = demo.tmp, demo.tag
    demo.look()
    demo.proc.send_signal(signum)
    code = demo.proc.wait(120)
    time.sleep(0.5)  # an orphan told to stop by the exiting demo gets a moment to exit
    out = demo.output
    left = demo.left()
    assert not left, f"still running after the demo exited: {sorted(left)}\n{out[-3000:]}"
    assert demo.database is None or demo.database not in leftovers.databases(), f"{demo.database} left\n{out[-3000:]}"
    assert not tmp.exists(), f"temp dir left behind: {sorted(str(p) for p in tmp.rglob('*'))[:10]}"
    assert not leftovers.rabbit_names(f"demo-{tag}."), "the demo's queues/exchanges left behind"
    assert code == 128 + signum, f"exit code {code}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    return out


def gunicorn_running(demo: Demo) -> bool:
    return any(b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid, _ in leftovers.referring_to(demo.tmp))


def test_sigterm_while_the_rucio_server_starts_leaves_no_gunicorn_database_or_temp_dir(start_demo):
    demo = start_demo()
    demo.wait_for(lambda: (demo.tmp / "rucio" / "rucio-server.cfg").exists() and gunicorn_running(demo),
                  "gunicorn started")
    assert "Rucio http://" not in demo.output, "still starting: the server does not answer yet"
    stop(demo, signal.SIGTERM)


def test_sighup_while_the_rucio_database_is_bootstrapped_leaves_nothing_behind(start_demo):
    demo = start_demo()
    demo.wait_for(lambda: (demo.tmp / "rucio" / "rucio-server.cfg").exists(), "database created")
    stop(demo, signal.SIGHUP)


def test_sigterm_mid_run_stops_every_process_drops_the_database_and_deletes_the_topology(start_demo):
    demo = start_demo()
    demo.wait_for(lambda: "done released" in demo.log(), "a source released")
    assert leftovers.rabbit_names(f"demo-{demo.tag}."), "the demo's topology exists while it runs"
    assert "interrupted by SIGTERM" in stop(demo, signal.SIGTERM)


def test_sigterm_while_keep_waits_cleans_up_everything_but_the_log_and_says_where_it_is(start_demo):
    demo = start_demo("--keep")
    demo.wait_for(lambda: "server and files stay until" in demo.output, "--keep waiting", timeout=240)
    assert "proof: buffer holds 0 file(s); archive holds 4/4 files" in demo.output
    a_newcomer_points_the_verbs_at_it_and_runs_ingest_and_cleanup_as_the_systemd_units_do(demo.output)
    out = stop(demo, signal.SIGTERM)
    kept = Path(out.split("log kept: ", 1)[1].split()[0])
    assert "done archived" in kept.read_text()


UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def a_newcomer_points_the_verbs_at_it_and_runs_ingest_and_cleanup_as_the_systemd_units_do(output: str) -> None:
    """What the kept demo prints is enough: its two `export` lines make `config check --rucio`, `status`, `dlq list`
    and `reconcile --dry-run` answer 0 against its server, and the ingest and cleanup units' ExecStart lines (the
    demo's TOML in place of /etc/rucio-injector/%i.toml) consume until SIGTERM and exit 0."""
    env = dict(re.findall(r"export (RUCIO_CONFIG|RUCIO_INJECTOR_CONFIG)=(\S+)", output))
    assert set(env) == {"RUCIO_CONFIG", "RUCIO_INJECTOR_CONFIG"}, output[-3000:]
    assert "rucio: 0 error(s), 0 warning(s) in 2 stream(s)" in run("config", "check", "--rucio", env=env).stdout
    for verb in (["status"], ["dlq", "list"], ["reconcile", "--dry-run"]):
        run(*verb, env=env)
    for unit in ("rucio-injector-ingest@.service", "rucio-injector-cleanup@.service"):
        start = next(line for line in (UNITS / unit).read_text().splitlines() if line.startswith("ExecStart="))
        args = start.split()[1:]  # after the binary
        args[args.index("--config") + 1] = env["RUCIO_INJECTOR_CONFIG"]
        with service(*args, env=env) as verb:
            deadline = time.monotonic() + 60
            while "consuming demo-" not in verb.err():
                assert verb.proc.poll() is None and time.monotonic() < deadline, verb.err()
                time.sleep(0.1)
