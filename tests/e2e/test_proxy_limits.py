"""The proxy under abuse: caps, idle timeouts, fd exhaustion, from a client netns.

Backends are host-local sockets (a greeting server, an echo, a listener that never
accepts), so thousands of connections cost no container. Every count and wait is
bounded; every daemon, thread and client process ends with the test.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address

import pytest

from natports.errors import NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy.config import route_id
from natports.proxy.control import request
from natports.proxy.udp import EVICT_SILENCE
from tests.e2e.proxy_daemon import ProxyDaemon, start_proxy
from tests.infra import ClientNet, HeldFlow, TagServer, wait_for

__all__ = ["start_proxy"]  # fixture

PORT = 26050  # public ports 26050..26069 (test_proxy.py uses 26025..26046)
TCP, UDP = Protocol.TCP, Protocol.UDP
LOOPBACK = ip_address("127.0.0.1")

# Opens N connections at once and holds them until stdin closes; prints how many connected.
HOLD_MANY = """
import json, resource, selectors, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
socks, sel = [], selectors.DefaultSelector()
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    socks.append(s)
    sel.register(s, selectors.EVENT_WRITE)
connected, pending = 0, n
while pending:
    events = sel.select(10)
    if not events:
        break
    for key, _ in events:
        sel.unregister(key.fileobj)
        pending -= 1
        connected += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
print(json.dumps({"connected": connected}), flush=True)
sys.stdin.read()
"""

# Connects, reads the greeting line, prints the milliseconds it took.
TIMED_ONCE = """
import json, socket, sys, time
t = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    greeting = s.makefile("rb").readline().decode().strip()
print(json.dumps({"tag": greeting, "ms": (time.monotonic() - t) * 1000}))
"""

# Connects, then waits for the proxy's first word: data, an EOF, a reset, or nothing (hang).
# The reset may already be there when connect() looks (the handshake is the kernel's).
PROBE = """
import json, socket, sys, time
t = time.monotonic()
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.settimeout(float(sys.argv[3]))
    seen = "data" if s.recv(100) else "eof"
except ConnectionResetError:
    seen = "reset"
except TimeoutError:
    seen = "hang"
except OSError as exc:
    seen = repr(exc)
print(json.dumps({"seen": seen, "ms": (time.monotonic() - t) * 1000}))
"""

# One datagram from each of N distinct source ports (bound explicitly), paced.
UDP_SPRAY = """
import socket, sys, time
host, port, n, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", first + i))
        s.sendto(b"spray", (host, port))
    if i % 50 == 49:
        time.sleep(0.005)
"""


def in_netns(net: ClientNet, script: str, *args: object) -> list[str]:
    return ["ip", "netns", "exec", net.ns, sys.executable, "-c", script, *map(str, args)]


@contextlib.contextmanager
def held_connections(net: ClientNet, port: int, count: int) -> Iterator[int]:
    proc = subprocess.Popen(
        in_netns(net, HOLD_MANY, net.host_ip, port, count),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the holding client died"
        yield int(json.loads(line)["connected"])
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def timed_once(net: ClientNet, port: int) -> dict[str, object]:
    out = subprocess.run(
        in_netns(net, TIMED_ONCE, net.host_ip, port),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(out.stdout))


def probe(net: ClientNet, port: int, wait: float = 3.0) -> dict[str, object]:
    """What a new client sees first, and after how many ms (from before its connect)."""
    out = subprocess.run(
        in_netns(net, PROBE, net.host_ip, port, wait),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(out.stdout))


@contextlib.contextmanager
def silent_listener() -> Iterator[socket.socket]:
    """A backend that completes handshakes (backlog) but never accepts nor sends."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4096)
        yield server


@contextlib.contextmanager
def tag_server(tag: str) -> Iterator[TagServer]:
    server = TagServer("127.0.0.1", tag)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def udp_echo(tag: str, ignore: bytes | None = None) -> Iterator[socket.socket]:
    """Answers `<tag> <datagram>`; never answers a datagram equal to `ignore`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if data != ignore:
                sock.sendto(f"{tag} ".encode() + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def local_route(net: ClientNet, app: str, port: int, backend_port: int, proto: Protocol) -> Route:
    key = RouteKey(4, proto, port, ip_address(net.host_ip))
    return Route(app, "web", key, backend_port, (Backend(app, LOOPBACK, backend_port),))


# -- TCP: a flood of idle connections on one app -----------------------------------------------


def test_idle_flood_is_capped_other_apps_answer_and_idle_ones_close(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    cap = 2000
    proxy: ProxyDaemon = start_proxy(
        settings=f"[proxy]\nroute_max_tcp = {cap}\nsource_max_tcp = 10000\ntcp_idle = 4\n"
    )
    with silent_listener() as idle_backend, tag_server("chat") as chat:
        flood = local_route(client_net, "flood", PORT, idle_backend.getsockname()[1], TCP)
        other = local_route(client_net, "chat", PORT + 1, chat.port, TCP)
        proxy.apply([flood, other])
        with held_connections(client_net, PORT, 3000) as connected:
            # Every handshake completes in the kernel's backlog, but a connection over the
            # cap may already be reset when the client looks: only the kept ones count here.
            assert connected >= cap
            rid = route_id(flood)
            assert wait_for(lambda: proxy.route_status(rid)["active"] == cap, timeout=20), (
                proxy.route_status(rid)
            )
            assert wait_for(
                lambda: proxy.route_status(rid)["refused"].get("route_max_tcp", 0) == 3000 - cap,
                timeout=20,
            ), proxy.route_status(rid)
            probes = [timed_once(client_net, PORT + 1) for _ in range(5)]
            assert all(p["tag"] == "chat" for p in probes), probes
            assert statistics.median(float(str(p["ms"])) for p in probes) < 100, probes
            # Nobody sends a byte: after tcp_idle (4 s) and a sweep they are closed.
            assert wait_for(lambda: proxy.route_status(rid)["active"] == 0, timeout=15)
            row = proxy.route_status(rid)
            assert row["idle_closed"] == cap, row
        assert proxy.status()["tcp_connections"] == 0
    metrics = proxy.backend.route_metrics()[rid]
    assert metrics["open_connections"] == 0
    assert metrics["refused"] == {"route_max_tcp": 3000 - cap}


def test_a_connection_over_the_cap_is_reset_at_once_not_left_hanging(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    """docs/proxy.md: over a cap "the client sees a reset, not a hang", seen from the client:
    its connect succeeds (the kernel's handshake), then its first read fails with
    ECONNRESET well within a second, neither an EOF nor silence."""
    proxy: ProxyDaemon = start_proxy(settings="[proxy]\nroute_max_tcp = 1\n")
    with tag_server("one") as one:
        web = local_route(client_net, "one", PORT + 12, one.port, TCP)
        proxy.apply([web])
        held = client_net.hold(PORT + 12)
        try:
            seen = [probe(client_net, PORT + 12) for _ in range(3)]
            assert all(p["seen"] == "reset" for p in seen), seen
            assert max(float(str(p["ms"])) for p in seen) < 1000, seen
            row = proxy.route_status(route_id(web))
            assert row["refused"] == {"route_max_tcp": 3} and row["active"] == 1, row
            assert held.ask("still") == "one still"
        finally:
            held.close()


# -- UDP: a spray from thousands of source ports -----------------------------------------------


def test_udp_spray_is_capped_host_keeps_ports_other_route_answers(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    cap = 1000
    proxy: ProxyDaemon = start_proxy(
        settings=f"[proxy]\nroute_max_udp_flows = {cap}\nsource_max_udp_flows = 100000\n"
    )
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink,
        udp_echo("dns2") as echo,
    ):
        sink.bind(("127.0.0.1", 0))  # a backend that never answers
        sprayed = local_route(client_net, "spray", PORT + 2, sink.getsockname()[1], UDP)
        other = local_route(client_net, "dns2", PORT + 3, echo.getsockname()[1], UDP)
        proxy.apply([sprayed, other])
        subprocess.run(
            in_netns(client_net, UDP_SPRAY, client_net.host_ip, PORT + 2, 5000, 20000),
            check=True,
            timeout=60,
        )
        rid = route_id(sprayed)
        assert wait_for(lambda: proxy.route_status(rid)["udp_flows"] == cap, timeout=10)
        time.sleep(0.5)
        row = proxy.route_status(rid)
        assert row["udp_flows"] == cap, row  # the cap holds
        assert row["refused"]["route_max_udp_flows"] >= 3000, row  # (a few may be dropped)
        # The host's ephemeral ports are not used up: outgoing UDP sockets still bind.
        outgoing = []
        try:
            for _ in range(200):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                outgoing.append(s)
                s.connect(("127.0.0.1", 9))  # binds an ephemeral port; nothing is sent
        finally:
            for s in outgoing:
                s.close()
        answer = client_net.client("udp", client_net.host_ip, str(PORT + 3), "still")
        assert answer == {"answer": "dns2 still"}
        assert proxy.route_status(route_id(other))["udp_flows"] == 1
    assert proxy.status()["udp_flows"] == cap + 1


def test_a_udp_cap_filled_by_an_unanswered_spray_gives_way_to_new_clients(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    """A spray the backend never answers fills the route's cap; once its flows have gone
    unanswered for EVICT_SILENCE, a new client takes the place of the oldest of them. A
    flow the backend answers is never the one that gives way."""
    cap = 20
    proxy: ProxyDaemon = start_proxy(
        settings=f"[proxy]\nroute_max_udp_flows = {cap}\nsource_max_udp_flows = 100000\n"
    )
    with udp_echo("game", ignore=b"spray") as echo:
        game = local_route(client_net, "game", PORT + 7, echo.getsockname()[1], UDP)
        proxy.apply([game])
        rid = route_id(game)
        answered = client_net.udp_hold(PORT + 7)
        try:
            assert answered.ask("hello") == "game hello"
            subprocess.run(
                in_netns(client_net, UDP_SPRAY, client_net.host_ip, PORT + 7, 100, 22000),
                check=True,
                timeout=60,
            )
            assert wait_for(lambda: proxy.route_status(rid)["udp_flows"] == cap)
            late = client_net.udp_hold(PORT + 7)
            try:
                assert late.ask("early") is None  # the spray is younger than EVICT_SILENCE
                time.sleep(EVICT_SILENCE)
                assert late.ask("now") == "game now"  # the oldest unanswered flow gave way
            finally:
                late.close()
            assert answered.ask("still") == "game still"
            row = proxy.route_status(rid)
            assert row["udp_flows"] == cap and row["evicted"] == 1, row
            assert row["refused"]["route_max_udp_flows"] >= 100 - cap, row
        finally:
            answered.close()


def test_per_source_caps(start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet) -> None:
    proxy: ProxyDaemon = start_proxy(
        settings="[proxy]\nsource_max_tcp = 10\nsource_max_udp_flows = 20\n"
    )
    with (
        silent_listener() as idle_backend,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink,
    ):
        sink.bind(("127.0.0.1", 0))
        tcp = local_route(client_net, "one", PORT + 4, idle_backend.getsockname()[1], TCP)
        udp = local_route(client_net, "one", PORT + 4, sink.getsockname()[1], UDP)
        proxy.apply([tcp, udp])
        with held_connections(client_net, PORT + 4, 30):
            assert wait_for(
                lambda: proxy.route_status(route_id(tcp))["refused"].get("source_max_tcp") == 20
            ), proxy.route_status(route_id(tcp))
            assert proxy.route_status(route_id(tcp))["active"] == 10
        subprocess.run(
            in_netns(client_net, UDP_SPRAY, client_net.host_ip, PORT + 4, 50, 21000),
            check=True,
            timeout=60,
        )
        row = proxy.route_status(route_id(udp))
        assert row["udp_flows"] == 20 and row["refused"]["source_max_udp_flows"] == 30, row


# -- out of file descriptors ----------------------------------------------------------------------


def test_out_of_fds_pauses_without_spinning_and_recovers(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    proxy: ProxyDaemon = start_proxy(
        settings="[proxy]\nmax_tcp = 100000\nroute_max_tcp = 100000\nsource_max_tcp = 100000\n",
        nofile=256,
    )
    with tag_server("ok") as ok:
        idle_backend = socket.socket()
        try:
            idle_backend.bind(("127.0.0.1", 0))
            idle_backend.listen(4096)
            flood = local_route(client_net, "flood", PORT + 5, idle_backend.getsockname()[1], TCP)
            good = local_route(client_net, "good", PORT + 6, ok.port, TCP)
            proxy.apply([flood, good])
            with held_connections(client_net, PORT + 5, 400):
                assert wait_for(lambda: "out of file descriptors" in proxy.log(), timeout=10)
                time.sleep(1.0)
                before, started = proxy.cpu_seconds(), time.monotonic()
                time.sleep(3.0)
                busy = (proxy.cpu_seconds() - before) / (time.monotonic() - started)
                assert busy < 0.20, f"{busy:.0%} of a core while out of fds"
                status = proxy.status()  # the control socket still answers (reserved fd)
                assert 50 < status["tcp_connections"] < 200, status["tcp_connections"]
                idle_backend.close()  # the backend goes away, the client too: fds free up
        finally:
            idle_backend.close()
        assert wait_for(lambda: proxy.status()["tcp_connections"] == 0, timeout=20)
        assert wait_for(lambda: timed_once(client_net, PORT + 6)["tag"] == "ok", timeout=10)
    assert proxy.log().count("out of file descriptors") == 1, proxy.log()


# -- reload: the limits are read again, a bad section changes nothing ----------------------------


def test_a_reload_applies_new_limits_and_a_refused_one_keeps_the_old(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    """docs/proxy.md: the daemon reads `[proxy]` again on every reload; a bad section refuses
    the reload and the old limits stay. Reloads go the way `natports apply` sends them
    (ProxyBackend.run: write the routes, `reload` on the control socket). Every cap is
    measured with connections; the connections held throughout are never cut."""
    proxy: ProxyDaemon = start_proxy(settings="[proxy]\nroute_max_tcp = 2\n")
    with tag_server("app") as app:
        web = local_route(client_net, "app", PORT + 10, app.port, TCP)
        rid = route_id(web)
        proxy.apply([web])
        held: list[HeldFlow] = []
        refused = 0

        def over_the_cap(cap: int) -> None:
            """`cap` connections are held, the next is reset and counted."""
            nonlocal refused
            assert proxy.route_status(rid)["active"] == cap, proxy.route_status(rid)
            assert probe(client_net, PORT + 10)["seen"] == "reset"
            refused += 1
            assert proxy.route_status(rid)["refused"] == {"route_max_tcp": refused}

        def one_leaves_one_comes(cap: int) -> None:
            """Below the cap a new connection is served: the cap is not lower than `cap`."""
            held.pop().close()
            assert wait_for(lambda: proxy.route_status(rid)["active"] == cap - 1)
            held.append(client_net.hold(PORT + 10))
            over_the_cap(cap)

        try:
            held += [client_net.hold(PORT + 10) for _ in range(2)]
            over_the_cap(2)

            # (a) A changed, valid section is in force from the reload on.
            proxy.settings.write_text("[proxy]\nroute_max_tcp = 4\n")
            proxy.apply([web])
            assert proxy.status()["limits"]["route_max_tcp"] == 4
            held += [client_net.hold(PORT + 10) for _ in range(2)]
            over_the_cap(4)

            # (b) A bad section: the reload is refused (natports apply fails, the daemon
            # logs it), the generation and the cap stay.
            generation = proxy.status()["generation"]
            bad_sections = {
                "route_max_tcp = -1": "proxy.route_max_tcp must be a positive number, not -1",
                "route_max_tpc = 9": "proxy.route_max_tpc is not a known setting",
                "route_max_tcp = ": "Invalid value",  # not TOML at all
            }
            for section, why in bad_sections.items():
                proxy.settings.write_text(f"[proxy]\n{section}\n")
                with pytest.raises(NatportsError) as info:
                    proxy.apply([web])
                assert "the natports proxy refused" in info.value.message
                assert f"{proxy.settings}: " in info.value.message
                assert why in info.value.message
                status = proxy.status()
                assert status["generation"] == generation
                assert status["limits"]["route_max_tcp"] == 4
                over_the_cap(4)
            assert proxy.log().count("reload refused") == len(bad_sections), proxy.log()
            one_leaves_one_comes(4)

            # (c) A valid section with routes that cannot all listen: refused as a whole,
            # so the new limits (max_tcp = 2, fewer than are open) must not stay either.
            proxy.settings.write_text("[proxy]\nroute_max_tcp = 4\nmax_tcp = 2\n")
            blocked = local_route(client_net, "other", PORT + 11, app.port, TCP)
            with socket.socket() as squatter:
                squatter.bind((client_net.host_ip, PORT + 11))
                squatter.listen()
                with pytest.raises(NatportsError) as info:
                    proxy.apply([web, blocked])
            assert f"cannot listen on {client_net.host_ip}:{PORT + 11}/tcp" in info.value.message
            status = proxy.status()
            assert status["generation"] == generation
            assert status["limits"]["max_tcp"] == 20000, status["limits"]
            one_leaves_one_comes(4)

            # Established connections went through every reload untouched.
            answers = [flow.ask(f"still {i}") for i, flow in enumerate(held)]
            assert answers == [f"app still {i}" for i in range(len(held))]
        finally:
            for flow in held:
                flow.close()


def test_a_restart_with_a_bad_section_is_refused_and_cuts_nothing(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    """`systemctl reload natports-proxy` is SIGHUP: a re-exec, which reads `[proxy]` at start.
    With a bad section the new process could not start and every connection would be cut
    (and systemd's restarts would fail alike): the running process refuses the restart and
    keeps serving with its limits. Once the section is fixed, a restart applies it."""
    proxy: ProxyDaemon = start_proxy(settings="[proxy]\nroute_max_tcp = 1\n")
    with tag_server("app") as app:
        web = local_route(client_net, "app", PORT + 13, app.port, TCP)
        rid = route_id(web)
        proxy.apply([web])
        held = [client_net.hold(PORT + 13)]
        try:
            proxy.settings.write_text("[proxy]\nroute_max_tcp = -1\n")
            proxy.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "restart refused" in proxy.log()), proxy.log()
            reply = request(proxy.backend.socket_path, "restart", 10.0)
            assert reply.startswith("error ") and "route_max_tcp" in reply, reply
            assert proxy.proc.poll() is None and proxy.status()["restarts"] == 0
            assert held[0].ask("after") == "app after"
            assert probe(client_net, PORT + 13)["seen"] == "reset"  # the cap is still 1

            proxy.settings.write_text("[proxy]\nroute_max_tcp = 2\n")
            proxy.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: proxy.status()["restarts"] == 1), proxy.log()
            held.append(client_net.hold(PORT + 13))
            assert probe(client_net, PORT + 13)["seen"] == "reset"
            assert proxy.route_status(rid)["refused"] == {"route_max_tcp": 2}
            assert [flow.ask("end") for flow in held] == ["app end", "app end"]
        finally:
            for flow in held:
                flow.close()
