"""Routes -> `ip[6]tables-restore --noflush` input for the nat tables. Pure: tested by exact text.

IPv4 routes go to the IPv4 nat table, IPv6 routes to the IPv6 one (ip6tables), each
with the same layout; the two are separate tables, so one batch is two restores
(see "Two tables" below).

Layout (P is the prefix, NATPORTS unless a test picks its own; every chain named
`P-...` is ours, and the three jumps from the built-in chains are the only rules
natports adds to chains it does not own):

    PREROUTING   -j P-PRE        inserted first, before Docker's -j DOCKER
    OUTPUT       -j P-OUT        inserted first
    POSTROUTING  -j P-POST       inserted first
    P-PRE        -m addrtype --dst-type LOCAL -j P-DISPATCH
    P-OUT        ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j P-DISPATCH   (v6: ! -d ::1/128)
    P-POST       flows carrying the hairpin mark bit: clear it, MASQUERADE
    P-DISPATCH   one rule per app                          -j P-A-<hash of app>
    P-A-<hash>   one rule per route: [-d IP] -p PROTO --dport PORT -j P-R-<hash of app+key>
    P-R-<hash>   MARK flows from the backends' subnets, then DNAT (-m statistic spreads
                 new flows over several backends: 1/n, 1/(n-1), ..., the last unconditional)

Chain names stop at 28 characters, hence hashes (sha256, first 12 base32 digits);
`-m comment` carries the app and the public port for whoever reads `iptables -t nat -S`.

Why the batches look the way they do: under --noflush `:CHAIN - [0:0]` creates or
empties a chain, so a one-app switch re-declares only that app's chains and the
fixed P-PRE/P-OUT/P-POST, plus one P-DISPATCH rule when the app comes or goes: its
size does not grow with the number of other apps. A chain is removed by declaring
it, then `-X`: a chain the kernel already lost cannot fail the batch. Rules that
cannot be re-created harmlessly (P-DISPATCH's, the built-in jumps) are deleted by
the text the kernel holds, read just before. Counters live on the DNAT rules; a
rewrite puts the route's total onto its new last DNAT rule (`-c`), so totals
survive switches as the nft backend's named counters do.

Two tables: a batch is the IPv4 table's restore input, then, when IPv6 is involved,
the line V6_MARK and the IPv6 table's input (`split_batch`). The IPv4 part always
comes (its skeleton is the anchor `intact` checks); the IPv6 part only when the app
has or had IPv6 routes or the IPv6 table holds something of ours, so hosts without
IPv6 routes never see an ip6tables call that changes anything.

(About 500 lines: the layout, the parser of `iptables-save`, the three renderers and
their two-table forms share the chain naming above and are tested together by exact text.)
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ..model import Backend, Route, host_text

DEFAULT_PREFIX = "NATPORTS"
HAIRPIN_MARK = 0x00100000
CT_MARK = 0x00100000  # conntrack mark bit of flows natports DNATed, as in nft_render
# iptables chain names stop at 28 characters: P-R-<12 base32 digits, 60 bits> leaves 13.
HASH_LEN = 12
PREFIX_RE = re.compile(r"[A-Z][A-Z0-9_]{0,12}")
_COUNTER_RE = re.compile(r"^\[(\d+):(\d+)\]\s+")
LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}  # as iptables-save prints them
V6_MARK = "# IPv6: ip6tables-restore --noflush"  # a comment line to restore, should it see one


def _digest(text: str) -> str:
    """Stable across versions and hosts: state and kernel must agree on names after upgrades."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:HASH_LEN]


def route_label(route: Route) -> str:
    """What a person sees in the comments: `mail 25/tcp`, `mail 203.0.113.7:25/tcp`."""
    return f"{route.app} {route.claim().public_text()}"


@dataclass(frozen=True)
class Layout:
    """Every chain name natports uses under one prefix; tests pass their own prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(
                f"iptables chain prefix {self.prefix!r} must be 1-13 characters of A-Z, 0-9, _ "
                "starting with a letter (chain names stop at 28 characters)"
            )

    @property
    def pre(self) -> str:
        return f"{self.prefix}-PRE"

    @property
    def out(self) -> str:
        return f"{self.prefix}-OUT"

    @property
    def post(self) -> str:
        return f"{self.prefix}-POST"

    @property
    def dispatch(self) -> str:
        return f"{self.prefix}-DISPATCH"

    def hooks(self) -> tuple[tuple[str, str], ...]:
        """(built-in chain, our chain it jumps to): the only rules we add to others' chains."""
        return (("PREROUTING", self.pre), ("OUTPUT", self.out), ("POSTROUTING", self.post))

    def app_chain(self, app: str) -> str:
        return f"{self.prefix}-A-{_digest(app)}"

    def route_chain(self, route: Route) -> str:
        """Hash of app and key: a port moving between apps never shares a chain."""
        key = route.key
        ip = "" if key.public_ip is None else str(key.public_ip)
        identity = f"{route.app}|{key.family}|{key.protocol}|{ip}|{key.public_port}"
        if key.count > 1:  # single ports keep the names they always had
            identity += f"|{key.count}"
        return f"{self.prefix}-R-{_digest(identity)}"

    def owns(self, chain: str) -> bool:
        # The prefix has no '-', so another prefix's chains never match.
        return chain.startswith(f"{self.prefix}-")

    def is_route_chain(self, chain: str) -> bool:
        return chain.startswith(f"{self.prefix}-R-")


@dataclass(frozen=True)
class LiveRule:
    """One rule as `iptables-save -c` printed it."""

    chain: str
    spec: str  # everything after `-A CHAIN `, exactly as printed (quotes included)
    packets: int = 0
    bytes: int = 0

    @cached_property
    def target(self) -> str | None:
        """The chain or target after -j/-g (a comment may contain anything, hence shlex)."""
        plain = not any(c in self.spec for c in "\"'\\")
        words = self.spec.split() if plain else shlex.split(self.spec)
        for flag in ("-j", "-g"):
            if flag in words[:-1]:
                return words[words.index(flag) + 1]
        return None

    def delete_line(self) -> str:
        return f"-D {self.chain} {self.spec}"


@dataclass(frozen=True)
class LiveNat:
    """What the nat table holds of ours: our chains, their rules, and others' rules jumping in."""

    chains: frozenset[str] = frozenset()
    rules: tuple[LiveRule, ...] = ()

    @cached_property
    def _by_chain(self) -> dict[str, list[LiveRule]]:
        index: dict[str, list[LiveRule]] = {}
        for rule in self.rules:
            index.setdefault(rule.chain, []).append(rule)
        return index

    def rules_in(self, chain: str) -> list[LiveRule]:
        return list(self._by_chain.get(chain, ()))

    def jumps(self, chain: str, target: str) -> list[LiveRule]:
        return [r for r in self.rules_in(chain) if r.target == target]

    def dnat_counters(self, chain: str) -> tuple[int, int]:
        """A route's total: the sum over its DNAT rules (one per backend)."""
        dnat = [r for r in self.rules_in(chain) if r.target == "DNAT"]
        return sum(r.packets for r in dnat), sum(r.bytes for r in dnat)


def parse_save(text: str, layout: Layout) -> LiveNat:
    """Keep, from `iptables-save -c -t nat`, only our chains and the rules that touch them."""
    chains: set[str] = set()
    rules: list[LiveRule] = []
    for line in text.splitlines():
        if line.startswith(":"):
            name = line[1:].split()[0]
            if layout.owns(name):
                chains.add(name)
            continue
        packets = nbytes = 0
        match = _COUNTER_RE.match(line)
        if match:
            packets, nbytes = int(match.group(1)), int(match.group(2))
            line = line[match.end() :]
        # Cheap filter first: only lines naming one of our chains can matter.
        if not line.startswith("-A ") or f"{layout.prefix}-" not in line:
            continue
        _, chain, *rest = line.split(" ", 2)
        rule = LiveRule(chain, rest[0] if rest else "", packets, nbytes)
        # `target` tokenizes the rule: only for the few lines in others' chains.
        if layout.owns(chain) or layout.owns(rule.target or ""):
            rules.append(rule)
    return LiveNat(frozenset(chains), tuple(rules))


@dataclass
class _Batch:
    """Declarations first (they create or empty), then rules, then deletions."""

    declared: dict[str, None] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)

    def declare(self, chain: str) -> None:
        self.declared[chain] = None

    def text(self) -> str:
        lines = ["*nat", *(f":{c} - [0:0]" for c in self.declared), *self.rules, *self.tail]
        return "\n".join([*lines, "COMMIT"]) + "\n"


def _check(routes: Iterable[Route], family: int) -> None:
    for route in routes:
        if route.key.family != family:
            raise ValueError(
                f"{route_label(route)}: an IPv{route.key.family} route in the IPv{family} table"
            )


def _skeleton(batch: _Batch, layout: Layout, declare_dispatch: bool, family: int) -> None:
    """The fixed chains, refilled every time (constant size); P-DISPATCH only when asked.

    Host-local clients of a loopback address are not DNATed (127.0.0.0/8 would need
    route_localnet; ::1 cannot be DNATed to another host either).
    """
    if declare_dispatch:
        batch.declare(layout.dispatch)
    for chain in (layout.pre, layout.out, layout.post):
        batch.declare(chain)
    mark = f"{HAIRPIN_MARK:#010x}"
    loopback = LOOPBACK[family]
    batch.rules += [
        f"-A {layout.pre} -m addrtype --dst-type LOCAL -j {layout.dispatch}",
        f"-A {layout.out} ! -d {loopback} -m addrtype --dst-type LOCAL -j {layout.dispatch}",
        f"-A {layout.post} -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A {layout.post} -j MARK --xor-mark {mark}",
        f"-A {layout.post} -j MASQUERADE",
    ]


def _dispatch_rule(layout: Layout, app: str) -> str:
    return f'-A {layout.dispatch} -m comment --comment "{app}" -j {layout.app_chain(app)}'


def _app_rules(layout: Layout, app: str, routes: Sequence[Route]) -> list[str]:
    chain = layout.app_chain(app)
    lines = []
    for route in routes:
        key = route.key
        dest = "" if key.public_ip is None else f"-d {key.public_ip}/{key.public_ip.max_prefixlen} "
        ports = str(key.public_port) if key.count == 1 else f"{key.public_port}:{key.public_end}"
        lines.append(
            f"-A {chain} {dest}-p {key.protocol} -m {key.protocol} --dport {ports} "
            f'-m comment --comment "{route_label(route)}" -j {layout.route_chain(route)}'
        )
    return lines


def _route_rules(layout: Layout, route: Route, carried: tuple[int, int]) -> list[str]:
    """MARK per hairpin subnet; one DNAT per backend, the total carried onto the last one."""
    chain = layout.route_chain(route)
    comment = f'-m comment --comment "{route_label(route)}"'
    lines = [
        f"-A {chain} -s {subnet} {comment} -j MARK --or-mark {HAIRPIN_MARK:#010x}"
        for subnet in route.hairpin_subnets
    ]
    if route.backends:  # the forward accept in DOCKER-USER keys on it (natports/forwarding.py)
        lines.append(f"-A {chain} {comment} -j CONNMARK --or-mark {CT_MARK:#010x}")
    n = len(route.backends)
    for i, backend in enumerate(route.backends):
        spread = ""
        if i < n - 1:
            spread = f"-m statistic --mode random --probability {1 / (n - i):.10f} "
        counters = ""
        if i == n - 1 and carried != (0, 0):
            counters = f"-c {carried[0]} {carried[1]} "
        lines.append(
            f"-A {chain} -p {route.key.protocol} {spread}{comment} {counters}"
            f"-j DNAT --to-destination {_destination(route, backend)}"
        )
    return lines


def _destination(route: Route, backend: Backend) -> str:
    """`ip:port`; a range keeps the port (`ip`) or shifts it (`ip:first-last/public first`).

    IPv6 addresses are bracketed before a port (`[fd00::2]:5025`), as libxt_DNAT reads them.
    """
    key = route.key
    if route.private_port == key.public_port and key.count > 1:
        return str(backend.ip)
    host = host_text(backend.ip)
    if key.count == 1:
        return f"{host}:{backend.port}"
    # xt_DNAT revision 2 (Linux 4.19): the port moves by the same offset as the range
    return f"{host}:{route.private_port}-{route.private_end}/{key.public_port}"


def _hook_fixes(
    layout: Layout, live: LiveNat, existing_only: bool = False
) -> tuple[list[str], list[str]]:
    """Each built-in jump exactly once: (inserts, deletions of extra copies).

    Inserted first, so that our DNAT wins over Docker's -j DOCKER for our ports.
    """
    inserts: list[str] = []
    deletes: list[str] = []
    for builtin, ours in layout.hooks():
        if existing_only and ours not in live.chains:
            continue
        present = live.jumps(builtin, ours)
        if not present:
            inserts.append(f"-I {builtin} 1 -j {ours}")
        deletes += [r.delete_line() for r in present[1:]]
    return inserts, deletes


def _pinned(layout: Layout, live: LiveNat) -> set[str]:
    """Our chains that a rule in someone else's chain jumps to, other than the built-in hooks.

    natports never makes such a rule and may not delete it, and the kernel refuses to
    delete a referenced chain: such a chain is emptied but kept.
    """
    hooks = set(layout.hooks())
    return {
        r.target
        for r in live.rules
        if not layout.owns(r.chain) and r.target is not None and (r.chain, r.target) not in hooks
    }


def render_app(
    layout: Layout,
    live: LiveNat,
    previous: Sequence[Route],
    desired: Sequence[Route],
    family: int = 4,
) -> str:
    """One app's switch in one table (`family`'s): its chains re-declared and refilled,
    what it no longer has removed."""
    app = _one_app([*previous, *desired])
    return "" if app is None else _render_app(layout, live, app, previous, desired, family)


def _one_app(routes: Sequence[Route]) -> str | None:
    apps = {r.app for r in routes}
    if len(apps) > 1:
        raise ValueError(f"render_app switches one app, got {sorted(apps)}")
    return apps.pop() if apps else None


def _render_app(
    layout: Layout,
    live: LiveNat,
    app: str,
    previous: Sequence[Route],
    desired: Sequence[Route],
    family: int,
) -> str:
    _check(desired, family)
    desired = sorted(desired, key=Route.sort_key)
    app_chain = layout.app_chain(app)
    wanted = [layout.route_chain(r) for r in desired]
    # What the state remembers plus what the kernel's app chain still jumps to.
    held = {layout.route_chain(r) for r in previous}
    held |= {t for r in live.rules_in(app_chain) if (t := r.target) and layout.is_route_chain(t)}
    gone = sorted(held - set(wanted))

    batch = _Batch()
    _skeleton(batch, layout, declare_dispatch=layout.dispatch not in live.chains, family=family)
    batch.declare(app_chain)
    for chain in [*wanted, *gone]:
        batch.declare(chain)
    dispatched = live.jumps(layout.dispatch, app_chain)
    if desired:
        if not dispatched:
            batch.rules.append(_dispatch_rule(layout, app))
        batch.tail += [r.delete_line() for r in dispatched[1:]]
        batch.rules += _app_rules(layout, app, desired)
        for route in desired:
            chain = layout.route_chain(route)
            batch.rules += _route_rules(layout, route, live.dnat_counters(chain))
    else:
        batch.tail += [r.delete_line() for r in dispatched]
    inserts, deletes = _hook_fixes(layout, live)
    batch.rules += inserts
    batch.tail += deletes
    pinned = _pinned(layout, live)
    batch.tail += [f"-X {chain}" for chain in gone if chain not in pinned]
    if not desired and app_chain not in pinned:
        batch.tail.append(f"-X {app_chain}")
    return batch.text()


def render_reconcile(
    layout: Layout, live: LiveNat, desired: Sequence[Route], family: int = 4
) -> str:
    """Make our chains in `family`'s table exactly `desired`, whatever it held (drift included)."""
    _check(desired, family)
    by_app: dict[str, list[Route]] = {}
    for route in sorted(desired, key=Route.sort_key):
        by_app.setdefault(route.app, []).append(route)

    batch = _Batch()
    _skeleton(batch, layout, declare_dispatch=True, family=family)
    for app in sorted(by_app):
        batch.declare(layout.app_chain(app))
        for route in by_app[app]:
            batch.declare(layout.route_chain(route))
    stale = sorted(live.chains - set(batch.declared))
    for chain in stale:
        batch.declare(chain)
    for app in sorted(by_app):
        batch.rules.append(_dispatch_rule(layout, app))
    for app in sorted(by_app):
        batch.rules += _app_rules(layout, app, by_app[app])
        for route in by_app[app]:
            chain = layout.route_chain(route)
            batch.rules += _route_rules(layout, route, live.dnat_counters(chain))
    inserts, deletes = _hook_fixes(layout, live)
    batch.rules += inserts
    batch.tail += deletes
    pinned = _pinned(layout, live)
    batch.tail += [f"-X {chain}" for chain in stale if chain not in pinned]
    return batch.text()


def render_flush_all(layout: Layout, live: LiveNat) -> str:
    """The built-in jumps deleted, every chain of ours emptied and deleted."""
    hooks = set(layout.hooks())
    jumps = [r for r in live.rules if (r.chain, r.target) in hooks]
    if not live.chains and not jumps:
        return ""
    batch = _Batch()
    for chain in sorted(live.chains):
        batch.declare(chain)
    batch.tail += [r.delete_line() for r in jumps]
    pinned = _pinned(layout, live)
    batch.tail += [f"-X {chain}" for chain in sorted(live.chains) if chain not in pinned]
    return batch.text()


def render_hook_fixes(layout: Layout, live: LiveNat) -> str:
    """After a batch: each built-in jump to a chain of ours that exists, exactly once."""
    inserts, deletes = _hook_fixes(layout, live, existing_only=True)
    if not inserts and not deletes:
        return ""
    return "\n".join(["*nat", *inserts, *deletes, "COMMIT"]) + "\n"


# -- both tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveTables:
    """What the IPv4 and the IPv6 nat tables hold of ours."""

    v4: LiveNat = LiveNat()
    v6: LiveNat = LiveNat()


def join_batch(v4: str, v6: str) -> str:
    """One batch a person reads with --dry-run: the IPv4 input, then V6_MARK and the IPv6 one."""
    return v4 + (f"{V6_MARK}\n{v6}" if v6 else "")


def split_batch(batch: str) -> tuple[str, str]:
    """(IPv4 restore input, IPv6 restore input); "" for a table the batch leaves alone."""
    if batch.startswith(f"{V6_MARK}\n"):
        return "", batch[len(V6_MARK) + 1 :]
    v4, found, v6 = batch.partition(f"\n{V6_MARK}\n")
    return (v4 + "\n", v6) if found else (batch, "")


def _family(routes: Sequence[Route], family: int) -> list[Route]:
    return [r for r in routes if r.key.family == family]


def render_app_tables(
    layout: Layout, live: LiveTables, previous: Sequence[Route], desired: Sequence[Route]
) -> str:
    """One app's switch in both tables. The IPv6 part only where the app has or had IPv6
    routes, or the IPv6 table still holds its chain."""
    app = _one_app([*previous, *desired])
    if app is None:
        return ""
    v4 = _render_app(layout, live.v4, app, _family(previous, 4), _family(desired, 4), 4)
    prev6, want6 = _family(previous, 6), _family(desired, 6)
    if not prev6 and not want6 and layout.app_chain(app) not in live.v6.chains:
        return v4
    return join_batch(v4, _render_app(layout, live.v6, app, prev6, want6, 6))


def render_reconcile_tables(layout: Layout, live: LiveTables, desired: Sequence[Route]) -> str:
    """Both tables exactly `desired`; an IPv6 table without IPv6 routes is emptied of ours."""
    v4 = render_reconcile(layout, live.v4, _family(desired, 4), 4)
    want6 = _family(desired, 6)
    v6 = render_reconcile(layout, live.v6, want6, 6) if want6 else render_flush_all(layout, live.v6)
    return join_batch(v4, v6)


def render_flush_all_tables(layout: Layout, live: LiveTables) -> str:
    return join_batch(render_flush_all(layout, live.v4), render_flush_all(layout, live.v6))
