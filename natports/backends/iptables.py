"""The iptables edge: batches through `iptables-{nft,legacy}-restore --noflush`, state from -save.

For hosts where natports must share the nat table with iptables (Docker on
iptables, a firewall that owns nftables). No binding library: python-iptables
writes only the legacy tables and ignores the xtables lock (docs/iptables-decision.md).
`iptables-restore --noflush` applies one table atomically on both variants and,
with --wait, queues behind Docker and other users of the xtables lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..errors import InputError, NatportsError
from ..forwarding import Forwarding
from ..model import Route
from ..probes import check_cap_net_admin
from ..runner import ToolMissing, run
from . import ipt_render
from .ipt_render import Layout, LiveNat

Variant = Literal["nft", "legacy"]
VARIANTS: dict[str, Variant] = {"nft": "nft", "legacy": "legacy"}  # str -> Variant, checked
LOCK_WAIT_SECONDS = 30  # bounded -w: a stuck lock holder yields an error, not a hang


class IptablesBackend:
    """Programs kernel DNAT through chains named `<prefix>-...` in the IPv4 nat table.

    The only rules it adds to chains it does not own are the three built-in jumps.
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
        self._ensured = False

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
        _refuse_ipv6(desired)
        return ipt_render.render_app(self.layout, self.live(), previous, desired)

    def plan_reconcile(self, desired: Sequence[Route]) -> str:
        _refuse_ipv6(desired)
        return ipt_render.render_reconcile(self.layout, self.live(), desired)

    def plan_flush_all(self) -> str:
        return ipt_render.render_flush_all(self.layout, self.live())

    # -- effects ------------------------------------------------------------------------

    def run(self, batch: str) -> None:
        """One atomic restore, then make sure each built-in jump exists exactly once.

        The batch already carries the jumps it saw missing; the second look catches
        anything that changed between planning and running (nothing, normally).
        """
        if not batch.strip():
            return  # nothing was planned: nothing of ours exists
        flush = "-j DNAT" not in batch and "-X " in batch and ":" in batch and self._is_flush(batch)
        if not flush and not self._ensured and self.forwards_unpublished():
            self.forwarding.ensure()  # before the DNAT rules that rely on it
            self._ensured = True
        self._run("restore", [f"--wait={LOCK_WAIT_SECONDS}", "--noflush"], batch)
        if flush:
            self.forwarding.remove()  # nothing of natports is left to accept
            self._ensured = False
        fixes = ipt_render.render_hook_fixes(self.layout, self.live())
        if fixes:
            self._run("restore", [f"--wait={LOCK_WAIT_SECONDS}", "--noflush"], fixes)

    def intact(self) -> bool:
        """Cheap: each built-in chain still jumps to ours (`-C` reads one chain, not the table).

        A missing chain of ours makes its jump impossible, so three checks cover the
        skeleton; what removes natports' rules in practice removes the jumps too.
        """
        tool = f"iptables-{self.variant}"
        for builtin, ours in self.layout.hooks():
            check = [tool, f"--wait={LOCK_WAIT_SECONDS}", "-t", "nat", "-C", builtin, "-j", ours]
            try:
                proc = run(check, path=self.search_path)
            except ToolMissing:
                return False
            if proc.returncode != 0:
                return False
        return True

    def _is_flush(self, batch: str) -> bool:
        """Does the batch remove every chain of ours (render_flush_all)?"""
        return batch == ipt_render.render_flush_all(self.layout, self.live())

    def live(self) -> LiveNat:
        """Our chains and the rules touching them, with counters."""
        return ipt_render.parse_save(self._run("save", ["-c", "-t", "nat"]), self.layout)

    def route_id(self, route: Route) -> str:
        return self.layout.route_chain(route)

    def counters(self) -> dict[str, tuple[int, int]]:
        """route chain -> (packets, bytes) summed over its DNAT rules."""
        live = self.live()
        return {c: live.dnat_counters(c) for c in live.chains if self.layout.is_route_chain(c)}

    def _run(self, tool: Literal["restore", "save"], args: list[str], stdin: str = "") -> str:
        command = f"iptables-{self.variant}-{tool}"
        try:
            proc = run([command, *args], stdin=stdin, path=self.search_path)
        except ToolMissing:
            raise NatportsError(
                f"iptables-{tool} not found ({command})",
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
                f"iptables-restore failed: {err}",
                "the batch is atomic: nothing was changed (see --dry-run)",
            )
        raise NatportsError(f"iptables-save failed: {err}")


def _refuse_ipv6(routes: Sequence[Route]) -> None:
    six = [r for r in routes if r.key.family != 4]
    if six:
        names = ", ".join(ipt_render.route_label(r) for r in six)
        raise NatportsError(
            f"the iptables backend routes IPv4 only; IPv6 routes asked for: {names}",
            "use the nftables backend for IPv6, or give the app's containers no IPv6 address",
        )
