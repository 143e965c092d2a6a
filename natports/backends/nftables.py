"""The nftables edge: run batches through libnftables in-process (or `nft -f -` where
the library is missing), read our table back through netlink dumps (or nft's JSON)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import NatportsError
from ..forwarding import Forwarding
from ..model import Route
from ..runner import DEFAULT_TIMEOUT, run
from . import libnft, nft_netlink, nft_render, nft_wire
from .nft_render import LiveTable


class NftBackend:
    """Programs kernel DNAT through one owned table; never reads or writes any other."""

    name = "nftables"

    def __init__(
        self,
        table: str = nft_render.TABLE,
        nft: str = "nft",
        forwarding: Forwarding | None = None,
        direct: bool | None = None,
    ) -> None:
        self.table = table
        self.nft = nft
        # direct: libnftables in-process and netlink reads; off: the nft binary for all
        # (NATPORTS_NFT=binary, or the library is missing: then only reads are direct).
        if direct is None:
            direct = os.environ.get("NATPORTS_NFT") != "binary"
        self.direct = direct
        self.netlink = direct
        # The last full apply planned: its batch text, and how `run` applies it.
        self._planned: _Planned | None = None
        self.forwarding = forwarding  # None: leave Docker's filter alone (-p needed)
        self._forwards: bool | None = None

    @property
    def lib(self) -> libnft.LibNft | None:
        """libnftables, loaded on the first batch: `docker-args`, run for every container
        of a deploy, only plans and need not pay for loading it."""
        return libnft.load() if self.direct else None

    def forwards_unpublished(self) -> bool:
        """Can natports' flows pass Docker's FORWARD filter without published ports?

        Read-only (planning and --dry-run call it): true when Docker has DOCKER-USER,
        where `run` puts natports' accept before the first batch that routes anything.
        """
        if self._forwards is None:
            self._forwards = self.forwarding is not None and self.forwarding.available()
        return self._forwards

    # -- planning (pure apart from reading our own table) ----------------------------

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        """The switch; it refills the skeleton's rules only when they are not in place."""
        return nft_render.render_app(previous, desired, self.table, not self._skeleton_in_place())

    def plan_reconcile(self, desired: Sequence[Route], describe: bool = True) -> str:
        """Only the differences, when the table could be read exactly; else a rebuild.

        The batch text says what changes (a --dry-run prints it). `run` applies it as
        one transaction, falling back to the rebuild if the kernel refuses the changes
        (a set redefined by someone else). Unless a person reads it (`describe`), a
        change of elements only is a netlink batch instead, and a table that does not
        exist is built in two steps (`_run_over_netlink`): the batch is then a one-line
        summary, and the text is rendered only if nft has to run it after all.
        """
        live = self.live()
        planned = None
        if not describe and self.netlink:
            planned = self._plan_over_netlink(live, tuple(desired))
        if planned is None:
            text = nft_render.render_reconcile(live, desired, self.table)
            planned = _Planned(text, live, tuple(desired))
        self._planned = planned
        return planned.batch

    def _plan_over_netlink(
        self, live: LiveTable | None, desired: tuple[Route, ...]
    ) -> _Planned | None:
        if live is None:
            built = f"built for {len(desired)} routes, elements over netlink"
            summary = f"{_SUMMARY}{self.table}: {built}\n"
            return _Planned(summary, live, desired)
        changes = nft_render.element_changes(live, desired)
        if changes is None:
            return None
        added = sum(len(c.add) for c in changes)
        deleted = sum(len(c.delete) for c in changes)
        what = f"{added} elements added, {deleted} deleted over netlink"
        summary = f"{_SUMMARY}{self.table}: {what}\n"
        return _Planned(summary, live, desired, changes)

    def plan_flush_all(self) -> str:
        return nft_render.render_flush_all(self.table)

    # -- effects ------------------------------------------------------------------------

    def run(self, batch: str) -> None:
        """One atomic transaction: the kernel applies all of it or none of it."""
        flush = batch == self.plan_flush_all()
        if self.forwarding and not flush and self.forwards_unpublished():
            self.forwarding.ensure_once()  # before the DNAT rules that rely on it
        planned, self._planned = self._planned, None
        if planned is None or planned.batch != batch:
            if batch.startswith(_SUMMARY):
                raise NatportsError(
                    "internal error: a netlink plan's summary was run without its plan",
                    "run `natports apply` again",
                )
            self._nft(["-f", "-"], batch)
        elif not planned.over_netlink:
            self._run_text(planned)
        elif not self._run_over_netlink(planned):
            # Refused: the table may have changed since the read. Read it again.
            live = self.live()
            text = nft_render.render_reconcile(live, planned.desired, self.table)
            self._run_text(_Planned(text, live, planned.desired))
        if self.forwarding is not None and flush:
            self.forwarding.remove()  # nothing of natports is left to accept

    def _run_text(self, planned: _Planned) -> None:
        try:
            self._nft(["-f", "-"], planned.batch)
        except NatportsError:
            if planned.live is None or planned.live.elements is None:
                raise  # it was the rebuild
            rebuild = nft_render.render_rebuild(planned.live, planned.desired, self.table)
            self._nft(["-f", "-"], rebuild)  # counters carried

    def _run_over_netlink(self, planned: _Planned) -> bool:
        """The planned change through netlink; False: not done (nothing changed).

        A change of elements only is one netlink batch. A table that does not exist is
        built in steps (nft_render.render_build): nft text for its skeleton and route
        chains, every element as one netlink batch, then the skeleton's marker. Until
        the elements are in the table routes nothing, as before; if they fail, or
        anything interrupts the step (a signal), the table is deleted again.
        """
        family, name = self.table.split()
        if planned.live is not None:
            if planned.changes:
                try:
                    nft_netlink.commit(family, name, planned.changes, DEFAULT_TIMEOUT)
                except (nft_netlink.Unexpected, OSError):
                    return False
            return True
        build = nft_render.render_build(planned.desired, self.table)
        self._nft(["-f", "-"], build.skeleton)
        try:
            nft_netlink.commit(family, name, build.elements, DEFAULT_TIMEOUT)
        except BaseException as exc:
            self._nft(["-f", "-"], self.plan_flush_all())  # as it was: no table
            if isinstance(exc, (nft_netlink.Unexpected, OSError)):
                return False
            raise
        self._nft(["-f", "-"], build.mark)
        return True

    def live(self) -> LiveTable | None:
        """What reconciling needs (None: no table): an exact read of the table's
        elements, chains and hairpin sets through netlink, or, if that fails or finds
        anything the renderer does not make, only the counters (then reconciling
        rebuilds)."""
        family, name = self.table.split()
        try:
            if not self.netlink:
                raise nft_netlink.Unexpected("netlink reads are off")
            snap = nft_netlink.snapshot(
                family,
                name,
                nft_render.element_sets(),
                nft_render.hairpin_sets(),
                DEFAULT_TIMEOUT,
            )
        except (nft_netlink.Unexpected, OSError):
            if not self._chains():
                return None
            return LiveTable(self.counters())
        if not snap.chains:
            return None
        exact = (
            all(snap.shapes.get(s) == nft_wire.shape(s) for s in nft_render.skeleton_sets())
            and snap.sets == nft_render.skeleton_sets()
            and not snap.others
            and snap.chains >= nft_render.SKELETON_CHAINS
            and all(c.startswith("r_") for c in snap.chains - nft_render.SKELETON_CHAINS)
        )
        if not exact:
            return LiveTable(_snapshot_counters(snap))
        hairpin = {
            int(set_name[-1]): nft_wire.ranges_of_elements(listed)
            for set_name, listed in snap.intervals.items()
        }
        return LiveTable(
            {},
            {name: found.values for name, found in snap.elements.items()},
            snap.chains,
            hairpin,
            self._skeleton_in_place(),
            {name: found.counters for name, found in snap.elements.items()},
        )

    def intact(self, routes: Sequence[Route] = ()) -> bool:
        """One cheap read: the skeleton's chains exist (with netlink reads: and hold as
        many rules as the skeleton puts there, so a flushed chain is repaired too).

        Neither reads set elements, so both cost the same at any table size (`nft
        list chain` made nft fetch every set element: 0.3 s at 30,000 routes). What
        removes natports' rules in practice (`nft flush ruleset`, a firewall reload,
        `delete table`) removes the chains too. Where natports' flows pass Docker's
        filter through its accept, that accept is checked as well (one filter read).
        """
        if self.netlink:
            if not self._skeleton_in_place():
                return False
        elif not self._chains() >= SKELETON_CHAINS:
            return False
        return self._forwarding_in_place(routes)

    def _forwarding_in_place(self, routes: Sequence[Route]) -> bool:
        if not routes or self.forwarding is None or not self.forwards_unpublished():
            return True
        return self.forwarding.in_place()  # a firewall reload flushes DOCKER-USER too

    def _skeleton_in_place(self) -> bool:
        """Do the skeleton's chains hold its number of rules, this natports' marker among
        them (nft_render.skeleton_marker)? False if it cannot tell."""
        if not self.netlink:
            return False  # the nft binary reads more slowly than a refill costs
        family, name = self.table.split()
        want = nft_render.skeleton_rules(self.table)
        try:
            found = nft_netlink.rules(family, name, sorted(want), DEFAULT_TIMEOUT)
        except (nft_netlink.Unexpected, OSError):
            return False
        marker = nft_render.skeleton_marker(self.table).encode()
        return {chain: len(listed) for chain, listed in found.items()} == want and any(
            marker in rule for listed in found.values() for rule in listed
        )

    def _chains(self) -> set[str]:
        family, name = self.table.split()
        out = self._nft(["-j", "list", "chains", family])
        assert out is not None
        return {
            str(item["chain"]["name"])
            for item in json.loads(out).get("nftables", [])
            if "chain" in item and item["chain"].get("table") == name
        }

    def route_id(self, route: Route) -> str:
        return nft_render.route_id(route.key)

    def counters(self) -> dict[str, tuple[int, int]]:
        """route_id -> (packets, bytes): only the sets and maps that carry counters are read."""
        family, name = self.table.split()
        sets = [n for _, n in nft_render.counter_objects()]
        try:
            if self.netlink:
                snap = nft_netlink.snapshot(family, name, sets, [], DEFAULT_TIMEOUT)
                return _snapshot_counters(snap)
        except (nft_netlink.Unexpected, OSError):
            pass  # nft's JSON listing reads what the netlink decoder does not know
        result: dict[str, tuple[int, int]] = {}
        for kind, name in nft_render.counter_objects():
            out = self._nft(["-j", "list", kind, *self.table.split(), name], missing_ok=True)
            if out is not None:
                result.update(parse_counters(json.loads(out)))
        return result

    def _nft(self, args: list[str], stdin: str = "", missing_ok: bool = False) -> str | None:
        """`nft ARGS` (`-j`: JSON output; `-f -`: the batch on stdin), in-process if we can."""
        lib = self.lib
        if lib is not None and shutil.which(self.nft) is not None:
            # Only where the nftables package is installed (as `doctor` checks): the
            # library is the same nft, without a process per batch.
            json_output = args[:1] == ["-j"]
            rest = args[1:] if json_output else args
            outcome = lib.run(stdin if rest == ["-f", "-"] else " ".join(rest), json_output)
            ok, out, err = outcome.ok, outcome.output, outcome.error.strip()
            status = "libnftables failed without a message"
        else:
            proc = run(
                [self.nft, *args],
                stdin=stdin,
                hint="install the nftables package (apt-get install nftables)",
            )
            ok, out, err = proc.returncode == 0, proc.stdout, proc.stderr.strip()
            status = f"exit status {proc.returncode}"
        if ok:
            return out
        if missing_ok and "No such file or directory" in err:
            return None
        if "Operation not permitted" in err:
            raise NatportsError(
                "nft: operation not permitted",
                "natports needs root (CAP_NET_ADMIN) to change kernel rules",
            )
        first = err.splitlines()[0] if err else status
        raise NatportsError(
            f"nft failed: {first}", "the batch is atomic: nothing was changed (see --dry-run)"
        )


SKELETON_CHAINS = nft_render.SKELETON_CHAINS


def _snapshot_counters(snap: nft_netlink.Snapshot) -> dict[str, tuple[int, int]]:
    """route_id -> (packets, bytes) from the `count_` sets and `range_` maps read."""
    return {
        f"{name}:{nft_wire.key_text(name.partition('_')[2], key)}": nft_wire.counter(raw)
        for name, found in snap.elements.items()
        if name.startswith(("count_", "range_"))
        for key, raw in found.counters.items()
    }


@dataclass(frozen=True)
class _Planned:
    """A full apply's batch, and what it was planned from (to apply it another way)."""

    batch: str
    live: LiveTable | None
    desired: tuple[Route, ...]
    changes: list[nft_wire.Change] | None = None  # element changes only, over netlink

    @property
    def over_netlink(self) -> bool:
        """Is `batch` a summary of a change `_run_over_netlink` makes?"""
        return self.batch.startswith(_SUMMARY)


_SUMMARY = "# "  # a netlink plan's batch: one nft comment line (nft text never starts so)


def parse_counters(doc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """route_id -> (packets, bytes): the `count_` sets' and `range_` maps' element counters."""
    result: dict[str, tuple[int, int]] = {}
    for item in doc.get("nftables", []):
        found = item.get("set") or item.get("map")
        if not found or not str(found.get("name", "")).startswith(("count_", "range_")):
            continue
        for elem in found.get("elem", []):
            if isinstance(elem, list):  # a map element: [key, value]
                elem = elem[0]
            inner = elem.get("elem") if isinstance(elem, dict) else None
            if not isinstance(inner, dict):
                continue  # an element without a counter (cannot happen in these)
            counter = inner.get("counter") or {}
            key = f"{found['name']}:{_key_text(inner['val'])}"
            result[key] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return result


def _key_text(key: Any) -> str:
    """nft's JSON for an element key, back to the text the renderer writes."""
    if isinstance(key, dict) and "concat" in key:
        return " . ".join(_key_text(part) for part in key["concat"])
    if isinstance(key, dict) and "range" in key:
        low, high = key["range"]
        return f"{low}-{high}"
    if isinstance(key, dict) and "prefix" in key:
        return f"{key['prefix']['addr']}/{key['prefix']['len']}"
    return str(key)
