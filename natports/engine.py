"""The use cases behind the CLI: validate, store, apply, flush, report.

Every mutation runs under the store's lock; every kernel change is one batch;
the applied state is written only after the kernel accepted the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import RouteBackend
from .backends.nftables import NftBackend
from .containers import AppProblem, Docker, current_containers
from .desired import build_routes
from .errors import InputError, NatportsError
from .listeners import host_listeners
from .model import Mapping, Route, is_valid_app_name
from .policy import Listener, check_conflicts, check_policy, load_policy
from .spec import Located, ParseResult, SpecError, parse_bytes
from .store import Applied, Store


@dataclass
class Context:
    store: Store
    dokku_root: Path
    config_path: Path
    backend: RouteBackend = field(default_factory=NftBackend)
    docker_factory: Callable[[], Docker] = Docker
    listeners: Callable[[], list[Listener]] = host_listeners
    _docker: Docker | None = None

    def docker(self) -> Docker:
        if self._docker is None:
            self._docker = self.docker_factory()
        return self._docker


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
        raise InputError([e.format(filename) for e in result.errors])
    return result


def validate_for_app(ctx: Context, app: str, data: bytes, filename: str) -> tuple[Mapping, ...]:
    """Grammar, then conflicts with every other app, then the host policy: all errors at once."""
    require_app_name(app)
    result = parse_bytes(data)
    errors = list(result.errors) + check_claims(ctx, app, result.mappings)
    if errors:
        errors.sort(key=lambda e: (e.line, e.col))
        raise InputError([e.format(filename) for e in errors])
    return tuple(loc.mapping for loc in result.mappings)


def check_claims(ctx: Context, app: str, located: Sequence[Located]) -> list[SpecError]:
    """Conflicts with every other app, then the host policy."""
    errors = check_conflicts(app, located, _claims(ctx, app))
    return errors + check_policy(located, load_policy(ctx.config_path), ctx.listeners())


def _claims(ctx: Context, app: str) -> dict[str, tuple[Mapping, ...]]:
    """What every other app holds: its stored mappings and what the kernel still routes for it.

    A port an app dropped from its PORTS stays its own until an apply removes the rules.
    """
    claims = {a: m for a, m in ctx.store.all_mappings().items() if a != app}
    for other in ctx.store.applied_apps():
        applied = ctx.store.applied(other)
        if other != app and applied is not None:
            claims[other] = claims.get(other, ()) + tuple(r.claim() for r in applied.routes)
    return claims


def set_ports(ctx: Context, app: str, data: bytes, filename: str) -> tuple[Mapping, ...]:
    with ctx.store.locked():
        mappings = validate_for_app(ctx, app, data, filename)
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
    return build_routes(app, mappings, found)


def _previous(ctx: Context, app: str) -> tuple[Route, ...]:
    applied = ctx.store.applied(app)
    return applied.routes if applied else ()


def _run(ctx: Context, batch: str, intents: dict[str, tuple[Route, ...]]) -> None:
    """Run a batch so that the stored state never misses what the kernel may hold.

    Before: each app's applied state grows to previous + desired (removal is
    idempotent, so over-claiming is safe). After success: exactly desired.
    """
    for app, desired in intents.items():
        merged = {r.key: r for r in _previous(ctx, app)}
        merged.update((r.key, r) for r in desired)
        if merged:
            routes = tuple(sorted(merged.values(), key=Route.sort_key))
            ctx.store.set_applied(app, Applied(ctx.backend.name, routes))
    ctx.backend.run(batch)
    for app, desired in intents.items():
        _record(ctx, app, desired)


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
    if not desired and not previous:
        return ApplyReport("", (), {})  # nothing to route and nothing to remove
    batch = ctx.backend.plan_app(previous, desired)
    if not dry_run:
        _run(ctx, batch, {app: desired})
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
        intents = {a: routes for a, routes in desired.items()}
        for app in set(ctx.store.applied_apps()) - set(configured):
            intents[app] = ()
        _run(ctx, batch, intents)
    applied = tuple(a for a in configured if a not in failed and desired[a])
    return ApplyReport(batch, applied, failed)


def flush(ctx: Context, app: str | None = None, dry_run: bool = False) -> str:
    with ctx.store.locked():
        if app is not None:
            require_app_name(app)
            return flush_app_unlocked(ctx, app, dry_run)
        batch = ctx.backend.plan_flush_all()
        if not dry_run:
            ctx.backend.run(batch)
            for name in ctx.store.applied_apps():
                ctx.store.remove_applied(name)
        return batch


def flush_app_unlocked(ctx: Context, app: str, dry_run: bool = False) -> str:
    """Remove one app's rules; the caller holds the store's lock."""
    previous = _previous(ctx, app)
    if not previous:
        return ""
    batch = ctx.backend.plan_app(previous, ())
    if not dry_run:
        _run(ctx, batch, {app: ()})
    return batch


def status(ctx: Context) -> list[dict[str, object]]:
    """One entry per public port: the documented `status --json` schema."""
    try:
        counters = ctx.backend.counters()
    except NatportsError:
        counters = {}
    rows: list[dict[str, object]] = []
    for app in ctx.store.applied_apps():
        applied = ctx.store.applied(app)
        if applied is None:
            continue
        for route in applied.routes:
            packets, nbytes = counters.get(ctx.backend.route_id(route), (None, None))
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
                }
            )
    return rows
