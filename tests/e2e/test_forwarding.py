"""Containers without published ports, reached through natports' DOCKER-USER accept.

The nftables backend marks the flows it DNATs (conntrack mark bit) and, when Docker
has DOCKER-USER, puts one jump there to its own chain that accepts exactly those
flows: no `-p` per private port, so no docker-proxy process per port.
"""

from __future__ import annotations

import random
import subprocess

import pytest

from tests.infra import BOTH_FAMILIES, Cli, ClientNet, Containers, sh

PORT = 23125  # below the ephemeral range; clear of the other suites' ports
JUMP = "-A DOCKER-USER -j NATPORTS_TEST-FWD"

pytestmark = pytest.mark.usefixtures("clean_kernel")


def filter_rules() -> str:
    return sh("iptables-save", "-t", "filter").stdout


@pytest.fixture(params=["nftables", "iptables"])
def nft_cli(cli: Cli, request: pytest.FixtureRequest) -> Cli:
    """The CLI with a kernel backend (the name stays: nftables is the main case)."""
    if ":DOCKER-USER" not in filter_rules():
        pytest.fail("Docker's DOCKER-USER chain is missing: is dockerd running with iptables?")
    cli.backend = request.param
    return cli


def docker_proxies() -> int:
    out = subprocess.run(["pgrep", "-c", "-x", "docker-proxy"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


@BOTH_FAMILIES
def test_an_unpublished_container_is_reached_and_flush_removes_the_jump(
    nft_cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    nft_cli("ports", "set", "mail", input=f"{PORT}:5025\n{PORT}:5025/udp\n")
    bare = containers.start("v1", publish=False)
    try:
        nft_cli("apply", "--app", "mail", "--container", bare.id)
        assert filter_rules().count(JUMP) == 1
        assert client_net.connect_once(PORT) == {"tag": "v1"}
        flow = client_net.udp_hold(PORT)
        try:
            assert flow.ask("hi") == "v1 hi"
        finally:
            flow.close()
        nft_cli("apply", "--app", "mail", "--container", bare.id)  # idempotent: still one jump
        assert filter_rules().count(JUMP) == 1
    finally:
        nft_cli("flush")
    assert "NATPORTS_TEST-FWD" not in filter_rules()


def test_without_the_accept_docker_drops_the_flow(
    nft_cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    """The accept is what lets the flow through: take it away and the connect fails."""
    nft_cli("ports", "set", "mail", input=f"{PORT + 1}:5025\n")
    bare = containers.start("v1", publish=False)
    try:
        nft_cli("apply", "--app", "mail", "--container", bare.id)
        sh("iptables", "-D", "DOCKER-USER", "-j", "NATPORTS_TEST-FWD")
        result = client_net.client("once", client_net.host_ip, str(PORT + 1))
        assert "tag" not in result
    finally:
        nft_cli("flush")


@BOTH_FAMILIES
def test_a_udp_range_is_one_route_no_docker_argument_and_no_process(
    nft_cli: Cli, client_net: ClientNet, containers: Containers, family: int
) -> None:
    first, count = 23200, 50
    ports = list(range(6000, 6000 + count))
    nft_cli(
        "ports", "set", "rtp", input=f"{first}-{first + count - 1}:6000-{6000 + count - 1}/udp\n"
    )
    before = docker_proxies()
    c = containers.start("v1", ports=ports, publish=False)
    assert docker_proxies() == before
    try:
        nft_cli("apply", "--app", "rtp", "--container", c.id)
        # a container on the dual-stack network is routed on both families
        families = [4] if family == 4 else [4, 6]
        rows = nft_cli.status()
        assert [(r["family"], r["public_port"], r["public_port_end"]) for r in rows] == [
            (f, first, first + count - 1) for f in families
        ]
        assert {r["private_port_end"] for r in rows} == {6000 + count - 1}
        if nft_cli.backend == "nftables":
            table = sh("nft", "list", "table", "inet", "natports_test").stdout
            assert table.count("udp . 23200-23249") == len(families)  # one per family
        else:
            for f in families:
                nat = sh("iptables-save" if f == 4 else "ip6tables-save", "-t", "nat").stdout
                assert nat.count("--dport 23200:23249") == 1
        for port in random.sample(range(first, first + count), 3):
            flow = client_net.udp_hold(port)
            try:
                assert flow.ask("x") == "v1 x", port
            finally:
                flow.close()
        assert next(r for r in nft_cli.status() if r["family"] == family)["packets"] >= 3
        human = nft_cli("status").stdout
        assert f"*:{first}-{first + count - 1}/udp" in human
    finally:
        nft_cli("flush")
