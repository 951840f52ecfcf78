"""A second "site" on this machine: a network namespace joined to the host by a veth pair, whose link a fault
campaign cuts (a partition: packets vanish, no connection is refused or reset) and heals. Processes of the site run
under `ip netns exec`; they reach the host's services only through proxies bound on the host end of the pair."""

from __future__ import annotations

import subprocess


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


class Site:
    def __init__(self, tag: str) -> None:
        n = int(tag[:2], 16)
        self.ns = f"rinj-{tag}"
        self.host_if, self.ns_if = f"ri{tag}h", f"ri{tag}n"
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"

    def __enter__(self) -> Site:
        try:
            ip("netns", "add", self.ns)
            ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            ip("link", "set", self.ns_if, "netns", self.ns)
            ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            ip("-n", self.ns, "link", "set", self.ns_if, "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefix(self) -> list[str]:
        """The command prefix that runs a process inside the site."""
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> None:
        """The link goes down: every packet between the site and the host is lost until `heal`."""
        ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        ip("link", "del", self.host_if, check=False)  # deletes both ends
        ip("netns", "del", self.ns, check=False)
