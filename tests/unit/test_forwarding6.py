"""natports' accept in Docker's IPv6 DOCKER-USER, against fake ip[6]tables on PATH.

Docker 28/29 with ip6tables makes an IPv6 DOCKER-USER: natports puts the same chain
and jump there. Docker 20.10 makes none: natports leaves the IPv6 filter alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from natports import probes, xtables
from natports.forwarding import Forwarding
from tests.unit.fakes import FakeTool, only_fake_tools

DOCKER_USER = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
COMMIT
"""
NO_DOCKER_USER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD {policy} [0:0]\nCOMMIT\n"
ENSURE = (
    "*filter\n:NPTEST-FWD - [0:0]\n"
    "-A NPTEST-FWD -m conntrack --ctstate DNAT -m connmark --mark 0x100000/0x100000 "
    '-m comment --comment "natports: flows natports DNATed" -j ACCEPT\n'
    "-I DOCKER-USER 1 -j NPTEST-FWD\nCOMMIT\n"
)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return only_fake_tools(tmp_path, monkeypatch)


def test_the_accept_goes_into_each_families_docker_user(bin_dir: Path) -> None:
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=DOCKER_USER)
    save6 = FakeTool(bin_dir, "ip6tables-nft-save").answer(None, out=DOCKER_USER)
    restore4 = FakeTool(bin_dir, "iptables-nft-restore")
    restore6 = FakeTool(bin_dir, "ip6tables-nft-restore")
    Forwarding("NPTEST", "nft").ensure()
    assert restore4.stdin(1) == ENSURE and restore6.stdin(1) == ENSURE
    assert restore6.calls == ["--wait=30 --noflush"]

    # Docker 20.10: no IPv6 DOCKER-USER, so nothing is written to the IPv6 filter table.
    save6.answer(None, out=NO_DOCKER_USER.format(policy="ACCEPT"))
    Forwarding("NPTEST", "nft").ensure()
    assert len(restore6.calls) == 1 and len(restore4.calls) == 2


def test_remove_takes_both_out(bin_dir: Path) -> None:
    installed = DOCKER_USER.replace(
        "COMMIT", ":NPTEST-FWD - [0:0]\n-A DOCKER-USER -j NPTEST-FWD\nCOMMIT"
    )
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=installed)
    FakeTool(bin_dir, "ip6tables-nft-save").answer(None, out=installed)
    restore4 = FakeTool(bin_dir, "iptables-nft-restore")
    restore6 = FakeTool(bin_dir, "ip6tables-nft-restore")
    Forwarding("NPTEST", "nft").remove()
    removal = "*filter\n:NPTEST-FWD - [0:0]\n-D DOCKER-USER -j NPTEST-FWD\n-X NPTEST-FWD\nCOMMIT\n"
    assert restore4.stdin(1) == removal and restore6.stdin(1) == removal


def test_legacy_ipv6_filter_not_loaded_is_not_read(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a legacy table loads its module: an unloaded IPv6 filter holds nothing."""
    names = bin_dir / "ip6_tables_names"
    names.write_text("nat\n")
    monkeypatch.setattr(xtables, "IP6_TABLES_NAMES", names)
    FakeTool(bin_dir, "iptables-legacy-save").answer(None, out=DOCKER_USER)
    save6 = FakeTool(bin_dir, "ip6tables-legacy-save").answer(None, out=DOCKER_USER)
    FakeTool(bin_dir, "iptables-legacy-restore")
    Forwarding("NPTEST", "legacy").ensure()
    assert save6.calls == []
    assert Forwarding("NPTEST", "legacy", v6=True).forward_policy() is None


@pytest.mark.parametrize(
    ("save6", "ok", "says"),
    [
        (DOCKER_USER, True, "IPv6 DOCKER-USER exists"),
        (NO_DOCKER_USER.format(policy="ACCEPT"), True, "IPv6 flows pass"),
        (NO_DOCKER_USER.format(policy="DROP"), False, "are dropped"),
    ],
)
def test_the_doctor_says_how_ipv6_flows_pass_forward(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch, save6: str, ok: bool, says: str
) -> None:
    monkeypatch.setattr(probes, "iptables_variant", lambda: "nft")
    save4 = FakeTool(bin_dir, "iptables-nft-save").answer(None, out=DOCKER_USER)
    FakeTool(bin_dir, "ip6tables-nft-save").answer(None, out=save6)
    check = probes.check_forwarding6("NPTEST")
    assert check.name == "forwarding6" and check.ok is ok and says in check.detail
    if "DOCKER-USER" not in save6:  # nor in IPv4: Docker's nftables firewall, or no Docker
        save4.answer(None, out=NO_DOCKER_USER.format(policy="ACCEPT"))
        check = probes.check_forwarding6("NPTEST")
        assert check.ok and "no DOCKER-USER in either family" in check.detail


def test_the_doctor_names_a_missing_ip6tables(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probes, "iptables_variant", lambda: "nft")
    check = probes.check_ip6tables()
    assert not check.ok and "cannot route IPv6" in check.detail
    FakeTool(bin_dir, "ip6tables-nft-restore")
    FakeTool(bin_dir, "ip6tables-nft-save").answer(None, out="*nat\nCOMMIT\n")
    assert probes.check_ip6tables() == probes.Check(
        "ip6tables", True, "ip6tables works, variant nft (IPv6 routes)"
    )
