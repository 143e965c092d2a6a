"""`natports doctor` tells the truth, also when a capability is taken away."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra import Cli


@pytest.fixture
def only(tmp_path: Path) -> Iterator[Any]:
    """Run the doctor with a PATH holding only the named tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    saved = dict(os.environ)

    def limit(*tools: str) -> None:
        for tool in tools:
            found = shutil.which(tool, path=saved["PATH"])
            assert found, tool
            (bin_dir / tool).symlink_to(found)
        os.environ["PATH"] = str(bin_dir)

    yield limit
    os.environ.clear()
    os.environ.update(saved)


def doctor(cli: Cli, expect: int = 0) -> dict[str, Any]:
    report = json.loads(cli("doctor", "--json", expect=expect).stdout)
    report["by_name"] = {c["name"]: c for c in report["checks"]}
    return dict(report)


IPTABLES = (
    "iptables",
    "iptables-nft-save",
    "iptables-nft-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "conntrack",
)


def test_this_host(cli: Cli) -> None:
    report = doctor(cli)
    checks = report["by_name"]
    for name in (
        "nft",
        "iptables",
        "cap_net_admin",
        "ip_forward",
        "docker",
        "docker_forward",
        "conntrack",
    ):
        assert checks[name]["ok"], checks[name]
    assert report["backend"] == "nftables" and report["backend_works"]
    assert "Docker 20.10" in checks["docker"]["detail"] or "Docker" in checks["docker"]["detail"]
    human = cli("doctor").stdout
    assert "backend: nftables (nft works)" in human


def test_without_nft_the_choice_falls_to_iptables(cli: Cli, only: Any) -> None:
    only(*IPTABLES)
    report = doctor(cli)
    nft = report["by_name"]["nft"]
    assert not nft["ok"] and nft["detail"] == "nft not found"
    assert nft["hint"] == "apt-get install nftables"
    assert report["backend"] == "iptables"


def test_without_netfilter_tools_and_no_proxy_nothing_works(cli: Cli, only: Any) -> None:
    only()
    report = doctor(cli, expect=1)
    assert report["backend"] == "proxy" and not report["backend_works"]
    assert not report["by_name"]["proxy"]["ok"]


def test_docker_stopped(cli: Cli, tmp_path: Path) -> None:
    os.environ["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    try:
        report = doctor(cli)
    finally:
        del os.environ["DOCKER_HOST"]
    docker = report["by_name"]["docker"]
    assert not docker["ok"] and docker["detail"].startswith("cannot reach Docker")
    assert report["backend"] == "nftables"  # routing itself still works
