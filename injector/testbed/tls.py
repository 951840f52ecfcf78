"""Throw-away certificate authorities for the TLS tests, and this machine's RabbitMQ TLS listeners (openssl).

    ca = authority(tmp_dir, "site CA")
    server = ca.issue(tmp_dir, "broker", hosts=("localhost", "127.0.0.1"))
    client = ca.issue(tmp_dir, "ingest", client=True)

`python -m injector.testbed.tls --rabbitmq` (run by `make setup`) gives the machine's RabbitMQ an AMQP TLS listener
on 127.0.0.1:5671 and a STOMP one on 61614 that want a client certificate (ssl_options.verify = verify_peer,
fail_if_no_peer_cert = true) and take a login by certificate (EXTERNAL, the certificate's CN is the user), signed
by a CA kept in MACHINE_DIR for the tests to issue client certificates with.
The plain listeners (5672, 61613) the other tests use stay as they are. RabbitMQ is restarted only when its
configuration changed (its application only: `rabbitmqctl stop_app`, `start_app`); a second run changes
nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from injector.testbed.rucio import TestbedError

MACHINE_DIR = Path("/etc/rabbitmq/rucio-injector-tls")
RABBITMQ_CONF = Path("/etc/rabbitmq/rabbitmq.conf")
AMQPS_PORT, STOMPS_PORT = 5671, 61614
PORTS = (5672, 61613, AMQPS_PORT, STOMPS_PORT)  # the plain listeners the other tests use, and these
_BEGIN = "# --- rucio-injector tests: TLS listeners (injector/testbed/tls.py) ---"
_END = "# --- end rucio-injector TLS ---"


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority(Pair):
    """A CA that issues server and client certificates."""

    def issue(self, directory: Path, name: str, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              client: bool = False) -> Pair:
        """A certificate for `name` signed by this CA: a server's (its host names and IPs as subjectAltName) or,
        with `client`, a client's (its name as the CN, what RabbitMQ's EXTERNAL login would take)."""
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / name.replace(" ", "-")
        key, csr, cert, ext = (stem.with_suffix(s) for s in (".key", ".csr", ".pem", ".ext"))
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        sans = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer",
                 f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
        if not client:
            lines.append(f"subjectAltName={sans}")
        ext.write_text("\n".join(lines) + "\n")
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
                 "-days", "825", "-sha256", "-out", cert, "-extfile", ext)
        csr.unlink()
        ext.unlink()
        return Pair(cert, key)


def authority(directory: Path, name: str) -> Authority:
    """A new self-signed CA in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / name.replace(" ", "-")
    cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
             "-keyout", key, "-out", cert, "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash")
    return Authority(cert, key)


def machine_authority() -> Authority:
    """The CA the machine's RabbitMQ TLS listeners trust (set up by `--rabbitmq`)."""
    ca = Authority(MACHINE_DIR / "ca.pem", MACHINE_DIR / "ca.key")
    if not (ca.cert.exists() and ca.key.exists() and _BEGIN in _read(RABBITMQ_CONF)):
        raise TestbedError("RabbitMQ has no TLS listeners: run `make setup` (python -m injector.testbed.tls "
                           "--rabbitmq)")
    return ca


def java_stores(directory: Path, server: Pair, trusted: Path, password: str) -> tuple[Path, Path]:
    """A Java broker's (ActiveMQ's) key store holding `server` and trust store holding the CA `trusted` (PKCS12)."""
    keystore, truststore = directory / "broker-keystore.p12", directory / "broker-truststore.p12"
    _openssl("pkcs12", "-export", "-in", server.cert, "-inkey", server.key, "-name", "broker",
             "-out", keystore, "-passout", f"pass:{password}")
    truststore.unlink(missing_ok=True)
    keytool = shutil.which("keytool") or "keytool"
    _run([keytool, "-importcert", "-noprompt", "-alias", "ca", "-file", str(trusted), "-keystore", str(truststore),
          "-storetype", "PKCS12", "-storepass", password])
    return keystore, truststore


def set_up_rabbitmq() -> bool:
    """The TLS listeners on the machine's RabbitMQ (see the module's doc); True if RabbitMQ was restarted."""
    ca = Authority(MACHINE_DIR / "ca.pem", MACHINE_DIR / "ca.key")
    server = Pair(MACHINE_DIR / "server.pem", MACHINE_DIR / "server.key")
    if not all(p.exists() for p in (ca.cert, ca.key, server.cert, server.key)):
        MACHINE_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(MACHINE_DIR, 0o755)
        fresh = authority(MACHINE_DIR, "ca")
        issued = fresh.issue(MACHINE_DIR, "server")
        assert (fresh, issued) == (ca, server)
        os.chmod(ca.key, 0o600)
        shutil.chown(server.key, group="rabbitmq")
        os.chmod(server.key, 0o640)
    block = "\n".join([
        _BEGIN,
        f"listeners.ssl.local = 127.0.0.1:{AMQPS_PORT}",
        f"ssl_options.cacertfile = {ca.cert}",
        f"ssl_options.certfile = {server.cert}",
        f"ssl_options.keyfile = {server.key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        f"stomp.listeners.ssl.1 = 127.0.0.1:{STOMPS_PORT}",
        "auth_mechanisms.1 = PLAIN",  # PLAIN and AMQPLAIN as before; EXTERNAL: a login by client certificate
        "auth_mechanisms.2 = AMQPLAIN",
        "auth_mechanisms.3 = EXTERNAL",
        "ssl_cert_login_from = common_name",
        _END,
    ])
    _run(["rabbitmq-plugins", "enable", "rabbitmq_auth_mechanism_ssl"], timeout=300)  # online; idempotent
    text = _read(RABBITMQ_CONF)
    if block in text:
        _wait_ports(PORTS)
        return False
    if _BEGIN in text:  # an older block: replace it
        head, _, rest = text.partition(_BEGIN)
        text = head + rest.partition(_END)[2].lstrip("\n")
    RABBITMQ_CONF.write_text(text.rstrip("\n") + "\n" + block + "\n")
    # The node re-reads rabbitmq.conf when its application starts (the conf is translated at that point), so an
    # application restart is enough: no init script (which a machine may not have started the node with).
    _run(["rabbitmqctl", "-q", "stop_app"], timeout=300)
    _run(["rabbitmqctl", "-q", "start_app"], timeout=300)
    _wait_ports(PORTS)
    return True


def _wait_ports(ports: tuple[int, ...], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TestbedError(f"RabbitMQ does not answer on 127.0.0.1:{port}: {exc}") from None
                time.sleep(0.5)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _openssl(*args: str | Path) -> None:
    _run(["openssl", *map(str, args)])


def _run(cmd: list[str], timeout: float = 60) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(cmd[:3])} … failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rabbitmq", action="store_true", help="set up the machine's RabbitMQ TLS listeners")
    args = parser.parse_args(argv)
    if not args.rabbitmq:
        parser.print_help()
        return 2
    try:
        restarted = set_up_rabbitmq()
    except TestbedError as exc:
        print(f"RabbitMQ TLS listeners: {exc}", file=sys.stderr)
        return 1
    print(f"RabbitMQ TLS listeners on 127.0.0.1:{AMQPS_PORT} (AMQP) and :{STOMPS_PORT} (STOMP)"
          + (", RabbitMQ restarted" if restarted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
