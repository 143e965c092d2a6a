"""The client side of the daemon's control socket: one line out, one line back."""

from __future__ import annotations

import socket
import time
from pathlib import Path

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
