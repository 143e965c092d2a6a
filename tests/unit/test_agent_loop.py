"""The agent's loop and steps over fakes: Docker's events in, the fake kernel out.

A scripted event stream stands in for Docker's (`Agent._follow_docker`); intervals are
shortened so a whole story (resync, a death, a deploy, a flushed ruleset, Docker going
away) plays in well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from natports import agent as agent_module
from natports import engine
from natports.agent import Agent, Watched, agent_state
from natports.containers import LABEL_APP
from natports.policy import HostListener
from natports.store import Applied
from tests.unit.fakes import (
    World,
    cid,
    container,
    dokku_files,
    make_context,
    quiet_host,
)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    quiet_host(monkeypatch)
    monkeypatch.setattr(agent_module, "host_listeners", lambda: [])
    w = make_context(tmp_path)
    # Docker "going away" must never make the agent reach for a real dockerd.
    monkeypatch.setattr(w.ctx, "docker", lambda: w.docker)
    engine.set_ports(w.ctx, "mail", b"25:5025\n", "PORTS")
    w.docker.add(container("m1", "172.17.0.2"), container("m2", "172.17.0.3"))
    dokku_files(w.ctx.dokku_root, "mail", web=[w.docker.inspect("m1"), w.docker.inspect("m2")])
    engine.apply(w.ctx, "mail")
    return w


def event(action: str, name: str, app: str | None = "mail") -> dict[str, Any]:
    attributes = {LABEL_APP: app} if app else {}
    return {
        "Type": "container",
        "Action": action,
        "Actor": {"ID": cid(name), "Attributes": attributes},
    }


def quiet(messages: list[str]) -> Callable[[str], None]:
    return messages.append


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "TICK", 0.01)
    monkeypatch.setattr(agent_module, "DRIFT_EVERY", 0.02)
    monkeypatch.setattr(agent_module, "HEARTBEAT_EVERY", 0.02)


def wait_for(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the agent did not get there in time")
        time.sleep(0.01)


def test_the_loop_follows_docker_and_the_kernel(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: None
) -> None:
    log: list[str] = []
    metrics = tmp_path / "metrics.prom"
    agent = Agent(world.ctx, resync_every=60, metrics_file=metrics, log=quiet(log))

    failures: list[BaseException] = []

    def script(self: Agent) -> None:
        try:
            self.events.put(("up", None))
            wait_for(lambda: self.counters.resyncs == 1)
            world.docker.stop("m2")
            self.events.put(("event", event("die", "m2")))
            wait_for(lambda: world.nft.ports() == {25: ["172.17.0.2"]})
            world.docker.add(container("m3", "172.17.0.4", image="img2"))
            m1, m3 = world.docker.inspect("m1"), world.docker.inspect("m3")
            dokku_files(world.ctx.dokku_root, "mail", web=[m1, m3])
            self.events.put(("event", event("start", "m3")))
            self.events.put(("event", {"Type": "image", "Action": "pull"}))
            wait_for(lambda: world.nft.ports() == {25: ["172.17.0.2", "172.17.0.4"]})
            world.nft.flush_ruleset()
            wait_for(lambda: self.counters.repairs == 1)
            self.events.put(("down", None))
            wait_for(lambda: not self.docker_up)
            root = world.ctx.store.root
            wait_for(lambda: (agent_state(root) or {}).get("docker") == "down")
        except BaseException as exc:
            failures.append(exc)
        finally:
            self.stop()

    monkeypatch.setattr(Agent, "_follow_docker", script)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.run(max_seconds=10)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert failures == []
    assert world.nft.ports() == {25: ["172.17.0.2", "172.17.0.4"]}
    assert agent.counters.withdrawals == 1 and agent.counters.repairs == 1
    assert "Docker answers: routing every app anew" in log
    assert "Docker's event stream ended: watching backends in /proc" in log
    assert any(line.startswith("withdrew dead container(s)") for line in log)
    assert "natports' rules were gone from nftables: put back" in log
    beat = json.loads((world.ctx.store.root / "agent.json").read_text())
    assert beat["pid"] == os.getpid() and beat["withdrawals"] == 1
    assert "natports_agent_withdrawals_total 1" in metrics.read_text()


def test_a_failing_step_is_counted_and_logged_and_the_agent_carries_on(world: World) -> None:
    log: list[str] = []
    agent = Agent(world.ctx, log=quiet(log))
    world.docker.down = True
    agent.reroute("mail")
    assert agent.counters.errors == 1 and "cannot reach Docker" in log[-1]
    world.nft.fail_next()
    agent.repair()  # intact: nothing to run
    assert agent.counters.errors == 1


def test_a_failing_withdraw_is_counted_and_the_agent_carries_on(world: World) -> None:
    log: list[str] = []
    agent = Agent(world.ctx, log=quiet(log))
    agent.watched[cid("m2")] = Watched(1, 1)
    world.nft.fail_next()
    agent.withdraw({cid("m2")})
    assert agent.counters.errors == 1
    assert log == ["withdraw failed: nftables failed: injected failure"]
    assert cid("m2") in agent.watched  # still watched: the next tick tries again
    agent.withdraw({cid("m2")})
    assert cid("m2") not in agent.watched
    assert agent.counters.withdrawals == 1


def test_a_failing_drift_check_is_counted_and_the_agent_carries_on(world: World) -> None:
    log: list[str] = []
    agent = Agent(world.ctx, log=quiet(log))
    world.nft.flush_ruleset()
    world.nft.fail_next()
    agent.repair()
    assert agent.counters.errors == 1 and agent.counters.repairs == 0
    agent.repair()
    assert agent.counters.repairs == 1


def test_reroute_and_resync_keep_a_broken_apps_routes_and_say_so(world: World) -> None:
    log: list[str] = []
    agent = Agent(world.ctx, log=quiet(log))
    world.docker.remove("m2")
    agent.reroute("mail")
    assert log[-1].startswith("mail: kept its previous routes to live containers:")
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    agent.resync()
    assert log[-1].startswith("mail: kept its previous routes to live containers:")
    assert agent.counters.resyncs == 1


def test_a_listener_on_a_routed_port_is_reported_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    exim = HostListener(
        world.nft.held[next(iter(world.nft.held))].key.protocol,
        ip_address("0.0.0.0"),
        25,
        "exim4 (pid 7)",
    )
    monkeypatch.setattr(agent_module, "host_listeners", lambda: [exim])
    log: list[str] = []
    agent = Agent(world.ctx, log=quiet(log))
    agent.report_listeners()
    agent.report_listeners()
    assert len([line for line in log if "exim4 (pid 7)" in line]) == 1


def test_events_without_an_app_label_find_the_app_by_its_backends(world: World) -> None:
    agent = Agent(world.ctx, log=lambda _: None)
    network = {
        "Type": "network",
        "Action": "disconnect",
        "Actor": {"Attributes": {"container": cid("m1")}},
    }
    change = agent_module.classify(network)
    assert change is not None and change.withdraw
    assert agent._apps_of(change) == {"mail"}
    stranger = agent_module.classify(event("start", "x", app="other"))
    assert stranger is not None and agent._apps_of(stranger) == set()


def test_inspected_containers_are_watched_by_pid(world: World) -> None:
    agent = Agent(world.ctx, log=lambda _: None)
    world.ctx.inspected = {
        cid("m1"): container("m1", "172.17.0.2", pid=os.getpid()),
        cid("m2"): container("m2", "172.17.0.3", running=False),
    }
    agent.watched[cid("m2")] = agent_module.Watched(1, 1)
    agent._watch_inspected()
    assert list(agent.watched) == [cid("m1")]
    assert agent._dead_in_proc() == set()


def test_process_start_time_reads_field_22(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    fields = " ".join(str(n) for n in range(3, 23))  # fields 3..22 after "7 (comm)"
    (tmp_path / "7" / "stat").write_text(f"7 (a (tricky) name) {fields}\n")
    assert agent_module.process_start_time(7, tmp_path) == 22
    (tmp_path / "7" / "stat").write_text("7 (short) S 1\n")
    assert agent_module.process_start_time(7, tmp_path) is None
    assert agent_module.process_start_time(8, tmp_path) is None


def test_agent_state_needs_a_fresh_heartbeat_of_a_live_process(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    assert agent_state(tmp_path) is None
    path.write_text("[]")
    assert agent_state(tmp_path) is None
    path.write_text(json.dumps({"pid": 999999999, "heartbeat": time.time()}))
    assert agent_state(tmp_path) is None
    path.write_text(json.dumps({"pid": os.getpid(), "heartbeat": time.time()}))
    assert agent_state(tmp_path) is not None


class FakeSdk:
    """docker.from_env's client: a ping, then an event stream that ends."""

    def __init__(self, agent: Agent, events: list[dict[str, Any]]) -> None:
        self.agent = agent
        self.stream = events

        class Api:
            def events(self_inner, **_: Any) -> Iterator[dict[str, Any]]:
                yield from self.stream

        self.api = Api()

    def ping(self) -> bool:
        return True


def test_docker_events_feed_the_queue_and_an_end_means_down(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import docker

    agent = Agent(world.ctx, log=lambda _: None)
    calls: list[int] = []

    def from_env(**_: Any) -> FakeSdk:
        calls.append(1)
        if len(calls) > 1:
            agent.stop()
            raise docker.errors.DockerException("connection refused")
        return FakeSdk(agent, [event("die", "m2")])

    monkeypatch.setattr(docker, "from_env", from_env)
    agent._follow_docker()
    items = agent._next_items(0.1)
    assert [kind for kind, _ in items] == ["up", "event", "down", "down"]
    assert agent._next_items(0.01) == []


def test_messages_are_stamped_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    agent_module._say("hello")
    err = capsys.readouterr().err
    assert err.endswith(" natports: hello\n") and err[2] == ":"


def test_withdraw_of_an_app_served_by_another_backend_uses_that_backend(world: World) -> None:
    record = world.ctx.store.applied("mail")
    assert record is not None
    world.ctx.store.set_applied("mail", Applied("iptables", record.routes))
    world.ipt.held = dict(world.nft.held)
    engine.withdraw(world.ctx, {cid("m1")})
    assert world.ipt.ports() == {25: ["172.17.0.3"]}
