"""The use cases behind the CLI and the agent: store, apply, flush, withdraw, repair.

Every mutation runs under the store's lock. An apply decides what it does first (a
`switch.Plan`: the batch and the state before and after), then commits it: every kernel
change is one batch, and the applied state never misses what the kernel may hold.
Fail closed: a route keeps only backends whose container runs with that address now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import switch
from .backends import select
from .claims import ClaimCheck as ClaimCheck
from .claims import check_file as check_file
from .claims import claim_checker as claim_checker
from .claims import require_app_name as require_app_name
from .claims import validate as validate
from .containers import AppProblem, ContainerInfo, current_containers
from .context import Context as Context
from .desired import build_routes
from .errors import InputError
from .liveness import verified, without_containers
from .model import Backend, Mapping, Route
from .status import status as status
from .store import Applied
from .switch import container_gone as container_gone
from .switch import forget_dead_udp as forget_dead_udp


@dataclass(frozen=True)
class ApplyReport:
    batch: str
    applied: tuple[str, ...]  # apps whose routes the kernel now holds
    failed: dict[str, str]  # app -> why it kept its previous routes


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
    # Backends that pass Docker's FORWARD filter by themselves need no published ports.
    need_publish = not ctx.backend.forwards_unpublished()
    routes = build_routes(app, mappings, found, need_publish=need_publish)
    # Only a process that terminates the connection can send a PROXY protocol header.
    refused = select.unsupported(ctx.backend.name, routes)
    if refused:
        raise InputError(refused)
    return routes


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
                _commit(ctx, ctx.backend.plan_app(previous, kept), {app: kept})
        raise
    if not desired and not previous and not _elsewhere(ctx, [app]):
        return ApplyReport("", (), {})  # nothing to route and nothing to remove
    batch = ctx.backend.plan_app(previous, desired)
    if not dry_run:
        _commit(ctx, batch, {app: desired})
    return ApplyReport(batch, (app,) if desired else (), {})


def _commit(ctx: Context, batch: str, intents: dict[str, tuple[Route, ...]]) -> None:
    records = {app: ctx.store.applied(app) for app in intents}
    switch.commit(ctx, switch.plan(ctx.backend.name, batch, records, intents))


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
        switch.forget_flows_of(ctx, gone)
    return changed


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
        if not backend.intact(routes):
            backend.run(backend.plan_reconcile(routes, describe=False))
            repaired.append(name)
    return repaired


def apply_all_unlocked(ctx: Context, dry_run: bool = False) -> ApplyReport:
    configured = ctx.store.apps()
    desired: dict[str, tuple[Route, ...]] = {}
    failed: dict[str, str] = {}
    for app in configured:
        try:
            desired[app] = _desired_for(ctx, app, ())
        except (AppProblem, InputError) as exc:
            failed[app] = exc.message if isinstance(exc, AppProblem) else "; ".join(exc.problems)
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
    batch = (
        ctx.backend.plan_reconcile(every, describe=dry_run)
        if every
        else ctx.backend.plan_flush_all()
    )
    if not dry_run:
        moved = _elsewhere(ctx, configured)
        # A broken app still served by another backend stays there until it works.
        intents = {a: r for a, r in desired.items() if not (a in failed and a in moved)}
        for app in set(ctx.store.applied_apps()) - set(configured):
            intents[app] = ()
        _commit(ctx, batch, intents)
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
    batch = ctx.backend_named(applied.backend).plan_app(applied.routes, ())
    if not dry_run:
        p = switch.plan(applied.backend, batch, {app: applied}, {app: ()})
        switch.commit(ctx, p)
    return batch
