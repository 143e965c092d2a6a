"""The iptables edge: `ip[6]tables-{nft,legacy}-restore --noflush` batches, state from -save.

For hosts where natports must share the nat table with iptables (Docker on
iptables, a firewall that owns nftables). No binding library: python-iptables
writes only the legacy tables and ignores the xtables lock (docs/iptables-decision.md).
`iptables-restore --noflush` applies one table atomically on both variants and,
with --wait, queues behind Docker and other users of the xtables lock.

IPv6 routes go to the IPv6 nat table through ip6tables the same way. The two
tables are two restores, so a batch touching both is atomic per table, not as
a whole: `run` checks the IPv6 part with `--test` first, applies IPv4, then
IPv6. Should the IPv6 restore still fail, the IPv4 table holds the new rules,
the IPv6 table the old ones (its restore is atomic), and the error says so;
the switch's state (natports/switch.py) was widened to previous + desired
before the batch and is not narrowed, so the next apply, which re-renders both
tables from that state, completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..errors import InputError, NatportsError
from ..forwarding import Forwarding
from ..model import Route
from ..probes import check_cap_net_admin
from ..runner import ToolMissing, run
from ..xtables import legacy6_loaded
from . import ipt_render
from .ipt_render import Layout, LiveNat, LiveTables

Variant = Literal["nft", "legacy"]
VARIANTS: dict[str, Variant] = {"nft": "nft", "legacy": "legacy"}  # str -> Variant, checked
LOCK_WAIT_SECONDS = 30  # bounded -w: a stuck lock holder yields an error, not a hang


class IptablesBackend:
    """Programs kernel DNAT through chains named `<prefix>-...` in the IPv4 and IPv6 nat tables.

    The only rules it adds to chains it does not own are the three built-in jumps (per table).
    """

    name = "iptables"

    def __init__(
        self,
        variant: str = "nft",
        prefix: str = ipt_render.DEFAULT_PREFIX,
        search_path: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise InputError([f"iptables variant must be nft or legacy, not {variant!r}"])
        self.variant: Variant = VARIANTS[variant]
        try:
            self.layout = Layout(prefix)
        except ValueError as exc:
            raise InputError([str(exc)]) from None
        self.search_path = search_path  # where to look for the binaries; None means $PATH
        self.forwarding = Forwarding(prefix, self.variant)
        self._forwards: bool | None = None

    def forwards_unpublished(self) -> bool:
        """Can natports' flows pass Docker's FORWARD filter without published ports?

        Read-only (planning and --dry-run call it): true when Docker has DOCKER-USER,
        where `run` puts natports' accept before the first batch that routes anything.
        Route chains set the conntrack mark bit the accept keys on (ipt_render).
        """
        if self._forwards is None:
            self._forwards = self.forwarding.available()
        return self._forwards

    # -- planning (pure apart from reading our own chains) ---------------------------

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        return ipt_render.render_app_tables(self.layout, self.lives(), previous, desired)

    def plan_reconcile(self, desired: Sequence[Route], describe: bool = True) -> str:
        return ipt_render.render_reconcile_tables(self.layout, self.lives(), desired)

    def plan_flush_all(self) -> str:
        return ipt_render.render_flush_all_tables(self.layout, self.lives())

    # -- effects ------------------------------------------------------------------------

    def run(self, batch: str) -> None:
        """One atomic restore, then make sure each built-in jump exists exactly once.

        The batch already carries the jumps it saw missing; the second look catches
        anything that changed between planning and running (nothing, normally).
        """
        if not batch.strip():
            return  # nothing was planned: nothing of ours exists
        flush = "-j DNAT" not in batch and "-X " in batch and ":" in batch and self._is_flush(batch)
        if not flush and self.forwards_unpublished():
            self.forwarding.ensure_once()  # before the DNAT rules that rely on it
        v4, v6 = ipt_render.split_batch(batch)
        wait = f"--wait={LOCK_WAIT_SECONDS}"
        if v4 and v6:  # IPv6 is what a host lacks most often: find out before IPv4 changes
            self._run("restore", [wait, "--noflush", "--test"], v6, family=6)
        if v4:
            self._run("restore", [wait, "--noflush"], v4)
        if v6:
            try:
                self._run("restore", [wait, "--noflush"], v6, family=6)
            except NatportsError as exc:
                if not v4:
                    raise
                raise NatportsError(
                    f"{exc.message} (the IPv4 rules were changed, the IPv6 rules were not)",
                    "the IPv6 batch is atomic: its table holds the previous IPv6 rules; "
                    "the next apply tries again (see --dry-run)",
                ) from None
        if flush:
            self.forwarding.remove()  # nothing of natports is left to accept
        for family, part in ((4, v4), (6, v6)):
            if not part:
                continue
            fixes = ipt_render.render_hook_fixes(self.layout, self.live(family))
            if fixes:
                self._run("restore", [wait, "--noflush"], fixes, family=family)

    def intact(self, routes: Sequence[Route] = ()) -> bool:
        """Cheap: each built-in chain still jumps to ours (`-C` reads one chain, not the table).

        A missing chain of ours makes its jump impossible, so three checks cover the
        skeleton; what removes natports' rules in practice removes the jumps too. The
        IPv4 skeleton is there whenever this backend routes anything (IPv6 too). In
        IPv6, a jump missing from a chain of ours is a loss; so is a missing chain when
        `routes` (what the backend should hold) has IPv6 routes: a firewall reload that
        removed every IPv6 chain of ours. Without IPv6 routes, no IPv6 chain is fine
        (`-C` tells a missing jump from a missing chain).
        """
        needs6 = any(route.key.family == 6 for route in routes)
        if not self._hooked(4):
            return False
        if routes and self.forwards_unpublished() and not self.forwarding.in_place():
            return False  # the filter side (DOCKER-USER) was flushed: the next run repairs
        if not self._v6_readable():  # legacy with no IPv6 nat table: none of ours to lose
            return True
        return self._hooked(6, required=needs6)

    def _hooked(self, family: int, required: bool = True) -> bool:
        """Are our hooks in place? IPv4: any failed check is a loss. IPv6: only what a
        reconcile can put back is: a jump missing from a chain of ours, or, where
        `required`, a chain of ours gone. No ip6tables, no IPv6 nat, a lock timeout: not
        a loss here (the repair would fail each second; apply and resync report them)."""
        tool = f"{_ip(family)}-{self.variant}"
        for builtin, ours in self.layout.hooks():
            check = [tool, f"--wait={LOCK_WAIT_SECONDS}", "-t", "nat", "-C", builtin, "-j", ours]
            try:
                proc = run(check, path=self.search_path)
            except ToolMissing:
                return family == 6
            if proc.returncode == 0:
                continue
            if family == 4 or _jump_missing(proc.stderr):
                return False
            return not (required and _chain_missing(proc.stderr, ours))
        return True

    def _is_flush(self, batch: str) -> bool:
        """Does the batch remove every chain of ours (render_flush_all_tables)?"""
        return batch == self.plan_flush_all()

    def live(self, family: int = 4) -> LiveNat:
        """Our chains in one nat table and the rules touching them, with counters."""
        if family == 6 and not self._v6_readable():
            return LiveNat()
        try:
            text = self._run("save", ["-c", "-t", "nat"], family=family)
        except NatportsError as exc:
            unusable = "not found" in exc.message or "ip6tables-save failed" in exc.message
            if family == 6 and unusable:
                # No ip6tables, or no IPv6 nat here (IPv6 disabled): nothing of ours can be
                # in it, and IPv4-only hosts keep working. A lock or permission error raises.
                return LiveNat()
            raise
        return ipt_render.parse_save(text, self.layout)

    def lives(self) -> LiveTables:
        return LiveTables(self.live(4), self.live(6))

    def _v6_readable(self) -> bool:
        """Legacy: reading the IPv6 nat table would load its module; unloaded, it holds nothing."""
        return self.variant != "legacy" or legacy6_loaded("nat")

    def route_id(self, route: Route) -> str:
        return self.layout.route_chain(route)

    def counters(self) -> dict[str, tuple[int, int]]:
        """route chain -> (packets, bytes) summed over its DNAT rules, both tables."""
        result = {}
        for live in (self.live(4), self.live(6)):
            for c in live.chains:
                if self.layout.is_route_chain(c):
                    result[c] = live.dnat_counters(c)
        return result

    def _run(
        self,
        tool: Literal["restore", "save"],
        args: list[str],
        stdin: str = "",
        family: int = 4,
    ) -> str:
        ip = _ip(family)
        command = f"{ip}-{self.variant}-{tool}"
        try:
            proc = run([command, *args], stdin=stdin, path=self.search_path)
        except ToolMissing:
            raise NatportsError(
                f"{ip}-{tool} not found ({command})",
                "install the iptables package (apt-get install iptables)",
            ) from None
        if proc.returncode == 0:
            return proc.stdout
        # iptables-nft prints "# Warning: iptables-legacy tables present" on every call.
        lines = [
            line.strip()
            for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith(("# Warning", "Try `"))
        ]
        err = " ".join(lines) or f"exit status {proc.returncode}"
        if tool == "save" and "Table does not exist" in err:
            return ""  # legacy without the nat module: nothing of ours can exist
        denied = ("Permission denied", "Operation not permitted", "must be root")
        # Legacy xtables without CAP_NET_ADMIN says only "unable to initialize table".
        if any(s in err for s in denied) or not check_cap_net_admin().ok:
            raise NatportsError(
                f"{command}: permission denied",
                "natports needs root (CAP_NET_ADMIN) to change kernel rules",
            )
        if "xtables lock" in err:
            raise NatportsError(
                f"{command}: another program held the xtables lock for {LOCK_WAIT_SECONDS}s",
                "nothing was changed; try again once it is released",
            )
        if tool == "restore":
            raise NatportsError(
                f"{ip}-restore failed: {err}",
                "the batch is atomic: nothing was changed (see --dry-run)",
            )
        raise NatportsError(f"{ip}-save failed: {err}")


def _ip(family: int) -> str:
    return "ip6tables" if family == 6 else "iptables"


def _chain_missing(stderr: str, chain: str) -> bool:
    """`-C` naming a chain of ours that does not exist: "Chain 'X' does not exist" (nft),
    "Couldn't load target `X'" (legacy)."""
    return f"chain '{chain}' does not exist".lower() in stderr.lower() or f"`{chain}'" in stderr


def _jump_missing(stderr: str) -> bool:
    """`-C` of a jump our existing chain lacks: "Bad rule" (nft), "No chain/target/match by
    that name" (legacy). A missing chain of ours says "Chain 'X' does not exist" (nft) or
    "Couldn't load target `X'" (legacy)."""
    text = stderr.lower()
    return "bad rule" in text or "no chain/target/match" in text
