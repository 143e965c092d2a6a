"""What natports routes now, per public port: the documented `status --json` rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.base import PROXY, RouteBackend
from .conntrack import Flow, FlowCount, count_flows, local_addresses
from .context import Context
from .errors import NatportsError
from .model import IPAddress, Protocol, Route

if TYPE_CHECKING:
    from .backends.proxy import ProxyBackend


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

    flows = FlowReader(ctx)
    proxy_metrics: dict[str, dict[str, Any]] | None = None
    rows: list[dict[str, object]] = []
    for app in ctx.store.applied_apps():
        applied = ctx.store.applied(app)
        if applied is None:
            continue
        backend = ctx.backend_named(applied.backend)
        proxy = _as_proxy(backend) if applied.backend == PROXY else None
        for route in applied.routes:
            counts = flows.of(route) if applied.backend != PROXY else None
            proxied = None
            if proxy is not None:
                if proxy_metrics is None:
                    try:
                        proxy_metrics = proxy.route_metrics()
                    except NatportsError:
                        proxy_metrics = {}
                proxied = _proxy_row(proxy, route, proxy_metrics)
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
                    "flows": None if counts is None else [c.to_json() for c in counts],
                    "proxy": proxied,
                }
            )
    return rows


def _as_proxy(backend: RouteBackend) -> ProxyBackend | None:
    """The proxy daemon's client, if `backend` is one (imported here: only proxied
    routes need it, and the CLI of a kernel backend should not load it)."""
    from .backends.proxy import ProxyBackend

    return backend if isinstance(backend, ProxyBackend) else None


def _proxy_row(
    backend: ProxyBackend, route: Route, metrics: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """What the proxy daemon counts for a route (a range: summed over its ports)."""
    found = [metrics[i] for r in route.expanded() if (i := backend.route_id(r)) in metrics]
    if not found:
        return None
    refused: dict[str, int] = {}
    for m in found:
        for cause, n in m.get("refused", {}).items():
            refused[cause] = refused.get(cause, 0) + int(n)
    return {
        "open_connections": sum(int(m.get("open_connections", 0)) for m in found),
        "udp_flows": sum(int(m.get("udp_flows", 0)) for m in found),
        "refused": refused,
    }


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
        except (NatportsError, OSError, ImportError):  # not root, or no netlink binding
            self._broken = True
            return None
        return count_flows(self._dumps[key], route, self._local)
