"""nf_tables' netlink format for the elements of natports' sets and maps. Pure.

Why: a full apply of 10,000 routes spent most of its time turning elements into
text and back: decoding a dump into `tcp . 25 : 172.17.0.2 . 5025` strings (88 ms
for 20,000 elements), rendering the desired ones as text, and libnftables parsing
that text again (~120 ms). Here an element is what the kernel stores: the bytes of
its key and of its value. A full apply compares bytes with bytes, and writes the
elements that differ as NFT_MSG_NEWSETELEM / DELSETELEM messages, which is what
libnftables would send for the same `add element` text (docs/performance.md has the
figures). Text is made only for what a person reads: a --dry-run, counters by route.

Layouts (include/uapi/linux/netfilter/nf_tables.h): each field of a concatenated
key or value takes a multiple of 4 bytes; a protocol is 1 byte, a port 2 bytes in
network order. The kernel writes an element's attributes in one order (key, key end,
data, expression: nf_tables_fill_setelem), so most of a dump is read as fixed-size
records; anything else takes the attribute walk, and what natports' renderer cannot
have made raises `Unexpected`.
"""

from __future__ import annotations

import functools
import re
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_network
from operator import itemgetter
from typing import NamedTuple

from ..model import Route, RouteKey

SUBSYS = 10 << 8  # NFNL_SUBSYS_NFTABLES
NEWSETELEM, DELSETELEM = 12, 14
BATCH_BEGIN, BATCH_END = 0x10, 0x11  # NFNL_MSG_BATCH_BEGIN/END
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLA_F_NESTED = 0x8000
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
NFT_GOTO = -4
NFT_SET_ELEM_INTERVAL_END = 0x1
PROTOCOLS = {6: "tcp", 17: "udp"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOLS.items()}

HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_ATTR = struct.Struct("=HH")
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_PROTO_PORT = struct.Struct(">B3xH2x")  # inet_proto . inet_service, 32-bit fields
_PORT = struct.Struct(">H2x")
_COUNTER_NAME = _ATTR.pack(12, 1) + b"counter\0"  # NFTA_EXPR_NAME "counter"
MAX_ELEMENTS_ATTR = 60_000  # an attribute's length is 16 bits: the list is split below it


class Unexpected(Exception):
    """The table holds something natports' renderer does not make (or changed under us)."""


class Inconsistent(Unexpected):
    """A dump is not the whole set: it listed an element twice, or fewer keys than the
    set holds (NFTA_SET_COUNT). Read it again.

    The kernel lists a hash set in several rounds, each walking the set from the start
    and skipping as many elements as earlier rounds walked. A resize of the hash table
    (deferred work, right after many elements were added or deleted) changes the walk's
    order, between rounds or within one: seen on 6.18, a dump of 10,001 elements right
    after they were added listed 10,001 records but 8,456 distinct keys. No generation
    changes, so NLM_F_DUMP_INTR does not flag it; a second read is whole.
    """


class Elements(NamedTuple):
    """A set's elements as read: key -> value (None in a set; a verdict map's value is
    the chain's name), and key -> its counter's bytes for those with one (`counter`
    reads them). Plain dicts of bytes, made in C where the dump has the kernel's
    layout: a full apply compares them with the desired ones as dict views."""

    values: dict[bytes, bytes | None]
    counters: dict[bytes, bytes]


def counter(raw: bytes) -> tuple[int, int]:
    """(packets, bytes) of a counter as `Elements` keeps it: its byte count first, its
    packet count last (both 64-bit, network order)."""
    return int.from_bytes(raw[-8:], "big"), int.from_bytes(raw[:8], "big")


# -- keys and values from routes ----------------------------------------------------------


def key_bytes(key: RouteKey) -> bytes:
    """The key of a route's element; a range's is its first key then its last."""
    head = b"" if key.public_ip is None else key.public_ip.packed
    protocol = PROTOCOL_NUMBERS[key.protocol]
    first = head + _PROTO_PORT.pack(protocol, key.public_port)
    if key.count == 1:
        return first
    return first + head + _PROTO_PORT.pack(protocol, key.public_end)


def dnat_bytes(route: Route) -> bytes:
    """A `dnat_` map's value: the one backend's address, then its port."""
    backend = route.backends[0]
    return backend.ip.packed + _PORT.pack(backend.port)


def goto_bytes(chain: str) -> bytes:
    """A verdict map's value, as natports keeps it: the name of the chain it jumps to."""
    return chain.encode()


# -- text, for people (a --dry-run, counters by route) -------------------------------------


KEY_SIZES = {"any4": 8, "any6": 8, "addr4": 12, "addr6": 24}


def _proto_port(raw: bytes) -> str:
    try:
        return f"{PROTOCOLS[raw[0]]} . {raw[4] << 8 | raw[5]}"
    except KeyError:
        raise Unexpected(f"protocol {raw[0]}") from None


def _one_key(where: str, raw: bytes) -> str:
    if where.startswith("any"):
        return _proto_port(raw)
    if where == "addr4":
        return f"{socket.inet_ntoa(raw[:4])} . {_proto_port(raw[4:])}"
    return f"{IPv6Address(raw[:16])} . {_proto_port(raw[16:])}"


def key_text(where: str, raw: bytes) -> str:
    """`tcp . 25`, `203.0.113.7 . udp . 53`, a range `udp . 30000-30099` (where: `any4`...)."""
    size = KEY_SIZES[where]
    if len(raw) == size:
        return _one_key(where, raw)
    if len(raw) != 2 * size:
        raise Unexpected("key length")
    last = raw[size:]
    return f"{_one_key(where, raw[:size])}-{last[-4] << 8 | last[-3]}"


def value_text(name: str, raw: bytes | None) -> str | None:
    """A value as the renderer writes it after ` : ` (None: an element of a set)."""
    if raw is None:
        return None
    if not name.startswith("dnat_"):
        return f"goto {raw.decode()}"
    size = 4 if name.endswith("4") else 16
    if len(raw) != size + 4:
        raise Unexpected("map value")
    address = socket.inet_ntoa(raw[:size]) if size == 4 else str(IPv6Address(raw[:size]))
    return f"{address} . {raw[size] << 8 | raw[size + 1]}"


# -- decoding a GETSETELEM dump -------------------------------------------------------------


def named(table: str, name: str | None = None) -> bytes:
    """The attributes that name a table (1) and one of its objects (2): how chains,
    sets and rules are asked for and addressed."""
    head = _attr(1, table.encode() + b"\0")
    return head if name is None else head + _attr(2, name.encode() + b"\0")


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return _ATTR.pack(size, kind) + data + b"\0" * (-size % 4)


def _nest(kind: int, data: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, data)


def attrs(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """type -> (payload start, payload end) of the attributes in buf[start:end]."""
    found = {}
    while start + 4 <= end:
        size, kind = _ATTR.unpack_from(buf, start)
        if size < 4 or start + size > end:  # each attribute lies within its parent
            raise Unexpected("malformed netlink attribute")
        found[kind & 0x3FFF] = (start + 4, start + size)
        start += (size + 3) & ~3
    return found


def _size(buf: bytes, at: int) -> int:
    """An attribute's length, which must cover its own header (else a walk never ends)."""
    size: int = _ATTR.unpack_from(buf, at)[0]
    if size < 4:
        raise Unexpected("malformed netlink attribute")
    return size


def text(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0] : span[1]].split(b"\0", 1)[0].decode()


@dataclass(frozen=True)
class _Layout:
    """The fixed record the kernel writes for every element of one set (fast path): a
    pattern for the whole list (checked in C) and one that takes each record apart."""

    whole: re.Pattern[bytes]
    each: re.Pattern[bytes]
    counted: bool  # records are (key, counter bytes, counter packets); else (key, value)


def _key_pattern(where: str) -> bytes:
    """A key natports makes: the address, then tcp or udp and a port (zero padding)."""
    address = b"" if where.startswith("any") else b".{%d}" % (KEY_SIZES[where] - 8)
    return address + b"[\x06\x11]\x00\x00\x00..\x00\x00"


def _pattern(*parts: bytes | tuple[bytes]) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """(the whole list, one record) from constant bytes and `(pattern,)` captures."""
    each = b"".join(re.escape(p) if isinstance(p, bytes) else b"(" + p[0] + b")" for p in parts)
    bare = b"".join(re.escape(p) if isinstance(p, bytes) else p[0] for p in parts)
    return re.compile(b"(?:" + bare + b")*", re.S), re.compile(each, re.S)


@functools.cache
def _layout(name: str) -> _Layout | None:
    kind, _, where = name.partition("_")
    key = KEY_SIZES[where]
    if kind == "count":  # key, then the one counter expression: 56 + key bytes
        head = _ATTR.pack(56 + key, 1) + _ATTR.pack(8 + key, 1) + _ATTR.pack(4 + key, 1)
        middle = _ATTR.pack(44, 7) + _COUNTER_NAME + _ATTR.pack(28, 2) + _ATTR.pack(12, 1)
        counted = b".{8}" + re.escape(_ATTR.pack(12, 2)) + b".{8}"  # bytes, packets
        whole, each = _pattern(head, (_key_pattern(where),), middle, (counted,))
        return _Layout(whole, each, True)
    if kind == "dnat":  # key, then the value: address and port
        value = (4 if where.endswith("4") else 16) + 4
        head = _ATTR.pack(20 + key + value, 1) + _ATTR.pack(8 + key, 1) + _ATTR.pack(4 + key, 1)
        middle = _ATTR.pack(8 + value, 2) + _ATTR.pack(4 + value, 1)
        whole, each = _pattern(head, (_key_pattern(where),), middle, (b".{%d}" % value,))
        return _Layout(whole, each, False)
    return None  # verdict maps hold a chain's name: few elements, walked


def decode_elements(name: str, payloads: Sequence[bytes], count: int | None = None) -> Elements:
    """The elements of one of nft_render's sets or maps, from its GETSETELEM dump;
    `count`: how many the set holds (`decode_count`), if the kernel said. Anything
    malformed raises `Unexpected` (the caller then rebuilds the table), a dump that
    is not the whole set `Inconsistent` (the caller reads again)."""
    kind, _, where = name.partition("_")
    if kind not in ("dnat", "goto", "range", "count") or where not in KEY_SIZES:
        raise Unexpected(f"set {name}")
    try:
        found = Elements({}, {})
        layout = _layout(name)
        records = 0
        for payload in payloads:
            top = attrs(payload, 0, len(payload))
            if 3 not in top:
                continue
            at, end = top[3]
            read = _read_records(layout, payload, at, end, found) if layout else 0
            records += read or _walk(name, payload, at, end, found)
        keys = len(found.values)
        if records != keys or count not in (None, keys):
            raise Inconsistent(f"set {name}: {count} elements, {records} listed, {keys} keys")
        return found
    except (struct.error, ValueError, UnicodeDecodeError) as exc:  # a truncated attribute
        raise Unexpected(f"set {name}: {exc}") from None


def _read_records(layout: _Layout, payload: bytes, at: int, end: int, into: Elements) -> int:
    """Read a list of identical records in place: how many; 0 (nothing read) if it is
    not such a list."""
    if end == at or layout.whole.fullmatch(payload, at, end) is None:
        return 0
    records = layout.each.findall(payload, at, end)  # (key, value or counter bytes)
    if layout.counted:
        into.values.update(dict.fromkeys(map(itemgetter(0), records)))
        into.counters.update(records)
    else:
        into.values.update(records)
    return len(records)


def _walk(name: str, payload: bytes, at: int, end: int, into: Elements) -> int:
    """Any attribute order: each element walked attribute by attribute. How many."""
    size_of_key = KEY_SIZES[name.partition("_")[2]]
    count = 0
    while at + 4 <= end:
        count += 1
        size = _size(payload, at)
        elem = attrs(payload, at + 4, at + size)
        at += (size + 3) & ~3
        key = _value(payload, elem, 1)
        if 10 in elem:  # NFTA_SET_ELEM_KEY_END: an interval's last key
            key += _value(payload, elem, 10)
        if len(key) not in (size_of_key, 2 * size_of_key) or key[size_of_key - 8] not in PROTOCOLS:
            raise Unexpected(f"set {name}: a key natports does not make")
        value = None
        if 2 in elem:
            value = _verdict(payload, elem[2]) if name[0] != "d" else _value(payload, elem, 2)
        into.values[key] = value
        found = _counter(payload, elem)
        if found is not None:
            into.counters[key] = _U64.pack(found[1]) + _U64.pack(found[0])
    return count


def _value(buf: bytes, elem: dict[int, tuple[int, int]], kind: int) -> bytes:
    """The bytes of a key or value (NFTA_DATA_VALUE, the one attribute nested in it)."""
    if kind not in elem:
        raise Unexpected("an element without a key")
    start, end = elem[kind]
    size, inner = _ATTR.unpack_from(buf, start)
    if inner & 0x3FFF != 1 or size < 4 or start + size > end:
        raise Unexpected("an element key that is not a value")
    return buf[start + 4 : start + size]


def _verdict(buf: bytes, span: tuple[int, int]) -> bytes:
    inner = attrs(buf, *span)
    if 2 not in inner:  # NFTA_DATA_VERDICT
        raise Unexpected("map value")
    verdict = attrs(buf, *inner[2])
    if 1 not in verdict or 2 not in verdict:
        raise Unexpected("verdict")
    if _I32.unpack_from(buf, verdict[1][0])[0] != NFT_GOTO:
        raise Unexpected("a verdict other than goto")
    return text(buf, verdict[2]).encode()


def _counter(buf: bytes, elem: dict[int, tuple[int, int]]) -> tuple[int, int] | None:
    """The element's counter: NFTA_SET_ELEM_EXPR (one expression) or _EXPRESSIONS."""
    exprs = []
    if 7 in elem:
        exprs.append(elem[7])
    if 11 in elem:
        at, end = elem[11]
        while at + 4 <= end:
            size = _size(buf, at)
            exprs.append((at + 4, at + size))
            at += (size + 3) & ~3
    for start, end in exprs:
        name = data = None
        while start + 4 <= end:  # NFTA_EXPR_NAME, NFTA_EXPR_DATA
            size, kind = _size(buf, start), _ATTR.unpack_from(buf, start)[1]
            if kind & 0x3FFF == 1:
                name = buf[start + 4 : start + size]
            elif kind & 0x3FFF == 2:
                data = (start + 4, start + size)
            start += (size + 3) & ~3
        if name != b"counter\0" or data is None:
            continue
        found = {}
        at, end = data
        while at + 4 <= end:  # NFTA_COUNTER_BYTES (1), NFTA_COUNTER_PACKETS (2)
            size, kind = _size(buf, at), _ATTR.unpack_from(buf, at)[1]
            if size == 12:
                found[kind & 0x3FFF] = _U64.unpack_from(buf, at + 4)[0]
            at += (size + 3) & ~3
        if 1 in found and 2 in found:
            return (found[2], found[1])
    return None


# -- the sets' definitions ------------------------------------------------------------------

NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_CONCAT = 0x4, 0x8, 0x80
NFT_DATA_VERDICT = 0xFFFFFF00
_KEY_TYPES = {"any": 12 << 6 | 13, "addr4": 7 << 12 | 12 << 6 | 13, "addr6": 8 << 12 | 12 << 6 | 13}


class Shape(NamedTuple):
    """What a set is, as GETSET lists it: flags, key type and length, data type and
    length (nft's type numbers, concatenated 6 bits apiece), and whether it counts."""

    flags: int
    key_type: int
    key_len: int
    data_type: int
    data_len: int
    counted: bool


def shape(name: str) -> Shape:
    """The shape nft_render's declaration of set `name` gives it (a kernel test checks
    these against what libnftables creates)."""
    if name.startswith("hairpin"):
        v4 = name.endswith("4")
        return Shape(NFT_SET_INTERVAL, 7 if v4 else 8, 4 if v4 else 16, 0, 0, False)
    kind, _, where = name.partition("_")
    key_type = _KEY_TYPES["any" if where.startswith("any") else where]
    key = (key_type, KEY_SIZES[where])
    if kind == "count":
        return Shape(0, *key, 0, 0, True)
    if kind == "dnat":
        v4 = where.endswith("4")
        return Shape(NFT_SET_MAP, *key, (7 if v4 else 8) << 6 | 13, 8 if v4 else 20, False)
    flags = NFT_SET_MAP | (NFT_SET_INTERVAL | NFT_SET_CONCAT if kind == "range" else 0)
    return Shape(flags, *key, NFT_DATA_VERDICT, 16, kind == "range")


def decode_count(payload: bytes, top: dict[int, tuple[int, int]]) -> int | None:
    """A GETSET message's NFTA_SET_COUNT: how many elements the set holds (kernels
    since 2025 say; None where it does not)."""
    if 20 not in top or top[20][1] - top[20][0] != 4:
        return None
    count: int = _U32.unpack_from(payload, top[20][0])[0]
    return count


def decode_shape(payload: bytes, top: dict[int, tuple[int, int]]) -> Shape:
    """A GETSET message's shape (its attributes already found: `attrs`)."""

    def number(kind: int) -> int:
        return _U32.unpack_from(payload, top[kind][0])[0] if kind in top else 0

    counted = 17 in top and payload[top[17][0] : top[17][0] + 12] == _COUNTER_NAME
    return Shape(number(3), number(4), number(5), number(6), number(7), counted)


# -- interval sets (the hairpin subnets) ----------------------------------------------------


def decode_intervals(payloads: Sequence[bytes]) -> list[tuple[bytes, int]]:
    """(key, flags) of every element of an interval set, as the kernel lists them."""
    found = []
    try:
        for payload in payloads:
            top = attrs(payload, 0, len(payload))
            if 3 not in top:
                continue
            at, end = top[3]
            while at + 4 <= end:
                size = _size(payload, at)
                elem = attrs(payload, at + 4, at + size)
                at += (size + 3) & ~3
                flags = _I32.unpack_from(payload, elem[3][0])[0] if 3 in elem else 0
                found.append((_value(payload, elem, 1), flags))
    except (struct.error, ValueError) as exc:
        raise Unexpected(f"interval set: {exc}") from None
    return found


def ranges_of_elements(elements: Iterable[tuple[bytes, int]]) -> list[tuple[int, int]]:
    """The address ranges (first, last) an rbtree set holds: an element opens a range,
    the next one flagged as an interval end closes it (the end is the first address
    past it; nft also writes an end at address 0, which closes nothing)."""
    ranges, start = [], None
    for key, flags in sorted(elements, key=lambda e: (int.from_bytes(e[0], "big"), -e[1])):
        value = int.from_bytes(key, "big")
        if flags & NFT_SET_ELEM_INTERVAL_END:
            if start is not None:
                ranges.append((start, value - 1))
                start = None
        elif start is None:
            start = value
        else:
            return [(-1, -1)]  # two starts in a row: not a set the renderer made
    if start is not None:
        ranges.append((start, (1 << (8 * len(key))) - 1))  # open to the last address
    return _merged(ranges)


def ranges_of_subnets(subnets: Iterable[str]) -> list[tuple[int, int]]:
    found = []
    for subnet in subnets:
        network = ip_network(subnet, strict=False)
        found.append((int(network.network_address), int(network.broadcast_address)))
    return _merged(found)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


# -- encoding a transaction ------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """Elements to delete from, then add to, one set or map (keys and values as above)."""

    name: str
    delete: tuple[bytes, ...] = ()
    add: tuple[tuple[bytes, bytes | None], ...] = ()


def _element(name: str, key: bytes, value: bytes | None) -> bytes:
    """NFTA_LIST_ELEM { KEY { VALUE }, [KEY_END { VALUE }], [DATA { VALUE | VERDICT }] }."""
    size = KEY_SIZES[name.partition("_")[2]]
    body = _nest(1, _attr(1, key[:size]))
    if len(key) > size:
        body += _nest(10, _attr(1, key[size:]))  # an interval's last key
    if value is not None:
        if name.startswith("dnat_"):
            data = _attr(1, value)
        else:  # NFTA_DATA_VERDICT { NFTA_VERDICT_CODE goto, NFTA_VERDICT_CHAIN }
            data = _nest(2, _attr(1, _I32.pack(NFT_GOTO)) + _attr(2, value + b"\0"))
        body += _nest(2, data)
    return _nest(1, body)


def _encoded(name: str, elements: Iterable[tuple[bytes, bytes | None]]) -> Iterator[bytes]:
    """`_element` of each, from fixed headers where the layout is fixed (10,000s of
    single-port keys and DNAT values; ranges and verdicts are built attribute by
    attribute)."""
    key = KEY_SIZES[name.partition("_")[2]]
    single = _nest(1, _nest(1, _attr(1, b"\0" * key)))[:-key]  # headers before the key
    value = (4 if name.endswith("4") else 16) + 4
    mapped = _ATTR.pack(20 + key + value, 1 | NLA_F_NESTED) + single[4:]
    middle = _ATTR.pack(8 + value, 2 | NLA_F_NESTED) + _ATTR.pack(4 + value, 1)
    dnat = name.startswith("dnat_")
    for k, v in elements:
        if len(k) != key:
            yield _element(name, k, v)
        elif v is None:
            yield single + k
        elif dnat and len(v) == value:
            yield mapped + k + middle + v
        else:
            yield _element(name, k, v)


def _messages(
    family: str, table: str, name: str, kind: int, flags: int, elements: Iterator[bytes]
) -> Iterator[bytes]:
    """NEWSETELEM or DELSETELEM messages, each list kept under an attribute's 64 KiB."""
    head = named(table, name)
    chunk: list[bytes] = []
    size = 0

    def message() -> bytes:
        body = struct.pack("=BBH", NFPROTO[family], 0, 0) + head + _nest(3, b"".join(chunk))
        return HDR.pack(16 + len(body), SUBSYS | kind, flags, 0, 0) + body

    for element in elements:
        if size + len(element) > MAX_ELEMENTS_ATTR:
            yield message()
            chunk, size = [], 0
        chunk.append(element)
        size += len(element)
    if chunk:
        yield message()


@dataclass(frozen=True)
class Batch:
    """One nfnetlink batch: the kernel commits all of its messages or none."""

    data: bytes
    acks: frozenset[int]  # the sequence numbers whose acknowledgement says it committed
    seqs: range  # every sequence number of the batch, BATCH_BEGIN and _END included


def encode_batch(family: str, table: str, changes: Sequence[Change], first_seq: int) -> Batch:
    """Deletes first (a changed element is deleted, then added with its new value)."""
    messages: list[bytes] = []
    for change in changes:
        deletes = _encoded(change.name, ((key, None) for key in change.delete))
        messages += _messages(
            family, table, change.name, DELSETELEM, NLM_F_REQUEST | NLM_F_ACK, deletes
        )
    for change in changes:
        adds = _encoded(change.name, change.add)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE  # `add`: an equal element is a no-op
        messages += _messages(family, table, change.name, NEWSETELEM, flags, adds)
    seq = first_seq
    batch_head = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(SUBSYS >> 8))
    out = [HDR.pack(16 + len(batch_head), BATCH_BEGIN, NLM_F_REQUEST, seq, 0) + batch_head]
    acks = []
    for message in messages:
        seq += 1
        acks.append(seq)
        out.append(message[:8] + struct.pack("=I", seq) + message[12:])
    seq += 1
    out.append(HDR.pack(16 + len(batch_head), BATCH_END, NLM_F_REQUEST, seq, 0) + batch_head)
    return Batch(b"".join(out), frozenset(acks), range(first_seq, seq + 1))
