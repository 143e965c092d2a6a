"""The core promise, with real containers and a client in another network namespace.

One behavioural suite for every backend: nftables, iptables (both xtables
variants) and the userspace proxy, and for both address families (tests/e2e/conftest.py:
the v4 runs use Docker's default bridge and a v4 client netns, the v6 runs containers on
the tests' dual-stack network and a client netns that has only IPv6).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.infra import BOTH_FAMILIES, Cli, ClientNet, Containers, sh

pytestmark = [pytest.mark.usefixtures("clean_kernel"), BOTH_FAMILIES]

BACKENDS = ["nftables", "iptables-nft", "iptables-legacy", "proxy"]


@pytest.fixture(params=BACKENDS)
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    """The CLI with one backend chosen by name (the proxy daemon running for `proxy`)."""
    name: str = request.param
    made = Cli(tmp_path, backend=name.split("-")[0])
    if name.startswith("iptables-"):
        made.env["NATPORTS_IPTABLES_VARIANT"] = name.split("-")[1]
    daemon = None
    if name == "proxy":
        daemon = subprocess.Popen(made.argv("proxy"), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not (made.state / "proxy.sock").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.05)
    try:
        yield made
    finally:
        made("flush", expect=None)
        if daemon is not None:
            daemon.terminate()
            daemon.wait(10)
            if daemon.stderr:
                daemon.stderr.close()


PORT = 21025  # below the ephemeral range, where Docker picks published host ports


def route_to(cli: Cli, app: str, *container_ids: str) -> None:
    args = ["apply", "--app", app]
    for cid in container_ids:
        args += ["--container", cid]
    cli(*args)


def test_new_flows_switch_and_old_flows_stay(
    cli: Cli, client_net: ClientNet, containers: Containers, family: int
) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    v1 = containers.start("v1")
    route_to(cli, "mail", v1.id)
    held = client_net.hold(PORT)
    try:
        assert held.tag == "v1"
        v2 = containers.start("v2")
        route_to(cli, "mail", v2.id)
        # (b) every connection opened after apply returned reaches the new container
        for _ in range(20):
            assert client_net.connect_once(PORT) == {"tag": "v2"}
        # (a) the flow opened before the switch keeps talking to the old container
        assert held.ask("still there?") == "v1 still there?"
        # status shows the route of this family, onto the new container's address of it
        rows = [r for r in cli.status() if r["family"] == family]
        assert [r["backends"] for r in rows] == [
            [{"container_id": v2.id, "ip": v2.address(family), "port": 5025}]
        ]
        if cli.backend != "proxy":  # conntrack sees the held flow draining to v1
            target = v1.ip if family == 4 else f"[{v1.ip6}]"
            assert f"{target}:5025=1" in cli("status").stdout
    finally:
        held.close()


def test_zero_failed_connections_across_switches(
    cli: Cli, client_net: ClientNet, containers: Containers, tmp_path: Path
) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    releases = [containers.start(f"r{i}") for i in range(3)]
    route_to(cli, "mail", releases[0].id)
    hammer = client_net.hammer(PORT, rate=150, max_seconds=120, stopfile=tmp_path / "stop")
    try:
        for switch in range(1, 13):
            target = releases[switch % len(releases)]
            route_to(cli, "mail", target.id)
            # every connect after apply returned goes to the new release
            assert client_net.connect_once(PORT) == {"tag": f"r{switch % len(releases)}"}
            sh("sleep", "0.25")
        report = hammer.stop()
    finally:
        hammer.kill()
    assert report["failures"] == []
    assert report["rate"] >= 100, report
    assert set(report["tags"]) == {"r0", "r1", "r2"}, report


def test_several_containers_share_new_flows(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    web = [containers.start(f"w{i}") for i in range(3)]
    route_to(cli, "mail", *(c.id for c in web))
    seen = {client_net.connect_once(PORT)["tag"] for _ in range(60)}
    assert seen == {"w0", "w1", "w2"}


def test_host_local_client_reaches_the_app(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    v1 = containers.start("v1")
    route_to(cli, "mail", v1.id)
    # From the host itself, to the host's own (non-loopback) address: the output hook.
    from tests.netclient import once

    assert once(client_net.host_ip, PORT) == {"tag": "v1"}


def test_a_second_apps_switch_leaves_the_first_alone(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    cli("ports", "set", "chat", input=f"{PORT + 1}:5025\n")
    mail = containers.start("mail-v1")
    chat1 = containers.start("chat-v1")
    route_to(cli, "mail", mail.id)
    route_to(cli, "chat", chat1.id)
    held = client_net.hold(PORT)
    try:
        chat2 = containers.start("chat-v2")
        route_to(cli, "chat", chat2.id)
        assert client_net.connect_once(PORT + 1) == {"tag": "chat-v2"}
        assert client_net.connect_once(PORT) == {"tag": "mail-v1"}
        assert held.ask("hi") == "mail-v1 hi"
    finally:
        held.close()


def test_a_routed_port_is_a_claim_not_a_host_listener(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    """The proxy's own listening sockets must read as the app's claim, for any app."""
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    route_to(cli, "mail", containers.start("v1").id)
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")  # its own port: accepted again
    refused = cli("ports", "set", "chat", input=f"{PORT}:5025\n", expect=2)
    assert f'port {PORT}/tcp is already mapped by app "mail"' in refused.stderr
    assert "in use on the host" not in refused.stderr


def test_udp_mapping_reaches_the_container(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "dns", input=f"{PORT}:5025/udp\n")
    v1 = containers.start("v1")
    route_to(cli, "dns", v1.id)
    assert client_net.client("udp", client_net.host_ip, str(PORT), "ping") == {"answer": "v1 ping"}


def test_the_app_sees_the_clients_address_through_a_kernel_backend(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    """DNAT keeps the source address: the container sees the client itself (TCP and UDP).
    The proxy relays from the host, so there the container sees the host's address
    (docs/proxy.md: PROXY protocol v2 is how an app behind it learns the client's)."""
    cli("ports", "set", "mail", input=f"{PORT}:5025\n{PORT}:5025/udp\n")
    v1 = containers.start("v1")
    route_to(cli, "mail", v1.id)
    held = client_net.hold(PORT)
    try:
        over_tcp = held.ask("?peer")
    finally:
        held.close()
    flow = client_net.udp_hold(PORT)
    try:
        over_udp = flow.ask("?peer")
    finally:
        flow.close()
    seen = []
    for answer in (over_tcp, over_udp):
        assert answer is not None and answer.startswith("v1 ?peer "), answer
        seen.append(ip_address(answer.split()[-1]))
    client = ip_address(client_net.client_ip)
    if cli.backend == "proxy":
        assert client not in seen
    else:
        assert seen == [client, client]


def test_another_container_reaches_the_public_port(
    cli: Cli, client_net: ClientNet, containers: Containers, family: int
) -> None:
    """Another app on the same bridge dials the host's public port: DNAT back onto the bridge."""
    import docker

    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    server = containers.start("srv")
    route_to(cli, "mail", server.id)
    other = containers.start("other")
    out = (
        docker.from_env()
        .containers.get(other.id)
        .exec_run(
            ["/bin/busybox", "sh", "-c", f"echo | /bin/busybox nc -w 3 {client_net.host_ip} {PORT}"]
        )
    )
    assert out.output.decode().splitlines()[:1] == ["srv"], out
    if cli.backend != "proxy":
        # Masqueraded: the server answered the bridge's gateway, not `other` directly. (The
        # connect alone would not show it: with br_netfilter, conntrack un-NATs even a
        # reply that the bridge switches straight back to `other`.)
        me = other.address(family)
        entries = sh(
            "conntrack", "-L", "-f", f"ipv{family}", "-p", "tcp", "-s", me, "--dport", str(PORT)
        ).stdout.splitlines()
        replies_to = [[w for w in e.split() if w.startswith("dst=")][1] for e in entries]
        assert replies_to and f"dst={me}" not in replies_to, entries


def test_udp_flow_stays_while_its_container_lives_and_moves_when_it_dies(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "dns", input=f"{PORT}:5025/udp\n")
    v1 = containers.start("v1")
    route_to(cli, "dns", v1.id)
    flow = client_net.udp_hold(PORT)
    # with the CLI's environment: a watcher of another iptables variant would "repair"
    # the routes into its own tables, where they shadow those of the tested variant
    watcher = subprocess.Popen(
        cli.argv("watch"), stderr=subprocess.PIPE, text=True, env=cli.full_env()
    )
    try:
        assert flow.ask("a") == "v1 a"
        v2 = containers.start("v2")
        route_to(cli, "dns", v2.id)
        assert flow.ask("b") == "v1 b"  # the flow keeps its container while it lives
        assert client_net.client("udp", client_net.host_ip, str(PORT), "c") == {"answer": "v2 c"}
        containers.stop(v1.id, timeout=1)
        # `natports watch` sees the container die and forgets its UDP flows at once
        answers = [flow.ask(f"d{i}") for i in range(10)]
        assert next(a for a in answers if a).startswith("v2 d"), answers
    finally:
        watcher.terminate()
        watcher.wait(10)
        if watcher.stderr:
            watcher.stderr.close()
        flow.close()
