"""UDP flows of removed backends, in the kernel's conntrack table.

A UDP "flow" is only a conntrack entry: it stays pinned to the container it was
DNATed to for as long as the client keeps sending. While that container lives
this is what we want (the same promise as TCP). Once it is gone the entry must
go too, or the client is blackholed until it falls silent. So a switch records
the UDP backends it removed, and they are forgotten (their conntrack entries
deleted) when their container dies: at once with `natports watch` (Docker's
events), else at the next apply. TCP entries are never touched: established TCP
flows end where they started.

This uses the `conntrack` tool (conntrack-tools, already a dependency) rather than
a netlink library: one delete filter per backend is all natports needs.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .model import Protocol, Route

RETIRED = "conntrack"  # store document kind
RETIRED_DOC = "udp-retired"


@dataclass(frozen=True, order=True)
class RetiredUdp:
    container_id: str
    ip: str
    port: int

    def to_json(self) -> dict[str, object]:
        return {"container_id": self.container_id, "ip": self.ip, "port": self.port}


def removed_udp_backends(previous: Sequence[Route], desired: Sequence[Route]) -> set[RetiredUdp]:
    """UDP backends that served `previous` and serve nothing in `desired`."""

    def udp(routes: Iterable[Route]) -> set[RetiredUdp]:
        return {
            RetiredUdp(b.container_id, str(b.ip), b.port)
            for r in routes
            if r.key.protocol is Protocol.UDP
            for b in r.backends
        }

    return udp(previous) - udp(desired)


def forget_udp_flows(backend: RetiredUdp) -> bool:
    """Delete the conntrack entries of UDP flows DNATed to this backend."""
    binary = shutil.which("conntrack")
    if binary is None:
        return False
    family = "ipv6" if ":" in backend.ip else "ipv4"
    proc = subprocess.run(
        [
            binary,
            "-D",
            "-f",
            family,
            "-p",
            "udp",
            "--reply-src",
            backend.ip,
            "--reply-port-src",
            str(backend.port),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # conntrack exits 1 when nothing matched: that is fine, the flows are gone either way.
    return proc.returncode in (0, 1)
