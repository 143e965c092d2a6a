"""Shared by the kernel tests: backends on the host itself, so no Docker is needed."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import ClientNet, TagServer


@pytest.fixture
def servers(client_net: ClientNet) -> Iterator[list[TagServer]]:
    made = [TagServer(client_net.host_ip, tag) for tag in ("one", "two")]
    yield made
    for server in made:
        server.close()


def range_route(app: str, public: int, private: int, count: int, host: str) -> Route:
    """A TCP range of `count` ports onto host-local servers at private..private+count-1."""
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(4, Protocol.TCP, public, None, count),
        private_port=private,
        backends=(Backend(f"c-{host}", ip_address(host), private),),
    )


@pytest.fixture
def range_servers(client_net: ClientNet) -> Iterator[list[TagServer]]:
    """Three servers on consecutive ports (27300-27302), tagged by their port."""
    made = [TagServer(client_net.host_ip, f"p{port}", port) for port in range(27300, 27303)]
    yield made
    for server in made:
        server.close()
