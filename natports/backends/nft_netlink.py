"""Read natports' own nft table straight from the kernel (netlink dumps), read-only.

Why: a full apply must know what the table holds (which elements, their values and
counters) to change only what differs. `nft list set` of 10,000 elements takes
110-170 ms (nft fills its cache, prints, and natports parses the JSON); the same dump
read here takes about 30 ms. Writes never go through here: batches stay nft text
(readable in --dry-run) and run through nft or libnftables.

Only the shapes natports' renderer creates are decoded (nft_render's sets and maps);
anything else raises `Unexpected`, and the caller falls back to rebuilding the table
(which needs no decoding).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import NamedTuple, TypeVar

NETLINK_NETFILTER = 12
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
SUBSYS = 10 << 8  # NFNL_SUBSYS_NFTABLES
GETCHAIN, GETRULE, GETSET, GETSETELEM, GETOBJ, GETFLOWTABLE = 4, 7, 10, 13, 19, 23
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFT_SET_ANONYMOUS = 0x1
NFT_GOTO = -4
PROTOCOLS = {6: "tcp", 17: "udp"}
_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_COUNTER_NAME = _ATTR.pack(12, 1) + b"counter\0"  # NFTA_EXPR_NAME "counter"


class Unexpected(Exception):
    """The table holds something natports' renderer does not make (or changed under us)."""


class Element(NamedTuple):  # a tuple: 30,000 of them are made per read
    value: str | None  # the text after ` : ` in the renderer's element; None in a set
    counter: tuple[int, int] | None  # (packets, bytes)


@dataclass(frozen=True)
class Snapshot:
    chains: frozenset[str]
    sets: frozenset[str]  # named sets and maps (anonymous ones belong to rules)
    others: int  # named objects and flowtables: natports makes none
    elements: dict[str, dict[str, Element]]  # set -> element key text -> element


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return _ATTR.pack(size, kind) + data + b"\0" * (-size % 4)


def _attrs(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
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


def _text(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0] : span[1]].split(b"\0", 1)[0].decode()


class Reader:
    """One netlink socket for dumps. Kept open for the life of the process (`shared`):
    closing an nf_tables socket waits for the release of objects a recent batch deleted
    (an RCU grace period, ~10 ms), which would be paid by every read otherwise."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(timeout)  # a wedged kernel must not hang natports forever
        self._sock.bind((0, 0))
        self._seq = 0
        self._buf = bytearray(1 << 20)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def dump(self, msg: int, family: str, attrs: bytes = b"") -> list[bytes]:
        """The payloads (after nfgenmsg) of one dump; [] when the object does not exist."""
        self._seq += 1
        body = struct.pack("=BBH", NFPROTO[family], 0, 0) + attrs
        head = _HDR.pack(16 + len(body), SUBSYS | msg, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0)
        self._sock.send(head + body)
        out: list[bytes] = []
        view = memoryview(self._buf)
        while True:
            size = self._sock.recv_into(view)
            data = bytes(view[:size])
            at = 0
            while at + 16 <= size:
                length, kind, flags, seq, _ = _HDR.unpack_from(data, at)
                if length < 16:
                    raise Unexpected("malformed netlink message")
                if seq == self._seq:
                    if flags & NLM_F_DUMP_INTR:
                        raise Unexpected("the table changed during the read")
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, at + 16)[0]
                        if code == errno.ENOENT:
                            return []
                        raise OSError(code, "nf_tables dump failed")
                    out.append(data[at + 20 : at + length])
                at += (length + 3) & ~3

    def names(self, msg: int, family: str, table: str, name_attr: int) -> list[tuple[str, int]]:
        """(name, flags or 0) of the objects of one kind in `table` (the table is attribute 1)."""
        request = _attr(1, table.encode() + b"\0")
        result = []
        for payload in self.dump(msg, family, request):
            top = _attrs(payload, 0, len(payload))
            if 1 not in top or _text(payload, top[1]) != table or name_attr not in top:
                continue
            flags = _I32.unpack_from(payload, top[3][0])[0] if msg == GETSET and 3 in top else 0
            result.append((_text(payload, top[name_attr]), flags))
        return result

    def elements(self, family: str, table: str, name: str) -> dict[str, Element]:
        request = _attr(1, table.encode() + b"\0") + _attr(2, name.encode() + b"\0")
        return decode_elements(name, self.dump(GETSETELEM, family, request))


def decode_elements(name: str, payloads: list[bytes]) -> dict[str, Element]:
    """The elements of one of nft_render's sets or maps, from its GETSETELEM dump.
    Anything malformed raises `Unexpected` (the caller then rebuilds the table)."""
    try:
        return _decode_elements(name, payloads)
    except (struct.error, ValueError) as exc:  # a truncated attribute, a bad address
        raise Unexpected(f"set {name}: {exc}") from None


def _decode_elements(name: str, payloads: list[bytes]) -> dict[str, Element]:
    key_of, value_of = _decoders(name)
    # The kernel writes an element's key first (seen on 6.x): where its
    # two headers are the expected ones, the key is read in place, and only the rest
    # of the element is walked (a third of a 20,000-element read).
    size_of_key = KEY_SIZES[name.partition("_")[2]]
    key_head = _ATTR.pack(8 + size_of_key, 1) + _ATTR.pack(4 + size_of_key, 1)
    unpack = _ATTR.unpack_from
    result: dict[str, Element] = {}
    for payload in payloads:
        top = _attrs(payload, 0, len(payload))
        if 3 not in top:
            continue
        at, end = top[3]
        while at + 4 <= end:
            size = unpack(payload, at)[0]
            first = at + 12 + size_of_key
            if payload[at + 4 : at + 12] == key_head and first <= at + size:
                key = key_of(payload[at + 12 : first])
                elem = _attrs(payload, first, at + size)
            else:
                elem = _attrs(payload, at + 4, at + size)
                key = key_of(_value(payload, elem, 1))
            at += (size + 3) & ~3
            if 10 in elem:  # NFTA_SET_ELEM_KEY_END: an interval's last key
                last = key_of(_value(payload, elem, 10))
                key = f"{key}-{last.rsplit(' . ', 1)[1]}"
            value = value_of(payload, elem[2]) if 2 in elem else None
            counter = None
            if 7 in elem:  # the one expression: a counter, in the layout the kernel writes
                start = elem[7][0]
                if payload[start : start + 12] == _COUNTER_NAME and (
                    unpack(payload, start + 16) == (12, 1)
                    and unpack(payload, start + 28) == (12, 2)
                ):
                    counter = (
                        _U64.unpack_from(payload, start + 32)[0],
                        _U64.unpack_from(payload, start + 20)[0],
                    )
            if counter is None:
                counter = _counter(payload, elem)
            result[key] = Element(value, counter)
    return result


def _value(buf: bytes, elem: dict[int, tuple[int, int]], kind: int) -> bytes:
    """The bytes of a key (NFTA_DATA_VALUE, the one attribute nested in it)."""
    if kind not in elem:
        raise Unexpected("an element without a key")
    start, end = elem[kind]
    size, inner = _ATTR.unpack_from(buf, start)
    if inner & 0x3FFF != 1 or start + size > end:
        raise Unexpected("an element key that is not a value")
    return buf[start + 4 : start + size]


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


def _proto_port(raw: bytes) -> str:
    try:
        return f"{PROTOCOLS[raw[0]]} . {raw[4] << 8 | raw[5]}"  # the port: big-endian
    except KeyError:
        raise Unexpected(f"protocol {raw[0]}") from None


def _key_any(raw: bytes) -> str:
    if len(raw) != 8:
        raise Unexpected("key length")
    return _proto_port(raw)


def _key_addr4(raw: bytes) -> str:
    if len(raw) != 12:
        raise Unexpected("key length")
    return f"{socket.inet_ntoa(raw[:4])} . {_proto_port(raw[4:])}"


def _key_addr6(raw: bytes) -> str:
    if len(raw) != 24:
        raise Unexpected("key length")
    return f"{IPv6Address(raw[:16])} . {_proto_port(raw[16:])}"


KEY_SIZES = {"any4": 8, "any6": 8, "addr4": 12, "addr6": 24}  # bytes, 32-bit aligned fields

KeyDecoder = Callable[[bytes], str]
ValueDecoder = Callable[[bytes, tuple[int, int]], str]


def _address_port(size: int) -> ValueDecoder:
    # inet_ntoa is str(IPv4Address) and 10x faster; IPv6 keeps ipaddress's own text
    # (inet_ntop writes IPv4-mapped addresses differently), the renderer's spelling.
    def make(raw: bytes) -> str:
        return socket.inet_ntoa(raw) if size == 4 else str(IPv6Address(raw))

    head = _ATTR.pack(8 + size, 1)  # NFTA_DATA_VALUE: the address, the port (32-bit)

    def decode(buf: bytes, span: tuple[int, int]) -> str:
        start = span[0] + 4
        if buf[span[0] : start] != head or span[1] - span[0] != size + 8:
            inner = _attrs(buf, *span)
            if 1 not in inner or inner[1][1] - inner[1][0] != size + 4:
                raise Unexpected("map value")
            start = inner[1][0]
        port = int.from_bytes(buf[start + size : start + size + 2], "big")
        return f"{make(buf[start : start + size])} . {port}"

    return decode


def _verdict(buf: bytes, span: tuple[int, int]) -> str:
    inner = _attrs(buf, *span)
    if 2 not in inner:  # NFTA_DATA_VERDICT
        raise Unexpected("map value")
    verdict = _attrs(buf, *inner[2])
    if 1 not in verdict or 2 not in verdict:
        raise Unexpected("verdict")
    if _I32.unpack_from(buf, verdict[1][0])[0] != NFT_GOTO:
        raise Unexpected("a verdict other than goto")
    return f"goto {_text(buf, verdict[2])}"


def _decoders(name: str) -> tuple[KeyDecoder, ValueDecoder]:
    """How to read keys and values of one of nft_render's sets or maps, by its name."""
    kind, _, where = name.partition("_")
    keys: dict[str, KeyDecoder] = {
        "any4": _key_any,
        "any6": _key_any,
        "addr4": _key_addr4,
        "addr6": _key_addr6,
    }
    if kind not in ("dnat", "goto", "range", "count") or where not in keys:
        raise Unexpected(f"set {name}")
    value: ValueDecoder = _verdict
    if kind == "dnat":
        value = _address_port(4 if where.endswith("4") else 16)
    return keys[where], value


_shared: Reader | None = None
_guard = threading.Lock()


T = TypeVar("T")


def _using_reader(timeout: float, work: Callable[[Reader], T]) -> T:
    """Run `work` on the process's reader (opened on first use, kept open)."""
    global _shared
    with _guard:
        if _shared is None:
            _shared = Reader(timeout)
        try:
            return work(_shared)
        except BaseException:
            _shared.close()  # a dump may be half read: start over with a new socket
            _shared = None
            raise


def snapshot(family: str, table: str, sets: list[str], timeout: float = 10.0) -> Snapshot:
    """The table's chains, named sets, other objects, and the elements of `sets`."""
    try:
        return _using_reader(timeout, lambda reader: _read(reader, family, table, sets))
    except (struct.error, ValueError) as exc:  # malformed: as unexpected as a foreign set
        raise Unexpected(str(exc)) from None


def rule_counts(
    family: str, table: str, chains: list[str], timeout: float = 10.0
) -> dict[str, int]:
    """chain -> how many rules it holds (0: none, or no such chain); cheap at any size:
    the kernel dumps only these chains' rules, and nothing is decoded but their number."""

    def count(reader: Reader) -> dict[str, int]:
        counts = {}
        for chain in chains:
            request = _attr(1, table.encode() + b"\0") + _attr(2, chain.encode() + b"\0")
            counts[chain] = len(reader.dump(GETRULE, family, request))
        return counts

    return _using_reader(timeout, count)


def _read(reader: Reader, family: str, table: str, sets: list[str]) -> Snapshot:
    chains = frozenset(n for n, _ in reader.names(GETCHAIN, family, table, 3))
    named = frozenset(
        n for n, f in reader.names(GETSET, family, table, 2) if not f & NFT_SET_ANONYMOUS
    )
    others = len(reader.names(GETOBJ, family, table, 2))
    others += len(reader.names(GETFLOWTABLE, family, table, 2))
    elements = {name: reader.elements(family, table, name) for name in sets if name in named}
    return Snapshot(chains, named, others, elements)
