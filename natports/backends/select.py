"""Which backend serves the routes: chosen by name, or `auto` (the first that works).

Order for `auto`: nftables, iptables, proxy. The reasons are the doctor's probes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..config import read_section
from ..errors import InputError
from ..model import PROXY_PROTOCOL_OPTION, Route
from .base import RouteBackend

NAMES = ("nftables", "iptables", "proxy")


def make(name: str, table: str, state_dir: Path) -> RouteBackend:
    """A backend by name; `table` names natports' nft table / iptables chain prefix."""
    if name == "nftables":
        from ..forwarding import Forwarding
        from .nftables import NftBackend

        return NftBackend(f"inet {table}", forwarding=Forwarding(table.upper(), _variant()))
    if name == "iptables":
        from .iptables import IptablesBackend

        return IptablesBackend(_variant(), prefix=table.upper())
    if name == "proxy":
        from .proxy import ProxyBackend

        return ProxyBackend(state_dir)
    raise InputError([f'unknown backend "{name}" (expected auto, {", ".join(NAMES)})'])


def _variant() -> str:
    from ..probes import iptables_variant

    # NATPORTS_IPTABLES_VARIANT=nft|legacy overrides the detection (tests use both).
    variant = os.environ.get("NATPORTS_IPTABLES_VARIANT") or iptables_variant()
    if variant not in ("nft", "legacy"):
        raise InputError([f'NATPORTS_IPTABLES_VARIANT "{variant}" is not nft or legacy'])
    return variant


def resolve(name: str) -> str:
    if name != "auto":
        return name
    from ..probes import check_iptables, check_nft, choose_backend

    return choose_backend(check_nft(), check_iptables)[0]


def configured_default(config_path: Path) -> str | None:
    """`[backend] default = "..."` in the operator's config file, if set."""
    value = read_section(config_path, "backend").get("default")
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
