"""Which backend serves the routes: chosen by name, or `auto` (the first that works).

Order for `auto`: nftables, iptables, proxy. The reasons are the doctor's probes.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..model import PROXY_PROTOCOL_OPTION, Route
from .base import RouteBackend

NAMES = ("nftables", "iptables", "proxy")


def make(name: str, table: str, state_dir: Path) -> RouteBackend:
    """A backend by name; `table` names natports' nft table / iptables chain prefix."""
    if name == "nftables":
        from .nftables import NftBackend

        return KernelOnly(NftBackend(f"inet {table}"))
    if name == "iptables":
        from ..doctor import iptables_variant
        from .iptables import IptablesBackend

        # NATPORTS_IPTABLES_VARIANT=nft|legacy overrides the detection (tests use both).
        variant = os.environ.get("NATPORTS_IPTABLES_VARIANT") or iptables_variant()
        if variant not in ("nft", "legacy"):
            raise InputError([f'NATPORTS_IPTABLES_VARIANT "{variant}" is not nft or legacy'])
        return KernelOnly(IptablesBackend(variant, prefix=table.upper()))
    if name == "proxy":
        from .proxy import ProxyBackend

        return ProxyBackend(state_dir)
    raise InputError([f'unknown backend "{name}" (expected auto, {", ".join(NAMES)})'])


def resolve(name: str) -> str:
    if name != "auto":
        return name
    from ..doctor import check_iptables, check_nft, choose_backend

    return choose_backend(check_nft(), check_iptables)[0]


def configured_default(config_path: Path) -> str | None:
    """`[backend] default = "..."` in the operator's config file, if set."""
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError([f"{config_path}: {exc}"]) from None
    section = data.get("backend", {})
    value = section.get("default") if isinstance(section, dict) else None
    if value is None:
        return None
    if value != "auto" and value not in NAMES:
        raise InputError(
            [f'{config_path}: backend.default "{value}" is not auto or one of {", ".join(NAMES)}']
        )
    return str(value)


def unsupported(backend: str, routes: Sequence[Route]) -> list[str]:
    """Problems of routes a kernel backend cannot serve as asked (pure).

    A PROXY protocol header can only come from a process that terminates the
    connection: DNAT forwards the client's own packets. The kernel backends keep the
    client's address anyway, but an app told to expect the header would misread the
    first bytes of every connection without it, so the option is refused, not ignored.
    """
    if backend == "proxy":
        return []
    seen: dict[tuple[str, str], None] = {}
    for route in routes:
        if route.proxy_protocol:
            seen[(route.app, route.claim().public_text())] = None
    return [
        f'app "{app}": {public} asks for {PROXY_PROTOCOL_OPTION}, which only the proxy '
        f"backend can send; the {backend} backend keeps client addresses without it: remove "
        f"the option from PORTS, or use --backend proxy"
        for app, public in seen
    ]


class KernelOnly:
    """A kernel backend that refuses routes asking for what only the proxy can do."""

    def __init__(self, inner: RouteBackend) -> None:
        self.inner = inner
        self.name = inner.name

    def _check(self, routes: Sequence[Route]) -> None:
        problems = unsupported(self.name, routes)
        if problems:
            raise InputError(problems)

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        self._check(desired)
        return self.inner.plan_app(previous, desired)

    def plan_reconcile(self, desired: Sequence[Route]) -> str:
        self._check(desired)
        return self.inner.plan_reconcile(desired)

    def plan_flush_all(self) -> str:
        return self.inner.plan_flush_all()

    def run(self, batch: str) -> None:
        self.inner.run(batch)

    def route_id(self, route: Route) -> str:
        return self.inner.route_id(route)

    def counters(self) -> dict[str, tuple[int, int]]:
        return self.inner.counters()
