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


@dataclass
class ActiveMQ:
    base: Path
    stomp_port: int
    process: subprocess.Popen[bytes] | None

    @property
    def stomp_host(self) -> str:
        return f"127.0.0.1:{self.stomp_port}"

    def stop(self) -> None:
        stop_group(self.process, grace=30, kill_wait=10)
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port and data (persistent messages survive)."""
        self.stop()
        self.process = _launch(self.base, self.stomp_port)
        _wait(self)

    def __enter__(self) -> ActiveMQ:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def start_activemq(base: Path, port: int | None = None) -> ActiveMQ:
    if not JAR.exists():
        raise TestbedError(f"{JAR} is missing: install the Debian package `activemq` (bash .ci/setup-machine)")
    base.mkdir(parents=True, exist_ok=True)
    amq = ActiveMQ(base, port or free_port(), None)
    amq.process = _launch(base, amq.stomp_port)
    try:
        _wait(amq)
    except BaseException:  # an interrupt or a timeout while it starts must not leave java running
        amq.stop()
        raise
    return amq


def _launch(base: Path, port: int) -> subprocess.Popen[bytes]:
    conf, data, tmp = base / "conf", base / "data", base / "tmp"
    for d in (conf, data, tmp):
        d.mkdir(exist_ok=True)
    (conf / "log4j.properties").write_text(_LOG4J.format(log=base / "activemq.log"))
    cmd = ["java", "-Xms64m", "-Xmx256m", f"-Dactivemq.home={HOME}", f"-Dactivemq.base={base}",
           f"-Dactivemq.conf={conf}", f"-Dactivemq.data={data}", f"-Dactivemq.classpath={conf}",
           f"-Djava.io.tmpdir={tmp}", "-Dstomp.host=127.0.0.1", f"-Dstomp.port={port}",
           "-jar", str(JAR), "start", f"xbean:file:{CONFIG}"]
    out = (base / "java.out").open("ab")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(amq: ActiveMQ, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if amq.process is None or amq.process.poll() is not None:
            raise TestbedError(f"ActiveMQ exited at start:\n{_tail(amq.base / 'java.out')}")
        try:
            with socket.create_connection(("127.0.0.1", amq.stomp_port), timeout=1):
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
