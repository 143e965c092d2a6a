"""PROXY protocol version 2 headers (haproxy's proxy-protocol.txt, section 2.2), pure.

The proxy sends one before the first byte of a TCP connection and in front of every
UDP datagram it forwards, naming the client's address and port and the public
address and port the client reached, so the app sees who is talking.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21  # version 2, command PROXY
TCP4, UDP4, TCP6, UDP6 = 0x11, 0x12, 0x21, 0x22

Address = tuple[str, int]


def _ip(text: str) -> IPv4Address | IPv6Address:
    addr = ip_address(text.split("%", 1)[0])
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _v6(addr: IPv4Address | IPv6Address) -> IPv6Address:
    return IPv6Address(f"::ffff:{addr}") if addr.version == 4 else IPv6Address(addr)


def header(source: Address, destination: Address, datagram: bool) -> bytes:
    """The v2 header for a flow from `source` to `destination` (host, port) pairs."""
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:  # cannot happen with our sockets; name both in v6
        src, dst = _v6(src), _v6(dst)
    family = (UDP4 if datagram else TCP4) if src.version == 4 else (UDP6 if datagram else TCP6)
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return SIGNATURE + struct.pack("!BBH", VERSION_PROXY, family, len(body)) + body


def parse(data: bytes) -> tuple[int, Address, Address, bytes]:
    """(family byte, source, destination, rest): the inverse, for tests and tools."""
    if data[:12] != SIGNATURE or len(data) < 16:
        raise ValueError("not a PROXY protocol v2 header")
    version, family, length = struct.unpack("!BBH", data[12:16])
    if version != VERSION_PROXY:
        raise ValueError(f"unexpected version/command byte {version:#x}")
    body, rest = data[16 : 16 + length], data[16 + length :]
    size = 4 if family in (TCP4, UDP4) else 16
    if family not in (TCP4, UDP4, TCP6, UDP6) or length < 2 * size + 4:
        raise ValueError(f"unexpected family {family:#x} or length {length}")
    src = ip_address(body[:size])
    dst = ip_address(body[size : 2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return family, (str(src), sport), (str(dst), dport), rest
