"""A TCP worker process: relays the connections the daemon accepted and passed to it.

`python -m natports.proxy.worker FD` runs one (the daemon starts them: workers.py).
FD is a SOCK_SEQPACKET socket to the daemon. Each message from the daemon is a
connection (JSON, the client socket as SCM_RIGHTS) or {"drain": true}; once a
second the worker reports what changed (connections closed, bytes, failures).
A draining worker takes nothing new and exits when its last connection ends, so
a restart of the daemon cuts no connection: old workers finish, new ones serve.
"""

from __future__ import annotations

import array
import base64
import json
import os
import signal
import socket
import sys
from typing import Any

from ..model import Backend
from .limits import Limits
from .loop import IN, log, setup_logging
from .runtime import RouteStats, Runtime
from .tcp import TcpConn

MAX_MESSAGE = 1 << 16
CLOSED_PER_MESSAGE = 500  # keeps a report well under the socket's message size


class WorkerRuntime(Runtime):
    """Counts what closed, for the next report to the daemon (which did the admitting)."""

    def __init__(self, splice: bool) -> None:
        super().__init__(splice, Limits())
        self.closed: list[tuple[str, str]] = []
        self.reported: dict[str, tuple[int, int, int, dict[str, int]]] = {}

    def release(self, kind: str, rid: str, source: str, resume: bool = True) -> None:
        super().release(kind, rid, source, resume)
        self.closed.append((rid, source))

    def report(
        self, with_stats: bool = True, limit: int = CLOSED_PER_MESSAGE
    ) -> tuple[dict[str, Any], Any]:
        """(the next report, its commit token): nothing is forgotten until it was sent."""
        stats: dict[str, list[Any]] = {}
        seen = self.reported if not with_stats else {}
        for rid, s in self.stats.items() if with_stats else ():
            before = self.reported.get(rid, (0, 0, 0, {}))
            refused = {k: v - before[3].get(k, 0) for k, v in s.refused.items()}
            delta = [
                s.bytes - before[0],
                s.backend_failures - before[1],
                s.idle_closed - before[2],
                {k: v for k, v in refused.items() if v},
            ]
            if any(delta[:3]) or delta[3]:
                stats[rid] = delta
            seen[rid] = (s.bytes, s.backend_failures, s.idle_closed, dict(s.refused))
        return {"closed": self.closed[:limit], "stats": stats}, seen

    def commit(self, report: dict[str, Any], seen: Any) -> None:
        del self.closed[: len(report["closed"])]
        self.reported = seen


def apply_report(stats: dict[str, RouteStats], report: dict[str, Any]) -> None:
    """Add a worker's deltas to the daemon's counters (pure; closings are released apart)."""
    for rid, (nbytes, failures, idle_closed, refused) in report.get("stats", {}).items():
        s = stats.get(rid)
        if s is None:
            s = stats[rid] = RouteStats()
        s.bytes += int(nbytes)
        s.backend_failures += int(failures)
        s.idle_closed += int(idle_closed)
        for cause, n in refused.items():
            s.refused[str(cause)] += int(n)


class Worker:
    def __init__(self, channel: socket.socket, splice: bool) -> None:
        self.channel = channel
        self.rt = WorkerRuntime(splice)
        self.draining = False
        self.rt.loop.add(channel.fileno(), self.on_channel, IN)

    def on_channel(self, events: int) -> None:
        for _ in range(256):
            fds = array.array("i")
            try:
                data, ancdata, _flags, _addr = self.channel.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize)
                )
            except BlockingIOError:
                return
            except OSError:
                data, ancdata = b"", []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:  # the daemon is gone: finish what we have, take nothing new
                self.draining = True
                self.rt.loop.remove(self.channel.fileno())
                return
            message = json.loads(data)
            if message.get("drain"):
                self.draining = True
                continue
            if fds:
                self.serve(fds[0], message)

    def serve(self, fd: int, m: dict[str, Any]) -> None:
        client = socket.socket(fileno=fd)
        client.setblocking(False)
        rid, source = str(m["rid"]), str(m["source"])
        candidates = [Backend.from_json(b) for b in m["candidates"]]
        candidates = self.rt.health.order(candidates, self.rt.loop.now)
        self.rt.recount("tcp", rid, source)
        header = base64.b64decode(m["header"])
        conn = TcpConn(self.rt, client, rid, source, candidates, header, float(m["idle"]))
        conn.connect_next()

    def run(self) -> None:
        next_tick = self.rt.loop.now + 1.0
        while not (self.draining and not self.rt.conns):
            self.rt.loop.poll(1.0)
            if self.rt.closed:  # released at once: the daemon's caps count open connections
                self.send_report(with_stats=False)
            now = self.rt.loop.now
            if now >= next_tick:
                next_tick = now + 1.0
                self.rt.tick(now)
                for conn in list(self.rt.conns):
                    conn.tick(now)
                self.send_report()
        self.send_report()

    def send_report(self, with_stats: bool = True) -> None:
        while True:
            report, seen = self.rt.report(with_stats)
            if not report["closed"] and not report["stats"]:
                return
            try:
                self.channel.send(json.dumps(report).encode())
            except OSError:
                return  # the daemon is busy (or gone): the same deltas go out next time
            self.rt.commit(report, seen)


def main(argv: list[str]) -> int:
    setup_logging(f"natports-proxy worker {os.getpid()}")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # restarts are the daemon's business
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = socket.socket(fileno=int(argv[0]))
    channel.setblocking(False)
    os.set_inheritable(channel.fileno(), False)
    splice = hasattr(os, "splice") and os.environ.get("NATPORTS_PROXY_SPLICE", "1") != "0"
    worker = Worker(channel, splice)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    log.debug("worker %d ready", os.getpid())
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
