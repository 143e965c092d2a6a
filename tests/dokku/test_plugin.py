"""The Dokku plugin through Dokku's own trigger order and error handling (see harness.py),
seen by a client in another netns."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.dokku.harness import DokkuHost
from tests.infra import ClientNet, sh

pytestmark = pytest.mark.usefixtures("clean_kernel")

PORT = 23025


def tags(net: ClientNet, port: int, count: int = 1) -> set[str]:
    return {str(net.connect_once(port).get("tag", "refused")) for _ in range(count)}


def test_first_deploy_and_redeploy_with_flows_open(
    dokku: DokkuHost, client_net: ClientNet, tmp_path: Path
) -> None:
    first = dokku.git_push("mail", "v1", {"PORTS": f"# smtp\n{PORT}:5025\n"})
    assert first.ok, first.output
    assert tags(client_net, PORT) == {"v1.web.1"}
    held = client_net.hold(PORT)
    hammer = client_net.hammer(PORT, rate=120, max_seconds=120, stopfile=tmp_path / "stop")
    try:
        second = dokku.git_push("mail", "v2", {"PORTS": f"{PORT}:5025\n"})
        assert second.ok, second.output
        # new connections reach the new release as soon as post-deploy returned
        assert tags(client_net, PORT, 10) == {"v2.web.1"}
        # the old flow lives on with the old container until Dokku retires it
        assert held.ask("hello") == "v1.web.1 hello"
        # and natports:report shows it draining there
        report = json.loads(dokku.subcommand("report", "mail", "--format", "json").stdout)
        old_ip = dokku.container_ip(second.old[0])
        assert any(
            f.startswith(f"{old_ip}:5025=") and not f.endswith("=0") for f in report["flows"]
        )
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
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n{PORT + 1}:5026\n"}).ok
    assert tags(client_net, PORT + 1) == {"v1.web.1"}
    changed = f"{PORT}:5030\n{PORT + 2}:5027\n"  # retargeted, removed, added
    result = dokku.git_push("mail", "v2", {"PORTS": changed})
    assert result.ok, result.output
    assert tags(client_net, PORT) == {"v2.web.1"}
    assert tags(client_net, PORT + 2) == {"v2.web.1"}
    assert tags(client_net, PORT + 1) == {"refused"}
    assert f"tcp . {PORT + 1}" not in dokku.table()


def test_scale_restart_and_new_addresses(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    scaled = dokku.release_and_deploy("mail", "v1", scale={"web": 3})  # ps:scale web=3
    assert scaled.ok, scaled.output
    dokku.retire(scaled.old)
    assert tags(client_net, PORT, 60) == {"v1.web.1", "v1.web.2", "v1.web.3"}
    restarted = dokku.release_and_deploy("mail", "v1", scale={"web": 1})  # ps:restart
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


def test_a_process_type_scaled_to_zero_routes_nothing(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """ps:scale worker=0 removes its CONTAINER files; its old container drains, unrouted."""
    files = {"PORTS": f"{PORT}:5025\nworker: {PORT + 1}:5026\n"}
    assert dokku.git_push("mail", "v1", files, scale={"web": 1, "worker": 1}).ok
    assert tags(client_net, PORT + 1) == {"v1.worker.1"}
    scaled = dokku.release_and_deploy("mail", "v1", scale={"web": 1, "worker": 0})
    assert scaled.ok, scaled.output
    assert tags(client_net, PORT + 1) == {"refused"}  # the old worker still runs
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_a_conflicting_push_fails_before_any_container_is_created(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    mail_state = dokku.stored("mail")
    second = dokku.git_push("relay", "v1", {"PORTS": f"{PORT}:5025\n"})
    assert not second.ok
    assert f'PORTS:1:1: app "relay": port {PORT}/tcp is already mapped by app "mail"' in (
        second.output
    )
    assert "App build failed" in second.output  # pre-build failed: Dokku stops the build
    assert second.created == 0 and dokku.current("relay") == {}
    assert dokku.stored("relay") is None and dokku.stored("mail") == mail_state
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_a_push_claiming_a_reserved_port_fails_before_any_container_is_created(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """The host policy (ports 22, 80, 443 by default) holds on the Dokku path too."""
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    before = (dokku.stored("mail"), dokku.table(), dokku.current("mail"))
    reserved = dokku.git_push("mail", "v2", {"PORTS": f"{PORT}:5025\n22:5022\n"})
    assert not reserved.ok and reserved.created == 0
    assert "PORTS:2:1:" in reserved.output, reserved.output
    assert "port 22/tcp is reserved by the host policy" in reserved.output
    assert (dokku.stored("mail"), dokku.table(), dokku.current("mail")) == before
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_an_invalid_push_fails_and_changes_nothing(dokku: DokkuHost, client_net: ClientNet) -> None:
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    before = (dokku.stored("mail"), dokku.table(), dokku.current("mail"))
    bad = dokku.git_push("mail", "v2", {"PORTS": f"{PORT}:5025\n\n{PORT + 1}:70000\n"})
    assert not bad.ok and bad.created == 0
    assert "PORTS:3:" in bad.output and "private port 70000 is out of range" in bad.output
    assert (dokku.stored("mail"), dokku.table(), dokku.current("mail")) == before
    assert tags(client_net, PORT) == {"v1.web.1"}  # the running release is untouched


def test_a_failed_build_never_leaves_its_ports_for_a_later_deploy(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """pre-build staged PORTS B, then the build failed: B belongs to that build only."""
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    failed = dokku.git_push("mail", "v2", {"PORTS": f"{PORT + 3}:5025\n"}, build_fails=True)
    assert not failed.ok
    restarted = dokku.release_and_deploy("mail", "v1")  # ps:restart, another Dokku command
    assert restarted.ok, restarted.output
    assert "dropped the PORTS staged by an earlier build" in restarted.output
    assert tags(client_net, PORT) == {"v1.web.1"}
    assert tags(client_net, PORT + 3) == {"refused"}
    report = json.loads(dokku.subcommand("report", "mail", "--format", "json").stdout)
    assert report["staged"] is False and report["ports_file"] == [f"{PORT}:5025/tcp"]


def test_a_port_taken_after_pre_build_fails_the_deploy_at_docker_args(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """Another app took the port between the build and the deploy: the once-per-type
    docker-args call fails, before any container of the deploy is created."""
    assert dokku.git_push("other", "o1", {}).ok
    dokku.between_build_and_deploy = lambda: dokku.set_ports_map("other", f"tcp:{PORT}:5000")
    result = dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"})
    assert not result.ok and result.created == 0 and dokku.current("mail") == {}
    assert f'port {PORT}/tcp is already mapped by app "other"' in result.output
    # The port is the other app's now (routed at once where natports' DOCKER-USER accept
    # makes published ports unnecessary, refused where o1 publishes nothing): never mail's.
    assert tags(client_net, PORT) <= {"o1.web.1", "refused"}


def test_post_deploy_keeps_previous_routes_and_lets_dokku_retire(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """A conflict that appears after the containers switched: post-deploy says why, keeps
    the previous routes and exits 0, so Dokku goes on to retire the old containers."""
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    assert dokku.git_push("other", "o1", {}).ok
    dokku.before_post_deploy = lambda: dokku.set_ports_map("other", f"tcp:{PORT + 4}:5000")
    result = dokku.git_push("mail", "v2", {"PORTS": f"{PORT}:5025\n{PORT + 4}:5026\n"})
    assert result.ok, result.output
    assert result.old  # Dokku retires the old containers
    assert f'port {PORT + 4}/tcp is already mapped by app "other"' in result.output
    assert "the new PORTS is not live" in result.output
    dokku.retire(result.old)
    # the previous PORTS stays in effect, now with the new containers behind it
    assert tags(client_net, PORT) == {"v2.web.1"}, result.output
    assert tags(client_net, PORT + 4) <= {"o1.web.1", "refused"}  # the other app's, not mail's


def test_ports_set_takes_effect_and_detected_entries_are_never_routed(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    dockerfile = f"FROM scratch\nEXPOSE {PORT + 6}/udp\nEXPOSE 5000\n"
    pushed = dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n", "Dockerfile": dockerfile})
    assert pushed.ok, pushed.output
    # Dokku's ports-get now answers the detected map; natports routes none of it
    assert dokku.ports_get("mail") == ["http:5000:5000", f"udp:{PORT + 6}:{PORT + 6}"]
    assert f"_udp_{PORT + 6}" not in dokku.table()
    done = dokku.set_ports_map("mail", "http:80:5000", f"tcp:{PORT + 5}:5025", f"tcp:{PORT}:5999")
    assert done.returncode == 0, done
    assert f"ports:set tcp:{PORT}:5999 is overridden by PORTS" in done.stderr
    assert tags(client_net, PORT + 5) == {"v1.web.1"}
    assert tags(client_net, PORT) == {"v1.web.1"}
    report = json.loads(dokku.subcommand("report", "mail", "--format", "json").stdout)
    assert report["ports_file"] == [f"{PORT}:5025/tcp"]
    assert f"{PORT + 5}:5025/tcp" in report["mappings"]


def test_a_ports_clear_that_drops_map_entries_is_reported(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """domains:disable (and proxy:disable, the enables) run ports-clear with nginx: the map
    goes, no post-proxy-ports-update fires; the restart that follows reports the loss."""
    assert dokku.git_push("mail", "v1", {}).ok
    assert dokku.set_ports_map("mail", "http:80:5000", f"tcp:{PORT + 8}:5025").returncode == 0
    restarted = dokku.release_and_deploy("mail", "v1")  # a restart publishes 5025 now
    assert restarted.ok, restarted.output
    assert tags(client_net, PORT + 8) == {"v1.web.1"}
    assert dokku.ports_clear("mail").returncode == 0
    again = dokku.release_and_deploy("mail", "v1")  # domains:disable restarts the app
    assert again.ok, again.output
    assert f"Dokku's port map no longer lists tcp:{PORT + 8}:5025" in again.output
    assert tags(client_net, PORT + 8) == {"refused"}


def test_with_a_proxy_other_than_nginx_post_deploy_alone_moves_the_routes(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """caddy, haproxy, traefik: no proxy-build-config during deploys at all."""
    proxy = dokku.lib_root / "config" / "proxy"
    proxy.mkdir(parents=True)
    (proxy / "mail").write_text("caddy\n")
    assert dokku.ports_get("mail") == ["http:80:5000"]  # never empty, even before a build
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    second = dokku.git_push("mail", "v2", {"PORTS": f"{PORT}:5025\n"})
    assert second.ok, second.output
    assert tags(client_net, PORT, 5) == {"v2.web.1"}


def test_stop_stops_routing_before_the_containers_stop(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    stopped = dokku.ps_stop("mail")
    assert stopped.returncode == 0, stopped
    assert str(PORT) not in dokku.table_at_stop  # gone while the containers still ran
    assert tags(client_net, PORT) == {"refused"}
    started = dokku.release_and_deploy("mail", "v1")  # ps:start: release-and-deploy
    assert started.ok, started.output
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_rename_clone_destroy(dokku: DokkuHost, client_net: ClientNet) -> None:
    repo = {"PORTS": f"{PORT}:5025\n"}
    assert dokku.git_push("mail", "v1", repo).ok
    # apps:rename mail post: rename-setup, destroy of the old name, rebuild of the new
    assert dokku.trigger("post-app-rename-setup", "mail", "post").returncode == 0
    dokku.destroy_containers("mail")
    assert dokku.trigger("post-delete", "mail", "v1").returncode == 0
    renamed = dokku.git_push("post", "v2", repo)
    assert renamed.ok, renamed.output
    assert tags(client_net, PORT) == {"v2.web.1"}
    # apps:clone post copy: the clone is rebuilt from the same repository, whose PORTS
    # names the original's port: the rebuild fails before the clone has containers
    dokku.set_ports_map("post", f"tcp:{PORT + 1}:5025")
    clone = dokku.apps_clone("post", "copy", repo)
    assert not clone.ok and clone.created == 0
    assert f'port {PORT}/tcp is already mapped by app "post"' in clone.output
    assert "not cloned" in clone.output
    # with its own PORTS the clone deploys; the copied map entry stays the original's
    own = dokku.git_push("copy", "c2", {"PORTS": f"{PORT + 2}:5025\n"})
    assert own.ok, own.output
    assert "is not routed" in own.output
    assert tags(client_net, PORT + 1) == {"v2.web.1"}
    assert tags(client_net, PORT + 2) == {"c2.web.1"}
    for app in ("post", "copy"):
        assert dokku.apps_destroy(app).returncode == 0
    assert str(PORT) not in dokku.table()
    listing = dokku.subcommand("list")
    assert listing.returncode == 0 and listing.stdout == ""


def test_image_deploys_read_ports_from_the_image_and_a_later_push_from_git(
    dokku: DokkuHost, client_net: ClientNet, tmp_path: Path
) -> None:
    """git:from-image: the work dir holds only Dokku's Dockerfile; PORTS comes from the
    image. The next git push (source-image still set until after the build) reads git's."""
    ports_file = tmp_path / "PORTS"
    ports_file.write_text(f"{PORT}:5025\n")
    base = sh("docker", "create", "--pull", "never", "natports-echod:test", "x", "1").stdout.strip()
    image = f"natports-test-src:{base[:12]}"
    try:
        sh("docker", "cp", str(ports_file), f"{base}:/PORTS")
        sh("docker", "commit", base, image)
        result = dokku.git_from_image("mail", "v1", image)
        assert result.ok, result.output
        assert tags(client_net, PORT) == {"v1.web.1"}
        pushed = dokku.git_push("mail", "v2", {"PORTS": f"{PORT + 7}:5025\n"})
        assert pushed.ok, pushed.output
        assert tags(client_net, PORT + 7) == {"v2.web.1"}
        assert tags(client_net, PORT) == {"refused"}
    finally:
        sh("docker", "rm", "-f", base, check=False)
        sh("docker", "rmi", image, check=False)


def test_an_image_whose_ports_is_a_symlink_is_refused(
    dokku: DokkuHost, client_net: ClientNet, tmp_path: Path
) -> None:
    link = tmp_path / "PORTS"
    link.symlink_to("/etc/shadow")
    base = sh("docker", "create", "--pull", "never", "natports-echod:test", "x", "1").stdout.strip()
    image = f"natports-test-src:{base[:12]}"
    try:
        sh("docker", "cp", str(link), f"{base}:/PORTS")  # docker cp keeps the link itself
        sh("docker", "commit", base, image)
        result = dokku.git_from_image("mail", "v1", image)
        assert not result.ok and result.created == 0
        assert "/PORTS in the image is not a regular file" in result.output
    finally:
        sh("docker", "rm", "-f", base, check=False)
        sh("docker", "rmi", image, check=False)


def test_a_rebuild_whose_source_image_is_gone_keeps_the_current_ports(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """ps:rebuild after the source image was pruned: the build pulls it again, natports
    cannot look inside: the app keeps its PORTS, and the build is not failed for it."""
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    rebuilt = dokku.git_from_image("mail", "v2", "natports-test-src:pruned-long-ago")
    assert rebuilt.ok, rebuilt.output
    assert "cannot read PORTS from image natports-test-src:pruned-long-ago" in rebuilt.output
    assert tags(client_net, PORT) == {"v2.web.1"}


def test_build_dir_is_honoured(dokku: DokkuHost, client_net: ClientNet) -> None:
    dokku.build_dirs["mail"] = "server"
    files = {"PORTS": f"{PORT + 9}:5025\n", "server/PORTS": f"{PORT}:5025\n"}
    result = dokku.git_push("mail", "v1", files)
    assert result.ok, result.output
    assert tags(client_net, PORT) == {"v1.web.1"}
    assert tags(client_net, PORT + 9) == {"refused"}


def test_a_ports_file_that_is_not_a_regular_file_is_refused_unread(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """A deployer's PORTS pointing at another app's ENV must never print its secrets."""
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    env = dokku.app_dir("bank") / "ENV"
    env.write_text("export DATABASE_URL='postgres://bank:hunter2@db/bank'\n")
    os.chown(env, *_dokku_ids())
    env.chmod(0o600)
    cases = {
        "symlink": {"PORTS": lambda p: p.symlink_to(env)},
        "fifo": {"PORTS": lambda p: os.mkfifo(p)},
        "too big": {"PORTS": f"{PORT}:5025\n" + "#" * (64 * 1024)},
    }
    for name, files in cases.items():
        result = dokku.git_push("mail", "v2", files)
        assert not result.ok and result.created == 0, (name, result.output)
        assert "hunter2" not in result.output and "postgres" not in result.output
        assert "PORTS" in result.output, (name, result.output)
    assert tags(client_net, PORT) == {"v1.web.1"}


def _dokku_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("dokku")
    return entry.pw_uid, entry.pw_gid


def test_legacy_app_names_with_underscores(dokku: DokkuHost, client_net: ClientNet) -> None:
    """Dokku keeps apps named before its current rule (`_` allowed): with and without PORTS,
    deploy, report and destroy work, and their nft names stay valid."""
    plain = dokku.git_push("old_app", "p1", {})
    assert plain.ok, plain.output
    mapped = dokku.git_push("my_mail.v2", "m1", {"PORTS": f"{PORT}:5025\n"})
    assert mapped.ok, mapped.output
    assert tags(client_net, PORT) == {"m1.web.1"}  # nft took the names derived from it
    for app in ("old_app", "my_mail.v2"):
        assert dokku.trigger("report", app).returncode == 0
        assert dokku.apps_destroy(app).returncode == 0
    assert tags(client_net, PORT) == {"refused"}


def test_the_root_helper_refuses_bad_arguments(dokku: DokkuHost) -> None:
    injected = dokku.trigger("post-delete", "--state-dir=/tmp/elsewhere")
    assert injected.returncode == 2 and "No such option" in injected.stderr
    # a name natports cannot hold anything for: nothing is done, and Dokku goes on
    bad_name = dokku.trigger("post-delete", "Bad App/../x")
    assert bad_name.returncode == 0 and "not an app name natports serves" in bad_name.stderr
    too_long = dokku.git_push("a" * 201, "v1", {})
    assert too_long.ok, too_long.output
    # the dokku user reaches root only through the helper
    other = sh(
        "runuser", "-u", "dokku", "--", "sudo", "-n", "/usr/sbin/nft", "list", "tables", check=False
    )
    assert other.returncode != 0
    # read-source reads as the caller: through sudo (as root) it refuses to read anything
    helper = str(dokku.helper)
    as_root = sh(
        "runuser", "-u", "dokku", "--", "sudo", "-n", helper, "read-source", "/", check=False
    )
    assert as_root.returncode == 2 and "never as root" in as_root.stderr


def test_reinstalling_and_the_install_trigger_keep_live_rules(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
    before = dokku.table()
    dokku.install_again()
    install = sh(str(dokku.plugin / "install"), check=False)  # as root, like Dokku
    assert install.returncode == 0, install
    assert dokku.table() == before
    assert tags(client_net, PORT) == {"v1.web.1"}


def test_without_the_helper_the_triggers_warn_and_never_break_dokku(
    dokku: DokkuHost, tmp_path: Path
) -> None:
    """The helper path comes from what the installer wrote into the plugin; point it away."""
    (dokku.plugin / "helper-path").write_text(str(tmp_path / "no-helper") + "\n")
    result = dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"})
    assert result.ok, result.output
    assert "is missing; run scripts/install-dokku-plugin" in result.output
    for name, args in (("post-delete", ("mail", "v1")), ("post-stop", ("mail",))):
        done = dokku.trigger(name, *args)
        assert done.returncode == 0, (name, done)
    args = dokku.trigger(
        "docker-args-process-deploy", "mail", "dockerfile", "t", "web", "1", stdin="--env A=1"
    )
    assert args.returncode == 0 and args.stdout == "--env A=1"


def _docker_proxies() -> int:
    out = sh("pgrep", "-c", "-x", "docker-proxy", check=False)
    return int(out.stdout.strip() or 0)


def _ask_udp(net: ClientNet, port: int) -> str | None:
    flow = net.udp_hold(port)
    try:
        return flow.ask("x")
    finally:
        flow.close()


def test_a_10000_port_udp_range_costs_no_argument_no_process_and_constant_rules(
    dokku: DokkuHost, client_net: ClientNet
) -> None:
    """Issue 9: `10000-19999:10000-19999/udp` is one rule set the size of a 2-port range's,
    no docker argument (natports' DOCKER-USER accept), no docker-proxy; a client on a
    random port of the range is answered, and a redeploy switches new flows only."""
    first, last = 10000, 19999
    probes = random.sample(range(first, last + 1), 4)
    dokku.listen["rtp"] = [str(p) for p in probes]
    proxies = _docker_proxies()
    one = dokku.git_push("rtp", "v1", {"PORTS": f"{first}-{last}:{first}-{last}/udp\n"})
    assert one.ok, one.output
    assert one.args == {"web": []}
    assert _docker_proxies() == proxies
    assert _ask_udp(client_net, probes[0]) == "v1.web.1 x"
    held = client_net.udp_hold(probes[1])
    try:
        assert held.ask("a") == "v1.web.1 a"
        big = dokku.table()
        two = dokku.git_push("rtp", "v2", {"PORTS": f"{first}-{last}:{first}-{last}/udp\n"})
        assert two.ok, two.output
        assert _ask_udp(client_net, probes[2]) == "v2.web.1 x"  # new flows: the new release
        assert held.ask("b") == "v1.web.1 b"  # the flow that was open stays on the old one
    finally:
        held.close()
    assert len(dokku.table().splitlines()) == len(big.splitlines())
    small = dokku.git_push("rtp", "v3", {"PORTS": f"{first}-{first + 1}:{first}-{first + 1}/udp\n"})
    assert small.ok, small.output
    assert len(dokku.table().splitlines()) == len(big.splitlines())
    dokku.retire(one.old + two.old + small.old)
