"""Forwarding natports' DNATed flows through Docker's FORWARD filter without `-p` per port.

Docker (iptables firewall, 20.10 up to 28/29) sets FORWARD's policy to DROP and
accepts new flows to a container only for published ports (moby
daemon/libnetwork/drivers/bridge/internal/iptabler/port.go). It reserves one
chain for its users, DOCKER-USER, jumped to first from FORWARD, and never
deletes or changes rules someone else put there (moby
daemon/libnetwork/firewall_linux.go, setupUserChain).

natports marks every flow it DNATs with a conntrack mark bit (CT_MARK, set in
its nat rules). With forwarding on, it owns one filter chain, `<PREFIX>-FWD`,
that accepts flows carrying that bit and DNATed by conntrack, and adds exactly
one rule to DOCKER-USER: a jump to it. Containers then need no `-p
127.0.0.1::PORT`, so Docker starts no docker-proxy process per port.

Docker's nftables firewall (`--firewall-backend=nftables`, 29) has no DOCKER-USER
(firewall_linux.go: "There's no equivalent to DOCKER-USER in the nftables
implementation"); there, and wherever DOCKER-USER is missing, natports falls
back to publishing each private port on loopback (`mode()` says which).

IPv6: Docker 20.10 creates DOCKER-USER for IPv4 only ("TODO IPv6 support",
vendor/github.com/docker/libnetwork/firewall_linux.go, arrangeUserFilterRule);
Docker 28/29 creates it in ip6tables too when ip6tables is on (the default from
27: daemon/libnetwork/firewall_linux.go setupUserChains, for each of
controller_linux.go enabledIptablesVersions). Where the IPv6 DOCKER-USER exists,
natports puts the same chain and jump there (same bit: the conntrack mark is
per flow, whatever the family); where it does not, natports leaves IPv6's filter
alone (docs/forwarding.md says what passes then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .backends.nft_render import CT_MARK
from .errors import NatportsError
from .runner import ToolMissing, run
from .xtables import legacy6_loaded

USER_CHAIN = "DOCKER-USER"
Mode = Literal["docker-user", "publish"]


@dataclass(frozen=True)
class Filter:
    """What `iptables-save -t filter` shows of the two chains that matter here."""

    has_user_chain: bool
    jumps: int  # rules in DOCKER-USER jumping to our chain
    ours: tuple[str, ...]  # our chain's rules, as `-A CHAIN ...` lines; () if absent
    has_chain: bool


def chain(prefix: str) -> str:
    return f"{prefix}-FWD"


def accept_rule(prefix: str) -> str:
    mark = f"{CT_MARK:#x}"  # as iptables-save prints it
    return (
        f"-A {chain(prefix)} -m conntrack --ctstate DNAT -m connmark --mark {mark}/{mark} "
        '-m comment --comment "natports: flows natports DNATed" -j ACCEPT'
    )


def parse(save: str, prefix: str) -> Filter:
    ours = chain(prefix)
    has_user = has_chain = False
    jumps = 0
    rules: list[str] = []
    for line in save.splitlines():
        if line.startswith(f":{USER_CHAIN} "):
            has_user = True
        elif line.startswith(f":{ours} "):
            has_chain = True
        elif line.startswith(f"-A {USER_CHAIN} ") and line.split()[-2:] == ["-j", ours]:
            jumps += 1
        elif line.startswith(f"-A {ours} "):
            rules.append(line)
    return Filter(has_user, jumps, tuple(rules), has_chain)


def render_ensure(live: Filter, prefix: str) -> str:
    """iptables-restore --noflush input making the chain and the one jump exact; "" if they are."""
    if not live.has_user_chain:
        return ""
    want = (accept_rule(prefix),)
    if live.has_chain and live.ours == want and live.jumps == 1:
        return ""
    lines = ["*filter", f":{chain(prefix)} - [0:0]", *want]
    if live.jumps == 0:
        lines.append(f"-I {USER_CHAIN} 1 -j {chain(prefix)}")
    lines += [f"-D {USER_CHAIN} -j {chain(prefix)}"] * max(0, live.jumps - 1)
    return "\n".join([*lines, "COMMIT"]) + "\n"


def render_remove(live: Filter, prefix: str) -> str:
    if not live.has_chain and not live.jumps:
        return ""
    lines = ["*filter"]
    if live.has_chain:
        lines.append(f":{chain(prefix)} - [0:0]")
    lines += [f"-D {USER_CHAIN} -j {chain(prefix)}"] * live.jumps
    if live.has_chain:
        lines.append(f"-X {chain(prefix)}")
    return "\n".join([*lines, "COMMIT"]) + "\n"


def mode_of(live: Filter, prefix: str) -> Mode:
    """Whether natports' flows pass FORWARD without published ports right now."""
    ok = live.has_user_chain and live.jumps >= 1 and accept_rule(prefix) in live.ours
    return "docker-user" if ok else "publish"


class Forwarding:
    """The effects: read and change the filter tables through the xtables variant Docker uses.

    `ensure` and `remove` cover IPv4 and, where Docker made an IPv6 DOCKER-USER, IPv6
    (`six`); `available` and `mode` tell about IPv4, which decides whether deploys
    publish ports (Docker without an IPv4 DOCKER-USER has none for IPv6 either).
    """

    def __init__(self, prefix: str, variant: str, v6: bool = False) -> None:
        self.prefix = prefix
        self.v6 = v6
        self.legacy = variant == "legacy"
        self.tool = f"ip{'6' if v6 else ''}tables-{variant}"
        self.six = None if v6 else Forwarding(prefix, variant, v6=True)
        self._ensured = False  # by this object, and not seen gone since

    def ensure_once(self) -> None:
        """`ensure`, unless this object did so already and has not seen it gone since
        (`in_place`): a switch should not pay for reading the filter table each time."""
        if not self._ensured:
            self.ensure()
            self._ensured = True

    def in_place(self) -> bool:
        """Is what `ensure` makes still exact (IPv4, and IPv6 where Docker made a
        DOCKER-USER there)? A firewall reload that flushes the filter table takes
        natports' accept with it while the nat rules may stay; then the next
        `ensure_once` puts it back. True where there is no DOCKER-USER at all."""
        exact = not render_ensure(self.live(), self.prefix)
        if exact and self.six is not None:
            exact = self.six.in_place()
        if not exact:
            self._ensured = False
        return exact

    def live(self) -> Filter:
        if self.v6 and self.legacy and not legacy6_loaded("filter"):
            return Filter(False, 0, (), False)  # reading it would load the module; nothing there
        return parse(self._run("save", ["-t", "filter"]), self.prefix)

    def ensure(self) -> Mode:
        """Install the chain and the jump where Docker's DOCKER-USER exists (IPv4, then
        IPv6); say what is in force for IPv4."""
        live = self.live()
        batch = render_ensure(live, self.prefix)
        if batch:
            self._run("restore", ["--wait=30", "--noflush"], batch)
            live = self.live()
        if self.six is not None:
            self.six.ensure()
        return mode_of(live, self.prefix)

    def available(self) -> bool:
        """Docker's DOCKER-USER chain exists: natports' accept can go there."""
        return self.live().has_user_chain

    def remove(self) -> None:
        self._ensured = False
        batch = render_remove(self.live(), self.prefix)
        if batch:
            self._run("restore", ["--wait=30", "--noflush"], batch)
        if self.six is not None:
            self.six.remove()

    def mode(self) -> Mode:
        return mode_of(self.live(), self.prefix)

    def forward_policy(self) -> str | None:
        """FORWARD's policy (ACCEPT, DROP) as -save prints it; None: no filter table there."""
        if self.v6 and self.legacy and not legacy6_loaded("filter"):
            return None
        for line in self._run("save", ["-t", "filter"]).splitlines():
            if line.startswith(":FORWARD "):
                return line.split()[1]
        return None

    def _run(self, what: str, args: list[str], stdin: str = "") -> str:
        try:
            proc = run([f"{self.tool}-{what}", *args], stdin=stdin)
        except ToolMissing:
            return ""  # no iptables: no Docker filter to pass either
        if proc.returncode != 0:
            if what == "save":
                return ""  # no filter table (legacy without the module): nothing of Docker's
            raise NatportsError(
                f"{self.tool}-restore failed: {proc.stderr.strip()}",
                "natports keeps needing -p 127.0.0.1::PORT for its containers",
            )
        return proc.stdout
