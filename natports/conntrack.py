"""Flows in the kernel's conntrack table: which to forget, and how many each backend holds.

A UDP "flow" is only a conntrack entry. While the container it was DNATed to
lives, it stays there (the same promise as for TCP). Three kinds of entries for a
routed public UDP port must go, or a client that keeps sending is blackholed,
because every packet refreshes its entry:
  - entries NATed to a container that died (its address may even be reused);
  - un-NATed entries to the host itself, made while the port had no route
    (deploy in progress, app down) or while the proxy backend terminated it;
  - entries NATed to an address that is not a live backend of the route.
kube-proxy and the CNI portmap plugin do the same when a service's endpoints
change from none to some. TCP entries are never deleted: established TCP flows
end where they started.

The pure part decides (`stale_udp`, `count_flows`); `Conntrack` talks netlink
through pyroute2: one dump per protocol and family, one delete per stale entry,
in-process (no `conntrack` process per entry; a dump of a few thousand entries
takes milliseconds).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from .errors import NatportsError
from .model import Backend, IPAddress, Protocol, Route

_IPPROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
_TCP_ESTABLISHED = "ESTABLISHED"


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, as natports needs it."""

    family: int  # 4 or 6
    protocol: Protocol
    client: IPAddress  # original source
    client_port: int
    public: IPAddress  # original destination (the host's address for a routed flow)
    public_port: int
    target: IPAddress  # where replies come from: the backend, or `public` when un-NATed
    target_port: int
    tcp_state: str | None = None  # "ESTABLISHED", "TIME_WAIT"...; None for UDP

    @property
    def natted(self) -> bool:
        return (self.target, self.target_port) != (self.public, self.public_port)

    @property
    def established(self) -> bool:
        return self.protocol is Protocol.UDP or self.tcp_state == _TCP_ESTABLISHED


def removed_udp_backends(previous: Sequence[Route], desired: Sequence[Route]) -> set[Backend]:
    """UDP backends that served `previous` and serve nothing in `desired`."""

    def udp(routes: Iterable[Route]) -> set[Backend]:
        return {b for r in routes if r.key.protocol is Protocol.UDP for b in r.backends}

    return udp(previous) - udp(desired)


def changed_udp_routes(previous: Sequence[Route], desired: Sequence[Route]) -> list[Route]:
    """UDP routes that are new or whose backends changed: their stale entries must go."""
    before = {r.key: set(r.backends) for r in previous}
    return [
        r
        for r in desired
        if r.key.protocol is Protocol.UDP and before.get(r.key) != set(r.backends)
    ]


def _is_for(flow: Flow, route: Route, local: frozenset[IPAddress]) -> bool:
    """Was this flow addressed to the route's public side (and not, say, sent out by a
    container to some remote server's port of the same number)?"""
    key = route.key
    if flow.protocol is not key.protocol:
        return False
    if not key.public_port <= flow.public_port <= key.public_end:  # a range: any of its ports
        return False
    if flow.family != key.family:
        return False
    if key.public_ip is not None:
        return flow.public == key.public_ip
    return flow.public in local


def stale_udp(
    flows: Iterable[Flow],
    route: Route,
    keep: Iterable[tuple[IPAddress, int]],
    local: frozenset[IPAddress],
    unnatted_too: bool = True,
) -> list[Flow]:
    """Entries of a UDP route to delete: everything for its public side that is not
    NATed to one of `keep` (the route's backends and old backends that still live).

    `unnatted_too` False keeps entries that end on the host itself: the proxy backend
    terminates its clients' flows there.
    """
    kept = set(keep) | {(b.ip, b.port) for b in route.backends}
    return [
        f
        for f in flows
        if _is_for(f, route, local)
        and ((_backend_of(f, route) not in kept) if f.natted else unnatted_too)
    ]


def _backend_of(flow: Flow, route: Route) -> tuple[IPAddress, int]:
    """The (address, first private port) of the backend a NATed flow of `route` went to:
    in a range, public port P maps to private port + (P - first public port)."""
    return flow.target, flow.target_port - (flow.public_port - route.key.public_port)


def dead_backend_flows(flows: Iterable[Flow], backends: Iterable[Backend]) -> list[Flow]:
    """UDP entries NATed to the addresses of backends whose container is gone (any port:
    a range's flows go to many)."""
    gone = {b.ip for b in backends}
    return [f for f in flows if f.protocol is Protocol.UDP and f.natted and f.target in gone]


@dataclass(frozen=True)
class FlowCount:
    ip: IPAddress
    port: int
    tcp_established: int
    udp: int

    def to_json(self) -> dict[str, object]:
        return {
            "ip": str(self.ip),
            "port": self.port,
            "tcp_established": self.tcp_established,
            "udp": self.udp,
        }


def count_flows(
    flows: Iterable[Flow], route: Route, local: frozenset[IPAddress]
) -> list[FlowCount]:
    """Live NATed flows of a route per target (current and old backends alike), so an
    operator sees the old container's flows drain after a deploy."""
    counts: dict[tuple[IPAddress, int], list[int]] = {}
    for b in route.backends:
        counts.setdefault((b.ip, b.port), [0, 0])
    for f in flows:
        if not (_is_for(f, route, local) and f.natted and f.established):
            continue
        slot = counts.setdefault(_backend_of(f, route), [0, 0])
        slot[0 if f.protocol is Protocol.TCP else 1] += 1
    ordered = sorted(counts.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
    return [FlowCount(ip, port, tcp, udp) for (ip, port), (tcp, udp) in ordered]


class Conntrack:
    """The netlink edge (pyroute2). Opened per use; never touches TCP entries on delete."""

    def flows(self, protocol: Protocol, family: int) -> list[Flow]:
        from pyroute2 import Conntrack as NlConntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        af = socket.AF_INET if family == 4 else socket.AF_INET6
        try:
            ct = NlConntrack(nfgen_family=af)
        except OSError as exc:
            raise NatportsError(f"conntrack netlink: {exc}", "natports needs root") from None
        try:
            wanted = NFCTAttrTuple(family=af, proto=_IPPROTO[protocol])
            return [
                flow
                for entry in ct.dump_entries(tuple_orig=wanted)
                if (flow := _flow(entry, family, protocol)) is not None
            ]
        except OSError as exc:
            raise NatportsError(f"conntrack dump failed: {exc}") from None
        finally:
            ct.close()

    def delete(self, flows: Sequence[Flow]) -> int:
        """Delete UDP entries; an entry already gone is not an error. Returns how many went."""
        from pyroute2 import Conntrack as NlConntrack
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        deleted = 0
        for family in (4, 6):
            mine = [f for f in flows if f.family == family and f.protocol is Protocol.UDP]
            if not mine:
                continue
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            ct = NlConntrack(nfgen_family=af)
            try:
                for f in mine:
                    orig = NFCTAttrTuple(
                        family=af,
                        saddr=str(f.client),
                        daddr=str(f.public),
                        proto=socket.IPPROTO_UDP,
                        sport=f.client_port,
                        dport=f.public_port,
                    )
                    try:
                        ct.entry("del", tuple_orig=orig)
                        deleted += 1
                    except NetlinkError as exc:
                        if exc.code != 2:  # ENOENT: it idled out meanwhile
                            raise NatportsError(f"conntrack delete failed: {exc}") from None
            finally:
                ct.close()
        return deleted


def _flow(entry: Any, family: int, protocol: Protocol) -> Flow | None:
    orig, reply = entry.tuple_orig, entry.tuple_reply
    if orig.sport is None or orig.dport is None or reply.sport is None:
        return None
    state = None
    if protocol is Protocol.TCP and entry.protoinfo is not None:
        state = str(entry.protoinfo.state_name())
    return Flow(
        family=family,
        protocol=protocol,
        client=ip_address(orig.saddr),
        client_port=int(orig.sport),
        public=ip_address(orig.daddr),
        public_port=int(orig.dport),
        target=ip_address(reply.saddr),
        target_port=int(reply.sport),
        tcp_state=state,
    )


def local_addresses() -> frozenset[IPAddress]:
    """Every address of the host's interfaces: a routed flow was sent to one of them."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = {ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}
    return frozenset(found)
