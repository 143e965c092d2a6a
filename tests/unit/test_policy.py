"""Host policy and cross-app conflicts: which public ports an app may claim."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natports.errors import InputError
from natports.model import Mapping, Protocol
from natports.policy import (
    HostListener,
    Policy,
    PortRange,
    check_conflicts,
    check_policy,
    load_policy,
)
from natports.spec import Located, SpecError, parse_text

TCP = Protocol.TCP
UDP = Protocol.UDP


Claims = dict[str, tuple[Mapping, ...]]


def located(text: str) -> list[Located]:
    result = parse_text(text)
    assert result.errors == ()
    return list(result.mappings)


def listener(
    ip: str, port: int, protocol: Protocol = TCP, process: str = "nginx (pid 12)"
) -> HostListener:
    return HostListener(protocol, ip_address(ip), port, process)


# -- PortRange --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22", PortRange(22, 22)),
        ("22/tcp", PortRange(22, 22, TCP)),
        ("53/udp", PortRange(53, 53, UDP)),
        ("1000-2000", PortRange(1000, 2000)),
        ("1000-2000/udp", PortRange(1000, 2000, UDP)),
        ("  25 ", PortRange(25, 25)),
        ("1-65535", PortRange(1, 65535)),
        ("7-7", PortRange(7, 7)),
    ],
)
def test_port_range_parse(text: str, expected: PortRange) -> None:
    assert PortRange.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", '"" is not PORT[-END][/tcp|/udp]'),
        ("ssh", '"ssh" is not PORT[-END][/tcp|/udp]'),
        ("22/sctp", '"22/sctp" is not PORT[-END][/tcp|/udp]'),
        ("22/TCP", '"22/TCP" is not PORT[-END][/tcp|/udp]'),
        ("-22", '"-22" is not PORT[-END][/tcp|/udp]'),
        ("22-", '"22-" is not PORT[-END][/tcp|/udp]'),
        ("0", '"0" is not a port range within 1-65535'),
        ("65536", '"65536" is not a port range within 1-65535'),
        ("100-70000", '"100-70000" is not a port range within 1-65535'),
        ("30-20", '"30-20" is not a port range within 1-65535'),
    ],
)
def test_port_range_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        PortRange.parse(text)
    assert str(info.value) == message


def test_port_range_covers() -> None:
    both = PortRange(20, 30)
    assert both.covers(TCP, 20)
    assert both.covers(UDP, 30)
    assert not both.covers(TCP, 19)
    assert not both.covers(TCP, 31)
    udp = PortRange(53, 53, UDP)
    assert udp.covers(UDP, 53)
    assert not udp.covers(TCP, 53)


# -- load_policy ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "natports.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_missing_file_means_the_defaults(tmp_path: Path) -> None:
    policy = load_policy(tmp_path / "nope.toml")
    assert policy == Policy()
    assert policy.deny == ()
    assert policy.reserved == (PortRange(22, 22), PortRange(80, 80), PortRange(443, 443))
    assert policy.allow is None
    assert policy.allow_listening == ()


def test_a_file_without_a_policy_section_means_the_defaults(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, "")) == Policy()
    assert load_policy(write(tmp_path, "[other]\nx = 1\n")) == Policy()
    assert load_policy(write(tmp_path, "[policy]\n")) == Policy()


def test_allow_list(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nallow = ["25", "587/tcp", "10000-10100/udp"]\n')
    assert load_policy(path) == Policy(
        allow=(PortRange(25, 25), PortRange(587, 587, TCP), PortRange(10000, 10100, UDP)),
    )


def test_deny_adds_to_the_reserved_ports_and_integers_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\ndeny = [22, 2222, "6000-6010/tcp"]\n')
    assert load_policy(path).deny == (
        PortRange(22, 22),
        PortRange(2222, 2222),
        PortRange(6000, 6010, TCP),
    )
    assert load_policy(write(tmp_path, "[policy]\ndeny = []\n")).deny == ()
    policy = load_policy(write(tmp_path, "[policy]\ndeny = [2222]\n"))
    assert [e.message for e in check_policy(located("2222:1\n80:8080\n25:25"), policy, [])] == [
        "port 2222/tcp is reserved by the host policy",
        "port 80/tcp is reserved by the host policy",
    ]


def test_reserved_ports_can_be_narrowed_by_the_operator(tmp_path: Path) -> None:
    """A host without nginx may give 80 and 443 to an app (e.g. a TLS-passthrough proxy)."""
    policy = load_policy(write(tmp_path, '[policy]\nreserved = ["22"]\n'))
    assert policy.reserved == (PortRange(22, 22),)
    assert check_policy(located("80:8080\n443:8443"), policy, []) == []
    assert check_policy(located("22:2222"), policy, []) != []


def test_80_and_443_are_refused_by_default_even_without_a_listener() -> None:
    """nginx may be down when a deployer claims them; natports must not win over it later."""
    assert [e.message for e in check_policy(located("80:8080\n443:8443/udp"), Policy(), [])] == [
        "port 80/tcp is reserved by the host policy",
        "port 443/udp is reserved by the host policy",
    ]


def test_allow_listening(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nallow_listening = ["8080", "53/udp"]\n')
    assert load_policy(path) == Policy(
        allow_listening=(PortRange(8080, 8080), PortRange(53, 53, UDP))
    )


def test_bad_values_list_every_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[policy]\n"
        'deny = ["22", "ssh", "0"]\n'
        'allow = "25"\n'
        'allow_listening = ["70000", "80/sctp"]\n'
        "colour = 1\n"
        "allowed = []\n",
    )
    with pytest.raises(InputError) as info:
        load_policy(path)
    assert info.value.problems == [
        f"{path}: policy.allowed is not a known setting",
        f"{path}: policy.colour is not a known setting",
        f'{path}: policy.deny: "ssh" is not PORT[-END][/tcp|/udp]',
        f'{path}: policy.deny: "0" is not a port range within 1-65535',
        f"{path}: policy.allow must be a list of port ranges",
        f'{path}: policy.allow_listening: "70000" is not a port range within 1-65535',
        f'{path}: policy.allow_listening: "80/sctp" is not PORT[-END][/tcp|/udp]',
    ]
    assert str(info.value) == "\n".join(info.value.problems)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy\n")
    with pytest.raises(InputError) as info:
        load_policy(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: ")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "natports.toml"
    path.write_bytes(b'[policy]\ndeny = ["\xff"]\n')
    with pytest.raises(InputError) as info:
        load_policy(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: ")


def test_policy_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "policy = 5\n")
    with pytest.raises(InputError) as info:
        load_policy(path)
    assert info.value.problems == [f"{path}: [policy] must be a table"]


def test_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.toml"
    path.mkdir()
    with pytest.raises(InputError) as info:
        load_policy(path)
    assert info.value.problems == [f"{path}: cannot read: Is a directory"]


# -- check_conflicts --------------------------------------------------------------------------


def test_no_other_apps_no_conflicts() -> None:
    assert check_conflicts("relay", located("25:5025"), {}) == []


def test_the_same_port_in_another_app() -> None:
    others: Claims = {"mail": (Mapping(25, 5025),)}
    assert check_conflicts("relay", located("# relay\n  25:6025\n"), others) == [
        SpecError(2, 3, 'app "relay": port 25/tcp is already mapped by app "mail"')
    ]


def test_an_app_does_not_conflict_with_its_own_stored_mappings() -> None:
    others: Claims = {"relay": (Mapping(25, 5025),)}
    assert check_conflicts("relay", located("25:6025"), others) == []


def test_overlapping_ranges_name_the_first_shared_port() -> None:
    others: Claims = {"media": (Mapping(10000, 20000, UDP, count=101),)}
    assert check_conflicts("rtp", located("10050-10200:30050-30200/udp"), others) == [
        SpecError(1, 1, 'app "rtp": port 10050/udp is already mapped by app "media"')
    ]
    assert check_conflicts("rtp", located("9990-10005:30000-30015/udp"), others) == [
        SpecError(1, 1, 'app "rtp": port 10000/udp is already mapped by app "media"')
    ]


def test_adjacent_ranges_do_not_conflict() -> None:
    others: Claims = {"media": (Mapping(10000, 20000, UDP, count=101),)}
    assert check_conflicts("rtp", located("10101-10200:30000-30099/udp"), others) == []
    assert check_conflicts("rtp", located("9000-9999:30000-30999/udp"), others) == []


def test_all_addresses_conflict_with_a_specific_address() -> None:
    others: Claims = {"mail": (Mapping(25, 5025, public_ip=ip_address("203.0.113.7")),)}
    assert check_conflicts("relay", located("25:6025"), others) == [
        SpecError(1, 1, 'app "relay": port 203.0.113.7:25/tcp is already mapped by app "mail"')
    ]
    wild: Claims = {"mail": (Mapping(25, 5025),)}
    assert check_conflicts("relay", located("[2001:db8::7]:25:6025"), wild) == [
        SpecError(1, 1, 'app "relay": port [2001:db8::7]:25/tcp is already mapped by app "mail"')
    ]


def test_different_addresses_do_not_conflict() -> None:
    others: Claims = {"mail": (Mapping(25, 5025, public_ip=ip_address("203.0.113.7")),)}
    assert check_conflicts("relay", located("203.0.113.8:25:6025"), others) == []
    assert check_conflicts("relay", located("[2001:db8::7]:25:6025"), others) == []


def test_different_protocols_do_not_conflict() -> None:
    others: Claims = {"dns": (Mapping(53, 5053, TCP),)}
    assert check_conflicts("resolver", located("53:5053/udp"), others) == []


def test_every_conflicting_line_is_reported_once() -> None:
    others: Claims = {
        "mail": (Mapping(25, 5025), Mapping(587, 5587)),
        "web": (Mapping(80, 8080), Mapping(443, 8443)),
        "alpha": (Mapping(443, 9443),),
    }
    text = "25:6025\n80:6080\n443:6443\n8000:6000\n587:6587\n"
    assert check_conflicts("relay", located(text), others) == [
        SpecError(1, 1, 'app "relay": port 25/tcp is already mapped by app "mail"'),
        SpecError(2, 1, 'app "relay": port 80/tcp is already mapped by app "web"'),
        # two apps hold 443: the first in name order is named, once
        SpecError(3, 1, 'app "relay": port 443/tcp is already mapped by app "alpha"'),
        SpecError(5, 1, 'app "relay": port 587/tcp is already mapped by app "mail"'),
    ]


def test_conflict_error_text() -> None:
    others: Claims = {"mail": (Mapping(25, 5025),)}
    errors = check_conflicts("relay", located("25:6025"), others)
    assert [e.format("PORTS") for e in errors] == [
        'PORTS:1:1: app "relay": port 25/tcp is already mapped by app "mail"'
    ]


OPEN = Policy(reserved=())  # listener tests use 80 without the reservation


# -- check_policy -----------------------------------------------------------------------------


def test_port_22_is_refused_by_default() -> None:
    assert check_policy(located("22:2222"), Policy(), []) == [
        SpecError(1, 1, "port 22/tcp is reserved by the host policy")
    ]
    assert check_policy(located("22:2222/udp"), Policy(), []) == [
        SpecError(1, 1, "port 22/udp is reserved by the host policy")
    ]


def test_an_ordinary_port_is_fine_by_default() -> None:
    assert check_policy(located("25:5025\n53:5053/udp"), Policy(), []) == []


def test_a_range_with_one_denied_port_is_refused() -> None:
    assert check_policy(located("20-30:2020-2030"), Policy(), []) == [
        SpecError(1, 1, "port 22/tcp is reserved by the host policy")
    ]


def test_a_protocol_specific_deny() -> None:
    policy = Policy(deny=(PortRange(53, 53, TCP),))
    assert check_policy(located("53:5053/udp"), policy, []) == []
    assert check_policy(located("53:5053/tcp"), policy, []) == [
        SpecError(1, 1, "port 53/tcp is reserved by the host policy")
    ]


def test_an_allow_list_refuses_everything_else() -> None:
    policy = Policy(allow=(PortRange(25, 25), PortRange(10000, 10010, UDP)))
    assert check_policy(located("25:5025\n10000-10010:20000-20010/udp"), policy, []) == []
    assert check_policy(located("\n26:5026\n10005-10011:20000-20006/udp"), policy, []) == [
        SpecError(2, 1, "port 26/tcp is not in the host policy's allowed ports"),
        SpecError(3, 1, "port 10011/udp is not in the host policy's allowed ports"),
    ]


def test_deny_wins_over_allow() -> None:
    policy = Policy(allow=(PortRange(1, 65535),))
    assert check_policy(located("22:2222"), policy, []) == [
        SpecError(1, 1, "port 22/tcp is reserved by the host policy")
    ]


def test_a_listener_on_all_addresses_shadows() -> None:
    assert check_policy(located("80:8080"), OPEN, [listener("0.0.0.0", 80)]) == [
        SpecError(
            1,
            1,
            "port 80/tcp is in use on the host: nginx (pid 12) listens on 0.0.0.0:80 "
            "(an operator can allow it with policy.allow_listening)",
        )
    ]
    mapping = located("203.0.113.7:80:8080")
    assert [e.message for e in check_policy(mapping, OPEN, [listener("::", 80)])] == [
        "port 80/tcp is in use on the host: nginx (pid 12) listens on [::]:80 "
        "(an operator can allow it with policy.allow_listening)"
    ]


def test_a_listener_on_the_same_address_shadows() -> None:
    mapping = located("203.0.113.7:80:8080")
    assert [e.message for e in check_policy(mapping, OPEN, [listener("203.0.113.7", 80)])] == [
        "port 80/tcp is in use on the host: nginx (pid 12) listens on 203.0.113.7:80 "
        "(an operator can allow it with policy.allow_listening)"
    ]


def test_a_listener_on_one_address_shadows_a_mapping_on_all_addresses() -> None:
    errors = check_policy(located("80:8080"), OPEN, [listener("2001:db8::7", 80)])
    assert [e.message for e in errors] == [
        "port 80/tcp is in use on the host: nginx (pid 12) listens on [2001:db8::7]:80 "
        "(an operator can allow it with policy.allow_listening)"
    ]


def test_a_listener_on_another_address_does_not_shadow() -> None:
    mapping = located("203.0.113.7:80:8080\n[2001:db8::7]:81:8081")
    listeners = [listener("203.0.113.8", 80), listener("2001:db8::8", 81)]
    assert check_policy(mapping, OPEN, listeners) == []


def test_loopback_listeners_never_count() -> None:
    listeners = [listener("127.0.0.1", 80), listener("127.0.0.53", 53, UDP), listener("::1", 80)]
    assert check_policy(located("80:8080\n53:5053/udp"), OPEN, listeners) == []


def test_listeners_of_another_protocol_or_port_do_not_count() -> None:
    listeners = [listener("0.0.0.0", 53, UDP), listener("0.0.0.0", 8080)]
    assert check_policy(located("53:5053/tcp\n80:8080"), OPEN, listeners) == []


def test_a_udp_listener_shadows_a_udp_mapping() -> None:
    listeners = [listener("0.0.0.0", 53, UDP, "dnsmasq (pid 7)")]
    assert [e.format("PORTS") for e in check_policy(located("53:5053/udp"), OPEN, listeners)] == [
        "PORTS:1:1: port 53/udp is in use on the host: dnsmasq (pid 7) listens on 0.0.0.0:53 "
        "(an operator can allow it with policy.allow_listening)"
    ]


def test_allow_listening_lets_it_through() -> None:
    policy = Policy(allow_listening=(PortRange(80, 80),), reserved=())
    assert check_policy(located("80:8080"), policy, [listener("0.0.0.0", 80)]) == []
    # but only for the ports it names
    assert [
        e.message
        for e in check_policy(located("80-81:8080-8081"), policy, [listener("0.0.0.0", 81)])
    ] == [
        "port 81/tcp is in use on the host: nginx (pid 12) listens on 0.0.0.0:81 "
        "(an operator can allow it with policy.allow_listening)"
    ]


def test_allow_listening_does_not_lift_a_deny() -> None:
    policy = Policy(allow_listening=(PortRange(22, 22),))
    assert check_policy(located("22:2222"), policy, [listener("0.0.0.0", 22, process="sshd")]) == [
        SpecError(1, 1, "port 22/tcp is reserved by the host policy")
    ]


def test_a_range_with_one_listened_port_is_refused() -> None:
    errors = check_policy(located("8000-8100:9000-9100"), OPEN, [listener("0.0.0.0", 8080)])
    assert [e.message for e in errors] == [
        "port 8080/tcp is in use on the host: nginx (pid 12) listens on 0.0.0.0:8080 "
        "(an operator can allow it with policy.allow_listening)"
    ]


def test_every_refused_line_is_reported() -> None:
    text = "22:2222\n80:8080\n443:8443\n"
    only_ssh = Policy(reserved=(PortRange(22, 22),))
    errors = check_policy(located(text), only_ssh, [listener("0.0.0.0", 443)])
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (1, "port 22/tcp is reserved by the host policy"),
        (3, "port 443/tcp is in use on the host"),
    ]


def test_listeners_may_be_any_iterable() -> None:
    errors = check_policy(located("80:8080\n81:8081"), OPEN, iter([listener("0.0.0.0", 81)]))
    assert [e.line for e in errors] == [2]


def _naive_conflicts(
    app: str, located_: list[Located], others: dict[str, tuple[Mapping, ...]]
) -> list[SpecError]:
    """The definition: for each line, the alphabetically first other app with an
    overlapping mapping, and that app's first such mapping (what check_conflicts did in
    O(n * m) before it used segment trees)."""
    from natports.policy import _shared
    from natports.spec import overlaps

    errors = []
    for loc in located_:
        for other, mappings in sorted(others.items()):
            if other == app:
                continue
            clash = next((m for m in mappings if overlaps(loc.mapping, m)), None)
            if clash is not None:
                errors.append(
                    SpecError(
                        loc.line,
                        loc.col,
                        f'app "{app}": port {_shared(loc.mapping, clash)} is already mapped '
                        f'by app "{other}"',
                    )
                )
                break
    return errors


_PORT = st.integers(min_value=1, max_value=40)
_IP = st.sampled_from([None, ip_address("203.0.113.7"), ip_address("203.0.113.8")])


@st.composite
def _mapping(draw: st.DrawFn) -> Mapping:
    start = draw(_PORT)
    count = draw(st.integers(min_value=1, max_value=5))
    return Mapping(start, 1000, draw(st.sampled_from([TCP, UDP])), count=count, public_ip=draw(_IP))


@given(
    mine=st.lists(_mapping(), max_size=8),
    others=st.dictionaries(
        st.sampled_from(["a", "b", "mail", "z"]), st.lists(_mapping(), max_size=6).map(tuple)
    ),
)
@settings(max_examples=300, deadline=None)
def test_conflicts_match_the_pairwise_definition(
    mine: list[Mapping], others: dict[str, tuple[Mapping, ...]]
) -> None:
    located_ = [Located(m, i + 1, 1) for i, m in enumerate(mine)]
    assert check_conflicts("mail", located_, others) == _naive_conflicts("mail", located_, others)
