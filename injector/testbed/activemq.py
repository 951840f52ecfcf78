"""A throw-away ActiveMQ Classic broker (the Debian `activemq` package's jar) for tests.

It runs broker-config/activemq/activemq.xml (the file operators get) with its own data directory and a
free STOMP port, bypassing the Debian service wrapper. Standard library only.

    with start_activemq(tmp_dir) as amq:
        amq.stomp_port  # 127.0.0.1:<port>
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from injector.testbed.rucio import TestbedError, free_port, stop_group

HOME = Path("/usr/share/activemq")
JAR = HOME / "bin" / "activemq.jar"
CONFIG = Path(__file__).resolve().parents[2] / "broker-config" / "activemq" / "activemq.xml"
_LOG4J = """log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=%d %-5p %c - %m%n
"""


@dataclass(frozen=True)
class BrokerTls:
    """ActiveMQ's side of STOMP over TLS: its key store, the trust store of its clients' CAs (PKCS12, see
    injector.testbed.tls.java_stores), their password and the stomp+ssl port."""

    keystore: Path
    truststore: Path
    password: str
    port: int


@dataclass
class ActiveMQ:
    base: Path
    stomp_port: int
    process: subprocess.Popen[bytes] | None
    tls: BrokerTls | None = None

    @property
    def stomp_host(self) -> str:
        return f"127.0.0.1:{self.stomp_port}"

    def stop(self) -> None:
        stop_group(self.process, grace=30, kill_wait=10)
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port and data (persistent messages survive)."""
        self.stop()
        self.process = _launch(self.base, self.stomp_port, self.tls)
        _wait(self)

    def __enter__(self) -> ActiveMQ:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def start_activemq(base: Path, port: int | None = None, tls: BrokerTls | None = None) -> ActiveMQ:
    """ActiveMQ on `port` (a free one by default), and with `tls` its stomp+ssl connector too."""
    if not JAR.exists():
        raise TestbedError(f"{JAR} is missing: install the Debian package `activemq` (bash .ci/setup-machine)")
    base.mkdir(parents=True, exist_ok=True)
    amq = ActiveMQ(base, port or free_port(), None, tls)
    amq.process = _launch(base, amq.stomp_port, tls)
    try:
        _wait(amq)
    except BaseException:  # an interrupt or a timeout while it starts must not leave java running
        amq.stop()
        raise
    return amq


def _launch(base: Path, port: int, tls: BrokerTls | None = None) -> subprocess.Popen[bytes]:
    conf, data, tmp = base / "conf", base / "data", base / "tmp"
    for d in (conf, data, tmp):
        d.mkdir(exist_ok=True)
    (conf / "log4j.properties").write_text(_LOG4J.format(log=base / "activemq.log"))
    config, tls_options = CONFIG, []
    if tls is not None:  # the shipped file with its stomp+ssl connector switched on, as its comment says
        config = conf / "activemq.xml"
        config.write_text(CONFIG.read_text().replace("<!--TLS ", "").replace(" TLS-->", ""))
        tls_options = [f"-Dstomp.ssl.port={tls.port}", f"-Djavax.net.ssl.keyStore={tls.keystore}",
                       f"-Djavax.net.ssl.keyStorePassword={tls.password}", "-Djavax.net.ssl.keyStoreType=PKCS12",
                       f"-Djavax.net.ssl.trustStore={tls.truststore}",
                       f"-Djavax.net.ssl.trustStorePassword={tls.password}", "-Djavax.net.ssl.trustStoreType=PKCS12"]
    cmd = ["java", "-Xms64m", "-Xmx256m", f"-Dactivemq.home={HOME}", f"-Dactivemq.base={base}",
           f"-Dactivemq.conf={conf}", f"-Dactivemq.data={data}", f"-Dactivemq.classpath={conf}",
           f"-Djava.io.tmpdir={tmp}", "-Dstomp.host=127.0.0.1", f"-Dstomp.port={port}", *tls_options,
           "-jar", str(JAR), "start", f"xbean:file:{config}"]
    out = (base / "java.out").open("ab")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(amq: ActiveMQ, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if amq.process is None or amq.process.poll() is not None:
            raise TestbedError(f"ActiveMQ exited at start:\n{_tail(amq.base / 'java.out')}")
        try:
            for port in (amq.stomp_port, *([amq.tls.port] if amq.tls else [])):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    amq.stop()
    raise TestbedError(f"ActiveMQ STOMP did not answer on {amq.stomp_port} in {timeout:.0f}s:\n"
                       f"{_tail(amq.base / 'java.out')}")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no output)"
