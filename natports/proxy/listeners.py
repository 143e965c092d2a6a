"""Public sockets: binding them, and the TCP listener that admits (or refuses) connections.

A listener's route may change under it on a reload; its socket never does, so a
reload refuses nothing. The UDP listener lives in udp.py.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path

from ..model import Backend, Protocol, Route, RouteKey
from . import proxyproto
from .config import describe_key, route_id
from .loop import IN, log
from .runtime import NO_BACKEND, NO_FDS, Runtime
from .tcp import TcpConn, reset, tune

ACCEPTS = 64  # accepts (or datagrams) per event: other sockets get their turn
LISTEN_BACKLOG = 4096
IP_FREEBIND = 15  # listen on a fixed address even before it is configured (boot order)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


class Listener:
    """A public address:port and the route its new flows follow."""

    def __init__(self, rt: Runtime, sock: socket.socket, route: Route, origin: str) -> None:
        self.rt = rt
        self.sock = sock
        self.fd = sock.fileno()
        self.key: RouteKey = route.key
        self.origin = origin  # bound | systemd | handover
        self.rr = 0
        self.route = route
        self.rid = route_id(route)
        self.stats = rt.stats_for(self.rid)
        self.limits = rt.limits.for_route(route)

    def set_route(self, route: Route) -> None:
        """New flows follow `route` from now on; existing ones keep what they have."""
        self.route = route
        self.rid = route_id(route)
        self.stats = self.rt.stats_for(self.rid)
        self.refresh_limits()

    def refresh_limits(self) -> None:
        self.limits = self.rt.limits.for_route(self.route)

    def candidates(self) -> list[Backend]:
        """Round robin, backends backing off after a failure moved to the end."""
        backends = self.route.backends
        if not backends:
            return []
        i = self.rr % len(backends)
        self.rr = i + 1
        return self.rt.health.order([*backends[i:], *backends[:i]], self.rt.loop.now)

    def start(self) -> None:
        raise NotImplementedError

    def retire(self) -> None:
        self.rt.remove_acceptor(self.fd)
        self.sock.close()

    def describe(self) -> str:
        return f"{describe_key(self.key)} ({self.rid})"


class TcpListener(Listener):
    def __init__(self, rt: Runtime, sock: socket.socket, route: Route, origin: str) -> None:
        super().__init__(rt, sock, route, origin)
        tune(sock)  # accepted sockets inherit TCP_NODELAY and keepalive from it

    def start(self) -> None:
        self.rt.add_acceptor(self.fd, self.on_event)

    def on_event(self, events: int) -> None:
        for _ in range(ACCEPTS):
            try:
                client, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in NO_FDS:  # the connection waits in the backlog meanwhile
                    self.rt.out_of_fds("accept", exc)
                    return
                self.rt.warn(f"accept {self.rid}", f"{self.describe()}: accept: {exc}")
                return
            self.serve(client, peer)

    def serve(self, client: socket.socket, peer: tuple[str, int]) -> None:
        client.setblocking(False)
        candidates = self.candidates()
        if not candidates:
            self.rt.refuse(self.rid, NO_BACKEND)
            reset(client)
            client.close()
            return
        source = str(peer[0])
        if self.rt.admit_tcp(self.rid, self.limits, source) is not None:
            reset(client)  # refused, and counted: the client sees a reset, not a hang
            client.close()
            return
        self.stats.connections += 1
        header = b""
        if self.route.proxy_protocol:
            header = proxyproto.header(peer, client.getsockname(), datagram=False)
        workers = self.rt.workers
        idle = self.limits.tcp_idle
        if workers is not None and workers.dispatch(
            client, self.rid, source, candidates, header, idle
        ):
            return
        conn = TcpConn(self.rt, client, self.rid, source, candidates, header, self.limits.tcp_idle)
        conn.connect_next()

    def retire(self) -> None:
        """Serve the connections already in the accept queue, then stop listening."""
        self.on_event(IN)
        super().retire()


def bind_public(key: RouteKey) -> socket.socket:
    """A socket bound (and listening, for TCP) on the route's public address and port."""
    family = socket.AF_INET if key.family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if key.protocol is Protocol.TCP else socket.SOCK_DGRAM
    if key.public_ip is not None:
        host = str(key.public_ip)
    else:
        host = "0.0.0.0" if key.family == 4 else "::"
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if key.public_ip is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((host, key.public_port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    log.info("listening on %s", describe_key(key))
    return sock


def listen_failure(key: RouteKey, exc: OSError) -> str:
    """Why a public port cannot be bound, with the usual cause when it is an ephemeral port."""
    message = f"cannot listen on {describe_key(key)}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        low, high = ephemeral_port_range()
        if low <= key.public_port <= high:
            message += (
                f" (port {key.public_port} is in net.ipv4.ip_local_port_range {low}-{high},"
                " where the kernel picks source ports of outgoing connections and Docker"
                " the host ports it publishes: choose a public port outside it)"
            )
    return message


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path(EPHEMERAL_RANGE_FILE).read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # the kernel's default
