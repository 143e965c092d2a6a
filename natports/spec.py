"""The PORTS grammar: text in, typed mappings or positioned errors out.

    line     := [PROC ":" WS] [HOST ":"] PORTS ":" PORTS ["/" PROTO] [WS OPTION] [WS] ["#" comment]
    HOST     := IPv4 | "[" IPv6 "]"
    PORTS    := NUMBER ["-" NUMBER]
    PROTO    := "tcp" | "udp"
    OPTION   := "proxy-protocol"

`worker: 25:5025` targets the `worker` process type (Procfile style); without a
prefix the mapping targets `web`. `25:5025 proxy-protocol` asks the userspace proxy to
send a PROXY protocol v2 header to the app (docs/proxy.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address

from .model import (
    DEFAULT_PROCESS_TYPE,
    PORT_MAX,
    PORT_MIN,
    PROCESS_TYPE_RE,
    PROXY_PROTOCOL_OPTION,
    IPAddress,
    Mapping,
    Protocol,
)

_PROC_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_-]*):(?=[ \t])")
_NUMBER = re.compile(r"[0-9]+")

# A PORTS file larger than this is refused unread: it bounds the work done under the
# store's lock, and no real file comes near it (a mapping line is about 20 bytes).
MAX_PORTS_BYTES = 64 * 1024
EXCERPT_CHARS = 12


def excerpt(text: str) -> str:
    """At most EXCERPT_CHARS characters of input, control characters escaped.

    Errors quote what they refuse; a PORTS file may be something else in disguise
    (another app's ENV), so a message must never carry more than a short piece of it.
    """
    cut = text[:EXCERPT_CHARS]
    shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch) & 0xFF:02x}" for ch in cut)
    return shown + ("..." if len(text) > EXCERPT_CHARS else "")


@dataclass(frozen=True)
class SpecError:
    line: int
    col: int
    message: str

    def format(self, filename: str) -> str:
        return f"{filename}:{self.line}:{self.col}: {self.message}"


@dataclass(frozen=True)
class Located:
    """A mapping and where it was written, so later checks can point at it."""

    mapping: Mapping
    line: int
    col: int


@dataclass(frozen=True)
class ParseResult:
    mappings: tuple[Located, ...]
    errors: tuple[SpecError, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


class _LineError(Exception):
    def __init__(self, col: int, message: str) -> None:
        self.col = col
        self.message = message


def parse_bytes(data: bytes) -> ParseResult:
    """Parse raw file content; invalid UTF-8 is an error with its position, never a crash."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        return ParseResult((), (SpecError(line, col, "file is not valid UTF-8"),))
    return parse_text(text)


def parse_text(text: str) -> ParseResult:
    if text.startswith("\ufeff"):
        text = text[1:]
    mappings: list[Located] = []
    errors: list[SpecError] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        try:
            located = _parse_line(raw, number)
        except _LineError as exc:
            errors.append(SpecError(number, exc.col, exc.message))
            continue
        if located is not None:
            mappings.append(located)
    errors.extend(_duplicates(mappings))
    errors.sort(key=lambda e: (e.line, e.col))
    return ParseResult(tuple(mappings), tuple(errors))


def _parse_line(raw: str, number: int) -> Located | None:
    body = raw.split("#", 1)[0]
    stripped = body.strip()
    if not stripped:
        return None
    pos = len(body) - len(body.lstrip())  # 0-based index of the first character
    process_type = DEFAULT_PROCESS_TYPE
    prefix = _PROC_PREFIX.match(body, pos)
    if prefix:
        process_type = prefix.group(1)
        if not PROCESS_TYPE_RE.fullmatch(process_type):
            raise _LineError(
                pos + 1, f'process type "{excerpt(process_type)}" is too long (max 63)'
            )
        pos = prefix.end()
        while pos < len(body) and body[pos] in " \t":
            pos += 1
    start_col = pos + 1
    end = pos
    while end < len(body) and not body[end].isspace():
        end += 1
    token = body[pos:end]
    rest = body[end:]
    option = rest.split(None, 1)[0] if rest.strip() else ""
    if option == PROXY_PROTOCOL_OPTION:  # the one option word a mapping may carry
        end += rest.index(option) + len(option)
        rest = body[end:]
    if rest.strip():
        extra = end + (len(rest) - len(rest.lstrip()))
        raise _LineError(extra + 1, f'unexpected "{excerpt(rest.strip())}" after the mapping')
    mapping = _parse_mapping(token, pos, process_type)
    if option == PROXY_PROTOCOL_OPTION:
        mapping = replace(mapping, proxy_protocol=True)
    return Located(mapping, number, start_col)


def _parse_mapping(token: str, offset: int, process_type: str) -> Mapping:
    """`offset` is the 0-based index of token in its line, for error columns."""
    public_ip: IPAddress | None = None
    pos = 0
    if token.startswith("["):
        close = token.find("]")
        if close < 0:
            raise _LineError(offset + 1, 'missing "]" after the IPv6 address')
        public_ip = _parse_ip(token[1:close], offset + 2, want_v6=True)
        if token[close + 1 : close + 2] != ":":
            raise _LineError(offset + close + 2, 'expected ":" after "]"')
        pos = close + 2
    protocol = Protocol.TCP
    body = token[pos:]
    slash = body.find("/")
    if slash >= 0:
        proto_text = body[slash + 1 :]
        try:
            protocol = Protocol(proto_text.lower())
        except ValueError:
            raise _LineError(
                offset + pos + slash + 2,
                f'unknown protocol "{excerpt(proto_text)}" (expected tcp or udp)',
            ) from None
        body = body[:slash]
    parts = body.split(":")
    if public_ip is None and len(parts) == 3:
        public_ip = _parse_ip(parts[0], offset + pos + 1, want_v6=False)
        pos += len(parts[0]) + 1
        parts = parts[1:]
    if len(parts) != 2:
        if not body:
            raise _LineError(offset + pos + 1, "expected PUBLIC:PRIVATE")
        if len(parts) > 3 and public_ip is None:
            raise _LineError(offset + 1, "an IPv6 host address must be written in brackets")
        raise _LineError(offset + pos + 1, f'expected PUBLIC:PRIVATE, got "{excerpt(token)}"')
    pub_col = offset + pos + 1
    priv_col = pub_col + len(parts[0]) + 1
    pub_start, pub_end = _parse_range(parts[0], pub_col, "public")
    priv_start, priv_end = _parse_range(parts[1], priv_col, "private")
    pub_len = pub_end - pub_start + 1
    priv_len = priv_end - priv_start + 1
    if pub_len != priv_len:
        raise _LineError(
            priv_col,
            f"public range {excerpt(parts[0])} has {pub_len} ports but private range "
            f"{excerpt(parts[1])} has {priv_len}",
        )
    return Mapping(
        public_port=pub_start,
        private_port=priv_start,
        protocol=protocol,
        count=pub_len,
        public_ip=public_ip,
        process_type=process_type,
    )


def _parse_range(text: str, col: int, side: str) -> tuple[int, int]:
    first, dash, second = text.partition("-")
    start = _parse_port(first, col, side)
    if not dash:
        return start, start
    end = _parse_port(second, col + len(first) + 1, side)
    if end < start:
        raise _LineError(col, f"{side} range {excerpt(text)} ends before it starts")
    return start, end


def _parse_port(text: str, col: int, side: str) -> int:
    if not text:
        raise _LineError(col, f"missing {side} port")
    if not _NUMBER.fullmatch(text):
        raise _LineError(col, f'{side} port "{excerpt(text)}" is not a number')
    if len(text.lstrip("0")) > 5:  # also keeps int() away from absurdly long digit runs
        shown = excerpt(text)
        raise _LineError(col, f"{side} port {shown} is out of range ({PORT_MIN}-{PORT_MAX})")
    value = int(text)
    if not PORT_MIN <= value <= PORT_MAX:
        raise _LineError(col, f"{side} port {value} is out of range ({PORT_MIN}-{PORT_MAX})")
    return value


def _parse_ip(text: str, col: int, want_v6: bool) -> IPAddress:
    try:
        addr = ip_address(text)
    except ValueError:
        raise _LineError(col, f'"{excerpt(text)}" is not an IP address') from None
    if isinstance(addr, IPv6Address) and not want_v6:
        raise _LineError(col, "an IPv6 host address must be written in brackets")
    if isinstance(addr, IPv4Address) and want_v6:
        raise _LineError(col, f"{addr} is IPv4: write it without brackets")
    if isinstance(addr, IPv6Address) and addr.scope_id:
        raise _LineError(col, f"{excerpt(str(addr))}: a zone index (%) cannot be a public address")
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        raise _LineError(col, f"{addr} is IPv4-mapped: write {addr.ipv4_mapped} instead")
    if addr.is_loopback:
        raise _LineError(
            col, f"{addr} is a loopback address: natports does not DNAT loopback traffic"
        )
    if addr.is_unspecified or addr.is_multicast:
        raise _LineError(col, f"{addr} cannot be a public address; omit it to mean all addresses")
    return addr


def overlaps(a: Mapping, b: Mapping) -> bool:
    """True when some new flow could match both mappings."""
    if a.protocol != b.protocol:
        return False
    if a.public_ip is not None and b.public_ip is not None and a.public_ip != b.public_ip:
        return False
    return a.public_port <= b.public_end and b.public_port <= a.public_end


def _duplicates(mappings: list[Located]) -> list[SpecError]:
    """Each mapping that overlaps an earlier line, naming the first such line.

    O(n log P) (P = 65536 ports): lines are visited in file order, and per protocol a
    segment tree answers "the first line that covered any port of [start, end]" for
    wildcard mappings, for each address, and for all of them together.
    """
    errors: list[SpecError] = []
    by_line: dict[int, Located] = {}
    claims = ClaimIndex()
    for later in mappings:
        m = later.mapping
        first = claims.first(m)
        if first is not None:
            earlier = by_line[first]
            errors.append(
                SpecError(
                    later.line,
                    later.col,
                    f"public port {m.public_text()} overlaps "
                    f"{earlier.mapping.public_text()} on line {earlier.line}",
                )
            )
        by_line.setdefault(later.line, later)
        claims.add(m, later.line)
    return errors


class ClaimIndex:
    """Public-port claims by rank; `first(m)` is the smallest rank of a claim that
    overlaps `m` (see `overlaps`), None when none does. O(log P) per call: per protocol,
    segment trees for every claim, for claims on all addresses, and for each address.
    """

    def __init__(self) -> None:
        self._trees: dict[tuple[Protocol, str], _FirstCover] = {}

    def _tree(self, protocol: Protocol, key: str) -> _FirstCover:
        return self._trees.setdefault((protocol, key), _FirstCover())

    def add(self, m: Mapping, rank: int) -> None:
        key = "*all-addresses" if m.public_ip is None else str(m.public_ip)
        for name in ("*any", key):
            self._tree(m.protocol, name).cover(m.public_port, m.public_end, rank)

    def first(self, m: Mapping) -> int | None:
        if m.public_ip is None:  # all addresses: overlaps anything on its ports
            found = self._tree(m.protocol, "*any").first(m.public_port, m.public_end)
        else:
            found = min(
                self._tree(m.protocol, "*all-addresses").first(m.public_port, m.public_end),
                self._tree(m.protocol, str(m.public_ip)).first(m.public_port, m.public_end),
            )
        return None if found >= _FirstCover.NONE else found


class _FirstCover:
    """Ports 0-65535, each remembering the first (smallest) line that covered it.

    A sparse segment tree: `cover` applies min(line) to a range, `first` is the minimum
    over a range. Nodes are created on demand, so memory grows with the mappings.
    """

    NONE = 1 << 62
    _SIZE = 1 << 16

    def __init__(self) -> None:
        self._tag: dict[int, int] = {}  # node -> min applied to its whole range
        self._min: dict[int, int] = {}  # node -> min over its range

    def cover(self, start: int, end: int, line: int) -> None:
        self._cover(1, 0, self._SIZE - 1, start, end, line)

    def first(self, start: int, end: int) -> int:
        return self._first(1, 0, self._SIZE - 1, start, end)

    def _cover(self, node: int, lo: int, hi: int, start: int, end: int, line: int) -> None:
        if end < lo or hi < start:
            return
        if start <= lo and hi <= end:
            self._tag[node] = min(self._tag.get(node, self.NONE), line)
            self._min[node] = min(self._min.get(node, self.NONE), line)
            return
        mid = (lo + hi) // 2
        self._cover(2 * node, lo, mid, start, end, line)
        self._cover(2 * node + 1, mid + 1, hi, start, end, line)
        self._min[node] = min(
            self._tag.get(node, self.NONE),
            self._min.get(2 * node, self.NONE),
            self._min.get(2 * node + 1, self.NONE),
        )

    def _first(self, node: int, lo: int, hi: int, start: int, end: int) -> int:
        if end < lo or hi < start or node not in self._min:
            return self.NONE
        if start <= lo and hi <= end:
            return self._min[node]
        mid = (lo + hi) // 2
        return min(
            self._tag.get(node, self.NONE),
            self._first(2 * node, lo, mid, start, end),
            self._first(2 * node + 1, mid + 1, hi, start, end),
        )


def format_errors(result: ParseResult, filename: str) -> list[str]:
    return [e.format(filename) for e in result.errors]
