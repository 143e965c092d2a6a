"""PROXY protocol v2 and backend health through the real daemon, from a client netns.

Backends are host-local sockets that record exactly what they received.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from ipaddress import ip_address

from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy import proxyproto
from natports.proxy.config import route_id
from tests.e2e.proxy_daemon import ProxyDaemon, start_proxy
from tests.infra import ClientNet, TagServer

__all__ = ["start_proxy"]  # fixture

PORT = 26070  # public ports 26070..26079
LOOPBACK = ip_address("127.0.0.1")

# Sends a payload (hex in argv) over TCP, half-closes, reads the answer; prints addresses.
TCP_CLIENT = """
import json, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
with socket.create_connection((host, port), timeout=10) as s:
    me = s.getsockname()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
print(json.dumps({"me": list(me), "answer": answer.decode()}))
"""

# Sends datagrams from one socket, reads one reply to each; prints its own address.
UDP_CLIENT = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(5)
    s.connect((host, port))
    answers = []
    for payload in sys.argv[3:]:
        s.send(bytes.fromhex(payload))
        answers.append(s.recv(65535).decode())
    print(json.dumps({"me": list(s.getsockname()), "answers": answers}))
"""

# Opens N connections one after the other; prints each greeting.
GREETINGS = """
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tags = []
for _ in range(n):
    with socket.create_connection((host, port), timeout=10) as s:
        tags.append(s.makefile("rb").readline().decode().strip())
print(json.dumps(tags))
"""


def run_in(net: ClientNet, script: str, *args: object) -> object:
    argv = ["ip", "netns", "exec", net.ns, sys.executable, "-c", script, *map(str, args)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def pp_route(net: ClientNet, port: int, proto: Protocol, backend_port: int) -> Route:
    key = RouteKey(4, proto, port, ip_address(net.host_ip))
    backend = Backend("pp", LOOPBACK, backend_port)
    return Route("pp", "web", key, backend_port, (backend,), proxy_protocol=True)


def test_tcp_backend_reads_a_v2_header_then_the_exact_payload(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    proxy = start_proxy()
    received = bytearray()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1 << 16):
                    received.extend(data)
                conn.sendall(b"got it")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        proxy.apply([pp_route(client_net, PORT, Protocol.TCP, server.getsockname()[1])])
        payload = os.urandom(48 * 1024)
        result = run_in(client_net, TCP_CLIENT, client_net.host_ip, PORT, payload.hex())
        thread.join(10)
    assert isinstance(result, dict)
    assert result["answer"] == "got it"  # the reply comes back without any header
    family, source, destination, rest = proxyproto.parse(bytes(received))
    assert family == proxyproto.TCP4
    assert source == (client_net.client_ip, result["me"][1])
    assert destination == (client_net.host_ip, PORT)
    assert rest == payload


def test_udp_backend_reads_a_v2_header_in_every_datagram(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    proxy = start_proxy()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(10)
        got: list[bytes] = []

        def serve() -> None:
            for _ in range(3):
                data, peer = server.recvfrom(65535)
                got.append(data)
                server.sendto(f"reply {len(got)}".encode(), peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        proxy.apply([pp_route(client_net, PORT + 1, Protocol.UDP, server.getsockname()[1])])
        payloads = [b"first", os.urandom(1200), b"\x00"]
        result = run_in(
            client_net, UDP_CLIENT, client_net.host_ip, PORT + 1, *(p.hex() for p in payloads)
        )
        thread.join(10)
    assert isinstance(result, dict)
    assert result["answers"] == ["reply 1", "reply 2", "reply 3"]
    for data, payload in zip(got, payloads, strict=True):
        family, source, destination, rest = proxyproto.parse(data)
        assert family == proxyproto.UDP4
        assert source == (client_net.client_ip, result["me"][1])
        assert destination == (client_net.host_ip, PORT + 1)
        assert rest == payload


def test_a_refusing_backend_is_skipped_and_retried_later(
    start_proxy: Callable[..., ProxyDaemon], client_net: ClientNet
) -> None:
    proxy = start_proxy()
    with socket.socket() as hole:  # a port nobody listens on: connections are refused
        hole.bind(("127.0.0.1", 0))
        dead = Backend("dead", LOOPBACK, hole.getsockname()[1])
        alive = TagServer("127.0.0.1", "alive")
        try:
            key = RouteKey(4, Protocol.TCP, PORT + 2, ip_address(client_net.host_ip))
            live = Backend("alive", LOOPBACK, alive.port)
            route = Route("two", "web", key, 5025, (dead, live))
            proxy.apply([route])
            tags = run_in(client_net, GREETINGS, client_net.host_ip, PORT + 2, 20)
        finally:
            alive.close()
        status = proxy.status()
    assert tags == ["alive"] * 20  # no client saw the dead backend
    row = proxy.route_status(route_id(route))
    # Round robin alone would have tried the dead one for every other connection (10).
    assert 1 <= row["backend_failures"] <= 2, row
    assert status["backends_backing_off"] == [f"127.0.0.1:{dead.port}"]
