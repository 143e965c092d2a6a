"""A switch as a value: decide everything first (`plan`, pure), then perform it (`commit`).

The promise a switch keeps: the stored state never misses what the kernel may hold.
  1. Before the batch, each app's applied state grows to previous + desired, backends
     of a route included (removal is idempotent, so over-claiming is safe).
  2. The backend runs the batch: all of it or none of it.
  3. After success, each app's state is exactly desired. An app that moved from
     another backend keeps that backend's routes as a *leftover* until they are
     removed there (make before break); a failure is retried at the next switch.
  4. UDP backends that serve no more are remembered, so their conntrack entries go
     when their container dies; stale entries of new or changed UDP routes go now.
A crash anywhere repeats the unfinished steps at the next apply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from .backends.base import PROXY
from .conntrack import (
    changed_udp_routes,
    dead_backend_flows,
    local_addresses,
    removed_udp_backends,
    stale_udp,
)
from .containers import AppProblem
from .context import Context
from .errors import NatportsError
from .model import Backend, IPAddress, Protocol, Route
from .store import Applied, Leftover


@dataclass(frozen=True)
class Plan:
    backend: str  # the backend that runs the batch
    batch: str
    widened: tuple[tuple[str, Applied], ...]  # written before the batch
    pending: tuple[tuple[str, Leftover], ...]  # moving apps' old routes, before the batch
    after: tuple[tuple[str, Applied | None], ...]  # written after it (None: removed)
    leftovers: tuple[tuple[str, Leftover], ...]  # old backends' routes of moved apps
    retired: frozenset[Backend]  # UDP backends that serve no more
    udp_changed: tuple[Route, ...]  # new or changed UDP routes


def plan(
    backend: str,
    batch: str,
    records: Mapping[str, Applied | None],
    intents: Mapping[str, tuple[Route, ...]],
) -> Plan:
    """What a batch of `backend` does to the state, given each app's record and intent."""
    widened: list[tuple[str, Applied]] = []
    pending: list[tuple[str, Leftover]] = []
    after: list[tuple[str, Applied | None]] = []
    leftovers: list[tuple[str, Leftover]] = []
    retired: set[Backend] = set()
    previous_here: list[Route] = []
    for app in sorted(intents):
        desired = intents[app]
        record = records.get(app)
        before = record.routes if record else ()
        if record is not None and record.backend != backend:
            # Moving: the new backend may hold `desired` once its batch ran (crash or not),
            # and the old one keeps serving until then.
            pending.append((app, Leftover(record.backend, before, pending=True)))
            if desired:
                widened.append((app, Applied(backend, desired)))
            leftovers.append((app, Leftover(record.backend, before)))
        else:
            previous_here += before
            merged = {r.key: r for r in before}
            for r in desired:
                old = merged.get(r.key)
                # Both backend sets: if the batch fails, the kernel still DNATs to the old
                # ones, and a death among them must still be withdrawn (fail closed).
                both = tuple(sorted(set(old.backends) | set(r.backends))) if old else r.backends
                merged[r.key] = replace(r, backends=both)
            if merged:
                routes = tuple(sorted(merged.values(), key=Route.sort_key))
                widened.append((app, Applied(backend, routes)))
        after.append((app, Applied(backend, desired) if desired else None))
        retired |= removed_udp_backends(before, desired)
    desired_all = [r for routes in intents.values() for r in routes]
    return Plan(
        backend=backend,
        batch=batch,
        widened=tuple(widened),
        pending=tuple(pending),
        after=tuple(after),
        leftovers=tuple(leftovers),
        retired=frozenset(retired),
        udp_changed=tuple(changed_udp_routes(previous_here, desired_all)),
    )


def commit(ctx: Context, p: Plan) -> None:
    """Perform a plan; the caller holds the store's lock."""
    for app, leftover in p.pending:
        ctx.store.set_leftover(app, leftover)
    for app, applied in p.widened:
        ctx.store.set_applied(app, applied)
    ctx.backend_named(p.backend).run(p.batch)
    for app, leftover in p.leftovers:
        ctx.store.set_leftover(app, leftover)
    for app, _ in p.after:  # an earlier move whose batch failed is confirmed by this one
        earlier = ctx.store.leftover(app)
        if earlier is not None and earlier.pending and earlier.backend != p.backend:
            ctx.store.set_leftover(app, replace(earlier, pending=False))
    for app, result in p.after:
        if result is None:
            ctx.store.remove_applied(app)
        else:
            ctx.store.set_applied(app, result)
    remove_leftovers(ctx)
    remember_retired(ctx, set(p.retired))
    clean_udp(ctx, p.udp_changed, unnatted_too=p.backend != PROXY)
    try:
        forget_dead_udp(ctx, lambda cid: container_gone(ctx, cid))
    except NatportsError as exc:  # Docker away: the agent or the next apply does it
        print(f"natports: warning: UDP flows not cleaned: {exc.message}", file=sys.stderr)


def remove_leftovers(ctx: Context) -> None:
    """Remove what old backends still hold; a failure is retried at the next change."""
    for app in ctx.store.leftover_apps():
        leftover = ctx.store.leftover(app)
        if leftover is None or leftover.pending:
            continue
        try:
            old = ctx.backend_named(leftover.backend)
            old.run(old.plan_app(leftover.routes, ()))
        except NatportsError as exc:
            print(
                f"natports: warning: {app}: could not remove its old {leftover.backend} routes "
                f"yet ({exc.message}); the next apply tries again",
                file=sys.stderr,
            )
            continue
        ctx.store.remove_leftover(app)
        remember_retired(ctx, removed_udp_backends(leftover.routes, ()))


def remember_retired(ctx: Context, removed: set[Backend]) -> None:
    if removed:
        ctx.store.set_retired_udp(tuple(set(ctx.store.retired_udp()) | removed))


def forget_dead_udp(ctx: Context, is_gone: Callable[[str], bool]) -> list[Backend]:
    """Delete the UDP conntrack entries of retired backends whose container is gone.

    The caller holds the lock. Returns what was forgotten.
    """
    kept: list[Backend] = []
    forgotten: list[Backend] = []
    for backend in ctx.store.retired_udp():
        (forgotten if is_gone(backend.container_id) else kept).append(backend)
    if forgotten:
        forget_flows_of(ctx, set(forgotten))
        ctx.store.set_retired_udp(tuple(kept))
    return forgotten


def container_gone(ctx: Context, container_id: str) -> bool:
    try:
        return not ctx.docker().inspect(container_id).running
    except AppProblem:
        return True  # removed


def clean_udp(ctx: Context, changed: tuple[Route, ...], unnatted_too: bool) -> None:
    """Delete the conntrack entries that would keep clients of new or changed UDP routes
    away from their backends (see natports.conntrack). A failure is reported, not
    fatal: the kernel already holds the new routes."""
    if not changed:
        return
    try:
        keep = live_retired(ctx) if ctx.store.retired_udp() else set()
        local = local_addresses()
        families = sorted({r.key.family for r in changed})
        flows = [f for fam in families for f in ctx.conntrack.flows(Protocol.UDP, fam)]
        stale = [f for r in changed for f in stale_udp(flows, r, keep, local, unnatted_too)]
        ctx.conntrack.delete(stale)
    except NatportsError as exc:
        print(f"natports: warning: UDP flows not cleaned: {exc.message}", file=sys.stderr)


def live_retired(ctx: Context) -> set[tuple[IPAddress, int]]:
    """(address, port) of retired UDP backends whose container still runs there: their
    flows stay where they started."""
    retired = ctx.store.retired_udp()
    if not retired:
        return set()
    seen = ctx.docker().observe({b.container_id for b in retired})
    live = set()
    for b in retired:
        c = seen.get(b.container_id)
        if c is not None and c.running and b.ip in (c.ipv4, c.ipv6):
            live.add((b.ip, b.port))
    return live


def forget_flows_of(ctx: Context, backends: set[Backend]) -> None:
    try:
        families = sorted({b.ip.version for b in backends})
        flows = [f for fam in families for f in ctx.conntrack.flows(Protocol.UDP, fam)]
        ctx.conntrack.delete(dead_backend_flows(flows, backends))
    except NatportsError as exc:
        print(f"natports: warning: UDP flows not cleaned: {exc.message}", file=sys.stderr)
