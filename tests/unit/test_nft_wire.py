"""nf_tables' netlink format of natports' set elements (nft_wire), on crafted bytes.

The kernel tests check the read against nft's own JSON on a real table, and the
netlink writes against the table nft's text makes; these check the two ways an
element is read (a fixed record in place, or any attribute order walked), that
both agree, that malformed input is refused, and the exact bytes written.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address

import pytest

from natports.backends import nft_wire
from natports.backends.nft_wire import Change, Elements, Unexpected, decode_elements
from natports.model import Backend, Protocol, Route, RouteKey


def attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def value(data: bytes) -> bytes:
    return attr(1, data)  # NFTA_DATA_VALUE


def proto_port(proto: int, port: int) -> bytes:
    return bytes([proto, 0, 0, 0]) + struct.pack(">H", port) + b"\0\0"  # 32-bit fields


def counter(packets: int, size: int) -> bytes:
    data = attr(1, struct.pack(">Q", size)) + attr(2, struct.pack(">Q", packets))
    return attr(7, attr(1, b"counter\0") + attr(2, data))  # NFTA_SET_ELEM_EXPR


def dump(name: str, *elements: bytes) -> list[bytes]:
    listed = b"".join(attr(1, element) for element in elements)  # NFTA_LIST_ELEM
    return [attr(1, b"natports\0") + attr(2, name.encode() + b"\0") + attr(3, listed)]


FLAGS = attr(3, struct.pack(">I", 0))  # NFTA_SET_ELEM_FLAGS, written before the key here
SMTP = proto_port(6, 25)


def route(key: RouteKey, *backends: tuple[str, int]) -> Route:
    return Route(
        app="mail",
        process_type="web",
        key=key,
        private_port=backends[0][1] if backends else 25,
        backends=tuple(
            Backend(f"c{i}", ip_address(ip), port) for i, (ip, port) in enumerate(backends)
        ),
    )


@pytest.mark.parametrize("first", [b"", FLAGS])
def test_a_counted_key_reads_the_same_in_either_order(
    first: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[str] = []  # payloads walked attribute by attribute, not read in place
    generic = nft_wire._walk
    monkeypatch.setattr(
        nft_wire, "_walk", lambda name, *args: walked.append(name) or generic(name, *args)
    )
    key = attr(1, value(SMTP))
    found = decode_elements("count_any4", dump("count_any4", first + key + counter(3, 180)))
    assert found.values == {SMTP: None}
    assert {k: nft_wire.counter(raw) for k, raw in found.counters.items()} == {SMTP: (3, 180)}
    assert walked == ([] if first == b"" else ["count_any4"])  # the kernel's layout: in place


@pytest.mark.parametrize("first", [b"", FLAGS])
def test_a_dnat_element_of_an_address_key(first: bytes) -> None:
    host = socket.inet_aton("203.0.113.7")
    key = attr(1, value(host + proto_port(17, 53)))
    target = socket.inet_aton("172.17.0.2") + proto_port(0, 5053)[4:]
    found = decode_elements("dnat_addr4", dump("dnat_addr4", first + key + attr(2, value(target))))
    assert found == Elements({host + proto_port(17, 53): target}, {})
    assert nft_wire.key_text("addr4", host + proto_port(17, 53)) == "203.0.113.7 . udp . 53"
    assert nft_wire.value_text("dnat_addr4", target) == "172.17.0.2 . 5053"


def test_a_range_and_a_goto_verdict_are_walked() -> None:
    verdict = attr(2, attr(1, struct.pack(">i", -4)) + attr(2, b"r_ftp_abc\0"))
    element = attr(1, value(SMTP)) + attr(10, value(proto_port(6, 30))) + attr(2, verdict)
    found = decode_elements("range_any4", dump("range_any4", element + counter(5, 500)))
    key = SMTP + proto_port(6, 30)
    assert found.values == {key: b"r_ftp_abc"} and nft_wire.counter(found.counters[key]) == (5, 500)
    assert nft_wire.key_text("any4", key) == "tcp . 25-30"
    assert nft_wire.value_text("range_any4", b"r_ftp_abc") == "goto r_ftp_abc"


def test_a_key_of_another_length_or_protocol_is_unexpected() -> None:
    with pytest.raises(Unexpected):
        decode_elements("count_any4", dump("count_any4", attr(1, value(SMTP[:4]))))
    with pytest.raises(Unexpected):
        decode_elements("count_any4", dump("count_any4", attr(1, value(proto_port(1, 0)))))
    with pytest.raises(Unexpected):  # in a fixed record too: the walk refuses it
        decode_elements("count_any4", dump("count_any4", attr(1, value(proto_port(132, 9)))))
    with pytest.raises(Unexpected):
        decode_elements("count_other4", [])
    with pytest.raises(Unexpected):
        nft_wire.key_text("any4", proto_port(1, 0))


def test_malformed_attributes_are_unexpected_not_a_crash_or_a_hang() -> None:
    key = attr(1, value(SMTP))
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
        nft_wire.value_text(
            "dnat_any6",
            nft_wire.decode_elements("dnat_any6", dump("dnat_any6", key + data)).values[SMTP],
        )


def test_keys_and_values_of_routes() -> None:
    smtp = route(RouteKey(4, Protocol.TCP, 25), ("172.17.0.2", 5025))
    assert nft_wire.key_bytes(smtp.key) == b"\x06\0\0\0\x00\x19\0\0"
    assert nft_wire.dnat_bytes(smtp) == socket.inet_aton("172.17.0.2") + b"\x13\xa1\0\0"
    dns = RouteKey(6, Protocol.UDP, 53, ip_address("2001:db8::1"))
    assert nft_wire.key_bytes(dns) == ip_address("2001:db8::1").packed + b"\x11\0\0\0\x00\x35\0\0"
    rtp = RouteKey(4, Protocol.UDP, 30000, None, 100)
    assert nft_wire.key_text("any4", nft_wire.key_bytes(rtp)) == "udp . 30000-30099"


def test_an_element_is_encoded_as_nft_would_and_reads_back() -> None:
    """The fixed headers (the fast encoder) equal the attribute-by-attribute build, and a
    list of them decodes to the same keys and values (NLA_F_NESTED masked on reading)."""
    target = socket.inet_aton("172.17.0.2") + b"\x13\xa1\0\0"
    for name, key, data in (
        ("dnat_any4", SMTP, target),
        ("dnat_addr6", bytes(16) + SMTP, bytes(16) + b"\x13\xa1\0\0"),
        ("count_addr4", socket.inet_aton("10.0.0.1") + SMTP, None),
        ("goto_any6", SMTP, b"r_x_y"),
        ("range_any4", SMTP + proto_port(6, 30), b"r_x_y"),
    ):
        encoded = next(nft_wire._encoded(name, [(key, data)]))
        assert encoded == nft_wire._element(name, key, data)
        payload = attr(1, b"t\0") + attr(2, name.encode() + b"\0") + attr(3, encoded)
        assert decode_elements(name, [payload]) == Elements({key: data}, {})
    assert nft_wire._element("dnat_any4", SMTP, target) == (
        struct.pack("=HH", 36, 0x8001)  # NFTA_LIST_ELEM, nested
        + struct.pack("=HHHH", 16, 0x8001, 12, 1)
        + SMTP  # KEY { VALUE }
        + struct.pack("=HHHH", 16, 0x8002, 12, 1)
        + target  # DATA { VALUE }
    )


def test_a_batch_is_one_transaction_of_acknowledged_messages_under_64_kib() -> None:
    adds = tuple((proto_port(6, port), None) for port in range(1, 5001))
    batch = nft_wire.encode_batch("inet", "natports", [Change("count_any4", (SMTP,), adds)], 7)
    messages, at = [], 0
    while at < len(batch.data):
        size, kind, flags, seq, _ = struct.unpack_from("=IHHII", batch.data, at)
        messages.append((kind, flags, seq, size))
        at += size
    assert at == len(batch.data)
    assert messages[0][:3] == (0x10, 1, 7) and messages[-1][:3] == (0x11, 1, messages[-1][2])
    body = messages[1:-1]
    assert body[0][0] == 10 << 8 | 14  # the delete first
    assert all(kind == 10 << 8 | 12 and flags == 0x405 for kind, flags, _, _ in body[1:])
    assert all(size < 65536 for *_, size in body) and len(body) > 2  # split
    assert batch.acks == frozenset(seq for _, _, seq, _ in body)
    assert len({seq for _, _, seq, _ in messages}) == len(messages)


def test_hairpin_ranges_read_from_an_interval_set_as_nft_lists_it() -> None:
    """nft 1.0.6 lists 172.17.0.0/16 as an end at 0.0.0.0, a start, and an end past it."""
    listed = [
        (socket.inet_aton("172.18.0.0"), 1),
        (socket.inet_aton("172.17.0.0"), 0),
        (socket.inet_aton("0.0.0.0"), 1),
    ]
    ranges = nft_wire.ranges_of_elements(listed)
    assert ranges == nft_wire.ranges_of_subnets(["172.17.0.0/16"])
    adjacent = nft_wire.ranges_of_subnets(["172.18.0.0/16", "172.19.0.0/16"])
    assert adjacent == nft_wire.ranges_of_subnets(["172.18.0.0/15"])
    assert nft_wire.ranges_of_elements([]) == nft_wire.ranges_of_subnets([]) == []
    two_starts = [(socket.inet_aton("10.0.0.0"), 0), (socket.inet_aton("10.0.1.0"), 0)]
    assert nft_wire.ranges_of_elements(two_starts) == [(-1, -1)]  # never equal to subnets


def test_the_shapes_nft_renders_its_sets_with() -> None:
    assert nft_wire.shape("dnat_any4") == (0x8, 0x30D, 8, 0x1CD, 8, False)
    assert nft_wire.shape("count_addr6") == (0, 0x830D, 24, 0, 0, True)
    assert nft_wire.shape("range_addr4") == (0x8C, 0x730D, 12, 0xFFFFFF00, 16, True)
    assert nft_wire.shape("hairpin6") == (0x4, 8, 16, 0, 0, False)


def test_a_dump_that_lists_an_element_twice_is_inconsistent() -> None:
    """Twice listed means another element was missed: the caller reads again."""
    key = attr(1, value(SMTP)) + counter(0, 0)
    other = attr(1, value(proto_port(6, 26))) + counter(0, 0)
    assert len(decode_elements("count_any4", dump("count_any4", key, other)).values) == 2
    with pytest.raises(nft_wire.Inconsistent):
        decode_elements("count_any4", dump("count_any4", key, other) + dump("count_any4", key))
    with pytest.raises(nft_wire.Inconsistent):  # the walked layout counts too
        decode_elements("count_any4", dump("count_any4", FLAGS + key, FLAGS + key))


def ack(seq: int, code: int) -> bytes:
    """NLMSG_ERROR answering request `seq` (with NETLINK_CAP_ACK: its header only)."""
    return (
        struct.pack("=IHHII", 36, 2, 0x100, 0, 0)
        + struct.pack("=i", -code)
        + (struct.pack("=IHHII", 16, 0, 0, seq, 0))
    )


def test_acknowledgements_of_the_batch_alone_count() -> None:
    from natports.backends.nft_netlink import Link

    waiting = {8, 9}
    assert Link._acknowledged(ack(8, 0) + ack(42, 22), range(7, 11), waiting) == 0
    assert waiting == {9}  # seq 42 is not this batch's, and its error is not either
    assert Link._acknowledged(ack(9, 2), range(7, 11), waiting) == 2
    assert waiting == set()


def test_a_dump_with_fewer_keys_than_the_set_holds_is_inconsistent() -> None:
    """A resize within a round of the kernel's walk skips elements without listing any
    twice: the set's own count (NFTA_SET_COUNT) tells."""
    key = attr(1, value(SMTP)) + counter(0, 0)
    other = attr(1, value(proto_port(6, 26))) + counter(0, 0)
    assert len(decode_elements("count_any4", dump("count_any4", key, other), 2).values) == 2
    with pytest.raises(nft_wire.Inconsistent):
        decode_elements("count_any4", dump("count_any4", key, other), 3)
    assert len(decode_elements("count_any4", dump("count_any4", key), None).values) == 1
    top = {20: (4, 8)}
    assert nft_wire.decode_count(b"\0" * 4 + struct.pack(">I", 30000), top) == 30000
    assert nft_wire.decode_count(b"", {}) is None  # an older kernel: no count
