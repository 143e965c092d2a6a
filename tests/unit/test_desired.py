"""From mappings and containers to routes, and every reason that cannot be done."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from natports.containers import AppProblem, ContainerInfo
from natports.desired import build_routes
from natports.errors import NatportsError
from natports.model import Backend, Mapping, Protocol, Route, RouteKey

TCP = Protocol.TCP
UDP = Protocol.UDP


def container(
    cid: str,
    ipv4: str | None = "172.17.0.2",
    ipv6: str | None = None,
    published: set[tuple[int, Protocol]] | None = None,
    running: bool = True,
    name: str | None = None,
    process_type: str = "web",
) -> ContainerInfo:
    subnets: list[str] = []
    if ipv4:
        subnets.append("172.17.0.0/16")
    if ipv6:
        subnets.append("fd00::/64")
    return ContainerInfo(
        id=cid,
        name=f"mail.{process_type}.{cid}" if name is None else name,
        running=running,
        process_type=process_type,
        ipv4=None if ipv4 is None else IPv4Address(ipv4),
        ipv6=None if ipv6 is None else IPv6Address(ipv6),
        subnets=tuple(subnets),
        published=frozenset({(5025, TCP)} if published is None else published),
        created="2024-05-01T10:00:00.1Z",
        image="sha256:new",
    )


def problems(mappings: list[Mapping], containers: dict[str, list[ContainerInfo]]) -> list[str]:
    with pytest.raises(AppProblem) as info:
        build_routes("mail", mappings, containers)
    assert isinstance(info.value, NatportsError)
    return info.value.message.split("\n")


def test_one_mapping_one_container() -> None:
    routes = build_routes("mail", [Mapping(25, 5025)], {"web": [container("c1")]})
    assert routes == (
        Route(
            app="mail",
            process_type="web",
            key=RouteKey(4, TCP, 25),
            private_port=5025,
            backends=(Backend("c1", IPv4Address("172.17.0.2"), 5025),),
            hairpin_subnets=("172.17.0.0/16",),
        ),
    )


def test_no_mappings_no_routes() -> None:
    assert build_routes("mail", [], {}) == ()


def test_a_range_is_one_route() -> None:
    c = container("c1", published={(2000, UDP), (2001, UDP), (2002, UDP)})
    routes = build_routes("mail", [Mapping(1000, 2000, UDP, count=3)], {"web": [c]})
    assert [(r.key, r.private_port, r.private_end) for r in routes] == [
        (RouteKey(4, UDP, 1000, None, 3), 2000, 2002)
    ]
    assert routes[0].backends == (Backend("c1", IPv4Address("172.17.0.2"), 2000),)
    # Backends that serve port by port (iptables, proxy) expand it again.
    assert [(r.key, r.private_port, r.backends[0].port) for r in routes[0].expanded()] == [
        (RouteKey(4, UDP, 1000), 2000, 2000),
        (RouteKey(4, UDP, 1001), 2001, 2001),
        (RouteKey(4, UDP, 1002), 2002, 2002),
    ]


def test_a_range_route_survives_its_json_and_claims_the_whole_range() -> None:
    c = container("c1", published={(2000, UDP), (2001, UDP), (2002, UDP)})
    (route,) = build_routes("mail", [Mapping(1000, 2000, UDP, count=3)], {"web": [c]})
    assert route.to_json()["count"] == 3
    assert Route.from_json(route.to_json()) == route
    assert route.claim() == Mapping(1000, 2000, UDP, count=3)


def test_backends_are_sorted() -> None:
    cs = [
        container("c3", "172.17.0.4"),
        container("c1", "172.17.0.9"),
        container("c2", "172.17.0.3"),
    ]
    (route,) = build_routes("mail", [Mapping(25, 5025)], {"web": cs})
    assert route.backends == (
        Backend("c1", IPv4Address("172.17.0.9"), 5025),
        Backend("c2", IPv4Address("172.17.0.3"), 5025),
        Backend("c3", IPv4Address("172.17.0.4"), 5025),
    )
    reversed_input = build_routes("mail", [Mapping(25, 5025)], {"web": cs[::-1]})
    assert reversed_input == (route,)


def test_all_addresses_give_both_families_when_every_container_has_both() -> None:
    cs = [container("c1", "172.17.0.2", "fd00::2"), container("c2", "172.17.0.3", "fd00::3")]
    routes = build_routes("mail", [Mapping(25, 5025)], {"web": cs})
    assert routes == (
        Route(
            "mail",
            "web",
            RouteKey(4, TCP, 25),
            5025,
            (
                Backend("c1", IPv4Address("172.17.0.2"), 5025),
                Backend("c2", IPv4Address("172.17.0.3"), 5025),
            ),
            ("172.17.0.0/16",),
        ),
        Route(
            "mail",
            "web",
            RouteKey(6, TCP, 25),
            5025,
            (
                Backend("c1", IPv6Address("fd00::2"), 5025),
                Backend("c2", IPv6Address("fd00::3"), 5025),
            ),
            ("fd00::/64",),
        ),
    )


def test_all_addresses_give_ipv4_only_unless_every_container_has_ipv6() -> None:
    cs = [container("c1", "172.17.0.2", "fd00::2"), container("c2", "172.17.0.3")]
    routes = build_routes("mail", [Mapping(25, 5025)], {"web": cs})
    assert [r.key for r in routes] == [RouteKey(4, TCP, 25)]


def test_a_public_address_gives_its_family_only() -> None:
    cs = [container("c1", "172.17.0.2", "fd00::2")]
    v4 = ip_address("203.0.113.7")
    v6 = ip_address("2001:db8::7")
    routes = build_routes(
        "mail", [Mapping(25, 5025, public_ip=v6), Mapping(25, 5025, public_ip=v4)], {"web": cs}
    )
    assert [(r.key, r.backends[0].ip, r.hairpin_subnets) for r in routes] == [
        (RouteKey(4, TCP, 25, v4), IPv4Address("172.17.0.2"), ("172.17.0.0/16",)),
        (RouteKey(6, TCP, 25, v6), IPv6Address("fd00::2"), ("fd00::/64",)),
    ]


def test_an_ipv6_only_app_on_all_addresses() -> None:
    cs = [container("c1", None, "fd00::2")]
    routes = build_routes("mail", [Mapping(25, 5025)], {"web": cs})
    assert [r.key for r in routes] == [RouteKey(6, TCP, 25)]


def test_hairpin_subnets_are_the_union_of_the_containers_subnets() -> None:
    a = container("c1", "172.17.0.2")
    b = ContainerInfo(
        id="c2",
        name="mail.web.2",
        running=True,
        process_type="web",
        ipv4=IPv4Address("10.0.1.5"),
        ipv6=None,
        subnets=("10.0.1.0/24",),
        published=frozenset({(5025, TCP)}),
        created="",
        image="",
    )
    (route,) = build_routes("mail", [Mapping(25, 5025)], {"web": [b, a]})
    assert route.hairpin_subnets == ("10.0.1.0/24", "172.17.0.0/16")


def test_routes_of_several_mappings_and_process_types_are_sorted_by_key() -> None:
    web = container("c1", published={(5025, TCP), (5587, TCP)})
    worker = container("w1", "172.17.0.8", published={(6053, UDP)}, process_type="worker")
    mappings = [
        Mapping(587, 5587),
        Mapping(53, 6053, UDP, process_type="worker"),
        Mapping(25, 5025),
    ]
    routes = build_routes("mail", mappings, {"web": [web], "worker": [worker]})
    assert [(r.key, r.process_type, r.backends[0].container_id) for r in routes] == [
        (RouteKey(4, TCP, 25), "web", "c1"),
        (RouteKey(4, TCP, 587), "web", "c1"),
        (RouteKey(4, UDP, 53), "worker", "w1"),
    ]


# -- problems ---------------------------------------------------------------------------------


def test_a_stopped_container() -> None:
    cs = [container("c1"), container("c2", running=False, name="mail.web.2")]
    assert problems([Mapping(25, 5025)], {"web": cs}) == [
        'app "mail": container mail.web.2 is not running'
    ]


def test_only_stopped_containers() -> None:
    cs = [container("c2", running=False, name="")]
    assert problems([Mapping(25, 5025)], {"web": cs}) == ['app "mail": container c2 is not running']


def test_a_private_port_that_is_not_published() -> None:
    cs = [container("c1", published=set())]
    assert problems([Mapping(25, 5025)], {"web": cs}) == [
        'app "mail": container mail.web.c1 does not publish 5025/tcp; natports needs it '
        "published on loopback (-p 127.0.0.1::5025) so that Docker accepts the forwarded traffic"
    ]


def test_a_udp_private_port_that_is_not_published() -> None:
    cs = [container("c1", published={(5053, TCP)})]
    (message,) = problems([Mapping(53, 5053, UDP)], {"web": cs})
    assert "does not publish 5053/udp" in message
    assert "(-p 127.0.0.1::5053/udp)" in message


def test_one_unpublished_port_of_a_range() -> None:
    cs = [container("c1", published={(2000, TCP), (2002, TCP)})]
    (message,) = problems([Mapping(1000, 2000, count=3)], {"web": cs})
    assert "does not publish 2001/tcp" in message
    assert "-p 127.0.0.1::2001)" in message


def test_a_missing_process_type() -> None:
    assert problems([Mapping(25, 5025, process_type="worker")], {"web": [container("c1")]}) == [
        'app "mail": no running container for process type "worker" (needed by 25/tcp)'
    ]


def test_a_process_type_known_to_run_no_container_routes_nothing() -> None:
    """Dokku scaled it to 0 (no CONTAINER files): nothing to route, not a problem."""
    mappings = [Mapping(25, 5025), Mapping(26, 5026, process_type="worker")]
    routes = build_routes("mail", mappings, {"web": [container("c1")], "worker": []})
    assert [r.key.public_port for r in routes] == [25]


def test_an_ipv6_mapping_without_ipv6_containers() -> None:
    mapping = Mapping(25, 5025, public_ip=ip_address("2001:db8::7"))
    cs = [container("c1", "172.17.0.2", "fd00::2"), container("c2", "172.17.0.3")]
    assert problems([mapping], {"web": cs}) == [
        'app "mail": [2001:db8::7]:25/tcp needs IPv6 addresses on every container'
    ]


def test_an_ipv4_mapping_without_ipv4_containers() -> None:
    cs = [container("c1", None, "fd00::2")]
    assert problems([Mapping(25, 5025, public_ip=ip_address("203.0.113.7"))], {"web": cs}) == [
        'app "mail": 203.0.113.7:25/tcp needs IPv4 addresses on every container'
    ]
    assert problems([Mapping(26, 5026)], {"web": [container("c2", None, None)]}) == [
        'app "mail": container mail.web.c2 does not publish 5026/tcp; natports needs it '
        "published on loopback (-p 127.0.0.1::5026) so that Docker accepts the forwarded traffic",
        'app "mail": 26/tcp needs IPv4 addresses on every container',
    ]


def test_every_problem_of_the_app_is_reported_together() -> None:
    web = [container("c1", published=set()), container("c2", running=False, name="mail.web.2")]
    mappings = [
        Mapping(25, 5025),
        Mapping(53, 5053, UDP, process_type="dns"),
        Mapping(80, 5000, public_ip=ip_address("2001:db8::7")),
        Mapping(587, 5587),
    ]
    assert problems(mappings, {"web": web}) == [
        'app "mail": container mail.web.2 is not running',
        'app "mail": container mail.web.c1 does not publish 5025/tcp; natports needs it '
        "published on loopback (-p 127.0.0.1::5025) so that Docker accepts the forwarded traffic",
        'app "mail": no running container for process type "dns" (needed by 53/udp)',
        'app "mail": container mail.web.c1 does not publish 5000/tcp; natports needs it '
        "published on loopback (-p 127.0.0.1::5000) so that Docker accepts the forwarded traffic",
        'app "mail": [2001:db8::7]:80/tcp needs IPv6 addresses on every container',
        'app "mail": container mail.web.c1 does not publish 5587/tcp; natports needs it '
        "published on loopback (-p 127.0.0.1::5587) so that Docker accepts the forwarded traffic",
    ]


def test_a_problem_is_said_once() -> None:
    cs = [container("c1"), container("c2", running=False, name="mail.web.2")]
    assert problems([Mapping(25, 5025), Mapping(26, 5025)], {"web": cs}) == [
        'app "mail": container mail.web.2 is not running'
    ]


def test_problems_name_the_app() -> None:
    with pytest.raises(AppProblem) as info:
        build_routes("relay", [Mapping(25, 5025)], {})
    assert str(info.value) == (
        'app "relay": no running container for process type "web" (needed by 25/tcp)'
    )
