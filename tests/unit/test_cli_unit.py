"""The CLI contract over fakes: messages, exit codes (0 ok, 1 runtime, 2 input), --json.

Every command runs through click's CliRunner against the fake backend and Docker
(`fakes.patch_cli`), so the words people read are checked without root.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from natports.cli import main
from natports.probes import Check
from tests.unit.fakes import (
    World,
    cid,
    cli_args,
    container,
    dokku_files,
    make_context,
    patch_cli,
    quiet_host,
)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    quiet_host(monkeypatch)
    monkeypatch.delenv("NATPORTS_BACKEND", raising=False)
    w = make_context(tmp_path)
    patch_cli(monkeypatch, w)
    return w


class Run:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, stdin: str | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(main, [*cli_args(self.root), *args], input=stdin)


@pytest.fixture
def run(tmp_path: Path, world: World) -> Run:
    return Run(tmp_path)


def mail(world: World, *ips: str) -> None:
    found = [container(f"m{i}", ip) for i, ip in enumerate(ips, start=1)]
    world.docker.add(*found)
    dokku_files(world.ctx.dokku_root, "mail", web=found)


def test_check_accepts_a_good_file_and_names_each_bad_line(run: Run, tmp_path: Path) -> None:
    good = tmp_path / "PORTS"
    good.write_text("25:5025\n587:5587\n")
    result = run("check", str(good))
    assert (result.exit_code, result.output) == (0, f"{good}: ok, 2 mapping(s)\n")
    result = run("check", "-", stdin="25:70000\nabc:1\n")
    assert result.exit_code == 2
    assert result.output.splitlines()[0].startswith("<stdin>:1:")
    assert result.output.splitlines()[1].startswith("<stdin>:2:1:")
    result = run("check", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "cannot read" in result.output


def test_ports_set_show_rm(run: Run, world: World) -> None:
    result = run("ports", "set", "mail", stdin="25:5025\nworker: 53:5053/udp\n")
    assert (result.exit_code, result.output) == (0, "mail: stored 2 mapping(s)\n")
    result = run("ports", "show", "mail")
    assert result.output == "25:5025/tcp\nworker: 53:5053/udp\n"
    shown = json.loads(run("ports", "show", "mail", "--json").output)
    assert [m["public_port"] for m in shown] == [25, 53]
    result = run("ports", "set", "other", stdin="25:6000\n")
    assert result.exit_code == 2 and "PORTS:1:1:" in result.output and "mail" in result.output
    assert run("ports", "rm", "mail").output == "mail: removed\n"
    assert run("ports", "rm", "mail").output == "mail: had no stored mappings\n"
    result = run("ports", "show", "mail")
    assert result.exit_code == 2 and 'app "mail" has no stored mappings' in result.output
    assert run("ports", "show", "Bad_Name").exit_code == 2


def test_apply_routes_and_reports(run: Run, world: World) -> None:
    run("ports", "set", "mail", stdin="25:5025\n")
    mail(world, "172.17.0.2")
    dry = run("apply", "--dry-run")
    assert dry.exit_code == 0 and "172.17.0.2" in dry.output and world.nft.runs == 0
    result = run("apply", "--app", "mail")
    assert (result.exit_code, result.output) == (0, "mail: routed\n")
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    result = run("apply", "--app", "ghost")
    assert result.output == "ghost: no mappings, nothing to route\n"


def test_apply_exits_1_and_names_an_app_that_kept_its_routes(run: Run, world: World) -> None:
    run("ports", "set", "mail", stdin="25:5025\n")
    run("ports", "set", "shop", stdin="8080:5000\n")
    mail(world, "172.17.0.2")
    result = run("apply")
    assert result.exit_code == 1
    assert "mail: routed" in result.stdout
    assert 'natports: shop: kept its previous routes: app "shop": no running container' in (
        result.stderr
    )


def test_runtime_failures_exit_1_with_a_hint(run: Run, world: World) -> None:
    run("ports", "set", "mail", stdin="25:5025\n")
    mail(world, "172.17.0.2")
    world.nft.fail_next()
    result = run("apply", "--app", "mail")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "natports: nftables failed: injected failure",
        "hint: nothing changed",
    ]
    world.docker.down = True
    result = run("apply", "--app", "mail")
    assert result.exit_code == 1 and "cannot reach Docker" in result.stderr


def test_container_needs_app(run: Run, world: World) -> None:
    result = run("apply", "--container", cid("m1"))
    assert result.exit_code == 2 and "--container needs --app" in result.output


def test_flush(run: Run, world: World) -> None:
    run("ports", "set", "mail", stdin="25:5025\n")
    mail(world, "172.17.0.2")
    run("apply")
    assert run("flush", "--dry-run").output == "flush\n"
    assert world.nft.ports()
    result = run("flush", "--app", "mail")
    assert (result.exit_code, world.nft.ports()) == (0, {})
    run("apply")
    assert run("flush").exit_code == 0 and world.nft.ports() == {}


def test_status_table_json_and_agent_line(run: Run, world: World) -> None:
    result = run("status")
    assert result.output.splitlines()[0] == "no routes"
    assert "agent: not running" in result.output
    run("ports", "set", "mail", stdin="25:5025\n")
    mail(world, "172.17.0.2", "172.17.0.3")
    run("apply")
    lines = run("status").output.splitlines()
    assert lines[0].split() == [
        "APP",
        "PROCESS",
        "PUBLIC",
        "PRIVATE",
        "BACKENDS",
        "PACKETS",
        "BYTES",
        "FLOWS",
    ]
    assert lines[1].split()[:4] == ["mail", "web", "*:25/tcp", "5025"]
    assert f"{cid('m1')[:12]}@172.17.0.2" in lines[1]
    [row] = json.loads(run("status", "--json").output)
    assert row["public_port"] == 25 and row["backend"] == "nftables"


def test_status_warns_of_a_host_listener_and_shows_a_proxied_route(
    run: Run, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipaddress import ip_address

    from natports.model import Protocol, RouteKey
    from natports.policy import HostListener
    from natports.store import Applied
    from tests.unit.routes import route

    run("ports", "set", "mail", stdin="25:5025\n")
    mail(world, "172.17.0.2")
    run("apply")
    shop = route("shop", RouteKey(4, Protocol.TCP, 8080), 5000, "172.17.0.8")
    world.ctx.store.set_applied("shop", Applied("proxy", (shop,)))
    exim = HostListener(Protocol.TCP, ip_address("0.0.0.0"), 25, "exim4 (pid 7)")
    monkeypatch.setattr("natports.listeners.host_listeners", lambda *a: [exim])
    lines = run("status").output.splitlines()
    proxied = next(line for line in lines if line.startswith("shop"))
    assert proxied.split()[-3:] == ["-", "-", "-"]  # no kernel counters or flows
    assert lines[-1].startswith('warning: port 25/tcp is routed to app "mail", but exim4')


def test_status_shows_a_live_agent(run: Run, world: World, tmp_path: Path) -> None:
    import os
    import time

    beat = {"version": 1, "pid": os.getpid(), "heartbeat": time.time(), "docker": "up"}
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "agent.json").write_text(json.dumps(beat))
    assert f"agent: running (pid {os.getpid()}, Docker up)" in run("status").output
    metrics = run("metrics").output
    assert "natports_agent_up 1" in metrics and "natports_agent_docker_up 1" in metrics


def test_global_options_are_checked(run: Run, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(main, [*cli_args(tmp_path), "--nft-table", "no-dashes", "status"])
    assert bad.exit_code == 2 and "plain nft identifier" in bad.output
    (tmp_path / "natports.toml").write_text('[backend]\ndefault = "ebpf"\n')
    bad = runner.invoke(main, [*cli_args(tmp_path), "status"])
    assert bad.exit_code == 2 and 'backend.default "ebpf"' in bad.output
    bad = runner.invoke(main, [*cli_args(tmp_path), "--backend", "ebpf", "status"])
    assert bad.exit_code == 2


def test_the_configured_backend_is_used(run: Run, world: World, tmp_path: Path) -> None:
    (tmp_path / "natports.toml").write_text('[backend]\ndefault = "iptables"\n')
    run("ports", "set", "mail", stdin="25:5025\n")
    mail(world, "172.17.0.2")
    assert run("apply").exit_code == 0
    assert world.ipt.ports() == {25: ["172.17.0.2"]} and world.nft.ports() == {}
    assert run("--backend", "nftables", "apply").exit_code == 0  # the option wins
    assert world.nft.ports() == {25: ["172.17.0.2"]} and world.ipt.ports() == {}


def test_doctor_prints_checks_and_exits_1_when_the_backend_cannot_work(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = [
        Check("nft", False, "nft not found", "apt-get install nftables"),
        Check("proxy", False, "no natports proxy is running", "run `natports proxy`"),
    ]
    outcome = (checks, "proxy", "nft not found", False)
    monkeypatch.setattr("natports.doctor.run_all", lambda root, prefix: outcome)
    result = run("doctor")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "NO  nft            nft not found",
        "                   hint: apt-get install nftables",
        "NO  proxy          no natports proxy is running",
        "                   hint: run `natports proxy`",
        "backend: proxy (nft not found)",
    ]
    doc = json.loads(run("doctor", "--json").output)
    assert doc["backend"] == "proxy" and doc["backend_works"] is False
    assert doc["checks"][0] == {
        "name": "nft",
        "ok": False,
        "detail": "nft not found",
        "hint": "apt-get install nftables",
    }
    monkeypatch.setattr(
        "natports.doctor.run_all", lambda root, prefix: ([], "nftables", "nft works", True)
    )
    assert run("doctor").exit_code == 0


def test_watch_runs_the_agent(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float | None] = []
    monkeypatch.setattr("natports.agent.Agent.run", lambda self, m: calls.append(m))
    assert run("watch", "--max-seconds", "0.5").exit_code == 0
    assert calls == [0.5]


def test_python_dash_m_natports_runs_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["natports", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("natports", run_name="__main__")
    assert done.value.code == 0


def test_errors_in_state_are_runtime_errors(run: Run, tmp_path: Path) -> None:
    (tmp_path / "state" / "apps").mkdir(parents=True)
    (tmp_path / "state" / "apps" / "mail.json").write_text("{not json")
    result = run("ports", "show", "mail")
    assert result.exit_code == 1 and "cannot read" in result.stderr
    assert result.stderr.splitlines()[-1] == "hint: restore or remove the file"


def test_flows_text_brackets_v6_targets() -> None:
    from natports.cli import _flows_text

    flows = [
        {"ip": "172.17.0.2", "port": 5025, "tcp_established": 1, "udp": 0},
        {"ip": "fd77:1::2", "port": 5025, "tcp_established": 0, "udp": 2},
    ]
    assert _flows_text(flows) == "172.17.0.2:5025=1,[fd77:1::2]:5025=2"
