"""The nftables backend against the real kernel: atomicity, idempotence, ownership, DNAT."""

from __future__ import annotations

import json
from ipaddress import ip_address

import pytest

from natports.backends.nftables import NftBackend
from natports.errors import NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import NFT_TABLE, ClientNet, TagServer, sh

pytestmark = pytest.mark.usefixtures("clean_kernel")

TABLE = f"inet {NFT_TABLE}"


def route(app: str, port: int, *backends: tuple[str, int], family: int = 4) -> Route:
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(family, Protocol.TCP, port),
        private_port=backends[0][1],
        backends=tuple(Backend(f"c-{ip}", ip_address(ip), p) for ip, p in backends),
    )


@pytest.fixture
def nft() -> NftBackend:
    return NftBackend(TABLE)


def listing() -> str:
    return sh("nft", "list", "table", *TABLE.split()).stdout


def counter_handles() -> dict[str, int]:
    doc = json.loads(sh("nft", "-j", "list", "counters", "table", *TABLE.split()).stdout)
    return {c["counter"]["name"]: c["counter"]["handle"] for c in doc["nftables"] if "counter" in c}


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
    chat = [route("chat", 21026, ("172.30.0.5", 6000))]
    nft.run(nft.plan_app([], mail))
    nft.run(nft.plan_app([], chat))
    # Give chat's counter a value, then switch mail: chat's batch text names no chat object.
    batch = nft.plan_app(mail, [route("mail", 21025, ("172.30.0.9", 5025))])
    assert "chat" not in batch
    nft.run(batch)
    text = listing()
    assert "dnat ip to 172.30.0.5:6000" in text
    assert "dnat ip to 172.30.0.9:5025" in text
    assert "172.30.0.2" not in text


def test_removed_routes_leave_no_objects(nft: NftBackend) -> None:
    both = [route("mail", 21025, ("172.30.0.2", 5025)), route("mail", 21026, ("172.30.0.2", 5026))]
    nft.run(nft.plan_app([], both))
    nft.run(nft.plan_app(both, both[:1]))
    live = nft.live()
    assert live is not None
    assert not any("21026" in c for c in live.chains | live.counters)
    assert {e.key for e in live.elements} == {"tcp . 21025"}


def test_removal_of_objects_already_gone_does_not_fail(nft: NftBackend) -> None:
    """State says a route exists but the kernel lost it (reboot): removing it still works."""
    ghost = [route("mail", 21025, ("172.30.0.2", 5025))]
    nft.run(nft.plan_app(ghost, []))
    live = nft.live()
    assert live is not None and not live.elements


def test_reconcile_removes_drift_and_keeps_counters(nft: NftBackend) -> None:
    mail = [route("mail", 21025, ("172.30.0.2", 5025))]
    stale = [route("gone", 21030, ("172.30.0.7", 5025))]
    nft.run(nft.plan_app([], mail + stale))
    before = counter_handles()
    nft.run(nft.plan_reconcile(mail))
    assert counter_handles()["a_mail_tcp_21025"] == before["a_mail_tcp_21025"]
    live = nft.live()
    assert live is not None
    assert {c for c in live.chains if c.startswith("a_")} == {"a_mail_tcp_21025"}
    assert live.counters == {"a_mail_tcp_21025"}
    assert {e.target for e in live.elements} == {"a_mail_tcp_21025"}


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
    assert counters["a_mail_tcp_21040"][0] >= 2  # one packet per new flow, at least
