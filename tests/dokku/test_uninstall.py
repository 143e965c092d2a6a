"""`uninstall-dokku-plugin` keeps what README.md and docs/dokku.md promise: "Remove it all
with `sudo ./scripts/uninstall-dokku-plugin` (`--purge` also drops /var/lib/natports)",
and "`uninstall natports` removes every rule". Run the documented way, on a host where an
app is routed, and checked against the kernel and the files themselves."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from natports.forwarding import chain
from tests.dokku.harness import DokkuHost
from tests.infra import NFT_TABLE, ClientNet, sh

pytestmark = pytest.mark.usefixtures("clean_kernel")

PORT = 23125
PREFIX = NFT_TABLE.upper()  # the test installation's iptables chain prefix
XTABLES = ("iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy")
COUNTERS = re.compile(r"\[\d+:\d+\]")


def xtables() -> dict[str, tuple[list[str], list[str]]]:
    """Per xtables tool: (the lines naming the test prefix, every other line) of all the
    tables it holds, counters and comments dropped. Read-only: `-save` without `-t` reads
    only the tables that exist (it loads no legacy module)."""
    found = {}
    for tool in XTABLES:
        if shutil.which(f"{tool}-save") is None:
            continue
        text = sh(f"{tool}-save", check=False).stdout
        lines = [COUNTERS.sub("", line) for line in text.splitlines() if not line.startswith("#")]
        found[tool] = (
            [line for line in lines if PREFIX in line],
            [line for line in lines if PREFIX not in line],
        )
    return found


def nft_tables() -> list[str]:
    return sh("nft", "list", "tables").stdout.splitlines()


def ask_udp(net: ClientNet, port: int) -> str | None:
    flow = net.udp_hold(port)
    try:
        return flow.ask("x")
    finally:
        flow.close()


def running(cid: str) -> bool:
    out = sh("docker", "inspect", "-f", "{{.State.Running}}", cid, check=False).stdout
    return out.strip() == "true"


@pytest.mark.parametrize("purge", [False, True], ids=["keep-state", "purge"])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_uninstall_removes_every_rule_and_what_the_installer_made(
    dokku: DokkuHost, client_net: ClientNet, backend: str, purge: bool
) -> None:
    dokku.config.write_text(f'[backend]\ndefault = "{backend}"\n')
    pushed = dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n{PORT + 1}:5026/udp\n"})
    assert pushed.ok, pushed.output
    assert client_net.connect_once(PORT).get("tag") == "v1.web.1"
    assert ask_udp(client_net, PORT + 1) == "v1.web.1 x"
    cid = dokku.current("mail")["web"][0]

    # What is there to remove: the rules of the backend in use, natports' accept in
    # Docker's DOCKER-USER (where Docker has one), the installer's files, the state.
    before = xtables()
    ours = {tool: mine for tool, (mine, _) in before.items() if mine}
    assert (f"inet {NFT_TABLE}" in " ".join(nft_tables())) == (backend == "nftables")
    if backend == "iptables":
        assert any(line.startswith(f":{PREFIX}-") for line in ours.get("iptables-nft", []))
    if "-A DOCKER-USER -j RETURN" in before.get("iptables-nft", ([], []))[1]:
        assert f"-A DOCKER-USER -j {chain(PREFIX)}" in ours["iptables-nft"]
    installed = [
        dokku.helper,
        dokku.sudoers,
        dokku.plugin,
        dokku.plugins / "enabled" / "natports",
        dokku.base / "venv",
        dokku.base / "plugin-src",
    ]
    assert all(path.exists() for path in installed)
    assert dokku.stored("mail") is not None
    tables = [t for t in nft_tables() if t != f"table inet {NFT_TABLE}"]

    dokku.uninstall(*(["--purge"] if purge else []))

    # Every rule: no nft table, no chain or rule of the prefix in any xtables table of
    # either variant, IPv4 or IPv6, DOCKER-USER's jump included.
    after = xtables()
    assert {tool: mine for tool, (mine, _) in after.items() if mine} == {}
    assert nft_tables() == tables
    # Docker's rules (and everyone else's) are exactly as they were.
    assert {t: others for t, (_, others) in after.items()} == {
        t: others for t, (_, others) in before.items()
    }
    # The app keeps running (uninstall removes natports, not apps), so what a client
    # sees now is the rules' absence, not a stopped backend.
    assert running(cid)
    assert client_net.connect_once(PORT).get("tag", "refused") == "refused"
    assert ask_udp(client_net, PORT + 1) is None
    # Everything the installer made.
    assert [path for path in installed if path.exists() or path.is_symlink()] == []
    # The state directory: dropped with --purge only; without it, the app's mappings stay.
    if purge:
        assert not dokku.state.exists()
    else:
        assert dokku.state.is_dir() and dokku.stored("mail") is not None


def test_uninstall_stops_the_agent_before_it_removes_the_rules(
    client_net: ClientNet,
) -> None:
    """With systemd, the agent (natports-watch.service) routes the apps again from their
    mappings on its next Docker event or resync: stopped after the rules went, it could
    put them back in between, and nothing would ever remove them (the helper is gone)."""
    dokku = DokkuHost(systemd=True)
    try:
        dokku.install()
        agent = dokku.agent_pid()
        assert agent is not None and Path(f"/proc/{agent}").exists()
        assert dokku.git_push("mail", "v1", {"PORTS": f"{PORT}:5025\n"}).ok
        assert client_net.connect_once(PORT).get("tag") == "v1.web.1"
        units = sorted(p.name for p in dokku.units.glob("*.service"))
        assert units == ["natports-proxy.service", "natports-watch.service", "natports.service"]

        dokku.uninstall("--purge")

        calls = (dokku.units / "calls").read_text().splitlines()
        assert "disable --now natports-watch.service table=yes" in calls, calls
        assert dokku.agent_pid() is None and not _alive(agent)
        assert sorted(p.name for p in dokku.units.glob("*.service")) == []
        # A Docker event now (the app's container restarts) brings nothing back.
        sh("docker", "restart", "-t", "1", dokku.current("mail")["web"][0])
        assert f"table inet {NFT_TABLE}" not in nft_tables()
        assert {tool: mine for tool, (mine, _) in xtables().items() if mine} == {}
        assert client_net.connect_once(PORT).get("tag", "refused") == "refused"
    finally:
        dokku.remove()


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaps in this container counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
