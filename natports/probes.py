"""Host probes: what this host offers natports. Each only reads (lists tables, counts
conntrack entries, asks Docker its version); nothing here changes the host.

Used by `natports doctor` and by backend selection (`auto`), which must agree.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .runner import Result, probe
from .xtables import legacy6_loaded

CAP_NET_ADMIN = 12


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _run(*argv: str) -> Result | None:
    return probe(*argv)


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def check_nft() -> Check:
    if shutil.which("nft") is None:
        return Check("nft", False, "nft not found", "apt-get install nftables")
    proc = _run("nft", "list", "tables")
    if proc is None or proc.returncode != 0:
        why = _first_line(proc.stderr) if proc else "could not run nft"
        return Check("nft", False, f"nft cannot list tables: {why}", "run as root (CAP_NET_ADMIN)")
    return Check("nft", True, "nft works")


def _legacy_loaded() -> bool:
    """Asking iptables-legacy about a table would load its module: only read loaded ones."""
    try:
        return bool(Path("/proc/net/ip_tables_names").read_text().split())
    except OSError:
        return False


def _variants() -> tuple[str, ...]:
    return ("nft", "legacy") if _legacy_loaded() else ("nft",)


def iptables_variant() -> str:
    """The xtables variant the host uses: the one Docker's nat chains live in, else the
    one `iptables` points to."""
    for variant in _variants():
        proc = _run(f"iptables-{variant}-save", "-t", "nat")
        if proc and proc.returncode == 0 and ":DOCKER " in proc.stdout:
            return variant
    proc = _run("iptables", "--version")
    if proc and "legacy" in proc.stdout:
        return "legacy"
    return "nft"


def check_iptables() -> Check:
    variant = iptables_variant()
    restore = f"iptables-{variant}-restore"
    if shutil.which(restore) is None:
        return Check("iptables", False, f"{restore} not found", "apt-get install iptables")
    proc = _run(f"iptables-{variant}-save", "-t", "nat")
    if proc is None or proc.returncode != 0:
        why = _first_line(proc.stderr) if proc else "could not run iptables-save"
        return Check(
            "iptables", False, f"iptables ({variant}) cannot read nat: {why}", "run as root"
        )
    return Check("iptables", True, f"iptables works, variant {variant}")


def check_ip6tables() -> Check:
    """What the iptables backend needs for IPv6 routes (IPv4 routes do not need it)."""
    variant = iptables_variant()
    restore = f"ip6tables-{variant}-restore"
    if shutil.which(restore) is None:
        return Check(
            "ip6tables",
            False,
            f"{restore} not found: the iptables backend cannot route IPv6",
            "apt-get install iptables (IPv4 routes do not need it)",
        )
    if variant == "legacy" and not legacy6_loaded("nat"):
        return Check(
            "ip6tables", True, "ip6tables present (legacy); its nat table loads at the first route"
        )
    proc = _run(f"ip6tables-{variant}-save", "-t", "nat")
    if proc is None or proc.returncode != 0:
        why = _first_line(proc.stderr) if proc else "could not run ip6tables-save"
        return Check(
            "ip6tables",
            False,
            f"ip6tables ({variant}) cannot read the IPv6 nat table: {why}",
            "IPv6 disabled or no ip6 nat in this kernel: IPv6 routes need the nftables backend",
        )
    return Check("ip6tables", True, f"ip6tables works, variant {variant} (IPv6 routes)")


def check_cap_net_admin() -> Check:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return Check("cap_net_admin", False, "cannot read /proc/self/status")
    line = next((ln for ln in status.splitlines() if ln.startswith("CapEff:")), "CapEff: 0")
    effective = int(line.split()[1], 16)
    if effective & (1 << CAP_NET_ADMIN):
        return Check("cap_net_admin", True, "CAP_NET_ADMIN is effective")
    return Check(
        "cap_net_admin",
        False,
        "no CAP_NET_ADMIN: netfilter cannot be programmed",
        "run as root, or use the proxy backend",
    )


def check_ip_forward() -> Check:
    try:
        value = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    except OSError:
        return Check("ip_forward", False, "cannot read net.ipv4.ip_forward")
    if value == "1":
        return Check("ip_forward", True, "net.ipv4.ip_forward = 1")
    return Check(
        "ip_forward",
        False,
        "net.ipv4.ip_forward = 0: DNATed traffic cannot reach containers",
        "Docker normally sets it; sysctl -w net.ipv4.ip_forward=1",
    )


def check_docker() -> Check:
    from .containers import Docker
    from .errors import NatportsError

    try:
        version = Docker().client.version().get("Version", "unknown")
    except NatportsError as exc:
        return Check("docker", False, exc.message, exc.hint)
    return Check("docker", True, f"Docker {version} reachable")


def check_docker_forward() -> Check:
    """Docker accepts forwarded traffic to published container ports (its FORWARD rules)."""
    for variant in _variants():
        proc = _run(f"iptables-{variant}-save", "-t", "filter")
        if (
            proc
            and proc.returncode == 0
            and (
                "-A FORWARD -o docker0 -j DOCKER" in proc.stdout
                or "-A FORWARD -j DOCKER-FORWARD" in proc.stdout
            )
        ):
            return Check(
                "docker_forward", True, f"Docker's FORWARD accepts are in place ({variant})"
            )
    return Check(
        "docker_forward",
        False,
        "Docker's FORWARD rules for published ports were not found",
        "is Docker running with iptables enabled (not --iptables=false)?",
    )


def check_forwarding(prefix: str = "NATPORTS") -> Check:
    """How natports' DNATed flows pass Docker's FORWARD filter: DOCKER-USER, or -p per port."""
    from .forwarding import Forwarding, chain, mode_of

    live = Forwarding(prefix, iptables_variant()).live()
    if not live.has_user_chain:
        return Check(
            "forwarding",
            True,
            "no DOCKER-USER chain (Docker's nftables firewall, or Docker not running): "
            "containers publish each private port on loopback (-p 127.0.0.1::PORT), "
            "one docker-proxy process per port",
        )
    if mode_of(live, prefix) == "docker-user":
        return Check(
            "forwarding",
            True,
            f"DOCKER-USER jumps to {chain(prefix)}: natports' flows need no published ports",
        )
    return Check(
        "forwarding",
        True,
        f"DOCKER-USER exists; natports adds its accept ({chain(prefix)}) at the next apply, "
        "and deploys then need no published ports",
    )


def check_forwarding6(prefix: str = "NATPORTS") -> Check:
    """How natports' IPv6 flows pass FORWARD: Docker's IPv6 DOCKER-USER, or nothing filters."""
    from .forwarding import Forwarding, chain, mode_of

    six = Forwarding(prefix, iptables_variant(), v6=True)
    live = six.live()
    if live.has_user_chain and mode_of(live, prefix) == "docker-user":
        return Check(
            "forwarding6", True, f"IPv6 DOCKER-USER jumps to {chain(prefix)}: IPv6 flows pass"
        )
    if live.has_user_chain:
        return Check(
            "forwarding6",
            True,
            f"IPv6 DOCKER-USER exists; natports adds its accept ({chain(prefix)}) "
            "at the next apply",
        )
    if not Forwarding(prefix, iptables_variant()).live().has_user_chain:
        return Check(
            "forwarding6",
            True,
            "no DOCKER-USER in either family (Docker's nftables firewall, --iptables=false, "
            "or Docker not running): natports adds no IPv6 accept; IPv6 flows pass only where "
            "nothing else filters them (a loopback-published port opens IPv4 only)",
        )
    if six.forward_policy() == "DROP":
        return Check(
            "forwarding6",
            False,
            "IPv6 FORWARD drops by default and there is no IPv6 DOCKER-USER (Docker 20.10 with "
            "ip6tables on): IPv6 flows natports DNATs to containers are dropped",
            "route IPv4 only, or use a Docker that makes an IPv6 DOCKER-USER (27+); "
            "see docs/forwarding.md",
        )
    return Check(
        "forwarding6",
        True,
        "no IPv6 DOCKER-USER and IPv6 FORWARD does not drop (Docker does not filter IPv6 "
        "with ip6tables): IPv6 flows pass",
    )


def check_conntrack() -> Check:
    proc = _run("conntrack", "-C")
    if proc is None:
        return Check("conntrack", False, "conntrack not found", "apt-get install conntrack")
    if proc.returncode != 0:
        return Check(
            "conntrack",
            False,
            f"no conntrack netlink access: {_first_line(proc.stderr)}",
            "run as root; UDP flows of removed containers then idle out instead",
        )
    return Check("conntrack", True, f"conntrack netlink works ({proc.stdout.strip()} entries)")


def choose_backend(nft: Check, iptables: Callable[[], Check]) -> tuple[str, str]:
    """(backend, why) for `auto`: nftables, then iptables, then the userspace proxy.

    `iptables` is asked only when nft does not work: its probe may run two commands.
    """
    if nft.ok:
        return "nftables", "nft works"
    ipt = iptables()
    if ipt.ok:
        return "iptables", f"{nft.detail}; {ipt.detail}"
    return "proxy", f"{nft.detail}; {ipt.detail}: netfilter cannot be programmed"
