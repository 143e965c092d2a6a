"""The nftables backend against the real kernel: atomicity, idempotence, ownership, DNAT.

Every test runs twice: through libnftables in-process with netlink reads (the default),
and through the nft binary with JSON reads (NATPORTS_NFT=binary, or no library).
"""

from __future__ import annotations

import errno
import json
import time
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

import pytest

from natports.backends import nft_netlink, nft_render, nft_wire
from natports.backends.nftables import NftBackend
from natports.errors import NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import NFT_TABLE, ClientNet, TagServer, sh
from tests.kernel.conftest import range_route

pytestmark = pytest.mark.usefixtures("clean_kernel")

TABLE = f"inet {NFT_TABLE}"
FAM = (4, 6)


def route(app: str, port: int, *backends: tuple[str, int], family: int = 4) -> Route:
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(family, Protocol.TCP, port),
        private_port=backends[0][1],
        backends=tuple(Backend(f"c-{ip}", ip_address(ip), p) for ip, p in backends),
    )


@pytest.fixture(params=[True, False], ids=["libnftables", "nft-binary"])
def nft(request: pytest.FixtureRequest) -> NftBackend:
    backend = NftBackend(TABLE, direct=request.param)
    assert (backend.lib is not None) == request.param  # Debian's libnftables1 is installed
    return backend


def listing() -> str:
    return sh("nft", "list", "table", *TABLE.split()).stdout


def elements(name: str) -> str:
    return sh(
        "nft",
        "list",
        "set" if name.startswith(("count", "hairpin")) else "map",
        *TABLE.split(),
        name,
    ).stdout


def test_a_switch_is_idempotent(nft: NftBackend) -> None:
    routes = [route("mail", 21025, ("172.30.0.2", 5025))]
    nft.run(nft.plan_app([], routes))
    first = listing()
    nft.run(nft.plan_app(routes, routes))
    assert listing() == first


def test_a_failing_batch_changes_nothing(nft: NftBackend) -> None:
    old = [route("mail", 21025, ("172.30.0.2", 5025))]
    nft.run(nft.plan_app([], old))
    before = listing()
    new = [route("mail", 21025, ("172.30.0.3", 5025)), route("mail", 21026, ("172.30.0.3", 5026))]
    batch = nft.plan_app(old, new) + f"add rule {TABLE} no_such_chain counter\n"
    with pytest.raises(NatportsError) as err:
        nft.run(batch)
    assert "no_such_chain" in err.value.message or "No such file" in err.value.message
    assert listing() == before


def test_switching_one_app_leaves_other_apps_objects_alone(nft: NftBackend) -> None:
    mail = [route("mail", 21025, ("172.30.0.2", 5025))]
    chat = [route("chat", 21026, ("172.30.0.5", 6000), ("172.30.0.6", 6000))]
    nft.run(nft.plan_app([], mail))
    nft.run(nft.plan_app([], chat))
    batch = nft.plan_app(mail, [route("mail", 21025, ("172.30.0.9", 5025))])
    assert "chat" not in batch and "21026" not in batch
    nft.run(batch)
    text = listing()
    assert "tcp . 21025 : 172.30.0.9 . 5025" in text
    assert "numgen random mod 2 map { 0 : 172.30.0.5, 1 : 172.30.0.6 }" in text
    assert "172.30.0.2" not in text


def test_removed_routes_leave_no_objects(nft: NftBackend) -> None:
    both = [
        route("mail", 21025, ("172.30.0.2", 5025)),
        route("mail", 21026, ("172.30.0.2", 5026), ("172.30.0.3", 5026)),
    ]
    nft.run(nft.plan_app([], both))
    assert "21026" in listing()
    nft.run(nft.plan_app(both, both[:1]))
    text = listing()
    assert "21026" not in text
    assert "chain r_" not in text
    assert "tcp . 21025" in text


def test_removal_of_objects_already_gone_does_not_fail(nft: NftBackend) -> None:
    """State says a route exists but the kernel lost it (reboot): removing it still works."""
    ghost = [
        route("mail", 21025, ("172.30.0.2", 5025)),
        route("mail", 21026, ("172.30.0.2", 5026), ("172.30.0.3", 5026)),
    ]
    nft.run(nft.plan_app(ghost, []))
    assert "2102" not in listing()


def test_a_lost_table_comes_back_with_the_next_switch(nft: NftBackend) -> None:
    routes = [route("mail", 21025, ("172.30.0.2", 5025))]
    nft.run(nft.plan_app([], routes))
    assert nft.intact()
    sh("nft", "delete", "table", *TABLE.split())
    assert not nft.intact()
    nft.run(nft.plan_app(routes, routes))
    assert nft.intact()
    assert "tcp . 21025 : 172.30.0.2 . 5025" in listing()


def test_reconcile_removes_drift_and_keeps_counters(nft: NftBackend) -> None:
    mail = [route("mail", 21025, ("172.30.0.2", 5025))]
    stale = [route("gone", 21030, ("172.30.0.7", 5025), ("172.30.0.8", 5025))]
    nft.run(nft.plan_app([], mail + stale))
    rid = nft.route_id(mail[0])
    sh(
        "nft",
        "add",
        "element",
        *TABLE.split(),
        "count_any4",
        "{ tcp . 21025 counter packets 3 bytes 180 }",
    )
    assert nft.counters()[rid] == (0, 0)  # `add` of an existing element changes nothing
    sh("nft", "delete", "element", *TABLE.split(), "count_any4", "{ tcp . 21025 }")
    sh(
        "nft",
        "add",
        "element",
        *TABLE.split(),
        "count_any4",
        "{ tcp . 21025 counter packets 3 bytes 180 }",
    )
    nft.run(nft.plan_reconcile(mail))
    assert nft.counters() == {rid: (3, 180)}
    text = listing()
    assert "21030" not in text and "chain r_" not in text


def test_a_range_is_a_constant_number_of_objects(nft: NftBackend) -> None:
    rng = Route(
        app="rtp",
        process_type="web",
        key=RouteKey(4, Protocol.UDP, 30000, None, 10000),
        private_port=30000,
        backends=(Backend("c1", ip_address("172.30.0.2"), 30000),),
    )
    batch = nft.plan_app([], [rng])
    assert len(batch.splitlines()) < 60
    nft.run(batch)
    assert "udp . 30000-39999" in elements("range_any4")
    assert "udp . 30000-39999 counter packets 0 bytes 0 : goto r_rtp_" in elements("range_any4")


def test_odd_app_names_make_valid_objects(nft: NftBackend) -> None:
    """Dokku's legacy names: dots, dashes, underscores, a leading digit, 200 characters."""
    apps = ["0app", "my_app.v-2", "a" * 200]
    routes = [
        route(app, 21025 + i, ("172.30.0.2", 5025), ("172.30.0.3", 5025))
        for i, app in enumerate(apps)
    ]
    for r in routes:
        nft.run(nft.plan_app([], [r]))
    for r in routes:
        nft.run(nft.plan_app([r], []))
    assert "chain r_" not in listing()


def test_intact_is_cheap_and_false_without_a_table(nft: NftBackend) -> None:
    assert not nft.intact()
    nft.run(nft.plan_app([], [route("mail", 21025, ("172.30.0.2", 5025))]))
    assert nft.intact()
    sh("nft", "delete", "chain", *TABLE.split(), "postrouting")
    assert not nft.intact()


def test_a_switch_refills_the_skeleton_only_when_it_is_not_in_place() -> None:
    nft = NftBackend(TABLE)
    mail = [route("mail", 21025, ("172.30.0.2", 5025))]
    nft.run(nft.plan_app([], mail))
    full = listing()
    moved = [route("mail", 21025, ("172.30.0.3", 5025))]
    batch = nft.plan_app(mail, moved)
    assert "add rule" not in batch and "flush chain" not in batch
    nft.run(batch)
    nft.run(nft.plan_app(moved, mail))
    assert listing() == full
    sh("nft", "flush", "chain", *TABLE.split(), "dispatch")  # drift the chains survive
    assert not nft.intact()  # so the agent repairs it
    batch = nft.plan_app(mail, mail)
    assert "flush chain" in batch
    nft.run(batch)
    assert listing() == full and nft.intact()


def test_flush_all_removes_only_our_table(nft: NftBackend) -> None:
    probe = ("inet", f"{NFT_TABLE}_probe")  # a table this test owns, standing in for others
    sh("nft", "add", "table", *probe)
    try:
        nft.run(nft.plan_app([], [route("mail", 21025, ("172.30.0.2", 5025))]))
        nft.run(nft.plan_flush_all())
        assert nft.live() is None
        nft.run(nft.plan_flush_all())  # idempotent
        assert sh("nft", "list", "table", *probe).returncode == 0
    finally:
        sh("nft", "delete", "table", *probe, check=False)


def test_kernel_dnat_switch_keeps_established_flows(
    nft: NftBackend, client_net: ClientNet, servers: list[TagServer]
) -> None:
    """The conntrack property the product rests on, with host-local backends."""
    one, two = servers
    first = [route("mail", 21040, (client_net.host_ip, one.port))]
    nft.run(nft.plan_app([], first))
    held = client_net.hold(21040)
    try:
        assert held.tag == "one"
        second = [route("mail", 21040, (client_net.host_ip, two.port))]
        nft.run(nft.plan_app(first, second))
        assert client_net.connect_once(21040) == {"tag": "two"}
        assert held.ask("ping") == "one ping"
    finally:
        held.close()
    counters = nft.counters()
    # one packet per new flow, at least, and the switch kept the total
    assert counters[nft.route_id(first[0])][0] >= 2


def test_a_shifted_range_reaches_each_port_and_counts_in_one_element(
    nft: NftBackend, client_net: ClientNet, range_servers: list[TagServer]
) -> None:
    rng = range_route("ftp", 21300, 27300, 3, client_net.host_ip)
    nft.run(nft.plan_app([], [rng]))
    for offset in range(3):
        assert client_net.connect_once(21300 + offset) == {"tag": f"p{27300 + offset}"}
    assert nft.counters()[nft.route_id(rng)][0] >= 3
    same = range_route("ftp", 27300, 27300, 3, client_net.host_ip)  # the port stays
    nft.run(nft.plan_app([rng], [same]))
    assert client_net.connect_once(27301) == {"tag": "p27301"}


def every_kind() -> list[Route]:
    """One route of each shape the renderer makes: a map, a chain, a range, per address."""
    return [
        route("mail", 21025, ("172.30.0.2", 5025)),
        route("chat", 21026, ("172.30.0.5", 6000), ("172.30.0.6", 6000)),
        range_route("ftp", 21300, 27300, 3, "172.30.0.9"),
        Route(
            "web",
            "web",
            RouteKey(4, Protocol.UDP, 21027, ip_address("127.0.0.2")),
            53,
            (Backend("c-w", ip_address("172.30.0.3"), 53),),
            ("172.30.0.0/24",),
        ),
        route("mail", 21025, ("fd00:30::2", 5025), family=6),
        Route(
            "web",
            "web",
            RouteKey(6, Protocol.TCP, 21028, ip_address("fd00:31::1")),
            80,
            (Backend("c-w6", ip_address("fd00:30::3"), 80),),
        ),
        Route("idle", "web", RouteKey(4, Protocol.TCP, 21029), 80),  # counted, no backend
    ]


def put_counter(set_name: str, key: str, packets: int, size: int, value: str = "") -> None:
    """Give an element a counter value (the kernel only takes one when it is added)."""
    value = f" : {value}" if value else ""
    sh("nft", "delete", "element", *TABLE.split(), set_name, f"{{ {key} }}")
    sh(
        "nft",
        "add",
        "element",
        *TABLE.split(),
        set_name,
        f"{{ {key} counter packets {packets} bytes {size}{value} }}",
    )


def canonical() -> list[Any]:
    """The table without handles or counters, set elements in order: comparable. Read
    until two listings agree: nft's listing, like any set dump, can miss elements while
    the kernel resizes a set's hash table after a large change (nft_wire.Inconsistent)."""
    seen = _listing()
    for _ in range(20):
        again = _listing()
        if again == seen:
            return seen
        seen = again
        time.sleep(0.01)
    raise AssertionError("the table's listing did not settle")


def _listing() -> list[Any]:
    doc = json.loads(sh("nft", "-j", "-s", "list", "table", *TABLE.split()).stdout)
    items = []
    for item in doc["nftables"]:
        for body in item.values():
            if isinstance(body, dict):
                body.pop("handle", None)
                if "elem" in body:
                    body["elem"] = sorted(body["elem"], key=json.dumps)
        items.append(item)
    return sorted(items, key=json.dumps)


def assert_as_rebuilt(nft: NftBackend, routes: list[Route]) -> None:
    """The table now is the one a rebuild of `routes` makes (the rebuild replaces it)."""
    now = canonical()
    sh("nft", "delete", "table", *TABLE.split())
    nft.run(nft_render.render_rebuild(None, routes, TABLE))
    assert canonical() == now


def test_the_netlink_read_agrees_with_nfts_json() -> None:
    routes = every_kind()
    direct, binary = NftBackend(TABLE), NftBackend(TABLE, direct=False)
    direct.run(direct.plan_app([], routes))
    put_counter("count_any4", "tcp . 21025", 3, 180)
    put_counter("count_addr6", "fd00:31::1 . tcp . 21028", 2**40, 2**50)
    counters = direct.counters()
    assert counters == binary.counters()
    assert counters[direct.route_id(routes[0])] == (3, 180)
    assert counters[direct.route_id(routes[5])] == (2**40, 2**50)
    assert direct.route_id(routes[2]) in counters  # the range map's own counter
    live = direct.live()
    assert live is not None and live.elements is not None
    assert live.elements == nft_render.wanted(routes).values
    subnets = {f: [s for r in routes if r.key.family == f for s in r.hairpin_subnets] for f in FAM}
    assert live.hairpin == {f: nft_wire.ranges_of_subnets(s) for f, s in subnets.items()}
    assert live.rules_in_place  # and every set has the shape nft_wire expects (else not exact)
    assert live.chains == nft_render.SKELETON_CHAINS | {
        nft_render.chain_name(r.app, r.key) for r in routes[1:3]
    }


def test_a_full_apply_changes_only_what_differs(nft: NftBackend) -> None:
    routes = every_kind()
    nft.run(nft.plan_app([], routes))
    put_counter("count_any4", "tcp . 21025", 3, 180)
    ftp = nft_render.chain_name("ftp", routes[2].key)
    put_counter("range_any4", "tcp . 21300-21302", 5, 500, f"goto {ftp}")
    moved = route("mail", 21025, ("172.30.0.4", 5025))  # same key, new backend
    added = route("new", 21031, ("172.30.0.7", 5025), ("172.30.0.8", 5025))
    desired = [moved, routes[2], *routes[3:], added]  # chat (21026) goes
    batch = nft.plan_reconcile(desired)
    if nft.netlink:
        assert "delete table" not in batch
        assert "21027" not in batch  # an element that stays is not touched
    nft.run(batch)
    text = listing()
    assert "21026" not in text and nft_render.chain_name("chat", routes[1].key) not in text
    assert nft.counters()[nft.route_id(moved)] == (3, 180)
    assert nft.counters()[nft.route_id(routes[2])] == (5, 500)
    assert_as_rebuilt(nft, desired)


def test_a_full_apply_where_every_route_moved_refills_the_map(nft: NftBackend) -> None:
    """A dockerd restart moves every address: the map is flushed and refilled in the
    same transaction (faster than 100 keys to delete); the totals stay."""
    before = [route(f"a{port}", port, ("172.30.1.2", 5025)) for port in range(21400, 21500)]
    nft.run(nft.plan_reconcile(before))
    put_counter("count_any4", "tcp . 21400", 4, 240)
    after = [route(f"a{port}", port, ("172.30.1.3", 5025)) for port in range(21400, 21500)]
    batch = nft.plan_reconcile(after)
    if nft.netlink:
        assert f"flush map {TABLE} dnat_any4" in batch and "delete table" not in batch
    nft.run(batch)
    assert nft.counters()[nft.route_id(after[0])] == (4, 240)
    assert_as_rebuilt(nft, after)


def test_a_full_apply_repairs_drift_inside_the_sets(nft: NftBackend) -> None:
    routes = every_kind()
    nft.run(nft.plan_app([], routes))
    sh("nft", "delete", "element", *TABLE.split(), "dnat_any4", "{ tcp . 21025 }")
    sh("nft", "add", "element", *TABLE.split(), "dnat_any4", "{ tcp . 21999 : 10.0.0.1 . 1 }")
    sh("nft", "add", "element", *TABLE.split(), "count_any4", "{ tcp . 21999 }")
    sh("nft", "add", "chain", *TABLE.split(), "r_stray")
    sh("nft", "flush", "chain", *TABLE.split(), "dispatch")
    nft.run(nft.plan_reconcile(routes))
    assert_as_rebuilt(nft, routes)


def test_a_full_apply_rebuilds_a_table_holding_what_natports_does_not_make(
    nft: NftBackend,
) -> None:
    routes = every_kind()[:2]
    nft.run(nft.plan_app([], routes))
    put_counter("count_any4", "tcp . 21025", 3, 180)
    sh("nft", "add", "counter", *TABLE.split(), "foreign")
    sh("nft", "add", "chain", *TABLE.split(), "foreign_chain")
    batch = nft.plan_reconcile(routes)
    assert "delete table" in batch
    nft.run(batch)
    text = listing()
    assert "foreign" not in text
    assert nft.counters()[nft.route_id(routes[0])] == (3, 180)


def test_a_full_apply_falls_back_to_a_rebuild_when_the_kernel_refuses(nft: NftBackend) -> None:
    routes = every_kind()[:1]
    nft.run(nft.plan_app([], routes))
    # Someone redefined a set under its own name: same elements, no counters.
    sh(
        "nft",
        "-f",
        "-",
        input=f"flush chain {TABLE} dispatch\ndelete set {TABLE} count_any4\n"
        f"add set {TABLE} count_any4 {{ type inet_proto . inet_service ; }}\n"
        f"add element {TABLE} count_any4 {{ tcp . 21025 }}\n",
    )
    nft.run(nft.plan_reconcile(routes))
    assert "counter" in elements("count_any4")
    assert nft.counters()[nft.route_id(routes[0])] == (0, 0)


# -- full applies nobody reads (describe=False): over netlink where they can be ------------


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each netlink element batch that committed ("ok") or was refused (the error): a
    test of the netlink path must see it commit, or it would pass on the text path."""
    seen: list[str] = []
    commit = nft_netlink.commit

    def noting(*args: Any, **kwargs: Any) -> None:
        try:
            commit(*args, **kwargs)
        except Exception as exc:
            seen.append(str(exc))
            raise
        seen.append("ok")

    monkeypatch.setattr(nft_netlink, "commit", noting)
    return seen


def singles(first: int, count: int, backend: str) -> list[Route]:
    return [route(f"a{port}", port, (backend, 5025)) for port in range(first, first + count)]


def test_a_table_built_from_nothing_over_netlink_is_the_one_nft_builds(
    commits: list[str],
) -> None:
    """No table: its skeleton and route chains as nft text, then every element of every
    kind (DNAT values, goto verdicts, ranges with their last key) as one netlink batch."""
    nft = NftBackend(TABLE)
    routes = every_kind()
    batch = nft.plan_reconcile(routes, describe=False)
    assert batch.startswith("#") and "over netlink" in batch
    nft.run(batch)
    assert commits == ["ok"]
    for name in ("count_any4", "range_any4", "count_addr6"):  # the sets' counters, cloned
        assert "counter packets 0 bytes 0" in elements(name)
    assert_as_rebuilt(nft, routes)


def test_a_full_apply_of_elements_only_is_one_netlink_batch_and_leaves_the_rest(
    commits: list[str],
) -> None:
    """Moved, gone, new and drifted elements; several messages per set (over 64 KiB):
    the same table as nft's rebuild, and an element that stays keeps its counter."""
    nft = NftBackend(TABLE)
    before = singles(21000, 2500, "172.30.1.2")
    nft.run(nft.plan_reconcile(before, describe=False))
    put_counter("count_any4", "tcp . 21000", 4, 240)
    sh("nft", "delete", "element", *TABLE.split(), "dnat_any4", "{ tcp . 21001 }")
    sh("nft", "add", "element", *TABLE.split(), "dnat_any4", "{ tcp . 29999 : 10.0.0.1 . 1 }")
    after = [*singles(21000, 2400, "172.30.1.3"), *singles(25000, 10, "172.30.1.4")]
    batch = nft.plan_reconcile(after, describe=False)
    assert batch == f"# {TABLE}: 2420 elements added, 2600 deleted over netlink\n"
    nft.run(batch)
    assert commits == ["ok", "ok"]  # the build, then this change
    assert nft.counters()[nft.route_id(after[0])] == (4, 240)
    assert_as_rebuilt(nft, after)
    nothing = nft.plan_reconcile(after, describe=False)
    assert nothing == f"# {TABLE}: 0 elements added, 0 deleted over netlink\n"
    nft.run(nothing)
    assert commits == ["ok", "ok"]  # nothing to send: no batch


def test_a_full_apply_that_needs_rules_is_nft_text() -> None:
    """Route chains, a lost skeleton rule or other hairpin subnets: nft writes them."""
    nft = NftBackend(TABLE)
    routes = every_kind()
    nft.run(nft.plan_reconcile(routes, describe=False))
    assert "add chain" in nft.plan_reconcile(routes, describe=False)  # route chains
    mail = [routes[0]]
    nft.run(nft.plan_reconcile(mail, describe=False))  # deletes the route chains: text
    assert nft.plan_reconcile(mail, describe=False).startswith("#")
    sh("nft", "delete", "rule", *TABLE.split(), "postrouting", "handle", postrouting_handle())
    batch = nft.plan_reconcile(mail, describe=False)
    assert f"flush chain {TABLE} postrouting" in batch
    nft.run(batch)
    hairpinned = [replace(routes[0], hairpin_subnets=("172.30.9.0/24",))]
    batch = nft.plan_reconcile(hairpinned, describe=False)
    assert f"flush set {TABLE} hairpin4" in batch and "flush chain" not in batch
    nft.run(batch)
    assert_as_rebuilt(nft, hairpinned)


def test_a_skeleton_of_another_natports_is_refilled_like_a_lost_one() -> None:
    """As many rules, but not this natports' (an upgrade changed the skeleton): a switch,
    a full apply and the agent's check all see it, and a full apply puts it right."""
    nft = NftBackend(TABLE)
    mail = [route("mail", 21025, ("172.30.0.2", 5025))]
    nft.run(nft.plan_reconcile(mail, describe=False))
    assert nft.intact()
    rule = "meta mark & 0x00100000 == 0x00100000 meta mark set meta mark ^ 0x00100000 masquerade"
    sh(
        "nft",
        "replace",
        "rule",
        *TABLE.split(),
        "postrouting",
        "handle",
        postrouting_handle(),
        *rule.split(),
        "comment",
        '"natports skeleton olderversion"',
    )
    assert not nft.intact()
    assert f"flush chain {TABLE} postrouting" in nft.plan_app(mail, mail)
    batch = nft.plan_reconcile(mail, describe=False)
    assert f"flush chain {TABLE} postrouting" in batch
    nft.run(batch)
    assert nft.intact() and nft_render.skeleton_marker(TABLE) in listing()
    assert_as_rebuilt(nft, mail)


def postrouting_handle() -> str:
    rules = json.loads(sh("nft", "-j", "-a", "list", "chain", *TABLE.split(), "postrouting").stdout)
    return str(next(item["rule"]["handle"] for item in rules["nftables"] if "rule" in item))


def test_a_netlink_batch_is_all_or_nothing() -> None:
    """The last message fails (a value of the wrong size): nothing before it stays."""
    nft = NftBackend(TABLE)
    nft.run(nft.plan_reconcile([route("mail", 21025, ("172.30.0.2", 5025))]))
    before = canonical()
    smtp = nft_wire.key_bytes(RouteKey(4, Protocol.TCP, 21025))
    new = nft_wire.key_bytes(RouteKey(4, Protocol.TCP, 21026))
    changes = [
        nft_wire.Change("dnat_any4", (smtp,), ((new, bytes(8)),)),
        nft_wire.Change("count_any4", (), ((new, None),)),
        nft_wire.Change("dnat_addr4", (), ((bytes(4) + new, bytes(4)),)),  # 4 bytes, not 8
    ]
    with pytest.raises(OSError) as refused:
        nft_netlink.commit(*TABLE.split(), changes)
    assert refused.value.errno == errno.EINVAL
    assert canonical() == before


def test_a_refused_netlink_batch_falls_back_to_nft_text(commits: list[str]) -> None:
    """The table changed between the read and the commit (an element the batch deletes
    is gone): the kernel refuses the batch, and nft text makes the table right."""
    nft = NftBackend(TABLE)
    nft.run(nft.plan_reconcile(singles(21000, 100, "172.30.1.2"), describe=False))
    after = singles(21000, 100, "172.30.1.3")
    batch = nft.plan_reconcile(after, describe=False)
    assert batch.startswith("#")
    sh("nft", "delete", "element", *TABLE.split(), "dnat_any4", "{ tcp . 21050 }")
    nft.run(batch)
    assert commits[0] == "ok" and "No such file or directory" in commits[1]
    assert_as_rebuilt(nft, after)


def test_a_refused_change_is_rebuilt_with_the_counters_it_read() -> None:
    """The text change fails (an element it deletes went between the read and the run):
    the rebuild carries the counters the exact read found."""
    nft = NftBackend(TABLE)
    before = singles(21000, 10, "172.30.1.2")
    nft.run(nft.plan_reconcile(before))
    put_counter("count_any4", "tcp . 21001", 6, 360)
    after = [*before[:5], route("a21005", 21005, ("172.30.1.9", 5025))]  # moved; 6-9 go
    batch = nft.plan_reconcile(after)
    assert "delete element" in batch and "delete table" not in batch
    sh("nft", "delete", "element", *TABLE.split(), "dnat_any4", "{ tcp . 21009 }")
    nft.run(batch)
    assert nft.counters()[nft.route_id(after[1])] == (6, 360)
    assert_as_rebuilt(nft, after)


def test_a_build_interrupted_before_its_marker_is_not_intact_and_the_agent_completes_it(
    commits: list[str],
) -> None:
    """natports killed after the elements: the skeleton's marker is missing, so the
    agent's check (`intact`) sees it, and its repair makes the whole table."""
    nft = NftBackend(TABLE)
    routes = every_kind()
    build = nft_render.render_build(routes, TABLE)
    sh("nft", "-f", "-", input=build.skeleton)
    assert not nft.intact()  # no elements yet: not intact either
    nft_netlink.commit(*TABLE.split(), build.elements)
    assert not nft.intact(routes)
    nft.run(nft.plan_reconcile(routes, describe=False))  # what engine.repair runs
    assert nft.intact(routes)
    assert_as_rebuilt(nft, routes)


def test_an_interrupted_build_leaves_no_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal while the elements go in: the half-built table is deleted again."""
    nft = NftBackend(TABLE)
    batch = nft.plan_reconcile(every_kind(), describe=False)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(nft_netlink, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nft.run(batch)
    assert f"table {TABLE}\n" not in sh("nft", "list", "tables").stdout


def test_a_table_built_from_nothing_is_deleted_again_if_its_elements_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The elements' batch fails (injected: the kernel takes any valid one): the
    half-built table goes, and nft text builds the table in one transaction."""
    nft = NftBackend(TABLE)
    routes = every_kind()
    batch = nft.plan_reconcile(routes, describe=False)
    seen: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        seen.append(listing())  # the first transaction's table: skeleton, no elements
        raise OSError(errno.ENOMEM, "injected")

    monkeypatch.setattr(nft_netlink, "commit", refuse)
    nft.run(batch)
    assert "dispatch" in seen[0] and "21025" not in seen[0]
    assert_as_rebuilt(nft, routes)


def test_a_full_apply_right_after_many_elements_were_added_reads_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel resizes a hash set's table after many inserts, and a dump taken
    meanwhile lists some elements twice and misses as many (nft_wire.Inconsistent):
    read once, the routes it missed would survive the apply that removes them. The
    race is the kernel's: rounds until a read has met it."""
    met: list[str] = []
    decode = nft_wire.decode_elements

    def noting(name: str, payloads: list[bytes], count: int | None) -> nft_wire.Elements:
        try:
            return decode(name, payloads, count)
        except nft_wire.Inconsistent as exc:  # observed, then handled as natports does
            met.append(str(exc))
            raise

    monkeypatch.setattr(nft_wire, "decode_elements", noting)
    nft = NftBackend(TABLE)
    every = [
        route(f"a{i}", 20000 + i, (f"172.30.{i // 250}.{i % 250 + 2}", 5025)) for i in range(30000)
    ]
    kept = every[:15000]
    for _ in range(10):
        nft.run(nft.plan_flush_all())
        nft.run(nft.plan_reconcile(every, describe=False))  # built: 60,000 elements added
        batch = nft.plan_reconcile(kept, describe=False)  # at once: the resize is under way
        assert batch == f"# {TABLE}: 0 elements added, 30000 deleted over netlink\n"
        nft.run(batch)
        assert_as_rebuilt(nft, kept)
        if met:
            return
    pytest.skip("no read met a resize of the kernel's hash table in 10 rounds")
