"""Routes -> `nft -f -` batch text. Pure: tested by exact expected text.

Layout of the one table natports owns, `inet natports` (F is 4 or 6; each
`_any` map has an `_addr` twin keyed by host address first, for routes on one
host address):

    map  dnat_anyF    proto . port : address . port    one backend: DNAT from the lookup
    map  goto_anyF    proto . port : goto <chain>      several backends (numgen in the chain)
    map  range_anyF   proto . port-end : goto <chain>  ranges (interval map, counter per element)
    set  count_anyF   proto . port                     every single-port route, counter per element
    set  hairpinF     the backends' subnets: flows from there are marked for masquerade
    chain prerouting (nat, priority -110)    traffic from outside to a host address
    chain output     (nat, priority -110)    traffic from the host itself, loopback excluded
    chain postrouting(nat, priority 90)      masquerade hairpin flows (packet mark bit)
    chain dispatch                           counts and marks, then DNATs through the maps
    chain r_<app>_<digest>                   only for a route with several backends or a range

A route with one backend and one port is one element of a `dnat_` map: the
kernel DNATs straight from the lookup (`dnat ip to ... map @dnat_any4`), with no
chain and no named object. Its counter lives in the `count_` set, whose
elements do not change when the route's backend does, so totals survive
switches. A switch of one app is a handful of element updates; `nft` never has
to load the other apps' objects (no chain, no named counter per route), so its
cost does not depend on the size of the table (docs/performance.md).

Single ports live in hash maps and sets: concatenated interval sets (pipapo)
cost O(n) per insertion, which made a full apply of 30,000 routes take 20 s.
Only ranges use them (`range_` maps), and only the hairpin subnets (few) are
intervals otherwise.

Every flow natports DNATs also gets CT_MARK in its conntrack mark: the forward
accept in Docker's DOCKER-USER chain keys on it (natports/forwarding.py).

Priority -110 runs before Docker's nat chains (-100): netfilter keeps the first
NAT binding, and ours must win for our ports.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..model import IPAddress, Route, RouteKey, host_text
from . import nft_wire
from .nft_wire import Change

TABLE = "inet natports"  # family and name; tests use another name to stay apart
HAIRPIN_MARK = 0x00100000  # packet mark bit: masquerade this flow in postrouting
CT_MARK = 0x00100000  # conntrack mark bit: natports DNATed this flow (forward accept)
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
    """Where `counters` reports a route: the set (or range map) and element with its counter."""
    where = "range" if key.count > 1 else "count"
    return f"{where}_{scope(key)}:{element_key(key)}"


def _addr(ip: IPAddress) -> str:
    """`str(ip)`, at half the cost for IPv4: a full apply formats 10,000s of addresses."""
    return socket.inet_ntoa(ip.packed) if ip.version == 4 else str(ip)


def _dnat_value(route: Route) -> str:
    backend = route.backends[0]
    return f"{_addr(backend.ip)} . {backend.port}"


def skeleton(table: str = TABLE, refill: bool = True) -> list[str]:
    """The fixed part: declared with `add` (idempotent), base chains flushed and refilled.

    `refill=False`: declarations only, for a table whose skeleton rules were just seen
    in place. Refilling re-binds the dispatch rules to the maps, and the kernel checks
    every element of a map it binds: 2.4 ms of a 30,000-route switch instead of 0.4.
    """
    lines = _skeleton(table)
    if refill:
        return lines
    return [line for line in lines if not line.startswith(("flush chain", "add rule"))]


def skeleton_rules(table: str = TABLE) -> dict[str, int]:
    """chain -> how many rules the skeleton puts in it."""
    counts: dict[str, int] = {}
    for line in _skeleton(table):
        if line.startswith("add rule"):
            chain = line[len(f"add rule {table} ") :].split(" ", 1)[0]
            counts[chain] = counts.get(chain, 0) + 1
    return counts


def _skeleton(table: str) -> list[str]:
    """The skeleton; its last rule carries `skeleton_marker` (a digest of the rest)."""
    lines = _unmarked_skeleton(table)
    return [*lines[:-1], f'{lines[-1]} comment "{_marker(lines)}"']


def skeleton_marker(table: str = TABLE) -> str:
    """The comment on the skeleton's last rule: a digest of the skeleton's text.

    Rules in place are not refilled (a switch, a full apply) when their chains hold as
    many rules as the skeleton puts there and this comment is among them: a natports
    whose skeleton differs (an upgrade) refills them, as after a flush.
    """
    return _marker(_unmarked_skeleton(table))


def _marker(lines: list[str]) -> str:
    return f"natports skeleton {_digest(chr(10).join(lines))}"


def _unmarked_skeleton(table: str) -> list[str]:
    lines = [f"add table {table}"]
    for f in FAMILIES:
        a = _addr_type(f)
        for where, key in (("any", "inet_proto . inet_service"), ("addr", f"{a} . {key_tail()}")):
            lines += [
                f"add map {table} dnat_{where}{f} {{ type {key} : {a} . inet_service ; }}",
                f"add map {table} goto_{where}{f} {{ type {key} : verdict ; }}",
                f"add map {table} range_{where}{f} "
                f"{{ type {key} : verdict ; flags interval ; counter ; }}",
                f"add set {table} count_{where}{f} {{ type {key} ; counter ; }}",
            ]
        lines.append(f"add set {table} hairpin{f} {{ type {a} ; flags interval ; }}")
    lines += [f"add chain {table} dispatch", f"flush chain {table} dispatch"]
    rule = f"add rule {table} dispatch"
    ct = f"ct mark set ct mark | {CT_MARK:#010x}"
    mark = f"meta mark set meta mark | {HAIRPIN_MARK:#010x}"
    for f in FAMILIES:
        ip, nf = _ip(f), f"meta nfproto ipv{f}"
        addr_key = f"{ip} daddr . meta l4proto . th dport"
        any_key = f"{nf} meta l4proto . th dport"
        # Exactly one counter lookup per packet: from a backend subnet (hairpin) or not.
        for key, where in ((addr_key, "addr"), (any_key, "any")):
            lines += [
                f"{rule} {ip} saddr != @hairpin{f} {key} @count_{where}{f} {ct}",
                f"{rule} {ip} saddr @hairpin{f} {key} @count_{where}{f} {mark} {ct}",
            ]
        for key, where, daddr in ((addr_key, "addr", f"{ip} daddr . "), (any_key, "any", "")):
            lines += [
                f"{rule} {key} vmap @goto_{where}{f}",
                f"{rule} {nf} meta l4proto {{ tcp, udp }} "
                f"dnat {ip} to {daddr}meta l4proto . th dport map @dnat_{where}{f}",
                f"{rule} {key} vmap @range_{where}{f}",
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


def key_tail() -> str:
    return "inet_proto . inet_service"


def counter_objects() -> list[tuple[str, str]]:
    """(`set` or `map`, name) of everything holding route counters."""
    return [
        (what, f"{prefix}_{where}{f}")
        for f in FAMILIES
        for where in ("any", "addr")
        for what, prefix in (("set", "count"), ("map", "range"))
    ]


def kind(route: Route) -> str:
    """Which map holds the route: `dnat` (one backend), `goto` (several), `range`."""
    if route.key.count > 1:
        return "range"
    return "dnat" if len(route.backends) == 1 else "goto"


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
    f = route.key.family
    ip = _ip(f)
    lines = [f"add chain {table} {name}", f"flush chain {table} {name}"]
    if kind(route) == "range":
        # Ranges are not in the count sets, whose dispatch rules mark the other routes.
        lines.append(
            f"add rule {table} {name} {ip} saddr @hairpin{f} "
            f"meta mark set meta mark | {HAIRPIN_MARK:#010x}"
        )
        ct = f"ct mark set ct mark | {CT_MARK:#010x} "
    else:
        ct = ""
    lines.append(
        f"add rule {table} {name} meta l4proto {route.key.protocol} {ct}"
        f"dnat {ip} to {_targets(route)}"
    )
    return lines


def _element(route: Route) -> str:
    """The route's element in its `kind` map."""
    key = element_key(route.key)
    if kind(route) == "dnat":
        return f"{key} : {_dnat_value(route)}"
    return f"{key} : goto {chain_name(route.app, route.key)}"


def _map(route: Route) -> str:
    return f"{kind(route)}_{scope(route.key)}"


def _add(table: str, name: str, items: Iterable[str]) -> list[str]:
    return [f"add element {table} {name} {{ {item} }}" for item in items]


def _remove(table: str, name: str, items: Iterable[str], keys: Iterable[str]) -> list[str]:
    """Delete elements; each is first `add`ed, so that a missing one cannot fail the batch."""
    lines = _add(table, name, items)
    lines += [f"delete element {table} {name} {{ {key} }}" for key in keys]
    return lines


def _remove_target(route: Route, table: str) -> list[str]:
    """The map element (and chain) of a route that goes or changes kind or backend."""
    key = element_key(route.key)
    if kind(route) == "dnat":
        return _remove(table, _map(route), [_element(route)], [key])
    name = chain_name(route.app, route.key)
    return [
        f"add chain {table} {name}",
        *_remove(table, _map(route), [_element(route)], [key]),
        f"flush chain {table} {name}",
        f"delete chain {table} {name}",
    ]


def _add_target(route: Route, table: str) -> list[str]:
    if kind(route) == "dnat":
        return _add(table, _map(route), [_element(route)])
    return [*_chain_lines(route, table), *_add(table, _map(route), [_element(route)])]


def _same_target(a: Route, b: Route) -> bool:
    """Would the kernel hold the same element for both? (A chain's rules are refilled anyway.)"""
    return bool(a.backends) == bool(b.backends) and _element(a) == _element(b)


def _hairpin_lines(routes: Iterable[Route], table: str) -> list[str]:
    """Subnets are shared by apps: added here, removed only by a reconcile."""
    lines = []
    for f in FAMILIES:
        subnets = _subnets(routes, f)
        if subnets:
            lines.append(f"add element {table} hairpin{f} {{ {', '.join(subnets)} }}")
    return lines


def render_app(
    previous: Sequence[Route], desired: Sequence[Route], table: str = TABLE, refill: bool = True
) -> str:
    """One app's switch: the skeleton, then only the app's elements and chains.

    Every element of `desired` is (re-)added: `add` of an element the kernel holds
    unchanged is a no-op, and one it lost comes back. An element whose value changes
    is deleted and added (the kernel cannot replace a value in place). `refill`: the
    skeleton's rules too (see `skeleton`).
    """
    lines = skeleton(table, refill)
    wanted = {r.key: r for r in desired}
    for old in sorted(previous, key=Route.sort_key):
        new = wanted.get(old.key)
        if new is None and kind(old) != "range":
            key = element_key(old.key)
            lines += _remove(table, f"count_{scope(old.key)}", [key], [key])
        if old.backends and (new is None or not _same_target(old, new)):
            lines += _remove_target(old, table)
    lines += _hairpin_lines(desired, table)
    for route in sorted(desired, key=Route.sort_key):
        if kind(route) != "range":
            lines += _add(table, f"count_{scope(route.key)}", [element_key(route.key)])
        if route.backends:  # a route without backends is counted, never DNATed
            lines += _add_target(route, table)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class LiveTable:
    """What reconciling needs from the kernel.

    `counters`: route_id -> (packets, bytes), to carry them over a rebuild, when the
    table could not be read exactly. Otherwise `elements`: set or map name -> element
    key -> value (in the kernel's bytes: nft_wire; None in a set), for every name in
    `element_sets()`, and `element_counters`: name -> key -> its counter (nft_wire);
    `chains`: the table's chains; `hairpin`: family -> the address ranges its hairpin
    set holds; `rules_in_place`: the skeleton's chains hold its rules (then they are
    not refilled, as in a switch).
    """

    counters: dict[str, tuple[int, int]]
    elements: dict[str, dict[bytes, bytes | None]] | None = None
    chains: frozenset[str] = frozenset()
    hairpin: dict[int, list[tuple[int, int]]] | None = None
    rules_in_place: bool = False
    element_counters: dict[str, dict[bytes, bytes]] = field(default_factory=dict)


SKELETON_CHAINS = frozenset({"dispatch", "prerouting", "output", "postrouting"})


def element_sets() -> list[str]:
    """Every set and map whose elements are routes (hairpin sets are refilled whole)."""
    return [
        f"{kind}_{where}{f}"
        for f in FAMILIES
        for where in ("any", "addr")
        for kind in ("dnat", "goto", "range", "count")
    ]


def hairpin_sets() -> list[str]:
    return [f"hairpin{f}" for f in FAMILIES]


def skeleton_sets() -> frozenset[str]:
    return frozenset([*element_sets(), *hairpin_sets()])


def _with_counter(item: str, found: tuple[int, int] | None) -> str:
    """`key` or `key counter packets P bytes B` (before the `: value` of a map element)."""
    if not found or found == (0, 0):
        return item
    key, sep, value = item.partition(" : ")
    return f"{key} counter packets {found[0]} bytes {found[1]}{sep}{value}"


@dataclass(frozen=True)
class Wanted:
    """What `desired` puts in each set or map: key -> value (nft_wire's bytes); with
    `routes` (for text): key -> the route it is for, in route order."""

    values: dict[str, dict[bytes, bytes | None]]
    routes: dict[str, dict[bytes, Route]]
    chained: list[Route]  # the routes that need a chain


def wanted(desired: Sequence[Route], text: bool = True) -> Wanted:
    """The elements of `desired`; `text=False`: values only, in any order (a netlink
    batch), which is what a full apply nobody reads needs."""
    values: dict[str, dict[bytes, bytes | None]] = {name: {} for name in element_sets()}
    routes: dict[str, dict[bytes, Route]] = {name: {} for name in element_sets()} if text else {}
    chained = []
    for route in sorted(desired, key=Route.sort_key) if text else desired:
        key, where, how = nft_wire.key_bytes(route.key), scope(route.key), kind(route)
        found: list[tuple[str, bytes | None]] = []
        if how != "range":
            found.append((f"count_{where}", None))
        if route.backends and how == "dnat":
            found.append((f"dnat_{where}", nft_wire.dnat_bytes(route)))
        elif route.backends:
            chain = chain_name(route.app, route.key)
            found.append((f"{how}_{where}", nft_wire.goto_bytes(chain)))
            chained.append(route)
        for name, value in found:
            values[name][key] = value
            if text:
                routes[name][key] = route
    return Wanted(values, routes, chained)


def _item_of(name: str, route: Route) -> str:
    """A route's element in set `name`, as `add element` writes it."""
    return element_key(route.key) if name.startswith("count_") else _element(route)


def _diff(
    held: dict[bytes, bytes | None], target: dict[bytes, bytes | None]
) -> tuple[list[bytes], dict[bytes, bytes | None]]:
    """(keys held that go or change value, elements to add); set operations on the
    dicts' item views, in C: a full apply compares 20,000 elements and more."""
    if not held:
        return [], target
    gone = [key for key, _ in held.items() - target.items()]
    return gone, dict(target.items() - held.items())


def render_reconcile(live: LiveTable | None, desired: Sequence[Route], table: str = TABLE) -> str:
    """Make the whole table exactly `desired`, whatever it held (drift included).

    With an exact read of the table (`live.elements`), one transaction changes only
    what differs: elements that stay are not touched, so their counters keep counting;
    the route chains are refilled, and the skeleton's rules and the hairpin sets where
    the read found them changed. Without one, the transaction deletes the table and
    builds it again, so nothing stale can survive; counters are carried over from what
    the kernel held.
    """
    if live is not None and live.elements is not None:
        return _render_changes(live, desired, table)
    return render_rebuild(live, desired, table)


def _render_changes(live: LiveTable, desired: Sequence[Route], table: str) -> str:
    assert live.elements is not None
    want = wanted(desired)
    lines = skeleton(table, refill=not live.rules_in_place)
    if not _hairpin_in_place(live, desired):
        lines += [f"flush set {table} {name}" for name in hairpin_sets()]
        lines += _hairpin_lines(desired, table)
    adds: list[str] = []
    for name in element_sets():
        held = live.elements.get(name, {})
        gone, added = _diff(held, want.values[name])
        if len(gone) > 64 and len(gone) * 2 > len(held):  # mostly replaced
            # One flush and the whole list parse far faster than naming each key
            # to delete; the counters of the elements that stay are carried over.
            lines.append(f"flush {'set' if name.startswith('count_') else 'map'} {table} {name}")
            added = want.values[name]
        elif gone:
            where = name.partition("_")[2]
            keys = ", ".join(nft_wire.key_text(where, key) for key in sorted(gone))
            lines.append(f"delete element {table} {name} {{ {keys} }}")
        if added:
            items = [
                _with_counter(_item_of(name, route), _counter(live, name, key, route))
                for key, route in want.routes[name].items()
                if key in added
            ]
            adds.append(f"add element {table} {name} {{ {', '.join(items)} }}")
    keep = {chain_name(r.app, r.key) for r in want.chained}
    for name in sorted(live.chains - SKELETON_CHAINS - keep):
        lines += [f"flush chain {table} {name}", f"delete chain {table} {name}"]
    for route in want.chained:
        lines += _chain_lines(route, table)
    return "\n".join([*lines, *adds]) + "\n"


def _hairpin_in_place(live: LiveTable, desired: Sequence[Route]) -> bool:
    if live.hairpin is None:
        return False
    return all(
        live.hairpin.get(f, []) == nft_wire.ranges_of_subnets(_subnets(desired, f))
        for f in FAMILIES
    )


def _subnets(routes: Iterable[Route], family: int) -> list[str]:
    return sorted({s for r in routes if r.key.family == family for s in r.hairpin_subnets})


def element_changes(live: LiveTable | None, desired: Sequence[Route]) -> list[Change] | None:
    """`render_reconcile`'s change as nft_wire changes, when it is only elements: a
    netlink batch applies them in one transaction, without nft's parser.

    None when the change needs more (a rebuild, the skeleton's rules or a hairpin set
    to refill, route chains: rules are written by nft only).
    """
    if live is None or live.elements is None or not live.rules_in_place:
        return None
    want = wanted(desired, text=False)  # a netlink batch has no text to order
    if want.chained or live.chains != SKELETON_CHAINS or not _hairpin_in_place(live, desired):
        return None
    changes = []
    for name in element_sets():
        gone, added = _diff(live.elements.get(name, {}), want.values[name])
        if gone or added:
            changes.append(Change(name, tuple(gone), tuple(added.items())))
    return changes


@dataclass(frozen=True)
class Build:
    """A table built from nothing in three steps (`render_build`)."""

    skeleton: str  # nft text: the table, its skeleton unmarked, hairpin sets, route chains
    elements: list[Change]  # every route element, as one netlink batch
    mark: str  # nft text: the skeleton's last rule again, with its marker


def render_build(desired: Sequence[Route], table: str = TABLE) -> Build:
    """A table built from nothing: nft text for everything but the route elements,
    then the elements over netlink, then the skeleton's marker.

    For a table that did not exist when planned: until the elements are in, the table
    routes nothing, as before the first step (its maps are empty). Like a rebuild, the
    first step deletes a table that appeared since. The marker comes last, so that a
    table left unfinished (natports killed between the steps) is not `intact()`: the
    agent completes it.
    """
    want = wanted(desired, text=False)  # the elements go over netlink: no text to order
    marked = skeleton(table)
    last = marked[-1]
    unmarked = [*marked[:-1], last[: last.rindex(" comment ")]]
    chained = sorted(want.chained, key=Route.sort_key)
    lines = _from_nothing(unmarked, desired, chained, table)
    changes = [
        Change(name, (), tuple(want.values[name].items()))
        for name in element_sets()
        if want.values[name]
    ]
    chain = last.split()[4]  # add rule <family> <table> <chain> ...
    mark = f"flush chain {table} {chain}\n{last}\n"
    return Build("\n".join(lines) + "\n", changes, mark)


def render_rebuild(live: LiveTable | None, desired: Sequence[Route], table: str = TABLE) -> str:
    """Delete the table and build it again in one transaction, counters carried over
    (from the exact read's elements, or from `live.counters`).

    Elements go in one `add element` per map: nft parses a long list far faster
    than as many statements.
    """
    want = wanted(desired)
    lines = _from_nothing(skeleton(table), desired, want.chained, table)
    for name in element_sets():
        if want.routes[name]:
            items = [
                _with_counter(_item_of(name, route), _counter(live, name, key, route))
                for key, route in want.routes[name].items()
            ]
            lines.append(f"add element {table} {name} {{ {', '.join(items)} }}")
    return "\n".join(lines) + "\n"


def _from_nothing(
    skeleton_lines: list[str], desired: Sequence[Route], chained: list[Route], table: str
) -> list[str]:
    """A table made again from nothing, but for its route elements: whatever held the
    name goes, then the skeleton, the hairpin subnets and the route chains."""
    lines = [f"add table {table}", f"delete table {table}", *skeleton_lines]
    lines += _hairpin_lines(desired, table)
    for route in chained:
        lines += _chain_lines(route, table)
    return lines


def _counter(live: LiveTable | None, name: str, key: bytes, route: Route) -> tuple[int, int] | None:
    """The counter the kernel held for a route's element in set `name`."""
    if live is None:
        return None
    if live.elements is not None:
        raw = live.element_counters.get(name, {}).get(key)
        return None if raw is None else nft_wire.counter(raw)
    return live.counters.get(f"{name}:{element_key(route.key)}")


def render_flush_all(table: str = TABLE) -> str:
    return f"add table {table}\ndelete table {table}\n"
