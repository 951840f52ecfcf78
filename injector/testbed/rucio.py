"""A throw-away REAL Rucio server (PyPI `rucio`, own virtual environment) for tests and the demo.

Only the standard library is imported here: the server and its daemons run as subprocesses of
their own venv with their own config (a process with a [database] section is a server; server
and client configs must never share a process). PostgreSQL when reachable, else SQLite.

Like every production Rucio (its Helm charts and containers run one), the server and its daemons share a
memcached: without one Rucio reads every RSE setting, attribute and config value from the database on each
use (list_replicas: several queries per replica). Each testbed has its own memcached on its own port, so two
testbeds (two databases, the same RSE names) never read each other's cache; with no `memcached` on the
machine Rucio runs uncached (slower, the same answers).

    python -m injector.testbed.rucio --ensure-venv    # create the server venv (idempotent)

The server's version is RUCIO_VERSION: the environment variable RUCIO_INJECTOR_RUCIO_SERVER, else the default
below; each version has its own venv. The client (rucio-clients in the project's venv) stays what it is, as at a
site whose server is older (checked: the 38 LTS, 38.6.4, with rucio-clients 41):

    RUCIO_INJECTOR_RUCIO_SERVER=38.6.4 python -m injector.testbed.rucio --ensure-venv
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SERVER_VERSION_ENV = "RUCIO_INJECTOR_RUCIO_SERVER"
RUCIO_VERSION = os.environ.get(SERVER_VERSION_ENV, "").strip() or "41.5.1"  # the one place it is spelled
DEFAULT_VENV = Path.home() / ".cache" / "rucio-injector" / f"rucio-{RUCIO_VERSION}-server"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
USERNAME, PASSWORD = "ddmlab", "secret"
DAEMONS = Path(__file__).with_name("daemons_main.py")


class TestbedError(RuntimeError):
    """The throw-away service could not be set up; the message says why."""


@dataclass(frozen=True)
class HermesBroker:
    """Where hermes sends Rucio's events ([messaging-hermes])."""

    host: str = "127.0.0.1"
    port: int = 61613
    destination: str = "/topic/rucio.events"
    username: str = "guest"
    password: str = "guest"
    vhost: str = "/"  # RabbitMQ refuses stomp.py's default (the host name)


def ensure_server_venv(path: Path | None = None) -> Path:
    """Create the server venv (rucio, gunicorn, psycopg) unless present; returns its python."""
    venv = path or DEFAULT_VENV
    python = venv / "bin" / "python"
    marker = venv / ".rucio-injector-ready"
    if marker.exists():
        held = marker.read_text().strip()
        if held != RUCIO_VERSION:
            raise TestbedError(f"{venv} holds rucio {held}, not {RUCIO_VERSION} ({SERVER_VERSION_ENV}): "
                               "give another --venv or remove that one")
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"rucio=={RUCIO_VERSION}", "gunicorn", "psycopg[binary]"], check=True)
    marker.write_text(RUCIO_VERSION + "\n")
    return python


def stop_group(process: subprocess.Popen[bytes] | None, grace: float, kill_wait: float = 5.0) -> None:
    """Stop a child started with start_new_session=True, and its children: SIGTERM to its process
    group, SIGKILL after `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(kill_wait)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class RucioServer:
    base_dir: Path
    url: str
    server_config: Path
    client_config: Path
    venv_python: Path
    database: str
    cache_port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    cache: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    daemons: set[subprocess.Popen[str]] = field(default_factory=set, repr=False)  # passes running now

    def env(self) -> dict[str, str]:
        """Environment for a CLIENT process (rucio-clients reads RUCIO_CONFIG)."""
        return {**os.environ, "RUCIO_CONFIG": str(self.client_config)}

    def run_daemons(self, *names: str, rses: list[str] | None = None, hermes: HermesBroker | None = None,
                    timeout: float = 180, stop: threading.Event | None = None) -> str:
        """Run Rucio daemons ONE pass each, in order, in one server-side subprocess; returns the log.
        `stop` set, or the server stopped, kills the pass (its output so far is returned, no error)."""
        config = self.server_config
        if hermes is not None:
            config = self.base_dir / f"rucio-hermes-{hermes.port}.cfg"
            config.write_text(_server_config(self, hermes))
        cmd = [str(self.venv_python), "-P", str(DAEMONS), "--rses", ",".join(rses or []), *names]
        env = {**os.environ, "RUCIO_CONFIG": str(config), "PYTHONPATH": ""}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.daemons.add(proc)
        try:
            out = _output(proc, timeout, stop)
        finally:
            self.daemons.discard(proc)
            proc.kill()  # no-op once it exited; else (an interrupt) it must not outlive us
            proc.wait()
        if proc.returncode != 0 and not (stop is not None and stop.is_set()) and self.process is not None:
            raise TestbedError(f"rucio daemons {names} failed (exit {proc.returncode}):\n{out[-4000:]}")
        return out

    def forget_cache(self) -> None:
        """Empty this server's memcached, as if its entries had expired: Rucio keeps an RSE's protocols cached
        (15 minutes) even after they are changed through its API, as production servers do."""
        if self.cache is None:
            return
        with socket.create_connection(("127.0.0.1", self.cache_port), timeout=5) as c:
            c.sendall(b"flush_all\r\n")
            if not c.recv(64).startswith(b"OK"):
                raise TestbedError(f"memcached on port {self.cache_port} did not flush")

    def serve(self) -> None:
        """Start the REST API again (after `halt`) on the same port and database; returns once it answers."""
        _serve(self)

    def halt(self) -> None:
        """Stop the REST API only (a Rucio outage): the database and port stay; `serve()` starts it again."""
        stop_group(self.process, grace=15)
        self.process = None

    def stop(self) -> None:
        """Stop the daemons pass running (if any), the server, and drop its PostgreSQL database."""
        process, self.process = self.process, None  # first: a pass killed now is no failure (run_daemons)
        for proc in list(self.daemons):
            proc.kill()
        stop_group(process, grace=15)
        cache, self.cache = self.cache, None
        stop_group(cache, grace=5)
        if self.database.startswith("rucio_testbed_"):
            _server_python(self.venv_python, _DROP_DB.format(db=self.database), self.base_dir, check=False)

    def __enter__(self) -> RucioServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def start_server(base_dir: Path, *, venv_python: Path, database: str = "auto",
                 hermes: HermesBroker | None = None) -> RucioServer:
    """Create a database, bootstrap it, serve the REST API with gunicorn; returns once it answers.
    Whatever ends the start-up early (an error, an interrupt) stops gunicorn and drops the database."""
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "log").mkdir(exist_ok=True)
    if database == "auto":
        database = "postgresql" if postgres_available() else "sqlite"
    db = f"rucio_testbed_{secrets.token_hex(4)}" if database == "postgresql" else str(base_dir / "rucio.db")
    server = RucioServer(base_dir, f"http://127.0.0.1:{free_port()}", base_dir / "rucio-server.cfg",
                         base_dir / "rucio-client.cfg", venv_python, db, free_port())
    try:  # from here on, server.stop() undoes whatever part was done
        server.cache = _memcached(server.cache_port)
        _bootstrap(server, hermes or HermesBroker())
        _serve(server)
    except BaseException:
        server.stop()
        raise
    return server


def _memcached(port: int) -> subprocess.Popen[bytes] | None:
    """This testbed's own memcached on 127.0.0.1:`port`; None (Rucio runs uncached) when the machine has none."""
    binary = shutil.which("memcached")
    if binary is None:
        return None
    user = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root unless told which user to be
    proc = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-t", "1", *user],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    stop_group(proc, grace=2)
    raise TestbedError(f"memcached did not start on 127.0.0.1:{port} (exit {proc.poll()})")


def _bootstrap(server: RucioServer, hermes: HermesBroker) -> None:
    base, db, python = server.base_dir, server.database, server.venv_python
    if db.startswith("rucio_testbed_"):
        _server_python(python, _CREATE_DB.format(db=db), base)
    server.server_config.write_text(_server_config(server, hermes))
    (base / "alembic.ini").write_text(_ALEMBIC.format(
        script_location=_site_packages(python) / "rucio" / "db" / "sqla" / "migrate_repo", db_url=_db_url(db)))
    _server_python(python, _BOOTSTRAP, base, {"RUCIO_CONFIG": str(server.server_config)})


def _serve(server: RucioServer) -> None:
    base, python = server.base_dir, server.venv_python
    sqlite = server.database.startswith("/")
    workers = ["-w", "1", "--threads", "1"] if sqlite else ["-w", "2", "--threads", "4"]
    if sqlite:  # DID metadata as on PostgreSQL (see _SQLITE_JSON_META)
        conf = base / "gunicorn.conf.py"
        conf.write_text(_SQLITE_JSON_META)
        workers += ["-c", str(conf)]
    log = open(base / "log" / "gunicorn.log", "ab")  # noqa: SIM115 - owned by the server process
    server.process = subprocess.Popen(
        [str(python.parent / "gunicorn"), "--no-control-socket", "-b", server.url.removeprefix("http://"),
         *workers, "--timeout", "120", "rucio.web.rest.flaskapi.v1.main:application"],
        env={**os.environ, "RUCIO_CONFIG": str(server.server_config), "PYTHONPATH": ""}, stdout=log, stderr=log,
        cwd=base, start_new_session=True)
    server.client_config.write_text(_CLIENT.format(url=server.url, base=base, user=USERNAME, password=PASSWORD))
    _wait_until_up(server, base / "log" / "gunicorn.log")


def _wait_until_up(server: RucioServer, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(server.url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TestbedError(f"Rucio server did not come up on {server.url}:\n{log.read_text()[-3000:]}")


def _output(proc: subprocess.Popen[str], timeout: float, stop: threading.Event | None) -> str:
    """What the process wrote until it exited, was killed because `stop` was set, or timed out (raised)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return proc.communicate(timeout=0.2)[0]
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                proc.kill()
            elif time.monotonic() > deadline:
                proc.kill()
                raise subprocess.TimeoutExpired(proc.args, timeout) from None


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _server_python(python: Path, code: str, cwd: Path, env: dict[str, str] | None = None,
                   check: bool = True) -> None:
    done = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "", **(env or {})}, check=False)
    if check and done.returncode != 0:
        raise TestbedError(f"rucio server set-up step failed:\n{(done.stdout + done.stderr)[-3000:]}")


def _db_url(db: str) -> str:
    return f"sqlite:///{db}" if db.startswith("/") else PG_URL.format(db=db)


def _server_config(server: RucioServer, hermes: HermesBroker) -> str:
    return _SERVER.format(base=server.base_dir, db_url=_db_url(server.database), user=USERNAME, password=PASSWORD,
                          h=hermes, cache_port=server.cache_port)


# Rucio stores custom DID metadata (our injector_* marks) with its JSON plugin, whose code has SQLite
# branches, but json_implemented() answers False for SQLite, so the server refuses every custom key
# ("No plugin manages metadata keys"). On the testbed's SQLite server only, the gunicorn master
# (whose modules its workers inherit) turns that plugin on; production Rucio databases have it.
_SQLITE_JSON_META = """\
import rucio.core.did_meta_plugins.json_meta as json_meta

json_meta.json_implemented = lambda *, session=None: True
"""

_CREATE_DB = """
import psycopg
with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
    c.execute('CREATE DATABASE "{db}"')
"""
_DROP_DB = """
import psycopg
with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
    c.execute('DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
"""
_BOOTSTRAP = """
from rucio.common.types import InternalAccount
from rucio.core.account import add_account_attribute
from rucio.db.sqla.session import get_session
from rucio.db.sqla.util import build_database, create_base_vo, create_root_account
build_database()
create_base_vo()
create_root_account()
session = get_session()
add_account_attribute(InternalAccount('root'), 'admin', True, session=session)
session.commit()
"""
_SERVER = """[common]
logdir = {base}/log
loglevel = INFO
[database]
default = {db_url}
pool_size = 10
[cache]
url = 127.0.0.1:{cache_port}
[bootstrap]
userpass_identity = {user}
userpass_pwd = {password}
userpass_email = ops@example.org
[alembic]
cfg = {base}/alembic.ini
[policy]
permission = generic
schema = generic
lfn2pfn_algorithm_default = hash
support = ops@example.org
support_rucio = https://github.com/rucio/rucio/issues
[conveyor]
scheme = file
transfertool = mock
[hermes]
services_list = activemq
[messaging-hermes]
brokers = {h.host}
port = {h.port}
nonssl_port = {h.port}
use_ssl = False
username = {h.username}
password = {h.password}
broker_virtual_host = {h.vhost}
destination = {h.destination}
voname = testbed
"""
_CLIENT = """[client]
rucio_host = {url}
auth_host = {url}
auth_type = userpass
username = {user}
password = {password}
account = root
auth_token_file_path = {base}/token
request_retries = 2
"""
_ALEMBIC = """[alembic]
script_location = {script_location}
sqlalchemy.url = {db_url}
[loggers]
keys = root
[handlers]
keys = console
[formatters]
keys = generic
[logger_root]
level = WARN
handlers = console
[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic
[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensure-venv", action="store_true", help="create the Rucio server venv if missing")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help=f"default: %(default)s (rucio {RUCIO_VERSION}; set {SERVER_VERSION_ENV} for another version)")
    args = p.parse_args(argv)
    if args.ensure_venv:
        print(ensure_server_venv(args.venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
