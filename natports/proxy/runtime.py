"""What listeners, TCP connections and UDP flows share: counters, caps, health, fd pressure.

Admission is decided here, before a flow costs anything: a cap that is reached
refuses the new connection or datagram and counts why, while established flows
and other routes go on. Running out of file descriptors (EMFILE/ENFILE) pauses
every accepting socket instead of spinning on a level-triggered listener that
cannot be served; accepting resumes when a flow closes (or a second later), and
the episode is logged once when it starts and once when it is over.
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import TYPE_CHECKING

from .health import Health
from .limits import Limits, RouteLimits
from .loop import IN, Handler, Loop, Warnings, log

if TYPE_CHECKING:
    from .tcp import TcpConn
    from .workers import Workers

COPY_SIZE = 64 * 1024  # a read this full marks a direction as bulk (splice from then on)
NO_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RESUME_AFTER = 1.0  # retry accepting this often while paused, in case fds freed elsewhere
QUIET_BEFORE_ALL_CLEAR = 10.0  # an fd shortage episode ends after this long without one

# Refusal causes, as counted per route.
MAX_TCP, ROUTE_MAX_TCP, SOURCE_MAX_TCP = "max_tcp", "route_max_tcp", "source_max_tcp"
MAX_UDP, ROUTE_MAX_UDP, SOURCE_MAX_UDP = (
    "max_udp_flows",
    "route_max_udp_flows",
    "source_max_udp_flows",
)
NO_FDS_CAUSE, NO_BACKEND = "no_fds", "no_backend"


class RouteStats:
    """Per route id; survives reloads and restarts (the live counts are rebuilt on adoption)."""

    __slots__ = (
        "active",
        "backend_failures",
        "bytes",
        "connections",
        "evicted",
        "flows",
        "idle_closed",
        "refused",
    )

    def __init__(self, connections: int = 0, nbytes: int = 0) -> None:
        self.connections = connections
        self.bytes = nbytes
        self.active = 0  # open TCP connections
        self.flows = 0  # live UDP flows
        self.refused: Counter[str] = Counter()
        self.backend_failures = 0
        self.idle_closed = 0
        self.evicted = 0  # unanswered UDP flows closed to admit a new one at a cap

    def to_json(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "bytes": self.bytes,
            "active": self.active,
            "udp_flows": self.flows,
            "refused": dict(sorted(self.refused.items())),
            "backend_failures": self.backend_failures,
            "idle_closed": self.idle_closed,
            "evicted": self.evicted,
        }

    def saved(self) -> dict[str, object]:
        """What a restart carries over (live counts are recounted by the new process)."""
        return {
            "connections": self.connections,
            "bytes": self.bytes,
            "refused": dict(self.refused),
            "backend_failures": self.backend_failures,
            "idle_closed": self.idle_closed,
            "evicted": self.evicted,
        }

    @classmethod
    def restored(cls, data: dict[str, object]) -> RouteStats:
        stats = cls(int(str(data["connections"])), int(str(data["bytes"])))
        refused = data.get("refused", {})
        assert isinstance(refused, dict)
        stats.refused.update({str(k): int(v) for k, v in refused.items()})
        stats.backend_failures = int(str(data.get("backend_failures", 0)))
        stats.idle_closed = int(str(data.get("idle_closed", 0)))
        stats.evicted = int(str(data.get("evicted", 0)))
        return stats


class Runtime:
    def __init__(self, splice: bool, limits: Limits) -> None:
        self.loop = Loop()
        self.splice = splice
        self.scratch = memoryview(bytearray(COPY_SIZE))  # every copy goes through it (one thread)
        self.limits = limits
        self.stats: dict[str, RouteStats] = {}
        self.conns: set[TcpConn] = set()
        self.workers: Workers | None = None  # TCP worker processes, when configured
        self.connecting: set[TcpConn] = set()
        self.health = Health()
        self.warnings = Warnings()
        self.tcp_open = 0
        self.udp_open = 0
        self.per_source: Counter[tuple[str, str, str]] = Counter()  # (kind, rid, address)
        self.acceptors: dict[int, int] = {}  # fd -> its epoll mask while accepting
        self.paused = False
        self._resume_at = 0.0
        self._shortage_since: float | None = None
        self._last_shortage = 0.0
        self._deferred = 0

    def stats_for(self, rid: str) -> RouteStats:
        stats = self.stats.get(rid)
        if stats is None:
            stats = self.stats[rid] = RouteStats()
        return stats

    def warn(self, topic: str, message: str) -> None:
        self.warnings.warn(topic, message)

    # -- admission -------------------------------------------------------------------------------

    def admit_tcp(self, rid: str, limits: RouteLimits, source: str) -> str | None:
        """None when a new connection may open (and it is counted), else the refusal cause."""
        stats = self.stats_for(rid)
        if self.tcp_open >= self.limits.max_tcp:
            cause: str | None = MAX_TCP
        elif stats.active >= limits.route_max_tcp:
            cause = ROUTE_MAX_TCP
        elif self.per_source["tcp", rid, source] >= limits.source_max_tcp:
            cause = SOURCE_MAX_TCP
        else:
            cause = None
        if cause is not None:
            self.refuse(rid, cause)
            return cause
        self.recount("tcp", rid, source)
        return None

    def udp_cap(self, rid: str, limits: RouteLimits, source: str) -> str | None:
        """The cap a new UDP flow from `source` would exceed, if any (counts nothing)."""
        if self.udp_open >= self.limits.max_udp_flows:
            return MAX_UDP
        if self.stats_for(rid).flows >= limits.route_max_udp_flows:
            return ROUTE_MAX_UDP
        if self.per_source["udp", rid, source] >= limits.source_max_udp_flows:
            return SOURCE_MAX_UDP
        return None

    def admit_udp(self, rid: str, limits: RouteLimits, source: str) -> str | None:
        cause = self.udp_cap(rid, limits, source)
        if cause is not None:
            self.refuse(rid, cause)
            return cause
        self.recount("udp", rid, source)
        return None

    def recount(self, kind: str, rid: str, source: str) -> None:
        """Count a flow as open (admitted, or handed over by the previous process)."""
        stats = self.stats_for(rid)
        self.per_source[kind, rid, source] += 1
        if kind == "tcp":
            self.tcp_open += 1
            stats.active += 1
        else:
            self.udp_open += 1
            stats.flows += 1

    def refuse(self, rid: str, cause: str) -> None:
        self.stats_for(rid).refused[cause] += 1
        if cause not in (NO_FDS_CAUSE,):
            self.warn(f"refuse {rid} {cause}", f"{rid}: refusing new flows: {cause} reached")

    def release(self, kind: str, rid: str, source: str, resume: bool = True) -> None:
        """A flow admitted by admit_tcp/admit_udp ended: its fds are free again."""
        stats = self.stats_for(rid)
        key = (kind, rid, source)
        self.per_source[key] -= 1
        if self.per_source[key] <= 0:
            del self.per_source[key]
        if kind == "tcp":
            self.tcp_open -= 1
            stats.active -= 1
        else:
            self.udp_open -= 1
            stats.flows -= 1
        if self.paused and resume:
            self._resume()

    # -- file descriptor shortage ------------------------------------------------------------------

    def add_acceptor(self, fd: int, handler: Handler, mask: int = IN) -> None:
        self.acceptors[fd] = mask
        self.loop.add(fd, handler, mask)
        if self.paused:
            self.loop.modify(fd, 0)

    def remove_acceptor(self, fd: int) -> None:
        self.acceptors.pop(fd, None)
        self.loop.remove(fd)

    def out_of_fds(self, what: str, exc: OSError) -> None:
        """accept()/socket() failed for want of fds: stop accepting until some are freed."""
        now = self.loop.now
        self._last_shortage = now
        self._deferred += 1
        if self._shortage_since is None:
            self._shortage_since = now
            log.warning(
                "out of file descriptors (%s: %s): accepting paused until flows close; "
                "raise LimitNOFILE or lower proxy.max_tcp",
                what,
                exc.strerror or exc,
            )
        if not self.paused:
            self.paused = True
            for fd in self.acceptors:
                self.loop.modify(fd, 0)
        self._resume_at = now + RESUME_AFTER

    def _resume(self) -> None:
        self.paused = False
        for fd, mask in self.acceptors.items():
            self.loop.modify(fd, mask)

    def tick(self, now: float) -> None:
        if self.paused and now >= self._resume_at:
            self._resume()
        since = self._shortage_since
        if since is not None and now - self._last_shortage >= QUIET_BEFORE_ALL_CLEAR:
            log.warning(
                "file descriptors available again after %.0f s (%d accepts deferred or refused)",
                self._last_shortage - since,
                self._deferred,
            )
            self._shortage_since = None
            self._deferred = 0
