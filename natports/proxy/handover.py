"""The restart handover, typed: what one process passes to its own re-exec.

On a restart the daemon passes *everything* it holds (listeners, connections,
pipes, UDP flows, control clients) to its re-exec: the fds stay open across
execve, and a memfd named by HANDOVER_ENV holds this state as JSON. The kernel
keeps queueing connections on the listeners meanwhile, so a restart refuses
nothing and cuts nothing. Times are ages (seconds before the snapshot), because
monotonic clocks do not survive an exec's meaning.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from ..model import Backend, Route

HANDOVER_ENV = "NATPORTS_PROXY_HANDOVER"
HANDOVER_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before limits (an upgrade's first SIGHUP re-execs from it)
V1_IDLE_TIMEOUT = 3600.0  # the default tcp_idle, for connections handed over by version 1


class HandoverError(ValueError):
    """The previous process left a state this one cannot read."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    return base64.b64decode(str(text or ""))


@dataclass(frozen=True)
class PumpState:
    """One direction of a TCP connection: its pipe (fds) or copy buffer (bytes)."""

    pipe: tuple[int, int, int] | None  # read fd, write fd, size
    pending: int  # bytes in the pipe
    data: bytes  # bytes in the copy buffer
    eof: bool
    shut: bool
    moved: int

    def to_json(self) -> dict[str, Any]:
        return {
            "pipe": None if self.pipe is None else list(self.pipe),
            "pending": self.pending,
            "data": _b64(self.data),
            "eof": self.eof,
            "shut": self.shut,
            "moved": self.moved,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PumpState:
        pipe = d["pipe"]
        return cls(
            pipe=None if pipe is None else (int(pipe[0]), int(pipe[1]), int(pipe[2])),
            pending=int(d["pending"]),
            data=_unb64(d["data"]),
            eof=bool(d["eof"]),
            shut=bool(d["shut"]),
            moved=int(d["moved"]),
        )

    def fds(self) -> list[int]:
        return [] if self.pipe is None else [self.pipe[0], self.pipe[1]]


@dataclass(frozen=True)
class TcpState:
    route_id: str
    client: int
    upstream: int | None
    backend: Backend | None
    candidates: tuple[Backend, ...]
    open: bool
    header: bytes  # a PROXY protocol header not sent yet
    idle_timeout: float
    idle: float  # seconds since the last event
    c2u: PumpState | None
    u2c: PumpState | None

    def to_json(self) -> dict[str, Any]:
        return {
            "route_id": self.route_id,
            "client": self.client,
            "upstream": self.upstream,
            "backend": None if self.backend is None else self.backend.to_json(),
            "candidates": [b.to_json() for b in self.candidates],
            "open": self.open,
            "header": _b64(self.header),
            "idle_timeout": self.idle_timeout,
            "idle": self.idle,
            "c2u": None if self.c2u is None else self.c2u.to_json(),
            "u2c": None if self.u2c is None else self.u2c.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TcpState:
        return cls(
            route_id=str(d["route_id"]),
            client=int(d["client"]),
            upstream=None if d["upstream"] is None else int(d["upstream"]),
            backend=None if d["backend"] is None else Backend.from_json(d["backend"]),
            candidates=tuple(Backend.from_json(b) for b in d["candidates"]),
            open=bool(d["open"]),
            header=_unb64(d.get("header")),  # .get: absent from version 1
            idle_timeout=float(d.get("idle_timeout", V1_IDLE_TIMEOUT)),
            idle=float(d.get("idle", 0.0)),
            c2u=None if d["c2u"] is None else PumpState.from_json(d["c2u"]),
            u2c=None if d["u2c"] is None else PumpState.from_json(d["u2c"]),
        )

    def fds(self) -> list[int]:
        fds = [self.client] + ([] if self.upstream is None else [self.upstream])
        for pump in (self.c2u, self.u2c):
            if pump is not None:
                fds += pump.fds()
        return fds

    def in_flight(self) -> int:
        return sum(p.pending + len(p.data) for p in (self.c2u, self.u2c) if p is not None)


@dataclass(frozen=True)
class FlowState:
    client: tuple[Any, ...]  # the socket address tuple of the client
    local: bytes | None  # the address the client sent to (wildcard listeners)
    fd: int
    backend: Backend
    route_id: str
    idle: float
    unanswered: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "client": list(self.client),
            "local": None if self.local is None else self.local.hex(),
            "fd": self.fd,
            "backend": self.backend.to_json(),
            "route_id": self.route_id,
            "idle": self.idle,
            "unanswered": self.unanswered,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FlowState:
        raw = d["client"]
        return cls(
            client=(str(raw[0]), *(int(v) for v in raw[1:])),
            local=None if d["local"] is None else bytes.fromhex(d["local"]),
            fd=int(d["fd"]),
            backend=Backend.from_json(d["backend"]),
            route_id=str(d["route_id"]),
            idle=float(d["idle"]),
            unanswered=None if d["unanswered"] is None else float(d["unanswered"]),
        )


@dataclass(frozen=True)
class ListenerState:
    route: Route
    fd: int
    rr: int
    origin: str
    flows: tuple[FlowState, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route.to_json(),
            "fd": self.fd,
            "rr": self.rr,
            "origin": self.origin,
            "flows": [f.to_json() for f in self.flows],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ListenerState:
        return cls(
            route=Route.from_json(d["route"]),
            fd=int(d["fd"]),
            rr=int(d["rr"]),
            origin=str(d["origin"]),
            flows=tuple(FlowState.from_json(f) for f in d["flows"]),
        )


@dataclass(frozen=True)
class ClientState:
    """A control connection in the middle of a request."""

    fd: int
    inbuf: bytes
    outbuf: bytes
    waiting: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "fd": self.fd,
            "inbuf": _b64(self.inbuf),
            "outbuf": _b64(self.outbuf),
            "waiting": self.waiting,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClientState:
        return cls(int(d["fd"]), _unb64(d["inbuf"]), _unb64(d["outbuf"]), bool(d["waiting"]))


@dataclass(frozen=True)
class Handover:
    generation: int
    restarts: int
    started: float
    routes: tuple[Route, ...]
    listeners: tuple[ListenerState, ...]
    spare: tuple[int, ...]
    control: int
    control_owned: bool
    clients: tuple[ClientState, ...]
    stats: dict[str, dict[str, object]]
    tcp: tuple[TcpState, ...]
    workers: tuple[dict[str, Any], ...] = ()  # workers.WorkerLink.saved(): pid, fd, admitted

    def fds(self) -> list[int]:
        fds = [x.fd for x in self.listeners]
        fds += [int(w["fd"]) for w in self.workers]
        fds += [f.fd for x in self.listeners for f in x.flows]
        for conn in self.tcp:
            fds += conn.fds()
        fds += [c.fd for c in self.clients]
        fds += [self.control, *self.spare]
        return fds

    def to_json(self) -> dict[str, Any]:
        return {
            "version": HANDOVER_VERSION,
            "generation": self.generation,
            "restarts": self.restarts,
            "started": self.started,
            "routes": [r.to_json() for r in self.routes],
            "listeners": [x.to_json() for x in self.listeners],
            "spare": list(self.spare),
            "control": {"fd": self.control, "owned": self.control_owned},
            "clients": [c.to_json() for c in self.clients],
            "stats": self.stats,
            "tcp": [c.to_json() for c in self.tcp],
            "workers": list(self.workers),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Handover:
        if d.get("version") not in READABLE_VERSIONS:
            known = ", ".join(map(str, READABLE_VERSIONS))
            raise HandoverError(f"handover version {d.get('version')!r}, {known} known")
        try:
            return cls(
                generation=int(d["generation"]),
                restarts=int(d["restarts"]),
                started=float(d["started"]),
                routes=tuple(Route.from_json(r) for r in d["routes"]),
                listeners=tuple(ListenerState.from_json(x) for x in d["listeners"]),
                spare=tuple(int(fd) for fd in d["spare"]),
                control=int(d["control"]["fd"]),
                control_owned=bool(d["control"]["owned"]),
                clients=tuple(ClientState.from_json(c) for c in d["clients"]),
                stats={str(k): _stats(v) for k, v in d["stats"].items()},
                tcp=tuple(TcpState.from_json(c) for c in d["tcp"]),
                workers=tuple(dict(w) for w in d.get("workers", [])),
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise HandoverError(
                f"handover state is invalid ({type(exc).__name__}: {exc})"
            ) from None


def _stats(value: Any) -> dict[str, object]:
    """Version 1 saved [connections, bytes]; version 2 saves RouteStats.saved()."""
    if isinstance(value, list):
        return {"connections": int(value[0]), "bytes": int(value[1])}
    return dict(value)


def write_handover(state: Handover) -> int:
    """The state in an inheritable memfd; returns its fd."""
    fd = os.memfd_create("natports-proxy-handover", 0)
    os.write(fd, json.dumps(state.to_json()).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    return fd


def handover_env(fd: int) -> str:
    return f"{os.getpid()}:{fd}"


def take_handover() -> Handover | None:
    """The state our previous incarnation left us, if this process is that re-exec."""
    value = os.environ.pop(HANDOVER_ENV, None)
    if not value:
        return None
    pid, _, fd_text = value.partition(":")
    if not pid.isdigit() or int(pid) != os.getpid() or not fd_text.isdigit():
        return None  # inherited by some other program: not meant for us
    fd = int(fd_text)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    doc = json.loads(b"".join(chunks))
    if not isinstance(doc, dict):
        raise HandoverError("handover state is not a JSON object")
    return Handover.from_json(doc)
