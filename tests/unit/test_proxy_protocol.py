"""PROXY protocol v2: the header's exact bytes, and what the kernel backends do with the option."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natports.backends import select
from natports.model import Backend, Protocol, Route, RouteKey
from natports.proxy import proxyproto


def test_tcp4_header_bytes() -> None:
    head = proxyproto.header(("198.51.100.7", 40000), ("203.0.113.1", 25), datagram=False)
    assert head == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 address bytes
        + bytes([198, 51, 100, 7, 203, 0, 113, 1])
        + (40000).to_bytes(2, "big")
        + (25).to_bytes(2, "big")
    )


def test_udp6_header_and_parse() -> None:
    head = proxyproto.header(("2001:db8::7", 5353), ("2001:db8::1", 53), datagram=True)
    assert len(head) == 16 + 36
    assert head[13] == proxyproto.UDP6
    family, src, dst, rest = proxyproto.parse(head + b"payload")
    assert (family, src, dst, rest) == (
        proxyproto.UDP6,
        ("2001:db8::7", 5353),
        ("2001:db8::1", 53),
        b"payload",
    )


def test_a_v4_client_on_a_v6_socket_is_named_as_v4() -> None:
    head = proxyproto.header(("::ffff:198.51.100.7", 1), ("::ffff:203.0.113.1", 2), False)
    assert proxyproto.parse(head)[:3] == (
        proxyproto.TCP4,
        ("198.51.100.7", 1),
        ("203.0.113.1", 2),
    )


def test_parse_refuses_what_is_not_a_header() -> None:
    with pytest.raises(ValueError, match="not a PROXY protocol v2 header"):
        proxyproto.parse(b"GET / HTTP/1.1\r\n\r\n")


addresses = st.one_of(
    st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
)


@given(st.data())
def test_header_round_trips(data: st.DataObject) -> None:
    src = data.draw(addresses)
    dst = data.draw(
        st.ip_addresses(v=src.version).filter(lambda a: getattr(a, "ipv4_mapped", None) is None)
    )
    ports = data.draw(st.tuples(st.integers(0, 65535), st.integers(0, 65535)))
    datagram = data.draw(st.booleans())
    payload = data.draw(st.binary(max_size=64))
    head = proxyproto.header((str(src), ports[0]), (str(dst), ports[1]), datagram)
    family, s, d, rest = proxyproto.parse(head + payload)
    assert (s, d, rest) == ((str(src), ports[0]), (str(dst), ports[1]), payload)
    assert family == (0x10 if src.version == 4 else 0x20) | (2 if datagram else 1)


# -- kernel backends: refused -------------------------------------------------------------------


def route(app: str, port: int, proxy_protocol: bool) -> Route:
    return Route(
        app,
        "web",
        RouteKey(4, Protocol.TCP, port),
        5025,
        (Backend("c", ip_address("172.17.0.2"), 5025),),
        proxy_protocol=proxy_protocol,
    )


def test_kernel_backends_refuse_the_option_with_a_reason() -> None:
    asking = [route("mail", 25, True), route("mail", 25, True), route("mail", 465, True)]
    assert select.unsupported("nftables", asking) == [
        'app "mail": 25/tcp asks for proxy-protocol, which only the proxy backend can send; '
        "the nftables backend keeps client addresses without it: remove the option from "
        "PORTS, or use --backend proxy",
        'app "mail": 465/tcp asks for proxy-protocol, which only the proxy backend can send; '
        "the nftables backend keeps client addresses without it: remove the option from "
        "PORTS, or use --backend proxy",
    ]
    assert select.unsupported("nftables", [route("web", 80, False)]) == []


def test_the_proxy_backend_takes_the_option() -> None:
    assert select.unsupported("proxy", [route("mail", 25, True)]) == []
    assert select.unsupported("iptables", [route("mail", 25, False)]) == []
    assert len(select.unsupported("iptables", [route("mail", 25, True)])) == 1
