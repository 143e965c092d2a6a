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
from .conntrack import RETIRED, RETIRED_DOC, forget_udp_flows, removed_udp_backends
from .containers import AppProblem, Docker, current_containers
from .desired import build_routes
from .errors import InputError, NatportsError
from .listeners import host_listeners
from .model import Backend, Mapping, Route, is_valid_app_name
from .policy import check_conflicts, check_policy, load_policy
from .spec import Located, ParseResult, SpecError, format_errors, parse_bytes
from .store import Applied, Store


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

    def docker(self) -> Docker:
        if self._docker is None:
            self._docker = Docker()
        return self._docker

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
        (r.key.protocol, port)
        for rec in applied.values()
        if rec.backend == ProxyBackend.name
        for r in rec.routes
        for port in range(r.key.public_port, r.key.public_end + 1)  # a range: every port
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
        return _apply_all(ctx, dry_run)


def _desired_for(ctx: Context, app: str, containers: Sequence[str]) -> tuple[Route, ...]:
    mappings = ctx.store.mappings(app) or ()
    if not mappings:
        return ()
    procs = {m.process_type for m in mappings}
    found = current_containers(ctx.docker(), ctx.dokku_root, app, procs, containers)
    # Backends that pass Docker's FORWARD filter by themselves need no published ports.
    forwards = getattr(ctx.backend, "forwards_unpublished", None)
    return build_routes(app, mappings, found, need_publish=not (forwards and forwards()))


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
        held = [r.to_json() for r in before[app]]
        ctx.store.set_document(LEFTOVER, app, {"backend": old_name, "routes": held})
    for app, desired in intents.items():
        _record(ctx, app, desired)
    _remove_leftovers(ctx)
    removed = set()
    for app, desired in intents.items():
        removed |= removed_udp_backends(before[app], desired)
    _remember_retired(ctx, removed)


LEFTOVER = "leftover"  # routes a backend still holds for an app another backend now serves


def _remove_leftovers(ctx: Context) -> None:
    """Remove what old backends still hold; a failure is retried at the next change."""
    for app in ctx.store.documents(LEFTOVER):
        data = ctx.store.document(LEFTOVER, app) or {}
        name = str(data.get("backend", ""))
        items = data.get("routes", [])
        assert isinstance(items, list)
        routes = tuple(Route.from_json(r) for r in items)
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
        ctx.store.remove_document(LEFTOVER, app)
        _remember_retired(ctx, removed_udp_backends(routes, ()))


def _remember_retired(ctx: Context, removed: set[Backend]) -> None:
    if not removed:
        return
    known = set(retired_udp(ctx)) | removed
    retired = sorted(known, key=lambda b: (b.container_id, str(b.ip), b.port))  # v4 and v6 mixed
    ctx.store.set_document(RETIRED, RETIRED_DOC, {"backends": [b.to_json() for b in retired]})


def retired_udp(ctx: Context) -> list[Backend]:
    data = ctx.store.document(RETIRED, RETIRED_DOC) or {}
    items = data.get("backends", [])
    assert isinstance(items, list)
    return [Backend.from_json(b) for b in items]


def forget_dead_udp(ctx: Context, is_gone: Callable[[str], bool]) -> list[Backend]:
    """Delete the UDP conntrack entries of retired backends whose container is gone.

    The caller holds the lock. Returns what was forgotten.
    """
    kept: list[Backend] = []
    forgotten: list[Backend] = []
    for backend in retired_udp(ctx):
        if is_gone(backend.container_id) and forget_udp_flows(backend):
            forgotten.append(backend)
        else:
            kept.append(backend)
    if forgotten:
        if kept:
            ctx.store.set_document(RETIRED, RETIRED_DOC, {"backends": [b.to_json() for b in kept]})
        else:
            ctx.store.remove_document(RETIRED, RETIRED_DOC)
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
    desired = _desired_for(ctx, app, containers)
    previous = _previous(ctx, app)
    if not desired and not previous and not _elsewhere(ctx, [app]):
        return ApplyReport("", (), {})  # nothing to route and nothing to remove
    batch = ctx.backend.plan_app(previous, desired)
    if not dry_run:
        _run(ctx, batch, {app: desired})
        forget_dead_udp(ctx, lambda cid: container_gone(ctx, cid))
    return ApplyReport(batch, (app,) if desired else (), {})


def _apply_all(ctx: Context, dry_run: bool) -> ApplyReport:
    configured = ctx.store.apps()
    desired: dict[str, tuple[Route, ...]] = {}
    failed: dict[str, str] = {}
    for app in configured:
        try:
            desired[app] = _desired_for(ctx, app, ())
        except AppProblem as exc:
            failed[app] = exc.message
            desired[app] = _previous(ctx, app)  # a broken app keeps what it had
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
        _run(ctx, batch, intents)
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
        for name in ctx.store.documents(LEFTOVER):
            names.add(str((ctx.store.document(LEFTOVER, name) or {}).get("backend")))
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
            for name in ctx.store.documents(LEFTOVER):
                ctx.store.remove_document(LEFTOVER, name)
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
    """One entry per route (a range is one entry): the documented `status --json` schema."""
    counters: dict[str, dict[str, tuple[int, int]]] = {}

    def counters_of(name: str) -> dict[str, tuple[int, int]]:
        if name not in counters:
            try:
                counters[name] = ctx.backend_named(name).counters()
            except NatportsError:
                counters[name] = {}
        return counters[name]

    rows: list[dict[str, object]] = []
    for app in ctx.store.applied_apps():
        applied = ctx.store.applied(app)
        if applied is None:
            continue
        backend = ctx.backend_named(applied.backend)
        for route in applied.routes:
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
                    # A range is one row; for one port the ends equal the starts.
                    "public_port_end": route.key.public_end,
                    "private_port_end": route.private_end,
                    "backends": [b.to_json() for b in route.backends],
                    "backend": applied.backend,
                    "packets": packets,
                    "bytes": nbytes,
                }
            )
    return rows
