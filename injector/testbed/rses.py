"""RSEs for the testbed: a non-deterministic source over the DAQ buffer, a deterministic archive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

POSIX = "rucio.rse.protocols.posix.Default"
# Where Rucio 38 (LTS) takes account limits: rucio-clients 41 posts them to
# /accounts/<account>/limits/local/<rse>, which Rucio 38 serves for GET only (405 on POST).
_OLD_LIMIT_PATH = "accountlimits/local/{account}/{rse}"


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
        set_local_account_limit(client, account, name, -1)
    client.add_distance(source, archive, {"distance": 1})
    return src_dir, dst_dir


def set_local_account_limit(client: Any, account: str, rse: str, bytes_: int) -> None:
    """client.set_local_account_limit, also against a Rucio server older than the client (38 LTS with
    rucio-clients 41): there the limit is set through the server's own (older) route."""
    try:
        client.set_local_account_limit(account, rse, bytes_)
        return
    except Exception as exc:
        if "status code: 405" not in str(exc):
            raise
    from urllib.parse import quote_plus

    from rucio.common.constants import HTTPMethod
    from rucio.common.utils import build_url

    path = _OLD_LIMIT_PATH.format(account=quote_plus(account), rse=quote_plus(rse))
    answer = client._send_request(build_url(client.list_hosts[0], path=path), method=HTTPMethod.POST,
                                  data=json.dumps({"bytes": bytes_}))
    if answer.status_code != 201:
        cls, msg = client._get_exception(headers=answer.headers, status_code=answer.status_code, data=answer.content)
        raise cls(msg)
