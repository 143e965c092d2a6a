"""The daemon's control socket, both sides: one request line in, one answer line out.

The client side (`request`) is what natports.backends.proxy uses; the daemon's
side accepts connections from root only and hands each line to the daemon.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import NatportsError
from .handover import ClientState
from .loop import ERR, HUP, IN, OUT, Loop

MAX_REPLY = 16 * 1024 * 1024


class NoDaemon(OSError):
    """Nothing listens on the control socket (no file, or a stale one)."""


def request(path: Path, command: str, timeout: float) -> str:
    """Send `command`, return the daemon's one-line answer (without the newline).

    Raises NoDaemon when no daemon listens, TimeoutError when it does not answer
    in `timeout` seconds, ConnectionError when it hangs up without answering.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoDaemon(exc.errno, f"no daemon listens on {path}") from None
        sock.sendall(command.encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {command!r} within {timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no answer to {command!r} within {timeout:g} s") from None
            if not chunk:
                raise ConnectionError(f"the daemon hung up without answering {command!r}")
            data += chunk
            if len(data) > MAX_REPLY:
                raise ConnectionError("the daemon's answer is too long")
        return data[:-1].decode("utf-8", "replace")


# -- the daemon's side --------------------------------------------------------------------------

MAX_COMMAND = 4096

Dispatch = Callable[[str, "ControlConn"], "str | None"]


class ControlConn:
    """One control connection: one request line, one answer line, then closed."""

    def __init__(
        self,
        loop: Loop,
        conns: set[ControlConn],
        sock: socket.socket,
        dispatch: Dispatch,
        inbuf: bytes = b"",
        outbuf: bytes = b"",
    ) -> None:
        self.loop = loop
        self.conns = conns
        self.sock = sock
        self.fd = sock.fileno()
        self.dispatch = dispatch
        self.inbuf = bytearray(inbuf)
        self.outbuf = bytearray(outbuf)
        self.waiting = False  # asked for a restart: the next process answers
        self.closed = False
        conns.add(self)
        loop.add(self.fd, self.on_event, IN)
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
        self.loop.modify(self.fd, 0)  # no more reading: one request per connection
        reply = self.dispatch(line, self)
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
            self.loop.modify(self.fd, OUT)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conns.discard(self)
            self.loop.remove(self.fd)
            self.sock.close()

    def snapshot(self) -> ClientState:
        return ClientState(self.fd, bytes(self.inbuf), bytes(self.outbuf), self.waiting)


def accept_control(server: socket.socket) -> list[socket.socket]:
    """Pending control connections from root or our own user (the socket is 0600 anyway)."""
    accepted: list[socket.socket] = []
    for _ in range(64):
        try:
            sock, _addr = server.accept()
        except BlockingIOError:
            break
        except OSError:
            if accepted:  # serve these; the error comes back on the next event
                break
            raise
        sock.setblocking(False)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            sock.close()
            continue
        accepted.append(sock)
    return accepted


def bind_control(path: Path) -> socket.socket:
    """Bind under a temporary name, chmod 0600, rename: never a moment with open modes."""
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
