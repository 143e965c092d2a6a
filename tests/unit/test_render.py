# ruff: noqa: E501
# (the expected nft batches are written out line for line, however long)
"""The nftables renderer, checked against complete batches written out by hand."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from natports.backends.nft_render import (
    LiveElement,
    LiveTable,
    chain_name,
    render_app,
    render_flush_all,
    render_reconcile,
)
from natports.model import APP_NAME_RE, Protocol, Route, RouteKey
from tests.unit.routes import route

TCP = Protocol.TCP
UDP = Protocol.UDP

SKELETON = """\
add table inet natports
add map inet natports any4 { type inet_proto . inet_service : verdict ; }
add map inet natports any6 { type inet_proto . inet_service : verdict ; }
add map inet natports addr4 { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map inet natports addr6 { type ipv6_addr . inet_proto . inet_service : verdict ; }
add chain inet natports dispatch
flush chain inet natports dispatch
add rule inet natports dispatch ip daddr . meta l4proto . th dport vmap @addr4
add rule inet natports dispatch ip6 daddr . meta l4proto . th dport vmap @addr6
add rule inet natports dispatch meta nfproto ipv4 meta l4proto . th dport vmap @any4
add rule inet natports dispatch meta nfproto ipv6 meta l4proto . th dport vmap @any6
add chain inet natports prerouting { type nat hook prerouting priority -110 ; policy accept ; }
flush chain inet natports prerouting
add chain inet natports output { type nat hook output priority -110 ; policy accept ; }
flush chain inet natports output
add chain inet natports postrouting { type nat hook postrouting priority 90 ; policy accept ; }
flush chain inet natports postrouting
add rule inet natports prerouting fib daddr type local jump dispatch
add rule inet natports output ip daddr != 127.0.0.0/8 fib daddr type local jump dispatch
add rule inet natports output ip6 daddr != ::1 fib daddr type local jump dispatch
add rule inet natports postrouting meta mark & 0x00100000 == 0x00100000 meta mark set meta mark ^ 0x00100000 masquerade
"""

MAIL_25 = """\
add counter inet natports a_mail_tcp_25
add chain inet natports a_mail_tcp_25
flush chain inet natports a_mail_tcp_25
add rule inet natports a_mail_tcp_25 ip saddr { 172.17.0.0/16 } meta mark set meta mark | 0x00100000
add rule inet natports a_mail_tcp_25 meta l4proto tcp counter name a_mail_tcp_25 dnat ip to 172.17.0.2 : 5025
add element inet natports any4 { tcp . 25 : goto a_mail_tcp_25 }
"""


def mail_25() -> Route:
    return route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")


def test_one_route_one_backend() -> None:
    assert render_app([], [mail_25()]) == SKELETON + MAIL_25


def test_the_same_switch_twice_renders_the_same_batch() -> None:
    assert render_app([mail_25()], [mail_25()]) == SKELETON + MAIL_25


def test_a_route_without_hairpin_subnets_has_no_mark_rule() -> None:
    r = route("mail", RouteKey(4, UDP, 53), 5053, "172.17.0.2", subnets=())
    assert render_app([], [r]) == SKELETON + (
        """\
add counter inet natports a_mail_udp_53
add chain inet natports a_mail_udp_53
flush chain inet natports a_mail_udp_53
add rule inet natports a_mail_udp_53 meta l4proto udp counter name a_mail_udp_53 dnat ip to 172.17.0.2 : 5053
add element inet natports any4 { udp . 53 : goto a_mail_udp_53 }
"""
    )


def test_three_backends_use_a_numgen_map() -> None:
    r = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3", "172.17.0.4")
    assert render_app([], [r]) == SKELETON + (
        """\
add counter inet natports a_mail_tcp_25
add chain inet natports a_mail_tcp_25
flush chain inet natports a_mail_tcp_25
add rule inet natports a_mail_tcp_25 ip saddr { 172.17.0.0/16 } meta mark set meta mark | 0x00100000
add rule inet natports a_mail_tcp_25 meta l4proto tcp counter name a_mail_tcp_25 dnat ip to numgen random mod 3 map { 0 : 172.17.0.2, 1 : 172.17.0.3, 2 : 172.17.0.4 } : 5025
add element inet natports any4 { tcp . 25 : goto a_mail_tcp_25 }
"""
    )


def test_a_public_ipv4_address_uses_the_addr4_map() -> None:
    key = RouteKey(4, TCP, 25, ip_address("203.0.113.7"))
    r = route("mail", key, 5025, "172.17.0.2", subnets=("172.17.0.0/16", "10.0.1.0/24"))
    assert render_app([], [r]) == SKELETON + (
        """\
add counter inet natports a_mail_tcp_203.0.113.7_25
add chain inet natports a_mail_tcp_203.0.113.7_25
flush chain inet natports a_mail_tcp_203.0.113.7_25
add rule inet natports a_mail_tcp_203.0.113.7_25 ip saddr { 172.17.0.0/16, 10.0.1.0/24 } meta mark set meta mark | 0x00100000
add rule inet natports a_mail_tcp_203.0.113.7_25 meta l4proto tcp counter name a_mail_tcp_203.0.113.7_25 dnat ip to 172.17.0.2 : 5025
add element inet natports addr4 { 203.0.113.7 . tcp . 25 : goto a_mail_tcp_203.0.113.7_25 }
"""
    )


def test_an_ipv6_route() -> None:
    r = route(
        "mail", RouteKey(6, TCP, 25), 5025, "fd00:dead:beef::2", subnets=("fd00:dead:beef::/64",)
    )
    assert render_app([], [r]) == SKELETON + (
        """\
add counter inet natports a6_mail_tcp_25
add chain inet natports a6_mail_tcp_25
flush chain inet natports a6_mail_tcp_25
add rule inet natports a6_mail_tcp_25 ip6 saddr { fd00:dead:beef::/64 } meta mark set meta mark | 0x00100000
add rule inet natports a6_mail_tcp_25 meta l4proto tcp counter name a6_mail_tcp_25 dnat ip6 to [fd00:dead:beef::2] : 5025
add element inet natports any6 { tcp . 25 : goto a6_mail_tcp_25 }
"""
    )


def test_an_ipv6_route_on_one_address_with_two_backends() -> None:
    key = RouteKey(6, UDP, 53, ip_address("2001:db8::7"))
    r = route("dns", key, 5053, "fd00::2", "fd00::3", subnets=("fd00::/64",))
    assert render_app([], [r]) == SKELETON + (
        """\
add counter inet natports a6_dns_udp_2001-db8--7_53
add chain inet natports a6_dns_udp_2001-db8--7_53
flush chain inet natports a6_dns_udp_2001-db8--7_53
add rule inet natports a6_dns_udp_2001-db8--7_53 ip6 saddr { fd00::/64 } meta mark set meta mark | 0x00100000
add rule inet natports a6_dns_udp_2001-db8--7_53 meta l4proto udp counter name a6_dns_udp_2001-db8--7_53 dnat ip6 to numgen random mod 2 map { 0 : [fd00::2], 1 : [fd00::3] } : 5053
add element inet natports addr6 { 2001:db8::7 . udp . 53 : goto a6_dns_udp_2001-db8--7_53 }
"""
    )


def test_routes_are_rendered_in_key_order() -> None:
    r4_26 = route("mail", RouteKey(4, TCP, 26), 5026, "172.17.0.2", subnets=())
    r6_25 = route("mail", RouteKey(6, TCP, 25), 5025, "fd00::2", subnets=())
    r4_25 = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", subnets=())
    assert render_app([], [r6_25, r4_26, r4_25]) == SKELETON + (
        """\
add counter inet natports a_mail_tcp_25
add chain inet natports a_mail_tcp_25
flush chain inet natports a_mail_tcp_25
add rule inet natports a_mail_tcp_25 meta l4proto tcp counter name a_mail_tcp_25 dnat ip to 172.17.0.2 : 5025
add element inet natports any4 { tcp . 25 : goto a_mail_tcp_25 }
add counter inet natports a_mail_tcp_26
add chain inet natports a_mail_tcp_26
flush chain inet natports a_mail_tcp_26
add rule inet natports a_mail_tcp_26 meta l4proto tcp counter name a_mail_tcp_26 dnat ip to 172.17.0.2 : 5026
add element inet natports any4 { tcp . 26 : goto a_mail_tcp_26 }
add counter inet natports a6_mail_tcp_25
add chain inet natports a6_mail_tcp_25
flush chain inet natports a6_mail_tcp_25
add rule inet natports a6_mail_tcp_25 meta l4proto tcp counter name a6_mail_tcp_25 dnat ip6 to [fd00::2] : 5025
add element inet natports any6 { tcp . 25 : goto a6_mail_tcp_25 }
"""
    )


def test_a_route_the_app_no_longer_has_is_removed() -> None:
    old_26 = route("mail", RouteKey(4, TCP, 26), 5026, "172.17.0.2")
    old_addr = route("mail", RouteKey(4, UDP, 53, ip_address("203.0.113.7")), 5053, "172.17.0.2")
    assert render_app([mail_25(), old_26, old_addr], [mail_25()]) == SKELETON + (
        """\
add chain inet natports a_mail_udp_203.0.113.7_53
add element inet natports addr4 { 203.0.113.7 . udp . 53 : goto a_mail_udp_203.0.113.7_53 }
delete element inet natports addr4 { 203.0.113.7 . udp . 53 }
add chain inet natports a_mail_tcp_26
add element inet natports any4 { tcp . 26 : goto a_mail_tcp_26 }
delete element inet natports any4 { tcp . 26 }
add chain inet natports a_mail_tcp_26
flush chain inet natports a_mail_tcp_26
delete chain inet natports a_mail_tcp_26
add chain inet natports a_mail_udp_203.0.113.7_53
flush chain inet natports a_mail_udp_203.0.113.7_53
delete chain inet natports a_mail_udp_203.0.113.7_53
add counter inet natports a_mail_tcp_26
delete counter inet natports a_mail_tcp_26
add counter inet natports a_mail_udp_203.0.113.7_53
delete counter inet natports a_mail_udp_203.0.113.7_53
"""
        + MAIL_25
    )


def test_removing_every_route_of_an_app() -> None:
    assert render_app([mail_25()], []) == SKELETON + (
        """\
add chain inet natports a_mail_tcp_25
add element inet natports any4 { tcp . 25 : goto a_mail_tcp_25 }
delete element inet natports any4 { tcp . 25 }
add chain inet natports a_mail_tcp_25
flush chain inet natports a_mail_tcp_25
delete chain inet natports a_mail_tcp_25
add counter inet natports a_mail_tcp_25
delete counter inet natports a_mail_tcp_25
"""
    )


def test_new_backends_for_a_kept_route_only_refill_it() -> None:
    new = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.9")
    assert render_app([mail_25()], [new]) == SKELETON + MAIL_25.replace(
        "172.17.0.2 :", "172.17.0.9 :"
    )


def test_reconcile_without_a_table() -> None:
    assert render_reconcile(None, [mail_25()]) == SKELETON + MAIL_25
    assert render_reconcile(None, []) == SKELETON


def test_reconcile_removes_what_no_app_has_and_keeps_the_skeleton() -> None:
    live = LiveTable(
        chains=frozenset(
            {
                "dispatch",
                "prerouting",
                "output",
                "postrouting",
                "a_mail_tcp_25",
                "a_old_tcp_80",
                "a6_old_tcp_80",
                "a_old_udp_203.0.113.7_53",
            }
        ),
        elements=frozenset(
            {
                LiveElement("any4", "tcp . 25", "a_mail_tcp_25"),
                LiveElement("any4", "tcp . 80", "a_old_tcp_80"),
                LiveElement("any6", "tcp . 80", "a6_old_tcp_80"),
                LiveElement("addr4", "203.0.113.7 . udp . 53", "a_old_udp_203.0.113.7_53"),
            }
        ),
        counters=frozenset({"a_mail_tcp_25", "a_old_tcp_80", "a6_old_tcp_80", "a_gone_tcp_81"}),
    )
    assert render_reconcile(live, [mail_25()]) == SKELETON + (
        """\
add chain inet natports a_old_udp_203.0.113.7_53
add element inet natports addr4 { 203.0.113.7 . udp . 53 : goto a_old_udp_203.0.113.7_53 }
delete element inet natports addr4 { 203.0.113.7 . udp . 53 }
add chain inet natports a_old_tcp_80
add element inet natports any4 { tcp . 80 : goto a_old_tcp_80 }
delete element inet natports any4 { tcp . 80 }
add chain inet natports a6_old_tcp_80
add element inet natports any6 { tcp . 80 : goto a6_old_tcp_80 }
delete element inet natports any6 { tcp . 80 }
add chain inet natports a6_old_tcp_80
flush chain inet natports a6_old_tcp_80
delete chain inet natports a6_old_tcp_80
add chain inet natports a_old_tcp_80
flush chain inet natports a_old_tcp_80
delete chain inet natports a_old_tcp_80
add chain inet natports a_old_udp_203.0.113.7_53
flush chain inet natports a_old_udp_203.0.113.7_53
delete chain inet natports a_old_udp_203.0.113.7_53
add counter inet natports a6_old_tcp_80
delete counter inet natports a6_old_tcp_80
add counter inet natports a_gone_tcp_81
delete counter inet natports a_gone_tcp_81
add counter inet natports a_old_tcp_80
delete counter inet natports a_old_tcp_80
"""
        + MAIL_25
    )


def test_reconcile_repoints_an_element_that_drifted() -> None:
    live = LiveTable(
        chains=frozenset({"a_mail_tcp_25", "a_other_tcp_25"}),
        elements=frozenset({LiveElement("any4", "tcp . 25", "a_other_tcp_25")}),
        counters=frozenset({"a_mail_tcp_25"}),
    )
    assert render_reconcile(live, [mail_25()]) == SKELETON + (
        """\
add chain inet natports a_other_tcp_25
add element inet natports any4 { tcp . 25 : goto a_other_tcp_25 }
delete element inet natports any4 { tcp . 25 }
add chain inet natports a_other_tcp_25
flush chain inet natports a_other_tcp_25
delete chain inet natports a_other_tcp_25
"""
        + MAIL_25
    )


def test_reconcile_of_an_already_exact_table_only_refills() -> None:
    live = LiveTable(
        chains=frozenset({"dispatch", "prerouting", "output", "postrouting", "a_mail_tcp_25"}),
        elements=frozenset({LiveElement("any4", "tcp . 25", "a_mail_tcp_25")}),
        counters=frozenset({"a_mail_tcp_25"}),
    )
    assert render_reconcile(live, [mail_25()]) == SKELETON + MAIL_25


def test_flush_all() -> None:
    assert render_flush_all() == "add table inet natports\ndelete table inet natports\n"
    assert render_flush_all("inet natports_test") == (
        "add table inet natports_test\ndelete table inet natports_test\n"
    )


def test_another_table_name_is_used_everywhere() -> None:
    batch = render_app(
        [route("mail", RouteKey(4, TCP, 26), 5026, "172.17.0.2")], [mail_25()], "inet t2"
    )
    expected = render_app(
        [route("mail", RouteKey(4, TCP, 26), 5026, "172.17.0.2")], [mail_25()]
    ).replace("inet natports", "inet t2")
    assert batch == expected
    assert "natports" not in batch
    reconcile = render_reconcile(
        LiveTable(frozenset({"a_x_tcp_1"}), frozenset(), frozenset({"a_x_tcp_1"})), [], "inet t2"
    )
    assert "natports" not in reconcile
    assert "delete chain inet t2 a_x_tcp_1\n" in reconcile


# -- chain names ------------------------------------------------------------------------------


def test_chain_names() -> None:
    assert chain_name("mail", RouteKey(4, TCP, 25)) == "a_mail_tcp_25"
    assert chain_name("mail", RouteKey(4, UDP, 25)) == "a_mail_udp_25"
    assert chain_name("mail", RouteKey(6, TCP, 25)) == "a6_mail_tcp_25"
    assert (
        chain_name("mail", RouteKey(4, TCP, 25, ip_address("203.0.113.7")))
        == "a_mail_tcp_203.0.113.7_25"
    )
    assert (
        chain_name("mail", RouteKey(6, TCP, 25, ip_address("2001:db8::7")))
        == "a6_mail_tcp_2001-db8--7_25"
    )


def test_chain_names_of_different_keys_differ() -> None:
    keys = [
        RouteKey(family, proto, port, ip)
        for proto in Protocol
        for port in (1, 25, 251, 2525, 65535)
        for family, ip in [
            (4, None),
            (6, None),
            (4, ip_address("203.0.113.7")),
            (4, ip_address("203.0.113.72")),
            (4, ip_address("3.0.113.7")),
            (6, ip_address("2001:db8::7")),
            (6, ip_address("2001:db8::72")),
            (6, ip_address("2001:db8:0:0:1::7")),
        ]
    ]
    names = [chain_name(app, key) for app in ("mail", "mail-2", "a6", "a") for key in keys]
    assert len(set(names)) == len(names)


app_names = st.from_regex(APP_NAME_RE, fullmatch=True)


@st.composite
def route_keys(draw: st.DrawFn) -> RouteKey:
    family: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    ip = draw(st.none() | st.ip_addresses(v=family))
    return RouteKey(family, draw(st.sampled_from(Protocol)), draw(st.integers(1, 65535)), ip)


@given(app_names, route_keys(), app_names, route_keys())
def test_chain_names_are_unique(app_a: str, key_a: RouteKey, app_b: str, key_b: RouteKey) -> None:
    if (app_a, key_a) != (app_b, key_b):
        assert chain_name(app_a, key_a) != chain_name(app_b, key_b)
