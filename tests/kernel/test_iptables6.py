"""IPv6 through the iptables backend (ip6tables), on both xtables variants.

Modelled on test_ipv6.py (the nftables backend's): a client netns reaches the host over
v6 and is DNATed to host-local servers (no Docker). What is tested is natports' rules
in the IPv6 nat table: new flows switch while conntrack keeps established ones (TCP
and UDP), a shifted range, several backends, counters, drift and `intact`, and that
flushing leaves nothing of ours in either table and everything else as it was.

The prefix is test_iptables.py's (its fixture's cleanup covers IPv4); ports 25060+.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from ipaddress import ip_address

import pytest

from natports.backends.ipt_render import V6_MARK, split_batch
from natports.backends.iptables import IptablesBackend
from natports.errors import NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import ClientNet, TagServer, UdpFlow, ipv6_forwarding, sh
from tests.kernel.conftest import CLIENT6, HOST6, SUBNET6
from tests.kernel.xtables import PREFIX, force_clean, ours, save


def ours_counted6(variant: str) -> list[str]:
    return [ln for ln in save(variant, counters=True, family=6).splitlines() if f"{PREFIX}-" in ln]


def not_ours6(variant: str) -> str:
    lines = save(variant, family=6).splitlines()
    return "\n".join(ln for ln in lines if f"{PREFIX}-" not in ln and "NATPORTS" not in ln)


def route6(
    app: str, port: int, *ports: int, count: int = 1, protocol: Protocol = Protocol.TCP
) -> Route:
    """Public `port` (a range of `count`) DNATed to host-local servers at HOST6:ports."""
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(6, protocol, port, None, count),
        private_port=ports[0],
        backends=tuple(Backend(f"c6-{p}", ip_address(HOST6), p) for p in ports),
        hairpin_subnets=(SUBNET6,),
    )


class UdpTagServer:
    """A host-local UDP server answering `<tag> <message>`.

    `close` ends the thread before it closes the socket: a thread still waiting in
    recvfrom would wait on, and swallow a datagram of, whichever socket gets the fd number
    next (see test_a_closed_udp_server_reads_nothing_more).
    """

    def __init__(self, tag: str, host: str = HOST6) -> None:
        self.tag = tag
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
                if self.stop.is_set():
                    return
                self.sock.sendto(f"{self.tag} {data.decode()}".encode(), peer)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        # Unconnected: ENOTCONN, yet the waiting recvfrom returns (b"", None) (inet_shutdown)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        assert not self.thread.is_alive(), f"UDP server {self.tag} did not stop"
        self.sock.close()


def test_a_closed_udp_server_reads_nothing_more() -> None:
    """A server closed while its thread waits in recvfrom must not read the datagrams of
    the socket that gets its fd number next (the next test's server, at the same number).

    The kernel restarts a recvfrom that a signal interrupted with the same arguments, fd
    number included, and the SIGCHLDs of the subprocesses tests start do interrupt it.
    Without UdpTagServer.close's join this failed 20 runs in 20.
    """
    old = UdpTagServer("old", host="::1")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
        client.settimeout(1)
        client.sendto(b"a", ("::1", old.port))
        assert client.recv(100) == b"old a"
        time.sleep(0.1)  # its thread is back in recvfrom
        number = old.sock.fileno()
        old.close()
        new = UdpTagServer("new", host="::1")
        try:
            assert new.sock.fileno() == number  # the premise: the number is reused
            for _ in range(300):
                subprocess.run(["true"], check=True)  # SIGCHLDs, as a test's ip6tables calls
            for n in range(4):
                client.sendto(f"{n}".encode(), ("::1", new.port))
                assert client.recv(100) == f"new {n}".encode()
        finally:
            new.close()


def test_a_v6_switch_keeps_established_flows(
    ipt: IptablesBackend, net6: ClientNet, servers6: list[TagServer]
) -> None:
    one, two = servers6
    first = [route6("six", 25060, one.port)]
    batch = ipt.plan_app([], first)
    assert V6_MARK in batch
    ipt.run(batch)
    assert any("-j DNAT --to-destination" in ln and HOST6 in ln for ln in ours(ipt.variant, 6))
    held = net6.hold(25060, host=HOST6)
    try:
        assert held.tag == "one"
        second = [route6("six", 25060, two.port)]
        ipt.run(ipt.plan_app(first, second))
        assert net6.connect_once(25060, host=HOST6) == {"tag": "two"}
        assert held.ask("ping") == "one ping"
    finally:
        held.close()
    # One first packet per new flow; legacy carries the flow counted before the switch
    # over (-c); ip6tables-nft 1.8.9 ignores -c on IPv6 rules (docs/backends.md).
    assert ipt.counters()[ipt.route_id(first[0])][0] >= (2 if ipt.variant == "legacy" else 1)
    # v4 clients of the same port are not DNATed by a v6 route
    assert "tag" not in net6.connect_once(25060)
    assert ipt.intact()


def test_a_v6_udp_flow_stays_new_ones_switch(ipt: IptablesBackend, net6: ClientNet) -> None:
    servers = [UdpTagServer("one"), UdpTagServer("two")]
    flows: list[UdpFlow] = []
    try:
        first = [route6("six", 25061, servers[0].port, protocol=Protocol.UDP)]
        ipt.run(ipt.plan_app([], first))
        flows.append(net6.udp_hold(25061, host=HOST6))
        assert flows[0].ask("a") == "one a"
        ipt.run(ipt.plan_app(first, [route6("six", 25061, servers[1].port, protocol=Protocol.UDP)]))
        flows.append(net6.udp_hold(25061, host=HOST6))  # a new source port: a new flow
        assert flows[1].ask("b") == "two b"
        assert flows[0].ask("c") == "one c"  # conntrack keeps the old binding
    finally:
        for flow in flows:
            flow.close()
        for server in servers:
            server.close()


def test_a_shifted_v6_range_is_one_chain_and_reaches_each_port(
    ipt: IptablesBackend, net6: ClientNet
) -> None:
    servers = [TagServer(HOST6, f"p{port}", port) for port in range(27320, 27323)]
    try:
        rng = route6("ftp", 25320, 27320, count=3)
        ipt.run(ipt.plan_app([], [rng]))
        chains = [line for line in ours(ipt.variant, 6) if line.startswith(":")]
        assert len(chains) == 6  # 4 fixed + app + route
        for offset in range(3):
            assert net6.connect_once(25320 + offset, host=HOST6) == {"tag": f"p{27320 + offset}"}
        assert ipt.counters()[ipt.route_id(rng)][0] >= 3
    finally:
        for server in servers:
            server.close()


def test_several_v6_backends_share_new_flows(
    ipt: IptablesBackend, net6: ClientNet, servers6: list[TagServer]
) -> None:
    one, two = servers6
    ipt.run(ipt.plan_app([], [route6("six", 25062, one.port, two.port)]))
    tags = {net6.connect_once(25062, host=HOST6).get("tag") for _ in range(24)}
    assert tags == {"one", "two"}  # all 24 on one side: probability 2**-23


def test_both_families_flush_to_nothing_and_leave_the_rest(
    ipt: IptablesBackend, net6: ClientNet
) -> None:
    """Docker may rewrite its IPv4 chains meanwhile; the IPv6 nat table here is only ours
    and whatever was there before (compared whole)."""
    before = not_ours6(ipt.variant)
    four = Route(
        "both",
        "web",
        RouteKey(4, Protocol.TCP, 25063),
        5025,
        (Backend("c4", ip_address("172.30.0.2"), 5025),),
    )
    ipt.run(ipt.plan_app([], [four, route6("both", 25063, 5025)]))
    assert len(ours(ipt.variant)) > 10 and len(ours(ipt.variant, 6)) > 10
    ipt.run(ipt.plan_app([four, route6("both", 25063, 5025)], [four]))
    assert not any(ipt.layout.app_chain("both") in ln for ln in ours(ipt.variant, 6))
    assert ipt.plan_flush_all().count("*nat") == 2  # the IPv6 skeleton is still there
    ipt.run(ipt.plan_flush_all())
    assert ours(ipt.variant) == [] and ours(ipt.variant, 6) == []
    assert not_ours6(ipt.variant) == before
    assert ipt.plan_flush_all() == ""


def test_v6_drift_is_seen_by_intact_and_reconciled_with_counters(
    ipt: IptablesBackend, net6: ClientNet, servers6: list[TagServer]
) -> None:
    one, _ = servers6
    six = [route6("six", 25064, one.port)]
    stale = [route6("gone", 25065, one.port)]
    ipt.run(ipt.plan_app([], six))
    ipt.run(ipt.plan_app([], stale))
    assert net6.connect_once(25064, host=HOST6) == {"tag": "one"}
    counted = ipt.counters()[ipt.route_id(six[0])]
    assert counted[0] >= 1 and ipt.intact()
    sh(f"ip6tables-{ipt.variant}", "-w", "-t", "nat", "-D", "OUTPUT", "-j", f"{PREFIX}-OUT")
    assert not ipt.intact()
    ipt.run(ipt.plan_reconcile(six))
    assert ipt.intact()
    live = ipt.live(6)
    assert ipt.layout.app_chain("gone") not in live.chains
    assert ipt.route_id(stale[0]) not in live.chains
    # ip6tables-nft 1.8.9 ignores -c on IPv6 rules: its counters restart at the rewrite.
    kept = counted if ipt.variant == "legacy" else (0, 0)
    assert ipt.counters() == {ipt.route_id(six[0]): kept}
    assert net6.connect_once(25064, host=HOST6) == {"tag": "one"}


def test_losing_every_v6_chain_is_a_loss_only_where_v6_routes_live(
    ipt: IptablesBackend, net6: ClientNet, servers6: list[TagServer]
) -> None:
    """A firewall reload that removed all of natports' IPv6 chains, jumps included, and
    left the IPv4 ones: `intact` must see it when IPv6 routes should be there."""
    one, _ = servers6
    six = [route6("six", 25066, one.port)]
    ipt.run(ipt.plan_reconcile(six))
    assert ipt.intact(six) and ours(ipt.variant, 6)
    force_clean(ipt.variant, 6)
    assert ours(ipt.variant, 6) == [] and ours(ipt.variant) != []
    assert not ipt.intact(six)
    assert ipt.intact([])  # an IPv4-only host keeps no IPv6 chain of ours
    ipt.run(ipt.plan_reconcile(six))
    assert ipt.intact(six)
    assert net6.connect_once(25066, host=HOST6) == {"tag": "one"}


def test_a_failing_v6_batch_leaves_the_v6_table_as_it_was(
    ipt: IptablesBackend, net6: ClientNet
) -> None:
    old = [route6("six", 25066, 5025)]
    ipt.run(ipt.plan_app([], old))
    before = ours_counted6(ipt.variant)
    v4, v6 = split_batch(ipt.plan_app(old, [route6("six", 25066, 5026)]))
    broken = v6.replace("COMMIT\n", f"-A {PREFIX}-NO-SUCH -j RETURN\nCOMMIT\n")
    with pytest.raises(NatportsError, match="ip6tables-restore failed"):
        ipt.run(f"{v4}{V6_MARK}\n{broken}")
    assert ours_counted6(ipt.variant) == before


PEER_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0), family=socket.AF_INET6)
print(srv.getsockname()[1], flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.sendall(f"{peer[0]}\\n".encode())
"""


def test_a_v6_hairpin_flow_is_masqueraded(ipt: IptablesBackend, net6: ClientNet) -> None:
    """Client and backend on one subnet (both in the client netns): the flow is DNATed
    back out of the interface it came in on, and only masquerading it (the backend then
    sees the host's address) lets the answer come back through the host."""
    argv = ["ip", "netns", "exec", net6.ns, sys.executable, "-c", PEER_SERVER, CLIENT6]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    with ipv6_forwarding():  # the flow goes back out of the interface it came in on
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            hairpin = Route(
                "six",
                "web",
                RouteKey(6, Protocol.TCP, 25067),
                port,
                (Backend("c6-hairpin", ip_address(CLIENT6), port),),
                hairpin_subnets=(SUBNET6,),
            )
            ipt.run(ipt.plan_app([], [hairpin]))
            assert net6.connect_once(25067, host=HOST6) == {"tag": HOST6}
            if ipt.variant == "nft":  # the premise, once (a failed connect waits 5 s)
                # Without the subnet the flow is not masqueraded: the backend answers the client
                # directly, from an address the client never dialled, and the connect fails.
                ipt.run(ipt.plan_app([hairpin], [replace(hairpin, hairpin_subnets=())]))
                assert "error" in net6.connect_once(25067, host=HOST6)
        finally:
            server.kill()
            server.wait()
            if server.stdout:
                server.stdout.close()
