"""UDP relay: datagrams in on the public socket, one flow (upstream socket) per client out.

Each flow holds one ephemeral port of the host, which is why flows are capped
(limits.py): a spray from many source ports must not take the ports the host's
own outgoing UDP (DNS) needs. Replies leave from the public socket, from the
address the client sent to.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from ..model import Backend, Route
from . import proxyproto
from .handover import FlowState
from .inherit import adopt_socket
from .listeners import ACCEPTS, Listener
from .loop import IN, log
from .runtime import NO_BACKEND, NO_FDS, NO_FDS_CAUSE, SOURCE_MAX_UDP, Runtime
from .tcp import backend_text, family_of

STALE_SILENCE = 3.0  # seconds a replaced UDP backend may leave a client unanswered
EVICT_SILENCE = 2.0  # seconds unanswered after which a flow gives way to a new one at a cap
EVICT_LOOK = 64  # flows looked at per eviction: a datagram at a cap costs O(1)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python < 3.12 lacks these Linux constants
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


class UdpFlow:
    """One client address of one UDP listener, with its own upstream socket (its backend)."""

    def __init__(
        self,
        listener: UdpListener,
        client: Any,
        local: bytes | None,
        sock: socket.socket,
        backend: Backend,
        rid: str,
    ) -> None:
        self.listener = listener
        self.rt = listener.rt
        self.client = client
        self.local = local
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.rid = rid
        self.stats = self.rt.stats_for(rid)
        self.last = self.rt.loop.now
        self.unanswered: float | None = None  # when the oldest unanswered datagram went out
        self.closed = False
        self.header = listener.header_for(client, local)
        self.rt.loop.add(self.fd, self.on_event, IN)

    def send(self, data: bytes) -> bool:
        """Forward a client datagram; False when the backend has gone (pick another)."""
        try:
            self.sock.send(self.header + data if self.header else data)
        except BlockingIOError:
            return True  # a full socket buffer drops the datagram, as the network may
        except OSError:
            self.rt.health.failed(self.backend, self.rt.loop.now)
            self.close()
            return False
        self.last = self.rt.loop.now
        if self.unanswered is None:
            self.unanswered = self.last
            self.listener.silent[self] = None
        self.stats.bytes += len(data)
        return True

    def on_event(self, events: int) -> None:
        for _ in range(ACCEPTS):
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:  # ICMP unreachable from the backend: the next datagram re-picks
                self.stats.backend_failures += 1
                self.rt.health.failed(self.backend, self.rt.loop.now)
                self.close()
                return
            self.last = self.rt.loop.now
            if self.unanswered is not None:
                self.unanswered = None
                del self.listener.silent[self]
            self.stats.bytes += len(data)
            self.listener.reply(data, self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.listener.silent.pop(self, None)
        self.rt.loop.remove(self.fd)
        self.sock.close()
        if self.listener.flows.get(self.client) is self:
            del self.listener.flows[self.client]
        self.rt.release("udp", self.rid, str(self.client[0]))

    def snapshot(self, now: float) -> FlowState:
        return FlowState(
            client=tuple(self.client),
            local=self.local,
            fd=self.fd,
            backend=self.backend,
            route_id=self.rid,
            idle=now - self.last,
            unanswered=None if self.unanswered is None else now - self.unanswered,
        )


class UdpListener(Listener):
    """Datagrams in, per-client flows out; replies leave from this socket (the public port)."""

    def __init__(self, rt: Runtime, sock: socket.socket, route: Route, origin: str) -> None:
        super().__init__(rt, sock, route, origin)
        self.flows: dict[Any, UdpFlow] = {}
        self.silent: dict[UdpFlow, None] = {}  # flows awaiting an answer, oldest first
        self.pktinfo = self._enable_pktinfo()

    def start(self) -> None:
        self.rt.loop.add(self.fd, self.on_event, IN)

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

    def header_for(self, client: Any, local: bytes | None) -> bytes:
        """The PROXY protocol header every datagram of this client carries, or b""."""
        if not self.route.proxy_protocol:
            return b""
        if local is not None:
            family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
            host = socket.inet_ntop(family, local)
        else:
            host = str(self.sock.getsockname()[0])
        return proxyproto.header(
            (str(client[0]), int(client[1])), (host, self.key.public_port), datagram=True
        )

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
        candidates = self.candidates()
        if not candidates:
            self.rt.refuse(self.rid, NO_BACKEND)
            self.rt.warn(f"empty {self.rid}", f"{self.describe()}: no backend, dropping")
            return None
        source = str(client[0])
        cause = self.rt.udp_cap(self.rid, self.limits, source)
        if cause is not None:
            self._evict_unanswered(source if cause == SOURCE_MAX_UDP else None)
        if self.rt.admit_udp(self.rid, self.limits, source) is not None:
            return None  # counted; the datagram is dropped, existing flows go on
        for backend in candidates:
            try:
                sock = socket.socket(family_of(backend), socket.SOCK_DGRAM)
            except OSError as exc:
                if exc.errno in NO_FDS:
                    self.rt.refuse(self.rid, NO_FDS_CAUSE)
                    self.rt.out_of_fds("socket", exc)
                else:
                    self.rt.warn("socket", f"{self.rid}: cannot open a socket: {exc}")
                break
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
                self.stats.backend_failures += 1
                self.rt.health.failed(backend, self.rt.loop.now)
                text = backend_text(backend)
                self.rt.warn(f"{self.rid} {text}", f"{self.rid}: backend {text}: {exc}")
                continue
            self.stats.connections += 1
            flow = UdpFlow(self, client, local, sock, backend, self.rid)
            self.flows[client] = flow
            return flow
        self.rt.release("udp", self.rid, str(client[0]))
        return None

    def _evict_unanswered(self, source: str | None) -> None:
        """At a cap, close this route's flow left unanswered longest (EVICT_SILENCE or more).

        A spray from spoofed or throwaway source ports is never answered; a flow the
        backend answers is never evicted. So a cap filled by a spray gives way to new
        clients instead of locking them out until the spray's flows idle out. `source`:
        at the per-source cap only that source's own flows can give way. `silent` is in
        the order flows went unanswered, so this looks at a few flows, not all of them.
        """
        since = self.rt.loop.now - EVICT_SILENCE
        for looked, flow in enumerate(self.silent):
            if looked >= EVICT_LOOK or flow.unanswered is None or flow.unanswered > since:
                return
            if source is None or str(flow.client[0]) == source:
                flow.stats.evicted += 1
                flow.close()
                return

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

    def sweep(self, now: float) -> None:
        """End idle flows, and flows to a replaced backend that stopped answering.

        A flow stays with its backend while that backend lives, reload or not. A
        container that is gone does not always say so (no ICMP while the host's
        ARP entry is still fresh), so a flow whose backend left the route and has
        left the client unanswered for STALE_SILENCE seconds moves on: the
        client's next datagram starts a flow to a current backend.
        """
        idle = self.limits.udp_idle
        current = {(b.ip, b.port) for b in self.route.backends}
        for flow in list(self.flows.values()):
            if now - flow.last >= idle:
                flow.stats.idle_closed += 1
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
        self.rt.loop.remove(self.fd)
        self.sock.close()

    def adopt_flow(self, s: FlowState) -> None:
        sock = adopt_socket(s.fd)
        self.rt.recount("udp", s.route_id, str(s.client[0]))
        flow = UdpFlow(self, s.client, s.local, sock, s.backend, s.route_id)
        flow.last = self.rt.loop.now - s.idle
        if s.unanswered is not None:
            flow.unanswered = self.rt.loop.now - s.unanswered
            self.silent[flow] = None
        self.flows[s.client] = flow
