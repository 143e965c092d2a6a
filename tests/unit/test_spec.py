"""The PORTS grammar: what parses, to what, and the exact text of every error."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natports.model import PORT_MAX, PORT_MIN, PROCESS_TYPE_RE, IPAddress, Mapping, Protocol
from natports.spec import (
    Located,
    ParseResult,
    SpecError,
    excerpt,
    format_errors,
    overlaps,
    parse_bytes,
    parse_text,
)

TCP = Protocol.TCP
UDP = Protocol.UDP


def only(text: str) -> Mapping:
    """The single mapping of a valid text."""
    result = parse_text(text)
    assert result.errors == ()
    assert len(result.mappings) == 1
    return result.mappings[0].mapping


def errors(text: str) -> list[str]:
    return format_errors(parse_text(text), "PORTS")


# -- valid forms ------------------------------------------------------------------------------


def test_seed_form_is_tcp_on_all_addresses_for_web() -> None:
    result = parse_text("25:5025\n")
    assert result.ok
    assert result.errors == ()
    assert result.mappings == (Located(Mapping(25, 5025), line=1, col=1),)
    mapping = result.mappings[0].mapping
    assert mapping.protocol is TCP
    assert mapping.public_ip is None
    assert mapping.process_type == "web"
    assert mapping.count == 1


def test_empty_text_has_no_mappings_and_no_errors() -> None:
    assert parse_text("") == ParseResult((), ())
    assert parse_bytes(b"") == ParseResult((), ())


def test_comments_and_blank_lines() -> None:
    text = "# mail ports\n\n   \n25:5025 # smtp\n\t# 587:5587\n# 465:5465\n587:5587#submission\n"
    result = parse_text(text)
    assert result.errors == ()
    assert result.mappings == (
        Located(Mapping(25, 5025), line=4, col=1),
        Located(Mapping(587, 5587), line=7, col=1),
    )


def test_a_commented_mapping_is_not_a_mapping() -> None:
    assert parse_text("# 25:5025") == ParseResult((), ())
    assert parse_text("   #25:5025\n") == ParseResult((), ())


def test_crlf_line_endings() -> None:
    result = parse_text("25:5025\r\n\r\n# c\r\n53:5053/udp\r\n")
    assert result.errors == ()
    assert result.mappings == (
        Located(Mapping(25, 5025), line=1, col=1),
        Located(Mapping(53, 5053, UDP), line=4, col=1),
    )


def test_utf8_bom_is_ignored() -> None:
    result = parse_bytes(b"\xef\xbb\xbf25:5025\n")
    assert result.errors == ()
    assert result.mappings == (Located(Mapping(25, 5025), line=1, col=1),)
    assert parse_text("\ufeff25:5025") == result


def test_surrounding_whitespace() -> None:
    result = parse_text("  \t 25:5025 \t \n")
    assert result.errors == ()
    assert result.mappings == (Located(Mapping(25, 5025), line=1, col=5),)


def test_udp_and_explicit_tcp() -> None:
    assert only("53:5053/udp") == Mapping(53, 5053, UDP)
    assert only("25:5025/tcp") == Mapping(25, 5025, TCP)
    assert only("53:5053/UDP") == Mapping(53, 5053, UDP)


def test_ipv4_host() -> None:
    assert only("203.0.113.7:25:5025") == Mapping(25, 5025, public_ip=IPv4Address("203.0.113.7"))


def test_bracketed_ipv6_host() -> None:
    mapping = only("[2001:db8::7]:25:5025/udp")
    assert mapping == Mapping(25, 5025, UDP, public_ip=IPv6Address("2001:db8::7"))


def test_ranges() -> None:
    mapping = only("1000-1010:2000-2010")
    assert mapping == Mapping(1000, 2000, count=11)
    assert mapping.public_end == 1010
    assert mapping.private_end == 2010
    assert mapping.ports()[0] == (1000, 2000)
    assert mapping.ports()[-1] == (1010, 2010)
    assert len(mapping.ports()) == 11


def test_a_range_of_one_port() -> None:
    assert only("25-25:5025-5025") == Mapping(25, 5025)


def test_extreme_ports() -> None:
    assert only("1:65535") == Mapping(1, 65535)
    assert only("65535:1") == Mapping(65535, 1)
    assert only("1-65535:1-65535") == Mapping(1, 1, count=65535)


def test_process_type_prefix() -> None:
    result = parse_text("worker: 25:5025\n")
    assert result.errors == ()
    assert result.mappings == (Located(Mapping(25, 5025, process_type="worker"), line=1, col=9),)


def test_process_type_prefix_with_tab_and_every_part() -> None:
    mapping = only("  mail_in-2:\t\t[2001:db8::7]:1000-1001:2000-2001/udp  # both")
    assert mapping == Mapping(
        1000, 2000, UDP, count=2, public_ip=IPv6Address("2001:db8::7"), process_type="mail_in-2"
    )


def test_explicit_web_prefix_equals_no_prefix() -> None:
    assert only("web: 25:5025") == only("25:5025")


def test_a_process_type_of_63_characters_is_fine() -> None:
    name = "w" * 63
    assert only(f"{name}: 25:5025").process_type == name


def test_proxy_protocol_option() -> None:
    assert only("25:5025 proxy-protocol") == Mapping(25, 5025, proxy_protocol=True)
    assert only("worker:\t[2001:db8::7]:53:5053/udp\tproxy-protocol  # dns") == Mapping(
        53, 5053, UDP, public_ip=ip_address("2001:db8::7"), process_type="worker",
        proxy_protocol=True,
    )  # fmt: skip
    assert only("25:5025 proxy-protocol").to_line() == "25:5025/tcp proxy-protocol"
    assert only("25:5025").proxy_protocol is False
    assert Mapping(25, 5025, proxy_protocol=True).to_json()["proxy_protocol"] is True
    assert "proxy_protocol" not in Mapping(25, 5025).to_json()  # older documents unchanged
    for m in (Mapping(25, 5025), Mapping(25, 5025, proxy_protocol=True)):
        assert Mapping.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("25:5025 proxy", 'PORTS:1:9: unexpected "proxy" after the mapping'),
        # errors quote at most a short excerpt of the input
        ("25:5025 PROXY-PROTOCOL", 'PORTS:1:9: unexpected "PROXY-PROTOC..." after the mapping'),
        (
            "25:5025 proxy-protocol proxy-protocol",
            'PORTS:1:24: unexpected "proxy-protoc..." after the mapping',
        ),
        ("25:5025 proxy-protocol x", 'PORTS:1:24: unexpected "x" after the mapping'),
        ("25:5025proxy-protocol", 'PORTS:1:4: private port "5025proxy" is not a number'),
        ("25:x proxy-protocol", 'PORTS:1:4: private port "x" is not a number'),
        ("proxy-protocol", 'PORTS:1:1: expected PUBLIC:PRIVATE, got "proxy-protoc..."'),
    ],
)
def test_proxy_protocol_errors(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_located_columns_point_at_the_mapping() -> None:
    result = parse_text("25:5025\n   worker:  26:5026\n")
    assert [(loc.line, loc.col) for loc in result.mappings] == [(1, 1), (2, 13)]


def test_different_protocols_or_addresses_do_not_overlap() -> None:
    text = "\n".join(
        [
            "25:5025",
            "25:5025/udp",
            "203.0.113.7:26:5026",
            "203.0.113.8:26:5026",
            "[2001:db8::7]:26:5026",
            "1000-1010:2000-2010",
            "1011-1020:3000-3009",
        ]
    )
    result = parse_text(text)
    assert result.errors == ()
    assert len(result.mappings) == 7


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # out of range, on either side and at either end of a range
        ("# ports\n\n   70000:5025\n", "PORTS:3:4: public port 70000 is out of range (1-65535)"),
        ("0:5025", "PORTS:1:1: public port 0 is out of range (1-65535)"),
        ("25:0", "PORTS:1:4: private port 0 is out of range (1-65535)"),
        ("25:65536", "PORTS:1:4: private port 65536 is out of range (1-65535)"),
        ("1000-99999:2000-2010", "PORTS:1:6: public port 99999 is out of range (1-65535)"),
        ("1000-1010:2000-70000", "PORTS:1:16: private port 70000 is out of range (1-65535)"),
        # not numbers
        ("2x5:5025", 'PORTS:1:1: public port "2x5" is not a number'),
        ("25:smtp", 'PORTS:1:4: private port "smtp" is not a number'),
        ("25:+5025", 'PORTS:1:4: private port "+5025" is not a number'),
        ("25:5025-50x", 'PORTS:1:9: private port "50x" is not a number'),
        (":5025", "PORTS:1:1: missing public port"),
        ("25:", "PORTS:1:4: missing private port"),
        ("-5:5025", "PORTS:1:1: missing public port"),
        ("25-:5025", "PORTS:1:4: missing public port"),
        # ranges
        (
            "1000-1010:2000-2005",
            "PORTS:1:11: public range 1000-1010 has 11 ports but private range 2000-2005 has 6",
        ),
        (
            "25:5025-5026",
            "PORTS:1:4: public range 25 has 1 ports but private range 5025-5026 has 2",
        ),
        ("1010-1000:2000-2010", "PORTS:1:1: public range 1010-1000 ends before it starts"),
        ("1000-1010:2010-2000", "PORTS:1:11: private range 2010-2000 ends before it starts"),
        # protocols
        ("25:5025/sctp", 'PORTS:1:9: unknown protocol "sctp" (expected tcp or udp)'),
        ("25:5025/", 'PORTS:1:9: unknown protocol "" (expected tcp or udp)'),
        ("  25:5025/tcp/udp", 'PORTS:1:11: unknown protocol "tcp/udp" (expected tcp or udp)'),
        # hosts
        ("2001:db8::7:25:5025", "PORTS:1:1: an IPv6 host address must be written in brackets"),
        ("  ::1:25:5025", "PORTS:1:3: an IPv6 host address must be written in brackets"),
        (
            "127.0.0.1:25:5025",
            "PORTS:1:1: 127.0.0.1 is a loopback address: natports does not DNAT loopback traffic",
        ),
        (
            "127.1.2.3:25:5025",
            "PORTS:1:1: 127.1.2.3 is a loopback address: natports does not DNAT loopback traffic",
        ),
        (
            "[::1]:25:5025",
            "PORTS:1:2: ::1 is a loopback address: natports does not DNAT loopback traffic",
        ),
        (
            "0.0.0.0:25:5025",
            "PORTS:1:1: 0.0.0.0 cannot be a public address; omit it to mean all addresses",
        ),
        (
            "[::]:25:5025",
            "PORTS:1:2: :: cannot be a public address; omit it to mean all addresses",
        ),
        (
            "224.0.0.1:25:5025",
            "PORTS:1:1: 224.0.0.1 cannot be a public address; omit it to mean all addresses",
        ),
        (
            "[ff02::1]:25:5025",
            "PORTS:1:2: ff02::1 cannot be a public address; omit it to mean all addresses",
        ),
        ("mail.example:25:5025", 'PORTS:1:1: "mail.example" is not an IP address'),
        ("1.2.3:25:5025", 'PORTS:1:1: "1.2.3" is not an IP address'),
        ("[203.0.113.7]:25:5025", "PORTS:1:2: 203.0.113.7 is IPv4: write it without brackets"),
        ("[2001:db8::7:25:5025", 'PORTS:1:1: missing "]" after the IPv6 address'),
        ("[2001:db8::7]25:5025", 'PORTS:1:14: expected ":" after "]"'),
        ("[]:25:5025", 'PORTS:1:2: "" is not an IP address'),
        # shape
        ("25", 'PORTS:1:1: expected PUBLIC:PRIVATE, got "25"'),
        ("/udp", "PORTS:1:1: expected PUBLIC:PRIVATE"),
        (
            "[2001:db8::7]:25:5025:1",
            'PORTS:1:15: expected PUBLIC:PRIVATE, got "[2001:db8::7..."',  # an excerpt
        ),
        ("worker:25:5025", 'PORTS:1:1: "worker" is not an IP address'),
        ("worker: ", "PORTS:1:9: expected PUBLIC:PRIVATE"),
        # trailing garbage
        ("25:5025 tcp", 'PORTS:1:9: unexpected "tcp" after the mapping'),
        ("25:5025  udp  # comment", 'PORTS:1:10: unexpected "udp" after the mapping'),
        ("25 : 5025", 'PORTS:1:4: unexpected ": 5025" after the mapping'),
        # process types
        (
            "w" * 64 + ": 25:5025",
            'PORTS:1:1: process type "' + "w" * 12 + '..." is too long (max 63)',
        ),
        (
            "  " + "w" * 70 + ": 25:5025",
            f'PORTS:1:3: process type "{"w" * 12}..." is too long (max 63)',
        ),
    ],
)
def test_error_text(text: str, expected: str) -> None:
    result = parse_text(text)
    assert not result.ok
    assert result.mappings == ()
    assert format_errors(result, "PORTS") == [expected]


def test_spec_error_format() -> None:
    assert (
        SpecError(3, 4, "boom").format("/home/dokku/mail/PORTS")
        == "/home/dokku/mail/PORTS:3:4: boom"
    )


def test_an_error_on_a_crlf_line_does_not_count_the_cr() -> None:
    assert errors("25:5025\r\n26:5026 x\r\n") == ['PORTS:2:9: unexpected "x" after the mapping']


def test_columns_after_a_bom_count_from_the_first_real_character() -> None:
    assert format_errors(parse_bytes(b"\xef\xbb\xbf  0:5025\n"), "PORTS") == [
        "PORTS:1:3: public port 0 is out of range (1-65535)"
    ]


def test_duplicate_public_port() -> None:
    assert errors("25:5025\n25:6025/tcp\n") == [
        "PORTS:2:1: public port 25/tcp overlaps 25/tcp on line 1"
    ]


def test_duplicate_across_process_types() -> None:
    assert errors("25:5025\nworker: 25:6025\n") == [
        "PORTS:2:9: public port 25/tcp overlaps 25/tcp on line 1"
    ]


def test_overlapping_ranges() -> None:
    assert errors("1000-1010:2000-2010\n\n  1005:3000\n1010-1012:4000-4002\n1011:5000/udp\n") == [
        "PORTS:3:3: public port 1005/tcp overlaps 1000-1010/tcp on line 1",
        "PORTS:4:1: public port 1010-1012/tcp overlaps 1000-1010/tcp on line 1",
    ]


def test_all_addresses_overlap_a_specific_address() -> None:
    assert errors("203.0.113.7:25:5025\n25:6025\n[2001:db8::7]:25:7025\n") == [
        "PORTS:2:1: public port 25/tcp overlaps 203.0.113.7:25/tcp on line 1",
        "PORTS:3:1: public port [2001:db8::7]:25/tcp overlaps 25/tcp on line 2",
    ]


def test_same_specific_address_overlaps() -> None:
    assert errors("[2001:db8::7]:53:5053/udp\n[2001:db8:0::7]:53:6053/udp\n") == [
        "PORTS:2:1: public port [2001:db8::7]:53/udp overlaps [2001:db8::7]:53/udp on line 1"
    ]


def test_an_overlap_is_reported_once_per_line() -> None:
    assert errors("25:5025\n25:6025\n25:7025\n") == [
        "PORTS:2:1: public port 25/tcp overlaps 25/tcp on line 1",
        "PORTS:3:1: public port 25/tcp overlaps 25/tcp on line 1",
    ]


def test_invalid_utf8() -> None:
    result = parse_bytes(b"25:5025\n  \xff26:5026\n")
    assert result.mappings == ()
    assert format_errors(result, "PORTS") == ["PORTS:2:3: file is not valid UTF-8"]


def test_invalid_utf8_on_the_first_line() -> None:
    assert parse_bytes(b"\xc3(") == ParseResult((), (SpecError(1, 1, "file is not valid UTF-8"),))


def test_every_error_of_a_file_is_reported_in_order() -> None:
    text = (
        "# mail\n"
        "25:5025\n"
        "70000:5025\n"
        "53:5053/sctp\n"
        "\n"
        "25:6025\n"
        "worker: 127.0.0.1:26:5026\n"
        "587:5587\n"
        "1000-1001:2000 junk\n"
    )
    result = parse_text(text)
    assert format_errors(result, "PORTS") == [
        "PORTS:3:1: public port 70000 is out of range (1-65535)",
        'PORTS:4:9: unknown protocol "sctp" (expected tcp or udp)',
        "PORTS:6:1: public port 25/tcp overlaps 25/tcp on line 2",
        "PORTS:7:9: 127.0.0.1 is a loopback address: natports does not DNAT loopback traffic",
        'PORTS:9:16: unexpected "junk" after the mapping',
    ]
    # the good lines still parse, so callers may show both
    assert [(loc.line, loc.mapping.public_port) for loc in result.mappings] == [
        (2, 25),
        (6, 25),
        (8, 587),
    ]


def test_only_the_first_problem_of_a_line_is_reported() -> None:
    assert errors("0:0/sctp") == ['PORTS:1:5: unknown protocol "sctp" (expected tcp or udp)']
    assert errors("0:0") == ["PORTS:1:1: public port 0 is out of range (1-65535)"]


def test_long_digit_runs_are_out_of_range_not_a_crash() -> None:
    assert errors("123456:5025") == ["PORTS:1:1: public port 123456 is out of range (1-65535)"]
    assert errors("25:" + "1" * 5000) == [
        "PORTS:1:4: private port 111111111111... is out of range (1-65535)"
    ]


def test_an_ipv6_zone_index_is_refused() -> None:
    assert errors("[fe80::1%eth0]:25:5025") == [
        "PORTS:1:2: fe80::1%eth0: a zone index (%) cannot be a public address"
    ]


def test_an_ipv4_mapped_ipv6_address_is_refused() -> None:
    mapped = ip_address("::ffff:203.0.113.7")  # printed differently by Python versions
    assert errors("  [::ffff:203.0.113.7]:25:5025") == [
        f"PORTS:1:4: {mapped} is IPv4-mapped: write 203.0.113.7 instead"
    ]
    assert errors("[::ffff:127.0.0.1]:25:5025")[0].startswith("PORTS:1:2: ")


# -- properties -------------------------------------------------------------------------------


def _public_ip_ok(addr: IPAddress) -> bool:
    if isinstance(addr, IPv6Address) and (addr.scope_id or addr.ipv4_mapped is not None):
        return False
    return not (addr.is_loopback or addr.is_unspecified or addr.is_multicast)


public_ips: st.SearchStrategy[IPAddress] = st.one_of(
    st.ip_addresses(v=4), st.ip_addresses(v=6)
).filter(_public_ip_ok)

process_types: st.SearchStrategy[str] = st.one_of(
    st.just("web"), st.from_regex(PROCESS_TYPE_RE, fullmatch=True)
)


@st.composite
def valid_mappings(draw: st.DrawFn) -> Mapping:
    count = draw(st.one_of(st.just(1), st.integers(1, 16), st.integers(1, PORT_MAX)))
    public = draw(st.integers(PORT_MIN, PORT_MAX - count + 1))
    private = draw(st.integers(PORT_MIN, PORT_MAX - count + 1))
    return Mapping(
        public_port=public,
        private_port=private,
        protocol=draw(st.sampled_from(Protocol)),
        count=count,
        public_ip=draw(st.none() | public_ips),
        process_type=draw(process_types),
        proxy_protocol=draw(st.booleans()),
    )


def _clash(a: Mapping, b: Mapping) -> bool:
    """Written out again here rather than borrowed from natports.spec."""
    if a.protocol != b.protocol:
        return False
    if a.public_ip is not None and b.public_ip is not None and a.public_ip != b.public_ip:
        return False
    return not (
        a.public_port + a.count - 1 < b.public_port or b.public_port + b.count - 1 < a.public_port
    )


@given(valid_mappings())
def test_to_line_parses_back_to_an_equal_mapping(mapping: Mapping) -> None:
    line = mapping.to_line()
    result = parse_text(line)
    assert result.errors == ()
    assert [loc.mapping for loc in result.mappings] == [mapping]


blanks = st.text(alphabet=" \t", max_size=3)
comment_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\n"), max_size=20
)


@st.composite
def decorated_files(draw: st.DrawFn) -> tuple[str, list[tuple[int, Mapping]]]:
    """A whole PORTS file of non-overlapping mappings, and (line, mapping) for each."""
    candidates = draw(st.lists(valid_mappings(), max_size=8))
    chosen: list[Mapping] = []
    for m in candidates:
        if not any(_clash(m, c) for c in chosen):
            chosen.append(m)
    lines: list[str] = []
    expected: list[tuple[int, Mapping]] = []
    for m in chosen:
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(["blank", "comment"]))
            if kind == "blank":
                lines.append(draw(blanks))
            else:
                lines.append(draw(blanks) + "#" + draw(comment_text))
        line = draw(blanks) + m.to_line() + draw(blanks)
        if draw(st.booleans()):
            line += draw(blanks) + "#" + draw(comment_text)
        lines.append(line)
        expected.append((len(lines), m))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(lines) + draw(st.sampled_from(["", eol]))
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text, expected


@given(decorated_files())
def test_a_whole_file_round_trips(case: tuple[str, list[tuple[int, Mapping]]]) -> None:
    text, expected = case
    result = parse_text(text)
    assert result.errors == ()
    assert [(loc.line, loc.mapping) for loc in result.mappings] == expected
    assert parse_bytes(text.encode("utf-8")) == result


def _check_positions(result: ParseResult, lines: list[int]) -> None:
    """`lines` holds the length of every line of the input."""
    for err in result.errors:
        assert 1 <= err.line <= len(lines)
        assert 1 <= err.col <= lines[err.line - 1] + 1
        assert err.message
    for loc in result.mappings:
        assert 1 <= loc.line <= len(lines)
        assert 1 <= loc.col <= lines[loc.line - 1]
    assert [(e.line, e.col) for e in result.errors] == sorted(
        (e.line, e.col) for e in result.errors
    )


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    result = parse_bytes(data)
    _check_positions(result, [len(line) for line in data.split(b"\n")])


@given(st.text(max_size=200))
def test_random_text_never_crashes(text: str) -> None:
    result = parse_text(text)
    _check_positions(result, [len(line) for line in text.split("\n")])
    assert parse_bytes(text.encode("utf-8")) == result


# Text made of the grammar's own characters gets much deeper into the parser.
_TOKENS = [*"0123456789:-/[].#abcdfptuw \t\r\n\ufeff", "tcp", "udp", "65535", "worker: "]
_TOKENS += ["203.0.113.7", "[2001:db8::7]", "127.0.0.1", "[::1]", "1000-1010", "\r\n"]
_TOKENS += [" proxy-protocol", "proxy-", " proxy"]
_noise = st.lists(st.sampled_from(_TOKENS), max_size=6).map("".join)


@st.composite
def _mutated_line(draw: st.DrawFn) -> str:
    """A valid line with a slice of it replaced by grammar noise."""
    line = draw(valid_mappings()).to_line()
    start = draw(st.integers(0, len(line)))
    end = draw(st.integers(start, min(len(line), start + 4)))
    return line[:start] + draw(_noise) + line[end:]


_grammar_line = st.one_of(
    valid_mappings().map(Mapping.to_line),
    _mutated_line(),
    st.lists(st.sampled_from(_TOKENS), max_size=20).map("".join),
)
grammar_text = st.lists(_grammar_line, max_size=6).map("\n".join)


@given(grammar_text)
def test_grammar_like_text_never_crashes(text: str) -> None:
    result = parse_text(text)
    _check_positions(result, [len(line) for line in text.split("\n")])
    for loc in result.mappings:
        m = loc.mapping
        assert PORT_MIN <= m.public_port <= m.public_end <= PORT_MAX
        assert PORT_MIN <= m.private_port <= m.private_end <= PORT_MAX
        assert m.public_ip is None or _public_ip_ok(m.public_ip)
        assert parse_text(m.to_line()).mappings[0].mapping == m


def test_ip_address_parsing_is_canonical() -> None:
    # `[2001:db8:0::7]` and `[2001:db8::7]` are the same address, so the same mapping
    assert only("[2001:db8:0::7]:25:5025") == only("[2001:db8::7]:25:5025")
    assert only("[2001:db8::7]:25:5025").public_ip == ip_address("2001:db8::7")


def test_errors_quote_only_a_short_excerpt_of_the_line() -> None:
    """A PORTS that is really another file (an app's ENV) must not be echoed back."""
    secret = "DATABASE_URL=postgres://user:hunter2@db/app"
    shown = errors(f"25:5025 {secret}\n{secret}\n")
    assert shown == [
        'PORTS:1:9: unexpected "DATABASE_URL..." after the mapping',
        'PORTS:2:24: unknown protocol "/user:hunter..." (expected tcp or udp)',
    ]
    assert not any("hunter2" in line or "postgres" in line for line in shown)
    assert excerpt("a\x1b[2Jb") == "a\\x1b[2Jb"


def test_duplicates_of_a_large_file_are_found_in_n_log_n() -> None:
    """16,000 lines (the 64 KiB cap's order) with overlaps: linear-ish, not quadratic."""
    lines = [f"{port}:{port}" for port in range(1, 16001)] + ["1-65535:1-65535/udp", "5:5/udp"]
    lines.append("203.0.113.7:7:7")
    result = parse_text("\n".join(lines))
    assert [e.message for e in result.errors] == [
        "public port 5/udp overlaps 1-65535/udp on line 16001",
        "public port 203.0.113.7:7/tcp overlaps 7/tcp on line 7",
    ]


@given(
    st.lists(
        st.tuples(
            st.integers(1, 40),
            st.integers(0, 5),
            st.sampled_from([None, "203.0.113.7", "203.0.113.8"]),
            st.sampled_from(["tcp", "udp"]),
        ),
        max_size=25,
    )
)
def test_duplicates_match_the_pairwise_definition(
    items: list[tuple[int, int, str | None, str]],
) -> None:
    text = "\n".join(
        f"{'' if ip is None else ip + ':'}{start}-{start + extra}:{start}-{start + extra}/{proto}"
        for start, extra, ip, proto in items
    )
    located = list(parse_text(text).mappings)
    expected = []
    for i, later in enumerate(located):
        first = next((e for e in located[:i] if overlaps(e.mapping, later.mapping)), None)
        if first is not None:
            expected.append((later.line, first.line))
    found = [(e.line, int(e.message.rsplit(" ", 1)[1])) for e in parse_text(text).errors]
    assert found == expected
