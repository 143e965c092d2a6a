"""The engine's promises, against a fake backend, a fake Docker and a fake conntrack.

What is checked: the applied state is widened before a batch and narrowed after it; a
failing batch leaves the kernel as it was and the state covering it; a broken app keeps
only routes to containers that still serve it; a backend switch is make-before-break
with leftovers retried; concurrent applies are serialised; flush removes everything.
"""

from __future__ import annotations

import threading
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from natports import engine
from natports.containers import AppProblem
from natports.errors import InputError, NatportsError
from natports.model import Backend, Mapping, Protocol, Route, RouteKey
from natports.policy import HostListener
from natports.store import Applied
from tests.unit.fakes import (
    HOST,
    Crash,
    FakeDocker,
    World,
    cid,
    container,
    dokku_files,
    make_context,
    quiet_host,
    udp_flow,
)

TCP, UDP = Protocol.TCP, Protocol.UDP


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    quiet_host(monkeypatch)
    return make_context(tmp_path)


def store_ports(w: World, app: str, text: str) -> None:
    engine.set_ports(w.ctx, app, text.encode(), "PORTS")


def deploy(w: World, app: str, *names: str, proc: str = "web") -> None:
    """Dokku's CONTAINER files of `app` now name these (already added) containers."""
    found = [w.docker.containers[cid(n)] for n in names]
    dokku_files(w.ctx.dokku_root, app, **{proc: found})


def applied_ports(w: World, app: str) -> dict[int, list[str]]:
    record = w.ctx.store.applied(app)
    assert record is not None, f"{app} has no applied state"
    return {r.key.public_port: sorted(str(b.ip) for b in r.backends) for r in record.routes}


def mail_world(w: World, *ips: str) -> None:
    """App `mail` (25:5025) served by containers m1, m2... at these addresses."""
    store_ports(w, "mail", "25:5025\n")
    names = [f"m{i}" for i in range(1, len(ips) + 1)]
    w.docker.add(*(container(n, ip) for n, ip in zip(names, ips, strict=True)))
    deploy(w, "mail", *names)


# -- storing mappings --------------------------------------------------------------------


def test_set_ports_stores_the_mappings(world: World) -> None:
    store_ports(world, "mail", "25:5025\n53:5053/udp\n")
    assert world.ctx.store.mappings("mail") == (Mapping(25, 5025), Mapping(53, 5053, UDP))


def test_set_ports_reports_every_error_and_keeps_the_stored_mappings(world: World) -> None:
    store_ports(world, "mail", "25:5025\n")
    with pytest.raises(InputError) as err:
        store_ports(world, "mail", "22:5022\nabc:1\n")
    assert [p.split(":")[:2] for p in err.value.problems] == [["PORTS", "1"], ["PORTS", "2"]]
    assert world.ctx.store.mappings("mail") == (Mapping(25, 5025),)


def test_a_port_another_app_stores_or_still_routes_is_refused(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    with pytest.raises(InputError, match="25/tcp"):
        store_ports(world, "other", "25:7000\n")
    store_ports(world, "mail", "26:5025\n")  # mail drops 25 but still routes it
    with pytest.raises(InputError, match="25/tcp"):
        store_ports(world, "other", "25:7000\n")
    world.docker.add(container("m1", "172.17.0.2", published=[5025]))
    engine.apply(world.ctx, "mail")  # now 25 is free
    store_ports(world, "other", "25:7000\n")


def test_a_host_listener_is_refused_unless_it_is_the_proxy_backends_own(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = HostListener(TCP, ip_address("0.0.0.0"), 2525, "exim4 (pid 7)")
    quiet_host(monkeypatch, [listener])
    with pytest.raises(InputError, match=r"exim4 \(pid 7\)"):
        store_ports(world, "mail", "2525:5025\n")
    # The same socket, but it is the proxy daemon's listener for a routed app.
    mail = world.ctx.store
    route = _route("shop", 2525)
    mail.set_applied("shop", Applied("proxy", (route,)))
    mail.set_mappings("shop", (Mapping(2525, 5025),))
    with pytest.raises(InputError, match="shop"):  # a conflict with shop, not a listener
        store_ports(world, "mail", "2525:5025\n")
    problems = engine.claim_checker(world.ctx, "shop")([])
    assert problems == []


def test_port_22_is_refused_by_the_default_policy(world: World) -> None:
    with pytest.raises(InputError, match="22"):
        store_ports(world, "mail", "22:5022\n")


def test_bad_app_names_are_input_errors(world: World) -> None:
    for bad in ("Mail", "-x", "a/b", ""):
        with pytest.raises(InputError, match="not a valid app name"):
            engine.set_ports(world.ctx, bad, b"25:5025\n", "PORTS")


def test_check_file_reports_grammar_errors(world: World) -> None:
    assert len(engine.check_file(b"25:5025\n", "P").mappings) == 1
    with pytest.raises(InputError, match=r"^P:1:"):
        engine.check_file(b"70000:1\n", "P")


# -- applying one app -------------------------------------------------------------------


def test_apply_routes_to_the_containers_dokku_names(world: World) -> None:
    mail_world(world, "172.17.0.2", "172.17.0.3")
    report = engine.apply(world.ctx, "mail")
    assert report.applied == ("mail",)
    assert world.nft.ports() == {25: ["172.17.0.2", "172.17.0.3"]}
    assert applied_ports(world, "mail") == {25: ["172.17.0.2", "172.17.0.3"]}
    assert world.ctx.store.applied("mail").backend == "nftables"  # type: ignore[union-attr]


def test_a_deploy_moves_new_flows_to_the_new_containers(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.docker.add(container("m9", "172.17.0.9", image="img2"))
    deploy(world, "mail", "m9")
    engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.9"]}
    assert applied_ports(world, "mail") == {25: ["172.17.0.9"]}


def test_without_dokku_files_the_newest_release_of_labelled_containers_serves(
    world: World,
) -> None:
    store_ports(world, "mail", "25:5025\n")
    world.docker.add(
        container("old", "172.17.0.2", image="v1", created="2026-01-01T00:00:00Z"),
        container("new", "172.17.0.3", image="v2", created="2026-01-02T00:00:00Z"),
        container("run", "172.17.0.4", image="v2", container_type="run"),
    )
    engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.3"]}


def test_explicit_containers_override_discovery(world: World) -> None:
    mail_world(world, "172.17.0.2")
    world.docker.add(container("pin", "172.17.0.7"))
    engine.apply(world.ctx, "mail", containers=[cid("pin")])
    assert world.nft.ports() == {25: ["172.17.0.7"]}
    with pytest.raises(InputError, match="--container needs --app"):
        engine.apply(world.ctx, None, containers=[cid("pin")])


def test_dry_run_returns_the_batch_and_changes_nothing(world: World) -> None:
    mail_world(world, "172.17.0.2")
    report = engine.apply(world.ctx, "mail", dry_run=True)
    assert "172.17.0.2" in report.batch
    assert world.nft.runs == 0
    assert world.ctx.store.applied("mail") is None
    report = engine.apply(world.ctx, dry_run=True)
    assert "172.17.0.2" in report.batch and world.nft.runs == 0


def test_an_app_without_mappings_routes_nothing_and_runs_no_batch(world: World) -> None:
    report = engine.apply(world.ctx, "ghost")
    assert report == engine.ApplyReport("", (), {})
    assert world.nft.runs == 0


def test_a_container_that_does_not_publish_the_port_is_refused(world: World) -> None:
    store_ports(world, "mail", "25:5025\n")
    world.docker.add(container("m1", "172.17.0.2", published=[]))
    deploy(world, "mail", "m1")
    with pytest.raises(AppProblem, match="does not publish 5025/tcp"):
        engine.apply(world.ctx, "mail")
    assert world.nft.runs == 0


def test_the_state_is_widened_before_the_batch_and_narrowed_after(world: World) -> None:
    store_ports(world, "mail", "25:5025\n26:5026\n")
    world.docker.add(container("m1", "172.17.0.2", published=[5025, 5026]))
    deploy(world, "mail", "m1")
    engine.apply(world.ctx, "mail")
    store_ports(world, "mail", "26:5026\n27:5027\n")
    world.docker.add(container("m1", "172.17.0.2", published=[5025, 5026, 5027]))
    during: list[dict[int, list[str]]] = []
    world.nft.on_run = lambda _: during.append(applied_ports(world, "mail"))
    engine.apply(world.ctx, "mail")
    assert sorted(during[0]) == [25, 26, 27]  # previous + desired while the kernel changes
    assert sorted(applied_ports(world, "mail")) == [26, 27]
    assert sorted(world.nft.ports()) == [26, 27]


def test_a_failing_batch_leaves_the_kernel_as_it_was_and_the_state_covering_it(
    world: World,
) -> None:
    store_ports(world, "mail", "25:5025\n")
    world.docker.add(container("m1", "172.17.0.2", published=[5025, 5026]))
    deploy(world, "mail", "m1")
    engine.apply(world.ctx, "mail")
    store_ports(world, "mail", "26:5026\n")
    world.nft.fail_next()
    with pytest.raises(NatportsError, match="injected"):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.2"]}  # all or nothing
    # The state may claim more than the kernel holds, never less.
    assert set(world.nft.ports()) <= set(applied_ports(world, "mail"))
    engine.apply(world.ctx, "mail")  # the next apply completes the change
    assert world.nft.ports() == {26: ["172.17.0.2"]}
    assert applied_ports(world, "mail") == {26: ["172.17.0.2"]}


def test_a_crash_after_the_kernel_changed_never_forgets_a_rule(world: World) -> None:
    store_ports(world, "mail", "25:5025\n")
    world.docker.add(container("m1", "172.17.0.2", published=[5025, 5026]))
    deploy(world, "mail", "m1")
    engine.apply(world.ctx, "mail")
    store_ports(world, "mail", "26:5026\n")
    world.nft.crash_after_next()
    with pytest.raises(Crash):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {26: ["172.17.0.2"]}
    assert set(world.nft.ports()) <= set(applied_ports(world, "mail"))  # 25 is over-claimed
    store_ports(world, "mail", "27:5026\n")  # the next deploy moves on
    engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {27: ["172.17.0.2"]}  # 26 removed although never "applied"
    assert applied_ports(world, "mail") == {27: ["172.17.0.2"]}


def test_a_crash_in_the_middle_of_a_switch_is_completed_by_the_next_apply(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    world.ipt.crash_after_next()
    with pytest.raises(Crash):
        engine.apply(world.ctx, "mail")
    assert world.ipt.ports() == world.nft.ports() == {25: ["172.17.0.2"]}  # both serve
    engine.apply(world.ctx, "mail")
    assert world.ipt.ports() == {25: ["172.17.0.2"]} and world.nft.ports() == {}
    assert world.ctx.store.applied("mail").backend == "iptables"  # type: ignore[union-attr]
    assert world.ctx.store.leftover_apps() == []


def test_a_crash_right_after_the_new_backend_took_a_moving_app_forgets_nothing(
    world: World,
) -> None:
    store_ports(world, "mail", "25:5025\n")
    world.docker.add(container("m1", "172.17.0.2", published=[5025, 5026]))
    deploy(world, "mail", "m1")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    world.ipt.crash_after_next()
    with pytest.raises(Crash):
        engine.apply(world.ctx, "mail")
    store_ports(world, "mail", "26:5026\n")
    engine.apply(world.ctx, "mail")
    assert world.ipt.ports() == {26: ["172.17.0.2"]}


def test_a_crash_before_the_old_backend_let_go_is_retried(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    world.nft.crash_after_next()
    with pytest.raises(Crash):
        engine.apply(world.ctx, "mail")  # iptables serves, nft let go, then the crash
    assert world.nft.ports() == {}
    assert world.ctx.store.leftover_apps() == ["mail"]
    engine.apply(world.ctx, "mail")
    assert world.ctx.store.leftover_apps() == []
    assert world.ipt.ports() == {25: ["172.17.0.2"]}


def test_a_broken_app_keeps_only_routes_to_containers_that_still_serve(world: World) -> None:
    mail_world(world, "172.17.0.2", "172.17.0.3")
    engine.apply(world.ctx, "mail")
    world.docker.stop("m2")  # its address may go to another container: fail closed
    with pytest.raises(AppProblem, match="m2 is not running"):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    assert applied_ports(world, "mail") == {25: ["172.17.0.2"]}
    world.docker.remove("m1")
    with pytest.raises(AppProblem, match="does not exist"):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {}
    assert world.ctx.store.applied("mail") is None


def test_a_container_reused_by_another_app_is_not_kept(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    # Same id still running, but the address now belongs to nobody of this app.
    world.docker.add(container("m1", "172.17.0.99"))
    dokku_files(world.ctx.dokku_root, "mail", web=[container("nothere", "172.17.0.6")])
    with pytest.raises(AppProblem):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {}


# -- applying every app -------------------------------------------------------------------


def test_apply_all_routes_every_app_and_names_the_broken_ones(world: World) -> None:
    mail_world(world, "172.17.0.2")
    store_ports(world, "dns", "53:5053/udp\n")
    world.docker.add(container("d1", "172.17.0.4", app="dns", published=[(5053, UDP)]))
    deploy(world, "dns", "d1")
    store_ports(world, "shop", "8080:5000\n")  # no container at all
    report = engine.apply(world.ctx)
    assert report.applied == ("dns", "mail")
    assert list(report.failed) == ["shop"]
    assert "no running container" in report.failed["shop"]
    assert world.nft.ports() == {25: ["172.17.0.2"], 53: ["172.17.0.4"]}


def test_apply_all_removes_routes_no_app_wants(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx)
    engine.remove_ports(world.ctx, "mail")
    world.ctx.store.set_applied("mail", Applied("nftables", (_route("mail", 25),)))  # stale
    report = engine.apply(world.ctx)
    assert report.batch == "flush\n"  # nothing to route: no table either
    assert world.nft.ports() == {}
    assert world.ctx.store.applied_apps() == []


def test_a_failing_full_apply_leaves_every_app_as_it_was(world: World) -> None:
    mail_world(world, "172.17.0.2")
    store_ports(world, "shop", "8080:5000\n")
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    engine.apply(world.ctx)
    before = dict(world.nft.held)
    world.docker.add(
        container("m2", "172.17.0.3"), container("s2", "172.17.0.9", app="shop", published=[5000])
    )
    deploy(world, "mail", "m2")
    deploy(world, "shop", "s2")
    world.nft.fail_next()
    with pytest.raises(NatportsError):
        engine.apply(world.ctx)
    assert world.nft.held == before
    for app in ("mail", "shop"):  # each app's state still names every port the kernel holds
        assert set(world.nft.ports(app)) <= set(applied_ports(world, app))
    engine.apply(world.ctx)
    assert world.nft.ports() == {25: ["172.17.0.3"], 8080: ["172.17.0.9"]}


def test_after_a_failed_batch_the_death_of_a_backend_the_kernel_holds_is_withdrawn(
    world: World,
) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.docker.add(container("m2", "172.17.0.3"))
    deploy(world, "mail", "m2")
    world.nft.fail_next()
    with pytest.raises(NatportsError):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    world.docker.stop("m1")
    engine.withdraw(world.ctx, {cid("m1")})  # the agent saw m1 die; Docker not asked
    assert "172.17.0.2" not in world.nft.ports().get(25, [])


def test_a_broken_apps_kept_route_yields_to_a_healthy_app_on_the_same_port(
    world: World,
) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx)
    # mail gives up 25 in its stored mappings, and its container dies; shop takes 25.
    world.ctx.store.set_mappings("mail", (Mapping(26, 5025),))
    world.docker.stop("m1")
    world.ctx.store.set_mappings("shop", (Mapping(25, 5000),))
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    world.docker.add(container("m1", "172.17.0.2"))  # running again, but mail is broken:
    (world.ctx.dokku_root / "mail" / "CONTAINER.web.1").write_text(cid("lost") + "\n")
    report = engine.apply(world.ctx)
    assert "25/tcp: now routed to another app" in report.failed["mail"]
    assert world.nft.held[RouteKey(4, TCP, 25)].app == "shop"


# -- switching backends ------------------------------------------------------------------


def test_a_backend_switch_is_make_before_break(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    seen: list[dict[int, list[str]]] = []
    world.ipt.on_run = lambda _: seen.append(world.nft.ports())
    engine.apply(world.ctx, "mail")
    assert seen == [{25: ["172.17.0.2"]}]  # the old backend still served as the new one came
    assert world.ipt.ports() == {25: ["172.17.0.2"]}
    assert world.nft.ports() == {}
    assert world.ctx.store.applied("mail").backend == "iptables"  # type: ignore[union-attr]
    assert world.ctx.store.leftover_apps() == []


def test_leftovers_of_the_old_backend_are_retried_until_removed(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    world.nft.fail_always = True
    engine.apply(world.ctx, "mail")  # the new backend serves; the old one cannot let go
    assert "could not remove its old nftables routes yet" in capsys.readouterr().err
    assert world.ipt.ports() == {25: ["172.17.0.2"]}
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    assert world.ctx.store.leftover_apps() == ["mail"]
    world.nft.fail_always = False
    store_ports(world, "other", "8080:5000\n")
    world.docker.add(container("o1", "172.17.0.5", app="other", published=[5000]))
    deploy(world, "other", "o1")
    engine.apply(world.ctx, "other")  # any later change retries
    assert world.nft.ports() == {}
    assert world.ctx.store.leftover_apps() == []


def test_a_switch_that_fails_on_the_new_backend_leaves_the_old_one_serving(
    world: World,
) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    world.ipt.fail_next()
    with pytest.raises(NatportsError):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    # The state covers both: iptables may hold the routes (over-claimed), nftables still
    # serves them (a pending leftover, never removed before a batch on iptables succeeds).
    assert world.ctx.store.applied("mail").backend == "iptables"  # type: ignore[union-attr]
    leftover = world.ctx.store.leftover("mail")
    assert leftover is not None and leftover.backend == "nftables" and leftover.pending
    store_ports(world, "shop", "8080:5000\n")
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    world.use("nftables")
    engine.apply(world.ctx, "shop")  # another app's switch must not remove mail's routes
    assert world.nft.ports() == {25: ["172.17.0.2"], 8080: ["172.17.0.8"]}
    world.use("iptables")
    engine.apply(world.ctx, "mail")
    assert world.ipt.ports() == {25: ["172.17.0.2"]}
    assert world.nft.ports() == {8080: ["172.17.0.8"]}  # mail's old routes are gone
    assert world.ctx.store.leftover_apps() == []


def test_apply_all_switches_every_app_and_a_broken_app_stays_where_it_is(
    world: World,
) -> None:
    mail_world(world, "172.17.0.2")
    store_ports(world, "shop", "8080:5000\n")
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    engine.apply(world.ctx)
    world.use("iptables")
    world.docker.remove("s1")  # shop breaks during the switch
    report = engine.apply(world.ctx)
    assert list(report.failed) == ["shop"]
    assert world.ipt.ports() == {25: ["172.17.0.2"]}
    assert world.nft.ports() == {8080: ["172.17.0.8"]}
    assert world.ctx.store.applied("shop").backend == "nftables"  # type: ignore[union-attr]


# -- several apps at once -----------------------------------------------------------------


def test_concurrent_applies_of_different_apps_are_serialised_and_none_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet_host(monkeypatch)
    first = make_context(tmp_path)
    apps = [f"app{i}" for i in range(8)]
    for i, app in enumerate(apps):
        store_ports(first, app, f"{1000 + i}:5000\n")
        first.docker.add(container(app, f"172.17.1.{i + 1}", app=app, published=[5000]))
        deploy(first, app, app)
    # One process per app, sharing the state directory and the kernel.
    worlds = [make_context(tmp_path, docker=first.docker) for _ in apps]
    for w in worlds:
        w.ctx._backends["nftables"] = first.nft
    first.nft.on_run = lambda _: time.sleep(0.002)
    errors: list[BaseException] = []

    def run(w: World, app: str) -> None:
        try:
            engine.apply(w.ctx, app)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w, a)) for w, a in zip(worlds, apps, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(first.nft.ports()) == [1000 + i for i in range(8)]
    assert first.ctx.store.applied_apps() == apps


# -- flush, remove, withdraw, repair --------------------------------------------------------


def test_flush_removes_every_backends_routes_and_keeps_the_mappings(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    world.nft.fail_always = True
    engine.apply(world.ctx, "mail")  # leaves a leftover in nftables
    world.nft.fail_always = False
    assert engine.flush(world.ctx, dry_run=True) == "flush\nflush\n"
    assert world.nft.ports() and world.ipt.ports()
    engine.flush(world.ctx)
    assert world.nft.ports() == {} and world.ipt.ports() == {}
    assert world.ctx.store.applied_apps() == []
    assert world.ctx.store.leftover_apps() == []
    assert world.ctx.store.mappings("mail") == (Mapping(25, 5025),)
    engine.apply(world.ctx)
    assert world.ipt.ports() == {25: ["172.17.0.2"]}


def test_flush_of_one_app_leaves_the_others(world: World) -> None:
    mail_world(world, "172.17.0.2")
    store_ports(world, "shop", "8080:5000\n")
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    engine.apply(world.ctx)
    assert "del mail" in engine.flush(world.ctx, "mail", dry_run=True)
    assert sorted(world.nft.ports()) == [25, 8080]
    engine.flush(world.ctx, "mail")
    assert world.nft.ports() == {8080: ["172.17.0.8"]}
    assert engine.flush(world.ctx, "mail") == ""  # nothing left to remove
    assert world.ctx.store.mappings("mail") is not None


def test_remove_ports_removes_the_rules_then_the_mappings(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.nft.fail_next()
    with pytest.raises(NatportsError):
        engine.remove_ports(world.ctx, "mail")
    assert world.ctx.store.mappings("mail") is not None  # rules first: nothing forgotten
    assert engine.remove_ports(world.ctx, "mail") is True
    assert world.nft.ports() == {} and world.ctx.store.mappings("mail") is None
    assert engine.remove_ports(world.ctx, "mail") is False


def test_withdraw_removes_only_the_dead_containers_backends(world: World) -> None:
    mail_world(world, "172.17.0.2", "172.17.0.3")
    engine.apply(world.ctx, "mail")
    assert engine.withdraw(world.ctx, {cid("m2")}) == ["mail"]
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    assert engine.withdraw(world.ctx, {cid("nobody")}) == []
    assert engine.withdraw(world.ctx, {cid("m1")}) == ["mail"]
    assert world.nft.ports() == {} and world.ctx.store.applied("mail") is None


def test_repair_puts_back_what_a_ruleset_flush_removed(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    assert engine.repair(world.ctx) == []
    world.nft.flush_ruleset()
    assert engine.repair(world.ctx) == ["nftables"]
    assert world.nft.ports() == {25: ["172.17.0.2"]}


# -- UDP flows --------------------------------------------------------------------------


def dns_world(w: World) -> None:
    store_ports(w, "dns", "53:5053/udp\n")
    w.docker.add(container("d1", "172.17.0.4", app="dns", published=[(5053, UDP)]))
    deploy(w, "dns", "d1")


def test_a_new_udp_route_forgets_flows_that_would_keep_clients_away(world: World) -> None:
    dns_world(world)
    pinned_to_host = udp_flow("203.0.113.9", str(HOST), 53, str(HOST), 53)
    elsewhere = udp_flow("203.0.113.8", str(HOST), 53, "172.17.0.66", 5053)
    other_port = udp_flow("203.0.113.7", str(HOST), 54, str(HOST), 54)
    world.conntrack.table = [pinned_to_host, elsewhere, other_port]
    engine.apply(world.ctx, "dns")
    assert sorted(world.conntrack.deleted, key=str) == sorted([pinned_to_host, elsewhere], key=str)


def test_flows_of_a_replaced_udp_backend_stay_while_it_lives_and_go_when_it_dies(
    world: World,
) -> None:
    dns_world(world)
    engine.apply(world.ctx, "dns")
    old = udp_flow("203.0.113.9", str(HOST), 53, "172.17.0.4", 5053)
    world.conntrack.table = [old]
    world.docker.add(container("d2", "172.17.0.5", app="dns", published=[(5053, UDP)]))
    deploy(world, "dns", "d2")
    engine.apply(world.ctx, "dns")
    assert world.conntrack.deleted == []  # d1 still runs: its flows end where they started
    assert world.ctx.store.retired_udp() == (Backend(cid("d1"), ip_address("172.17.0.4"), 5053),)
    assert engine.forget_dead_udp(world.ctx, lambda c: False) == []
    world.docker.add(container("d3", "172.17.0.6", app="dns", published=[(5053, UDP)]))
    deploy(world, "dns", "d3")
    engine.apply(world.ctx, "dns")  # d2 retires too, and keeps running
    assert [b.container_id for b in world.ctx.store.retired_udp()] == [cid("d1"), cid("d2")]
    world.docker.stop("d1")
    assert engine.container_gone(world.ctx, cid("d1"))
    assert engine.container_gone(world.ctx, cid("never"))
    assert not engine.container_gone(world.ctx, cid("d3"))
    forgotten = engine.forget_dead_udp(world.ctx, lambda c: engine.container_gone(world.ctx, c))
    assert [b.container_id for b in forgotten] == [cid("d1")]
    assert world.conntrack.deleted == [old]
    assert [b.container_id for b in world.ctx.store.retired_udp()] == [cid("d2")]


def test_docker_away_during_the_udp_follow_up_is_a_warning_not_a_failed_flush(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dns_world(world)
    engine.apply(world.ctx, "dns")
    world.docker.down = True
    engine.flush(world.ctx, "dns")  # d1 is now retired; is it gone? Docker cannot say
    assert world.nft.ports() == {}
    assert "UDP flows not cleaned: cannot reach Docker" in capsys.readouterr().err
    assert [b.container_id for b in world.ctx.store.retired_udp()] == [cid("d1")]


def test_a_conntrack_failure_is_a_warning_not_a_failed_apply(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dns_world(world)
    world.conntrack.broken = True
    engine.apply(world.ctx, "dns")
    assert world.nft.ports() == {53: ["172.17.0.4"]}
    assert "UDP flows not cleaned" in capsys.readouterr().err
    engine.withdraw(world.ctx, {cid("d1")})
    assert "UDP flows not cleaned" in capsys.readouterr().err


# -- status ------------------------------------------------------------------------------


def test_status_follows_the_documented_schema(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    route = world.ctx.store.applied("mail").routes[0]  # type: ignore[union-attr]
    world.nft.counts[world.nft.route_id(route)] = (12, 720)
    flow = udp_flow("203.0.113.9", str(HOST), 25, "172.17.0.2", 5025)
    world.conntrack.table = [
        flow.__class__(**{**flow.__dict__, "protocol": TCP, "tcp_state": "ESTABLISHED"})
    ]
    [row] = engine.status(world.ctx)
    assert row == {
        "app": "mail",
        "process_type": "web",
        "protocol": "tcp",
        "family": 4,
        "public_ip": None,
        "public_port": 25,
        "private_port": 5025,
        "public_port_end": 25,
        "private_port_end": 5025,
        "backends": [{"container_id": cid("m1"), "ip": "172.17.0.2", "port": 5025}],
        "backend": "nftables",
        "packets": 12,
        "bytes": 720,
        "flows": [{"ip": "172.17.0.2", "port": 5025, "tcp_established": 1, "udp": 0}],
        "proxy": None,  # what the proxy daemon counts, for routes it serves
    }


def test_status_reads_each_routes_counters_from_the_backend_that_serves_it(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.use("iptables")
    store_ports(world, "shop", "8080:5000\n")
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    engine.apply(world.ctx, "shop")  # mail stays on nftables until it is applied again
    for fake, app in ((world.nft, "mail"), (world.ipt, "shop")):
        [route] = world.ctx.store.applied(app).routes  # type: ignore[union-attr]
        fake.counts[fake.route_id(route)] = (len(app), 100)
    rows = {r["app"]: r for r in engine.status(world.ctx)}
    assert (rows["mail"]["backend"], rows["mail"]["packets"]) == ("nftables", 4)
    assert (rows["shop"]["backend"], rows["shop"]["packets"]) == ("iptables", 4)
    assert world.nft.ports() == {25: ["172.17.0.2"]}


def test_status_says_null_when_the_kernel_cannot_be_read(world: World) -> None:
    mail_world(world, "172.17.0.2")
    engine.apply(world.ctx, "mail")
    world.nft.counters_fail = True
    world.conntrack.broken = True
    [row] = engine.status(world.ctx)
    assert (row["packets"], row["bytes"], row["flows"]) == (None, None, None)


def test_status_of_a_proxied_app_has_no_kernel_flows(world: World) -> None:
    world.ctx.store.set_applied("shop", Applied("proxy", (_route("shop", 8080),)))
    [row] = engine.status(world.ctx)
    assert row["backend"] == "proxy" and row["flows"] is None


def test_status_of_a_proxied_app_shows_what_the_real_proxy_backend_counts(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's client loads only for proxied routes (natports.status): its counts
    still reach the row. The daemon's `status` document is given, not asked for."""
    from natports.backends.proxy import ProxyBackend

    proxy = ProxyBackend(world.ctx.store.root)
    route = _route("shop", 8080)
    doc = {"routes": [{"id": proxy.route_id(route), "active": 2, "connections": 9, "bytes": 70}]}
    monkeypatch.setattr(proxy, "status", lambda: doc)
    world.ctx._backends["proxy"] = proxy
    world.ctx.store.set_applied("shop", Applied("proxy", (route,)))
    [row] = engine.status(world.ctx)
    assert (row["packets"], row["bytes"], row["flows"]) == (9, 70, None)
    assert row["proxy"] == {"open_connections": 2, "udp_flows": 0, "refused": {}}


def test_a_corrupt_state_file_is_reported_as_such(world: World) -> None:
    (world.ctx.store.root / "applied").mkdir(parents=True)
    (world.ctx.store.root / "applied" / "mail.json").write_text('{"version": 1}')
    with pytest.raises(NatportsError, match="corrupt"):
        engine.status(world.ctx)


def test_the_context_resolves_auto_and_builds_real_backends_lazily(tmp_path: Path) -> None:
    from natports.store import Store

    ctx = engine.Context(Store(tmp_path), tmp_path, tmp_path / "c.toml", "natports_test", "auto")
    ctx._resolved = "nftables"
    assert ctx.backend.name == "nftables"
    assert ctx.backend is ctx.backend_named("nftables")  # made once
    ctx._docker = FakeDocker()  # type: ignore[assignment]
    ctx.forget_docker()
    assert ctx._docker is None


def _route(app: str, port: int) -> Route:
    from tests.unit.routes import route

    return route(app, RouteKey(4, TCP, port), 5000, "172.17.0.8")


def test_a_kernel_backend_refuses_proxy_protocol_and_other_apps_go_on(world: World) -> None:
    """Only the proxy can send a PROXY protocol header: on nftables the app is refused
    (exit 2 for it alone), nothing of it reaches the kernel, and other apps are routed."""
    store_ports(world, "mail", "25:5025 proxy-protocol\n")
    world.docker.add(container("m1", "172.17.0.2", app="mail", published=[5025]))
    deploy(world, "mail", "m1")
    with pytest.raises(InputError, match="asks for proxy-protocol, which only the proxy"):
        engine.apply(world.ctx, "mail")
    assert world.nft.ports() == {}
    store_ports(world, "shop", "8080:5000\n")
    world.docker.add(container("s1", "172.17.0.8", app="shop", published=[5000]))
    deploy(world, "shop", "s1")
    report = engine.apply(world.ctx)
    assert "proxy-protocol" in report.failed["mail"]
    assert world.nft.ports() == {8080: ["172.17.0.8"]}
