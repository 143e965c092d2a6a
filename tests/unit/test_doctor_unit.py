"""Host probes without the host: `doctor`'s checks, the choice of backend and the listener
scan, against fake tools on PATH and a fake /proc tree."""

from __future__ import annotations

import json
import os
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from natports import doctor, probes
from natports.backends import select
from natports.backends.iptables import IptablesBackend
from natports.backends.nftables import NftBackend
from natports.errors import InputError, NatportsError
from natports.listeners import host_listeners
from natports.model import Protocol, RouteKey
from natports.policy import HostListener
from natports.store import Applied, Store
from tests.unit.fakes import FakeDocker, FakeTool, only_fake_tools
from tests.unit.routes import route

TCP, UDP = Protocol.TCP, Protocol.UDP
DOCKER_NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\nCOMMIT\n"
DOCKER_FILTER = "*filter\n-A FORWARD -j DOCKER-FORWARD\nCOMMIT\n"


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = only_fake_tools(tmp_path, monkeypatch)
    monkeypatch.setattr(probes, "_legacy_loaded", lambda: False)
    return bin_dir


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/proc/... read by the doctor comes from this directory."""
    root = tmp_path / "proc"
    real = Path

    def redirected(*parts: str) -> Path:
        path = real(*parts)
        if str(path).startswith("/proc/"):
            return root / str(path).removeprefix("/proc/")
        return path

    monkeypatch.setattr(probes, "Path", redirected)
    (root / "self").mkdir(parents=True)
    (root / "sys/net/ipv4").mkdir(parents=True)
    return root


# -- single checks ----------------------------------------------------------------------------


def test_check_nft(bin_dir: Path) -> None:
    assert probes.check_nft() == probes.Check(
        "nft", False, "nft not found", "apt-get install nftables"
    )
    nft = FakeTool(bin_dir, "nft").answer(None, err="\nnetlink: Operation not permitted\n", rc=1)
    check = probes.check_nft()
    assert not check.ok
    assert check.detail == "nft cannot list tables: netlink: Operation not permitted"
    nft.answer(None, out="table inet filter\n")
    assert probes.check_nft().ok
    assert nft.calls[-1] == "list tables"


def test_the_iptables_variant_is_the_one_dockers_chains_live_in(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nft_save = FakeTool(bin_dir, "iptables-nft-save").answer(None, out="*nat\nCOMMIT\n")
    legacy_save = FakeTool(bin_dir, "iptables-legacy-save").answer(None, out=DOCKER_NAT)
    iptables = FakeTool(bin_dir, "iptables").answer(None, out="iptables v1.8.9 (nf_tables)\n")
    assert probes.iptables_variant() == "nft"
    assert legacy_save.calls == []  # legacy modules not loaded: never asked (it would load them)
    monkeypatch.setattr(probes, "_legacy_loaded", lambda: True)
    assert probes.iptables_variant() == "legacy"
    legacy_save.answer(None, out="*nat\nCOMMIT\n")
    iptables.answer(None, out="iptables v1.8.9 (legacy)\n")
    assert probes.iptables_variant() == "legacy"
    nft_save.answer(None, out=DOCKER_NAT)
    assert probes.iptables_variant() == "nft"


def test_check_iptables(bin_dir: Path) -> None:
    check = probes.check_iptables()
    assert not check.ok and check.detail == "iptables-nft-restore not found"
    FakeTool(bin_dir, "iptables-nft-restore")
    save = FakeTool(bin_dir, "iptables-nft-save").answer(None, err="Permission denied\n", rc=4)
    check = probes.check_iptables()
    assert not check.ok and check.detail == "iptables (nft) cannot read nat: Permission denied"
    save.answer(None, out=DOCKER_NAT)
    assert probes.check_iptables() == probes.Check("iptables", True, "iptables works, variant nft")


def test_check_cap_net_admin_reads_the_effective_set(proc: Path) -> None:
    status = proc / "self" / "status"
    assert not probes.check_cap_net_admin().ok  # unreadable
    status.write_text("Name:\tpython\nCapEff:\t0000000000000000\n")
    check = probes.check_cap_net_admin()
    assert not check.ok and check.hint == "run as root, or use the proxy backend"
    status.write_text("Name:\tpython\nCapEff:\t0000000000001000\n")  # bit 12
    assert probes.check_cap_net_admin().ok


def test_legacy_tables_count_only_when_their_module_is_loaded(proc: Path) -> None:
    assert probes._legacy_loaded() is False
    (proc / "net").mkdir()
    (proc / "net" / "ip_tables_names").write_text("")
    assert probes._legacy_loaded() is False
    (proc / "net" / "ip_tables_names").write_text("nat\nfilter\n")
    assert probes._legacy_loaded() is True


def test_check_ip_forward(proc: Path) -> None:
    assert not probes.check_ip_forward().ok
    (proc / "sys/net/ipv4/ip_forward").write_text("0\n")
    assert "= 0" in probes.check_ip_forward().detail
    (proc / "sys/net/ipv4/ip_forward").write_text("1\n")
    assert probes.check_ip_forward().ok


def test_check_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("natports.containers.Docker", FakeDocker)
    assert probes.check_docker().detail == "Docker 99.0-fake reachable"

    def unreachable() -> FakeDocker:
        raise NatportsError("cannot reach Docker: refused", "is dockerd running?")

    monkeypatch.setattr("natports.containers.Docker", unreachable)
    assert probes.check_docker() == probes.Check(
        "docker", False, "cannot reach Docker: refused", "is dockerd running?"
    )


def test_check_docker_forward(bin_dir: Path) -> None:
    save = FakeTool(bin_dir, "iptables-nft-save").answer(None, out="*filter\nCOMMIT\n")
    assert not probes.check_docker_forward().ok
    save.answer(None, out=DOCKER_FILTER)
    assert probes.check_docker_forward().detail == "Docker's FORWARD accepts are in place (nft)"
    assert save.calls[-1] == "-t filter"


def test_check_conntrack(bin_dir: Path) -> None:
    assert probes.check_conntrack().detail == "conntrack not found"
    tool = FakeTool(bin_dir, "conntrack").answer(None, err="Operation not permitted\n", rc=1)
    check = probes.check_conntrack()
    assert not check.ok
    assert check.detail == "no conntrack netlink access: Operation not permitted"
    tool.answer(None, out="42\n")
    assert probes.check_conntrack().detail == "conntrack netlink works (42 entries)"


def test_check_agent_and_proxy(tmp_path: Path) -> None:
    assert not doctor.check_agent(tmp_path).ok
    beat = {"version": 1, "pid": os.getpid(), "heartbeat": time.time(), "docker": "down"}
    (tmp_path / "agent.json").write_text(json.dumps(beat))
    assert doctor.check_agent(tmp_path).detail == (
        f"natports watch runs (pid {os.getpid()}, Docker down)"
    )
    beat["heartbeat"] = time.time() - 60  # a stale heartbeat is no agent
    (tmp_path / "agent.json").write_text(json.dumps(beat))
    assert not doctor.check_agent(tmp_path).ok
    assert not doctor.check_proxy(tmp_path).ok  # nobody answers on its socket


def test_check_listeners_names_a_host_process_on_a_routed_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.set_applied("mail", Applied("nftables", (route("mail", RouteKey(4, TCP, 25), 5025),)))
    exim = HostListener(TCP, ip_address("0.0.0.0"), 25, "exim4 (pid 7)")
    monkeypatch.setattr("natports.listeners.host_listeners", lambda: [exim])
    check = doctor.check_listeners(tmp_path)
    assert not check.ok and "exim4 (pid 7)" in check.detail
    monkeypatch.setattr("natports.listeners.host_listeners", lambda: [])
    assert doctor.check_listeners(tmp_path).ok
    (tmp_path / "applied" / "mail.json").write_text("[]")
    assert doctor.check_listeners(tmp_path).detail.startswith("cannot compare:")


def test_auto_prefers_nftables_then_iptables_then_the_proxy() -> None:
    yes = probes.Check("x", True, "works")
    no = probes.Check("x", False, "broken")
    asked: list[bool] = []

    def ipt(check: probes.Check) -> probes.Check:
        asked.append(True)
        return check

    assert probes.choose_backend(yes, lambda: ipt(no)) == ("nftables", "nft works")
    assert asked == []  # iptables is not probed when nft works
    assert probes.choose_backend(no, lambda: ipt(yes))[0] == "iptables"
    backend, why = probes.choose_backend(no, lambda: ipt(no))
    assert backend == "proxy" and why.endswith("netfilter cannot be programmed")


def test_run_all_says_whether_the_chosen_backend_can_work(
    tmp_path: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("natports.containers.Docker", FakeDocker)
    monkeypatch.setattr("natports.listeners.host_listeners", lambda: [])
    checks, backend, _, works = doctor.run_all(tmp_path)
    assert [c.name for c in checks][:2] == ["nft", "iptables"]
    assert (backend, works) == ("proxy", False)  # no netfilter tools and no proxy daemon
    FakeTool(bin_dir, "nft")
    _, backend, why, works = doctor.run_all(tmp_path)
    assert (backend, why, works) == ("nftables", "nft works", True)


# -- choosing a backend ------------------------------------------------------------------------


def test_make_builds_each_backend_by_name(
    tmp_path: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nft = select.make("nftables", "natports_test", tmp_path)
    assert isinstance(nft, NftBackend) and nft.table == "inet natports_test"
    monkeypatch.setenv("NATPORTS_IPTABLES_VARIANT", "legacy")
    ipt = select.make("iptables", "natports_test", tmp_path)
    assert isinstance(ipt, IptablesBackend)
    assert (ipt.variant, ipt.layout.prefix) == ("legacy", "NATPORTS_TEST")
    monkeypatch.setenv("NATPORTS_IPTABLES_VARIANT", "")
    assert select.make("iptables", "t", tmp_path).variant == "nft"  # type: ignore[attr-defined]
    monkeypatch.setenv("NATPORTS_IPTABLES_VARIANT", "xt")
    with pytest.raises(InputError, match="NATPORTS_IPTABLES_VARIANT"):
        select.make("iptables", "t", tmp_path)
    assert select.make("proxy", "t", tmp_path).name == "proxy"
    with pytest.raises(InputError, match='unknown backend "ebpf"'):
        select.make("ebpf", "t", tmp_path)


def test_resolve_auto_probes_the_host(bin_dir: Path) -> None:
    assert select.resolve("iptables") == "iptables"
    assert select.resolve("auto") == "proxy"  # nothing works on this fake host
    FakeTool(bin_dir, "nft")
    assert select.resolve("auto") == "nftables"


def test_configured_default(tmp_path: Path) -> None:
    config = tmp_path / "natports.toml"
    assert select.configured_default(config) is None
    config.write_text('[policy]\ndeny = ["22"]\n')
    assert select.configured_default(config) is None
    config.write_text('[backend]\ndefault = "iptables"\n')
    assert select.configured_default(config) == "iptables"
    config.write_text('backend = "x"\n')  # one reader for the whole file: same rule as [policy]
    with pytest.raises(InputError, match=r"\[backend\] must be a table"):
        select.configured_default(config)
    config.write_text('[backend]\ndefault = "ebpf"\n')
    with pytest.raises(InputError, match=r'backend\.default "ebpf"'):
        select.configured_default(config)
    config.write_text("[backend\n")
    with pytest.raises(InputError, match=str(config)):
        select.configured_default(config)


# -- who listens (/proc/net) -------------------------------------------------------------------

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt  uid inode\n"


def sock(local: str, remote: str, state: str, inode: int) -> str:
    queues = "00000000:00000000 00:00000000 00000000"
    return f"   0: {local} {remote} {state} {queues}  0  0 {inode} 1\n"


def test_host_listeners_reads_listening_sockets_and_their_owners(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "tcp").write_text(
        HEADER
        + sock("00000000:0019", "00000000:0000", "0A", 101)  # 0.0.0.0:25 LISTEN
        + sock("0100007F:0CEA", "00000000:0000", "0A", 102)  # 127.0.0.1:3306 LISTEN
        + sock("0200A8C0:0016", "0300A8C0:D431", "01", 103)  # an established connection
    )
    (proc / "net" / "tcp6").write_text(
        HEADER + sock("0000000000000000FFFF000004030201:01BB", "0" * 32 + ":0000", "0A", 104)
    )
    (proc / "net" / "udp").write_text(
        HEADER
        + sock("00000000:0035", "00000000:0000", "07", 105)  # 0.0.0.0:53 bound
        + sock("00000000:1F90", "0100007F:0035", "07", 106)  # a connected client
    )
    pid = proc / "812"
    (pid / "fd").mkdir(parents=True)
    (pid / "comm").write_text("exim4\n")
    os.symlink("socket:[101]", pid / "fd" / "3")
    os.symlink("/dev/null", pid / "fd" / "0")
    (proc / "self").mkdir()  # not a pid
    (proc / "999" / "fd").mkdir(parents=True)  # a process that vanished: no comm
    found = host_listeners(proc)
    assert sorted((str(x.protocol), str(x.ip), x.port, x.process) for x in found) == [
        ("tcp", "0.0.0.0", 25, "exim4 (pid 812)"),
        ("tcp", "1.2.3.4", 443, "an unknown process"),
        ("tcp", "127.0.0.1", 3306, "an unknown process"),
        ("udp", "0.0.0.0", 53, "an unknown process"),
    ]
