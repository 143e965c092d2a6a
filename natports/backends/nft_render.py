"""Routes -> `nft -f -` batch text. Pure: tested by exact expected text.

Layout of the one table natports owns, `inet natports`:

    map any4/any6    proto . port          -> goto <route chain>   (all host addresses)
    map addr4/addr6  address . proto . port -> goto <route chain>   (one host address)
    chain prerouting (nat, priority -110)  traffic from outside to a host address
    chain output     (nat, priority -110)  traffic from the host itself, loopback excluded
    chain postrouting(nat, priority 90)    masquerade hairpin flows marked by a route chain
    chain dispatch                         looks the flow up in the four maps
    chain a_APP_PROTO[_IP]_PORT            one per route: counter, DNAT to its backends
    counter a_...                          named, so a switch keeps the totals

Priority -110 runs before Docker's nat chains (-100): netfilter keeps the first
NAT binding, and ours must win for our ports. Switching an app rewrites only
the app's chains and elements plus the fixed skeleton, so its cost does not
grow with the number of other apps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..model import Route, RouteKey, host_text

TABLE = "inet natports"  # family and name; tests use another name to stay apart
HAIRPIN_MARK = 0x00100000
PRIORITY_DNAT = -110
PRIORITY_SNAT = 90


@dataclass(frozen=True)
class LiveElement:
    map: str
    key: str  # nft text of the key, e.g. "tcp . 25"
    target: str  # chain it jumps to


@dataclass(frozen=True)
class LiveTable:
    """What the kernel holds in our table, as far as reconciling needs it."""

    chains: frozenset[str]
    elements: frozenset[LiveElement]
    counters: frozenset[str]


def chain_name(app: str, key: RouteKey) -> str:
    """Deterministic, and unique because a route key belongs to one app only."""
    prefix = "a" if key.family == 4 else "a6"
    host = ""
    if key.public_ip is not None:
        host = "_" + str(key.public_ip).replace(":", "-")
    return f"{prefix}_{app}_{key.protocol}{host}_{key.public_port}"


def map_name(key: RouteKey) -> str:
    return f"{'any' if key.public_ip is None else 'addr'}{key.family}"


def element_key(key: RouteKey) -> str:
    head = "" if key.public_ip is None else f"{key.public_ip} . "
    return f"{head}{key.protocol} . {key.public_port}"


def skeleton(table: str = TABLE) -> list[str]:
    """The fixed part: declared with `add` (idempotent), base chains flushed and refilled."""
    lines = [
        f"add table {table}",
        f"add map {table} any4 {{ type inet_proto . inet_service : verdict ; }}",
        f"add map {table} any6 {{ type inet_proto . inet_service : verdict ; }}",
        f"add map {table} addr4 {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add map {table} addr6 {{ type ipv6_addr . inet_proto . inet_service : verdict ; }}",
        f"add chain {table} dispatch",
        f"flush chain {table} dispatch",
        f"add rule {table} dispatch ip daddr . meta l4proto . th dport vmap @addr4",
        f"add rule {table} dispatch ip6 daddr . meta l4proto . th dport vmap @addr6",
        f"add rule {table} dispatch meta nfproto ipv4 meta l4proto . th dport vmap @any4",
        f"add rule {table} dispatch meta nfproto ipv6 meta l4proto . th dport vmap @any6",
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


def route_lines(route: Route, table: str = TABLE) -> list[str]:
    """Create or refill one route's chain, counter and map element."""
    name = chain_name(route.app, route.key)
    ip = "ip" if route.key.family == 4 else "ip6"
    lines = [
        f"add counter {table} {name}",
        f"add chain {table} {name}",
        f"flush chain {table} {name}",
    ]
    if route.hairpin_subnets:
        subnets = ", ".join(route.hairpin_subnets)
        lines.append(
            f"add rule {table} {name} {ip} saddr {{ {subnets} }} "
            f"meta mark set meta mark | {HAIRPIN_MARK:#010x}"
        )
    lines.append(
        f"add rule {table} {name} meta l4proto {route.key.protocol} counter name {name} "
        f"dnat {ip} to {_targets(route)}"
    )
    lines.append(
        f"add element {table} {map_name(route.key)} {{ {element_key(route.key)} : goto {name} }}"
    )
    return lines


def _targets(route: Route) -> str:
    port = route.private_port
    addrs = [host_text(b.ip) for b in route.backends]
    if len(addrs) == 1:
        return f"{addrs[0]} : {port}"
    entries = ", ".join(f"{i} : {a}" for i, a in enumerate(addrs))
    return f"numgen random mod {len(addrs)} map {{ {entries} }} : {port}"


def removal_lines(
    elements: Iterable[LiveElement],
    chains: Iterable[str],
    counters: Iterable[str],
    table: str = TABLE,
) -> list[str]:
    """Delete objects; each is first `add`ed so that a missing one cannot fail the batch."""
    lines: list[str] = []
    for el in sorted(elements, key=lambda e: (e.map, e.key)):
        lines.append(f"add chain {table} {el.target}")
        lines.append(f"add element {table} {el.map} {{ {el.key} : goto {el.target} }}")
        lines.append(f"delete element {table} {el.map} {{ {el.key} }}")
    for chain in sorted(chains):
        lines += [
            f"add chain {table} {chain}",
            f"flush chain {table} {chain}",
            f"delete chain {table} {chain}",
        ]
    for counter in sorted(counters):
        lines += [f"add counter {table} {counter}", f"delete counter {table} {counter}"]
    return lines


def _live_of(route: Route) -> LiveElement:
    return LiveElement(
        map_name(route.key), element_key(route.key), chain_name(route.app, route.key)
    )


def render_app(previous: Sequence[Route], desired: Sequence[Route], table: str = TABLE) -> str:
    """One app's switch: the skeleton, what the app no longer has removed, the rest refilled."""
    wanted = {chain_name(r.app, r.key) for r in desired}
    gone = [r for r in previous if chain_name(r.app, r.key) not in wanted]
    lines = skeleton(table)
    lines += removal_lines(
        [_live_of(r) for r in gone],
        [chain_name(r.app, r.key) for r in gone],
        [chain_name(r.app, r.key) for r in gone],
        table,
    )
    for route in sorted(desired, key=Route.sort_key):
        lines += route_lines(route, table)
    return "\n".join(lines) + "\n"


def render_reconcile(live: LiveTable | None, desired: Sequence[Route], table: str = TABLE) -> str:
    """Make the whole table exactly `desired`, whatever it held (drift included)."""
    wanted_elements = {_live_of(r) for r in desired}
    wanted_chains = {chain_name(r.app, r.key) for r in desired}
    lines = skeleton(table)
    if live is not None:
        route_chains = {c for c in live.chains if c.startswith(("a_", "a6_"))}
        lines += removal_lines(
            live.elements - wanted_elements,
            route_chains - wanted_chains,
            live.counters - wanted_chains,
            table,
        )
    for route in sorted(desired, key=Route.sort_key):
        lines += route_lines(route, table)
    return "\n".join(lines) + "\n"


def render_flush_all(table: str = TABLE) -> str:
    return f"add table {table}\ndelete table {table}\n"
