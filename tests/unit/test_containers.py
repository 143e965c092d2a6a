"""Docker edge, pure parts: `docker inspect` output, the newest release, Dokku's files."""

from __future__ import annotations

import copy
import os
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from natports.containers import (
    ContainerInfo,
    container_files,
    current_containers,
    newest_release,
    parse_inspect,
)
from natports.model import Protocol

TCP = Protocol.TCP
UDP = Protocol.UDP

WEB_ID = "3f4e1c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"
IMAGE = "sha256:9b2a7d4c1e0f3a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b"

# Trimmed from real `docker inspect` output of a Dokku web container.
INSPECT: dict[str, Any] = {
    "Id": WEB_ID,
    "Created": "2024-05-01T10:00:00.123456789Z",
    "Path": "/start",
    "Args": ["web"],
    "State": {
        "Status": "running",
        "Running": True,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": 41231,
        "ExitCode": 0,
        "Error": "",
        "StartedAt": "2024-05-01T10:00:01.5Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
    },
    "Image": IMAGE,
    "Name": "/mail.web.1",
    "RestartCount": 0,
    "HostConfig": {
        "NetworkMode": "bridge",
        "PortBindings": {"5025/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
        "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 10},
    },
    "Config": {
        "Hostname": "3f4e1c2b9a8d",
        "ExposedPorts": {"5000/tcp": {}, "5025/tcp": {}},
        "Env": ["PORT=5000", "DOKKU_APP_TYPE=dockerfile"],
        "Cmd": ["/start", "web"],
        "Image": "dokku/mail:latest",
        "Labels": {
            "com.dokku.app-name": "mail",
            "com.dokku.container-type": "deploy",
            "com.dokku.dyno": "web.1",
            "com.dokku.process-type": "web",
            "dokku": "",
        },
    },
    "NetworkSettings": {
        "Bridge": "",
        "SandboxID": "5e1d0c9b8a7f",
        "Ports": {
            "5000/tcp": None,
            "5025/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32771"}],
        },
        "Gateway": "172.17.0.1",
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "IPAddress": "172.17.0.5",
        "IPPrefixLen": 16,
        "IPv6Gateway": "",
        "MacAddress": "02:42:ac:11:00:05",
        "Networks": {
            "bridge": {
                "IPAMConfig": None,
                "Links": None,
                "Aliases": None,
                "NetworkID": "8d6c1b0a9f8e",
                "EndpointID": "1c0b9a8f7e6d",
                "Gateway": "172.17.0.1",
                "IPAddress": "172.17.0.5",
                "IPPrefixLen": 16,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "MacAddress": "02:42:ac:11:00:05",
                "DriverOpts": None,
            }
        },
    },
}


def inspect(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(INSPECT)
    data.update(changes)
    return data


def test_a_running_web_container_on_the_default_bridge() -> None:
    assert parse_inspect(INSPECT) == ContainerInfo(
        id=WEB_ID,
        name="mail.web.1",
        running=True,
        process_type="web",
        ipv4=IPv4Address("172.17.0.5"),
        ipv6=None,
        subnets=("172.17.0.0/16",),
        published=frozenset({(5025, TCP)}),
        created="2024-05-01T10:00:00.123456789Z",
        image=IMAGE,
        app="mail",
        pid=41231,
        started_at="2024-05-01T10:00:01.5Z",
        container_type="deploy",
    )


def test_short_id() -> None:
    assert parse_inspect(INSPECT).short_id == "3f4e1c2b9a8d"


def test_ipv6_on_the_bridge() -> None:
    data = inspect()
    bridge = data["NetworkSettings"]["Networks"]["bridge"]
    bridge["GlobalIPv6Address"] = "fd00:dead:beef::5"
    bridge["GlobalIPv6PrefixLen"] = 64
    info = parse_inspect(data)
    assert info.ipv4 == IPv4Address("172.17.0.5")
    assert info.ipv6 == IPv6Address("fd00:dead:beef::5")
    assert info.subnets == ("172.17.0.0/16", "fd00:dead:beef::/64")


def test_the_default_bridge_wins_over_other_networks_then_name_order() -> None:
    data = inspect()
    networks = data["NetworkSettings"]["Networks"]
    networks["appnet"] = {
        "IPAddress": "10.0.1.5",
        "IPPrefixLen": 24,
        "GlobalIPv6Address": "fd00:1::5",
        "GlobalIPv6PrefixLen": 64,
    }
    networks["zeta"] = {
        "IPAddress": "10.0.9.5",
        "IPPrefixLen": 24,
        "GlobalIPv6Address": "fd00:9::5",
        "GlobalIPv6PrefixLen": 64,
    }
    info = parse_inspect(data)
    assert info.ipv4 == IPv4Address("172.17.0.5")
    # the bridge has no IPv6: the first other network by name gives it
    assert info.ipv6 == IPv6Address("fd00:1::5")
    assert info.subnets == ("172.17.0.0/16", "fd00:1::/64")


def test_a_user_defined_network_only() -> None:
    data = inspect()
    data["NetworkSettings"]["Networks"] = {
        "mail-net": {
            "IPAddress": "172.20.0.3",
            "IPPrefixLen": 16,
            "GlobalIPv6Address": "2001:db8:1::3",
            "GlobalIPv6PrefixLen": 48,
        }
    }
    info = parse_inspect(data)
    assert info.ipv4 == IPv4Address("172.20.0.3")
    assert info.ipv6 == IPv6Address("2001:db8:1::3")
    assert info.subnets == ("172.20.0.0/16", "2001:db8:1::/48")


def test_a_missing_prefix_length_means_a_host_route() -> None:
    data = inspect()
    data["NetworkSettings"]["Networks"] = {
        "odd": {"IPAddress": "10.1.2.3", "IPPrefixLen": 0, "GlobalIPv6Address": "fd00::3"}
    }
    info = parse_inspect(data)
    assert info.subnets == ("10.1.2.3/32", "fd00::3/128")


def test_published_ports() -> None:
    data = inspect()
    data["NetworkSettings"]["Ports"] = {
        "5000/tcp": None,
        "5025/tcp": [
            {"HostIp": "127.0.0.1", "HostPort": "32771"},
            {"HostIp": "::1", "HostPort": "32771"},
        ],
        "5053/udp": [{"HostIp": "127.0.0.1", "HostPort": "32772"}],
        "5060/udp": [],
        "9999/sctp": [{"HostIp": "127.0.0.1", "HostPort": "32773"}],
    }
    assert parse_inspect(data).published == frozenset({(5025, TCP), (5053, UDP)})


def test_a_stopped_container() -> None:
    data = inspect(
        State={"Status": "exited", "Running": False, "ExitCode": 137},
        Name="/mail.web.2",
    )
    data["NetworkSettings"] = {
        "Ports": {},
        "IPAddress": "",
        "Networks": {"bridge": {"IPAddress": "", "IPPrefixLen": 0, "GlobalIPv6Address": ""}},
    }
    info = parse_inspect(data)
    assert not info.running
    assert info.name == "mail.web.2"
    assert info.ipv4 is None
    assert info.ipv6 is None
    assert info.subnets == ()
    assert info.published == frozenset()


def test_a_container_without_labels_or_network_settings() -> None:
    info = parse_inspect({"Id": "abc", "Config": {"Labels": None}, "NetworkSettings": None})
    assert info == ContainerInfo(
        id="abc",
        name="",
        running=False,
        process_type=None,
        ipv4=None,
        ipv6=None,
        subnets=(),
        published=frozenset(),
        created="",
        image="",
    )


def test_a_worker_label() -> None:
    data = inspect()
    data["Config"]["Labels"]["com.dokku.process-type"] = "worker"
    assert parse_inspect(data).process_type == "worker"


def test_parse_inspect_does_not_change_its_input() -> None:
    data = inspect()
    parse_inspect(data)
    assert data == INSPECT


# -- newest_release ---------------------------------------------------------------------------


def info(
    name: str, created: str, image: str, running: bool = True, kind: str | None = "deploy"
) -> ContainerInfo:
    return ContainerInfo(
        id=f"id-{name}",
        name=name,
        running=running,
        process_type="web",
        ipv4=IPv4Address("172.17.0.2"),
        ipv6=None,
        subnets=("172.17.0.0/16",),
        published=frozenset({(5025, TCP)}),
        created=created,
        image=image,
        container_type=kind,
    )


def test_newest_release_keeps_the_newest_image_only() -> None:
    old1 = info("mail.web.1", "2024-05-01T10:00:00.1Z", "sha256:old")
    old2 = info("mail.web.2", "2024-05-01T10:00:01.1Z", "sha256:old")
    new2 = info("mail.web.2.1714560000", "2024-05-01T11:00:00.5Z", "sha256:new")
    new1 = info("mail.web.1.1714560000", "2024-05-01T11:00:00.2Z", "sha256:new")
    assert newest_release([old1, new2, old2, new1]) == [new1, new2]


def test_newest_release_ignores_stopped_containers() -> None:
    old = info("mail.web.1", "2024-05-01T10:00:00.1Z", "sha256:old")
    crashed = info("mail.web.1.x", "2024-05-01T11:00:00.1Z", "sha256:new", running=False)
    assert newest_release([old, crashed]) == [old]


def test_newest_release_of_nothing() -> None:
    assert newest_release([]) == []
    assert newest_release([info("a", "2024-05-01T10:00:00Z", "i", running=False)]) == []


def test_newest_release_takes_any_iterable() -> None:
    a = info("a", "2024-05-01T10:00:00.1Z", "i")
    assert newest_release(iter([a])) == [a]


def test_newest_release_compares_creation_times_not_their_text() -> None:
    # Created 100 ms and 120 ms into the same second, as Docker writes them.
    older = info("mail.web.1", "2024-05-01T10:00:00.1Z", "sha256:old")
    newer = info("mail.web.1.1714557600", "2024-05-01T10:00:00.12Z", "sha256:new")
    assert newest_release([older, newer]) == [newer]


# -- container_files --------------------------------------------------------------------------


def test_container_files(tmp_path: Path) -> None:
    app = tmp_path / "mail"
    app.mkdir()
    files = {
        "CONTAINER.web.1": "aaaaaaaaaaa1\n",
        "CONTAINER.web.2": "aaaaaaaaaaa2",
        "CONTAINER.web.10": "  aaaaaaaaaa10  \n",
        "CONTAINER.worker.1": "bbbbbbbbbbb1\n",
        "CONTAINER.mail_in-2.3": "ccccccccccc3\n",
        # not container files
        "CONTAINER": "legacy\n",
        "CONTAINER.web": "no-index\n",
        "CONTAINER.web.x": "bad-index\n",
        "CONTAINER.1.1": "bad-process-type\n",
        "CONTAINER.web.1.bak": "backup\n",
        "ENV": "export PORT=5000\n",
        "URLS": "http://mail.example\n",
        "PORTS": "25:5025\n",
        # empty: no container
        "CONTAINER.web.3": "\n",
    }
    for name, text in files.items():
        (app / name).write_text(text)
    (app / "CONTAINER.web.4").mkdir()  # unreadable as a file
    assert container_files(tmp_path, "mail") == {
        "web": ["aaaaaaaaaaa1", "aaaaaaaaaaa2", "aaaaaaaaaa10"],
        "worker": ["bbbbbbbbbbb1"],
        "mail_in-2": ["ccccccccccc3"],
    }


def test_container_files_never_leak_other_files(tmp_path: Path) -> None:
    """Read as root from files the dokku user controls: only container ids come out."""
    app = tmp_path / "mail"
    app.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root:$y$hash\n")
    (app / "CONTAINER.web.1").symlink_to(secret)
    os.mkfifo(app / "CONTAINER.web.2")  # would block a plain read
    (app / "CONTAINER.web.3").write_text("not an id\n")
    (app / "CONTAINER.web.4").write_text("0123456789ab\n")
    assert container_files(tmp_path, "mail") == {"web": ["0123456789ab"]}


def test_container_files_are_in_numeric_order(tmp_path: Path) -> None:
    app = tmp_path / "mail"
    app.mkdir()
    for n in (10, 2, 1, 11, 3, 20):
        (app / f"CONTAINER.web.{n}").write_text(f"{n:012x}\n")
    assert container_files(tmp_path, "mail") == {
        "web": [f"{n:012x}" for n in (1, 2, 3, 10, 11, 20)]
    }


def test_container_files_of_a_missing_app(tmp_path: Path) -> None:
    assert container_files(tmp_path, "nope") == {}
    assert container_files(tmp_path / "no-root", "mail") == {}


def test_container_files_of_an_app_without_containers(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "ENV").write_text("")
    assert container_files(tmp_path, "mail") == {}


# -- Dokku's facts: initial network, `dokku run` containers, scale to 0 ------------------------


def test_the_initial_network_wins_over_the_bridge() -> None:
    """`network:set APP initial-network appnet`: Dokku reads the address there
    (plugins/network/network.go:119-128), not on the bridge or the first name."""
    data = inspect()
    data["HostConfig"]["NetworkMode"] = "appnet"
    data["NetworkSettings"]["Networks"]["appnet"] = {"IPAddress": "10.0.1.5", "IPPrefixLen": 24}
    data["NetworkSettings"]["Networks"]["aaa"] = {"IPAddress": "10.0.0.5", "IPPrefixLen": 24}
    info = parse_inspect(data)
    assert info.ipv4 == IPv4Address("10.0.1.5")
    assert info.subnets == ("10.0.1.0/24",)


def test_without_an_initial_network_the_bridge_wins_over_names() -> None:
    data = inspect()
    data["HostConfig"]["NetworkMode"] = "default"
    data["NetworkSettings"]["Networks"]["aaa"] = {"IPAddress": "10.0.0.5", "IPPrefixLen": 24}
    assert parse_inspect(data).ipv4 == IPv4Address("172.17.0.5")


def test_dokku_run_containers_are_never_the_newest_release() -> None:
    deployed = info("mail.web.1", "2024-05-01T10:00:00.1Z", "sha256:new")
    one_off = info("mail.run.1", "2024-05-01T12:00:00.1Z", "sha256:new", kind="run")
    assert newest_release([deployed, one_off]) == [deployed]
    assert newest_release([one_off]) == []


class FakeDocker:
    """Only for current_containers' choice between files, scale 0 and labels."""

    def __init__(self, labelled: list[ContainerInfo]) -> None:
        self._labelled = labelled
        self.asked: list[str] = []

    def inspect(self, ref: str) -> ContainerInfo:
        return info(ref, "2024-05-01T10:00:00.1Z", "sha256:new")

    def labelled(self, app: str, process_type: str) -> list[ContainerInfo]:
        self.asked.append(process_type)
        return self._labelled


def test_a_dokku_app_without_files_for_a_type_runs_none_of_it(tmp_path: Path) -> None:
    """Scaled to 0: the labelled containers of that type are old ones draining."""
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "CONTAINER.web.1").write_text("aaaaaaaaaaa1")
    draining = info("mail.worker.1.1714560000", "2024-05-01T11:00:00.5Z", "sha256:old")
    docker = FakeDocker([draining])
    found = current_containers(docker, tmp_path, "mail", ["web", "worker"])  # type: ignore[arg-type]
    assert found["worker"] == [] and [c.id for c in found["web"]] == ["id-aaaaaaaaaaa1"]
    assert docker.asked == []


def test_outside_dokku_the_labels_choose_and_nothing_found_is_absent(tmp_path: Path) -> None:
    running = info("mail.web.1", "2024-05-01T11:00:00.5Z", "sha256:new")
    assert current_containers(FakeDocker([running]), tmp_path, "mail", ["web"]) == {  # type: ignore[arg-type]
        "web": [running]
    }
    assert current_containers(FakeDocker([]), tmp_path, "mail", ["web"]) == {}  # type: ignore[arg-type]
