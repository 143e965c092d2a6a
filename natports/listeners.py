"""Which host processes listen on which ports, read from /proc (the host's netns)."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from .model import IPAddress, Protocol
from .policy import HostListener

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


def host_listeners(proc: Path = Path("/proc")) -> list[HostListener]:
    owners = _socket_owners(proc)
    found: list[HostListener] = []
    for name, protocol, state in (
        ("tcp", Protocol.TCP, _TCP_LISTEN),
        ("tcp6", Protocol.TCP, _TCP_LISTEN),
        ("udp", Protocol.UDP, _UDP_UNCONNECTED),
        ("udp6", Protocol.UDP, _UDP_UNCONNECTED),
    ):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != state:
                continue
            local_hex, port_hex = fields[1].split(":")
            remote_port = int(fields[2].split(":")[1], 16)
            if protocol is Protocol.UDP and remote_port != 0:
                continue  # a connected UDP socket is a client, not a server
            ip = _decode_addr(local_hex)
            port = int(port_hex, 16)
            found.append(
                HostListener(protocol, ip, port, owners.get(fields[9], "an unknown process"))
            )
    return found


def _decode_addr(hex_addr: str) -> IPAddress:
    raw = bytes.fromhex(hex_addr)
    # /proc prints each 32-bit word in host (little-endian on our targets) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return IPv4Address(words)
    addr = IPv6Address(words)
    mapped = addr.ipv4_mapped
    return mapped if mapped is not None else addr


def _socket_owners(proc: Path) -> dict[str, str]:
    """socket inode -> "comm (pid N)"; best effort, as only root sees every process."""
    owners: dict[str, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            for fd in os.scandir(entry / "fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    owners.setdefault(target[8:-1], f"{comm} (pid {entry.name})")
        except OSError:
            continue
    return owners
