"""Who may claim which public port: the grammar, other apps' claims, the host policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .backends.base import PROXY
from .context import Context
from .errors import InputError
from .listeners import host_listeners
from .model import Mapping, is_valid_app_name
from .policy import check_conflicts, check_policy, load_policy
from .spec import Located, ParseResult, SpecError, format_errors, parse_bytes
from .store import Applied


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
        if rec.backend == PROXY
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
