"""Sockets that outlive a process: systemd socket activation (our re-exec: handover.py).

systemd passes listening sockets as fds 3.. with LISTEN_FDS/LISTEN_PID
(sd_listen_fds(3)); we match them to routes by what they are bound to.
"""

from __future__ import annotations

import contextlib
import os
import socket

from ..model import Protocol, RouteKey

SD_LISTEN_FDS_START = 3


def adopt_socket(fd: int) -> socket.socket:
    """A socket passed down to us: ours alone (not inherited further), non-blocking."""
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def systemd_sockets() -> list[socket.socket]:
    """sd_listen_fds(unset_environment=1): the sockets systemd passed to *this* process."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # our children (and re-execs) must not take them again
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid():
        return []
    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            sockets.append(adopt_socket(fd))
        except OSError:
            continue  # not a socket (a FIFO unit, say): not ours to use
    return sockets


def socket_serves(sock: socket.socket, key: RouteKey) -> bool:
    """Whether an inherited socket is bound exactly where `key` wants to listen."""
    want_type = socket.SOCK_STREAM if key.protocol is Protocol.TCP else socket.SOCK_DGRAM
    if sock.type != want_type or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        name = sock.getsockname()
        v6only = (
            sock.family == socket.AF_INET6
            and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        )
        if want_type == socket.SOCK_STREAM:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            if not listening:
                return False
    except OSError:
        return False
    family = 4 if sock.family == socket.AF_INET else 6
    return address_matches(key, family, str(name[0]), int(name[1]), v6only)


def address_matches(key: RouteKey, family: int, host: str, port: int, v6only: bool) -> bool:
    """Pure part of socket_serves. A dual-stack [::] socket also serves IPv4 wildcard keys."""
    if port != key.public_port:
        return False
    if key.public_ip is None:
        if family == key.family:
            return host in ("0.0.0.0", "::")
        return key.family == 4 and family == 6 and host == "::" and not v6only
    return family == key.family and host == str(key.public_ip)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.connect(address)
        sock.sendall(message.encode())
