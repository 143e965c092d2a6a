"""The agent's engine steps against a fake backend: withdraw dead containers, repair drift,
notice dead init processes while Docker is away. No root, no Docker, no kernel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from natports import engine
from natports.agent import Agent, Watched, process_start_time, routed_listener_conflicts
from natports.model import Protocol, RouteKey
from natports.policy import HostListener
from natports.store import Applied, Store
from tests.unit.fakes import FakeBackend, FakeDocker, attach
from tests.unit.routes import route

TCP, UDP = Protocol.TCP, Protocol.UDP


def context(tmp_path: Path) -> tuple[engine.Context, FakeBackend]:
    ctx = engine.Context(Store(tmp_path), tmp_path, tmp_path / "none.toml", "t", "nftables")
    world = attach(ctx, FakeDocker())
    return ctx, world.nft


def test_withdraw_removes_only_the_dead_containers_backends(tmp_path: Path) -> None:
    ctx, fake = context(tmp_path)
    mail = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3")
    dns = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.2")
    shop = route("shop", RouteKey(4, TCP, 8080), 5000, "172.17.0.4")
    for r in (mail, dns, shop):
        ctx.store.set_applied(r.app, Applied("nftables", (r,)))
    changed = engine.withdraw(ctx, {"c-172.17.0.2"})
    assert changed == ["dns", "mail"]
    assert ctx.store.applied("dns") is None  # no backend left: the route is withdrawn
    kept = ctx.store.applied("mail")
    assert kept is not None and [str(b.ip) for b in kept.routes[0].backends] == ["172.17.0.3"]
    assert ctx.store.applied("shop") == Applied("nftables", (shop,))
    assert len(fake.batches) == 2  # shop was not touched


def test_repair_reinstalls_the_applied_routes_only_when_gone(tmp_path: Path) -> None:
    ctx, fake = context(tmp_path)
    mail = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
    ctx.store.set_applied("mail", Applied("nftables", (mail,)))
    assert engine.repair(ctx) == []
    assert fake.batches == []
    assert fake.checked == (mail,)  # checked for what it should hold (IPv6 chains or not)
    fake.flush_ruleset()
    assert engine.repair(ctx) == ["nftables"]
    assert fake.ports() == {25: ["172.17.0.2"]}


def test_the_agent_notices_a_dead_init_process_without_docker(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path)
    mail = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
    ctx.store.set_applied("mail", Applied("nftables", (mail,)))
    child = subprocess.Popen(["sleep", "60"])
    try:
        started = process_start_time(child.pid)
        assert started is not None
        agent = Agent(ctx, log=lambda _: None)
        agent.watched["c-172.17.0.2"] = Watched(child.pid, started)
        assert agent._dead_in_proc() == set()
        agent.watched["c-172.17.0.2"] = Watched(os.getpid(), started + 1)  # a reused pid
        assert agent._dead_in_proc() == {"c-172.17.0.2"}
    finally:
        child.kill()
        child.wait()
    agent.watched["c-172.17.0.2"] = Watched(child.pid, started)
    assert agent._dead_in_proc() == {"c-172.17.0.2"}
    agent.withdraw(agent._dead_in_proc())
    assert ctx.store.applied("mail") is None
    assert agent.counters.withdrawals == 1


def test_a_host_listener_on_a_routed_port_is_named(tmp_path: Path) -> None:
    from ipaddress import ip_address

    ctx, _ = context(tmp_path)
    mail = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
    ctx.store.set_applied("mail", Applied("nftables", (mail,)))
    listeners = [
        HostListener(TCP, ip_address("0.0.0.0"), 25, "exim4 (pid 7)"),
        HostListener(TCP, ip_address("127.0.0.1"), 25, "loopback only (pid 8)"),
        HostListener(UDP, ip_address("0.0.0.0"), 25, "a udp socket (pid 9)"),
    ]
    assert routed_listener_conflicts(ctx.store, listeners) == [
        'port 25/tcp is routed to app "mail", but exim4 (pid 7) now listens on it too: it '
        "gets no outside traffic on that port; stop it, or remove the port from the app"
    ]
