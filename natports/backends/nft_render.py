"""Routes -> `nft -f -` batch text. Pure: tested by exact expected text.

Layout of the one table natports owns, `inet natports` (F is 4 or 6):

    map  dnat_anyF    proto . port          : address . port   one backend, one port
    map  dnat_addrF   address . proto . port : address . port   the same on one host address
    map  goto_anyF    proto . port[-end]    : goto <route chain> several backends, or a range
    map  goto_addrF   address . proto . port[-end] : goto <route chain>
    set  count_anyF / count_addrF            every route's key, with a counter per element
    set  hairpin_anyF / hairpin_addrF        source subnet . key: flows that need masquerade
    chain prerouting (nat, priority -110)    traffic from outside to a host address
    chain output     (nat, priority -110)    traffic from the host itself, loopback excluded
    chain postrouting(nat, priority 90)      masquerade hairpin flows (marked in dispatch)
    chain dispatch                           counts, marks, then DNATs through the maps
    chain r_<app>_<digest>                   only for a route with several backends or a range

A route with one backend and one port is one element of a `dnat_` map: the
kernel DNATs straight from the lookup (`dnat ip to ... map @dnat_any4`), with no
chain and no named object. Its counter lives in the `count_` set, whose
elements do not change when the route's backend does, so totals survive
switches. A switch of one app is a handful of element updates; `nft` never has
to load the other apps' objects (no chain, no named counter per route), so its
cost does not depend on the size of the table (docs/performance.md).

Priority -110 runs before Docker's nat chains (-100): netfilter keeps the first
NAT binding, and ours must win for our ports.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..model import Route, RouteKey, host_text

TABLE = "inet natports"  # family and name; tests use another name to stay apart
HAIRPIN_MARK = 0x00100000
PRIORITY_DNAT = -110
PRIORITY_SNAT = 90
FAMILIES = (4, 6)


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def _digest(text: str) -> str:
    """Stable across versions and hosts: state and kernel must agree on names after upgrades."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:12].lower()


def chain_name(app: str, key: RouteKey) -> str:
    """A route chain: `r_<app>_<digest of the key>`; at most 215 characters (nft allows 256).

    App names (`[a-z0-9][a-z0-9._-]*`) are valid in nft identifiers after the `r_` prefix.
    """
    ip = "" if key.public_ip is None else str(key.public_ip)
    ident = f"{key.family}|{key.protocol}|{ip}|{key.public_port}|{key.count}"
    return f"r_{app}_{_digest(ident)}"


def scope(key: RouteKey) -> str:
    """`any4`, `addr6`, ...: which map of a kind holds the key."""
    return f"{'any' if key.public_ip is None else 'addr'}{key.family}"


def element_key(key: RouteKey) -> str:
    ports = str(key.public_port) if key.count == 1 else f"{key.public_port}-{key.public_end}"
    head = "" if key.public_ip is None else f"{key.public_ip} . "
    return f"{head}{key.protocol} . {ports}"


def route_id(key: RouteKey) -> str:
    """Where `counters` reports a route: its counter set and element key."""
    return f"count_{scope(key)}:{element_key(key)}"


def is_direct(route: Route) -> bool:
    """One backend and one port: DNAT from the map lookup, no chain."""
    return len(route.backends) == 1 and route.key.count == 1


def _dnat_value(route: Route) -> str:
    backend = route.backends[0]
    return f"{backend.ip} . {backend.port}"


def skeleton(table: str = TABLE) -> list[str]:
    """The fixed part: declared with `add` (idempotent), base chains flushed and refilled."""
    lines = [f"add table {table}"]
    for f in FAMILIES:
        a = _addr_type(f)
        lines += [
            f"add map {table} dnat_any{f} "
            f"{{ type inet_proto . inet_service : {a} . inet_service ; }}",
            f"add map {table} dnat_addr{f} "
            f"{{ type {a} . inet_proto . inet_service : {a} . inet_service ; }}",
            f"add map {table} goto_any{f} "
            "{ type inet_proto . inet_service : verdict ; flags interval ; }",
            f"add map {table} goto_addr{f} "
            f"{{ type {a} . inet_proto . inet_service : verdict ; flags interval ; }}",
            f"add set {table} count_any{f} "
            "{ type inet_proto . inet_service ; flags interval ; counter ; }",
            f"add set {table} count_addr{f} "
            f"{{ type {a} . inet_proto . inet_service ; flags interval ; counter ; }}",
            f"add set {table} hairpin_any{f} "
            f"{{ type {a} . inet_proto . inet_service ; flags interval ; }}",
            f"add set {table} hairpin_addr{f} "
            f"{{ type {a} . {a} . inet_proto . inet_service ; flags interval ; }}",
        ]
    lines += [f"add chain {table} dispatch", f"flush chain {table} dispatch"]
    rule = f"add rule {table} dispatch"
    mark = f"meta mark set meta mark | {HAIRPIN_MARK:#010x}"
    for f in FAMILIES:
        ip, nf = _ip(f), f"meta nfproto ipv{f}"
        # A counter set lookup counts and changes nothing; a miss just ends the rule.
        lines += [
            f"{rule} {ip} daddr . meta l4proto . th dport @count_addr{f}",
            f"{rule} {nf} meta l4proto . th dport @count_any{f}",
            f"{rule} {ip} saddr . {ip} daddr . meta l4proto . th dport @hairpin_addr{f} {mark}",
            f"{rule} {ip} saddr . meta l4proto . th dport @hairpin_any{f} {mark}",
        ]
    for f in FAMILIES:
        ip, nf = _ip(f), f"meta nfproto ipv{f}"
        lines += [
            f"{rule} {ip} daddr . meta l4proto . th dport vmap @goto_addr{f}",
            f"{rule} {nf} meta l4proto {{ tcp, udp }} "
            f"dnat {ip} to {ip} daddr . meta l4proto . th dport map @dnat_addr{f}",
            f"{rule} {nf} meta l4proto . th dport vmap @goto_any{f}",
            f"{rule} {nf} meta l4proto {{ tcp, udp }} "
            f"dnat {ip} to meta l4proto . th dport map @dnat_any{f}",
        ]
    for hook, prio in (
        ("prerouting", PRIORITY_DNAT),
        ("output", PRIORITY_DNAT),
        ("postrouting", PRIORITY_SNAT),
    ):
        lines.append(
            f"add chain {table} {hook} {{ type nat hook {hook} priority {prio} ; policy accept ; }}"
        )
        lines.append(f"flush chain {table} {hook}")
    lines += [
        f"add rule {table} prerouting fib daddr type local jump dispatch",
        f"add rule {table} output ip daddr != 127.0.0.0/8 fib daddr type local jump dispatch",
        f"add rule {table} output ip6 daddr != ::1 fib daddr type local jump dispatch",
        f"add rule {table} postrouting meta mark & {HAIRPIN_MARK:#010x} == {HAIRPIN_MARK:#010x} "
        f"meta mark set meta mark ^ {HAIRPIN_MARK:#010x} masquerade",
    ]
    return lines


def _hairpin_elements(route: Route) -> list[str]:
    key = element_key(route.key)
    return [f"{subnet} . {key}" for subnet in route.hairpin_subnets]


def _targets(route: Route) -> str:
    """The DNAT target of a route chain: address(es), then the port (kept for a range)."""
    addrs = [b.ip if route.key.count > 1 else host_text(b.ip) for b in route.backends]
    if len(addrs) == 1:
        head = str(addrs[0])
    else:
        entries = ", ".join(f"{i} : {a}" for i, a in enumerate(addrs))
        head = f"numgen random mod {len(addrs)} map {{ {entries} }}"
    if route.key.count == 1:
        return f"{head} : {route.private_port}"
    if route.private_port == route.key.public_port:
        return head  # an identical range: DNAT the address only, the port stays
    shifted = ", ".join(
        f"{route.key.public_port + i} : {route.private_port + i}" for i in range(route.key.count)
    )
    return f"{head} : th dport map {{ {shifted} }}"


def _chain_lines(route: Route, table: str) -> list[str]:
    name = chain_name(route.app, route.key)
    ip = _ip(route.key.family)
    return [
        f"add chain {table} {name}",
        f"flush chain {table} {name}",
        f"add rule {table} {name} meta l4proto {route.key.protocol} dnat {ip} to {_targets(route)}",
    ]


def _add(table: str, name: str, items: Iterable[str]) -> list[str]:
    return [f"add element {table} {name} {{ {item} }}" for item in items]


def _remove(table: str, name: str, items: Iterable[str], keys: Iterable[str]) -> list[str]:
    """Delete elements; each is first `add`ed, so that a missing one cannot fail the batch."""
    lines = _add(table, name, items)
    lines += [f"delete element {table} {name} {{ {key} }}" for key in keys]
    return lines


def _remove_route_target(route: Route, table: str) -> list[str]:
    """The dnat element, or the goto element and the chain, of a route that goes or changes."""
    key = element_key(route.key)
    if is_direct(route):
        return _remove(table, f"dnat_{scope(route.key)}", [f"{key} : {_dnat_value(route)}"], [key])
    name = chain_name(route.app, route.key)
    return [
        f"add chain {table} {name}",
        *_remove(table, f"goto_{scope(route.key)}", [f"{key} : goto {name}"], [key]),
        f"flush chain {table} {name}",
        f"delete chain {table} {name}",
    ]


def _add_route_target(route: Route, table: str) -> list[str]:
    key = element_key(route.key)
    if is_direct(route):
        return _add(table, f"dnat_{scope(route.key)}", [f"{key} : {_dnat_value(route)}"])
    name = chain_name(route.app, route.key)
    return [
        *_chain_lines(route, table),
        *_add(table, f"goto_{scope(route.key)}", [f"{key} : goto {name}"]),
    ]


def _same_target(a: Route, b: Route) -> bool:
    """Would the kernel hold the same element (and chain) for both?"""
    if is_direct(a) != is_direct(b):
        return False
    if is_direct(a):
        return _dnat_value(a) == _dnat_value(b)
    return chain_name(a.app, a.key) == chain_name(b.app, b.key)


def render_app(previous: Sequence[Route], desired: Sequence[Route], table: str = TABLE) -> str:
    """One app's switch: the skeleton, then only the app's elements and chains.

    Every element of `desired` is (re-)added: `add` of an element the kernel holds
    unchanged is a no-op, and one it lost comes back. An element whose value changes
    is deleted and added (the kernel cannot replace a value in place).
    """
    lines = skeleton(table)
    wanted = {r.key: r for r in desired}
    for old in sorted(previous, key=Route.sort_key):
        new = wanted.get(old.key)
        if new is None:
            key = element_key(old.key)
            lines += _remove(table, f"count_{scope(old.key)}", [key], [key])
            hairpin = _hairpin_elements(old)
            lines += _remove(table, f"hairpin_{scope(old.key)}", hairpin, hairpin)
            lines += _remove_route_target(old, table)
            continue
        gone = sorted(set(_hairpin_elements(old)) - set(_hairpin_elements(new)))
        lines += _remove(table, f"hairpin_{scope(old.key)}", gone, gone)
        if not _same_target(old, new):
            lines += _remove_route_target(old, table)
    for route in sorted(desired, key=Route.sort_key):
        lines += _route_lines(route, table)
    return "\n".join(lines) + "\n"


def _route_lines(route: Route, table: str) -> list[str]:
    key = element_key(route.key)
    lines = _add(table, f"count_{scope(route.key)}", [key])
    hairpin = _hairpin_elements(route)
    if hairpin:
        lines.append(f"add element {table} hairpin_{scope(route.key)} {{ {', '.join(hairpin)} }}")
    if not route.backends:
        return lines  # nothing to send its flows to: counted, never DNATed
    return lines + _add_route_target(route, table)


@dataclass(frozen=True)
class LiveTable:
    """What reconciling needs from the kernel: the counters, to carry them over."""

    counters: dict[str, tuple[int, int]]


def render_reconcile(live: LiveTable | None, desired: Sequence[Route], table: str = TABLE) -> str:
    """Make the whole table exactly `desired`, whatever it held (drift included).

    One transaction deletes the table and builds it again, so nothing stale can
    survive; counters are carried over from what the kernel held just before.
    Elements go in one `add element` per map: nft parses a long list far faster
    than as many statements.
    """
    counters = {} if live is None else live.counters
    lines = [f"add table {table}", f"delete table {table}", *skeleton(table)]
    elements: dict[str, list[str]] = {}
    for route in sorted(desired, key=Route.sort_key):
        where = scope(route.key)
        key = element_key(route.key)
        found = counters.get(route_id(route.key))
        if found and found != (0, 0):
            key = f"{key} counter packets {found[0]} bytes {found[1]}"
        elements.setdefault(f"count_{where}", []).append(key)
        elements.setdefault(f"hairpin_{where}", []).extend(_hairpin_elements(route))
        if not route.backends:
            continue
        target = element_key(route.key)
        if is_direct(route):
            elements.setdefault(f"dnat_{where}", []).append(f"{target} : {_dnat_value(route)}")
        else:
            lines += _chain_lines(route, table)
            name = chain_name(route.app, route.key)
            elements.setdefault(f"goto_{where}", []).append(f"{target} : goto {name}")
    for name, items in elements.items():
        if items:
            lines.append(f"add element {table} {name} {{ {', '.join(items)} }}")
    return "\n".join(lines) + "\n"


def render_flush_all(table: str = TABLE) -> str:
    return f"add table {table}\ndelete table {table}\n"
