"""The nft and iptables runners against fake executables on PATH: which arguments and stdin
they pass, how they read the answers, and which error a person sees when a tool fails.

The renderers are tested by exact text elsewhere; here only the edges are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from natports import xtables
from natports.backends import iptables as ipt_module
from natports.backends.ipt_render import V6_MARK, split_batch
from natports.backends.iptables import LOCK_WAIT_SECONDS, IptablesBackend
from natports.backends.nftables import NftBackend
from natports.errors import InputError, NatportsError
from natports.model import Protocol, RouteKey
from natports.probes import Check
from tests.unit.fakes import FakeTool, only_fake_tools
from tests.unit.routes import route

TCP = Protocol.TCP
MAIL = route("mail", RouteKey(4, TCP, 25), 5025, "172.17.0.2")
MAIL6 = route("mail", RouteKey(6, TCP, 25), 5025, "fd00::2", subnets=("fd00::/64",))
TABLE = "inet natports_test"


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = only_fake_tools(tmp_path, monkeypatch)
    return bin_dir


# -- nft ------------------------------------------------------------------------------------


def test_a_batch_goes_to_nft_on_stdin_in_one_call(bin_dir: Path) -> None:
    nft = FakeTool(bin_dir, "nft")
    NftBackend(TABLE).run("add table inet natports_test\n")
    assert nft.calls == ["-f -"]
    assert nft.stdin(1) == "add table inet natports_test\n"


def test_nft_errors_are_told_apart(bin_dir: Path) -> None:
    nft = FakeTool(bin_dir, "nft")
    backend = NftBackend(TABLE)
    nft.answer(["-f", "-"], err="Error: Could not process rule: Operation not permitted\n", rc=1)
    with pytest.raises(NatportsError, match="operation not permitted") as err:
        backend.run("x")
    assert err.value.hint is not None and "root" in err.value.hint
    nft.answer(["-f", "-"], err="/dev/stdin:1:1-3: Error: syntax error\nx\n^^^\n", rc=1)
    with pytest.raises(NatportsError) as err:
        backend.run("x")
    assert err.value.message == "nft failed: /dev/stdin:1:1-3: Error: syntax error"
    assert err.value.hint is not None and "nothing was changed" in err.value.hint
    nft.answer(["-f", "-"], rc=3)
    with pytest.raises(NatportsError, match="exit status 3"):
        backend.run("x")


def broken_tool(bin_dir: Path, name: str) -> None:
    """An executable the kernel cannot start (its interpreter does not exist)."""
    broken = bin_dir / name
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)


def test_a_tool_that_cannot_start_is_a_runtime_error(bin_dir: Path) -> None:
    from natports import runner

    broken_tool(bin_dir, "nft")
    with pytest.raises(NatportsError, match="cannot run nft"):
        runner.run(["nft", "-f", "-"])
    with pytest.raises(runner.ToolMissing, match="nothere not found"):
        runner.run(["nothere"])


@pytest.mark.parametrize("tool", ["nft", "iptables-nft-restore"])
def test_the_backends_run_their_tools_through_the_runner(bin_dir: Path, tool: str) -> None:
    broken_tool(bin_dir, tool)
    backend = (
        NftBackend(TABLE)
        if tool == "nft"
        else IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    )
    with pytest.raises(NatportsError, match=f"cannot run {tool}"):
        backend.run("*nat\nCOMMIT\n")


def test_a_hung_tool_is_stopped(bin_dir: Path) -> None:
    from natports import runner

    slow = bin_dir / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 5\n")
    slow.chmod(0o755)
    (bin_dir.parent / "helpers" / "sleep").symlink_to("/bin/sleep")
    with pytest.raises(NatportsError, match=r"did not finish within 0\.2 s") as err:
        runner.run(["slow"], timeout=0.2)
    assert err.value.hint is not None and "nothing was changed" in err.value.hint


def test_missing_nft_is_named(bin_dir: Path) -> None:
    with pytest.raises(NatportsError, match="nft not found") as err:
        NftBackend(TABLE).run("x")
    assert err.value.hint is not None and "nftables" in err.value.hint


def test_intact_live_and_counters_read_only_our_table(bin_dir: Path) -> None:
    nft = FakeTool(bin_dir, "nft")
    backend = NftBackend(TABLE)
    chains = {"nftables": [{"chain": {"family": "inet", "table": "other", "name": "prerouting"}}]}
    nft.answer(["-j", "list", "chains", "inet"], out=json.dumps(chains))
    missing = "Error: No such file or directory\n"
    nft.answer(None, err=missing, rc=1)
    assert backend.intact() is False  # another table's chains are not ours
    assert backend.live() is None
    assert backend.counters() == {}
    assert "add table" in backend.plan_reconcile([MAIL])
    ours = [
        {"chain": {"family": "inet", "table": "natports_test", "name": name}}
        for name in ("dispatch", "prerouting", "output", "postrouting")
    ]
    nft.answer(["-j", "list", "chains", "inet"], out=json.dumps({"nftables": ours}))
    assert backend.intact() is True
    rid = backend.route_id(MAIL)
    set_name, element = rid.split(":", 1)
    doc = {
        "nftables": [
            {
                "set": {
                    "name": set_name,
                    "elem": [
                        {
                            "elem": {
                                "val": {"concat": element.split(" . ")},
                                "counter": {"packets": 7, "bytes": 420},
                            }
                        }
                    ],
                }
            }
        ]
    }
    nft.answer(["-j", "list", "set", "inet", "natports_test", set_name], out=json.dumps(doc))
    assert backend.counters()[rid] == (7, 420)
    live = backend.live()
    assert live is not None
    assert backend.plan_app([], [MAIL]) and backend.plan_flush_all()
    # Only natports' own table is ever named: reads list chains, or our table's objects.
    for call in nft.calls:
        assert call == "-j list chains inet" or "natports_test" in call or call == "-f -", call


def save_text(prefix: str, hooked: bool = True, route_chain: str | None = None) -> str:
    lines = [
        "# Generated by iptables-nft-save v1.8.9",
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f":{prefix}-PRE - [0:0]",
        f":{prefix}-OUT - [0:0]",
        f":{prefix}-POST - [0:0]",
        f":{prefix}-DISPATCH - [0:0]",
    ]
    if route_chain:
        lines.append(f":{route_chain} - [0:0]")
    if hooked:
        lines += [
            f"[5:300] -A PREROUTING -j {prefix}-PRE",
            f"[0:0] -A OUTPUT -j {prefix}-OUT",
            f"[0:0] -A POSTROUTING -j {prefix}-POST",
        ]
    if route_chain:
        lines.append(
            f'[2:120] -A {route_chain} -p tcp -m comment --comment "mail 25/tcp" '
            "-j DNAT --to-destination 172.17.0.2:5025"
        )
    return "\n".join([*lines, "COMMIT", ""])


@pytest.fixture
def root_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root: an error of the tool is then not a missing capability."""
    monkeypatch.setattr(ipt_module, "check_cap_net_admin", lambda: Check("cap", True, "ok"))


def test_a_batch_is_one_restore_that_waits_for_the_lock(bin_dir: Path, root_caps: None) -> None:
    restore = FakeTool(bin_dir, "iptables-nft-restore")
    save = FakeTool(bin_dir, "iptables-nft-save").answer(None, out=save_text("NPTEST"))
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    backend.run("*nat\nCOMMIT\n")
    assert restore.calls == [f"--wait={LOCK_WAIT_SECONDS} --noflush"]
    assert restore.stdin(1) == "*nat\nCOMMIT\n"
    assert save.calls.count("-c -t nat") == 1  # the jumps were checked once, and were there
    backend.run("  \n")
    assert len(restore.calls) == 1  # nothing planned, nothing run


def test_a_jump_missing_after_the_batch_is_put_back(bin_dir: Path, root_caps: None) -> None:
    restore = FakeTool(bin_dir, "iptables-legacy-restore")
    FakeTool(bin_dir, "iptables-legacy-save").answer(None, out=save_text("NPTEST", hooked=False))
    backend = IptablesBackend("legacy", prefix="NPTEST", search_path=str(bin_dir))
    backend.run("*nat\nCOMMIT\n")
    assert len(restore.calls) == 2
    assert "-I PREROUTING" in restore.stdin(2) or "-A PREROUTING" in restore.stdin(2)


def test_intact_counters_and_plans_read_our_chains(bin_dir: Path, root_caps: None) -> None:
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    chain = backend.route_id(MAIL)
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=save_text("NPTEST", route_chain=chain))
    check = FakeTool(bin_dir, "iptables-nft")  # `-C`: each built-in chain still jumps to ours
    assert backend.intact() is True
    assert check.calls == [
        f"--wait={LOCK_WAIT_SECONDS} -t nat -C {builtin} -j NPTEST-{ours}"
        for builtin, ours in (("PREROUTING", "PRE"), ("OUTPUT", "OUT"), ("POSTROUTING", "POST"))
    ]
    check.answer(None, err="iptables: Bad rule (does a matching rule exist in that chain?).", rc=1)
    assert backend.intact() is False
    assert backend.counters() == {chain: (2, 120)}
    assert chain in backend.plan_app([], [MAIL])
    assert chain in backend.plan_reconcile([MAIL])
    assert "NPTEST-PRE" in backend.plan_flush_all()


def test_ipv6_goes_to_ip6tables_checked_before_ipv4_changes(bin_dir: Path, root_caps: None) -> None:
    """One batch, two tables: the IPv6 part is `--test`ed, IPv4 restored, then IPv6."""
    restore4 = FakeTool(bin_dir, "iptables-nft-restore")
    restore6 = FakeTool(bin_dir, "ip6tables-nft-restore")
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=save_text("NPTEST"))
    FakeTool(bin_dir, "ip6tables-nft-save").answer(None, out=save_text("NPTEST"))
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    batch = backend.plan_app([], [MAIL, MAIL6])
    v4, v6 = split_batch(batch)
    assert "172.17.0.2" in v4 and "[fd00::2]:5025" in v6
    backend.run(batch)
    wait = f"--wait={LOCK_WAIT_SECONDS}"
    assert restore4.calls == [f"{wait} --noflush"] and restore4.stdin(1) == v4
    assert restore6.calls == [f"{wait} --noflush --test", f"{wait} --noflush"]
    assert restore6.stdin(1) == restore6.stdin(2) == v6

    # The IPv6 table refuses the batch even in test: nothing runs at all.
    restore6.answer([wait, "--noflush", "--test"], err="ip6tables-restore: line 3 failed\n", rc=1)
    with pytest.raises(NatportsError, match="ip6tables-restore failed: ip6tables-restore: line 3"):
        backend.run(batch)
    assert len(restore4.calls) == 1
    # It fails only for real: IPv4 was changed, and the error says so.
    restore6.answer([wait, "--noflush", "--test"], rc=0)
    restore6.answer([wait, "--noflush"], err="ip6tables-restore: line 9 failed\n", rc=1)
    with pytest.raises(NatportsError) as err:
        backend.run(batch)
    assert err.value.message == (
        "ip6tables-restore failed: ip6tables-restore: line 9 failed "
        "(the IPv4 rules were changed, the IPv6 rules were not)"
    )
    assert err.value.hint is not None and "next apply" in err.value.hint
    assert len(restore4.calls) == 2


def test_counters_and_plans_read_both_tables(bin_dir: Path, root_caps: None) -> None:
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    chain4, chain6 = backend.route_id(MAIL), backend.route_id(MAIL6)
    assert chain4 != chain6
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=save_text("NPTEST", route_chain=chain4))
    FakeTool(bin_dir, "ip6tables-nft-save").answer(
        None, out=save_text("NPTEST", route_chain=chain6)
    )
    assert backend.counters() == {chain4: (2, 120), chain6: (2, 120)}
    assert chain6 in split_batch(backend.plan_reconcile([MAIL6]))[1]
    assert chain6 in split_batch(backend.plan_flush_all())[1]


def test_no_ip6tables_means_nothing_of_ours_in_ipv6(bin_dir: Path, root_caps: None) -> None:
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=save_text("NPTEST"))
    FakeTool(bin_dir, "iptables-nft")  # -C answers yes
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    assert V6_MARK not in backend.plan_app([], [MAIL]) and backend.intact()
    assert V6_MARK not in backend.plan_flush_all()
    with pytest.raises(NatportsError, match=r"ip6tables-restore not found") as err:
        backend.run(backend.plan_app([], [MAIL6]))
    assert err.value.hint is not None and "apt-get install iptables" in err.value.hint
    # ip6tables there, but no IPv6 nat (IPv6 disabled): IPv4 routes still plan and run.
    save6 = FakeTool(bin_dir, "ip6tables-nft-save")
    save6.answer(None, err="ip6tables-save: Address family not supported by protocol\n", rc=1)
    assert V6_MARK not in backend.plan_app([], [MAIL]) and backend.counters() == {}


def test_intact_checks_the_ipv6_jumps_where_our_ipv6_chains_exist(
    bin_dir: Path, root_caps: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeTool(bin_dir, "iptables-nft")
    check6 = FakeTool(bin_dir, "ip6tables-nft")
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    assert backend.intact() is True and len(check6.calls) == 3
    missing = "ip6tables v1.8.9 (nf_tables): Chain 'NPTEST-PRE' does not exist\n"
    check6.answer(None, err=missing, rc=2)
    assert backend.intact() is True  # no IPv6 chain of ours: IPv6 not in use
    check6.answer(None, err="ip6tables: Address family not supported by protocol", rc=3)
    assert backend.intact() is True  # no IPv6 at all (ipv6.disable=1): nothing to lose
    check6.answer(
        None, err="ip6tables: Bad rule (does a matching rule exist in that chain?).", rc=1
    )
    assert backend.intact() is False
    legacy = IptablesBackend("legacy", prefix="NPTEST", search_path=str(bin_dir))
    FakeTool(bin_dir, "iptables-legacy")
    check6 = FakeTool(bin_dir, "ip6tables-legacy")
    check6.answer(None, err="ip6tables: No chain/target/match by that name.\n", rc=1)
    names = bin_dir / "ip6_tables_names"
    monkeypatch.setattr(xtables, "IP6_TABLES_NAMES", names)
    names.write_text("filter\n")
    assert legacy.intact() is True and check6.calls == []  # nat not loaded: not read
    names.write_text("nat\nfilter\n")
    assert legacy.intact() is False
    check6.answer(None, err="ip6tables v1.8.9 (legacy): Couldn't load target `NPTEST-PRE'", rc=2)
    assert legacy.intact() is True


def test_with_ipv6_routes_only_a_lost_chain_of_ours_is_a_loss(
    bin_dir: Path, root_caps: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the state holds IPv6 routes a missing IPv6 chain of ours is repaired; what a
    repair cannot fix (no ip6tables, no IPv6 nat, the xtables lock) is not a loss, or
    the agent would fail a repair every second."""
    FakeTool(bin_dir, "iptables-nft")
    FakeTool(bin_dir, "iptables-nft-save").answer(None, out=save_text("NPTEST"))  # no accept
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    assert backend.intact([MAIL6]) is True  # no ip6tables at all
    check6 = FakeTool(bin_dir, "ip6tables-nft")
    check6.answer(None, err="ip6tables v1.8.9 (nf_tables): Chain 'NPTEST-PRE' does not exist", rc=2)
    assert backend.intact([MAIL6]) is False
    assert backend.intact([MAIL]) is True
    check6.answer(None, err="ip6tables: Address family not supported by protocol", rc=3)
    assert backend.intact([MAIL6]) is True
    check6.answer(None, err="Another app is currently holding the xtables lock.", rc=4)
    assert backend.intact([MAIL6]) is True
    legacy = IptablesBackend("legacy", prefix="NPTEST", search_path=str(bin_dir))
    FakeTool(bin_dir, "iptables-legacy")
    FakeTool(bin_dir, "iptables-legacy-save").answer(None, out=save_text("NPTEST"))
    check6 = FakeTool(bin_dir, "ip6tables-legacy")
    check6.answer(None, err="ip6tables v1.8.9 (legacy): Couldn't load target `NPTEST-PRE'", rc=2)
    names = bin_dir / "ip6_tables_names"
    monkeypatch.setattr(xtables, "IP6_TABLES_NAMES", names)
    names.write_text("nat\nfilter\n")
    assert legacy.intact([MAIL6]) is False and legacy.intact([MAIL]) is True
    names.write_text("filter\n")
    assert legacy.intact([MAIL6]) is True  # no IPv6 nat table to hold anything


def test_bad_variant_or_prefix_is_input(bin_dir: Path) -> None:
    with pytest.raises(InputError, match="nft or legacy"):
        IptablesBackend("xt")
    with pytest.raises(InputError, match="prefix"):
        IptablesBackend("nft", prefix="no-dash")


def test_iptables_errors_are_told_apart(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch, root_caps: None
) -> None:
    restore = FakeTool(bin_dir, "iptables-nft-restore")
    save = FakeTool(bin_dir, "iptables-nft-save")
    backend = IptablesBackend("nft", prefix="NPTEST", search_path=str(bin_dir))
    warning = "# Warning: iptables-legacy tables present, use iptables-legacy-save to see them\n"

    def fails(tool: FakeTool, err: str) -> NatportsError:
        tool.answer(None, err=warning + err, rc=1)
        with pytest.raises(NatportsError) as caught:
            backend.run("*nat\nCOMMIT\n")
        return caught.value

    e = fails(restore, "iptables-restore: line 2 failed\nTry `iptables-restore -h' for more\n")
    assert e.message == "iptables-restore failed: iptables-restore: line 2 failed"
    e = fails(restore, "Another app is currently holding the xtables lock. Stopped waiting\n")
    assert e.message == f"iptables-nft-restore: another program held the xtables lock for {30}s"
    e = fails(restore, "iptables-restore v1.8.9 (nf_tables): Permission denied (you must be root)")
    assert e.message == "iptables-nft-restore: permission denied"
    restore.answer(None, rc=0)
    save.answer(None, err="iptables-save: Table does not exist (do you need to insmod?)\n", rc=1)
    backend.run("*nat\nCOMMIT\n")  # legacy without the nat module: nothing of ours exists
    assert backend.counters() == {}
    e = fails(save, "iptables-save: something odd\n")
    assert e.message == "iptables-save failed: iptables-save: something odd"
    save.answer(None, rc=4)
    with pytest.raises(NatportsError, match="exit status 4"):
        backend.live()
    # Legacy xtables without CAP_NET_ADMIN says only "unable to initialize table".
    monkeypatch.setattr(ipt_module, "check_cap_net_admin", lambda: Check("cap", False, "no"))
    save.answer(None, err="iptables-save: unable to initialize table 'nat'\n", rc=1)
    with pytest.raises(NatportsError, match="permission denied"):
        backend.live()


def test_missing_iptables_is_named(bin_dir: Path) -> None:
    backend = IptablesBackend("legacy", prefix="NPTEST", search_path=str(bin_dir))
    with pytest.raises(NatportsError, match=r"iptables-restore not found \(iptables-legacy"):
        backend.run("*nat\nCOMMIT\n")
