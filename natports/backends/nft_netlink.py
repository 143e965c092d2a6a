"""natports' own nft table straight from the kernel over netlink: dumps to read it,
element batches to change it.

Why: a full apply must know what the table holds (which elements, their values and
counters) to change only what differs. `nft list set` of 10,000 elements takes
110-170 ms (nft fills its cache, prints, and natports parses the JSON); the same dump
read here takes about 16 ms, and comparing bytes instead of text makes the whole read
about 30 ms. A transaction that changes only elements is written here too, as one
nfnetlink batch (nft_wire has the format): the same messages libnftables would send
for `add element` text, without printing and parsing 10,000 elements. Everything
else (tables, chains, rules) goes through libnftables as nft text.

The socket is kept open for the life of the process (`shared`): closing an nf_tables
socket waits for the release of objects a recent batch deleted (an RCU grace period,
~10 ms), which would be paid by every read otherwise.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from . import nft_wire
from .nft_wire import HDR, Elements, Shape, Unexpected, attrs, text

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acknowledgements without a copy of the request
SO_SNDBUFFORCE = 32
NFPROTO = nft_wire.NFPROTO
SUBSYS = nft_wire.SUBSYS
GETCHAIN, GETRULE, GETSET, GETSETELEM, GETOBJ, GETFLOWTABLE = 4, 7, 10, 13, 19, 23
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFT_SET_ANONYMOUS = 0x1

__all__ = ["Elements", "Link", "Shape", "Snapshot", "Unexpected", "commit", "rules", "snapshot"]


class Listed(NamedTuple):
    name: str
    flags: int
    shape: Shape | None  # sets only
    size: int | None  # sets only: how many elements, where the kernel says (NFTA_SET_COUNT)


@dataclass(frozen=True)
class Snapshot:
    chains: frozenset[str]
    shapes: dict[str, Shape]  # named sets and maps (anonymous ones belong to rules)
    others: int  # named objects and flowtables: natports makes none
    elements: dict[str, Elements]  # set -> its elements
    intervals: dict[str, list[tuple[bytes, int]]]  # interval set -> (key, flags) listed

    @property
    def sets(self) -> frozenset[str]:
        return frozenset(self.shapes)


class Link:
    """One nf_tables netlink socket: dumps, and element batches (`commit`)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._timeout = timeout
        self._sock.settimeout(timeout)  # a wedged kernel must not hang natports forever
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._seq = 0
        self._buf = bytearray(1 << 20)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def dump(self, msg: int, family: str, request: bytes = b"") -> list[bytes]:
        """The payloads (after nfgenmsg) of one dump; [] when the object does not exist."""
        self._seq += 1
        body = struct.pack("=BBH", NFPROTO[family], 0, 0) + request
        head = HDR.pack(16 + len(body), SUBSYS | msg, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0)
        self._sock.send(head + body)
        out: list[bytes] = []
        view = memoryview(self._buf)
        while True:
            size = self._sock.recv_into(view)
            data = bytes(view[:size])
            at = 0
            while at + 16 <= size:
                length, kind, flags, seq, _ = HDR.unpack_from(data, at)
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

    def commit(self, family: str, table: str, changes: list[nft_wire.Change]) -> None:
        """One transaction of element changes: the kernel applies all of it or none of it.

        The kernel handles a batch inside `send` (nfnetlink_rcv_batch) and queues every
        answer before `send` returns, so they are all read here at once; the batch is
        committed when each message is acknowledged and none failed. Raises OSError
        with the kernel's error otherwise (nothing was changed).
        """
        batch = nft_wire.encode_batch(family, table, changes, self._seq + 1)
        self._seq += len(batch.acks) + 2
        # A batch is one message: the socket must be able to send it whole (as nft does).
        self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch.data) + 4096)
        self._sock.send(batch.data)
        waiting, error = set(batch.acks), 0
        self._sock.settimeout(0.0)  # every answer is queued already: do not wait for more
        try:
            while waiting and not error:
                try:
                    size = self._sock.recv_into(memoryview(self._buf))
                except BlockingIOError:
                    break
                data = bytes(memoryview(self._buf)[:size])
                error = self._acknowledged(data, batch.seqs, waiting)
        finally:
            self._sock.settimeout(self._timeout)
        if error:
            raise OSError(error, f"nf_tables refused the element batch: {os.strerror(error)}")
        if waiting:
            raise Unexpected(f"{len(waiting)} of the batch's messages were not acknowledged")

    @staticmethod
    def _acknowledged(data: bytes, seqs: range, waiting: set[int]) -> int:
        """Take the batch's acknowledged messages out of `waiting`; its first error, or 0.
        Answers to anything else (`seqs` are the batch's) are not this batch's."""
        error, at = 0, 0
        while at + 20 <= len(data):
            length, kind, _, _, _ = HDR.unpack_from(data, at)
            if length < 16:
                raise Unexpected("malformed netlink message")
            if kind == NLMSG_ERROR and at + 32 <= len(data):
                code = -struct.unpack_from("=i", data, at + 16)[0]
                request = struct.unpack_from("=I", data, at + 28)[0]  # the request's seq
                if request in seqs:
                    waiting.discard(request)
                    error = error or code
            at += (length + 3) & ~3
        return error

    def names(self, msg: int, family: str, table: str, name_attr: int) -> list[tuple[str, int]]:
        """(name, flags or 0) of the objects of one kind in `table` (the table is attribute 1)."""
        return [(found.name, found.flags) for found in self.listed(msg, family, table, name_attr)]

    def listed(self, msg: int, family: str, table: str, name_attr: int) -> list[Listed]:
        """The objects of one kind in `table` (of sets: their shape and count too)."""
        request = nft_wire.named(table)
        result = []
        for payload in self.dump(msg, family, request):
            top = attrs(payload, 0, len(payload))
            if 1 not in top or text(payload, top[1]) != table or name_attr not in top:
                continue
            name = text(payload, top[name_attr])
            if msg != GETSET:
                result.append(Listed(name, 0, None, None))
                continue
            found = nft_wire.decode_shape(payload, top)
            count = nft_wire.decode_count(payload, top)
            result.append(Listed(name, found.flags, found, count))
        return result

    def elements(self, family: str, table: str, name: str) -> list[bytes]:
        """The payloads of a set's GETSETELEM dump."""
        return self.dump(GETSETELEM, family, nft_wire.named(table, name))


_shared: Link | None = None
_guard = threading.Lock()


T = TypeVar("T")


def _using_link(timeout: float, work: Callable[[Link], T]) -> T:
    """Run `work` on the process's link (opened on first use, kept open)."""
    global _shared
    with _guard:
        if _shared is None:
            _shared = Link(timeout)
        try:
            return work(_shared)
        except BaseException as exc:
            _shared.close()  # a dump may be half read: start over with a new socket
            _shared = None
            if isinstance(exc, (struct.error, ValueError)):  # malformed: unexpected
                raise Unexpected(str(exc)) from None
            raise


def snapshot(
    family: str, table: str, sets: list[str], intervals: list[str], timeout: float = 10.0
) -> Snapshot:
    """The table's chains, named sets, other objects, the elements of `sets` and the
    listed elements of the interval sets `intervals`."""
    return _using_link(timeout, lambda link: _read(link, family, table, sets, intervals))


def commit(family: str, table: str, changes: list[nft_wire.Change], timeout: float = 10.0) -> None:
    """Apply element changes to the table in one transaction (see `Link.commit`)."""
    _using_link(timeout, lambda link: link.commit(family, table, changes))


def rules(
    family: str, table: str, chains: list[str], timeout: float = 10.0
) -> dict[str, list[bytes]]:
    """chain -> its rules as the kernel lists them (none, or no such chain: []); cheap at
    any size: the kernel dumps only these chains' rules."""

    def read(link: Link) -> dict[str, list[bytes]]:
        found = {}
        for chain in chains:
            found[chain] = link.dump(GETRULE, family, nft_wire.named(table, chain))
        return found

    return _using_link(timeout, read)


def _read(link: Link, family: str, table: str, sets: list[str], intervals: list[str]) -> Snapshot:
    chains = frozenset(n for n, _ in link.names(GETCHAIN, family, table, 3))
    named = [s for s in link.listed(GETSET, family, table, 2) if not s.flags & NFT_SET_ANONYMOUS]
    shapes = {s.name: s.shape for s in named if s.shape is not None}
    counts = {s.name: s.size for s in named}
    others = len(link.names(GETOBJ, family, table, 2))
    others += len(link.names(GETFLOWTABLE, family, table, 2))
    elements = {
        name: _elements(link, family, table, name, counts[name]) for name in sets if name in shapes
    }
    listed = {
        name: nft_wire.decode_intervals(link.elements(family, table, name))
        for name in intervals
        if name in shapes
    }
    return Snapshot(chains, shapes, others, elements, listed)


READS = 6  # a dump that is not the whole set is read again, up to this many times


def _elements(link: Link, family: str, table: str, name: str, count: int | None) -> Elements:
    """A set's elements, read again while the kernel resizes its hash table (see
    nft_wire.Inconsistent); still inconsistent after READS reads: Unexpected (rebuild)."""
    for attempt in range(READS):
        try:
            return nft_wire.decode_elements(name, link.elements(family, table, name), count)
        except nft_wire.Inconsistent:
            if attempt == READS - 1:
                raise
            time.sleep(0.001 * 2**attempt)  # the resize is deferred work: let it run
    raise AssertionError("unreachable")
