"""The proxy with TCP worker processes (`[proxy] workers = 2`): same guarantees, more cores.

The daemon keeps the listeners and admits connections; workers relay them. A
restart must refuse nothing and cut nothing: old workers finish their
connections and exit, new ones take the new connections.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from natports.model import RouteKey
from natports.proxy.config import route_id
from tests.e2e.proxy_daemon import ProxyDaemon, start_proxy
from tests.e2e.test_proxy import (
    LOOPBACK,
    TCP,
    echo_backend,
    loopback_route,
    restart,
    route,
    send_all_read_all,
)
from tests.infra import ClientNet, Containers, wait_for

__all__ = ["start_proxy"]  # fixture

PORT = 26080  # public ports 26080..26089
WORKERS = "[proxy]\nworkers = 2\n"


def worker_pids(proxy: ProxyDaemon, draining: bool = False) -> list[int]:
    return [w["pid"] for w in proxy.status()["workers"] if w["draining"] is draining]


def test_workers_serve_and_restarts_refuse_and_cut_nothing(
    start_proxy: Callable[..., ProxyDaemon],
    client_net: ClientNet,
    containers: Containers,
    tmp_path: Path,
) -> None:
    proxy = start_proxy(settings=WORKERS)
    assert wait_for(lambda: len(worker_pids(proxy)) == 2)
    first = worker_pids(proxy)
    v1 = containers.start("v1")
    proxy.apply([route(client_net, PORT, v1)])
    held = client_net.hold(PORT)
    hammer = client_net.hammer(PORT, rate=150, max_seconds=120, stopfile=tmp_path / "stop")
    try:
        assert held.tag == "v1"
        for i in range(4):
            restart(proxy, "sighup" if i % 2 == 0 else "message")
            assert held.ask(f"after restart {i}") == f"v1 after restart {i}"
            time.sleep(0.5)
        report = hammer.stop()
    finally:
        hammer.kill()
        held.close()
    assert report["failures"] == [], proxy.log()
    assert report["rate"] >= 100, report
    serving = worker_pids(proxy)
    assert len(serving) == 2 and not set(serving) & set(first)  # fresh workers after restarts
    # The held connection lived in a worker of the first generation: it drained and left.
    assert wait_for(lambda: worker_pids(proxy, draining=True) == [], timeout=15), proxy.status()
    rid = route_id(route(client_net, PORT, v1))
    assert wait_for(lambda: proxy.route_status(rid)["active"] == 0, timeout=5)
    assert proxy.route_status(rid)["connections"] >= report["attempts"] + 1


def test_bulk_data_through_a_worker_is_byte_exact(
    start_proxy: Callable[..., ProxyDaemon],
) -> None:
    proxy = start_proxy(settings=WORKERS)
    with echo_backend() as backend:
        proxy.apply([loopback_route("bulk", RouteKey(4, TCP, PORT + 1, LOOPBACK), backend)])
        payload = os.urandom(32 << 20)
        received = send_all_read_all(PORT + 1, payload)
    echoed, _, trailer = received.partition(b"DIGEST ")
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert trailer.decode().strip() == hashlib.sha256(payload).hexdigest()
    rid = f"bulk/tcp/127.0.0.1/{PORT + 1}"
    assert wait_for(lambda: proxy.route_status(rid)["bytes"] >= 2 * len(payload), timeout=5)


def test_caps_hold_across_workers_and_slots_come_back(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet, containers: Containers
) -> None:
    proxy = start_proxy(settings=WORKERS + "route_max_tcp = 5\n")
    v1 = containers.start("v1")
    r = route(client_net, PORT + 2, v1)
    proxy.apply([r])
    held = [client_net.hold(PORT + 2) for _ in range(5)]
    try:
        assert client_net.connect_once(PORT + 2)["error"].startswith("ConnectionResetError")
        row = proxy.route_status(route_id(r))
        assert row["active"] == 5 and row["refused"] == {"route_max_tcp": 1}, row
    finally:
        for flow in held:
            flow.close()
    assert wait_for(lambda: proxy.route_status(route_id(r))["active"] == 0, timeout=5)
    assert client_net.connect_once(PORT + 2) == {"tag": "v1"}
