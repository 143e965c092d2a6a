from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra import (
    Cli,
    ClientNet,
    Containers,
    create_dual_network,
    delete_iptables_chains,
    delete_natports_table,
    ipv6_forwarding,
    remove_dual_network,
    sh,
)


def _ip6_nat_rules() -> int | None:
    """Rules in nft's `table ip6 nat`, or None when there is no such table (or no nft)."""
    if shutil.which("nft") is None:
        return None
    found = sh("nft", "-j", "list", "table", "ip6", "nat", check=False)
    if found.returncode != 0:
        return None
    return sum("rule" in item for item in json.loads(found.stdout)["nftables"])


@pytest.fixture(scope="session", autouse=True)
def no_new_ip6_nat_table() -> Iterator[None]:
    """ip6tables-nft makes `table ip6 nat` on first use (the iptables backend's IPv6
    side): a host that had none before the tests has none after, if it is still empty."""
    had = _ip6_nat_rules() is not None
    yield
    if not had and _ip6_nat_rules() == 0:
        sh("nft", "delete", "table", "ip6", "nat", check=False)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
def family() -> int:
    """The address family a test drives: 4, unless it is parametrized (BOTH_FAMILIES)."""
    return 4


@pytest.fixture
def clean_kernel() -> Iterator[None]:
    """natports' table is gone before and after the test, whatever happens in it."""
    if shutil.which("nft") is None:
        pytest.fail("nft is not installed (run ./scripts/test)")
    delete_natports_table()
    yield
    delete_natports_table()
    delete_iptables_chains()


@pytest.fixture(scope="session")
def client_net() -> Iterator[ClientNet]:
    net = ClientNet.create(77)
    try:
        yield net
    finally:
        net.destroy()


@pytest.fixture(scope="session")
def client_net6() -> Iterator[ClientNet]:
    """A client netns that reaches the host over IPv6 only."""
    net = ClientNet.create(78, family=6)
    try:
        yield net
    finally:
        net.destroy()


@pytest.fixture(scope="session")
def dual_network() -> Iterator[str]:
    """The tests' dual-stack Docker network (see tests.infra.DUAL_NETWORK)."""
    with ipv6_forwarding():
        try:
            yield create_dual_network()
        finally:
            remove_dual_network()


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers()
    try:
        yield made
    finally:
        made.remove_all()
