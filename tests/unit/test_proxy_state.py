"""The proxy's pure state: handover round trip, backend health, admission and its counters."""

from __future__ import annotations

import json
from ipaddress import ip_address

import pytest

from natports.backends.proxy import route_metrics
from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy.handover import (
    ClientState,
    FlowState,
    Handover,
    HandoverError,
    ListenerState,
    PumpState,
    TcpState,
)
from natports.proxy.health import MAX_BACKOFF, Health
from natports.proxy.limits import Limits, RouteLimits
from natports.proxy.runtime import RouteStats, Runtime

A = Backend("a", ip_address("172.17.0.2"), 5025)
B = Backend("b", ip_address("172.17.0.3"), 5025)
C = Backend("c", ip_address("fd00::3"), 5025)


def sample() -> Handover:
    route = Route("mail", "web", RouteKey(4, Protocol.UDP, 53), 5053, (A, B), proxy_protocol=True)
    flow = FlowState(("198.51.100.7", 4000), b"\xcb\x00\x71\x01", 12, A, "mail/udp/*/53", 1.5, None)
    pumps = (
        PumpState((20, 21, 65536), 100, b"", False, False, 7),
        PumpState(None, 0, b"\x00tail", True, False, 9),
    )
    tcp = TcpState("mail/tcp/*/25", 14, 15, B, (A,), True, b"", 3600.0, 2.0, *pumps)
    connecting = TcpState(
        "mail/tcp/*/25", 16, None, None, (A, B), False, b"HDR", 60.0, 0.0, None, None
    )
    return Handover(
        generation=4,
        restarts=2,
        started=1700000000.5,
        routes=(route,),
        listeners=(ListenerState(route, 10, 3, "bound", (flow,)),),
        spare=(11,),
        control=5,
        control_owned=True,
        clients=(ClientState(13, b"", b"ok 4\n", True),),
        stats={"mail/tcp/*/25": RouteStats(3, 99).saved()},
        tcp=(tcp, connecting),
    )


def test_handover_round_trips_through_json() -> None:
    state = sample()
    text = json.dumps(state.to_json())
    assert Handover.from_json(json.loads(text)) == state
    assert sorted(state.fds()) == [5, 10, 11, 12, 13, 14, 15, 16, 20, 21]
    assert state.tcp[0].in_flight() == 100 + 5


def test_an_unknown_or_broken_handover_is_an_error_not_a_crash() -> None:
    doc = sample().to_json()
    with pytest.raises(HandoverError, match="handover version 3, 1, 2 known"):
        Handover.from_json({**doc, "version": 3})
    del doc["tcp"][0]["client"]
    with pytest.raises(HandoverError, match="KeyError"):
        Handover.from_json(doc)


def test_route_stats_survive_a_restart_but_live_counts_are_recounted() -> None:
    stats = RouteStats(5, 1000)
    stats.refused["route_max_tcp"] += 2
    stats.active, stats.flows, stats.backend_failures, stats.idle_closed = 3, 4, 1, 6
    stats.evicted = 2
    again = RouteStats.restored(json.loads(json.dumps(stats.saved())))
    assert again.to_json() == {**stats.to_json(), "active": 0, "udp_flows": 0}


# -- backend health ---------------------------------------------------------------------------


def test_a_failed_backend_goes_last_until_its_backoff_passes() -> None:
    health = Health()
    assert health.order([A, B, C], 0.0) == [A, B, C]
    health.failed(A, 10.0)
    assert health.order([A, B, C], 10.5) == [B, C, A]  # still a last resort
    assert health.order([A, B, C], 11.0) == [A, B, C]  # retried after 1 s
    health.failed(A, 11.0)
    assert health.order([A, B], 12.9) == [B, A]  # 2 s now
    assert health.order([A, B], 13.0) == [A, B]
    for _ in range(20):
        health.failed(A, 100.0)
    assert health.order([A, B], 100.0 + MAX_BACKOFF - 0.1) == [B, A]
    assert health.order([A, B], 100.0 + MAX_BACKOFF) == [A, B]
    assert health.backing_off(100.0) == [("172.17.0.2", 5025)]
    health.succeeded(A)
    assert health.order([A, B], 100.0) == [A, B]
    assert health.backing_off(100.0) == []


# -- admission ----------------------------------------------------------------------------------


def test_admission_checks_the_global_route_and_source_caps_in_that_order() -> None:
    rt = Runtime(splice=True, limits=Limits(max_tcp=5, max_udp_flows=3))
    limits = RouteLimits(route_max_tcp=3, source_max_tcp=2, route_max_udp_flows=2)
    assert rt.admit_tcp("r1", limits, "198.51.100.7") is None
    assert rt.admit_tcp("r1", limits, "198.51.100.7") is None
    assert rt.admit_tcp("r1", limits, "198.51.100.7") == "source_max_tcp"
    assert rt.admit_tcp("r1", limits, "198.51.100.8") is None
    assert rt.admit_tcp("r1", limits, "198.51.100.9") == "route_max_tcp"
    assert rt.admit_tcp("r2", limits, "198.51.100.9") is None
    assert rt.admit_tcp("r2", limits, "198.51.100.10") is None
    assert rt.admit_tcp("r2", limits, "198.51.100.11") == "max_tcp"
    rt.release("tcp", "r1", "198.51.100.7")
    assert rt.admit_tcp("r1", limits, "198.51.100.7") is None
    assert rt.stats["r1"].to_json()["refused"] == {"route_max_tcp": 1, "source_max_tcp": 1}
    assert rt.stats["r2"].refused == {"max_tcp": 1}
    assert (rt.tcp_open, rt.stats["r1"].active, rt.stats["r2"].active) == (5, 3, 2)
    assert rt.admit_udp("u", limits, "198.51.100.7") is None
    assert rt.admit_udp("u", limits, "198.51.100.8") is None
    assert rt.admit_udp("u", limits, "198.51.100.9") == "route_max_udp_flows"
    assert rt.stats["u"].flows == 2 and rt.udp_open == 2


def test_route_metrics_shape() -> None:
    stats = RouteStats(7, 700)
    stats.active, stats.flows = 2, 0
    stats.refused["no_backend"] += 1
    stats.evicted = 3
    doc = {"routes": [{"id": "mail/tcp/*/25", "app": "mail", **stats.to_json()}, "junk"]}
    assert route_metrics(doc) == {
        "mail/tcp/*/25": {
            "open_connections": 2,
            "udp_flows": 0,
            "refused": {"no_backend": 1},
            "connections": 7,
            "bytes": 700,
            "backend_failures": 0,
            "idle_closed": 0,
            "evicted": 3,
        }
    }
    assert route_metrics({}) == {}


# -- worker reports -------------------------------------------------------------------------------


def test_a_worker_report_carries_deltas_and_forgets_nothing_unsent() -> None:
    from natports.proxy.worker import WorkerRuntime, apply_report

    rt = WorkerRuntime(splice=True)
    rt.recount("tcp", "r", "198.51.100.7")
    rt.stats["r"].bytes += 100
    rt.release("tcp", "r", "198.51.100.7")
    report, seen = rt.report()
    assert report == {"closed": [("r", "198.51.100.7")], "stats": {"r": [100, 0, 0, {}]}}
    again, _ = rt.report()  # not committed (the send failed): the same report again
    assert again == report
    rt.commit(report, seen)
    rt.stats["r"].bytes += 5
    rt.stats["r"].refused["no_backend"] += 1
    report, seen = rt.report()
    assert report == {"closed": [], "stats": {"r": [5, 0, 0, {"no_backend": 1}]}}
    daemon: dict[str, RouteStats] = {}
    apply_report(daemon, json.loads(json.dumps(report)))
    apply_report(daemon, json.loads(json.dumps(report)))
    assert daemon["r"].bytes == 10 and daemon["r"].refused == {"no_backend": 2}


def test_workers_setting() -> None:
    from natports.proxy.limits import LimitsError, parse_limits

    assert parse_limits({}).workers == 0
    assert parse_limits({"proxy": {"workers": 3}}).workers == 3
    assert parse_limits({"proxy": {"workers": "auto"}}).workers >= 1
    with pytest.raises(LimitsError, match=r'proxy\.workers must be "auto" or 0-256, not -1'):
        parse_limits({"proxy": {"workers": -1}})


def test_a_handover_from_the_previous_version_is_taken_over() -> None:
    """Upgrading natports and reloading (SIGHUP) re-execs into the new code: v1 state."""
    v1 = {
        "version": 1,
        "generation": 3,
        "restarts": 1,
        "started": 1.0,
        "routes": [],
        "listeners": [],
        "spare": [],
        "control": {"fd": 5, "owned": True},
        "clients": [],
        "stats": {"mail/tcp/*/25": [4, 400]},
        "tcp": [
            {
                "route_id": "mail/tcp/*/25",
                "client": 7,
                "upstream": 8,
                "backend": A.to_json(),
                "candidates": [],
                "open": True,
                "c2u": {"pipe": [9, 10, 1048576], "pending": 3, "data": None, "eof": False,
                        "shut": False, "moved": 1},
                "u2c": {"pipe": None, "pending": 0, "data": "AAE=", "eof": True, "shut": False,
                        "moved": 2},
            }
        ],
    }  # fmt: skip
    state = Handover.from_json(v1)
    assert state.stats == {"mail/tcp/*/25": {"connections": 4, "bytes": 400}}
    conn = state.tcp[0]
    assert (conn.header, conn.idle, conn.idle_timeout) == (b"", 0.0, 3600.0)
    assert conn.c2u == PumpState((9, 10, 1048576), 3, b"", False, False, 1)
    assert conn.u2c == PumpState(None, 0, b"\x00\x01", True, False, 2)
    assert state.workers == ()
    assert RouteStats.restored(state.stats["mail/tcp/*/25"]).connections == 4
