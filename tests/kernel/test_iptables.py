"""The iptables backend against the real kernel, on both xtables variants (nft and legacy).

Every test uses its own chain prefix, so a real installation's chains (NATPORTS-...)
are never touched; the fixture removes everything with that prefix before and after
each test, also when it fails. Ports 25025+ keep clear of the nftables tests' 21025+.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from natports.backends.iptables import IptablesBackend
from natports.errors import InputError, NatportsError
from natports.model import Backend, Protocol, Route, RouteKey
from tests.infra import ClientNet, TagServer, sh
from tests.kernel.conftest import range_route
from tests.kernel.xtables import PREFIX, ours, save

REPO = Path(__file__).resolve().parents[2]


def route(app: str, port: int, *backends: tuple[str, int], subnets: tuple[str, ...] = ()) -> Route:
    return Route(
        app=app,
        process_type="web",
        key=RouteKey(4, Protocol.TCP, port),
        private_port=backends[0][1],
        backends=tuple(Backend(f"c-{ip}-{p}", ip_address(ip), p) for ip, p in backends),
        hairpin_subnets=subnets,
    )


def not_ours(variant: str) -> str:
    """Everything in nat but our prefix's lines.

    Lines of other natports instances (NATPORTS...) are left out too: the e2e suite may
    be adding and removing its own chains while this runs.
    """
    kept = [
        line
        for line in save(variant).splitlines()
        if f"{PREFIX}-" not in line and "NATPORTS" not in line
    ]
    return "\n".join(kept) + "\n"


def nft_blocks() -> dict[str, list[str]]:
    """`nft -a list table ip nat`, chain -> its rules with their handles, counters blanked.

    A rule deleted and re-added gets a new handle: equal handles prove a rule untouched
    (iptables-nft only; legacy tables are not visible to nft).
    """
    text = sh("nft", "-a", "list", "table", "ip", "nat", check=False).stdout
    blocks: dict[str, list[str]] = {}
    chain = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("chain "):
            chain = stripped.split()[1]
            blocks[chain] = []
        elif chain and stripped and stripped != "}":
            blocks[chain].append(re.sub(r"counter packets \d+ bytes \d+ ", "", stripped))
    return blocks


def nft_not_ours() -> dict[str, list[str]]:
    return {
        chain: [ln for ln in lines if PREFIX not in ln and "NATPORTS" not in ln]
        for chain, lines in nft_blocks().items()
        if not chain.startswith((f"{PREFIX}-", "NATPORTS"))
    }


def hooks(variant: str) -> list[str]:
    return [ln for ln in ours(variant) if ln.split()[1] in ("PREROUTING", "OUTPUT", "POSTROUTING")]


def test_a_switch_is_idempotent_and_hooks_in_once(ipt: IptablesBackend) -> None:
    routes = [route("mail", 25025, ("172.30.0.2", 5025), ("172.30.0.3", 5025))]
    ipt.run(ipt.plan_app([], routes))
    first = ours(ipt.variant)
    table = save(ipt.variant)
    assert hooks(ipt.variant) == [
        f"-A PREROUTING -j {PREFIX}-PRE",
        f"-A OUTPUT -j {PREFIX}-OUT",
        f"-A POSTROUTING -j {PREFIX}-POST",
    ]
    for builtin, chain in ipt.layout.hooks():  # first, before Docker's jumps
        rules = [ln for ln in table.splitlines() if ln.startswith(f"-A {builtin} ")]
        assert rules[0] == f"-A {builtin} -j {chain}"
    batch = ipt.plan_app(routes, routes)
    assert "-I PREROUTING" not in batch and f":{PREFIX}-DISPATCH" not in batch
    ipt.run(batch)
    assert ours(ipt.variant) == first


def test_a_failing_batch_changes_nothing(ipt: IptablesBackend) -> None:
    old = [route("mail", 25025, ("172.30.0.2", 5025))]
    ipt.run(ipt.plan_app([], old))
    before = save(ipt.variant, counters=True).splitlines()
    before = [ln for ln in before if f"{PREFIX}-" in ln]
    new = [route("mail", 25025, ("172.30.0.3", 5025)), route("mail", 25026, ("172.30.0.3", 5026))]
    batch = ipt.plan_app(old, new).replace("COMMIT\n", f"-A {PREFIX}-NO-SUCH -j RETURN\nCOMMIT\n")
    with pytest.raises(NatportsError) as err:
        ipt.run(batch)
    assert "iptables-restore failed" in err.value.message
    assert "nothing was changed" in (err.value.hint or "")
    after = [ln for ln in save(ipt.variant, counters=True).splitlines() if f"{PREFIX}-" in ln]
    assert after == before  # our rules, hooks and counters; the rest of nat is not ours


def test_removal_of_objects_already_gone_does_not_fail(ipt: IptablesBackend) -> None:
    """State says routes exist, the kernel lost them (reboot): removing them still works."""
    ghost = [route("mail", 25025, ("172.30.0.2", 5025)), route("mail", 25026, ("172.30.0.2", 5026))]
    ipt.run(ipt.plan_app(ghost, []))
    assert not any(f"{PREFIX}-A-" in ln or f"{PREFIX}-R-" in ln for ln in ours(ipt.variant))
    # And again with the skeleton present but the app's chains gone.
    ipt.run(ipt.plan_app(ghost, ghost[:1]))
    ipt.run(ipt.plan_flush_all())
    ipt.run(ipt.plan_app(ghost, ghost[1:]))
    live = ipt.live()
    assert {c for c in live.chains if ipt.layout.is_route_chain(c)} == {ipt.route_id(ghost[1])}
    ipt.run(ipt.plan_flush_all())
    ipt.run(ipt.plan_flush_all())  # idempotent: nothing left, nothing to do
    assert ours(ipt.variant) == []


def test_removed_routes_and_apps_leave_no_chains(ipt: IptablesBackend) -> None:
    both = [route("mail", 25025, ("172.30.0.2", 5025)), route("mail", 25026, ("172.30.0.2", 5026))]
    ipt.run(ipt.plan_app([], both))
    ipt.run(ipt.plan_app(both, both[:1]))
    chains = ipt.live().chains
    assert ipt.route_id(both[0]) in chains and ipt.route_id(both[1]) not in chains
    ipt.run(ipt.plan_app(both[:1], []))
    assert ipt.live().chains == {f"{PREFIX}-{c}" for c in ("DISPATCH", "PRE", "OUT", "POST")}
    assert not any("DISPATCH -m comment" in ln for ln in ours(ipt.variant))


def app_lines(variant: str, backend: IptablesBackend, app: str, routes: list[Route]) -> list[str]:
    """The app's rules (dispatch rule, app chain, route chains) with their counters.

    The dispatch rule's counter is blanked: every new flow to any host address passes it.
    """
    names = {backend.layout.app_chain(app), *(backend.route_id(r) for r in routes)}
    return [
        re.sub(r"^\[\d+:\d+\] (-A \S+-DISPATCH )", r"\1", ln)
        for ln in save(variant, counters=True).splitlines()
        if any(re.search(rf"(^|\s|:){re.escape(n)}(\s|$)", ln) for n in names)
    ]


def test_one_apps_switch_leaves_another_apps_chains_untouched(
    ipt: IptablesBackend, client_net: ClientNet
) -> None:
    mail = [route("mail", 25027, (client_net.host_ip, 1))]
    chat = [route("chat", 25028, (client_net.host_ip, 1))]  # port 1: refused, yet counted
    ipt.run(ipt.plan_app([], mail))
    ipt.run(ipt.plan_app([], chat))
    assert "error" in client_net.connect_once(25028)
    assert ipt.counters()[ipt.route_id(chat[0])][0] >= 1
    chat_app, chat_route = ipt.layout.app_chain("chat"), ipt.route_id(chat[0])

    def chat_handles() -> list[str]:
        blocks = nft_blocks()
        dispatch = [ln for ln in blocks[f"{PREFIX}-DISPATCH"] if chat_app in ln]
        return dispatch + blocks[chat_app] + blocks[chat_route]

    chat_before = app_lines(ipt.variant, ipt, "chat", chat)
    handles_before = chat_handles() if ipt.variant == "nft" else []
    new_mail = [route("mail", 25027, ("172.30.0.9", 5025)), route("mail", 25029, ("172.30.0.9", 1))]
    batch = ipt.plan_app(mail, new_mail)
    assert "chat" not in batch and chat_app not in batch and chat_route not in batch
    ipt.run(batch)
    assert app_lines(ipt.variant, ipt, "chat", chat) == chat_before  # counters included
    if ipt.variant == "nft":
        assert len(handles_before) == 4  # dispatch jump, app rule, CONNMARK, DNAT
        assert chat_handles() == handles_before
    assert any("--to-destination 172.30.0.9:5025" in ln for ln in ours(ipt.variant))


def test_flush_all_leaves_only_what_was_there_before(ipt: IptablesBackend) -> None:
    """Everything else in nat (Docker's chains) is byte for byte what it was.

    Docker rewrites its chains whenever a container starts or stops (another test session
    may be doing that right now), so a difference is retried twice: a rule natports
    really deleted or changed would differ every time.
    """
    for attempt in range(3):
        before = not_ours(ipt.variant)
        handles_before = nft_not_ours() if ipt.variant == "nft" else {}
        ipt.run(ipt.plan_app([], [route("mail", 25025, ("172.30.0.2", 5025))]))
        ipt.run(ipt.plan_app([], [route("chat", 25026, ("172.30.0.5", 6000))]))
        assert len(ours(ipt.variant)) > 10
        ipt.run(ipt.plan_flush_all())
        assert ours(ipt.variant) == []
        after = not_ours(ipt.variant)
        handles_after = nft_not_ours() if ipt.variant == "nft" else {}
        if attempt < 2 and (after, handles_after) != (before, handles_before):
            continue
        assert after == before
        assert handles_after == handles_before  # no rule of anyone else re-created (nft)
        break
    assert ipt.plan_flush_all() == ""


def test_reconcile_removes_drift_and_keeps_counters(
    ipt: IptablesBackend, client_net: ClientNet
) -> None:
    mail = [route("mail", 25030, (client_net.host_ip, 1))]
    stale = [route("gone", 25031, ("172.30.0.7", 5025))]
    ipt.run(ipt.plan_app([], mail))
    ipt.run(ipt.plan_app([], stale))
    client_net.connect_once(25030)
    counted = ipt.counters()[ipt.route_id(mail[0])]
    assert counted[0] >= 1
    ipt.run(ipt.plan_reconcile(mail))
    live = ipt.live()
    assert ipt.layout.app_chain("gone") not in live.chains
    assert ipt.route_id(stale[0]) not in live.chains
    assert ipt.counters() == {ipt.route_id(mail[0]): counted}


def test_kernel_dnat_switch_keeps_established_flows(
    ipt: IptablesBackend, client_net: ClientNet, servers: list[TagServer]
) -> None:
    """The conntrack property the product rests on, through iptables chains."""
    one, two = servers
    first = [route("mail", 25040, (client_net.host_ip, one.port))]
    ipt.run(ipt.plan_app([], first))
    held = client_net.hold(25040)
    try:
        assert held.tag == "one"
        second = [route("mail", 25040, (client_net.host_ip, two.port))]
        ipt.run(ipt.plan_app(first, second))
        assert client_net.connect_once(25040) == {"tag": "two"}
        assert held.ask("ping") == "one ping"
    finally:
        held.close()
    # One first packet per new flow; the flow counted before the switch is carried over.
    assert ipt.counters()[ipt.route_id(first[0])][0] >= 2


def test_several_backends_share_new_flows(
    ipt: IptablesBackend, client_net: ClientNet, servers: list[TagServer]
) -> None:
    one, two = servers
    both = [route("mail", 25041, (client_net.host_ip, one.port), (client_net.host_ip, two.port))]
    ipt.run(ipt.plan_app([], both))
    tags = {client_net.connect_once(25041).get("tag") for _ in range(24)}
    assert tags == {"one", "two"}  # all 24 on one side: probability 2**-23


def test_missing_binaries_and_missing_root_are_named(ipt: IptablesBackend, tmp_path: Path) -> None:
    nowhere = IptablesBackend(ipt.variant, prefix=PREFIX, search_path=str(tmp_path))
    with pytest.raises(NatportsError) as err:
        nowhere.run("*nat\nCOMMIT\n")
    assert "iptables-restore not found" in err.value.message
    assert "apt-get install iptables" in (err.value.hint or "")

    batch = ipt.plan_app([], [route("mail", 25025, ("172.30.0.2", 5025))])
    code = (
        "import json, sys\n"
        "from natports.backends.iptables import IptablesBackend\n"
        "from natports.errors import NatportsError\n"
        f"b = IptablesBackend({ipt.variant!r}, prefix={PREFIX!r})\n"
        "out = []\n"
        "for step in (b.counters, lambda: b.run(sys.stdin.read())):\n"
        "    try:\n"
        "        step()\n"
        "        out.append(None)\n"
        "    except NatportsError as e:\n"
        "        out.append([e.message, e.hint])\n"
        "print(json.dumps(out))\n"
    )
    # No capabilities at all, but still uid 0: the checkout stays readable wherever CI cloned it.
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
    proc = subprocess.run(
        [*unprivileged, sys.executable, "-c", code],
        input=batch,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    results = json.loads(proc.stdout)
    assert len(results) == 2
    for message, hint in results:
        assert "permission denied" in message
        assert "needs root (CAP_NET_ADMIN)" in hint
    assert ours(ipt.variant) == []


def test_a_bad_variant_or_prefix_is_an_input_error() -> None:
    with pytest.raises(InputError, match="nft or legacy"):
        IptablesBackend("nftables", prefix=PREFIX)
    with pytest.raises(InputError, match="28 characters"):
        IptablesBackend("nft", prefix="NATPORTS_TOO_LONG")


def test_a_shifted_range_is_one_chain_and_reaches_each_port(
    ipt: IptablesBackend, client_net: ClientNet, range_servers: list[TagServer]
) -> None:
    rng = range_route("ftp", 25300, 27300, 3, client_net.host_ip)
    ipt.run(ipt.plan_app([], [rng]))
    assert (
        len([line for line in ours(ipt.variant) if line.startswith(":")]) == 6
    )  # 4 fixed + app + route
    for offset in range(3):
        assert client_net.connect_once(25300 + offset) == {"tag": f"p{27300 + offset}"}
    assert ipt.counters()[ipt.route_id(rng)][0] >= 3


def test_intact_sees_the_hooks(ipt: IptablesBackend) -> None:
    assert not ipt.intact()
    ipt.run(ipt.plan_app([], [route("mail", 25027, ("172.30.0.2", 5025))]))
    assert ipt.intact()
    sh(f"iptables-{ipt.variant}", "-t", "nat", "-D", "OUTPUT", "-j", f"{PREFIX}-OUT")
    assert not ipt.intact()
