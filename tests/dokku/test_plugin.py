"""The Dokku plugin through Dokku's own deploy sequence, seen by a client in another netns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dokku.harness import DokkuHost
from tests.infra import ClientNet, sh

pytestmark = pytest.mark.usefixtures("clean_kernel")

PORT = 23025


@pytest.fixture
def dokku() -> Iterator[DokkuHost]:
    host = DokkuHost()
    try:
        host.install()
        yield host
    finally:
        host.remove()


def tags(net: ClientNet, port: int, count: int = 1) -> set[str]:
    return {str(net.connect_once(port).get("tag", "refused")) for _ in range(count)}


def test_first_deploy_and_redeploy_with_flows_open(
    dokku: DokkuHost, client_net: ClientNet, tmp_path: Path
) -> None:
    first = dokku.deploy("mail", "v1", f"# smtp\n{PORT}:5025\n")
    assert first.ok, first.output
    assert tags(client_net, PORT) == {"v1.web.1"}
    held = client_net.hold(PORT)
    hammer = client_net.hammer(PORT, rate=120, max_seconds=120, stopfile=tmp_path / "stop")
    try:
        second = dokku.deploy("mail", "v2", f"{PORT}:5025\n")
        assert second.ok, second.output
        # new connections reach the new release as soon as post-deploy returned
        assert tags(client_net, PORT, 10) == {"v2.web.1"}
        # the old flow lives on with the old container until Dokku retires it
        assert held.ask("hello") == "v1.web.1 hello"
        dokku.retire(second.old)
        report = hammer.stop()
    finally:
        hammer.kill()
        held.close()
    assert report["failures"] == [], report
    assert set(report["tags"]) == {"v1.web.1", "v2.web.1"}
    assert tags(client_net, PORT, 5) == {"v2.web.1"}


def test_ports_changed_between_deploys_take_effect_on_that_deploy(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n{PORT + 1}:5026\n").ok
    assert tags(client_net, PORT + 1) == {"v1.web.1"}
    changed = f"{PORT}:5030\n{PORT + 2}:5027\n"  # retargeted, removed, added
    result = dokku.deploy("mail", "v2", changed)
    assert result.ok, result.output
    assert tags(client_net, PORT) == {"v2.web.1"}
    assert tags(client_net, PORT + 2) == {"v2.web.1"}
    assert tags(client_net, PORT + 1) == {"refused"}
    assert f"tcp . {PORT + 1}" not in dokku.table()


def test_scale_restart_and_new_addresses(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    scaled = dokku.deploy("mail", "v1", None, scale={"web": 3}, extract=False)  # ps:scale web=3
    assert scaled.ok, scaled.output
    dokku.retire(scaled.old)
    assert tags(client_net, PORT, 60) == {"v1.web.1", "v1.web.2", "v1.web.3"}
    restarted = dokku.deploy("mail", "v1", None, scale={"web": 1}, extract=False)  # ps:restart
    assert restarted.ok, restarted.output
    dokku.retire(restarted.old)
    assert tags(client_net, PORT, 10) == {"v1.web.1"}
    # As after a reboot: the container comes back with another address.
    cid = dokku.current("mail")["web"][0]
    old_ip = sh("docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid).stdout.strip()
    sh("docker", "stop", "-t", "1", cid)
    squatter = sh(
        "docker", "run", "-d", "--pull", "never", "natports-echod:test", "squat", "5999"
    ).stdout.strip()
    dokku.containers.append(squatter)
    sh("docker", "start", cid)
    new_ip = sh("docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid).stdout.strip()
    assert new_ip != old_ip
    restored = dokku.trigger("proxy-build-config", "mail")  # what ps:restore fires
    assert restored.returncode == 0, restored
    assert tags(client_net, PORT, 5) == {"v1.web.1"}


def test_two_apps_claiming_one_port(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    second = dokku.deploy("relay", "v1", f"{PORT}:5025\n")
    assert not second.ok
    assert f'PORTS:1:1: app "relay": port {PORT}/tcp is already mapped by app "mail"' in (
        second.output
    )
    assert dokku.current("relay") == {}  # aborted before any container was created
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_invalid_ports_abort_at_extract(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    bad = dokku.deploy("mail", "v2", f"{PORT}:5025\n\n{PORT + 1}:70000\n")
    assert not bad.ok
    assert "PORTS:3:" in bad.output and "private port 70000 is out of range" in bad.output
    assert tags(client_net, PORT) == {"v1.web.1"}  # the running release is untouched


def test_ports_set_takes_effect_without_a_redeploy(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    dokku.set_ports_map("mail", "http:80:5000", f"tcp:{PORT + 5}:5025", f"tcp:{PORT}:5999")
    done = dokku.trigger("post-proxy-ports-update", "mail", "set")
    assert done.returncode == 0, done
    assert f"ports:set tcp:{PORT}:5999 is overridden by PORTS" in done.stderr
    assert tags(client_net, PORT + 5) == {"v1.web.1"}
    assert tags(client_net, PORT) == {"v1.web.1"}
    report = json.loads(
        dokku.trigger("subcommands/report", "natports:report", "mail", "--format", "json").stdout
    )
    assert report["ports_file"] == [f"{PORT}:5025/tcp"]
    assert f"{PORT + 5}:5025/tcp" in report["mappings"]


def test_stop_and_start(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    for ids in dokku.current("mail").values():
        for cid in ids:
            sh("docker", "stop", "-t", "1", cid)
    assert dokku.trigger("post-stop", "mail").returncode == 0  # ps:stop
    assert tags(client_net, PORT) == {"refused"}
    assert "a_mail_" not in dokku.table()
    started = dokku.deploy("mail", "v1", None, extract=False)  # ps:start: release-and-deploy
    assert started.ok, started.output
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_rename_clone_destroy_leave_no_stale_rules(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    # apps:rename mail post: rename-setup, destroy of the old name, rebuild of the new
    assert dokku.trigger("post-app-rename-setup", "mail", "post").returncode == 0
    dokku.destroy_containers("mail")
    assert dokku.trigger("post-delete", "mail", "v1").returncode == 0
    renamed = dokku.deploy("post", "v2", f"{PORT}:5025\n")
    assert renamed.ok, renamed.output
    assert tags(client_net, PORT) == {"v2.web.1"}
    assert "a_mail_" not in dokku.table()
    # apps:clone post copy: Dokku copies the port map; a port still belongs to one app
    dokku.set_ports_map("post", f"tcp:{PORT + 1}:5025")
    assert dokku.trigger("post-proxy-ports-update", "post", "add").returncode == 0
    dokku.set_ports_map("copy", f"tcp:{PORT + 1}:5025")
    cloned = dokku.trigger("post-app-clone-setup", "post", "copy")
    assert "not cloned" in cloned.stdout
    copy = dokku.deploy("copy", "c1", None)
    assert copy.ok, copy.output
    assert "is not routed" in copy.output
    assert tags(client_net, PORT + 1) == {"v2.web.1"}
    # apps:destroy
    for app in ("post", "copy"):
        dokku.destroy_containers(app)
        assert dokku.trigger("post-delete", app, "x").returncode == 0
    assert "a_" not in dokku.table().replace("natports", "")
    listing = dokku.trigger("subcommands/list", "natports:list")
    assert listing.returncode == 0 and listing.stdout == ""


def test_image_deploys_read_ports_from_the_image(
    dokku: DokkuHost, client_net: ClientNet, tmp_path: Path
) -> None:
    """git:from-image: TMP_WORK_DIR holds only a Dockerfile; PORTS comes from the image."""
    ports = tmp_path / "PORTS"
    ports.write_text(f"{PORT}:5025\n")
    base = sh("docker", "create", "--pull", "never", "natports-echod:test", "x", "1").stdout.strip()
    image = f"natports-test-src:{base[:12]}"
    try:
        sh("docker", "cp", str(ports), f"{base}:/PORTS")
        sh("docker", "commit", base, image)
        (dokku.base / "source-image" / "mail").write_text(image + "\n")
        result = dokku.deploy("mail", "v1", None)
        assert result.ok, result.output
        assert tags(client_net, PORT) == {"v1.web.1"}
    finally:
        sh("docker", "rm", "-f", base, check=False)
        sh("docker", "rmi", image, check=False)


def test_the_root_helper_refuses_bad_arguments(dokku: DokkuHost) -> None:
    injected = dokku.trigger("post-delete", "--state-dir=/tmp/elsewhere")
    assert injected.returncode == 2 and "No such option" in injected.stderr
    bad_name = dokku.trigger("post-delete", "Bad_App")
    assert bad_name.returncode == 2 and "is not a valid app name" in bad_name.stderr
    # the dokku user reaches root only through the helper
    other = sh(
        "runuser", "-u", "dokku", "--", "sudo", "-n", "/usr/sbin/nft", "list", "tables", check=False
    )
    assert other.returncode != 0


def test_reinstalling_and_the_install_trigger_keep_live_rules(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    assert dokku.deploy("mail", "v1", f"{PORT}:5025\n").ok
    before = dokku.table()
    dokku.install_again()
    install = sh(str(dokku.plugin / "install"), check=False)  # as root, like Dokku
    assert install.returncode == 0, install
    assert dokku.table() == before
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_without_the_helper_the_triggers_warn_and_never_break_dokku(
    dokku: DokkuHost, tmp_path: Path
) -> None:
    missing = tmp_path / "no-helper"
    for name, args in (
        ("post-extract", ("mail", str(tmp_path), "rev")),
        ("post-deploy", ("mail", "", "", "v1")),
        ("post-delete", ("mail", "v1")),
        ("post-stop", ("mail",)),
    ):
        done = dokku.trigger(name, *args, helper=missing)
        assert done.returncode == 0, (name, done)
        assert "is missing; run scripts/install-dokku-plugin" in done.stderr
    args = dokku.trigger(
        "docker-args-process-deploy",
        "mail",
        "dockerfile",
        "t",
        "web",
        "1",
        stdin="--env A=1",
        helper=missing,
    )
    assert args.returncode == 0 and args.stdout == "--env A=1"
