"""Moving bytes: TCP connections (splice through a pipe) and UDP flows, on one epoll loop.

One thread does everything, so the state a restart hands over is always
consistent: between two events no syscall is half done. TCP data never enters
Python: os.splice moves it socket -> pipe -> socket inside the kernel; a plain
recv/send copy is the fallback where splice is missing or refused.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..model import Backend, Route, RouteKey, host_text
from .config import describe_key, route_id
from .inherit import adopt_socket

log = logging.getLogger("natports.proxy")

PIPE_SIZE = 1 << 20  # big pipes: fewer, larger splices (F_SETPIPE_SZ; the default is 64 KiB)
COPY_SIZE = 256 * 1024
ROUNDS = 16  # reads per pump before yielding to other connections
ACCEPTS = 64  # accepts (or datagrams) per event, for the same fairness
CONNECT_TIMEOUT = 5.0
STALE_SILENCE = 3.0  # seconds a replaced UDP backend may leave a client unanswered
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
UNSPLICEABLE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python < 3.12 lacks these Linux constants
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
IN, OUT, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
EDGE = IN | OUT | select.EPOLLET  # connection sockets: registered once, never modified
LINGER_RESET = struct.pack("ii", 1, 0)

BLOCKED, AGAIN, DONE = 0, 1, 2

Handler = Callable[[int], None]


class Stats:
    """Per route id; survives reloads and restarts."""

    __slots__ = ("active", "bytes", "connections")

    def __init__(self, connections: int = 0, nbytes: int = 0) -> None:
        self.connections = connections
        self.bytes = nbytes
        self.active = 0


class Loop:
    """epoll plus a queue of pumps that still had work when they yielded."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.ready: deque[tuple[TcpConn, Pump]] = deque()

    def add(self, fd: int, handler: Handler, mask: int) -> None:
        self.epoll.register(fd, mask)
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def poll(self, timeout: float) -> None:
        if self.ready:
            timeout = 0
        for fd, events in self.epoll.poll(timeout):
            handler = self.handlers.get(fd)
            if handler is None:
                continue
            try:
                handler(events)
            except Exception:  # a bug in one flow must not take every other flow down
                log.exception("internal error on fd %d", fd)
        for _ in range(len(self.ready)):
            conn, pump = self.ready.popleft()
            try:
                conn.run(pump)
            except Exception:
                log.exception("internal error in %s", conn.rid)


class Relay:
    """What listeners, connections and flows share."""

    def __init__(self, splice: bool) -> None:
        self.loop = Loop()
        self.splice = splice
        self.stats: dict[str, Stats] = {}
        self.conns: set[TcpConn] = set()
        self.connecting: set[TcpConn] = set()
        self._warned: dict[str, float] = {}

    def stats_for(self, rid: str) -> Stats:
        stats = self.stats.get(rid)
        if stats is None:
            stats = self.stats[rid] = Stats()
        return stats

    def warn(self, topic: str, message: str) -> None:
        """At most one line per topic every 10 s: a dead backend under load must not flood."""
        now = time.monotonic()
        if now - self._warned.get(topic, -1e9) >= 10:
            self._warned[topic] = now
            log.warning("%s", message)

    def tick(self, now: float) -> None:
        for conn in [c for c in self.connecting if c.deadline <= now]:
            conn.connect_failed(f"no answer within {CONNECT_TIMEOUT:g} s")


def backend_text(backend: Backend) -> str:
    return f"{host_text(backend.ip)}:{backend.port}"


def _family(backend: Backend) -> socket.AddressFamily:
    return socket.AF_INET6 if backend.ip.version == 6 else socket.AF_INET


def _reset(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def make_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe, grown to PIPE_SIZE when the kernel allows it."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over /proc/sys/fs/pipe-max-size or the user's pipe quota
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, size


class Pump:
    """One direction of a TCP connection: src -> (pipe or buffer) -> dst, then half-close."""

    __slots__ = (
        "buf",
        "dst",
        "dst_fd",
        "end",
        "eof",
        "moved",
        "pending",
        "pipe_r",
        "pipe_size",
        "pipe_w",
        "shut",
        "src",
        "src_fd",
        "start",
        "stats",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, stats: Stats, splice: bool) -> None:
        self.src, self.dst, self.stats = src, dst, stats
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.pipe_r = self.pipe_w = -1
        self.pipe_size = 0
        self.buf: bytearray | None = None
        self.start = self.end = self.pending = self.moved = 0
        self.eof = self.shut = False
        if splice:
            try:
                self.pipe_r, self.pipe_w, self.pipe_size = make_pipe()
            except OSError:  # out of fds for pipes: this connection copies instead
                self.buf = bytearray(COPY_SIZE)
        else:
            self.buf = bytearray(COPY_SIZE)

    @property
    def done(self) -> bool:
        return self.shut

    def run(self) -> int:
        """Move what can be moved now: BLOCKED (wait for an edge), AGAIN (yielded) or DONE."""
        if self.shut:
            return DONE
        return self._splice() if self.buf is None else self._copy()

    def _splice(self) -> int:
        for _ in range(ROUNDS):
            while self.pending:
                try:
                    moved = os.splice(self.pipe_r, self.dst_fd, self.pending, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    return BLOCKED
                if moved <= 0:
                    raise OSError(errno.EIO, "splice to the peer moved nothing")
                self.pending -= moved
                self.moved += moved
                self.stats.bytes += moved
            if self.eof:
                return self._finish()
            try:
                got = os.splice(self.src_fd, self.pipe_w, self.pipe_size, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return BLOCKED
            except OSError as exc:
                if exc.errno in UNSPLICEABLE and self.moved == 0:
                    self._to_copy()
                    return self._copy()
                raise
            if got == 0:
                self.eof = True
            self.pending = got
        return AGAIN

    def _to_copy(self) -> None:
        self.close_pipe()
        self.buf = bytearray(COPY_SIZE)

    def _copy(self) -> int:
        buf = self.buf
        assert buf is not None
        view = memoryview(buf)
        for _ in range(ROUNDS):
            while self.start < self.end:
                try:
                    sent = self.dst.send(view[self.start : self.end])
                except BlockingIOError:
                    return BLOCKED
                self.start += sent
                self.moved += sent
                self.stats.bytes += sent
            if self.eof:
                return self._finish()
            try:
                got = self.src.recv_into(buf)
            except BlockingIOError:
                return BLOCKED
            if got == 0:
                self.eof = True
            self.start, self.end = 0, got
        return AGAIN

    def _finish(self) -> int:
        """The source ended and everything it sent is delivered: pass the end on (FIN)."""
        with contextlib.suppress(OSError):  # ENOTCONN: the peer is gone already
            self.dst.shutdown(socket.SHUT_WR)
        self.shut = True
        self.close_pipe()
        return DONE

    def close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1

    # -- restart ----------------------------------------------------------------------------

    def fds(self) -> list[int]:
        return [fd for fd in (self.pipe_r, self.pipe_w) if fd >= 0]

    def snapshot(self) -> dict[str, Any]:
        data = None
        if self.buf is not None:
            data = base64.b64encode(bytes(self.buf[self.start : self.end])).decode()
        return {
            "pipe": [self.pipe_r, self.pipe_w, self.pipe_size] if self.pipe_r >= 0 else None,
            "pending": self.pending,
            "data": data,
            "eof": self.eof,
            "shut": self.shut,
            "moved": self.moved,
        }

    @classmethod
    def adopt(
        cls, src: socket.socket, dst: socket.socket, stats: Stats, state: dict[str, Any]
    ) -> Pump:
        pump = cls.__new__(cls)
        pump.src, pump.dst, pump.stats = src, dst, stats
        pump.src_fd, pump.dst_fd = src.fileno(), dst.fileno()
        pump.pipe_r = pump.pipe_w = -1
        pump.pipe_size = 0
        pump.buf = None
        pump.start = pump.end = 0
        pump.pending = int(state["pending"])
        pump.eof, pump.shut = bool(state["eof"]), bool(state["shut"])
        pump.moved = int(state["moved"])
        if state["pipe"] is not None:
            pump.pipe_r, pump.pipe_w, pump.pipe_size = (int(v) for v in state["pipe"])
            for fd in (pump.pipe_r, pump.pipe_w):
                os.set_inheritable(fd, False)
        elif not pump.shut:
            data = base64.b64decode(state["data"] or "")
            pump.buf = bytearray(max(COPY_SIZE, len(data)))
            pump.buf[: len(data)] = data
            pump.end = len(data)
        return pump


class TcpConn:
    """A client connection and its upstream: the backend is chosen once, at accept."""

    CONNECTING, OPEN, CLOSED = 0, 1, 2

    def __init__(
        self,
        relay: Relay,
        client: socket.socket,
        rid: str,
        stats: Stats,
        candidates: list[Backend],
    ) -> None:
        self.relay = relay
        self.client = client
        self.client_fd = client.fileno()
        self.rid = rid
        self.stats = stats
        self.candidates = candidates
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.backend: Backend | None = None
        self.deadline = 0.0
        self.c2u: Pump | None = None
        self.u2c: Pump | None = None
        self.state = TcpConn.CONNECTING
        stats.active += 1
        relay.conns.add(self)
        relay.loop.add(self.client_fd, self.on_client, EDGE)

    # -- connecting -----------------------------------------------------------------------

    def connect_next(self) -> None:
        while self.candidates:
            backend = self.candidates.pop(0)
            try:
                sock = socket.socket(_family(backend), socket.SOCK_STREAM)
            except OSError as exc:  # EMFILE and friends: this connection cannot be served
                self.relay.warn("socket", f"{self.rid}: cannot open a socket: {exc}")
                break
            _tune(sock)
            err = sock.connect_ex((str(backend.ip), backend.port))
            if err in (0, errno.EINPROGRESS):
                self.upstream, self.upstream_fd, self.backend = sock, sock.fileno(), backend
                self.deadline = time.monotonic() + CONNECT_TIMEOUT
                self.relay.connecting.add(self)
                self.relay.loop.add(self.upstream_fd, self.on_upstream, EDGE)
                return
            sock.close()
            self._warn_backend(backend, os.strerror(err))
        self.abort("no backend accepted the connection")

    def connect_failed(self, why: str) -> None:
        if self.backend is not None:
            self._warn_backend(self.backend, why)
        self._drop_upstream()
        self.connect_next()

    def _warn_backend(self, backend: Backend, why: str) -> None:
        text = backend_text(backend)
        self.relay.warn(f"{self.rid} {text}", f"{self.rid}: backend {text} failed: {why}")

    def _drop_upstream(self) -> None:
        self.relay.connecting.discard(self)
        if self.upstream is not None:
            self.relay.loop.remove(self.upstream_fd)
            self.upstream.close()
        self.upstream, self.upstream_fd, self.backend = None, -1, None

    def _connected(self) -> None:
        assert self.upstream is not None
        err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_failed(os.strerror(err))
            return
        try:
            self.upstream.getpeername()
        except OSError:
            return  # a stale event for a reused fd number: still connecting
        self.relay.connecting.discard(self)
        self.state = TcpConn.OPEN
        self.c2u = Pump(self.client, self.upstream, self.stats, self.relay.splice)
        self.u2c = Pump(self.upstream, self.client, self.stats, self.relay.splice)
        self.run(self.c2u)
        self.run(self.u2c)

    # -- events ---------------------------------------------------------------------------

    def on_client(self, events: int) -> None:
        if self.state == TcpConn.OPEN:
            assert self.c2u is not None and self.u2c is not None
            if events & (IN | ERR | HUP):
                self.run(self.c2u)
            if events & (OUT | ERR | HUP):
                self.run(self.u2c)
        elif self.state == TcpConn.CONNECTING and events & ERR:
            self.abort("the client went away while connecting")

    def on_upstream(self, events: int) -> None:
        if self.state == TcpConn.OPEN:
            assert self.c2u is not None and self.u2c is not None
            if events & (IN | ERR | HUP):
                self.run(self.u2c)
            if events & (OUT | ERR | HUP):
                self.run(self.c2u)
        elif self.state == TcpConn.CONNECTING:
            self._connected()

    def run(self, pump: Pump) -> None:
        if self.state != TcpConn.OPEN:
            return
        try:
            result = pump.run()
        except OSError as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
            return
        if result == AGAIN:
            self.relay.loop.ready.append((self, pump))
        elif result == DONE and self.c2u is not None and self.u2c is not None:
            both_ended = self.c2u.done and self.u2c.done
            if both_ended:
                self.close()

    # -- ending -----------------------------------------------------------------------------

    def abort(self, why: str) -> None:
        """An error on one side: reset the other too, so neither mistakes it for a clean end."""
        log.debug("%s: connection aborted: %s", self.rid, why)
        _reset(self.client)
        _reset(self.upstream)
        self.close()

    def close(self) -> None:
        if self.state == TcpConn.CLOSED:
            return
        self.state = TcpConn.CLOSED
        self.relay.conns.discard(self)
        self.relay.connecting.discard(self)
        self.stats.active -= 1
        self.relay.loop.remove(self.client_fd)
        self.client.close()
        if self.upstream is not None:
            self.relay.loop.remove(self.upstream_fd)
            self.upstream.close()
        for pump in (self.c2u, self.u2c):
            if pump is not None:
                pump.close_pipe()

    # -- restart ----------------------------------------------------------------------------

    def fds(self) -> list[int]:
        fds = [self.client_fd]
        if self.upstream is not None:
            fds.append(self.upstream_fd)
        for pump in (self.c2u, self.u2c):
            if pump is not None:
                fds += pump.fds()
        return fds

    def snapshot(self) -> dict[str, Any]:
        return {
            "route_id": self.rid,
            "client": self.client_fd,
            "upstream": self.upstream_fd if self.upstream is not None else None,
            "backend": None if self.backend is None else self.backend.to_json(),
            "candidates": [b.to_json() for b in self.candidates],
            "open": self.state == TcpConn.OPEN,
            "c2u": None if self.c2u is None else self.c2u.snapshot(),
            "u2c": None if self.u2c is None else self.u2c.snapshot(),
        }

    @classmethod
    def adopt(cls, relay: Relay, state: dict[str, Any]) -> TcpConn:
        """Take over a connection from the previous process, exactly where it was."""
        client = adopt_socket(int(state["client"]))
        rid = str(state["route_id"])
        candidates = [Backend.from_json(b) for b in state["candidates"]]
        conn = cls(relay, client, rid, relay.stats_for(rid), candidates)
        if state["upstream"] is None:
            conn.connect_next()
            return conn
        conn.upstream = adopt_socket(int(state["upstream"]))
        conn.upstream_fd = conn.upstream.fileno()
        conn.backend = Backend.from_json(state["backend"])
        relay.loop.add(conn.upstream_fd, conn.on_upstream, EDGE)
        if not state["open"]:
            conn.deadline = time.monotonic() + CONNECT_TIMEOUT
            relay.connecting.add(conn)
            conn._connected()  # the handshake may have finished during the exec
            return conn
        conn.state = TcpConn.OPEN
        conn.c2u = Pump.adopt(client, conn.upstream, conn.stats, state["c2u"])
        conn.u2c = Pump.adopt(conn.upstream, client, conn.stats, state["u2c"])
        # Edges that fired before the exec are gone: look at both directions now.
        relay.loop.ready.append((conn, conn.c2u))
        relay.loop.ready.append((conn, conn.u2c))
        return conn


# -- listeners ------------------------------------------------------------------------------


class Listener:
    """A public address:port; its route may change under it (reload), its socket never."""

    def __init__(self, relay: Relay, sock: socket.socket, route: Route, origin: str) -> None:
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.key: RouteKey = route.key
        self.origin = origin  # bound | systemd | handover
        self.rr = 0
        self.route = route
        self.rid = route_id(route)
        self.stats = relay.stats_for(self.rid)

    def set_route(self, route: Route) -> None:
        """New flows follow `route` from now on; existing ones keep what they have."""
        self.route = route
        self.rid = route_id(route)
        self.stats = self.relay.stats_for(self.rid)

    def candidates(self) -> list[Backend]:
        """Round robin: each new flow starts at the next backend, the others are fallbacks."""
        backends = self.route.backends
        if not backends:
            return []
        i = self.rr % len(backends)
        self.rr = i + 1
        return [*backends[i:], *backends[:i]]

    def start(self) -> None:
        self.relay.loop.add(self.fd, self.on_event, IN)

    def on_event(self, events: int) -> None:
        raise NotImplementedError

    def retire(self) -> None:
        self.relay.loop.remove(self.fd)
        self.sock.close()

    def describe(self) -> str:
        return f"{describe_key(self.key)} ({self.rid})"


class TcpListener(Listener):
    def on_event(self, events: int) -> None:
        for _ in range(ACCEPTS):
            try:
                client, _peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                self.relay.warn(f"accept {self.rid}", f"{self.describe()}: accept: {exc}")
                return  # EMFILE and the like: level-triggered, so we come back next round
            self.serve(client)

    def serve(self, client: socket.socket) -> None:
        _tune(client)
        candidates = self.candidates()
        self.stats.connections += 1
        if not candidates:
            self.relay.warn(f"empty {self.rid}", f"{self.describe()}: no backend, refusing")
            _reset(client)
            client.close()
            return
        TcpConn(self.relay, client, self.rid, self.stats, candidates).connect_next()

    def retire(self) -> None:
        """Serve the connections already in the accept queue, then stop listening."""
        self.on_event(IN)
        super().retire()


class UdpFlow:
    """One client address of one UDP listener, with its own upstream socket (its backend)."""

    def __init__(
        self,
        listener: UdpListener,
        client: Any,
        local: bytes | None,
        sock: socket.socket,
        backend: Backend,
        stats: Stats,
    ) -> None:
        self.listener = listener
        self.client = client
        self.local = local
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.stats = stats
        self.last = time.monotonic()
        self.unanswered: float | None = None  # when the oldest unanswered datagram went out
        self.closed = False
        stats.active += 1
        listener.relay.loop.add(self.fd, self.on_event, IN)

    def send(self, data: bytes) -> bool:
        """Forward a client datagram; False when the backend has gone (pick another)."""
        try:
            self.sock.send(data)
        except BlockingIOError:
            return True  # a full socket buffer drops the datagram, as the network may
        except OSError:
            self.close()
            return False
        self.last = time.monotonic()
        if self.unanswered is None:
            self.unanswered = self.last
        self.stats.bytes += len(data)
        return True

    def on_event(self, events: int) -> None:
        for _ in range(ACCEPTS):
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:  # ICMP unreachable from the backend: the next datagram re-picks
                self.close()
                return
            self.last = time.monotonic()
            self.unanswered = None
            self.stats.bytes += len(data)
            self.listener.reply(data, self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.active -= 1
        self.listener.relay.loop.remove(self.fd)
        self.sock.close()
        if self.listener.flows.get(self.client) is self:
            del self.listener.flows[self.client]

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "client": list(self.client),
            "local": None if self.local is None else self.local.hex(),
            "fd": self.fd,
            "backend": self.backend.to_json(),
            "route_id": self.listener.rid,
            "idle": now - self.last,
            "unanswered": None if self.unanswered is None else now - self.unanswered,
        }


class UdpListener(Listener):
    """Datagrams in, per-client flows out; replies leave from this socket (the public port)."""

    def __init__(self, relay: Relay, sock: socket.socket, route: Route, origin: str) -> None:
        super().__init__(relay, sock, route, origin)
        self.flows: dict[Any, UdpFlow] = {}
        self.pktinfo = self._enable_pktinfo()

    def _enable_pktinfo(self) -> int:
        """On a wildcard socket, learn each datagram's destination to reply from that address."""
        if self.key.public_ip is not None:
            return 0
        try:
            if self.sock.family == socket.AF_INET:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                return 4
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            return 6
        except OSError:
            return 0

    def on_event(self, events: int) -> None:
        for _ in range(ACCEPTS):
            try:
                data, ancillary, _flags, client = self.sock.recvmsg(65535, 64)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("%s: recvmsg: %s", self.describe(), exc)
                return
            flow = self.flows.get(client)
            if flow is not None and flow.send(data):
                continue
            flow = self.new_flow(client, self._local(ancillary))
            if flow is not None:
                flow.send(data)

    def _local(self, ancillary: list[tuple[int, int, bytes]]) -> bytes | None:
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                return data[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
                return data[:16]  # struct in6_pktinfo: addr, ifindex
        return None

    def new_flow(self, client: Any, local: bytes | None) -> UdpFlow | None:
        for backend in self.candidates():
            try:
                sock = socket.socket(_family(backend), socket.SOCK_DGRAM)
            except OSError as exc:
                self.relay.warn("socket", f"{self.rid}: cannot open a socket: {exc}")
                return None
            sock.setblocking(False)
            try:
                # Every ICMP error, "host unreachable" too (a container that is gone), ends
                # the flow, so the client's next datagram goes to a current backend.
                if backend.ip.version == 6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
                sock.connect((str(backend.ip), backend.port))
            except OSError as exc:
                sock.close()
                text = backend_text(backend)
                self.relay.warn(f"{self.rid} {text}", f"{self.rid}: backend {text}: {exc}")
                continue
            self.stats.connections += 1
            flow = UdpFlow(self, client, local, sock, backend, self.stats)
            self.flows[client] = flow
            return flow
        self.relay.warn(f"empty {self.rid}", f"{self.describe()}: no backend, dropping")
        return None

    def reply(self, data: bytes, flow: UdpFlow) -> None:
        try:
            if flow.local is not None and self.pktinfo == 4:
                info = struct.pack("I4s4s", 0, flow.local, b"\0\0\0\0")
                self.sock.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, flow.client)
            elif flow.local is not None and self.pktinfo == 6:
                info = struct.pack("16sI", flow.local, 0)
                anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
                self.sock.sendmsg([data], anc, 0, flow.client)
            else:
                self.sock.sendto(data, flow.client)
        except OSError as exc:  # full buffer, or a source address we may not use: drop it
            log.debug("%s: reply to %s dropped: %s", self.describe(), flow.client, exc)

    def sweep(self, now: float, idle: float) -> None:
        """End idle flows, and flows to a replaced backend that stopped answering.

        A flow stays with its backend while that backend lives, reload or not. A
        container that is gone does not always say so (no ICMP while the host's
        ARP entry is still fresh), so a flow whose backend left the route and has
        left the client unanswered for STALE_SILENCE seconds moves on: the
        client's next datagram starts a flow to a current backend.
        """
        current = {(b.ip, b.port) for b in self.route.backends}
        for flow in list(self.flows.values()):
            if now - flow.last >= idle:
                flow.close()
            elif (
                flow.unanswered is not None
                and now - flow.unanswered >= STALE_SILENCE
                and (flow.backend.ip, flow.backend.port) not in current
            ):
                log.debug("%s: %s stopped answering", self.rid, backend_text(flow.backend))
                flow.close()

    def retire(self) -> None:
        """A removed UDP route: its flows cannot outlive the socket their replies leave from."""
        for flow in list(self.flows.values()):
            flow.close()
        super().retire()

    def adopt_flow(self, state: dict[str, Any], stats: Stats) -> None:
        raw = state["client"]
        client = (str(raw[0]), *(int(v) for v in raw[1:]))
        sock = adopt_socket(int(state["fd"]))
        local = None if state["local"] is None else bytes.fromhex(state["local"])
        flow = UdpFlow(self, client, local, sock, Backend.from_json(state["backend"]), stats)
        flow.last = time.monotonic() - float(state["idle"])
        if state["unanswered"] is not None:
            flow.unanswered = time.monotonic() - float(state["unanswered"])
        self.flows[client] = flow
