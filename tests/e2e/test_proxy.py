"""The userspace proxy as a real daemon: real sockets, real containers, a client netns.

Each test starts `python -m natports.proxy` with its own state directory and
kills it (and everything else it made) at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from natports.backends.proxy import HINT, ProxyBackend
from natports.errors import NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy.config import parse_config, render_config, write_atomically
from natports.proxy.control import request
from tests.e2e.proxy_daemon import ProxyDaemon, answers, proxy, start_proxy
from tests.infra import ClientNet, Container, Containers, wait_for

__all__ = ["proxy", "start_proxy"]  # fixtures

PORT = 26025  # public ports 26025..26046: below the ephemeral range, no host service involved
TCP, UDP = Protocol.TCP, Protocol.UDP
LOOPBACK = ip_address("127.0.0.1")


def route(
    net: ClientNet, port: int, *containers: Container, app: str = "mail", protocol: Protocol = TCP
) -> Route:
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(4, protocol, port, ip_address(net.host_ip)),
        private_port=5025,
        backends=tuple(Backend(c.id, ip_address(c.ip), 5025) for c in containers),
    )


def restart(daemon: ProxyDaemon, how: str) -> None:
    """Re-exec the daemon (SIGHUP or the control message) and wait until the new one serves."""
    before = daemon.status()["restarts"]
    if how == "sighup":
        daemon.proc.send_signal(signal.SIGHUP)
    else:
        assert request(daemon.backend.socket_path, "restart", 10.0).startswith("ok")
    assert wait_for(lambda: _restarts(daemon) == before + 1), daemon.log()
    assert daemon.status()["pid"] == daemon.proc.pid  # in place: systemd's MAINPID stays


def _restarts(daemon: ProxyDaemon) -> int | None:
    try:
        return int(daemon.status()["restarts"])
    except (NatportsError, OSError):
        return None


# -- TCP ---------------------------------------------------------------------------------------


def test_old_flow_keeps_its_backend_and_new_flows_switch(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    v1 = containers.start("v1")
    proxy.apply([route(client_net, PORT, v1)])
    held = client_net.hold(PORT)
    try:
        assert held.tag == "v1"
        v2 = containers.start("v2")
        proxy.apply([route(client_net, PORT, v2)])
        for _ in range(20):  # every connection after the reload answered reaches v2
            assert client_net.connect_once(PORT) == {"tag": "v2"}
        assert held.ask("still there?") == "v1 still there?"
    finally:
        held.close()
    counters = proxy.backend.counters()
    connections, nbytes = counters[
        "mail/tcp/198.18.77.1/26025".replace("77", _net_index(client_net))
    ]
    assert connections == 21
    assert nbytes > 0


def _net_index(net: ClientNet) -> str:
    return net.host_ip.split(".")[2]


def test_round_robin_over_several_backends(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    web = [containers.start(f"w{i}") for i in range(3)]
    proxy.apply([route(client_net, PORT + 1, *web)])
    seen = [client_net.connect_once(PORT + 1)["tag"] for _ in range(6)]
    assert sorted(seen) == ["w0", "w0", "w1", "w1", "w2", "w2"]


def test_zero_failed_connects_across_reloads(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers, tmp_path: Path
) -> None:
    releases = [containers.start(f"r{i}") for i in range(3)]
    proxy.apply([route(client_net, PORT + 2, releases[0])])
    hammer = client_net.hammer(PORT + 2, rate=150, max_seconds=120, stopfile=tmp_path / "stop")
    try:
        for reload in range(1, 13):
            proxy.apply([route(client_net, PORT + 2, releases[reload % 3])])
            assert client_net.connect_once(PORT + 2) == {"tag": f"r{reload % 3}"}
            time.sleep(0.25)
        report = hammer.stop()
    finally:
        hammer.kill()
    assert report["failures"] == [], proxy.log()
    assert report["rate"] >= 100, report
    assert set(report["tags"]) == {"r0", "r1", "r2"}, report
    assert proxy.status()["generation"] == 1 + 13  # start, then 13 reloads


def test_restart_refuses_nothing_and_keeps_established_flows(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers, tmp_path: Path
) -> None:
    v1, v2 = containers.start("v1"), containers.start("v2")
    proxy.apply([route(client_net, PORT + 3, v1)])
    held = client_net.hold(PORT + 3)
    hammer = client_net.hammer(PORT + 3, rate=150, max_seconds=120, stopfile=tmp_path / "stop")
    try:
        for i in range(6):
            restart(proxy, "sighup" if i % 2 == 0 else "message")
            assert held.ask(f"after restart {i}") == f"v1 after restart {i}"
            time.sleep(0.3)
        proxy.apply([route(client_net, PORT + 3, v2)])  # the restarted daemon still reloads
        restart(proxy, "sighup")
        assert client_net.connect_once(PORT + 3) == {"tag": "v2"}
        assert held.ask("last") == "v1 last"
        report = hammer.stop()
    finally:
        hammer.kill()
        held.close()
    assert report["failures"] == [], proxy.log()
    assert report["rate"] >= 100, report
    status = proxy.status()
    assert status["restarts"] == 7
    assert status["routes"][0]["connections"] >= report["attempts"]  # counters survived


def test_removed_route_stops_listening_and_added_route_starts(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    mail, chat, game = (containers.start(t) for t in ("mail", "chat", "game"))
    first = [route(client_net, PORT + 4, mail), route(client_net, PORT + 5, chat, app="chat")]
    proxy.apply(first)
    held = client_net.hold(PORT + 4)
    try:
        assert client_net.connect_once(PORT + 6)["error"].startswith("ConnectionRefusedError")
        proxy.apply([first[1], route(client_net, PORT + 6, game, app="game")])
        assert client_net.connect_once(PORT + 4)["error"].startswith("ConnectionRefusedError")
        assert client_net.connect_once(PORT + 5) == {"tag": "chat"}
        assert client_net.connect_once(PORT + 6) == {"tag": "game"}
        assert held.ask("finishing") == "mail finishing"  # established flows may finish
    finally:
        held.close()
    routes = {r["id"]: r for r in proxy.status()["routes"]}
    assert sorted(routes) == [
        f"chat/tcp/{client_net.host_ip}/{PORT + 5}",
        f"game/tcp/{client_net.host_ip}/{PORT + 6}",
    ]
    assert all(r["listening"] for r in routes.values())


def test_refused_reload_changes_nothing(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    v1, v2 = containers.start("v1"), containers.start("v2")
    good = [route(client_net, PORT + 7, v1)]
    proxy.apply(good)
    before = proxy.backend.config_path.read_text()
    with socket.socket() as squatter:  # someone else holds the port a new route wants
        squatter.bind((client_net.host_ip, PORT + 8))
        squatter.listen()
        with pytest.raises(NatportsError) as info:
            proxy.apply([route(client_net, PORT + 7, v2), route(client_net, PORT + 8, v2)])
    assert "refused the new routes" in info.value.message
    assert f"cannot listen on {client_net.host_ip}:{PORT + 8}/tcp" in info.value.message
    assert proxy.backend.config_path.read_text() == before
    assert client_net.connect_once(PORT + 7) == {"tag": "v1"}


def test_a_port_taken_in_the_ephemeral_range_is_explained(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    """The usual way a public port is found taken: the kernel gave it to someone as ephemeral."""
    v1 = containers.start("v1")
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    with socket.socket() as squatter:
        squatter.bind((client_net.host_ip, 0))  # the kernel picks from the ephemeral range
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(NatportsError) as info:
            proxy.apply([route(client_net, taken, v1)])
    assert f"cannot listen on {client_net.host_ip}:{taken}/tcp: Address already in use" in (
        info.value.message
    )
    assert f"is in net.ipv4.ip_local_port_range {low}-{high}" in info.value.message


def test_a_port_taken_outside_the_ephemeral_range_gets_no_ephemeral_hint(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    v1 = containers.start("v1")
    with socket.socket() as squatter:
        squatter.bind((client_net.host_ip, PORT + 21))
        squatter.listen()
        with pytest.raises(NatportsError) as info:
            proxy.apply([route(client_net, PORT + 21, v1)])
    assert f"cannot listen on {client_net.host_ip}:{PORT + 21}/tcp" in info.value.message
    assert "ip_local_port_range" not in info.value.message


@pytest.mark.parametrize("splice", ["1", "0"])
def test_bulk_data_both_ways_with_half_close(
    start_proxy: Callable[..., ProxyDaemon], splice: str
) -> None:
    """64 MiB each way, byte exact; the backend answers only after the client's FIN."""
    proxy = start_proxy({"NATPORTS_PROXY_SPLICE": splice})
    assert proxy.status()["splice"] is (splice == "1")
    with echo_backend() as backend:
        proxy.apply([loopback_route("bulk", RouteKey(4, TCP, PORT + 9, LOOPBACK), backend)])
        payload = os.urandom(64 << 20)
        received = send_all_read_all(PORT + 9, payload)
    echoed, _, trailer = received.partition(b"DIGEST ")
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert trailer.decode().strip() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("splice", ["1", "0"])
def test_restarts_during_a_transfer_lose_no_byte(
    start_proxy: Callable[..., ProxyDaemon], splice: str
) -> None:
    """Pipes and buffers with data in them are handed over with the sockets."""
    proxy = start_proxy({"NATPORTS_PROXY_SPLICE": splice})
    with echo_backend(pause=0.002) as backend:
        proxy.apply([loopback_route("bulk", RouteKey(4, TCP, PORT + 15, LOOPBACK), backend)])
        chunks = [os.urandom(256 * 1024) for _ in range(160)]
        with socket.create_connection(("127.0.0.1", PORT + 15), timeout=30) as client:
            received = bytearray()
            reader = threading.Thread(target=_read_all, args=(client, received), daemon=True)
            reader.start()
            writer = threading.Thread(target=_send_all, args=(client, chunks), daemon=True)
            writer.start()
            restarts = 0
            while writer.is_alive() and restarts < 6:
                restart(proxy, "sighup")
                restarts += 1
            writer.join(60)
            reader.join(60)
    assert restarts >= 3
    assert re.search(r"[1-9][0-9]* bytes in flight handed over", proxy.log()), proxy.log()
    payload = b"".join(chunks)
    echoed, _, trailer = bytes(received).partition(b"DIGEST ")
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert trailer.decode().strip() == hashlib.sha256(payload).hexdigest()


def _send_all(sock: socket.socket, chunks: list[bytes]) -> None:
    for chunk in chunks:
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)


def test_ipv6_listener(start_proxy: Callable[..., ProxyDaemon]) -> None:
    """A family-6 route listens on an IPv6 address (V6ONLY); any backend family works."""
    proxy = start_proxy()
    with echo_backend() as backend:
        six = RouteKey(6, TCP, PORT + 14, ip_address("::1"))
        proxy.apply([loopback_route("six", six, backend)])
        with socket.create_connection(("::1", PORT + 14), timeout=10) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            received = bytearray()
            _read_all(client, received)
    assert bytes(received).startswith(b"helloDIGEST ")
    assert proxy.backend.counters()[f"six/tcp6/::1/{PORT + 14}"][0] == 1


@contextlib.contextmanager
def echo_backend(pause: float = 0.0) -> Iterator[Backend]:
    """A one-connection backend on loopback that echoes, then sends the digest of it all."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(target=_echo_then_digest, args=(server, pause), daemon=True).start()
        yield Backend("local", LOOPBACK, server.getsockname()[1])


def loopback_route(app: str, key: RouteKey, backend: Backend) -> Route:
    return Route(app, "web", key, backend.port, (backend,))


def _echo_then_digest(server: socket.socket, pause: float = 0.0) -> None:
    """Echo everything, then the digest of it once the client's FIN arrived."""
    conn, _ = server.accept()
    with conn:
        digest = hashlib.sha256()
        while data := conn.recv(64 * 1024 if pause else 1 << 20):
            digest.update(data)
            conn.sendall(data)
            time.sleep(pause)  # a slow backend: the proxy's pipes fill up
        conn.sendall(f"DIGEST {digest.hexdigest()}\n".encode())


def _read_all(sock: socket.socket, into: bytearray) -> None:
    while data := sock.recv(1 << 20):
        into += data


def send_all_read_all(port: int, payload: bytes) -> bytes:
    """Send `payload` to 127.0.0.1:port, half-close, and read everything until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        received = bytearray()
        reader = threading.Thread(target=_read_all, args=(client, received), daemon=True)
        reader.start()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reader.join(60)
    return bytes(received)


# -- UDP ---------------------------------------------------------------------------------------


def test_udp_flow_keeps_its_backend_across_reload_and_restart(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    v1 = containers.start("v1")
    proxy.apply([route(client_net, PORT + 10, v1, app="dns", protocol=UDP)])
    old = client_net.udp_hold(PORT + 10)
    try:
        assert wait_for(lambda: old.ask("a")) == "v1 a"  # echod may still be binding
        v2 = containers.start("v2")
        proxy.apply([route(client_net, PORT + 10, v2, app="dns", protocol=UDP)])
        assert old.ask("b") == "v1 b"  # same source port: same flow, old backend
        assert client_net.client("udp", client_net.host_ip, str(PORT + 10), "c") == {
            "answer": "v2 c"
        }
        restart(proxy, "sighup")
        assert old.ask("d") == "v1 d"  # the flow was handed over too
        assert proxy.status()["udp_flows"] == 2
        # When the old backend goes away, the flow moves to the current one.
        containers.stop(v1.id, timeout=1)
        answers = [old.ask("e") for _ in range(8)]
        assert "v2 e" in answers, answers
    finally:
        old.close()


def test_udp_flow_ends_when_idle(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet, containers: Containers
) -> None:
    proxy = start_proxy({"NATPORTS_PROXY_UDP_IDLE": "1"})
    v1, v2 = containers.start("v1"), containers.start("v2")
    proxy.apply([route(client_net, PORT + 11, v1, app="dns", protocol=UDP)])
    client = client_net.udp_hold(PORT + 11)
    try:
        assert wait_for(lambda: client.ask("a")) == "v1 a"
        proxy.apply([route(client_net, PORT + 11, v2, app="dns", protocol=UDP)])
        assert client.ask("b") == "v1 b"
        assert wait_for(lambda: proxy.status()["udp_flows"] == 0, timeout=5)
        assert client.ask("c") == "v2 c"  # a new flow after the idle timeout
    finally:
        client.close()


def test_udp_on_all_addresses_answers_from_the_address_asked(
    proxy: ProxyDaemon, client_net: ClientNet, containers: Containers
) -> None:
    v1 = containers.start("v1")
    wildcard = Route(
        "dns", "web", RouteKey(4, UDP, PORT + 12), 5025, (Backend(v1.id, ip_address(v1.ip), 5025),)
    )
    proxy.apply([wildcard])
    client = client_net.udp_hold(PORT + 12)  # connected: drops answers from other sources
    try:
        assert wait_for(lambda: client.ask("x")) == "v1 x"
    finally:
        client.close()


# -- start-up, control, errors ------------------------------------------------------------------


def test_systemd_socket_activation(
    tmp_path: Path, client_net: ClientNet, containers: Containers
) -> None:
    """The daemon serves a listening socket it inherited (fd 3, LISTEN_FDS=1), not its own."""
    v1 = containers.start("v1")
    state = tmp_path / "state"
    write_atomically(state / "proxy.json", render_config([route(client_net, PORT + 13, v1)]))
    launcher = (
        "import os, socket, sys\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(({client_net.host_ip!r}, {PORT + 13}))\n"
        "s.listen(16)\n"
        "if s.fileno() != 3:\n"
        "    os.dup2(s.fileno(), 3)\n"
        "os.set_inheritable(3, True)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'natports.proxy', '--state-dir', "
        f"{str(state)!r}])\n"
    )
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-c", launcher], stderr=log)
    try:
        backend = ProxyBackend(state)
        assert wait_for(lambda: answers(backend.socket_path)), (tmp_path / "proxy.log").read_text()
        assert client_net.connect_once(PORT + 13) == {"tag": "v1"}
        status = backend.status()
        assert status is not None
        assert status["routes"][0]["origin"] == "systemd", status
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_a_second_daemon_on_the_same_state_refuses_to_start(proxy: ProxyDaemon) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "natports.proxy", "--state-dir", str(proxy.state)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "a natports proxy is already running" in second.stderr
    assert request(proxy.backend.socket_path, "ping", 5.0).startswith("ok")


def test_control_socket_is_private_and_answers_commands(proxy: ProxyDaemon) -> None:
    sock = proxy.backend.socket_path
    assert sock.stat().st_mode & 0o777 == 0o600
    assert request(sock, "bogus", 5.0).startswith("error unknown command")
    status = json.loads(request(sock, "status", 5.0))
    assert status["pid"] == proxy.proc.pid and status["routes"] == []
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert not sock.exists()  # a clean stop removes the socket


def test_run_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    backend = ProxyBackend(tmp_path)
    batch = backend.plan_reconcile([])
    with pytest.raises(NatportsError) as info:
        backend.run(batch)
    assert info.value.message == "no natports proxy is running"
    assert info.value.hint == HINT
    assert not backend.config_path.exists()  # nothing changed
    # A stale socket file (its daemon died) reads the same.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(backend.socket_path))
    stale.close()
    write_atomically(backend.config_path, render_config([]))
    with pytest.raises(NatportsError, match="no natports proxy is running"):
        backend.run(render_config(parse_config(batch)))
    assert backend.counters() == {}


def test_run_times_out_when_the_daemon_does_not_answer(tmp_path: Path) -> None:
    backend = ProxyBackend(tmp_path, timeout=0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(backend.socket_path))
        mute.listen()
        with pytest.raises(NatportsError) as info:
            backend.run(backend.plan_reconcile([]))
    assert info.value.message == "the natports proxy did not confirm the reload within 0.5 s"
    assert info.value.hint == HINT
    assert ProxyBackend(tmp_path).timeout == 10.0
