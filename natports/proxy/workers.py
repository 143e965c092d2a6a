"""The daemon's side of its TCP workers: start them, pass them connections, hear back.

With `[proxy] workers = N` (N > 0) the daemon keeps its listeners, control socket
and UDP flows, admits each TCP connection against the caps, and passes the client
socket to a worker process (round robin, SCM_RIGHTS over a SOCK_SEQPACKET pair);
the worker connects the backend and relays. Listeners never move, so a reload
or restart refuses nothing, exactly as with one process. On a restart the new
daemon inherits the pairs of the running workers, tells them to drain (they take
nothing new and exit when their last connection ends: nothing is cut) and starts
fresh ones. A worker's report of closed connections releases their slots.
"""

from __future__ import annotations

import array
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from typing import Any

from ..model import Backend
from .loop import IN, log
from .runtime import Runtime
from .worker import apply_report

MAX_REPORT = 1 << 20


class WorkerLink:
    """One worker process, seen from the daemon."""

    def __init__(
        self,
        rt: Runtime,
        pid: int,
        sock: socket.socket,
        admitted: Counter[tuple[str, str]] | None = None,
    ) -> None:
        self.rt = rt
        self.pid = pid
        self.sock = sock
        self.fd = sock.fileno()
        self.admitted: Counter[tuple[str, str]] = admitted or Counter()
        self.draining = False
        self.gone = False
        rt.loop.add(self.fd, self.on_event, IN)

    def send(
        self,
        client: socket.socket,
        rid: str,
        source: str,
        candidates: list[Backend],
        header: bytes,
        idle: float,
    ) -> bool:
        message = {
            "rid": rid,
            "source": source,
            "candidates": [b.to_json() for b in candidates],
            "header": base64.b64encode(header).decode(),
            "idle": idle,
        }
        fds = array.array("i", [client.fileno()])
        try:
            self.sock.sendmsg(
                [json.dumps(message).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            )
        except OSError:  # its queue is full, or it died: the caller serves it elsewhere
            return False
        self.admitted[rid, source] += 1
        return True

    def drain(self) -> None:
        self.draining = True
        with contextlib.suppress(OSError):
            self.sock.send(json.dumps({"drain": True}).encode())

    def on_event(self, events: int) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(MAX_REPORT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.lost()
                return
            report = json.loads(data)
            apply_report(self.rt.stats, report)
            for rid, source in report.get("closed", []):
                key = (str(rid), str(source))
                if self.admitted[key] > 0:
                    self.admitted[key] -= 1
                    self.rt.release("tcp", *key)

    def lost(self) -> None:
        """The worker exited: whatever it still held is closed now."""
        if self.gone:
            return
        self.gone = True
        self.rt.loop.remove(self.fd)
        self.sock.close()
        for (rid, source), n in self.admitted.items():
            for _ in range(n):
                self.rt.release("tcp", rid, source)
        self.admitted.clear()
        if not self.draining:
            log.warning("worker %d exited; its connections were lost", self.pid)

    def saved(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "fd": self.fd,
            "admitted": [[rid, src, n] for (rid, src), n in self.admitted.items() if n],
        }


class Workers:
    """The daemon's pool: round robin over live, non-draining workers."""

    def __init__(self, rt: Runtime, count: int) -> None:
        self.rt = rt
        self.count = count
        self.links: list[WorkerLink] = []
        self.next = 0

    def start(self) -> None:
        while len(self.serving()) < self.count:
            self.links.append(self._spawn())

    def _spawn(self) -> WorkerLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "natports.proxy.worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        log.info("started TCP worker %d", proc.pid)
        return WorkerLink(self.rt, proc.pid, ours)

    def serving(self) -> list[WorkerLink]:
        return [w for w in self.links if not w.gone and not w.draining]

    def dispatch(
        self,
        client: socket.socket,
        rid: str,
        source: str,
        candidates: list[Backend],
        header: bytes,
        idle: float,
    ) -> bool:
        """Hand a connection to a worker; False when none took it (serve it here)."""
        serving = self.serving()
        for i in range(len(serving)):
            link = serving[(self.next + i) % len(serving)]
            if link.send(client, rid, source, candidates, header, idle):
                self.next = (self.next + i + 1) % len(serving)
                client.close()
                return True
        return False

    def tick(self) -> None:
        """Reap exited workers; replace serving ones that died."""
        for link in list(self.links):
            try:
                pid, _status = os.waitpid(link.pid, os.WNOHANG)
            except ChildProcessError:
                pid = link.pid
            if pid == link.pid:
                link.on_event(IN)  # its last report
                link.lost()
                self.links.remove(link)
        self.start()

    def adopt(self, saved: list[dict[str, Any]]) -> None:
        """Workers of the previous process: they finish their connections, then exit."""
        for entry in saved:
            sock = socket.socket(fileno=int(entry["fd"]))
            sock.setblocking(False)
            os.set_inheritable(sock.fileno(), False)
            admitted: Counter[tuple[str, str]] = Counter()
            for rid, source, n in entry["admitted"]:
                admitted[str(rid), str(source)] += int(n)
                for _ in range(int(n)):
                    self.rt.recount("tcp", str(rid), str(source))
            link = WorkerLink(self.rt, int(entry["pid"]), sock, admitted)
            link.drain()
            self.links.append(link)

    def saved(self) -> list[dict[str, Any]]:
        return [link.saved() for link in self.links if not link.gone]

    def fds(self) -> list[int]:
        return [link.fd for link in self.links if not link.gone]

    def stop(self) -> None:
        for link in self.links:
            if not link.gone:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(link.pid, signal.SIGTERM)
        for link in self.links:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(link.pid, 0)
