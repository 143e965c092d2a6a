"""The use cases behind the CLI: validate, store, apply, flush, report.

Every mutation runs under the store's lock; every kernel change is one batch;
the applied state is written only after the kernel accepted the batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backends import select
from .backends.base import RouteBackend
from .backends.proxy import ProxyBackend
from .conntrack import (
    Conntrack,
    Flow,
    FlowCount,
    changed_udp_routes,
    count_flows,
    dead_backend_flows,
    local_addresses,
    removed_udp_backends,
    stale_udp,
)
from .containers import AppProblem, ContainerInfo, Docker, current_containers
from .desired import build_routes
from .errors import InputError, NatportsError
from .listeners import host_listeners
from .liveness import verified, without_containers
from .model import Backend, IPAddress, Mapping, Protocol, Route, is_valid_app_name
from .policy import check_conflicts, check_policy, load_policy
from .spec import Located, ParseResult, SpecError, format_errors, parse_bytes
from .store import Applied, Leftover, Store


@dataclass
class Context:
    store: Store
    dokku_root: Path
    config_path: Path
    nft_table: str  # natports' nft table, and (upper-cased) its iptables chain prefix
    backend_choice: str  # a backend name, or "auto"
    _docker: Docker | None = None
    _resolved: str | None = None
    _backends: dict[str, RouteBackend] = field(default_factory=dict)
    conntrack: Conntrack = field(default_factory=Conntrack)
    # Containers inspected by the last applies: the agent checks their pids in /proc
    # while Docker cannot be asked.
    inspected: dict[str, ContainerInfo] = field(default_factory=dict)

    def docker(self) -> Docker:
        if self._docker is None:
            self._docker = Docker()
        return self._docker

    def forget_docker(self) -> None:
        """Docker went away: reconnect on next use."""
        self._docker = None

    @property
    def backend(self) -> RouteBackend:
        """The backend new routes go to (resolved once: `auto` probes the host)."""
        if self._resolved is None:
            self._resolved = select.resolve(self.backend_choice)
        return self.backend_named(self._resolved)

    def backend_named(self, name: str) -> RouteBackend:
        if name not in self._backends:
            self._backends[name] = select.make(name, self.nft_table, self.store.root)
        return self._backends[name]


@dataclass(frozen=True)
class ApplyReport:
    batch: str
    applied: tuple[str, ...]  # apps whose routes the kernel now holds
    failed: dict[str, str]  # app -> why it kept its previous routes


def require_app_name(app: str) -> None:
    if not is_valid_app_name(app):
        raise InputError(
            [
                f'"{app}" is not a valid app name (lowercase letters, digits, dots and '
                "dashes, starting with a letter or digit)"
            ]
        )


def check_file(data: bytes, filename: str) -> ParseResult:
    result = parse_bytes(data)
    if not result.ok:
        raise InputError(format_errors(result, filename))
    return result


ClaimCheck = Callable[[Sequence[Located]], list[SpecError]]


def claim_checker(ctx: Context, app: str) -> ClaimCheck:
    """Conflicts with every other app, then the host policy, for mappings of `app`.

    What it checks against (other apps' claims, the policy, host listeners) is read
    once, so one deploy step can check its PORTS file and its port map with it.
    """
    applied = {a: rec for a in ctx.store.applied_apps() if (rec := ctx.store.applied(a))}
    claims = _claims(ctx, app, applied)
    policy = load_policy(ctx.config_path)
    # The proxy daemon's sockets are natports' own routes, not host services.
    proxied = {
        (r.key.protocol, r.key.public_port)
        for rec in applied.values()
        if rec.backend == ProxyBackend.name
        for r in rec.routes
    }
    listeners = [lst for lst in host_listeners() if (lst.protocol, lst.port) not in proxied]

    def check(located: Sequence[Located]) -> list[SpecError]:
        return check_conflicts(app, located, claims) + check_policy(located, policy, listeners)

    return check


def validate(data: bytes, filename: str, check: ClaimCheck) -> tuple[Mapping, ...]:
    """Grammar, then `check`: every error at once, in file order."""
    result = parse_bytes(data)
    errors = list(result.errors) + check(result.mappings)
    if errors:
        errors.sort(key=lambda e: (e.line, e.col))
        raise InputError([e.format(filename) for e in errors])
    return tuple(loc.mapping for loc in result.mappings)


def _claims(ctx: Context, app: str, applied: dict[str, Applied]) -> dict[str, tuple[Mapping, ...]]:
    """What every other app holds: its stored mappings and what the kernel still routes for it.

    A port an app dropped from its PORTS stays its own until an apply removes the rules.
    """
    claims = {a: m for a, m in ctx.store.all_mappings().items() if a != app}
    for other, record in applied.items():
        if other != app:
            claims[other] = claims.get(other, ()) + tuple(r.claim() for r in record.routes)
    return claims


def set_ports(ctx: Context, app: str, data: bytes, filename: str) -> tuple[Mapping, ...]:
    require_app_name(app)
    with ctx.store.locked():
        mappings = validate(data, filename, claim_checker(ctx, app))
        ctx.store.set_mappings(app, mappings)
        return mappings


def remove_ports(ctx: Context, app: str) -> bool:
    """Forget the app: its rules go first, then its config."""
    require_app_name(app)
    with ctx.store.locked():
        flush_app_unlocked(ctx, app)
        return ctx.store.remove_mappings(app)


def apply(
    ctx: Context, app: str | None = None, containers: Sequence[str] = (), dry_run: bool = False
) -> ApplyReport:
    if containers and app is None:
        raise InputError(["--container needs --app: containers belong to one app"])
    with ctx.store.locked():
        if app is not None:
            return apply_app_unlocked(ctx, app, containers, dry_run)
        return apply_all_unlocked(ctx, dry_run)


def _desired_for(ctx: Context, app: str, containers: Sequence[str]) -> tuple[Route, ...]:
    mappings = ctx.store.mappings(app) or ()
    if not mappings:
        return ()
    procs = {m.process_type for m in mappings}
    found = current_containers(ctx.docker(), ctx.dokku_root, app, procs, containers)
    for infos in found.values():
        ctx.inspected.update((c.id, c) for c in infos)
    return build_routes(app, mappings, found)


def _observe(ctx: Context, routes: Sequence[Route]) -> dict[str, ContainerInfo | None]:
    seen = ctx.docker().observe({b.container_id for r in routes for b in r.backends})
    ctx.inspected.update((cid, c) for cid, c in seen.items() if c is not None)
    return seen


def _still_serving(ctx: Context, routes: Sequence[Route]) -> tuple[Route, ...]:
    """`routes` minus every backend whose container stopped, vanished or lost the address."""
    seen = _observe(ctx, routes)
    kept, _ = verified(routes, {cid: c.seen() if c else None for cid, c in seen.items()})
    return kept


def _previous(ctx: Context, app: str) -> tuple[Route, ...]:
    """What the current backend holds for the app (nothing if another backend served it)."""
    applied = ctx.store.applied(app)
    if applied is None or applied.backend != ctx.backend.name:
        return ()
    return applied.routes


def _elsewhere(ctx: Context, apps: Sequence[str]) -> dict[str, str]:
    """app -> the other backend that still serves it (after a change of backend)."""
    return _moved({app: ctx.store.applied(app) for app in apps}, ctx.backend.name)


def _moved(records: dict[str, Applied | None], current: str) -> dict[str, str]:
    return {a: r.backend for a, r in records.items() if r is not None and r.backend != current}


def _run(ctx: Context, batch: str, intents: dict[str, tuple[Route, ...]]) -> None:
    """Run a batch so that the stored state never misses what the kernel may hold.

    Before: each app's applied state grows to previous + desired (removal is
    idempotent, so over-claiming is safe). After success: exactly desired.
    An app that moves from another backend keeps that backend's record until the
    new backend serves it and the old one's objects are gone (make before break);
    a crash in between repeats both steps at the next apply.
    """
    records = {app: ctx.store.applied(app) for app in intents}
    moved = _moved(records, ctx.backend.name)
    before = {app: rec.routes if rec else () for app, rec in records.items()}
    for app, desired in intents.items():
        if app in moved:
            continue
        merged = {r.key: r for r in before[app]}  # not moved: the current backend's routes
        merged.update((r.key, r) for r in desired)
        if merged:
            routes = tuple(sorted(merged.values(), key=Route.sort_key))
            ctx.store.set_applied(app, Applied(ctx.backend.name, routes))
    ctx.backend.run(batch)
    for app, old_name in moved.items():
        ctx.store.set_leftover(app, Leftover(old_name, before[app]))
    for app, desired in intents.items():
        _record(ctx, app, desired)
    _remove_leftovers(ctx)
    removed = set()
    for app, desired in intents.items():
        removed |= removed_udp_backends(before[app], desired)
    _remember_retired(ctx, removed)


def _remove_leftovers(ctx: Context) -> None:
    """Remove what old backends still hold; a failure is retried at the next change."""
    for app in ctx.store.leftover_apps():
        leftover = ctx.store.leftover(app)
        if leftover is None:
            continue
        name, routes = leftover.backend, leftover.routes
        try:
            old = ctx.backend_named(name)
            old.run(old.plan_app(routes, ()))
        except NatportsError as exc:
            print(
                f"natports: warning: {app}: could not remove its old {name} routes yet "
                f"({exc.message}); the next apply tries again",
                file=sys.stderr,
            )
            continue
        ctx.store.remove_leftover(app)
        _remember_retired(ctx, removed_udp_backends(routes, ()))


def _remember_retired(ctx: Context, removed: set[Backend]) -> None:
    if not removed:
        return
    ctx.store.set_retired_udp(tuple(set(ctx.store.retired_udp()) | removed))


def retired_udp(ctx: Context) -> tuple[Backend, ...]:
    return ctx.store.retired_udp()


def forget_dead_udp(ctx: Context, is_gone: Callable[[str], bool]) -> list[Backend]:
    """Delete the UDP conntrack entries of retired backends whose container is gone.

    The caller holds the lock. Returns what was forgotten.
    """
    kept: list[Backend] = []
    forgotten: list[Backend] = []
    for backend in retired_udp(ctx):
        if is_gone(backend.container_id):
            forgotten.append(backend)
        else:
            kept.append(backend)
    if forgotten:
        _forget_flows_of(ctx, set(forgotten))
        ctx.store.set_retired_udp(tuple(kept))
    return forgotten


def container_gone(ctx: Context, container_id: str) -> bool:
    try:
        return not ctx.docker().inspect(container_id).running
    except AppProblem:
        return True  # removed


def _record(ctx: Context, app: str, routes: tuple[Route, ...]) -> None:
    if routes:
        ctx.store.set_applied(app, Applied(ctx.backend.name, routes))
    else:
        ctx.store.remove_applied(app)


def apply_app_unlocked(
    ctx: Context, app: str, containers: Sequence[str] = (), dry_run: bool = False
) -> ApplyReport:
    """Route one app; the caller holds the store's lock."""
    require_app_name(app)
    previous = _previous(ctx, app)
    try:
        desired = _desired_for(ctx, app, containers)
    except AppProblem:
        # The app keeps its previous routes, but only to containers that still serve.
        if not dry_run and previous:
            kept = _still_serving(ctx, previous)
            if kept != previous:
                _switch(ctx, {app: (previous, kept)}, ctx.backend.plan_app(previous, kept))
        raise
    if not desired and not previous and not _elsewhere(ctx, [app]):
        return ApplyReport("", (), {})  # nothing to route and nothing to remove
    batch = ctx.backend.plan_app(previous, desired)
    if not dry_run:
        _switch(ctx, {app: (previous, desired)}, batch)
    return ApplyReport(batch, (app,) if desired else (), {})


def _switch(
    ctx: Context, changes: dict[str, tuple[tuple[Route, ...], tuple[Route, ...]]], batch: str
) -> None:
    """Run the batch, then the conntrack work that follows from it."""
    _run(ctx, batch, {app: desired for app, (_, desired) in changes.items()})
    previous = [r for before, _ in changes.values() for r in before]
    desired = [r for _, after in changes.values() for r in after]
    _clean_udp(ctx, previous, desired)
    forget_dead_udp(ctx, lambda cid: container_gone(ctx, cid))


def _clean_udp(ctx: Context, previous: Sequence[Route], desired: Sequence[Route]) -> None:
    """Delete the conntrack entries that would keep clients of a new or changed UDP route
    away from its backends (see natports.conntrack). A failure here is reported, not
    fatal: the kernel already holds the new routes."""
    changed = changed_udp_routes(previous, desired)
    if not changed:
        return
    try:
        keep = _live_retired(ctx)
        local = local_addresses()
        families = {r.key.family for r in changed}
        flows = [f for fam in sorted(families) for f in ctx.conntrack.flows(Protocol.UDP, fam)]
        stale = []
        for route in changed:
            unnatted_too = ctx.backend.name != ProxyBackend.name
            stale += stale_udp(flows, route, keep, local, unnatted_too)
        ctx.conntrack.delete(stale)
    except NatportsError as exc:
        print(f"natports: warning: UDP flows not cleaned: {exc.message}", file=sys.stderr)


def _live_retired(ctx: Context) -> set[tuple[IPAddress, int]]:
    """(address, port) of retired UDP backends whose container still runs there: their
    flows stay where they started."""
    retired = retired_udp(ctx)
    if not retired:
        return set()
    seen = ctx.docker().observe({b.container_id for b in retired})
    live = set()
    for b in retired:
        c = seen.get(b.container_id)
        if c is not None and c.running and b.ip in (c.ipv4, c.ipv6):
            live.add((b.ip, b.port))
    return live


def withdraw(ctx: Context, dead: set[str]) -> list[str]:
    """Containers died: remove them as backends at once, from whatever backend serves
    their apps, without asking Docker. The caller holds the lock. Returns the apps changed.
    """
    changed: list[str] = []
    gone: set[Backend] = set()
    for app in ctx.store.applied_apps():
        record = ctx.store.applied(app)
        if record is None:
            continue
        kept, dropped = without_containers(record.routes, dead)
        if not dropped:
            continue
        backend = ctx.backend_named(record.backend)
        backend.run(backend.plan_app(record.routes, kept))
        if kept:
            ctx.store.set_applied(app, Applied(record.backend, kept))
        else:
            ctx.store.remove_applied(app)
        gone |= dropped
        changed.append(app)
    if gone:
        _forget_flows_of(ctx, gone)
    return changed


def _forget_flows_of(ctx: Context, backends: set[Backend]) -> None:
    try:
        flows = [
            f
            for fam in sorted({b.ip.version for b in backends})
            for f in ctx.conntrack.flows(Protocol.UDP, fam)
        ]
        ctx.conntrack.delete(dead_backend_flows(flows, backends))
    except NatportsError as exc:
        print(f"natports: warning: UDP flows not cleaned: {exc.message}", file=sys.stderr)


def repair(ctx: Context) -> list[str]:
    """Put back what each backend should hold, if something removed it (`nft flush
    ruleset`, a firewall reload). Reads only natports' state; the caller holds the lock.
    Returns the backends repaired."""
    by_backend: dict[str, list[Route]] = {}
    for app in ctx.store.applied_apps():
        record = ctx.store.applied(app)
        if record is not None:
            by_backend.setdefault(record.backend, []).extend(record.routes)
    repaired = []
    for name, routes in sorted(by_backend.items()):
        backend = ctx.backend_named(name)
        if not backend.intact():
            backend.run(backend.plan_reconcile(routes))
            repaired.append(name)
    return repaired


def apply_all_unlocked(ctx: Context, dry_run: bool = False) -> ApplyReport:
    configured = ctx.store.apps()
    desired: dict[str, tuple[Route, ...]] = {}
    failed: dict[str, str] = {}
    for app in configured:
        try:
            desired[app] = _desired_for(ctx, app, ())
        except AppProblem as exc:
            failed[app] = exc.message
            # A broken app keeps what it had, to containers that still serve it.
            desired[app] = _still_serving(ctx, _previous(ctx, app))
    # A broken app's kept routes yield to healthy apps' routes on the same key.
    healthy = {r.key for a, routes in desired.items() if a not in failed for r in routes}
    for app in failed:
        clashing = [r for r in desired[app] if r.key in healthy]
        if clashing:
            desired[app] = tuple(r for r in desired[app] if r.key not in healthy)
            ports = ", ".join(r.claim().public_text() for r in clashing)
            failed[app] += f"\n{ports}: now routed to another app"
    every = [r for routes in desired.values() for r in routes]
    # Nothing to route at all: no table either, rather than an empty one.
    batch = ctx.backend.plan_reconcile(every) if every else ctx.backend.plan_flush_all()
    if not dry_run:
        moved = _elsewhere(ctx, configured)
        # A broken app still served by another backend stays there until it works.
        intents = {a: r for a, r in desired.items() if not (a in failed and a in moved)}
        for app in set(ctx.store.applied_apps()) - set(configured):
            intents[app] = ()
        before = [r for a in intents for r in _previous(ctx, a)]
        _run(ctx, batch, intents)
        _clean_udp(ctx, before, [r for routes in intents.values() for r in routes])
        forget_dead_udp(ctx, lambda cid: container_gone(ctx, cid))
    applied = tuple(a for a in configured if a not in failed and desired[a])
    return ApplyReport(batch, applied, failed)


def flush(ctx: Context, app: str | None = None, dry_run: bool = False) -> str:
    with ctx.store.locked():
        if app is not None:
            require_app_name(app)
            return flush_app_unlocked(ctx, app, dry_run)
        # Every backend that serves some app or still holds leftovers, and the current one.
        names = {ctx.backend.name}
        for name in ctx.store.leftover_apps():
            leftover = ctx.store.leftover(name)
            if leftover is not None:
                names.add(leftover.backend)
        for name in ctx.store.applied_apps():
            applied = ctx.store.applied(name)
            if applied is not None:
                names.add(applied.backend)
        batches = []
        for name in sorted(names):
            backend = ctx.backend_named(name)
            batch = backend.plan_flush_all()
            batches.append(batch)
            if not dry_run:
                backend.run(batch)
        if not dry_run:
            for name in ctx.store.applied_apps():
                ctx.store.remove_applied(name)
            for name in ctx.store.leftover_apps():
                ctx.store.remove_leftover(name)
        return "".join(batches)


def flush_app_unlocked(ctx: Context, app: str, dry_run: bool = False) -> str:
    """Remove one app's rules, from whichever backend serves it; the caller holds the lock."""
    applied = ctx.store.applied(app)
    if applied is None:
        return ""
    backend = ctx.backend_named(applied.backend)
    batch = backend.plan_app(applied.routes, ())
    if not dry_run:
        backend.run(batch)
        ctx.store.remove_applied(app)
        _remember_retired(ctx, removed_udp_backends(applied.routes, ()))
    return batch


def status(ctx: Context) -> list[dict[str, object]]:
    """One entry per public port: the documented `status --json` schema."""
    counters: dict[str, dict[str, tuple[int, int]]] = {}

    def counters_of(name: str) -> dict[str, tuple[int, int]]:
        if name not in counters:
            try:
                counters[name] = ctx.backend_named(name).counters()
            except NatportsError:
                counters[name] = {}
        return counters[name]

    flows = FlowReader(ctx)
    rows: list[dict[str, object]] = []
    for app in ctx.store.applied_apps():
        applied = ctx.store.applied(app)
        if applied is None:
            continue
        backend = ctx.backend_named(applied.backend)
        for route in applied.routes:
            counts = flows.of(route) if applied.backend != ProxyBackend.name else None
            found = counters_of(applied.backend).get(backend.route_id(route))
            packets, nbytes = found if found else (None, None)
            rows.append(
                {
                    "app": route.app,
                    "process_type": route.process_type,
                    "protocol": str(route.key.protocol),
                    "family": route.key.family,
                    "public_ip": None if route.key.public_ip is None else str(route.key.public_ip),
                    "public_port": route.key.public_port,
                    "private_port": route.private_port,
                    "backends": [b.to_json() for b in route.backends],
                    "backend": applied.backend,
                    "packets": packets,
                    "bytes": nbytes,
                    "flows": None if counts is None else [c.to_json() for c in counts],
                }
            )
    return rows


class FlowReader:
    """Live flows per route from conntrack: one dump per protocol and family, read once.

    None for a route when conntrack cannot be read (not root)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._dumps: dict[tuple[Protocol, int], list[Flow]] = {}
        self._local: frozenset[IPAddress] | None = None
        self._broken = False

    def of(self, route: Route) -> list[FlowCount] | None:
        if self._broken:
            return None
        key = (route.key.protocol, route.key.family)
        try:
            if self._local is None:
                self._local = local_addresses()
            if key not in self._dumps:
                self._dumps[key] = self.ctx.conntrack.flows(*key)
        except (NatportsError, OSError):
            self._broken = True
            return None
        return count_flows(self._dumps[key], route, self._local)
