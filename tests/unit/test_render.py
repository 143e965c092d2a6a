# ruff: noqa: E501
# (the expected nft batches are written out line for line, however long)
"""The nftables renderer, checked against complete batches written out by hand."""

from __future__ import annotations

import struct
from ipaddress import ip_address
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from natports.backends import nft_wire
from natports.backends.nft_render import (
    SKELETON_CHAINS,
    LiveTable,
    chain_name,
    element_changes,
    element_sets,
    render_app,
    render_build,
    render_flush_all,
    render_rebuild,
    render_reconcile,
    route_id,
    skeleton_rules,
)
from natports.backends.nft_wire import Change
from natports.model import Protocol, Route, RouteKey
from tests.unit.routes import route

TCP = Protocol.TCP
UDP = Protocol.UDP


def exact_read(
    spec: dict[str, dict[str, str | None]],
    counters: dict[str, tuple[int, int]] | None = None,
    chains: frozenset[str] = SKELETON_CHAINS,
    hairpin: dict[int, list[tuple[int, int]]] | None = None,
    rules_in_place: bool = False,
) -> LiveTable:
    """What an exact read finds, the elements written as nft text: set -> key -> value
    (None in a set); `counters`: `set:key` -> (packets, bytes)."""
    values: dict[str, dict[bytes, bytes | None]] = {n: {} for n in element_sets()}
    counted: dict[str, dict[bytes, bytes]] = {}
    for name, elements in spec.items():
        family = int(name[-1])
        for key_text, value in elements.items():
            *host, proto, ports = key_text.split(" . ")
            first, _, last = ports.partition("-")
            count = int(last) - int(first) + 1 if last else 1
            ip = ip_address(host[0]) if host else None
            key = nft_wire.key_bytes(RouteKey(family, Protocol(proto), int(first), ip, count))
            raw = None
            if value is not None and value.startswith("goto "):
                raw = value[5:].encode()
            elif value is not None:
                address, port = value.split(" . ")
                raw = ip_address(address).packed + struct.pack(">H2x", int(port))
            values[name][key] = raw
            counter = (counters or {}).get(f"{name}:{key_text}")
            if counter is not None:  # as nft_wire keeps it: bytes, then packets
                counted.setdefault(name, {})[key] = struct.pack(">QQ", counter[1], counter[0])
    return LiveTable({}, values, chains, hairpin, rules_in_place, counted)


SKELETON = """\
add table inet natports
add map inet natports dnat_any4 { type inet_proto . inet_service : ipv4_addr . inet_service ; }
add map inet natports goto_any4 { type inet_proto . inet_service : verdict ; }
add map inet natports range_any4 { type inet_proto . inet_service : verdict ; flags interval ; counter ; }
add set inet natports count_any4 { type inet_proto . inet_service ; counter ; }
add map inet natports dnat_addr4 { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service ; }
add map inet natports goto_addr4 { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map inet natports range_addr4 { type ipv4_addr . inet_proto . inet_service : verdict ; flags interval ; counter ; }
add set inet natports count_addr4 { type ipv4_addr . inet_proto . inet_service ; counter ; }
add set inet natports hairpin4 { type ipv4_addr ; flags interval ; }
add map inet natports dnat_any6 { type inet_proto . inet_service : ipv6_addr . inet_service ; }
add map inet natports goto_any6 { type inet_proto . inet_service : verdict ; }
add map inet natports range_any6 { type inet_proto . inet_service : verdict ; flags interval ; counter ; }
add set inet natports count_any6 { type inet_proto . inet_service ; counter ; }
add map inet natports dnat_addr6 { type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service ; }
add map inet natports goto_addr6 { type ipv6_addr . inet_proto . inet_service : verdict ; }
add map inet natports range_addr6 { type ipv6_addr . inet_proto . inet_service : verdict ; flags interval ; counter ; }
add set inet natports count_addr6 { type ipv6_addr . inet_proto . inet_service ; counter ; }
add set inet natports hairpin6 { type ipv6_addr ; flags interval ; }
add chain inet natports dispatch
flush chain inet natports dispatch
add rule inet natports dispatch ip saddr != @hairpin4 ip daddr . meta l4proto . th dport @count_addr4 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip saddr @hairpin4 ip daddr . meta l4proto . th dport @count_addr4 meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip saddr != @hairpin4 meta nfproto ipv4 meta l4proto . th dport @count_any4 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip saddr @hairpin4 meta nfproto ipv4 meta l4proto . th dport @count_any4 meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip daddr . meta l4proto . th dport vmap @goto_addr4
add rule inet natports dispatch meta nfproto ipv4 meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport map @dnat_addr4
add rule inet natports dispatch ip daddr . meta l4proto . th dport vmap @range_addr4
add rule inet natports dispatch meta nfproto ipv4 meta l4proto . th dport vmap @goto_any4
add rule inet natports dispatch meta nfproto ipv4 meta l4proto { tcp, udp } dnat ip to meta l4proto . th dport map @dnat_any4
add rule inet natports dispatch meta nfproto ipv4 meta l4proto . th dport vmap @range_any4
add rule inet natports dispatch ip6 saddr != @hairpin6 ip6 daddr . meta l4proto . th dport @count_addr6 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip6 saddr @hairpin6 ip6 daddr . meta l4proto . th dport @count_addr6 meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip6 saddr != @hairpin6 meta nfproto ipv6 meta l4proto . th dport @count_any6 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip6 saddr @hairpin6 meta nfproto ipv6 meta l4proto . th dport @count_any6 meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000
add rule inet natports dispatch ip6 daddr . meta l4proto . th dport vmap @goto_addr6
add rule inet natports dispatch meta nfproto ipv6 meta l4proto { tcp, udp } dnat ip6 to ip6 daddr . meta l4proto . th dport map @dnat_addr6
add rule inet natports dispatch ip6 daddr . meta l4proto . th dport vmap @range_addr6
add rule inet natports dispatch meta nfproto ipv6 meta l4proto . th dport vmap @goto_any6
add rule inet natports dispatch meta nfproto ipv6 meta l4proto { tcp, udp } dnat ip6 to meta l4proto . th dport map @dnat_any6
add rule inet natports dispatch meta nfproto ipv6 meta l4proto . th dport vmap @range_any6
add chain inet natports prerouting { type nat hook prerouting priority -110 ; policy accept ; }
flush chain inet natports prerouting
add chain inet natports output { type nat hook output priority -110 ; policy accept ; }
flush chain inet natports output
add chain inet natports postrouting { type nat hook postrouting priority 90 ; policy accept ; }
flush chain inet natports postrouting
add rule inet natports prerouting fib daddr type local jump dispatch
add rule inet natports output ip daddr != 127.0.0.0/8 fib daddr type local jump dispatch
add rule inet natports output ip6 daddr != ::1 fib daddr type local jump dispatch
add rule inet natports postrouting meta mark & 0x00100000 == 0x00100000 meta mark set meta mark ^ 0x00100000 masquerade comment "natports skeleton vv6b7fki4nyy"
"""

MAIL_25 = """\
add element inet natports hairpin4 { 172.17.0.0/16 }
add element inet natports count_any4 { tcp . 25 }
add element inet natports dnat_any4 { tcp . 25 : 172.17.0.2 . 5025 }
"""


def mail_25(ip: str = "172.17.0.2") -> Route:
    return route("mail", RouteKey(4, TCP, 25), 5025, ip)


def test_one_route_one_backend_is_an_element_and_no_chain() -> None:
    assert render_app([], [mail_25()]) == SKELETON + MAIL_25


def test_the_same_switch_twice_renders_the_same_batch() -> None:
    assert render_app([mail_25()], [mail_25()]) == SKELETON + MAIL_25


def test_a_switch_replaces_only_the_dnat_element() -> None:
    """The counter element stays: the route's totals survive the switch."""
    assert render_app([mail_25()], [mail_25("172.17.0.9")]) == SKELETON + (
        """\
add element inet natports dnat_any4 { tcp . 25 : 172.17.0.2 . 5025 }
delete element inet natports dnat_any4 { tcp . 25 }
add element inet natports hairpin4 { 172.17.0.0/16 }
add element inet natports count_any4 { tcp . 25 }
add element inet natports dnat_any4 { tcp . 25 : 172.17.0.9 . 5025 }
"""
    )


def test_a_route_without_hairpin_subnets_adds_none() -> None:
    r = route("mail", RouteKey(4, UDP, 53), 5053, "172.17.0.2", subnets=())
    assert render_app([], [r]) == SKELETON + (
        """\
add element inet natports count_any4 { udp . 53 }
add element inet natports dnat_any4 { udp . 53 : 172.17.0.2 . 5053 }
"""
    )


def test_three_backends_use_a_chain_with_a_numgen_map() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3", "172.17.0.4")
    name = chain_name("mail", r.key)
    assert render_app([], [r]) == SKELETON + (
        f"""\
add element inet natports hairpin4 {{ 172.17.0.0/16 }}
add element inet natports count_any4 {{ tcp . 25 }}
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} meta l4proto tcp dnat ip to numgen random mod 3 map {{ 0 : 172.17.0.2, 1 : 172.17.0.3, 2 : 172.17.0.4 }} : 5025
add element inet natports goto_any4 {{ tcp . 25 : goto {name} }}
"""
    )


def test_one_backend_to_two_moves_the_route_into_a_chain_and_back() -> None:
    two = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3", subnets=())
    one = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", subnets=())
    name = chain_name("mail", two.key)
    assert render_app([one], [two]) == SKELETON + (
        f"""\
add element inet natports dnat_any4 {{ tcp . 25 : 172.17.0.2 . 5025 }}
delete element inet natports dnat_any4 {{ tcp . 25 }}
add element inet natports count_any4 {{ tcp . 25 }}
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} meta l4proto tcp dnat ip to numgen random mod 2 map {{ 0 : 172.17.0.2, 1 : 172.17.0.3 }} : 5025
add element inet natports goto_any4 {{ tcp . 25 : goto {name} }}
"""
    )
    assert render_app([two], [one]) == SKELETON + (
        f"""\
add chain inet natports {name}
add element inet natports goto_any4 {{ tcp . 25 : goto {name} }}
delete element inet natports goto_any4 {{ tcp . 25 }}
flush chain inet natports {name}
delete chain inet natports {name}
add element inet natports count_any4 {{ tcp . 25 }}
add element inet natports dnat_any4 {{ tcp . 25 : 172.17.0.2 . 5025 }}
"""
    )


def test_a_range_is_one_element_and_one_chain() -> None:
    r = route("rtp", RouteKey(4, UDP, 10000, None, 10000), 10000, "172.17.0.2")
    name = chain_name("rtp", r.key)
    expected = f"""\
add element inet natports hairpin4 {{ 172.17.0.0/16 }}
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} ip saddr @hairpin4 meta mark set meta mark | 0x00100000
add rule inet natports {name} meta l4proto udp ct mark set ct mark | 0x00100000 dnat ip to 172.17.0.2
add element inet natports range_any4 {{ udp . 10000-19999 : goto {name} }}
"""
    assert render_app([], [r]) == SKELETON + expected
    # a switch of it refills its chain; the element (and its counter) stays
    moved = route("rtp", RouteKey(4, UDP, 10000, None, 10000), 10000, "172.17.0.9")
    assert render_app([r], [moved]) == SKELETON + expected.replace("172.17.0.2", "172.17.0.9")


def test_a_range_with_an_offset_maps_each_port() -> None:
    r = route("ftp", RouteKey(6, TCP, 1000, None, 3), 2000, "fd00::2", "fd00::3", subnets=())
    name = chain_name("ftp", r.key)
    assert render_app([], [r]) == SKELETON + (
        f"""\
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} ip6 saddr @hairpin6 meta mark set meta mark | 0x00100000
add rule inet natports {name} meta l4proto tcp ct mark set ct mark | 0x00100000 dnat ip6 to numgen random mod 2 map {{ 0 : fd00::2, 1 : fd00::3 }} : th dport map {{ 1000 : 2000, 1001 : 2001, 1002 : 2002 }}
add element inet natports range_any6 {{ tcp . 1000-1002 : goto {name} }}
"""
    )


def test_a_public_ipv4_address_uses_the_addr_maps() -> None:
    r = route("mail", RouteKey(4, TCP, 25, ip_address("203.0.113.7")), 5025, "172.17.0.2")
    assert render_app([], [r]) == SKELETON + (
        """\
add element inet natports hairpin4 { 172.17.0.0/16 }
add element inet natports count_addr4 { 203.0.113.7 . tcp . 25 }
add element inet natports dnat_addr4 { 203.0.113.7 . tcp . 25 : 172.17.0.2 . 5025 }
"""
    )


def test_an_ipv6_route() -> None:
    r = route("mail", RouteKey(6, TCP, 25), 5025, "fd00::2", subnets=("fd00::/64",))
    assert render_app([], [r]) == SKELETON + (
        """\
add element inet natports hairpin6 { fd00::/64 }
add element inet natports count_any6 { tcp . 25 }
add element inet natports dnat_any6 { tcp . 25 : fd00::2 . 5025 }
"""
    )


def test_an_ipv6_route_on_one_address_with_two_backends() -> None:
    key = RouteKey(6, TCP, 25, ip_address("2001:db8::7"))
    r = route("mail", key, 5025, "fd00::2", "fd00::3", subnets=())
    name = chain_name("mail", key)
    assert render_app([], [r]) == SKELETON + (
        f"""\
add element inet natports count_addr6 {{ 2001:db8::7 . tcp . 25 }}
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} meta l4proto tcp dnat ip6 to numgen random mod 2 map {{ 0 : [fd00::2], 1 : [fd00::3] }} : 5025
add element inet natports goto_addr6 {{ 2001:db8::7 . tcp . 25 : goto {name} }}
"""
    )


def test_a_route_the_app_no_longer_has_is_removed_element_by_element() -> None:
    gone = route("mail", RouteKey(4, TCP, 26), 5026, "172.17.0.2")
    assert render_app([mail_25(), gone], [mail_25()]) == SKELETON + (
        """\
add element inet natports count_any4 { tcp . 26 }
delete element inet natports count_any4 { tcp . 26 }
add element inet natports dnat_any4 { tcp . 26 : 172.17.0.2 . 5026 }
delete element inet natports dnat_any4 { tcp . 26 }
"""
        + MAIL_25
    )


def test_a_switch_leaves_a_skeleton_in_place_alone() -> None:
    """Refilling re-binds the maps (the kernel checks each element): only when needed."""
    declared = "".join(
        f"{line}\n"
        for line in SKELETON.splitlines()
        if not line.startswith(("flush chain", "add rule"))
    )
    assert render_app([], [mail_25()], refill=False) == declared + MAIL_25
    assert skeleton_rules() == {"dispatch": 20, "prerouting": 1, "output": 2, "postrouting": 1}
    assert sum(skeleton_rules().values()) == SKELETON.count("add rule")


def test_a_route_with_no_backend_is_counted_but_never_dnated() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, subnets=())
    assert render_app([], [r]) == SKELETON + "add element inet natports count_any4 { tcp . 25 }\n"
    ranged = route("mail", RouteKey(4, TCP, 25, None, 5), 5025, subnets=())
    assert render_app([], [ranged]) == SKELETON
    assert render_reconcile(None, [r, ranged]).endswith("count_any4 { tcp . 25 }\n")


def test_a_switch_names_no_other_app() -> None:
    """Its size does not depend on the table: only the app's own keys appear."""
    batch = render_app([mail_25()], [mail_25("172.17.0.9")])
    assert len(batch.splitlines()) == len(SKELETON.splitlines()) + 5


def test_reconcile_rebuilds_the_table_in_one_batch_and_carries_counters() -> None:
    two = route("chat", RouteKey(4, TCP, 26), 6000, "172.17.0.5", "172.17.0.6", subnets=())
    rng = route("rtp", RouteKey(4, UDP, 30000, None, 100), 30000, "172.17.0.7", subnets=())
    live = LiveTable({route_id(mail_25().key): (7, 420), route_id(rng.key): (3, 99)})
    name = chain_name("chat", two.key)
    rname = chain_name("rtp", rng.key)
    assert render_reconcile(live, [two, rng, mail_25()]) == (
        "add table inet natports\ndelete table inet natports\n"
        + SKELETON
        + f"""\
add element inet natports hairpin4 {{ 172.17.0.0/16 }}
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} meta l4proto tcp dnat ip to numgen random mod 2 map {{ 0 : 172.17.0.5, 1 : 172.17.0.6 }} : 6000
add chain inet natports {rname}
flush chain inet natports {rname}
add rule inet natports {rname} ip saddr @hairpin4 meta mark set meta mark | 0x00100000
add rule inet natports {rname} meta l4proto udp ct mark set ct mark | 0x00100000 dnat ip to 172.17.0.7
add element inet natports dnat_any4 {{ tcp . 25 : 172.17.0.2 . 5025 }}
add element inet natports goto_any4 {{ tcp . 26 : goto {name} }}
add element inet natports range_any4 {{ udp . 30000-30099 counter packets 3 bytes 99 : goto {rname} }}
add element inet natports count_any4 {{ tcp . 25 counter packets 7 bytes 420, tcp . 26 }}
"""
    )


def test_reconcile_with_an_exact_read_changes_only_what_differs() -> None:
    """Elements that stay are not named (their counters keep counting); what differs goes."""
    two = route("chat", RouteKey(4, TCP, 26), 6000, "172.17.0.5", "172.17.0.6", subnets=())
    rng = route("rtp", RouteKey(4, UDP, 30000, None, 100), 30000, "172.17.0.7", subnets=())
    name, rname = chain_name("chat", two.key), chain_name("rtp", rng.key)
    spec: dict[str, dict[str, str | None]] = {}
    spec["count_any4"] = {"tcp . 25": None, "tcp . 27": None}
    spec["dnat_any4"] = {"tcp . 25": "172.17.0.9 . 5025", "tcp . 27": "172.17.0.3 . 80"}
    spec["range_any4"] = {"udp . 30000-30099": "goto r_old_aaaaaaaaaaaa"}
    live = exact_read(
        spec,
        {"count_any4:tcp . 25": (7, 420), "range_any4:udp . 30000-30099": (3, 99)},
        SKELETON_CHAINS | {"r_old_aaaaaaaaaaaa", name},
    )
    assert render_reconcile(live, [two, rng, mail_25()]) == (
        SKELETON
        + f"""flush set inet natports hairpin4
flush set inet natports hairpin6
add element inet natports hairpin4 {{ 172.17.0.0/16 }}
delete element inet natports dnat_any4 {{ tcp . 25, tcp . 27 }}
delete element inet natports range_any4 {{ udp . 30000-30099 }}
delete element inet natports count_any4 {{ tcp . 27 }}
flush chain inet natports r_old_aaaaaaaaaaaa
delete chain inet natports r_old_aaaaaaaaaaaa
add chain inet natports {name}
flush chain inet natports {name}
add rule inet natports {name} meta l4proto tcp dnat ip to numgen random mod 2 map {{ 0 : 172.17.0.5, 1 : 172.17.0.6 }} : 6000
add chain inet natports {rname}
flush chain inet natports {rname}
add rule inet natports {rname} ip saddr @hairpin4 meta mark set meta mark | 0x00100000
add rule inet natports {rname} meta l4proto udp ct mark set ct mark | 0x00100000 dnat ip to 172.17.0.7
add element inet natports dnat_any4 {{ tcp . 25 : 172.17.0.2 . 5025 }}
add element inet natports goto_any4 {{ tcp . 26 : goto {name} }}
add element inet natports range_any4 {{ udp . 30000-30099 counter packets 3 bytes 99 : goto {rname} }}
add element inet natports count_any4 {{ tcp . 26 }}
"""
    )


def test_reconcile_of_what_the_kernel_holds_is_only_the_skeleton() -> None:
    spec: dict[str, dict[str, str | None]] = {}
    spec["count_any4"] = {"tcp . 25": None}
    spec["dnat_any4"] = {"tcp . 25": "172.17.0.2 . 5025"}
    live = exact_read(spec, {"count_any4:tcp . 25": (7, 420)})
    assert render_reconcile(live, [mail_25()]) == (
        SKELETON
        + """flush set inet natports hairpin4
flush set inet natports hairpin6
add element inet natports hairpin4 { 172.17.0.0/16 }
"""
    )


def test_reconcile_without_a_table() -> None:
    assert render_reconcile(None, [mail_25()]) == (
        "add table inet natports\ndelete table inet natports\n"
        + SKELETON
        + """\
add element inet natports hairpin4 { 172.17.0.0/16 }
add element inet natports dnat_any4 { tcp . 25 : 172.17.0.2 . 5025 }
add element inet natports count_any4 { tcp . 25 }
"""
    )


def declarations() -> str:
    """The skeleton without its rules: what a table whose rules are in place is sent."""
    kept = [
        line for line in SKELETON.splitlines() if not line.startswith(("flush chain", "add rule"))
    ]
    return "".join(line + "\n" for line in kept)


def exact(spec: dict[str, dict[str, str | None]], hairpin: list[str] | None) -> LiveTable:
    """An exact read with the skeleton's rules in place, and these hairpin subnets."""
    ranges = None
    if hairpin is not None:
        ranges = {4: nft_wire.ranges_of_subnets(hairpin), 6: []}
    return exact_read(spec, hairpin=ranges, rules_in_place=True)


MAIL_HELD: dict[str, dict[str, str | None]] = {
    "count_any4": {"tcp . 25": None},
    "dnat_any4": {"tcp . 25": "172.17.0.2 . 5025"},
}


def test_reconcile_of_a_table_in_place_sends_only_declarations() -> None:
    assert render_reconcile(exact(MAIL_HELD, ["172.17.0.0/16"]), [mail_25()]) == declarations()


def test_reconcile_of_other_hairpin_subnets_refills_them_and_not_the_rules() -> None:
    batch = render_reconcile(exact(MAIL_HELD, ["10.0.0.0/8"]), [mail_25()])
    assert batch == declarations() + (
        "flush set inet natports hairpin4\n"
        "flush set inet natports hairpin6\n"
        "add element inet natports hairpin4 { 172.17.0.0/16 }\n"
    )


def test_element_changes_are_the_same_change_as_the_text_in_bytes() -> None:
    moved, new = mail_25("172.17.0.3"), route("imap", RouteKey(4, TCP, 143), 143, "172.17.0.4")
    live = exact(MAIL_HELD, ["172.17.0.0/16"])
    smtp, imap = nft_wire.key_bytes(moved.key), nft_wire.key_bytes(new.key)
    changes = element_changes(live, [moved, new])
    assert changes is not None  # a netlink batch: the order of its elements is free
    assert {c.name: (set(c.delete), set(c.add)) for c in changes} == {
        "dnat_any4": (
            {smtp},
            {(smtp, nft_wire.dnat_bytes(moved)), (imap, nft_wire.dnat_bytes(new))},
        ),
        "count_any4": (set(), {(imap, None)}),
    }
    assert render_reconcile(live, [moved, new]) == declarations() + (
        "delete element inet natports dnat_any4 { tcp . 25 }\n"
        "add element inet natports dnat_any4 { tcp . 25 : 172.17.0.3 . 5025, tcp . 143 : 172.17.0.4 . 143 }\n"
        "add element inet natports count_any4 { tcp . 143 }\n"
    )
    assert element_changes(live, [mail_25()]) == []


def test_element_changes_are_none_where_nft_must_write_rules() -> None:
    two = route("chat", RouteKey(4, TCP, 26), 6000, "172.17.0.5", "172.17.0.6")
    in_place = exact(MAIL_HELD, ["172.17.0.0/16"])
    assert element_changes(in_place, [mail_25(), two]) is None  # a route chain
    assert element_changes(exact(MAIL_HELD, ["10.0.0.0/8"]), [mail_25()]) is None
    assert element_changes(exact(MAIL_HELD, None), [mail_25()]) is None  # hairpin unread
    lost = exact_read(MAIL_HELD, hairpin=in_place.hairpin)
    assert element_changes(lost, [mail_25()]) is None  # the skeleton's rules not in place
    stray = exact_read(MAIL_HELD, None, SKELETON_CHAINS | {"r_x_y"}, in_place.hairpin, True)
    assert element_changes(stray, [mail_25()]) is None  # a chain to delete
    assert element_changes(LiveTable({}), [mail_25()]) is None  # no exact read
    assert element_changes(None, [mail_25()]) is None


def test_a_table_built_from_nothing_is_text_without_elements_then_the_elements() -> None:
    """Three steps: the rebuild's text without route elements and with the skeleton's
    last rule unmarked; the elements; the marked rule (so an unfinished build is not
    intact)."""
    two = route("chat", RouteKey(4, TCP, 26), 6000, "172.17.0.5", "172.17.0.6")
    build = render_build([mail_25(), two])
    rebuild = render_reconcile(None, [mail_25(), two]).splitlines()
    marked = next(line for line in rebuild if "comment" in line)
    assert marked.startswith("add rule inet natports postrouting")
    assert build.skeleton.splitlines() == [
        marked[: marked.index(" comment")] if line == marked else line
        for line in rebuild
        if not line.startswith("add element inet natports") or "hairpin" in line
    ]
    assert build.mark == f"flush chain inet natports postrouting\n{marked}\n"
    smtp, chat = nft_wire.key_bytes(mail_25().key), nft_wire.key_bytes(two.key)
    assert build.elements == [
        Change("dnat_any4", (), ((smtp, nft_wire.dnat_bytes(mail_25())),)),
        Change("goto_any4", (), ((chat, chain_name("chat", two.key).encode()),)),
        Change("count_any4", (), ((smtp, None), (chat, None))),
    ]


def test_a_rebuild_after_an_exact_read_carries_the_counters_it_read() -> None:
    """The fallback when the kernel refuses a change: counters come from the elements."""
    rng = route("rtp", RouteKey(4, UDP, 30000, None, 100), 30000, "172.17.0.7")
    live = exact_read(
        {"count_any4": {"tcp . 25": None}, "range_any4": {"udp . 30000-30099": "goto r_x_y"}},
        {"count_any4:tcp . 25": (7, 420), "range_any4:udp . 30000-30099": (3, 99)},
    )
    batch = render_rebuild(live, [mail_25(), rng])
    assert "count_any4 { tcp . 25 counter packets 7 bytes 420 }" in batch
    assert "udp . 30000-30099 counter packets 3 bytes 99 : goto" in batch


def test_flush_all() -> None:
    assert render_flush_all() == "add table inet natports\ndelete table inet natports\n"


def test_another_table_name_is_used_everywhere() -> None:
    batch = render_app([], [mail_25()], table="inet natports_test")
    for line in batch.splitlines():
        assert line.split()[2:4] == ["inet", "natports_test"], line


def test_route_ids() -> None:
    assert route_id(RouteKey(4, TCP, 25)) == "count_any4:tcp . 25"
    assert route_id(RouteKey(6, UDP, 10000, None, 100)) == "range_any6:udp . 10000-10099"
    assert (
        route_id(RouteKey(4, TCP, 25, ip_address("203.0.113.7")))
        == "count_addr4:203.0.113.7 . tcp . 25"
    )


# -- chain names ------------------------------------------------------------------------------


def test_chain_names_are_app_and_digest() -> None:
    name = chain_name("mail", RouteKey(4, TCP, 25))
    assert name.startswith("r_mail_") and len(name) == len("r_mail_") + 12
    longest = chain_name("a" * 200, RouteKey(6, TCP, 25, ip_address("2001:db8::7")))
    assert len(longest) <= 256  # nft's limit for chain names


def test_chain_names_of_different_keys_differ() -> None:
    keys = [
        RouteKey(family, proto, port, ip, count)
        for proto in Protocol
        for port in (1, 25, 251, 2525, 65535)
        for count in (1, 10)
        for family, ip in [
            (4, None),
            (6, None),
            (4, ip_address("203.0.113.7")),
            (6, ip_address("2001:db8::7")),
        ]
    ]
    names = [chain_name(app, key) for app in ("mail", "mail-2", "a_b", "a") for key in keys]
    assert len(set(names)) == len(names)


app_names = st.from_regex(r"^[a-z0-9][a-z0-9._-]{0,199}$", fullmatch=True)


@st.composite
def route_keys(draw: st.DrawFn) -> RouteKey:
    family: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    ip = draw(st.none() | st.ip_addresses(v=family))
    return RouteKey(family, draw(st.sampled_from(Protocol)), draw(st.integers(1, 65535)), ip)


@given(app_names, route_keys(), app_names, route_keys())
def test_chain_names_are_unique_and_valid(
    app_a: str, key_a: RouteKey, app_b: str, key_b: RouteKey
) -> None:
    a, b = chain_name(app_a, key_a), chain_name(app_b, key_b)
    if (app_a, key_a) != (app_b, key_b):
        assert a != b
    # nft's identifier rule: a letter, then letters, digits, / \\ _ . - only
    assert a[0] == "r" and all(c.isalnum() or c in "_.-" for c in a)


def test_reconcile_of_a_mostly_replaced_map_flushes_it_and_adds_the_whole_list() -> None:
    """Every route moved (a dockerd restart): one flush and one list, not 70 keys to delete;
    the elements that stay are added again with the counters the kernel held."""
    routes = [
        route(f"a{port}", RouteKey(4, TCP, port), 5025, "172.17.0.3", subnets=())
        for port in range(2000, 2070)
    ]
    spec: dict[str, dict[str, str | None]] = {}
    spec["count_any4"] = {f"tcp . {r.key.public_port}": None for r in routes}
    spec["dnat_any4"] = {f"tcp . {r.key.public_port}": "172.17.0.2 . 5025" for r in routes}
    spec["dnat_any4"]["tcp . 2000"] = "172.17.0.3 . 5025"  # this one stays
    spec["range_any4"] = {"udp . 30000-30099": "goto r_old_aaaaaaaaaaaa"}
    live = exact_read(spec, {"dnat_any4:tcp . 2000": (7, 420)})
    batch = render_reconcile(live, routes).splitlines()
    assert "flush map inet natports dnat_any4" in batch
    assert not any(line.startswith("delete element inet natports dnat_any4") for line in batch)
    added = [line for line in batch if line.startswith("add element inet natports dnat_any4")]
    assert added == [
        "add element inet natports dnat_any4 { "
        + "tcp . 2000 counter packets 7 bytes 420 : 172.17.0.3 . 5025, "
        + ", ".join(f"tcp . {port} : 172.17.0.3 . 5025" for port in range(2001, 2070))
        + " }"
    ]
    # a small change stays a delete of its keys; the count set is untouched
    assert "delete element inet natports range_any4 { udp . 30000-30099 }" in batch
    assert not any("element inet natports count_any4" in line for line in batch)
