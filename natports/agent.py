"""`natports watch`: the agent that keeps the kernel equal to the truth.

The host changes without asking natports: dockerd restarts and hands addresses out
again, restart policies restart containers elsewhere, a firewall reload flushes the
ruleset. The agent follows all of it:

- Docker's events: a container that dies or leaves a network is withdrawn as a
  backend at once, from the applied state alone (no Docker round trip), before its
  address can be handed to another container; a container that starts, restarts or
  joins a network makes its app be routed again.
- While Docker cannot be asked (its event stream ended: dockerd is restarting), the
  backends' init processes are watched in /proc instead; a dead one is withdrawn.
  When Docker answers again, every app is routed anew: nothing that changed meanwhile
  is lost.
- Every second: is each backend's skeleton still in the kernel? If not, it is put
  back from the applied state.
- Every `resync` seconds: every app is routed anew from the truth (Docker, the
  state), and host processes listening on routed ports are reported.

Every change goes through the engine under the store's lock, like a CLI apply.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import engine
from .containers import LABEL_APP, AppProblem
from .errors import NatportsError
from .listeners import host_listeners
from .metrics import AgentCounters
from .policy import HostListener
from .store import Store

HEARTBEAT = "agent.json"
TICK = 0.1  # how often /proc is looked at while Docker is away
DRIFT_EVERY = 1.0
HEARTBEAT_EVERY = 1.0

# Docker actions (the part before any ':' of an event's Action).
WITHDRAW = frozenset({"die", "destroy"})  # the address is, or is about to be, free
REROUTE = frozenset({"start", "restart", "unpause", "connect", "rename"})


@dataclass(frozen=True)
class Change:
    """What a Docker event means for natports."""

    container: str
    app: str | None  # from the container's label; None for network events
    withdraw: bool  # the container stops serving now


def classify(event: dict[str, Any]) -> Change | None:
    """Docker's event -> what to do, or None for events natports ignores. Pure."""
    kind = event.get("Type")
    action = str(event.get("Action") or event.get("status") or "").split(":")[0]
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    if kind == "container":
        cid = str(actor.get("ID") or event.get("id") or "")
        app = attributes.get(LABEL_APP)
        if not cid:
            return None
        if action in WITHDRAW:
            return Change(cid, app, withdraw=True)
        if action in REROUTE:
            return Change(cid, app, withdraw=False)
        return None
    if kind == "network" and action in ("connect", "disconnect"):
        cid = str(attributes.get("container") or "")
        return Change(cid, None, withdraw=action == "disconnect") if cid else None
    return None


def process_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time of a process (clock ticks since boot): a pid reused by another
    process has another start time. None when there is no such process."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) may hold spaces and parentheses: split after the last ')'.
    fields = text.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass
class Watched:
    """A backend container's init process, as last seen through Docker."""

    pid: int
    start_time: int


@dataclass
class Agent:
    ctx: engine.Context
    resync_every: float = 30.0
    metrics_file: Path | None = None
    log: Callable[[str], None] = field(default=lambda msg: _say(msg))
    counters: AgentCounters = field(default_factory=AgentCounters)
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    docker_up: bool = False
    watched: dict[str, Watched] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    # -- the loop ------------------------------------------------------------------

    def run(self, max_seconds: float | None = None) -> None:
        """Until SIGTERM/SIGINT (or max_seconds): a step in progress always completes, so
        the kernel and the state never part."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop.set())
        started = time.monotonic()
        self.counters.started = time.time()
        follower = threading.Thread(target=self._follow_docker, daemon=True)
        follower.start()
        self.repair()
        last_drift = last_beat = time.monotonic()
        last_resync = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if max_seconds is not None and now - started > max_seconds:
                break
            items = self._next_items(TICK)
            dead: set[str] = set()
            dirty: set[str] = set()
            resync = False
            for kind, value in items:
                if kind == "up":
                    self.docker_up = True
                    self.log("Docker answers: routing every app anew")
                    resync = True
                elif kind == "down":
                    if self.docker_up:
                        self.log("Docker's event stream ended: watching backends in /proc")
                    self.docker_up = False
                    self.ctx.forget_docker()
                elif kind == "event":
                    change = classify(value)
                    if change is None:
                        continue
                    if change.withdraw:
                        dead.add(change.container)
                    dirty |= self._apps_of(change)
            if not self.docker_up:
                dead |= self._dead_in_proc()
            if dead:
                self.withdraw(dead)
            now = time.monotonic()
            if self.docker_up and (resync or now - last_resync >= self.resync_every):
                self.resync()
                last_resync = now
                dirty = set()
            for app in sorted(dirty):
                self.reroute(app)
            if now - last_drift >= DRIFT_EVERY:
                self.repair()
                last_drift = now
            if now - last_beat >= HEARTBEAT_EVERY:
                self.beat()
                last_beat = now
        self.stop()

    def stop(self) -> None:
        self._stop.set()

    def _next_items(self, timeout: float) -> list[tuple[str, Any]]:
        try:
            items = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self.events.get_nowait())
        return items

    def _follow_docker(self) -> None:
        """Feed Docker's events into the queue; when the stream ends, say so and reconnect."""
        while not self._stop.is_set():
            try:
                import docker

                client = docker.from_env(timeout=5)
                client.ping()
                stream = client.api.events(decode=True, filters={"type": ["container", "network"]})
                # Subscribed first, then "up": a change between the two is not missed,
                # because "up" makes the loop route every app anew.
                self.events.put(("up", None))
                for event in stream:
                    self.events.put(("event", event))
                    if self._stop.is_set():
                        return
            except Exception:  # the SDK and requests raise many kinds; all mean "not now"
                pass
            self.events.put(("down", None))
            self._stop.wait(0.2)

    # -- actions -------------------------------------------------------------------

    def _apps_of(self, change: Change) -> set[str]:
        configured = set(self.ctx.store.apps())
        apps = {change.app} & configured if change.app else set()
        if not apps:
            apps = {a for a in self._backend_apps().get(change.container, ()) if a in configured}
        return apps

    def _backend_apps(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for app in self.ctx.store.applied_apps():
            record = self.ctx.store.applied(app)
            for route in record.routes if record else ():
                for b in route.backends:
                    found.setdefault(b.container_id, set()).add(app)
        return found

    def withdraw(self, dead: set[str]) -> None:
        """A failed withdraw keeps the containers watched: the next tick tries again."""
        changed: list[str] | None = None
        with self._step("withdraw"), self.ctx.store.locked():
            changed = engine.withdraw(self.ctx, dead)
        if changed is None:
            return
        for cid in dead:
            self.watched.pop(cid, None)
        if changed:
            self.counters.withdrawals += 1
            self.log(
                f"withdrew dead container(s) {', '.join(sorted(c[:12] for c in dead))} "
                f"from {', '.join(changed)}"
            )

    def reroute(self, app: str) -> None:
        start = time.monotonic()
        with self._step(f"route {app}"), self.ctx.store.locked():
            try:
                report = engine.apply_app_unlocked(self.ctx, app)
                if report.batch:
                    self.counters.applied(app, time.monotonic() - start)
            except AppProblem as exc:
                self.log(f"{app}: kept its previous routes to live containers: {exc.message}")
        self._watch_inspected()

    def resync(self) -> None:
        start = time.monotonic()
        with self._step("resync"), self.ctx.store.locked():
            report = engine.apply_all_unlocked(self.ctx)
            for app, why in sorted(report.failed.items()):
                self.log(f"{app}: kept its previous routes to live containers: {why}")
            self.counters.resyncs += 1
            self.counters.applied("*", time.monotonic() - start)
        self._watch_inspected()
        self.report_listeners()

    def repair(self) -> None:
        repaired: list[str] = []
        with self._step("drift check"), self.ctx.store.locked():
            repaired = engine.repair(self.ctx)
        if repaired:
            self.counters.repairs += 1
            self.log(f"natports' rules were gone from {', '.join(repaired)}: put back")

    def report_listeners(self) -> None:
        """A host process listening on a routed port gets no outside traffic: say so once."""
        for line in routed_listener_conflicts(self.ctx.store, host_listeners()):
            if line not in self._reported:
                self._reported.add(line)
                self.log(line)

    def _watch_inspected(self) -> None:
        for cid, info in self.ctx.inspected.items():
            if info.running and info.pid:
                started = process_start_time(info.pid)
                if started is not None:
                    self.watched[cid] = Watched(info.pid, started)
            else:
                self.watched.pop(cid, None)

    def _dead_in_proc(self) -> set[str]:
        """Watched containers whose init process is gone (Docker cannot be asked). Only
        /proc is read each tick; the state is read only when something died."""
        return {cid for cid, w in self.watched.items() if process_start_time(w.pid) != w.start_time}

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        try:
            yield
        except NatportsError as exc:
            self.counters.errors += 1
            self.log(f"{what} failed: {exc.message}")
            if "Docker" in exc.message:
                self.ctx.forget_docker()

    def beat(self) -> None:
        """The heartbeat `status` and `doctor` read, and the metrics file."""
        state = {
            "version": 1,
            "pid": os.getpid(),
            "heartbeat": time.time(),
            "docker": "up" if self.docker_up else "down",
            **self.counters.to_json(),
        }
        _write_quietly(self.ctx.store.root / HEARTBEAT, json.dumps(state) + "\n")
        if self.metrics_file is not None:
            from .metrics import render

            with contextlib.suppress(NatportsError):
                _write_quietly(self.metrics_file, render(self.ctx, state))


def _say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    print(f"{stamp} natports: {message}", file=sys.stderr, flush=True)


def _write_quietly(path: Path, text: str) -> None:
    """temp + rename without fsync: a heartbeat lost in a crash is worth nothing anyway."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def agent_state(state_dir: Path, max_age: float = 5.0) -> dict[str, Any] | None:
    """The running agent's heartbeat, or None when no agent is alive."""
    try:
        data = json.loads((state_dir / HEARTBEAT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = int(data.get("pid") or 0)
    alive = pid > 0 and Path(f"/proc/{pid}").exists()
    fresh = time.time() - float(data.get("heartbeat") or 0) <= max_age
    return data if alive and fresh else None


def routed_listener_conflicts(store: Store, listeners: Iterable[HostListener]) -> list[str]:
    """A line for each host listener on a port natports routes for an app (any port of a
    range). Reads only the state: `status`, `doctor` and the agent say the same."""
    lines: list[str] = []
    listeners = list(listeners)
    for app in store.applied_apps():
        record = store.applied(app)
        if record is None or record.backend == "proxy":  # the proxy's sockets are ours
            continue
        for route in record.routes:
            key, claim = route.key, route.claim()
            for lst in listeners:
                if key.public_port <= lst.port <= key.public_end and lst.shadowed_by(
                    claim, lst.port
                ):
                    lines.append(
                        f'port {lst.port}/{key.protocol} is routed to app "{app}", but '
                        f"{lst.process} now listens on it too: it gets no outside traffic on "
                        "that port; stop it, or remove the port from the app"
                    )
    return sorted(set(lines))
