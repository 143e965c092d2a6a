"""Decoding set elements from netlink dumps (nft_netlink.decode_elements), on crafted bytes.

The kernel tests check the read against nft's own JSON on a real table; these check
the two ways an element is walked: its key first (the kernel's layout, read in place)
and any other attribute order (the generic walk), which must agree.
"""

from __future__ import annotations

import socket
import struct

import pytest

from natports.backends import nft_netlink
from natports.backends.nft_netlink import Element, Unexpected, decode_elements


def attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def value(data: bytes) -> bytes:
    return attr(1, data)  # NFTA_DATA_VALUE


def proto_port(proto: int, port: int) -> bytes:
    return struct.pack("=I", proto) + struct.pack(">H", port) + b"\0\0"  # 32-bit fields


def counter(packets: int, size: int) -> bytes:
    data = attr(1, struct.pack(">Q", size)) + attr(2, struct.pack(">Q", packets))
    return attr(7, attr(1, b"counter\0") + attr(2, data))  # NFTA_SET_ELEM_EXPR


def dump(name: str, *elements: bytes) -> list[bytes]:
    listed = b"".join(attr(1, element) for element in elements)  # NFTA_LIST_ELEM
    return [attr(1, b"natports\0") + attr(2, name.encode() + b"\0") + attr(3, listed)]


FLAGS = attr(3, struct.pack(">I", 0))  # NFTA_SET_ELEM_FLAGS, written before the key here


@pytest.mark.parametrize("first", [b"", FLAGS])
def test_a_counted_key_reads_the_same_in_either_order(
    first: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[int] = []  # keys found by the attribute walk, not read in place
    generic = nft_netlink._value
    monkeypatch.setattr(
        nft_netlink,
        "_value",
        lambda buf, elem, kind: walked.append(kind) or generic(buf, elem, kind),
    )
    key = attr(1, value(proto_port(6, 25)))
    found = decode_elements("count_any4", dump("count_any4", first + key + counter(3, 180)))
    assert found == {"tcp . 25": Element(None, (3, 180))}
    assert walked == ([] if first == b"" else [1])  # the kernel's layout takes the fast path


@pytest.mark.parametrize("first", [b"", FLAGS])
def test_a_dnat_element_of_an_address_key(first: bytes) -> None:
    host = socket.inet_aton("203.0.113.7")
    key = attr(1, value(host + proto_port(17, 53)))
    data = attr(2, value(socket.inet_aton("172.17.0.2") + proto_port(0, 5053)[4:]))
    found = decode_elements("dnat_addr4", dump("dnat_addr4", first + key + data))
    assert found == {"203.0.113.7 . udp . 53": Element("172.17.0.2 . 5053", None)}


def test_a_key_of_another_length_or_protocol_is_unexpected() -> None:
    with pytest.raises(Unexpected):
        decode_elements("count_any4", dump("count_any4", attr(1, value(proto_port(6, 25)[:4]))))
    with pytest.raises(Unexpected):
        decode_elements("count_any4", dump("count_any4", attr(1, value(proto_port(1, 0)))))
    with pytest.raises(Unexpected):
        decode_elements("count_other4", [])


def test_malformed_attributes_are_unexpected_not_a_crash_or_a_hang() -> None:
    key = attr(1, value(proto_port(6, 25)))
    zero_size = struct.pack("=HH", 0, 1) + b"\0" * 8  # would never advance
    for element in (
        key + attr(11, zero_size),  # NFTA_SET_ELEM_EXPRESSIONS with a 0-length entry
        key + attr(7, attr(1, b"counter\0") + attr(2, zero_size)),
        key[:-6],  # a key cut short: its port is missing
    ):
        with pytest.raises(Unexpected):
            decode_elements("count_any4", dump("count_any4", element))
    data = attr(2, value(b"\0" * 5 + proto_port(0, 53)[4:]))  # a 5-byte IPv6 "address"
    with pytest.raises(Unexpected):
        decode_elements("dnat_any6", dump("dnat_any6", key + data))
