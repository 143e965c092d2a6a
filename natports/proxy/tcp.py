"""TCP relay: a client connection, its upstream, and a pump for each direction.

(Over 400 lines: Pump and TcpConn are the two halves of one state machine, with their
handover; they change together.)

TCP data never enters Python: os.splice moves it socket -> pipe -> socket inside
the kernel; a plain recv/send copy is the fallback where splice is missing or
refused. A direction copies through a shared scratch buffer until a read fills
it (see Pump); its pipe then starts at the kernel's default size (64 KiB) and
grows to PIPE_MAX only when a splice fills it, and a connection idle for a while
gives its empty pipes back: an idle connection holds two fds and no pipe memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct

from ..model import Backend, host_text
from .handover import PumpState, TcpState
from .inherit import adopt_socket
from .loop import EDGE, ERR, HUP, IN, OUT, log
from .runtime import NO_BACKEND, NO_FDS, NO_FDS_CAUSE, RouteStats, Runtime

# A busy direction grows its pipe to this (F_SETPIPE_SZ); NATPORTS_PROXY_PIPE_MAX
# (bytes) overrides it (docs/proxy.md: what each size measured).
PIPE_MAX = int(os.environ.get("NATPORTS_PROXY_PIPE_MAX", str(1 << 20)))
ROUNDS = 16  # reads per pump before yielding to other connections
CONNECT_TIMEOUT = 5.0
SHRINK_AFTER = 10.0  # seconds idle before a connection gives its empty pipes back
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
UNSPLICEABLE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
LINGER_RESET = struct.pack("ii", 1, 0)

BLOCKED, AGAIN, DONE = 0, 1, 2


def backend_text(backend: Backend) -> str:
    return f"{host_text(backend.ip)}:{backend.port}"


def family_of(backend: Backend) -> socket.AddressFamily:
    return socket.AF_INET6 if backend.ip.version == 6 else socket.AF_INET


def reset(sock: socket.socket | None) -> None:
    """Make close() send RST: an error (or a refusal) must not look like a clean end."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive: set on listeners once, and on every upstream socket.

    A socket accept() returns inherits both from its listener on Linux (the child
    is a copy of the listening socket, sk_clone_lock), so per accepted connection
    only O_NONBLOCK is set: two setsockopt calls fewer per connection.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def make_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe of the kernel's default size."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


class Pump:
    """One direction of a TCP connection: src -> (copy or pipe) -> dst, then half-close.

    Every direction starts by copying through one scratch buffer shared by all
    connections (short exchanges cost no pipe and no extra fds); a read that fills
    the scratch buffer marks the direction as bulk, and it moves to splice through
    its own pipe once nothing is left over. Bytes a full peer could not take wait
    in `buf`, sized to what is left, never more than one scratch buffer.
    """

    __slots__ = (
        "buf",
        "bulk",
        "dst",
        "dst_fd",
        "eof",
        "moved",
        "pending",
        "pipe_r",
        "pipe_size",
        "pipe_w",
        "scratch",
        "shut",
        "splice",
        "src",
        "src_fd",
        "stats",
    )

    def __init__(
        self, src: socket.socket, dst: socket.socket, stats: RouteStats, rt: Runtime
    ) -> None:
        self.src, self.dst, self.stats = src, dst, stats
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.pipe_r = self.pipe_w = -1
        self.pipe_size = 0
        self.splice = rt.splice
        self.scratch = rt.scratch
        self.buf = bytearray()  # copied bytes the peer has not taken yet
        self.pending = self.moved = 0  # pending: bytes in the pipe
        self.eof = self.shut = self.bulk = False

    @property
    def done(self) -> bool:
        return self.shut

    def run(self) -> int:
        """Move what can be moved now: BLOCKED (wait for an edge), AGAIN (yielded) or DONE."""
        if self.shut:
            return DONE
        return self._splice() if self.pipe_r >= 0 else self._copy()

    def _copy(self) -> int:
        scratch = self.scratch
        for _ in range(ROUNDS):
            if self.buf:
                try:
                    sent = self.dst.send(self.buf)
                except BlockingIOError:
                    return BLOCKED
                self.moved += sent
                self.stats.bytes += sent
                del self.buf[:sent]
                if self.buf:
                    return BLOCKED  # the peer's buffer is full: wait for it to drain
            if self.eof:
                return self._finish()
            if self.bulk and self.splice and self._open_pipe():
                return self._splice()
            try:
                got = self.src.recv_into(scratch)
            except BlockingIOError:
                return BLOCKED
            if got == 0:
                self.eof = True
                continue
            self.bulk = got == len(scratch)
            try:
                sent = self.dst.send(scratch[:got])
            except BlockingIOError:
                sent = 0
            self.moved += sent
            self.stats.bytes += sent
            if sent < got:
                self.buf = bytearray(scratch[sent:got])
                return BLOCKED
        return AGAIN

    def _open_pipe(self) -> bool:
        try:
            self.pipe_r, self.pipe_w, self.pipe_size = make_pipe()
        except OSError:  # out of fds for pipes: this direction keeps copying
            self.splice = False
            return False
        return True

    def _grow(self) -> None:
        """The pipe filled in one splice: this direction is busy, give it room."""
        with contextlib.suppress(OSError):  # over pipe-max-size or the user's pipe quota
            self.pipe_size = fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_MAX)

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
                if exc.errno in UNSPLICEABLE:  # the pipe is empty here: copy from now on
                    self.close_pipe()
                    self.splice = False
                    return self._copy()
                raise
            if got == 0:
                self.eof = True
            elif got == self.pipe_size < PIPE_MAX:
                self._grow()
            self.pending = got
        return AGAIN

    def _finish(self) -> int:
        """The source ended and everything it sent is delivered: pass the end on (FIN)."""
        with contextlib.suppress(OSError):  # ENOTCONN: the peer is gone already
            self.dst.shutdown(socket.SHUT_WR)
        self.shut = True
        self.close_pipe()
        return DONE

    def shrink(self) -> None:
        """An idle connection gives its empty pipe back; bulk traffic makes a new one."""
        if self.pipe_r >= 0 and self.pending == 0:
            self.close_pipe()
            self.bulk = False

    def close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1

    # -- restart ----------------------------------------------------------------------------

    def state(self) -> PumpState:
        pipe = (self.pipe_r, self.pipe_w, self.pipe_size) if self.pipe_r >= 0 else None
        return PumpState(pipe, self.pending, bytes(self.buf), self.eof, self.shut, self.moved)

    @classmethod
    def adopt(
        cls, src: socket.socket, dst: socket.socket, stats: RouteStats, s: PumpState, rt: Runtime
    ) -> Pump:
        pump = cls(src, dst, stats, rt)
        pump.pending, pump.eof, pump.shut, pump.moved = s.pending, s.eof, s.shut, s.moved
        pump.buf = bytearray(s.data)
        if s.pipe is not None:
            pump.pipe_r, pump.pipe_w, pump.pipe_size = s.pipe
            for fd in (pump.pipe_r, pump.pipe_w):
                os.set_inheritable(fd, False)
        return pump


class TcpConn:
    """A client connection and its upstream: the backend is chosen once, at accept."""

    CONNECTING, OPEN, CLOSED = 0, 1, 2

    def __init__(
        self,
        rt: Runtime,
        client: socket.socket,
        rid: str,
        source: str,
        candidates: list[Backend],
        header: bytes,
        idle_timeout: float,
    ) -> None:
        self.rt = rt
        self.client = client
        self.client_fd = client.fileno()
        self.rid = rid
        self.source = source  # the client's address, for the per-source cap
        self.stats = rt.stats_for(rid)
        self.candidates = candidates
        self.header = header  # PROXY protocol header still to send, or b""
        self.idle_timeout = idle_timeout
        self.last = rt.loop.now
        self.upstream: socket.socket | None = None
        self.upstream_fd = -1
        self.backend: Backend | None = None
        self.deadline = 0.0
        self.c2u: Pump | None = None
        self.u2c: Pump | None = None
        self.state = TcpConn.CONNECTING
        self.client_ready = False  # the client signalled input while connecting
        self.frees_fds = True
        rt.conns.add(self)
        rt.loop.add(self.client_fd, self.on_client, EDGE)

    # -- connecting -----------------------------------------------------------------------

    def connect_next(self) -> None:
        while self.candidates:
            backend = self.candidates.pop(0)
            try:
                # SOCK_NONBLOCK at creation: no ioctl(FIONBIO) after it
                sock = socket.socket(family_of(backend), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:
                if exc.errno in NO_FDS:
                    self.rt.out_of_fds("socket", exc)
                    self.rt.refuse(self.rid, NO_FDS_CAUSE)
                    self.frees_fds = False  # its close frees only what it took: stay paused
                    self.abort("out of file descriptors")
                    return
                self.rt.warn("socket", f"{self.rid}: cannot open a socket: {exc}")
                break
            tune(sock)
            err = sock.connect_ex((str(backend.ip), backend.port))
            if err in (0, errno.EINPROGRESS):
                self.upstream, self.upstream_fd, self.backend = sock, sock.fileno(), backend
                self.deadline = self.rt.loop.now + CONNECT_TIMEOUT
                self.rt.connecting.add(self)
                self.rt.loop.add(self.upstream_fd, self.on_upstream, EDGE)
                return
            sock.close()
            self._backend_failed(backend, os.strerror(err))
        self.rt.refuse(self.rid, NO_BACKEND)
        self.abort("no backend accepted the connection")

    def connect_failed(self, why: str) -> None:
        if self.backend is not None:
            self._backend_failed(self.backend, why)
        self._drop_upstream()
        self.connect_next()

    def _backend_failed(self, backend: Backend, why: str) -> None:
        self.stats.backend_failures += 1
        self.rt.health.failed(backend, self.rt.loop.now)
        text = backend_text(backend)
        self.rt.warn(f"{self.rid} {text}", f"{self.rid}: backend {text} failed: {why}")

    def _drop_upstream(self) -> None:
        self.rt.connecting.discard(self)
        if self.upstream is not None:
            self.rt.loop.forget(self.upstream_fd)
            self.upstream.close()
        self.upstream, self.upstream_fd, self.backend = None, -1, None

    def _connected(self, events: int = IN | OUT | ERR) -> None:
        """The upstream socket reported `events` while connecting: is it connected now?"""
        assert self.upstream is not None
        err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_failed(os.strerror(err))
            return
        try:
            self.upstream.getpeername()
        except OSError:
            return  # a stale event for a reused fd number: still connecting
        self.rt.connecting.discard(self)
        if self.backend is not None:
            self.rt.health.succeeded(self.backend)
        if self.header:
            try:  # a few dozen bytes into an empty socket buffer: they fit
                sent = self.upstream.send(self.header)
            except OSError as exc:
                self.abort(f"PROXY header: {exc}")
                return
            if sent != len(self.header):
                self.abort("PROXY header did not fit the socket buffer")
                return
            self.header = b""
        self.state = TcpConn.OPEN
        self.c2u = Pump(self.client, self.upstream, self.stats, self.rt)
        self.u2c = Pump(self.upstream, self.client, self.stats, self.rt)
        # Edge-triggered: a pump need not look before its source has signalled. The
        # client's edges while connecting were noted (client_ready); the upstream's
        # first edge is this one. A read that would only find EAGAIN costs a syscall
        # and a Python exception, twice per connection.
        if self.client_ready or events & (ERR | HUP):
            self.run(self.c2u)
        if events & (IN | ERR | HUP):
            self.run(self.u2c)

    # -- events ---------------------------------------------------------------------------

    def on_client(self, events: int) -> None:
        self.last = self.rt.loop.now
        if self.state == TcpConn.OPEN:
            assert self.c2u is not None and self.u2c is not None
            if events & (IN | ERR | HUP):
                self.run(self.c2u)
            if events & (OUT | ERR | HUP):
                self.run(self.u2c)
        elif self.state == TcpConn.CONNECTING:
            if events & ERR:
                self.abort("the client went away while connecting")
            elif events & (IN | HUP):
                self.client_ready = True  # bytes (or its end) wait: c2u starts with a look

    def on_upstream(self, events: int) -> None:
        self.last = self.rt.loop.now
        if self.state == TcpConn.OPEN:
            assert self.c2u is not None and self.u2c is not None
            if events & (IN | ERR | HUP):
                self.run(self.u2c)
            if events & (OUT | ERR | HUP):
                self.run(self.c2u)
        elif self.state == TcpConn.CONNECTING:
            self._connected(events)

    def run(self, pump: Pump) -> None:
        if self.state != TcpConn.OPEN:
            return
        try:
            result = pump.run()
        except OSError as exc:
            self.abort(exc)  # formatted only if debug logging is on
            return
        if result == AGAIN:
            self.rt.loop.ready.append(lambda: self.run(pump))
        elif result == DONE and self.c2u is not None and self.u2c is not None:
            both_ended = self.c2u.done and self.u2c.done
            if both_ended:
                self.close()

    def tick(self, now: float) -> None:
        """Once a second: connect timeout, idle timeout, idle pipes given back."""
        idle = now - self.last
        if self.state == TcpConn.CONNECTING and self.upstream is not None:
            if self.deadline <= now:
                self.connect_failed(f"no answer within {CONNECT_TIMEOUT:g} s")
        elif idle >= self.idle_timeout:
            self.stats.idle_closed += 1
            log.debug("%s: closing a connection idle for %.0f s", self.rid, idle)
            self.close()
        elif idle >= SHRINK_AFTER:
            for pump in (self.c2u, self.u2c):
                if pump is not None:
                    pump.shrink()

    # -- ending -----------------------------------------------------------------------------

    def abort(self, why: str | OSError) -> None:
        """An error on one side: reset the other too, so neither mistakes it for a clean end."""
        log.debug("%s: connection aborted: %s", self.rid, why)
        reset(self.client)
        reset(self.upstream)
        self.close()

    def close(self) -> None:
        if self.state == TcpConn.CLOSED:
            return
        self.state = TcpConn.CLOSED
        self.rt.conns.discard(self)
        self.rt.connecting.discard(self)
        self.rt.loop.forget(self.client_fd)
        self.client.close()
        if self.upstream is not None:
            self.rt.loop.forget(self.upstream_fd)
            self.upstream.close()
        for pump in (self.c2u, self.u2c):
            if pump is not None:
                pump.close_pipe()
        self.rt.release("tcp", self.rid, self.source, resume=self.frees_fds)

    # -- restart ----------------------------------------------------------------------------

    def snapshot(self, now: float) -> TcpState:
        return TcpState(
            route_id=self.rid,
            client=self.client_fd,
            upstream=self.upstream_fd if self.upstream is not None else None,
            backend=self.backend,
            candidates=tuple(self.candidates),
            open=self.state == TcpConn.OPEN,
            header=self.header,
            idle_timeout=self.idle_timeout,
            idle=now - self.last,
            c2u=None if self.c2u is None else self.c2u.state(),
            u2c=None if self.u2c is None else self.u2c.state(),
        )

    @classmethod
    def adopt(cls, rt: Runtime, s: TcpState) -> TcpConn:
        """Take over a connection from the previous process, exactly where it was."""
        client = adopt_socket(s.client)
        try:
            source = str(client.getpeername()[0])
        except OSError:
            source = "?"
        rt.recount("tcp", s.route_id, source)
        conn = cls(rt, client, s.route_id, source, list(s.candidates), s.header, s.idle_timeout)
        conn.last = rt.loop.now - s.idle
        if s.upstream is None:
            conn.connect_next()
            return conn
        conn.upstream = adopt_socket(s.upstream)
        conn.upstream_fd = conn.upstream.fileno()
        conn.backend = s.backend
        rt.loop.add(conn.upstream_fd, conn.on_upstream, EDGE)
        if not s.open or s.c2u is None or s.u2c is None:
            conn.deadline = rt.loop.now + CONNECT_TIMEOUT
            rt.connecting.add(conn)
            conn._connected()  # the handshake may have finished during the exec
            return conn
        conn.state = TcpConn.OPEN
        conn.c2u = Pump.adopt(client, conn.upstream, conn.stats, s.c2u, rt)
        conn.u2c = Pump.adopt(conn.upstream, client, conn.stats, s.u2c, rt)
        # Edges that fired before the exec are gone: look at both directions now.
        c2u, u2c = conn.c2u, conn.u2c
        rt.loop.ready.append(lambda: conn.run(c2u))
        rt.loop.ready.append(lambda: conn.run(u2c))
        return conn
