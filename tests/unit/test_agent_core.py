"""The agent's pure core: fail-closed verification, which conntrack entries go, how Docker's
events are read, the metrics text. No root, no Docker."""

from __future__ import annotations

import os
from ipaddress import ip_address
from pathlib import Path

from natports.agent import Change, classify, process_start_time
from natports.conntrack import (
    Flow,
    FlowCount,
    changed_udp_routes,
    count_flows,
    dead_backend_flows,
    removed_udp_backends,
    stale_udp,
)
from natports.liveness import Seen, verified, without_containers
from natports.metrics import AgentCounters, render_rows
from natports.model import Protocol, RouteKey
from tests.unit.routes import backend, route

TCP, UDP = Protocol.TCP, Protocol.UDP
HOST = ip_address("198.51.100.1")
LOCAL = frozenset({HOST, ip_address("127.0.0.1")})


def seen(cid: str, *ips: str, running: bool = True, app: str | None = "mail") -> Seen:
    return Seen(cid, running, app, "web", frozenset(ip_address(i) for i in ips))


# -- fail closed -----------------------------------------------------------------------------


def test_a_backend_that_still_runs_with_its_address_stays() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
    assert verified([r], {"c-172.17.0.2": seen("c-172.17.0.2", "172.17.0.2")}) == (
        (r,),
        frozenset(),
    )


def test_an_address_now_held_by_another_apps_container_is_dropped() -> None:
    """After a dockerd restart the container came back elsewhere, and another app's
    container holds the remembered address: the route must not keep it."""
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
    kept, dropped = verified([r], {"c-172.17.0.2": seen("c-172.17.0.2", "172.17.0.5")})
    assert kept == ()
    assert dropped == {backend("172.17.0.2", 5025)}


def test_stopped_missing_and_foreign_containers_are_dropped() -> None:
    r = route("mail", RouteKey(4, UDP, 53), 5053, "172.17.0.2", "172.17.0.3", "172.17.0.4")
    observed = {
        "c-172.17.0.2": seen("c-172.17.0.2", "172.17.0.2", running=False),
        "c-172.17.0.3": None,  # removed
        "c-172.17.0.4": seen("c-172.17.0.4", "172.17.0.4", app="shop"),
    }
    kept, dropped = verified([r], observed)
    assert kept == ()
    assert len(dropped) == 3


def test_an_unknown_container_is_not_proof_of_life() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
    assert verified([r], {}) == ((), frozenset({backend("172.17.0.2", 5025)}))


def test_a_route_keeps_its_live_backends_only() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3")
    observed = {
        "c-172.17.0.2": seen("c-172.17.0.2", "172.17.0.2"),
        "c-172.17.0.3": seen("c-172.17.0.3", "172.17.0.3", running=False),
    }
    kept, _ = verified([r], observed)
    assert [b.ip for b in kept[0].backends] == [ip_address("172.17.0.2")]


def test_withdrawing_dead_containers_needs_no_docker() -> None:
    a = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3")
    b = route("mail", RouteKey(4, TCP, 587), 5587, "172.17.0.2")
    kept, dropped = without_containers([a, b], {"c-172.17.0.2"})
    assert [r.key.public_port for r in kept] == [25]
    assert kept[0].backends == (backend("172.17.0.3", 5025),)
    assert dropped == {backend("172.17.0.2", 5025), backend("172.17.0.2", 5587)}


# -- conntrack -------------------------------------------------------------------------------


def flow(
    dport: int,
    target: str,
    tport: int,
    public: str = "198.51.100.1",
    proto: Protocol = UDP,
    state: str | None = None,
) -> Flow:
    return Flow(
        4,
        proto,
        ip_address("198.51.100.2"),
        40000,
        ip_address(public),
        dport,
        ip_address(target),
        tport,
        state,
    )


def test_un_natted_entries_of_a_new_udp_route_go() -> None:
    """The blackhole: sent before the route existed, refreshed by every datagram."""
    r = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.2")
    early = flow(53, "198.51.100.1", 53)
    assert stale_udp([early], r, set(), LOCAL) == [early]


def test_entries_to_the_routes_backends_and_live_old_backends_stay() -> None:
    r = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.3")
    current = flow(53, "172.17.0.3", 5053)
    old_alive = flow(53, "172.17.0.2", 5053)
    dead = flow(53, "172.17.0.9", 5053)
    keep = {(ip_address("172.17.0.2"), 5053)}
    assert stale_udp([current, old_alive, dead], r, keep, LOCAL) == [dead]


def test_flows_a_container_sends_out_to_the_same_port_number_are_not_touched() -> None:
    """A container resolving names sends to some server's port 53: not our route's flow."""
    r = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.3")
    outgoing = flow(53, "9.9.9.9", 53, public="9.9.9.9")
    assert stale_udp([outgoing], r, set(), LOCAL) == []


def test_the_proxy_backend_keeps_the_entries_it_terminates() -> None:
    r = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.3")
    terminated = flow(53, "198.51.100.1", 53)
    natted_dead = flow(53, "172.17.0.9", 5053)
    assert stale_udp([terminated, natted_dead], r, set(), LOCAL, unnatted_too=False) == [
        natted_dead
    ]


def test_a_route_bound_to_one_address_only_touches_that_address() -> None:
    r = route("dns", RouteKey(4, UDP, 53, ip_address("198.51.100.1")), 5053, "172.17.0.3")
    other = flow(53, "127.0.0.1", 53, public="127.0.0.1")
    mine = flow(53, "198.51.100.1", 53)
    assert stale_udp([other, mine], r, set(), LOCAL) == [mine]


def test_only_new_or_changed_udp_routes_need_cleaning() -> None:
    same = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.2")
    moved_before = route("dns", RouteKey(4, UDP, 54), 5054, "172.17.0.2")
    moved_after = route("dns", RouteKey(4, UDP, 54), 5054, "172.17.0.3")
    new = route("dns", RouteKey(4, UDP, 55), 5055, "172.17.0.3")
    tcp = route("dns", RouteKey(4, TCP, 53), 5053, "172.17.0.3")
    changed = changed_udp_routes([same, moved_before], [same, moved_after, new, tcp])
    assert changed == [moved_after, new]


def test_removed_udp_backends() -> None:
    before = [route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.2")]
    after = [route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.3")]
    assert removed_udp_backends(before, after) == {backend("172.17.0.2", 5053)}


def test_dead_backend_flows_never_include_tcp() -> None:
    dead = backend("172.17.0.2", 5025)
    tcp = flow(25, "172.17.0.2", 5025, proto=TCP, state="ESTABLISHED")
    udp = flow(25, "172.17.0.2", 5025)
    assert dead_backend_flows([tcp, udp], [dead]) == [udp]


def test_flows_are_counted_per_target_old_containers_included() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.3")
    flows = [
        flow(25, "172.17.0.2", 5025, proto=TCP, state="ESTABLISHED"),
        flow(25, "172.17.0.2", 5025, proto=TCP, state="TIME_WAIT"),
        flow(25, "172.17.0.3", 5025, proto=TCP, state="ESTABLISHED"),
        flow(26, "172.17.0.3", 5025, proto=TCP, state="ESTABLISHED"),  # another port
    ]
    assert count_flows(flows, r, LOCAL) == [
        FlowCount(ip_address("172.17.0.2"), 5025, 1, 0),
        FlowCount(ip_address("172.17.0.3"), 5025, 1, 0),
    ]


# -- Docker's events -------------------------------------------------------------------------


def event(kind: str, action: str, cid: str = "abc", **attributes: str) -> dict[str, object]:
    return {"Type": kind, "Action": action, "Actor": {"ID": cid, "Attributes": attributes}}


def test_death_withdraws_and_start_reroutes() -> None:
    labels = {"com.dokku.app-name": "mail"}
    assert classify(event("container", "die", **labels)) == Change("abc", "mail", True)
    assert classify(event("container", "destroy")) == Change("abc", None, True)
    assert classify(event("container", "start", **labels)) == Change("abc", "mail", False)
    assert classify(event("container", "restart")) == Change("abc", None, False)


def test_network_events_name_the_container_in_their_attributes() -> None:
    gone = event("network", "disconnect", cid="net1", container="abc")
    assert classify(gone) == Change("abc", None, True)
    assert classify(event("network", "connect", cid="net1", container="abc")) == Change(
        "abc", None, False
    )


def test_other_events_are_ignored() -> None:
    assert classify(event("container", "exec_start: sh -c true")) is None
    assert classify(event("container", "health_status: healthy")) is None
    assert classify(event("image", "pull")) is None
    assert classify(event("network", "create")) is None
    assert classify({"Type": "container", "Action": "die", "Actor": {}}) is None


def test_a_process_start_time_tells_a_reused_pid_apart(tmp_path: Path) -> None:
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(os.getpid()) == process_start_time(os.getpid())
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text(
        "42 (a (weird) name) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n"
    )
    assert process_start_time(42, tmp_path) == 777
    assert process_start_time(43, tmp_path) is None


# -- metrics ---------------------------------------------------------------------------------


def status_row(
    app: str, backend: str, protocol: str, port: int, flows: list[dict[str, object]] | None
) -> dict[str, object]:
    """One row as `status --json` gives it to the metrics renderer."""
    return {
        "app": app,
        "backend": backend,
        "protocol": protocol,
        "public_port": port,
        "flows": flows,
    }


def flow_json(ip: str, port: int, tcp: int = 0, udp: int = 0) -> dict[str, object]:
    return {"ip": ip, "port": port, "tcp_established": tcp, "udp": udp}


def test_metrics_text() -> None:
    rows = [
        status_row('we"ird', "nftables", "tcp", 25, [flow_json("172.17.0.2", 5025, tcp=3)]),
        status_row("dns", "proxy", "udp", 53, None),
    ]
    counters = AgentCounters(resyncs=2, repairs=1)
    counters.applied("dns", 0.25)
    agent = {"docker": "up", **counters.to_json()}
    text = render_rows(rows, agent)
    lines = text.splitlines()
    assert 'natports_routes{app="dns",backend="proxy"} 1' in lines
    assert 'natports_routes{app="we\\"ird",backend="nftables"} 1' in lines
    assert (
        'natports_flows{app="we\\"ird",protocol="tcp",public_port="25",'
        'target="172.17.0.2:5025",state="established"} 3'
    ) in lines
    assert "natports_agent_up 1" in lines
    assert "natports_agent_resyncs_total 2" in lines
    assert "natports_agent_repairs_total 1" in lines
    assert "natports_apply_duration_seconds_count 1" in lines
    assert 'natports_last_apply_seconds{app="dns"} 0.25' in lines
    assert "# TYPE natports_agent_errors_total counter" in lines
    assert render_rows([], None).splitlines()[-1] == "natports_agent_up 0"


def test_a_ranges_flows_are_matched_by_offset() -> None:
    """10000-10009 -> 20000-20009: public 10003 reaches private 20003 of the backend."""
    r = route("rtp", RouteKey(4, UDP, 10000, count=10), 20000, "172.17.0.3")
    mine = flow(10003, "172.17.0.3", 20003)
    shifted_wrong = flow(10003, "172.17.0.3", 20004)  # not this route's mapping
    outside = flow(10010, "198.51.100.1", 10010)  # past the range's end
    early = flow(10009, "198.51.100.1", 10009)
    assert stale_udp([mine, shifted_wrong, outside, early], r, set(), LOCAL) == [
        shifted_wrong,
        early,
    ]
    assert count_flows([mine], r, LOCAL) == [FlowCount(ip_address("172.17.0.3"), 20000, 0, 1)]


def test_proxy_counts_become_metrics() -> None:
    row = status_row("dns", "proxy", "udp", 53, None)
    row["proxy"] = {"open_connections": 0, "udp_flows": 4, "refused": {"route_max_udp_flows": 9}}
    lines = render_rows([row], None).splitlines()
    assert 'natports_proxy_udp_flows{app="dns",protocol="udp",public_port="53"} 4' in lines
    assert (
        'natports_proxy_refused_total{app="dns",protocol="udp",public_port="53",'
        'cause="route_max_udp_flows"} 9'
    ) in lines


def test_metrics_target_of_a_v6_backend_is_bracketed() -> None:
    rows = [status_row("six", "nftables", "udp", 53, [flow_json("fd77:1::2", 5025, udp=1)])]
    assert (
        'natports_flows{app="six",protocol="udp",public_port="53",'
        'target="[fd77:1::2]:5025",state="active"} 1'
    ) in render_rows(rows, None).splitlines()
