"""From an app's mappings and its current containers to the routes the kernel should hold."""

from __future__ import annotations

from collections.abc import Sequence

from .containers import AppProblem, ContainerInfo
from .model import Backend, Mapping, Route, RouteKey, loopback_publish


def build_routes(
    app: str,
    mappings: Sequence[Mapping],
    containers: dict[str, list[ContainerInfo]],
    need_publish: bool = True,
) -> tuple[Route, ...]:
    """Every problem of the app is collected into one AppProblem; nothing half-built escapes.

    `need_publish`: Docker's FORWARD filter only passes natports' flows to ports the
    container publishes (unless natports' DOCKER-USER accept is in place: then False).
    """
    problems: list[str] = []
    routes: list[Route] = []
    for mapping in mappings:
        if containers.get(mapping.process_type) == []:
            continue  # known to run no container of this type (scaled to 0): route nothing
        found = containers.get(mapping.process_type, [])
        live = [c for c in found if c.running]
        for c in found:
            if not c.running:
                problems.append(f'app "{app}": container {c.name or c.short_id} is not running')
        if not live:
            if not found:
                problems.append(
                    f'app "{app}": no running container for process type '
                    f'"{mapping.process_type}" (needed by {mapping.public_text()})'
                )
            continue
        for c in live if need_publish else ():
            for _, private in mapping.ports():
                if (private, mapping.protocol) not in c.published:
                    problems.append(
                        f'app "{app}": container {c.name or c.short_id} does not publish '
                        f"{private}/{mapping.protocol}; natports needs it published on "
                        f"loopback (-p {loopback_publish(private, mapping.protocol)}) so "
                        "that Docker accepts the forwarded traffic"
                    )
        families = _families(mapping, live)
        if not families:
            problems.append(
                f'app "{app}": {mapping.public_text()} needs IPv{_wanted(mapping)} addresses '
                "on every container"
            )
            continue
        for family in families:
            subnets = sorted({s for c in live for s in c.subnets if (":" in s) == (family == 6)})
            backends = tuple(
                sorted(
                    Backend(c.id, c.ipv4 if family == 4 else c.ipv6, mapping.private_port)  # type: ignore[arg-type]
                    for c in live
                )
            )
            # A range is one route (one key, one kernel element), however many ports.
            routes.append(
                Route(
                    app=app,
                    process_type=mapping.process_type,
                    key=RouteKey(
                        family,
                        mapping.protocol,
                        mapping.public_port,
                        mapping.public_ip,
                        mapping.count,
                    ),
                    private_port=mapping.private_port,
                    backends=backends,
                    hairpin_subnets=tuple(subnets),
                    proxy_protocol=mapping.proxy_protocol,
                )
            )
    if problems:
        raise AppProblem("\n".join(dict.fromkeys(problems)))
    return tuple(sorted(routes, key=Route.sort_key))


def _wanted(mapping: Mapping) -> int:
    return 4 if mapping.public_ip is None else mapping.public_ip.version


def _families(mapping: Mapping, live: list[ContainerInfo]) -> list[int]:
    """Address families this mapping can DNAT: a family needs an address on every container."""
    has4 = all(c.ipv4 is not None for c in live)
    has6 = all(c.ipv6 is not None for c in live)
    if mapping.public_ip is not None:
        ok = has4 if mapping.public_ip.version == 4 else has6
        return [mapping.public_ip.version] if ok else []
    families = [4] if has4 else []
    if has6:
        families.append(6)
    return families
