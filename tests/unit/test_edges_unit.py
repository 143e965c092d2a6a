"""The Docker and conntrack adapters over fakes of the libraries they wrap: what they ask,
how they read the answers, and which natports error a library failure becomes."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import pytest
import requests.exceptions

from natports.conntrack import Conntrack, Flow, local_addresses
from natports.containers import AppProblem, Docker
from natports.errors import NatportsError
from natports.model import Protocol
from tests.unit.test_containers import INSPECT, WEB_ID

TCP, UDP = Protocol.TCP, Protocol.UDP

# -- Docker ---------------------------------------------------------------------------------


class SdkApi:
    def __init__(self) -> None:
        self.containers_by_id: dict[str, dict[str, Any]] = {WEB_ID: copy.deepcopy(INSPECT)}
        self.failure: Exception | None = None
        self.filters: list[dict[str, Any]] = []

    def inspect_container(self, ref: str) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        if ref not in self.containers_by_id:
            raise docker.errors.NotFound(f"No such container: {ref}")
        return self.containers_by_id[ref]

    def containers(self, all: bool, filters: dict[str, Any]) -> list[dict[str, str]]:
        if self.failure is not None:
            raise self.failure
        self.filters.append(filters)
        return [{"Id": cid} for cid in self.containers_by_id]


class SdkClient:
    def __init__(self, api: SdkApi, reachable: bool = True) -> None:
        self.api = api
        self.reachable = reachable

    def ping(self) -> bool:
        if not self.reachable:
            raise requests.exceptions.ConnectionError("Connection refused\nmore")
        return True


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> SdkApi:
    made = SdkApi()
    monkeypatch.setattr(docker, "from_env", lambda **_: SdkClient(made))
    return made


def test_docker_inspects_lists_and_observes(api: SdkApi) -> None:
    client = Docker()
    assert client.client.api is api
    info = client.inspect(WEB_ID)
    assert (info.name, str(info.ipv4), info.app) == ("mail.web.1", "172.17.0.5", "mail")
    assert [c.id for c in client.labelled("mail", "web")] == [WEB_ID]
    assert api.filters == [{"label": ["com.dokku.app-name=mail", "com.dokku.process-type=web"]}]
    assert client.observe([WEB_ID, "gone", WEB_ID]) == {WEB_ID: info, "gone": None}
    with pytest.raises(AppProblem, match='container "gone" does not exist'):
        client.inspect("gone")


def test_docker_failures_are_runtime_errors(api: SdkApi) -> None:
    client = Docker()
    api.failure = requests.exceptions.ReadTimeout("read timed out")
    with pytest.raises(NatportsError, match=f"Docker failed to inspect {WEB_ID}: read timed"):
        client.inspect(WEB_ID)
    api.failure = docker.errors.APIError("500 Server Error")
    with pytest.raises(NatportsError, match="Docker failed to list containers: 500"):
        client.labelled("mail", "web")


def test_unreachable_docker_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docker, "from_env", lambda **_: SdkClient(SdkApi(), reachable=False))
    with pytest.raises(NatportsError) as err:
        Docker()
    assert err.value.message == "cannot reach Docker: Connection refused"
    assert err.value.hint is not None and "DOCKER_HOST" in err.value.hint


# -- conntrack ------------------------------------------------------------------------------


@dataclass
class Tuple:
    saddr: str
    daddr: str
    sport: int | None
    dport: int | None


class ProtoInfo:
    def __init__(self, state: str) -> None:
        self.state = state

    def state_name(self) -> str:
        return self.state


@dataclass
class Entry:
    tuple_orig: Tuple
    tuple_reply: Tuple
    protoinfo: ProtoInfo | None = None


class FakeNetlink:
    """pyroute2.Conntrack: a dump per family, deletions recorded, failures on demand."""

    entries: ClassVar[dict[int, list[Entry]]] = {}
    deleted: ClassVar[list[tuple[int, Any]]] = []
    missing: ClassVar[set[str]] = set()  # client addresses whose entry idled out meanwhile
    refuse_open = False
    refuse_dump = False
    closed = 0

    def __init__(self, nfgen_family: int) -> None:
        if FakeNetlink.refuse_open:
            raise PermissionError(1, "Operation not permitted")
        self.family = nfgen_family

    def dump_entries(self, tuple_orig: Any) -> Iterator[Entry]:
        if FakeNetlink.refuse_dump:
            raise OSError(105, "No buffer space available")
        yield from FakeNetlink.entries.get(self.family, [])

    def entry(self, command: str, tuple_orig: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        assert command == "del" and tuple_orig.proto == socket.IPPROTO_UDP
        if tuple_orig.saddr in FakeNetlink.missing:
            raise NetlinkError(2, "No such file or directory")
        if tuple_orig.saddr == "203.0.113.66":
            raise NetlinkError(1, "Operation not permitted")
        FakeNetlink.deleted.append((self.family, tuple_orig.saddr))

    def close(self) -> None:
        FakeNetlink.closed += 1


@pytest.fixture
def netlink(monkeypatch: pytest.MonkeyPatch) -> type[FakeNetlink]:
    import pyroute2

    monkeypatch.setattr(pyroute2, "Conntrack", FakeNetlink)
    FakeNetlink.entries = {}
    FakeNetlink.deleted = []
    FakeNetlink.missing = set()
    FakeNetlink.refuse_open = FakeNetlink.refuse_dump = False
    FakeNetlink.closed = 0
    return FakeNetlink


def flow(client: str, target: str, family: int = 4) -> Flow:
    public = "198.51.100.1" if family == 4 else "2001:db8::1"
    return Flow(
        family,
        UDP,
        ip_address(client),
        40000,
        ip_address(public),
        53,
        ip_address(target),
        5053,
    )


def test_flows_are_read_from_one_dump(netlink: type[FakeNetlink]) -> None:
    netlink.entries[socket.AF_INET] = [
        Entry(
            Tuple("203.0.113.9", "198.51.100.1", 40000, 25),
            Tuple("172.17.0.2", "203.0.113.9", 5025, 40000),
            ProtoInfo("ESTABLISHED"),
        ),
        Entry(Tuple("203.0.113.9", "198.51.100.1", None, None), Tuple("a", "b", None, None)),
    ]
    [found] = Conntrack().flows(TCP, 4)
    assert found == Flow(
        4,
        TCP,
        ip_address("203.0.113.9"),
        40000,
        ip_address("198.51.100.1"),
        25,
        ip_address("172.17.0.2"),
        5025,
        "ESTABLISHED",
    )
    assert found.natted and found.established
    assert netlink.closed == 1


def test_conntrack_failures_are_runtime_errors(netlink: type[FakeNetlink]) -> None:
    netlink.refuse_dump = True
    with pytest.raises(NatportsError, match="conntrack dump failed"):
        Conntrack().flows(UDP, 6)
    assert netlink.closed == 1  # closed even then
    netlink.refuse_open = True
    with pytest.raises(NatportsError, match="conntrack netlink") as err:
        Conntrack().flows(UDP, 4)
    assert err.value.hint == "natports needs root"


def test_delete_removes_udp_entries_only_and_tolerates_gone_ones(
    netlink: type[FakeNetlink],
) -> None:
    tcp = Flow(4, TCP, *(ip_address("203.0.113.1"), 1), *(ip_address("198.51.100.1"), 25),
               *(ip_address("172.17.0.2"), 5025), "ESTABLISHED")  # fmt: skip
    gone = flow("203.0.113.7", "172.17.0.3")
    netlink.missing.add("203.0.113.7")
    deleted = Conntrack().delete(
        [flow("203.0.113.9", "172.17.0.2"), tcp, gone, flow("2001:db8::9", "fd00::2", 6)]
    )
    assert deleted == 2
    assert netlink.deleted == [
        (socket.AF_INET, "203.0.113.9"),
        (socket.AF_INET6, "2001:db8::9"),
    ]
    with pytest.raises(NatportsError, match="conntrack delete failed"):
        Conntrack().delete([flow("203.0.113.66", "172.17.0.2")])
    assert Conntrack().delete([]) == 0


def test_local_addresses_include_loopback() -> None:
    assert ip_address("127.0.0.1") in local_addresses()


def test_a_corrupt_state_file_is_named(tmp_path: Path) -> None:
    from natports.store import Store

    store = Store(tmp_path)
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "mail.json").write_text('{"version": 1, "mappings": {}}')
    with pytest.raises(NatportsError, match="corrupt"):
        store.mappings("mail")
    (tmp_path / "apps" / "mail.json").write_text('{"version": 7}')
    with pytest.raises(NatportsError, match="not a natports v1 state file"):
        store.mappings("mail")
