"""The CLI contract, end to end: real CLI process, real nft, real dockerd and containers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.infra import NFT_TABLE, Cli, ClientNet, Containers, sh

pytestmark = pytest.mark.usefixtures("clean_kernel")

PORT = 22025


def table_exists() -> bool:
    return sh("nft", "list", "table", "inet", NFT_TABLE, check=False).returncode == 0


def table_text() -> str:
    return sh("nft", "list", "table", "inet", NFT_TABLE, check=False).stdout


# -- bad input: exit 2, nothing stored or applied ------------------------------------------


def test_check_reports_every_error_with_its_position(cli: Cli, tmp_path: Path) -> None:
    ports = tmp_path / "PORTS"
    ports.write_text("# mail\n25:5025\n26:70000\nabc:1 # no\n")
    proc = cli("check", str(ports), expect=2)
    assert proc.stderr.splitlines() == [
        f"{ports}:3:4: private port 70000 is out of range (1-65535)",
        f'{ports}:4:1: public port "abc" is not a number',
    ]
    ports.write_text("25:5025\n")
    assert "ok, 1 mapping" in cli("check", str(ports)).stdout


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert (
        cli("apply", "--container", "abc", expect=2)
        .stderr.strip()
        .endswith("--container needs --app: containers belong to one app")
    )
    cli("no-such-command", expect=2)
    cli("ports", "set", "Bad_Name", input="25:5025\n", expect=2)
    assert "cannot read" in cli("check", "/nonexistent/PORTS", expect=2).stderr


def test_a_conflict_is_refused_and_names_both_apps(cli: Cli) -> None:
    cli("ports", "set", "mail", input=f"{PORT}-{PORT + 10}:5025-5035\n")
    cli("ports", "set", "relay", input=f"{PORT + 20}:5025\n")
    proc = cli("ports", "set", "relay", input=f"{PORT + 5}:5025\n", expect=2)
    assert proc.stderr.strip() == (
        f'PORTS:1:1: app "relay": port {PORT + 5}/tcp is already mapped by app "mail"'
    )
    assert cli("ports", "show", "relay").stdout == f"{PORT + 20}:5025/tcp\n"  # unchanged
    # another protocol on the same port is a different mapping
    cli("ports", "set", "relay", input=f"{PORT + 5}:5025/udp\n")


def test_host_policy_protects_ssh_and_host_listeners(cli: Cli) -> None:
    assert (
        "port 22/tcp is reserved by the host policy"
        in cli("ports", "set", "mail", input="22:5022\n", expect=2).stderr
    )
    listener = socket.create_server(("0.0.0.0", 0))
    try:
        port = listener.getsockname()[1]
        err = cli("ports", "set", "mail", input=f"{port}:5025\n", expect=2).stderr
        assert f"port {port}/tcp is in use on the host" in err
        assert f"(pid {os.getpid()})" in err
        cli.config.write_text(f'[policy]\nallow_listening = ["{port}/tcp"]\n')
        cli("ports", "set", "mail", input=f"{port}:5025\n")
        cli.config.write_text('[policy]\nallow = ["10000-20000"]\n')
        assert (
            "not in the host policy's allowed ports"
            in cli("ports", "set", "mail", input=f"{PORT}:5025\n", expect=2).stderr
        )
    finally:
        listener.close()


# -- runtime failures: exit 1, with a cause and a hint -----------------------------------------


def test_an_unpublished_private_port_is_refused(cli: Cli, containers: Containers) -> None:
    """Where natports has no accept in DOCKER-USER (the proxy backend here; the kernel
    backends where Docker has no DOCKER-USER: see test_forwarding.py)."""
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    bare = containers.start("v1", publish=False)
    argv = ["--backend", "proxy", "apply", "--app", "mail", "--container", bare.id]
    err = cli(*argv, expect=1).stderr
    assert "does not publish 5025/tcp" in err and "-p 127.0.0.1::5025" in err
    assert not table_exists()


def test_docker_unreachable(cli: Cli, tmp_path: Path) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    env_cli = Cli(tmp_path)
    os.environ["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    try:
        err = env_cli("apply", "--app", "mail", expect=1).stderr
    finally:
        del os.environ["DOCKER_HOST"]
    assert err.startswith("natports: cannot reach Docker")
    assert "hint: is dockerd running" in err


def test_nft_missing(cli: Cli, tmp_path: Path) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    bin_dir = tmp_path / "bin"  # a PATH without nft
    bin_dir.mkdir()
    old = os.environ["PATH"]
    os.environ["PATH"] = str(bin_dir)
    os.environ["NATPORTS_BACKEND"] = "nftables"  # asked for by name: no fallback
    try:
        err = cli("flush", expect=1).stderr
    finally:
        os.environ["PATH"] = old
        del os.environ["NATPORTS_BACKEND"]
    assert "natports: nft not found" in err and "apt-get install nftables" in err


def without_privileges(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with no capabilities at all (no CAP_NET_ADMIN, no CAP_DAC_OVERRIDE).

    Dropping capabilities rather than switching user keeps the checkout readable
    wherever CI cloned it.
    """
    return sh(
        "setpriv",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        *cli.argv(*args),
        check=False,
    )


def test_without_privileges() -> None:
    root = Path(tempfile.mkdtemp(prefix="natports-nopriv-"))
    try:
        cli = Cli(root)
        # a state directory we may not write: the lock cannot even be taken
        cli.state.mkdir()
        os.chown(cli.state, 65534, 65534)
        cli.state.chmod(0o755)
        proc = without_privileges(cli, "ports", "set", "mail", "/dev/null")
        assert proc.returncode == 1, proc
        assert proc.stderr.startswith("natports: cannot ") and "Traceback" not in proc.stderr
        assert "hint: run as root" in proc.stderr
        # a writable state directory: now the kernel is what refuses
        os.chown(cli.state, 0, 0)
        proc = without_privileges(cli, "--backend", "nftables", "flush")
        assert proc.returncode == 1, proc
        assert "natports needs root (CAP_NET_ADMIN)" in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(root)


# -- routing through discovery ---------------------------------------------------------------


def test_dokku_container_files_name_the_current_containers(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "shop", input=f"{PORT}:5025\nworker: {PORT + 1}:5026\n")
    web = containers.start("web1", ports=(5025,), app="shop")
    worker = containers.start("wrk1", ports=(5026,), app="shop", process_type="worker")
    app_dir = cli.dokku_root / "shop"
    app_dir.mkdir()
    (app_dir / "CONTAINER.web.1").write_text(web.id + "\n")
    (app_dir / "CONTAINER.worker.1").write_text(worker.id + "\n")
    cli("apply", "--app", "shop")
    assert client_net.connect_once(PORT) == {"tag": "web1"}
    assert client_net.connect_once(PORT + 1) == {"tag": "wrk1"}
    # a deploy rewrites the file; the next apply follows it
    web2 = containers.start("web2", ports=(5025,), app="shop")
    (app_dir / "CONTAINER.web.1").write_text(web2.id + "\n")
    cli("apply", "--app", "shop")
    assert client_net.connect_once(PORT) == {"tag": "web2"}


def test_labels_find_containers_without_dokku_files(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "shop", input=f"{PORT}:5025\n")
    containers.start("lab1", app="shop")
    containers.start("lab2", app="shop")
    containers.start("other", app="notshop")
    cli("apply")
    seen = {client_net.connect_once(PORT)["tag"] for _ in range(40)}
    assert seen == {"lab1", "lab2"}


def test_one_broken_app_does_not_stop_the_others(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "good", input=f"{PORT}:5025\n")
    cli("ports", "set", "broken", input=f"{PORT + 1}:5025\n")
    containers.start("good1", app="good")
    broken = containers.start("broken1", app="broken")
    cli("apply")
    assert client_net.connect_once(PORT + 1) == {"tag": "broken1"}
    containers.stop(broken.id)
    containers.start("good2", app="good", name=None)
    proc = cli("apply", expect=1)
    assert 'broken: kept its previous routes: app "broken": no running container' in proc.stderr
    assert "good: routed" in proc.stdout
    rows = {r["app"]: r for r in cli.status()}
    assert len(rows["good"]["backends"]) == 2
    # Fail closed: a stopped container is no backend, even for an app that keeps its routes;
    # its address may be handed to another container at any time.
    assert "broken" not in rows
    assert "tag" not in client_net.connect_once(PORT + 1)


def test_status_json_schema(cli: Cli, client_net: ClientNet, containers: Containers) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n{client_net.host_ip}:{PORT + 1}:5025/udp\n")
    c = containers.start("v1")
    cli("apply", "--app", "mail", "--container", c.id)
    client_net.connect_once(PORT)
    held = client_net.hold(PORT)
    try:
        rows = cli.status()
    finally:
        held.close()
    assert [(r["protocol"], r["public_port"]) for r in rows] == [("tcp", PORT), ("udp", PORT + 1)]
    tcp, udp = rows
    assert tcp == {
        "app": "mail",
        "process_type": "web",
        "protocol": "tcp",
        "family": 4,
        "public_ip": None,
        "public_port": PORT,
        "private_port": 5025,
        "public_port_end": PORT,
        "private_port_end": 5025,
        "backends": [{"container_id": c.id, "ip": c.ip, "port": 5025}],
        "backend": "nftables",
        "packets": tcp["packets"],
        "bytes": tcp["bytes"],
        # live flows per target from conntrack: the held connection is established
        "flows": [{"ip": c.ip, "port": 5025, "tcp_established": 1, "udp": 0}],
        "proxy": None,  # only routes the proxy serves carry its counts
    }
    assert tcp["packets"] >= 1 and tcp["bytes"] > 0
    assert udp["public_ip"] == client_net.host_ip
    human = cli("status").stdout
    assert f"*:{PORT}/tcp" in human and f"{client_net.host_ip}:{PORT + 1}/udp" in human


def test_dry_run_prints_the_batch_and_changes_nothing(cli: Cli, containers: Containers) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    c = containers.start("v1")
    batch = cli("apply", "--app", "mail", "--container", c.id, "--dry-run").stdout
    assert f"tcp . {PORT} : {c.ip} . 5025" in batch
    assert not table_exists()
    assert cli.status() == []
    # and that batch is exactly what apply runs
    sh("nft", "-f", "-", input=batch)
    applied = table_text()
    sh("nft", "delete", "table", "inet", NFT_TABLE)
    cli("apply", "--app", "mail", "--container", c.id)
    assert table_text() == applied


def test_flush_and_rm(cli: Cli, client_net: ClientNet, containers: Containers) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    cli("ports", "set", "chat", input=f"{PORT + 1}:5025\n")
    m = containers.start("mail1")
    c = containers.start("chat1")
    cli("apply", "--app", "mail", "--container", m.id)
    cli("apply", "--app", "chat", "--container", c.id)
    cli("flush", "--app", "mail")
    assert client_net.connect_once(PORT).get("error")
    assert client_net.connect_once(PORT + 1) == {"tag": "chat1"}
    assert [r["app"] for r in cli.status()] == ["chat"]
    assert cli("ports", "show", "mail").stdout == f"{PORT}:5025/tcp\n"  # config kept
    cli("ports", "rm", "chat")
    assert client_net.connect_once(PORT + 1).get("error")
    cli("ports", "show", "chat", expect=2)
    cli("flush")
    assert not table_exists()
    assert json.loads(cli("ports", "show", "mail", "--json").stdout)[0]["public_port"] == PORT


def test_concurrent_applies_of_different_apps_lose_nothing(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    apps = [f"app{i}" for i in range(6)]
    started = {}
    for i, app in enumerate(apps):
        cli("ports", "set", app, input=f"{PORT + i}:5025\n")
        started[app] = containers.start(f"t{i}")
    procs = [
        subprocess.Popen(
            cli.argv("apply", "--app", app, "--container", started[app].id),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for app in apps
    ]
    assert [p.wait() for p in procs] == [0] * len(apps)
    for p in procs:
        assert p.stdout and p.stderr
        p.stdout.close()
        p.stderr.close()
    assert sorted(r["app"] for r in cli.status()) == apps
    for i in range(len(apps)):
        assert client_net.connect_once(PORT + i) == {"tag": f"t{i}"}


def test_a_port_moves_to_another_app_only_once_released(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "alpha", input=f"{PORT}:5025\n")
    a = containers.start("alpha1")
    b = containers.start("beta1")
    cli("apply", "--app", "alpha", "--container", a.id)
    cli("ports", "set", "alpha", input=f"{PORT + 1}:5025\n")  # alpha drops the port...
    err = cli("ports", "set", "beta", input=f"{PORT}:5025\n", expect=2).stderr
    assert f'port {PORT}/tcp is already mapped by app "alpha"' in err  # ...but still routes it
    cli("apply", "--app", "alpha", "--container", a.id)
    cli("ports", "set", "beta", input=f"{PORT}:5025\n")
    cli("apply", "--app", "beta", "--container", b.id)
    assert client_net.connect_once(PORT) == {"tag": "beta1"}
    assert client_net.connect_once(PORT + 1) == {"tag": "alpha1"}
    cli("ports", "rm", "alpha")
    assert client_net.connect_once(PORT) == {"tag": "beta1"}


def test_dry_run_reports_failing_apps(cli: Cli, containers: Containers) -> None:
    cli("ports", "set", "ghost", input=f"{PORT}:5025\n")
    proc = cli("apply", "--dry-run", expect=1)
    assert 'no running container for process type "web"' in proc.stderr
    assert not table_exists()


def test_switching_backends_moves_an_app_without_a_gap(
    cli: Cli, client_net: ClientNet, containers: Containers
) -> None:
    cli("ports", "set", "mail", input=f"{PORT}:5025\n")
    c = containers.start("v1")
    cli("--backend", "nftables", "apply", "--app", "mail", "--container", c.id)
    assert cli.status()[0]["backend"] == "nftables"
    held = client_net.hold(PORT)
    try:
        cli("--backend", "iptables", "apply", "--app", "mail", "--container", c.id)
        assert [r["backend"] for r in cli.status()] == ["iptables"]
        assert f"tcp . {PORT}" not in table_text()  # the old backend's rules are gone
        assert client_net.connect_once(PORT) == {"tag": "v1"}  # served by iptables now
        assert held.ask("still") == "v1 still"  # conntrack kept the established flow
    finally:
        held.close()
        cli("--backend", "iptables", "flush")
    assert "NATPORTS_TEST" not in sh("iptables-save", "-t", "nat").stdout
