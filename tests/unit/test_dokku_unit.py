"""The Dokku plugin's use cases over fakes: stage at pre-build, docker args, promote at
post-deploy, ports:set, stop, delete, rename, report; and `natports dokku ...` on top.

The order of a deploy is Dokku's: stage (pre-build) -> docker-args --check (once per
process type) -> containers start -> promote (post-deploy).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from natports import build_source, dokku
from natports.cli import main
from natports.containers import AppProblem
from natports.errors import InputError, NatportsError
from natports.model import Mapping, Protocol
from tests.unit.fakes import (
    World,
    cli_args,
    container,
    dokku_files,
    make_context,
    patch_cli,
    quiet_host,
)

UDP = Protocol.UDP
BUILD = str(os.getpid())  # a live process, as DOKKU_PID is during a deploy
DEAD_BUILD = "999999999"  # no such process: a build that is over


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    quiet_host(monkeypatch)
    return make_context(tmp_path)


def run_containers(world: World, app: str, *ips: str, published: object = (5025,)) -> None:
    found = [
        container(f"{app}{i}", ip, app=app, published=published)  # type: ignore[arg-type]
        for i, ip in enumerate(ips, start=1)
    ]
    world.docker.add(*found)
    dokku_files(world.ctx.dokku_root, app, web=found)


def deploy(world: World, app: str, ports: bytes | None, *ips: str) -> dokku.Stage:
    staged = dokku.stage(world.ctx, app, BUILD, ports)
    run_containers(world, app, *ips)
    return staged


# -- a whole deploy -------------------------------------------------------------------------


def test_a_deploy_stages_publishes_then_promotes_and_routes(world: World) -> None:
    staged = dokku.stage(world.ctx, "mail", BUILD, b"25:5025\nworker: 53:5053/udp\n")
    assert staged.ports_file == (Mapping(25, 5025), Mapping(53, 5053, UDP, process_type="worker"))
    assert world.ctx.store.mappings("mail") is None  # nothing live before post-deploy
    assert dokku.docker_args(world.ctx, "mail", "web", BUILD, check=True) == [
        "-p",
        "127.0.0.1::5025",
    ]
    assert dokku.docker_args(world.ctx, "mail", "worker", BUILD) == ["-p", "127.0.0.1::5053/udp"]
    run_containers(world, "mail", "172.17.0.2")
    world.docker.add(container("w1", "172.17.0.3", proc="worker", published=[(5053, UDP)]))
    dokku_files(
        world.ctx.dokku_root,
        "mail",
        web=[world.docker.inspect("mail1")],
        worker=[world.docker.inspect("w1")],
    )
    report, warnings = dokku.promote(world.ctx, "mail", None, BUILD)
    assert warnings == []
    assert report is not None and report.applied == ("mail",)
    assert world.nft.ports() == {25: ["172.17.0.2"], 53: ["172.17.0.3"]}
    assert world.ctx.store.stage("mail") is None
    # Later restarts (no build) publish from the live sources.
    assert dokku.docker_args(world.ctx, "mail", "web", None) == ["-p", "127.0.0.1::5025"]


def test_a_bad_ports_file_fails_the_build_and_leaves_no_stage(world: World) -> None:
    dokku.stage(world.ctx, "mail", BUILD, b"25:5025\n")
    with pytest.raises(InputError) as err:
        dokku.stage(world.ctx, "mail", BUILD, b"25:5025\n26:abc\n")
    assert err.value.problems[0].startswith("PORTS:2:")
    assert world.ctx.store.stage("mail") is None
    with pytest.raises(InputError, match="larger than"):
        dokku.stage(world.ctx, "mail", BUILD, b"#" * (70 * 1024))
    with pytest.raises(InputError, match="not a process id"):
        dokku.stage(world.ctx, "mail", "12; rm -rf /", b"25:5025\n")


def test_a_port_of_another_app_fails_the_build(world: World) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    dokku.promote(world.ctx, "mail", None, BUILD)
    with pytest.raises(InputError, match=r"PORTS:1:1: .*mail"):
        dokku.stage(world.ctx, "shop", BUILD, b"25:5000\n")


def test_a_port_taken_after_staging_is_refused_at_docker_args_and_promote(
    world: World,
) -> None:
    dokku.stage(world.ctx, "shop", BUILD, b"25:5000\n")
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")  # mail's build stages 25 too
    dokku.promote(world.ctx, "mail", None, BUILD)  # ... and goes live first
    with pytest.raises(InputError) as err:
        dokku.docker_args(world.ctx, "shop", "web", BUILD, check=True)
    assert err.value.problems[0].startswith("PORTS 25:5000/tcp: ")
    with pytest.raises(InputError, match=r"^PORTS 25:5000/tcp: "):
        dokku.promote(world.ctx, "shop", None, BUILD)
    assert world.nft.ports("mail") == {25: ["172.17.0.2"]}


def test_a_stage_left_by_a_build_that_is_over_is_dropped_not_promoted(world: World) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    dokku.promote(world.ctx, "mail", None, BUILD)
    dokku.stage(world.ctx, "mail", BUILD, b"26:5025\n")  # this build then fails
    # ... a later deploy (another DOKKU_PID) without a stage of its own:
    _, warnings = dokku.promote(world.ctx, "mail", None, DEAD_BUILD)
    assert warnings == []  # the stage's build (this process) still runs: kept
    record = world.ctx.store.stage("mail")
    assert record is not None
    world.ctx.store.set_stage("mail", dataclasses.replace(record, build="not-a-key"))
    _, warnings = dokku.promote(world.ctx, "mail", None, BUILD)
    assert warnings == ["dropped the PORTS staged by an earlier build that never deployed"]
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    assert dokku.report(world.ctx, "mail")["staged"] is False


def test_the_port_map_adds_entries_and_ports_wins_a_clash(world: World) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    world.docker.add(container("mail1", "172.17.0.2", app="mail", published=[5025, (5053, UDP)]))
    report, warnings = dokku.promote(
        world.ctx, "mail", ["http:80:5000", "tcp:25:6000", "udp:53:5053", "tcp:x:1"], BUILD
    )
    assert warnings == [
        'ports:set entry "tcp:x:1" is not SCHEME:HOST_PORT:CONTAINER_PORT',
        "ports:set tcp:25:6000 is overridden by PORTS",
    ]
    assert world.ctx.store.mappings("mail") == (Mapping(25, 5025), Mapping(53, 5053, UDP))
    assert dokku.report(world.ctx, "mail")["overridden_by_ports_file"] == ["25:6000/tcp"]
    assert dokku.docker_args(world.ctx, "mail", "web", None) == [
        "-p",
        "127.0.0.1::5025",
        "-p",
        "127.0.0.1::5053/udp",
    ]
    assert report is not None and report.applied == ("mail",)
    assert world.nft.ports() == {25: ["172.17.0.2"], 53: ["172.17.0.2"]}


def test_a_port_map_entry_another_app_holds_is_a_warning_not_a_failure(world: World) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    dokku.promote(world.ctx, "mail", None, BUILD)
    run_containers(world, "shop", "172.17.0.8", published=(5000,))
    report, warnings = dokku.promote(world.ctx, "shop", ["tcp:25:5000", "tcp:8080:5000"])
    assert len(warnings) == 1 and warnings[0].startswith("ports:set tcp:25:5000 is not routed:")
    assert report is not None and world.nft.ports("shop") == {8080: ["172.17.0.8"]}
    assert dokku.promote(world.ctx, "shop", ["tcp:99999:1"])[1] == [
        'ports:set entry "tcp:99999:1": port out of range (1-65535)'
    ]
    assert world.nft.ports("shop") == {}  # an empty map: nothing routed any more
    assert world.ctx.store.mappings("shop") is None


def test_a_promote_of_an_app_without_containers_keeps_the_new_sources(world: World) -> None:
    with pytest.raises(AppProblem):
        dokku.promote(world.ctx, "shop", ["tcp:8080:5000"])
    assert dokku.report(world.ctx, "shop")["ports_map"] == ["8080:5000/tcp"]


# -- life cycle -------------------------------------------------------------------------


def test_reapply_follows_new_addresses(world: World) -> None:
    assert dokku.reapply(world.ctx, "mail") is None  # never configured
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    dokku.promote(world.ctx, "mail", None, BUILD)
    assert dokku.reapply(world.ctx, "mail") is not None
    run_containers(world, "mail", "172.17.0.7")  # ps:restart, reboot
    dokku.reapply(world.ctx, "mail")
    assert world.nft.ports() == {25: ["172.17.0.7"]}


def test_stop_delete_rename(world: World) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    dokku.promote(world.ctx, "mail", None, BUILD)
    dokku.stop(world.ctx, "mail")
    assert world.nft.ports() == {} and world.ctx.store.mappings("mail") is not None
    dokku.reapply(world.ctx, "mail")
    dokku.rename(world.ctx, "mail", "post")
    assert world.nft.ports() == {}  # the old name's rules are gone
    assert world.ctx.store.mappings("mail") is None
    assert world.ctx.store.mappings("post") == (Mapping(25, 5025),)
    assert dokku.known_apps(world.ctx) == ["post"]
    dokku.delete(world.ctx, "post")
    assert dokku.known_apps(world.ctx) == []
    dokku.stage(world.ctx, "mail", BUILD, None)
    dokku.discard_stage(world.ctx, "mail")
    assert world.ctx.store.stage("mail") is None


def test_stop_and_rename_remove_the_rules_from_the_backend_that_serves_the_app(
    world: World,
) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    dokku.promote(world.ctx, "mail", None, BUILD)
    world.use("iptables")  # the operator switched; mail was not applied since
    dokku.rename(world.ctx, "mail", "post")
    assert world.nft.ports() == {} and world.ipt.ports() == {}
    run_containers(world, "post", "172.17.0.2")  # Dokku renamed the app's containers too
    dokku.reapply(world.ctx, "post")
    assert world.ipt.ports("post") == {25: ["172.17.0.2"]}
    dokku.stop(world.ctx, "post")
    assert world.ipt.ports() == {}


def test_report_describes_sources_backends_and_kind(world: World) -> None:
    deploy(world, "mail", b"25:5025\n", "172.17.0.2")
    world.docker.add(container("mail1", "172.17.0.2", app="mail", published=[5025, 5026]))
    dokku.promote(world.ctx, "mail", ["tcp:26:5026"], BUILD)
    assert dokku.report(world.ctx, "mail") == {
        "app": "mail",
        "mappings": ["25:5025/tcp", "26:5026/tcp"],
        "ports_file": ["25:5025/tcp"],
        "ports_map": ["26:5026/tcp"],
        "overridden_by_ports_file": [],
        "staged": False,
        "routed_ports": 2,
        "backends": [f"{world.docker.inspect('mail1').id[:12]}@172.17.0.2"],
        "backend": "nftables",
        # live flows per target from (the fake) conntrack: none yet
        "flows": ["172.17.0.2:5025=0", "172.17.0.2:5026=0"],
    }
    empty = dokku.report(world.ctx, "none")
    assert empty["ports_file"] is None and empty["backend"] is None


# -- PORTS from an image (git:from-image) --------------------------------------------------


def test_ports_is_read_from_the_images_working_directory_then_app(world: World) -> None:
    world.docker.images["mail:v2"] = {"/app/PORTS": b"25:5025\n"}
    staged = dokku.stage(world.ctx, "mail", BUILD, None, image="mail:v2")
    assert staged.ports_file == (Mapping(25, 5025),)
    world.docker.images["mail:v3"] = {"/srv/PORTS": b"26:5025\n", "/app/PORTS": b"27:1\n"}
    world.docker.workdirs["mail:v3"] = "/srv"
    assert build_source.read_ports_from_image(world.ctx, "mail:v3") == b"26:5025\n"
    world.docker.images["mail:v4"] = {}
    assert build_source.read_ports_from_image(world.ctx, "mail:v4") is None
    assert sorted(world.docker.api.removed) == sorted(world.docker.api.created)  # cleaned up


def test_a_bad_image_is_refused(world: World) -> None:
    with pytest.raises(InputError, match="not an image reference"):
        dokku.stage(world.ctx, "mail", BUILD, None, image="mail;rm")
    with pytest.raises(NatportsError, match="cannot read PORTS from image nope"):
        build_source.read_ports_from_image(world.ctx, "nope")


def tar_of(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def symlink_tar() -> bytes:
    info = tarfile.TarInfo("PORTS")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/shadow"
    return tar_of(info)


def oversize_member_tar() -> bytes:
    info = tarfile.TarInfo("PORTS")
    info.size = 70 * 1024
    return tar_of(info, b"#" * info.size)


class ArchiveApi:
    """An image whose PORTS archive is what a test says."""

    def __init__(self, archive: list[bytes]) -> None:
        self.archive = archive

    def inspect_image(self, image: str) -> dict[str, object]:
        return {}

    def create_container(self, image: str, **_: object) -> dict[str, str]:
        return {"Id": "t"}

    def get_archive(self, ident: str, path: str) -> tuple[list[bytes], dict[str, object]]:
        return self.archive, {}

    def remove_container(self, ident: str, force: bool = False) -> None:
        pass


@pytest.mark.parametrize(
    ("archive", "why"),
    [
        ([symlink_tar()], "not a regular file"),
        ([oversize_member_tar()], "larger than"),
        ([b"\0" * 50_000] * 3, "larger than"),  # a stream past any one-file tar
    ],
)
def test_a_ports_in_an_image_that_is_not_a_small_regular_file_is_refused(
    world: World, archive: list[bytes], why: str
) -> None:
    world.docker.api = ArchiveApi(archive)  # type: ignore[assignment]
    with pytest.raises(InputError, match=why):
        build_source.read_ports_from_image(world.ctx, "mail:v2")


def test_a_refused_image_ports_fails_the_build_and_leaves_no_stage(
    world: World, cmd: Dokku
) -> None:
    dokku.stage(world.ctx, "mail", BUILD, b"25:5025\n")
    world.docker.api = ArchiveApi([symlink_tar()])  # type: ignore[assignment]
    result = cmd("stage", "mail", "--build", BUILD, "--image", "mail:v2")
    assert result.exit_code == 2 and "not a regular file" in result.output
    assert world.ctx.store.stage("mail") is None


def test_an_empty_archive_means_no_ports(world: World) -> None:
    world.docker.api = ArchiveApi([b"\0" * 1024])  # type: ignore[assignment]
    assert build_source.read_ports_from_image(world.ctx, "mail:v2") is None


# -- the build's work dir, read as the dokku user ----------------------------------------------


def test_read_build_source(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    assert build_source.read_build_source(work) == build_source.BuildSource(None, None)
    (work / "Dockerfile").write_text(
        "FROM mail:v2\nLABEL com.dokku.docker-image-labeler/alternate-tags=[]\n"
    )
    assert build_source.read_build_source(work) == build_source.BuildSource(None, "mail:v2")
    (work / "PORTS").write_text("25:5025\n")
    assert build_source.read_build_source(work) == build_source.BuildSource(b"25:5025\n", None)
    (work / "PORTS").unlink()
    (work / "PORTS").symlink_to(tmp_path / "secret")
    with pytest.raises(InputError, match="symbolic link"):
        build_source.read_build_source(work)
    (work / "PORTS").unlink()
    os.mkfifo(work / "PORTS")
    with pytest.raises(InputError, match="not a regular file"):
        build_source.read_build_source(work)
    (work / "PORTS").unlink()
    (work / "PORTS").write_bytes(b"#" * (65 * 1024))
    with pytest.raises(InputError, match="larger than"):
        build_source.read_build_source(work)
    with pytest.raises(InputError, match="cannot open the build's work dir"):
        build_source.read_build_source(tmp_path / "missing")


def test_a_dockerfile_that_is_not_a_small_regular_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").symlink_to("/etc/passwd")
    assert build_source.read_build_source(tmp_path) == build_source.BuildSource(None, None)
    (tmp_path / "Dockerfile").unlink()
    (tmp_path / "Dockerfile").mkdir()
    assert build_source.read_build_source(tmp_path) == build_source.BuildSource(None, None)


def test_docker_args_of_an_unknown_app_publish_nothing(world: World) -> None:
    assert dokku.docker_args(world.ctx, "ghost", "web", None) == []


def test_image_of_dockerfile_needs_dokkus_two_lines() -> None:
    label = b"LABEL com.dokku.docker-image-labeler/alternate-tags=[]\n"
    assert build_source.image_of_dockerfile(b"FROM a/b:1\n" + label) == "a/b:1"
    assert build_source.image_of_dockerfile(b"FROM a/b:1\n") is None
    assert build_source.image_of_dockerfile(b"FROM a b\n" + label) is None


# -- `natports dokku ...` ----------------------------------------------------------------------


class Dokku:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, stdin: str | bytes | None = None) -> Result:
        return CliRunner().invoke(main, [*cli_args(self.root), "dokku", *args], input=stdin)


@pytest.fixture
def cmd(tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch) -> Dokku:
    patch_cli(monkeypatch, world)
    return Dokku(tmp_path)


def test_trigger_commands_of_a_deploy(cmd: Dokku, world: World) -> None:
    result = cmd("stage", "mail", "--build", BUILD, stdin="25:5025\n")
    assert result.output == "natports: mail: PORTS: 1 mapping(s) checked for this deploy\n"
    result = cmd("docker-args", "mail", "web", "--build", BUILD, "--check")
    assert result.output == "-p 127.0.0.1::5025\n"
    assert cmd("docker-args", "mail", "worker", "--build", BUILD).output == ""
    run_containers(world, "mail", "172.17.0.2")
    result = cmd("post-deploy", "mail", "--build", BUILD, "--ports-map", "http:80:5000")
    assert result.exit_code == 0
    assert result.output == "natports: mail: new connections now go to the new containers\n"
    assert world.nft.ports() == {25: ["172.17.0.2"]}
    result = cmd("stage", "shop", "--build", BUILD, "--no-ports-file")
    assert result.output == "natports: shop: no PORTS file mapping(s) checked for this deploy\n"


def test_post_deploy_never_fails_a_deploy_that_dokku_already_switched(
    cmd: Dokku, world: World
) -> None:
    cmd("stage", "mail", "--build", BUILD, stdin="25:5025\n")
    result = cmd("post-deploy", "mail", "--build", BUILD)  # no container runs
    assert result.exit_code == 0
    assert "natports: mail: kept its previous routes: " in result.stderr
    run_containers(world, "shop", "172.17.0.8", published=(5000,))
    world.ctx.store.set_mappings("shop", (Mapping(25, 5000),))
    cmd("apply", "shop")
    cmd("stage", "mail", "--build", BUILD, stdin="25:5025\n")  # raced by shop
    result = cmd("post-deploy", "mail", "--build", BUILD)
    assert result.exit_code == 0
    assert "the new PORTS is not live; the previous one stays in effect" in result.stderr


def test_a_refused_stage_exits_2(cmd: Dokku) -> None:
    result = cmd("stage", "mail", "--build", BUILD, stdin="25:abc\n")
    assert result.exit_code == 2 and result.output.startswith("PORTS:1:")


def test_ports_update_apply_stop_delete_rename_clone(cmd: Dokku, world: World) -> None:
    result = cmd("ports-update", "mail", "--ports-map", "tcp:25:5025")
    assert result.exit_code == 0 and "map stored; not routed yet" in result.stderr
    run_containers(world, "mail", "172.17.0.2")
    result = cmd("ports-update", "mail", "--ports-map", "tcp:25:5025 tcp:26:1:2")
    assert "natports: mail: port map applied" in result.stdout
    assert "warning: ports:set entry" in result.stderr
    assert cmd("apply", "mail").output == "natports: mail: routed to the current containers\n"
    world.docker.remove("mail1")
    result = cmd("apply", "mail")
    assert result.exit_code == 1 and "kept its previous routes" in result.stderr
    run_containers(world, "mail", "172.17.0.3")
    cmd("apply", "mail")
    assert cmd("stop", "mail").exit_code == 0 and world.nft.ports() == {}
    cmd("apply", "mail")
    assert cmd("rename", "mail", "post").exit_code == 0
    assert cmd("list").output == "post\t25:5025/tcp\n"
    result = cmd("clone", "post", "copy")
    assert "public ports are not cloned from post" in result.output
    assert cmd("delete", "post").exit_code == 0 and cmd("list").output == ""
    # A name natports cannot hold anything for: nothing done, and Dokku's destroy goes on.
    bad = cmd("delete", "Bad!")
    assert bad.exit_code == 0
    assert '"Bad!" is not an app name natports serves; nothing done' in bad.stderr


def test_report_and_flush_all(cmd: Dokku, world: World) -> None:
    run_containers(world, "mail", "172.17.0.2")
    cmd("ports-update", "mail", "--ports-map", "tcp:25:5025")
    text = cmd("report", "mail").output.splitlines()
    assert text[0] == "=====> mail natports information"
    assert text[1].split() == ["Natports", "mappings:", "25:5025/tcp"]
    assert any(line.split() == ["Natports", "backend:", "nftables"] for line in text)
    one = json.loads(cmd("report", "mail", "--format", "json").output)
    assert one["routed_ports"] == 1
    every = json.loads(cmd("report", "--format", "json").output)
    assert [r["app"] for r in every] == ["mail"]
    assert cmd("flush-all").exit_code == 0 and world.nft.ports() == {}


def test_read_source_refuses_root_and_prints_ports_otherwise(
    cmd: Dokku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    result = cmd("read-source", str(work))
    assert result.exit_code == 2 and "never as root" in result.output
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cmd("read-source", str(work)).exit_code == dokku_cli_exit("NO_PORTS_EXIT")
    (work / "Dockerfile").write_text(
        "FROM mail:v2\nLABEL com.dokku.docker-image-labeler/alternate-tags=[]\n"
    )
    result = cmd("read-source", str(work))
    assert (result.exit_code, result.output) == (3, "mail:v2\n")
    (work / "PORTS").write_text("25:5025\n")
    result = cmd("read-source", str(work))
    assert (result.exit_code, result.output) == (0, "25:5025\n")
    (work / "PORTS").unlink()
    (work / "PORTS").symlink_to("/etc/passwd")
    result = cmd("read-source", str(work))
    assert result.exit_code == 4 and "symbolic link" in result.output


def dokku_cli_exit(name: str) -> int:
    from natports import dokku_cli

    return int(getattr(dokku_cli, name))


@pytest.mark.parametrize(
    "args",
    [
        ["stage", "Bad_App", "--build", BUILD, "--no-ports-file"],
        ["docker-args", "Bad_App", "web"],
        ["post-deploy", "Bad_App"],
        ["ports-update", "Bad_App", "--ports-map", "tcp:25:5025"],
        ["stop", "Bad_App"],
        ["rename", "Bad_App", "good"],
        ["clone", "good", "Bad_App"],
        ["report", "Bad_App"],
    ],
)
def test_a_trigger_for_a_name_natports_cannot_hold_does_nothing_and_succeeds(
    cmd: Dokku, world: World, args: list[str]
) -> None:
    result = cmd(*args)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert '"Bad_App" is not an app name natports serves; nothing done' in result.stderr
    assert world.ctx.store.apps() == [] and world.nft.runs == 0


def test_proxy_build_config_inside_a_deploy_leaves_routing_to_post_deploy(
    cmd: Dokku, world: World
) -> None:
    run_containers(world, "mail", "172.17.0.2")
    cmd("ports-update", "mail", "--ports-map", "tcp:25:5025")
    cmd("stage", "mail", "--build", BUILD, stdin="26:5025\n")
    run_containers(world, "mail", "172.17.0.3")  # the new release's web container is up
    assert cmd("apply", "mail", "--build", BUILD).output == ""
    assert world.nft.ports() == {25: ["172.17.0.2"]}  # untouched until post-deploy
    cmd("post-deploy", "mail", "--build", BUILD)
    assert world.nft.ports() == {25: ["172.17.0.3"], 26: ["172.17.0.3"]}  # map + PORTS
    result = cmd("apply", "mail", "--build", DEAD_BUILD)  # ps:restart: no stage of its own
    assert result.output == "natports: mail: routed to the current containers\n"
