"""The natports proxy daemon: public ports served from userspace, for hosts without netfilter.

It serves the routes of a config file (see config.py) and is driven through a
unix socket in the state directory, one line per request:

    reload   re-read the config; answers `ok GENERATION` once it is live, or `error MESSAGE`
    status   one line of JSON: routes, counters, connections
    restart  re-exec (new code) keeping every socket; the new process answers `ok GENERATION`
    ping     `ok GENERATION`

A reload changes where *new* connections and UDP flows go; established ones keep
their backend until they end. Listeners of routes that stay are never closed, so
a reload refuses nothing. SIGHUP is `restart`, SIGTERM/SIGINT stop the daemon.

Environment knobs: NATPORTS_PROXY_SPLICE=0 (recv/send instead of splice),
NATPORTS_PROXY_UDP_IDLE (seconds, default 60), NATPORTS_PROXY_LOG (log level).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import NatportsError
from ..model import Protocol, Route, RouteKey
from .config import ConfigError, describe_key, read_config, route_id, socket_path
from .inherit import (
    HANDOVER_ENV,
    adopt_socket,
    handover_env,
    sd_notify,
    socket_serves,
    systemd_sockets,
    take_handover,
    write_handover,
)
from .relay import (
    ERR,
    HUP,
    IN,
    OUT,
    Listener,
    Relay,
    Stats,
    TcpConn,
    TcpListener,
    UdpListener,
    backend_text,
    log,
)

HANDOVER_VERSION = 1
UDP_IDLE = 60.0
LISTEN_BACKLOG = 4096
IP_FREEBIND = 15  # listen on a fixed address even before it is configured (boot order)
MAX_COMMAND = 4096
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


class ControlClient:
    """One control connection: one request line, one answer line, then closed."""

    def __init__(
        self, daemon: Daemon, sock: socket.socket, inbuf: bytes = b"", outbuf: bytes = b""
    ) -> None:
        self.daemon = daemon
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray(inbuf)
        self.outbuf = bytearray(outbuf)
        self.waiting = False  # asked for a restart: the next process answers
        self.closed = False
        daemon.clients.add(self)
        daemon.relay.loop.add(self.fd, self.on_event, IN)
        if self.outbuf:
            self.flush()

    def on_event(self, events: int) -> None:
        if events & OUT:
            self.flush()
        if self.closed:
            return
        if events & IN and not self.waiting and not self.outbuf:
            self._read()
        elif events & (HUP | ERR):
            self.close()

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_COMMAND)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.inbuf += data
        if b"\n" not in self.inbuf:
            if len(self.inbuf) > MAX_COMMAND:
                self.answer("error command too long")
            return
        line = bytes(self.inbuf.split(b"\n", 1)[0]).decode("utf-8", "replace").strip()
        self.inbuf.clear()
        self.daemon.relay.loop.modify(self.fd, 0)  # no more reading: one request per connection
        reply = self.daemon.command(line, self)
        if reply is not None:
            self.answer(reply)

    def answer(self, text: str) -> None:
        self.waiting = False
        self.outbuf += (" ".join(text.splitlines()) + "\n").encode()
        self.flush()

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        del self.outbuf[:sent]
        if self.outbuf:
            self.daemon.relay.loop.modify(self.fd, OUT)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.daemon.clients.discard(self)
            self.daemon.relay.loop.remove(self.fd)
            self.sock.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "fd": self.fd,
            "inbuf": base64.b64encode(bytes(self.inbuf)).decode(),
            "outbuf": base64.b64encode(bytes(self.outbuf)).decode(),
            "waiting": self.waiting,
        }


class Daemon:
    def __init__(
        self, state_dir: Path, config_path: Path, splice: bool = True, udp_idle: float = UDP_IDLE
    ) -> None:
        self.state_dir = state_dir
        self.config_path = config_path
        self.socket_path = socket_path(state_dir)
        self.udp_idle = udp_idle
        self.relay = Relay(splice)
        self.listeners: dict[RouteKey, Listener] = {}
        self.routes: dict[RouteKey, Route] = {}
        self.errors: dict[RouteKey, str] = {}
        self.spare: list[socket.socket] = []  # inherited from systemd, not (yet) routed
        self.generation = 0
        self.restarts = 0
        self.started = time.time()
        self.control: socket.socket | None = None
        self.control_owned = True  # we created the socket file (not systemd): we remove it
        self.clients: set[ControlClient] = set()
        self.stopping = False
        self.restart_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        self._signals()
        handover = take_handover()
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
                "splice" if self.relay.splice else "recv/send",
                self.socket_path,
            )
        for sock in self.spare:
            log.warning("inherited socket %s matches no route: kept unused", _sockname(sock))
        # Signals that arrived during an exec were held back (blocked): take them now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={len(self.routes)} routes")

    def _signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.relay.loop.add(self._wake_r, self._drain_wakeup, IN)
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
            self.control = self._bind_control()
        self.relay.loop.add(self.control.fileno(), self._on_control, IN)

    def _bind_control(self) -> socket.socket:
        """Bind under a temporary name, chmod 0600, rename: never a moment with open modes."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # stale: its daemon died
                else:
                    raise NatportsError(
                        f"a natports proxy is already running ({path} answers)",
                        "systemctl status natports-proxy",
                    )
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(64)
            os.replace(tmp, path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise NatportsError(f"cannot create {path}: {exc.strerror}", "run as root") from None
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        next_tick = time.monotonic() + 1.0
        while not self.stopping:
            self.relay.loop.poll(1.0)
            if self.restart_requested:
                self.restart_requested = False
                self._restart()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                self.relay.tick(now)
                for listener in self.listeners.values():
                    if isinstance(listener, UdpListener):
                        listener.sweep(now, self.udp_idle)
        self._shutdown()

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("stopping: %d connections closed", len(self.relay.conns))
        for listener in self.listeners.values():
            listener.sock.close()
        for conn in list(self.relay.conns):
            conn.close()
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

    def _listen(self, route: Route) -> Listener:
        key = route.key
        cls = TcpListener if key.protocol is Protocol.TCP else UdpListener
        for sock in self.spare:
            if socket_serves(sock, key):
                self.spare.remove(sock)
                return cls(self.relay, sock, route, "systemd")
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
        log.info("listening on %s for %s", describe_key(key), route_id(route))
        return cls(self.relay, sock, route, "bound")

    def _unlisten(self, listener: Listener) -> None:
        """Undo _listen of a listener never started (a failed reload)."""
        if listener.origin == "systemd":
            self.spare.append(listener.sock)
        else:
            listener.sock.close()

    # -- control ------------------------------------------------------------------------------

    def _on_control(self, events: int) -> None:
        assert self.control is not None
        for _ in range(64):
            try:
                sock, _addr = self.control.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("control socket: accept: %s", exc)
                return
            sock.setblocking(False)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.getuid()):
                sock.close()  # the socket is 0600 already; this is belt and braces
                continue
            ControlClient(self, sock)

    def command(self, line: str, client: ControlClient) -> str | None:
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
            routes = read_config(self.config_path)
            summary = self._apply(routes, strict=True)
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
            stats = self.relay.stats.get(rid) or Stats()
            listener = self.listeners.get(key)
            routes.append(
                {
                    "id": rid,
                    **route.to_json(),
                    "listening": listener is not None,
                    "origin": None if listener is None else listener.origin,
                    "error": self.errors.get(key),
                    "targets": [backend_text(b) for b in route.backends],
                    "connections": stats.connections,
                    "bytes": stats.bytes,
                    "active": stats.active,
                }
            )
        flows = sum(len(x.flows) for x in self.listeners.values() if isinstance(x, UdpListener))
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "restarts": self.restarts,
            "started": self.started,
            "splice": self.relay.splice,
            "udp_idle": self.udp_idle,
            "config": str(self.config_path),
            "routes": routes,
            "tcp_connections": len(self.relay.conns),
            "udp_flows": flows,
            "unused_sockets": [_sockname(s) for s in self.spare],
        }

    # -- restart: hand every fd to our own re-exec ---------------------------------------------

    def _restart(self) -> None:
        state, fds = self._snapshot()
        memfd = write_handover(state)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ)
        env[HANDOVER_ENV] = handover_env(memfd)
        argv = list(sys.orig_argv)
        in_flight = sum(
            (p["pending"] or 0) + len(base64.b64decode(p["data"] or ""))
            for c in state["tcp"]
            for p in (c["c2u"], c["u2c"])
            if p is not None
        )
        log.info(
            "restarting: %s (%d connections, %d bytes in flight handed over)",
            " ".join(argv),
            len(state["tcp"]),
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
            for client in list(self.clients):
                if client.waiting:
                    client.answer(f"error cannot re-exec {sys.executable}: {exc}")

    def _snapshot(self) -> tuple[dict[str, Any], list[int]]:
        now = time.monotonic()
        fds: list[int] = []
        listeners = []
        for listener in self.listeners.values():
            fds.append(listener.fd)
            flows = []
            if isinstance(listener, UdpListener):
                for flow in listener.flows.values():
                    fds.append(flow.fd)
                    flows.append(flow.snapshot(now))
            listeners.append(
                {
                    "route": listener.route.to_json(),
                    "fd": listener.fd,
                    "rr": listener.rr,
                    "origin": listener.origin,
                    "flows": flows,
                }
            )
        conns = []
        for conn in self.relay.conns:
            fds += conn.fds()
            conns.append(conn.snapshot())
        clients = []
        for client in self.clients:
            fds.append(client.fd)
            clients.append(client.snapshot())
        assert self.control is not None
        fds.append(self.control.fileno())
        fds += [s.fileno() for s in self.spare]
        state = {
            "version": HANDOVER_VERSION,
            "generation": self.generation,
            "restarts": self.restarts + 1,
            "started": self.started,
            "routes": [r.to_json() for r in self.routes.values()],
            "listeners": listeners,
            "spare": [s.fileno() for s in self.spare],
            "control": {"fd": self.control.fileno(), "owned": self.control_owned},
            "clients": clients,
            "stats": {rid: [s.connections, s.bytes] for rid, s in self.relay.stats.items()},
            "tcp": conns,
        }
        return state, fds

    def _adopt(self, state: dict[str, Any]) -> None:
        if state.get("version") != HANDOVER_VERSION:
            raise NatportsError("the previous natports proxy handed over an unknown state")
        self.generation = int(state["generation"])
        self.restarts = int(state["restarts"])
        self.started = float(state["started"])
        for rid, (connections, nbytes) in state["stats"].items():
            self.relay.stats[rid] = Stats(int(connections), int(nbytes))
        self.control = adopt_socket(int(state["control"]["fd"]))
        self.control_owned = bool(state["control"]["owned"])
        self.relay.loop.add(self.control.fileno(), self._on_control, IN)
        self.spare = [adopt_socket(int(fd)) for fd in state["spare"]]
        for entry in state["listeners"]:
            route = Route.from_json(entry["route"])
            sock = adopt_socket(int(entry["fd"]))
            listener: Listener
            if route.key.protocol is Protocol.TCP:
                listener = TcpListener(self.relay, sock, route, str(entry["origin"]))
            else:
                listener = UdpListener(self.relay, sock, route, str(entry["origin"]))
                for flow in entry["flows"]:
                    listener.adopt_flow(flow, self.relay.stats_for(str(flow["route_id"])))
            listener.rr = int(entry["rr"])
            listener.start()
            self.listeners[route.key] = listener
        routes = [Route.from_json(r) for r in state["routes"]]
        self.routes = {r.key: r for r in routes}
        for route in routes:  # routes that could not listen before: try again
            if route.key not in self.listeners:
                try:
                    listener = self._listen(route)
                except OSError as exc:
                    self.errors[route.key] = listen_failure(route.key, exc)
                    continue
                listener.start()
                self.listeners[route.key] = listener
        for conn in state["tcp"]:
            TcpConn.adopt(self.relay, conn)
        for entry in state["clients"]:
            sock = adopt_socket(int(entry["fd"]))
            client = ControlClient(
                self,
                sock,
                base64.b64decode(entry["inbuf"]),
                base64.b64decode(entry["outbuf"]),
            )
            if entry["waiting"]:
                client.answer(f"ok {self.generation}")
        log.info(
            "restarted (pid %d, restart %d): %d routes, %d connections taken over",
            os.getpid(),
            self.restarts,
            len(self.routes),
            len(self.relay.conns),
        )


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


def _sockname(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return name.decode() if isinstance(name, bytes) else str(name)


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("natports-proxy: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(os.environ.get("NATPORTS_PROXY_LOG", "INFO").upper())


def _raise_fd_limit() -> None:
    """Each TCP connection holds 6 fds (2 sockets, 2 pipes): take all the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(state_dir: Path, config_path: Path) -> None:
    """Run the proxy until SIGTERM/SIGINT (blocking); log lines go to stderr.

    Raises NatportsError when it cannot start (another daemon runs, bad config).
    """
    _setup_logging()
    _raise_fd_limit()
    splice = hasattr(os, "splice") and os.environ.get("NATPORTS_PROXY_SPLICE", "1") != "0"
    try:
        udp_idle = float(os.environ.get("NATPORTS_PROXY_UDP_IDLE", UDP_IDLE))
    except ValueError:
        udp_idle = UDP_IDLE
    daemon = Daemon(state_dir, config_path, splice=splice, udp_idle=max(udp_idle, 0.5))
    daemon.start()
    daemon.run()
