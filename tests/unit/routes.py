"""Routes as the renderer tests write them: an app, a key, a private port, container IPs."""

from __future__ import annotations

from ipaddress import ip_address

from natports.model import Backend, Route, RouteKey


def backend(ip: str, port: int, cid: str | None = None) -> Backend:
    return Backend(cid or f"c-{ip}", ip_address(ip), port)


def route(
    app: str,
    key: RouteKey,
    private: int,
    *ips: str,
    subnets: tuple[str, ...] = ("172.17.0.0/16",),
) -> Route:
    return Route(
        app=app,
        process_type="web",
        key=key,
        private_port=private,
        backends=tuple(backend(ip, private) for ip in ips),
        hairpin_subnets=subnets,
    )
