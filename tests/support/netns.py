"""A network namespace joined to this host by a veth pair, for tests that need a peer that
is not on loopback.

    with Netns.create() as ns:   # Unavailable (with the reason) when it cannot be made
        ns.host, ns.inside       # 198.18.x.1 here, 198.18.x.2 in the namespace (a /30)
        ns.run(["python3", "-c", ...])

The addresses are in 198.18.0.0/15 (RFC 2544's benchmarking range, never routed), in a /30
of this process's own that no interface here has yet; nothing leaves the pair. The namespace
has its own loopback, up. Everything is removed on exit: deleting the namespace deletes the
veth end in it and so the pair; the host end is deleted as well in case the move never
happened.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from types import TracebackType

NETWORK = ipaddress.IPv4Network("198.18.0.0/15")


class Unavailable(Exception):
    """No namespace can be made here (not root, no CAP_SYS_ADMIN, no iproute2)."""


def _ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError as exc:
        raise Unavailable(f"no ip command: {exc}") from None


def _must(*args: str, netns: str | None = None) -> None:
    done = _ip(*args, netns=netns)
    if done.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-o", "-4", "addr").stdout
    subnets = list(NETWORK.subnets(new_prefix=30))
    start = os.getpid() % len(subnets)
    for n in range(len(subnets)):
        subnet = subnets[(start + n) % len(subnets)]
        if not any(f" {h}/" in used for h in subnet):
            return subnet
    raise Unavailable(f"every /30 of {NETWORK} is in use")


class Netns:
    def __init__(self, name: str, subnet: ipaddress.IPv4Network) -> None:
        self.name = name
        self.host_link = f"{name}h"  # interface names: at most 15 characters
        self.inner_link = f"{name}n"
        first, second = list(subnet.hosts())
        self.host, self.inside = str(first), str(second)
        self.prefix = subnet.prefixlen

    @classmethod
    def create(cls) -> Netns:
        ns = cls(f"mgt{os.getpid() % 10**8}", _free_subnet())
        _must("netns", "add", ns.name)
        try:
            _must("link", "add", ns.host_link, "type", "veth", "peer", "name", ns.inner_link)
            _must("link", "set", ns.inner_link, "netns", ns.name)
            _must("addr", "add", f"{ns.host}/{ns.prefix}", "dev", ns.host_link)
            _must("link", "set", ns.host_link, "up")
            _must("addr", "add", f"{ns.inside}/{ns.prefix}", "dev", ns.inner_link, netns=ns.name)
            _must("link", "set", ns.inner_link, "up", netns=ns.name)
            _must("link", "set", "lo", "up", netns=ns.name)
        except BaseException:
            ns.remove()
            raise
        return ns

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def remove(self) -> None:
        _ip("netns", "del", self.name)
        _ip("link", "del", self.host_link)  # gone with the namespace, unless never moved

    def __enter__(self) -> Netns:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
