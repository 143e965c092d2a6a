"""The natports proxy daemon: public ports served from userspace, for hosts without netfilter.

(Over 400 lines: start, reload, status and the restart snapshot/adoption all read and
write the same daemon state; each relay job lives in its own module, listed below.)

It serves the routes of a config file (see config.py) and is driven through a
unix socket in the state directory, one line per request:

    reload   re-read the config; answers `ok GENERATION` once it is live, or `error MESSAGE`
    status   one line of JSON: routes, counters, connections
    restart  re-exec (new code) keeping every socket; the new process answers `ok GENERATION`
    ping     `ok GENERATION`

A reload changes where *new* connections and UDP flows go; established ones keep
their backend until they end. Listeners of routes that stay are never closed, so
a reload refuses nothing. SIGHUP is `restart`, SIGTERM/SIGINT stop the daemon.

Limits (caps, idle timeouts) come from `[proxy]` in the operator's natports.toml
(limits.py) and are re-read on every reload (a bad section refuses it; a restart is
refused too, before the exec). Environment knobs:
NATPORTS_PROXY_SPLICE=0 (recv/send instead of splice), NATPORTS_PROXY_UDP_IDLE
(seconds: the default of proxy.udp_idle), NATPORTS_PROXY_LOG (log level),
NATPORTS_PROXY_PIPE_MAX (bytes: the pipe a bulk direction grows to, tcp.PIPE_MAX).

The jobs live in: loop.py (epoll), runtime.py (shared counters, caps, fd
pressure), tcp.py and udp.py (relays), listeners.py (public sockets),
handover.py (restart state), control.py (control socket); this file ties them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import NatportsError
from ..model import Protocol, Route, RouteKey
from .config import ConfigError, read_config, route_id, socket_path
from .control import ControlConn, accept_control, bind_control
from .handover import (
    HANDOVER_ENV,
    FlowState,
    Handover,
    HandoverError,
    ListenerState,
    handover_env,
    take_handover,
    write_handover,
)
from .inherit import adopt_socket, sd_notify, socket_serves, systemd_sockets
from .limits import Limits, LimitsError, read_limits
from .listeners import Listener, TcpListener, bind_public, listen_failure
from .loop import IN, log, setup_logging
from .runtime import RouteStats, Runtime
from .tcp import TcpConn, backend_text
from .udp import UdpListener
from .workers import Workers


class Daemon:
    def __init__(
        self,
        state_dir: Path,
        config_path: Path,
        settings_path: Path | None = None,
        splice: bool = True,
        udp_idle: float | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.config_path = config_path
        self.settings_path = settings_path  # natports.toml: the [proxy] limits
        self.udp_idle_default = udp_idle
        self.socket_path = socket_path(state_dir)
        self.rt = Runtime(splice, Limits())
        self.listeners: dict[RouteKey, Listener] = {}
        self.routes: dict[RouteKey, Route] = {}
        self.errors: dict[RouteKey, str] = {}
        self.spare: list[socket.socket] = []  # inherited from systemd, not (yet) routed
        self.generation = 0
        self.restarts = 0
        self.started = time.time()
        self.control: socket.socket | None = None
        self.control_owned = True  # we created the socket file (not systemd): we remove it
        self.clients: set[ControlConn] = set()
        self.stopping = False
        self.restart_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # One fd kept back so the control socket answers even when connections took all.
        self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._control_paused = False

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        self._signals()
        try:
            self.rt.limits = read_limits(self.settings_path, self.udp_idle_default)
        except LimitsError as exc:
            raise NatportsError(f"cannot start: {exc}", "fix the [proxy] section") from None
        count = self.rt.limits.workers
        with contextlib.suppress(KeyError, ValueError):
            count = int(os.environ["NATPORTS_PROXY_WORKERS"])
        if count > 0:
            self.rt.workers = Workers(self.rt, count)
        try:
            handover = take_handover()
        except HandoverError as exc:
            message = f"the previous natports proxy handed over nothing usable: {exc}"
            raise NatportsError(message) from None
        if handover is not None:
            self._adopt(handover)
        else:
            self.spare = systemd_sockets()
            self._open_control()
            try:
                routes = read_config(self.config_path)
            except (ConfigError, OSError) as exc:
                raise NatportsError(
                    f"cannot use {self.config_path}: {exc}",
                    "fix or remove the file; `natports apply` writes it again",
                ) from None
            self._apply(routes, strict=False)
            log.info(
                "serving %d routes (generation %d, %s, control %s)",
                len(self.routes),
                self.generation,
                "splice" if self.rt.splice else "recv/send",
                self.socket_path,
            )
        if self.rt.workers is not None:
            self.rt.workers.start()
        for sock in self.spare:
            log.warning("inherited socket %s matches no route: kept unused", _sockname(sock))
        # Signals that arrived during an exec were held back (blocked): take them now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={len(self.routes)} routes")

    def _signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.rt.loop.add(self._wake_r, self._drain_wakeup, IN)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.restart_requested = True
        else:
            self.stopping = True

    def _drain_wakeup(self, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _open_control(self) -> None:
        for sock in self.spare:
            if sock.family == socket.AF_UNIX and _sockname(sock) == str(self.socket_path):
                self.spare.remove(sock)
                self.control, self.control_owned = sock, False
                break
        else:
            self.control = bind_control(self.socket_path)
        self.rt.loop.add(self.control.fileno(), self._on_control, IN)

    def run(self) -> None:
        next_tick = time.monotonic() + 1.0
        while not self.stopping:
            self.rt.loop.poll(1.0)
            if self.restart_requested:
                self.restart_requested = False
                self._restart()
            now = self.rt.loop.now
            if now >= next_tick:
                next_tick = now + 1.0
                self._tick(now)
        self._shutdown()

    def _tick(self, now: float) -> None:
        self.rt.tick(now)
        self._refill_reserve()
        if self.rt.workers is not None:
            self.rt.workers.tick()
        for conn in list(self.rt.conns):
            conn.tick(now)
        for listener in self.listeners.values():
            if isinstance(listener, UdpListener):
                listener.sweep(now)

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("stopping: %d connections closed", len(self.rt.conns))
        for listener in self.listeners.values():
            listener.sock.close()
        for conn in list(self.rt.conns):
            conn.close()
        if self.rt.workers is not None:
            self.rt.workers.stop()
        for client in list(self.clients):
            client.close()
        if self.control is not None:
            self.control.close()
            if self.control_owned:
                with contextlib.suppress(OSError):
                    self.socket_path.unlink()

    # -- routes -------------------------------------------------------------------------------

    def _apply(self, routes: Iterable[Route], strict: bool) -> str:
        """Make `routes` live. strict: a new route that cannot listen fails the whole reload."""
        desired = {r.key: r for r in routes}
        opened: dict[RouteKey, Listener] = {}
        errors: dict[RouteKey, str] = {}
        for key, route in desired.items():
            if key in self.listeners:
                continue
            try:
                opened[key] = self._listen(route)
            except OSError as exc:
                message = listen_failure(key, exc)
                if strict and key not in self.routes:
                    for listener in opened.values():
                        self._unlisten(listener)
                    raise ConfigError(message) from None
                errors[key] = message
                log.error("%s (%s)", message, route_id(route))
        changed = 0
        for key, listener in self.listeners.items():
            if key in desired and desired[key] != listener.route:
                listener.set_route(desired[key])
                changed += 1
            else:
                listener.refresh_limits()
        removed = [key for key in self.listeners if key not in desired]
        for key in removed:
            listener = self.listeners.pop(key)
            log.info("stopped listening on %s", listener.describe())
            listener.retire()
        for key, listener in opened.items():
            listener.start()
            self.listeners[key] = listener
        self.routes = desired
        self.errors = errors
        self.generation += 1
        return f"{len(opened)} added, {len(removed)} removed, {changed} changed"

    def _listen(
        self, route: Route, sock: socket.socket | None = None, origin: str = ""
    ) -> Listener:
        cls = TcpListener if route.key.protocol is Protocol.TCP else UdpListener
        if sock is None:
            for spare in self.spare:
                if socket_serves(spare, route.key):
                    self.spare.remove(spare)
                    sock, origin = spare, "systemd"
                    break
            else:
                sock, origin = bind_public(route.key), "bound"
        return cls(self.rt, sock, route, origin)

    def _unlisten(self, listener: Listener) -> None:
        """Undo _listen of a listener never started (a failed reload)."""
        if listener.origin == "systemd":
            self.spare.append(listener.sock)
        else:
            listener.sock.close()

    # -- control ------------------------------------------------------------------------------

    def _on_control(self, events: int) -> None:
        """Accept control clients; when fds ran out, the reserved one lets `status` answer."""
        assert self.control is not None
        try:
            accepted = accept_control(self.control)
        except OSError as exc:
            if self._reserve < 0:  # spent: listen again on the next tick, do not spin
                self.rt.loop.modify(self.control.fileno(), 0)
                self._control_paused = True
                self.rt.out_of_fds("control accept", exc)
                return
            os.close(self._reserve)
            self._reserve = -1
            try:
                accepted = accept_control(self.control)
            except OSError:
                return
        for sock in accepted:
            ControlConn(self.rt.loop, self.clients, sock, self.command)

    def _refill_reserve(self) -> None:
        if self._reserve < 0:
            with contextlib.suppress(OSError):
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if self._control_paused and self.control is not None:
            self._control_paused = False
            self.rt.loop.modify(self.control.fileno(), IN)

    def command(self, line: str, client: ControlConn) -> str | None:
        if line == "reload":
            return self.reload()
        if line == "status":
            return json.dumps(self.status(), sort_keys=True)
        if line == "ping":
            return f"ok {self.generation}"
        if line == "restart":
            client.waiting = True
            self.restart_requested = True
            return None
        return f"error unknown command {line[:40]!r} (reload, status, restart, ping)"

    def reload(self) -> str:
        try:
            limits = read_limits(self.settings_path, self.udp_idle_default)
        except LimitsError as exc:
            log.error("reload refused, generation %d stays: %s", self.generation, exc)
            return f"error {exc}"
        try:
            routes = read_config(self.config_path)
            old, self.rt.limits = self.rt.limits, limits
            try:
                summary = self._apply(routes, strict=True)
            except ConfigError:
                self.rt.limits = old
                raise
        except ConfigError as exc:
            log.error("reload refused, generation %d stays: %s", self.generation, exc)
            return f"error {self.config_path}: {exc}"
        except OSError as exc:
            return f"error cannot read {self.config_path}: {exc.strerror or exc}"
        log.info("generation %d: %d routes (%s)", self.generation, len(self.routes), summary)
        return f"ok {self.generation}"

    def status(self) -> dict[str, Any]:
        routes = []
        for key, route in sorted(self.routes.items(), key=lambda kv: kv[0].sort_key()):
            rid = route_id(route)
            stats = self.rt.stats.get(rid) or RouteStats()
            listener = self.listeners.get(key)
            limits = self.rt.limits.for_route(route)
            routes.append(
                {
                    "id": rid,
                    **route.to_json(),
                    "listening": listener is not None,
                    "origin": None if listener is None else listener.origin,
                    "error": self.errors.get(key),
                    "targets": [backend_text(b) for b in route.backends],
                    **stats.to_json(),
                    "limits": {
                        k: getattr(limits, k)
                        for k in ("route_max_tcp", "route_max_udp_flows", "tcp_idle", "udp_idle")
                    },
                }
            )
        now = self.rt.loop.now
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "restarts": self.restarts,
            "started": self.started,
            "splice": self.rt.splice,
            "udp_idle": self.rt.limits.route.udp_idle,
            "limits": self.rt.limits.to_json(),
            "config": str(self.config_path),
            "routes": routes,
            "tcp_connections": self.rt.tcp_open,
            "workers": []
            if self.rt.workers is None
            else [
                {"pid": w.pid, "draining": w.draining, "connections": w.admitted.total()}
                for w in self.rt.workers.links
                if not w.gone
            ],
            "udp_flows": self.rt.udp_open,
            "accepting_paused": self.rt.paused,
            "backends_backing_off": [f"{h}:{p}" for h, p in self.rt.health.backing_off(now)],
            "unused_sockets": [_sockname(s) for s in self.spare],
        }

    # -- restart: hand every fd to our own re-exec ---------------------------------------------

    def _restart(self) -> None:
        try:  # the re-exec reads [proxy] at start and would exit on a bad one, cutting all
            read_limits(self.settings_path, self.udp_idle_default)
        except LimitsError as exc:
            log.error("restart refused, this process keeps serving: %s", exc)
            self._answer_waiting(f"error {exc}")
            return
        state = self._snapshot()
        fds = state.fds()
        memfd = write_handover(state)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ)
        env[HANDOVER_ENV] = handover_env(memfd)
        argv = list(sys.orig_argv)
        in_flight = sum(c.in_flight() for c in state.tcp)
        log.info(
            "restarting: %s (%d connections, %d bytes in flight handed over)",
            " ".join(argv),
            len(state.tcp),
            in_flight,
        )
        for handler in log.handlers:
            handler.flush()
        # A second SIGHUP during the new interpreter's start-up must wait, not kill it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            os.execve(sys.executable, argv, env)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            for fd in fds:
                os.set_inheritable(fd, False)
            os.close(memfd)
            log.error("restart failed, this process keeps serving: %s", exc)
            self._answer_waiting(f"error cannot re-exec {sys.executable}: {exc}")

    def _answer_waiting(self, reply: str) -> None:
        """Answer the control clients waiting for a restart that did not happen."""
        for client in list(self.clients):
            if client.waiting:
                client.answer(reply)

    def _snapshot(self) -> Handover:
        now = self.rt.loop.now
        listeners = []
        for listener in self.listeners.values():
            flows: tuple[FlowState, ...] = ()
            if isinstance(listener, UdpListener):
                flows = tuple(flow.snapshot(now) for flow in listener.flows.values())
            listeners.append(
                ListenerState(listener.route, listener.fd, listener.rr, listener.origin, flows)
            )
        assert self.control is not None
        return Handover(
            generation=self.generation,
            restarts=self.restarts + 1,
            started=self.started,
            routes=tuple(self.routes.values()),
            listeners=tuple(listeners),
            spare=tuple(s.fileno() for s in self.spare),
            control=self.control.fileno(),
            control_owned=self.control_owned,
            clients=tuple(c.snapshot() for c in self.clients),
            stats={rid: s.saved() for rid, s in self.rt.stats.items()},
            tcp=tuple(conn.snapshot(now) for conn in self.rt.conns),
            workers=() if self.rt.workers is None else tuple(self.rt.workers.saved()),
        )

    def _adopt(self, state: Handover) -> None:
        self.generation = state.generation
        self.restarts = state.restarts
        self.started = state.started
        for rid, saved in state.stats.items():
            self.rt.stats[rid] = RouteStats.restored(saved)
        self.control = adopt_socket(state.control)
        self.control_owned = state.control_owned
        self.rt.loop.add(self.control.fileno(), self._on_control, IN)
        self.spare = [adopt_socket(fd) for fd in state.spare]
        for entry in state.listeners:
            listener = self._listen(entry.route, adopt_socket(entry.fd), entry.origin)
            if isinstance(listener, UdpListener):
                for flow in entry.flows:
                    listener.adopt_flow(flow)
            listener.rr = entry.rr
            listener.start()
            self.listeners[entry.route.key] = listener
        self.routes = {r.key: r for r in state.routes}
        for route in state.routes:  # routes that could not listen before: try again
            if route.key not in self.listeners:
                try:
                    listener = self._listen(route)
                except OSError as exc:
                    self.errors[route.key] = listen_failure(route.key, exc)
                    continue
                listener.start()
                self.listeners[route.key] = listener
        for conn in state.tcp:
            TcpConn.adopt(self.rt, conn)
        if state.workers:
            if self.rt.workers is None:  # workers turned off: the old ones still finish
                self.rt.workers = Workers(self.rt, 0)
            self.rt.workers.adopt(list(state.workers))
        for waiting in state.clients:
            client = ControlConn(
                self.rt.loop,
                self.clients,
                adopt_socket(waiting.fd),
                self.command,
                waiting.inbuf,
                waiting.outbuf,
            )
            if waiting.waiting:
                client.answer(f"ok {self.generation}")
        log.info(
            "restarted (pid %d, restart %d): %d routes, %d connections taken over",
            os.getpid(),
            self.restarts,
            len(self.routes),
            len(self.rt.conns),
        )


def _sockname(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return name.decode() if isinstance(name, bytes) else str(name)


def _raise_fd_limit() -> None:
    """Each busy TCP connection holds 6 fds (2 sockets, 2 pipes): take all the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(state_dir: Path, config_path: Path, settings_path: Path | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT (blocking); log lines go to stderr.

    `settings_path` is the operator's natports.toml ([proxy] limits; None: defaults).
    Raises NatportsError when it cannot start (another daemon runs, bad config).
    """
    setup_logging()
    _raise_fd_limit()
    splice = hasattr(os, "splice") and os.environ.get("NATPORTS_PROXY_SPLICE", "1") != "0"
    udp_idle: float | None = None
    with contextlib.suppress(KeyError, ValueError):
        udp_idle = max(float(os.environ["NATPORTS_PROXY_UDP_IDLE"]), 0.5)
    daemon = Daemon(state_dir, config_path, settings_path, splice=splice, udp_idle=udp_idle)
    daemon.start()
    daemon.run()
