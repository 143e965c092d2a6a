"""A switch as a value: the plan is decided before anything happens, and a commit that fails
in the middle never leaves the state short of what the kernel may hold."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from natports import switch
from natports.context import Context
from natports.errors import NatportsError
from natports.model import Protocol, Route, RouteKey
from natports.store import Applied, Leftover, Store
from tests.unit.routes import backend, route

TCP, UDP = Protocol.TCP, Protocol.UDP
MAIL = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
MAIL_V2 = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.3")
SUBMISSION = route("mail", RouteKey(4, TCP, 587), 5587, "172.17.0.2")
DNS = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.4")
DNS_V2 = route("dns", RouteKey(4, UDP, 53), 5053, "172.17.0.5")


def test_a_switch_widens_first_and_narrows_after() -> None:
    records = {"mail": Applied("nftables", (MAIL, SUBMISSION))}
    p = switch.plan("nftables", "BATCH", records, {"mail": (MAIL_V2,)})
    both = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3")
    assert p.widened == (("mail", Applied("nftables", (both, SUBMISSION))),)
    assert p.after == (("mail", Applied("nftables", (MAIL_V2,))),)
    assert p.leftovers == ()
    assert p.retired == frozenset()  # TCP backends are never retired
    assert p.udp_changed == ()


def test_an_app_with_nothing_left_is_removed_after_the_batch() -> None:
    p = switch.plan("nftables", "B", {"dns": Applied("nftables", (DNS,))}, {"dns": ()})
    assert p.widened == (("dns", Applied("nftables", (DNS,))),)
    assert p.after == (("dns", None),)
    assert p.retired == {backend("172.17.0.4", 5053)}


def test_a_changed_or_new_udp_route_is_cleaned_and_its_old_backend_retired() -> None:
    p = switch.plan("nftables", "B", {"dns": Applied("nftables", (DNS,))}, {"dns": (DNS_V2,)})
    assert p.udp_changed == (DNS_V2,)
    assert p.retired == {backend("172.17.0.4", 5053)}
    fresh = switch.plan("nftables", "B", {}, {"dns": (DNS,)})
    assert fresh.udp_changed == (DNS,)
    same = switch.plan("nftables", "B", {"dns": Applied("nftables", (DNS,))}, {"dns": (DNS,)})
    assert same.udp_changed == ()


def test_an_app_moving_from_another_backend_leaves_a_leftover() -> None:
    records = {"dns": Applied("proxy", (DNS,))}
    p = switch.plan("nftables", "B", records, {"dns": (DNS,)})
    # Before the batch: the new backend may hold the routes once it ran, the proxy still
    # serves them (pending: not to be removed until a batch of the new backend succeeded).
    assert p.widened == (("dns", Applied("nftables", (DNS,))),)
    assert p.pending == (("dns", Leftover("proxy", (DNS,), pending=True)),)
    assert p.leftovers == (("dns", Leftover("proxy", (DNS,))),)
    assert p.after == (("dns", Applied("nftables", (DNS,))),)
    # the proxy's entries end on the host: the kernel backend must clean them up
    assert p.udp_changed == (DNS,)


class Failing:
    """A backend whose batches the kernel refuses, as nft does for a bad batch."""

    name = "nftables"

    def __init__(self) -> None:
        self.runs = 0

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        return "x"

    def plan_reconcile(self, desired: Sequence[Route]) -> str:
        return "x"

    def plan_flush_all(self) -> str:
        return "x"

    def forwards_unpublished(self) -> bool:
        return False

    def intact(self, routes: Sequence[Route] = ()) -> bool:
        return True

    def run(self, batch: str) -> None:
        self.runs += 1
        raise NatportsError("nft failed: Error: syntax error")

    def route_id(self, route: Route) -> str:
        return ""

    def counters(self) -> dict[str, tuple[int, int]]:
        return {}


def test_a_refused_batch_leaves_the_state_covering_the_kernel(tmp_path: Path) -> None:
    ctx = Context(Store(tmp_path), tmp_path, tmp_path / "none.toml", "t", "nftables")
    failing = Failing()
    ctx._backends["nftables"] = failing  # type: ignore[assignment]
    ctx.store.set_applied("mail", Applied("nftables", (MAIL, SUBMISSION)))
    p = switch.plan("nftables", "x", {"mail": ctx.store.applied("mail")}, {"mail": (MAIL_V2,)})
    with pytest.raises(NatportsError):
        switch.commit(ctx, p)
    assert failing.runs == 1
    # Widened, never narrowed: the next apply removes whatever the kernel may hold, and the
    # old backend the kernel still DNATs to is still known (a death is still withdrawn).
    both = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2", "172.17.0.3")
    assert ctx.store.applied("mail") == Applied("nftables", (both, SUBMISSION))
    assert ctx.store.leftover_apps() == []
