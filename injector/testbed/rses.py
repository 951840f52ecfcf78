"""RSEs for the testbed: a non-deterministic source over the DAQ buffer, a deterministic archive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

POSIX = "rucio.rse.protocols.posix.Default"


def file_protocol(prefix: Path, hostname: str = "localhost") -> dict[str, Any]:
    """A posix `file` protocol for read/write/delete on LAN and WAN, and third-party copy."""
    rw = {"read": 1, "write": 1, "delete": 1}
    return {
        "scheme": "file", "hostname": hostname, "port": 0, "prefix": str(prefix).rstrip("/") + "/", "impl": POSIX,
        "domains": {"lan": rw, "wan": {**rw, "third_party_copy_read": 1, "third_party_copy_write": 1}},
    }


def create_rses(client: Any, root: Path, *, source: str = "BUFFER", archive: str = "ARCHIVE",
                account: str = "root") -> tuple[Path, Path]:
    """Add both RSEs with their protocols, a distance source → archive and unlimited quota.
    Returns (source_dir, archive_dir). The source is non-deterministic: files keep their own path."""
    src_dir, dst_dir = root / "buffer", root / "archive"
    for name, directory, deterministic in ((source, src_dir, False), (archive, dst_dir, True)):
        directory.mkdir(parents=True, exist_ok=True)
        client.add_rse(name, deterministic=deterministic)
        client.add_protocol(name, file_protocol(directory))
        client.set_local_account_limit(account, name, -1)
    client.add_distance(source, archive, {"distance": 1})
    return src_dir, dst_dir
