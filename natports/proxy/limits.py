"""The proxy's limits: caps and idle timeouts from `[proxy]` in natports.toml (pure).

    [proxy]
    max_tcp = 20000              # open TCP connections, whole proxy
    max_udp_flows = 4096         # UDP flows (one ephemeral port each), whole proxy
    workers = 0                  # TCP worker processes ("auto": one per CPU); 0: in-process
    route_max_tcp = 5000         # per route (public port)
    route_max_udp_flows = 1024
    source_max_tcp = 256         # per route and client address
    source_max_udp_flows = 256
    tcp_idle = 3600              # seconds without a byte either way
    udp_idle = 60

    [[proxy.route]]              # overrides, later entries win
    app = "mail"                 # required
    port = 25                    # optional: one public port of the app
    protocol = "tcp"             # optional
    tcp_idle = 7200

The UDP defaults keep well below the ~28,000 ports of the default ephemeral range
(net.ipv4.ip_local_port_range), so the host's own outgoing UDP (DNS) always finds one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import config
from ..errors import InputError
from ..model import Protocol, Route

GLOBAL_KEYS = ("max_tcp", "max_udp_flows")
WORKERS_KEY = "workers"


class LimitsError(ValueError):
    """The `[proxy]` section is not valid (the daemon keeps its current limits)."""


@dataclass(frozen=True)
class RouteLimits:
    """What one route may hold; `[[proxy.route]]` can change any of these."""

    route_max_tcp: int = 5000
    route_max_udp_flows: int = 1024
    source_max_tcp: int = 256
    source_max_udp_flows: int = 256
    tcp_idle: float = 3600.0
    udp_idle: float = 60.0


ROUTE_KEYS = tuple(f.name for f in fields(RouteLimits))


@dataclass(frozen=True)
class Override:
    app: str
    port: int | None
    protocol: Protocol | None
    changes: tuple[tuple[str, float], ...]

    def matches(self, route: Route) -> bool:
        return (
            route.app == self.app
            and (self.port is None or route.key.public_port == self.port)
            and (self.protocol is None or route.key.protocol is self.protocol)
        )


@dataclass(frozen=True)
class Limits:
    max_tcp: int = 20000
    max_udp_flows: int = 4096
    workers: int = 0  # TCP worker processes; 0: the daemon relays TCP itself
    route: RouteLimits = RouteLimits()
    overrides: tuple[Override, ...] = ()

    def for_route(self, route: Route) -> RouteLimits:
        limits = self.route
        for override in self.overrides:
            if override.matches(route):
                limits = replace(limits, **_typed(override.changes))
        return limits

    def to_json(self) -> dict[str, object]:
        return {
            "max_tcp": self.max_tcp,
            "max_udp_flows": self.max_udp_flows,
            "workers": self.workers,
            **{k: getattr(self.route, k) for k in ROUTE_KEYS},
            "overrides": len(self.overrides),
        }


def _typed(changes: tuple[tuple[str, float], ...]) -> dict[str, Any]:
    return {k: (float(v) if k.endswith("_idle") else int(v)) for k, v in changes}


def _number(where: str, key: str, value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value <= 0:  # type: ignore[operator]
        raise LimitsError(f"{where}.{key} must be a positive number, not {value!r}")
    if not key.endswith("_idle") and not isinstance(value, int):
        raise LimitsError(f"{where}.{key} must be a whole number, not {value!r}")
    return float(value)  # type: ignore[arg-type]


def parse_limits(data: dict[str, object], udp_idle: float | None = None) -> Limits:
    """`data` is the whole TOML document; `udp_idle` is the legacy environment default."""
    section = data.get("proxy", {})
    if not isinstance(section, dict):
        raise LimitsError("[proxy] must be a table")
    route = RouteLimits() if udp_idle is None else RouteLimits(udp_idle=udp_idle)
    unknown = sorted(set(section) - {*GLOBAL_KEYS, *ROUTE_KEYS, WORKERS_KEY, "route"})
    if unknown:
        raise LimitsError(f"proxy.{unknown[0]} is not a known setting")
    changes = {k: _number("proxy", k, section[k]) for k in ROUTE_KEYS if k in section}
    route = replace(route, **_typed(tuple(changes.items())))
    totals = {k: int(_number("proxy", k, section[k])) for k in GLOBAL_KEYS if k in section}
    overrides: list[Override] = []
    items = section.get("route", [])
    if not isinstance(items, list):
        raise LimitsError("proxy.route must be an array of tables ([[proxy.route]])")
    for index, item in enumerate(items):
        overrides.append(_override(f"proxy.route[{index}]", item))
    workers = _workers(section.get(WORKERS_KEY, 0))
    return Limits(route=route, overrides=tuple(overrides), workers=workers, **totals)


def _workers(value: object) -> int:
    """`workers = N` or `"auto"` (one per CPU); read at start (a restart applies a change)."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise LimitsError(f'proxy.workers must be "auto" or 0-256, not {value!r}')
    return value


def _override(where: str, item: object) -> Override:
    if not isinstance(item, dict):
        raise LimitsError(f"{where} must be a table")
    unknown = sorted(set(item) - {"app", "port", "protocol", *ROUTE_KEYS})
    if unknown:
        raise LimitsError(f"{where}.{unknown[0]} is not a known setting")
    app = item.get("app")
    if not isinstance(app, str) or not app:
        raise LimitsError(f"{where}.app is required (the app name)")
    port = item.get("port")
    if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
        raise LimitsError(f"{where}.port must be a port number, not {port!r}")
    proto = item.get("protocol")
    if proto is not None and proto not in ("tcp", "udp"):
        raise LimitsError(f'{where}.protocol must be "tcp" or "udp", not {proto!r}')
    changes = tuple((k, _number(where, k, item[k])) for k in ROUTE_KEYS if k in item)
    return Override(app, port, None if proto is None else Protocol(proto), changes)


def read_limits(path: Path | None, udp_idle: float | None = None) -> Limits:
    """The limits in the operator's file; no file (or no path) means the defaults."""
    if path is None:
        return parse_limits({}, udp_idle)
    try:
        data = config.read(path)  # the one reader of the operator's file
    except InputError as exc:
        raise LimitsError("; ".join(exc.problems)) from None
    try:
        return parse_limits(data, udp_idle)
    except LimitsError as exc:
        raise LimitsError(f"{path}: {exc}") from None
