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

from .model import Backend, Protocol, Route

RETIRED = "conntrack"  # store document kind
RETIRED_DOC = "udp-retired"


def removed_udp_backends(previous: Sequence[Route], desired: Sequence[Route]) -> set[Backend]:
    """UDP backends that served `previous` and serve nothing in `desired`."""

    def udp(routes: Iterable[Route]) -> set[Backend]:
        return {b for r in routes if r.key.protocol is Protocol.UDP for b in r.backends}

    return udp(previous) - udp(desired)


def forget_udp_flows(backend: Backend) -> bool:
    """Delete the conntrack entries of UDP flows DNATed to this backend."""
    binary = shutil.which("conntrack")
    if binary is None:
        return False
    family = f"ipv{backend.ip.version}"
    proc = subprocess.run(
        [
            binary,
            "-D",
            "-f",
            family,
            "-p",
            "udp",
            "--reply-src",
            str(backend.ip),
            "--reply-port-src",
            str(backend.port),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # conntrack exits 1 when nothing matched: that is fine, the flows are gone either way.
    return proc.returncode in (0, 1)
