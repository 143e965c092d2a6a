"""IPv6 through the nftables backend: a client netns reaches the host over v6 and is DNATed.

The backends are host-local servers (no Docker): what is tested is natports' v6
rules (maps of family 6, `dnat ip6`), conntrack keeping established flows across a
switch, a v6 range, and the counters.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from natports.backends.nftables import NftBackend
from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import NFT_TABLE, ClientNet, TagServer, sh
from tests.kernel.conftest import HOST6, SUBNET6

pytestmark = pytest.mark.usefixtures("clean_kernel")


def route6(port: int, server: TagServer, count: int = 1) -> Route:
    return Route(
        app="six",
        process_type="web",
        key=RouteKey(6, Protocol.TCP, port, None, count),
        private_port=server.port,
        backends=(Backend("c6", ip_address(HOST6), server.port),),
        hairpin_subnets=(SUBNET6,),
    )


def test_a_v6_switch_keeps_established_flows(net6: ClientNet, servers6: list[TagServer]) -> None:
    nft = NftBackend(f"inet {NFT_TABLE}")
    one, two = servers6
    first = [route6(21060, one)]
    nft.run(nft.plan_app([], first))
    assert "tcp . 21060" in sh("nft", "list", "map", "inet", NFT_TABLE, "dnat_any6").stdout
    held = net6.hold(21060, host=HOST6)
    try:
        assert held.tag == "one"
        second = [route6(21060, two)]
        nft.run(nft.plan_app(first, second))
        assert net6.connect_once(21060, host=HOST6) == {"tag": "two"}
        assert held.ask("ping") == "one ping"
    finally:
        held.close()
    assert nft.counters()[nft.route_id(first[0])][0] >= 2
    # v4 clients of the same port are not DNATed by a v6 route
    assert "tag" not in net6.connect_once(21060)


def test_a_v6_range(net6: ClientNet) -> None:
    servers = [TagServer(HOST6, f"p{port}", port) for port in range(27310, 27313)]
    try:
        nft = NftBackend(f"inet {NFT_TABLE}")
        rng = route6(27310, servers[0], count=3)  # identical range: the port stays
        nft.run(nft.plan_app([], [rng]))
        for port in range(27310, 27313):
            assert net6.connect_once(port, host=HOST6) == {"tag": f"p{port}"}
        assert nft.counters()[nft.route_id(rng)][0] >= 3
    finally:
        for server in servers:
            server.close()
