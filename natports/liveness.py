"""Fail closed: a route DNATs only to an address a running container of its app holds now.

A remembered address is a claim about the past. After a dockerd restart, or a
container restarted by its restart policy, Docker hands addresses out again in a
new order, and a rule to a remembered address then delivers one app's traffic
to another app. So every backend is checked against what is true at this moment
before a route keeps it, and a route left without backends is withdrawn (its
public port is refused until the app runs again) rather than sent anywhere else.

Pure: the callers say what Docker, or /proc when Docker is down, tells them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .model import Backend, IPAddress, Route


@dataclass(frozen=True)
class Seen:
    """One container as observed right now (None in the observation: it does not exist)."""

    id: str
    running: bool
    app: str | None  # its com.dokku.app-name label, if any
    process_type: str | None  # its com.dokku.process-type label, if any
    addresses: frozenset[IPAddress]

    def may_serve(self, route: Route, backend: Backend) -> bool:
        if not self.running or backend.ip not in self.addresses:
            return False
        if self.app is not None and self.app != route.app:
            return False
        return self.process_type is None or self.process_type == route.process_type


def verified(
    routes: Iterable[Route], seen: Mapping[str, Seen | None]
) -> tuple[tuple[Route, ...], frozenset[Backend]]:
    """The routes with every backend that may no longer serve removed, and those backends.

    A backend whose container is missing from `seen` is unknown, and unknown is not
    proof: it is removed too. Routes left without a backend are dropped.
    """
    kept: list[Route] = []
    dropped: set[Backend] = set()
    for route in routes:
        good = []
        for backend in route.backends:
            container = seen.get(backend.container_id)
            if container is not None and container.may_serve(route, backend):
                good.append(backend)
            else:
                dropped.add(backend)
        if good:
            same = len(good) == len(route.backends)
            kept.append(route if same else replace(route, backends=tuple(good)))
    return tuple(kept), frozenset(dropped)


def without_containers(
    routes: Iterable[Route], dead: Iterable[str]
) -> tuple[tuple[Route, ...], frozenset[Backend]]:
    """The routes without the backends of containers known to be dead (no Docker needed)."""
    gone = set(dead)
    kept: list[Route] = []
    dropped: set[Backend] = set()
    for route in routes:
        good = tuple(b for b in route.backends if b.container_id not in gone)
        dropped.update(b for b in route.backends if b.container_id in gone)
        if good:
            same = len(good) == len(route.backends)
            kept.append(route if same else replace(route, backends=good))
    return tuple(kept), frozenset(dropped)


def backend_containers(routes: Iterable[Route]) -> set[str]:
    return {b.container_id for r in routes for b in r.backends}
