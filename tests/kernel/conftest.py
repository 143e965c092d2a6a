"""Shared by the kernel tests: backends on the host itself, so no Docker is needed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from ipaddress import ip_address

import pytest

from natports.backends.iptables import IptablesBackend
from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import ClientNet, TagServer, sh
from tests.kernel.xtables import PREFIX, VARIANTS, force_clean, ours

# The v6 tests' addresses on the shared client netns' veth (added per test, then removed)
HOST6 = "fd77:9::1"
CLIENT6 = "fd77:9::2"
SUBNET6 = "fd77:9::/64"


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


@pytest.fixture
def net6(client_net: ClientNet) -> Iterator[ClientNet]:
    """The shared client netns, with a v6 address on each end of its veth for this test."""
    sh("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", client_net.host_if, "nodad")
    peer = client_net.host_if.replace("nph", "npp", 1)  # ClientNet.create names them so
    client_net.exec("ip", "-6", "addr", "add", f"{CLIENT6}/64", "dev", peer, "nodad")
    try:
        yield client_net
    finally:
        client_net.exec("ip", "-6", "addr", "del", f"{CLIENT6}/64", "dev", peer, check=False)
        sh("ip", "-6", "addr", "del", f"{HOST6}/64", "dev", client_net.host_if, check=False)


@pytest.fixture
def servers6(net6: ClientNet) -> Iterator[list[TagServer]]:
    made = [TagServer(HOST6, tag) for tag in ("one", "two")]
    yield made
    for server in made:
        server.close()


@pytest.fixture(params=VARIANTS)
def ipt(request: pytest.FixtureRequest) -> Iterator[IptablesBackend]:
    variant = str(request.param)
    for tool in ("restore", "save"):
        if shutil.which(f"iptables-{variant}-{tool}") is None:
            pytest.fail(f"iptables-{variant}-{tool} is not installed (run ./scripts/test)")
    backend = IptablesBackend(variant, prefix=PREFIX)
    backend.run(backend.plan_flush_all())
    try:
        yield backend
    finally:
        try:
            backend.run(backend.plan_flush_all())
        finally:
            for family in (4, 6):
                if ours(variant, family):
                    force_clean(variant, family)
        assert ours(variant) == [] and ours(variant, 6) == []
