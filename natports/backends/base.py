"""The one interface every backend (nftables, iptables, userspace proxy) implements.

A backend turns routes into a *batch* (text a person can read with --dry-run) and
runs a batch as one atomic step. Planning may read the backend's own live state;
it never reads or writes anything natports does not own. A full apply that nobody
reads (`describe=False`) may stand for its change with a one-line summary: the
backend then applies it by a way that has no text (nftables: a netlink batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..model import Route

# The userspace proxy backend's name (ProxyBackend.name). Core code that treats proxied
# routes apart compares names, so importing it never loads the proxy's client modules.
PROXY = "proxy"


class RouteBackend(Protocol):
    name: str

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        """Switch one app from `previous` to `desired`, touching no other app's objects."""
        ...

    def plan_reconcile(self, desired: Sequence[Route], describe: bool = True) -> str:
        """Make everything this backend holds exactly `desired` (drift included).
        `describe=False`: only `run` reads the batch (not a --dry-run)."""
        ...

    def plan_flush_all(self) -> str:
        """Remove everything this backend holds."""
        ...

    def forwards_unpublished(self) -> bool:
        """Do this backend's flows pass Docker's FORWARD filter without a published port
        (natports' accept in DOCKER-USER)? False: containers need `-p 127.0.0.1::PORT`."""
        ...

    def intact(self, routes: Sequence[Route] = ()) -> bool:
        """One cheap read: is this backend's skeleton still in place for `routes` (what
        it should hold)? False after a `nft flush ruleset` or a firewall reload removed
        it (the agent then repairs)."""
        ...

    def run(self, batch: str) -> None:
        """Apply a batch atomically: all of it or none of it."""
        ...

    def route_id(self, route: Route) -> str:
        """The name under which `counters` reports this route."""
        ...

    def counters(self) -> dict[str, tuple[int, int]]:
        """route_id -> (packets, bytes) of new flows' first packets."""
        ...
