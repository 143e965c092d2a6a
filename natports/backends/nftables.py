"""The nftables edge: run batches with `nft -f -`, read our table back as JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from ..errors import NatportsError
from ..model import Route
from . import nft_render
from .nft_render import LiveElement, LiveTable


class NftBackend:
    """Programs kernel DNAT through one owned table; never reads or writes any other."""

    name = "nftables"

    def __init__(self, table: str = nft_render.TABLE, nft: str = "nft") -> None:
        self.table = table
        self.nft = nft

    # -- planning (pure apart from reading our own table) ----------------------------

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        return nft_render.render_app(previous, desired, self.table)

    def plan_reconcile(self, desired: Sequence[Route]) -> str:
        return nft_render.render_reconcile(self.live(), desired, self.table)

    def plan_flush_all(self) -> str:
        return nft_render.render_flush_all(self.table)

    # -- effects ------------------------------------------------------------------------

    def run(self, batch: str) -> None:
        """One atomic transaction: the kernel applies all of it or none of it."""
        self._nft(["-f", "-"], batch)

    def intact(self) -> bool:
        """The prerouting hook still jumps into dispatch (one small chain listed)."""
        out = self._nft(["list", "chain", *self.table.split(), "prerouting"], missing_ok=True)
        return out is not None and "jump dispatch" in out

    def live(self) -> LiveTable | None:
        out = self._nft(["-j", "list", "table", *self.table.split()], missing_ok=True)
        if out is None:
            return None
        return parse_live(json.loads(out))

    def route_id(self, route: Route) -> str:
        return nft_render.chain_name(route.app, route.key)

    def counters(self) -> dict[str, tuple[int, int]]:
        """chain name -> (packets, bytes) of each route's named counter."""
        out = self._nft(["-j", "list", "counters", "table", *self.table.split()], missing_ok=True)
        if out is None:
            return {}
        result: dict[str, tuple[int, int]] = {}
        for item in json.loads(out).get("nftables", []):
            counter = item.get("counter")
            if counter:
                result[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
        return result

    def _nft(self, args: list[str], stdin: str = "", missing_ok: bool = False) -> str | None:
        binary = shutil.which(self.nft)
        if binary is None:
            raise NatportsError(
                f"{self.nft} not found", "install the nftables package (apt-get install nftables)"
            )
        proc = subprocess.run(
            [binary, *args], input=stdin, capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            return proc.stdout
        err = proc.stderr.strip()
        if missing_ok and "No such file or directory" in err:
            return None
        if "Operation not permitted" in err:
            raise NatportsError(
                "nft: operation not permitted",
                "natports needs root (CAP_NET_ADMIN) to change kernel rules",
            )
        first = err.splitlines()[0] if err else f"exit status {proc.returncode}"
        raise NatportsError(
            f"nft failed: {first}", "the batch is atomic: nothing was changed (see --dry-run)"
        )


def parse_live(doc: dict[str, Any]) -> LiveTable:
    chains: set[str] = set()
    elements: set[LiveElement] = set()
    counters: set[str] = set()
    for item in doc.get("nftables", []):
        if "chain" in item:
            chains.add(item["chain"]["name"])
        elif "counter" in item:
            counters.add(item["counter"]["name"])
        elif "map" in item:
            m = item["map"]
            for key, verdict in m.get("elem", []):
                target = verdict.get("goto", verdict.get("jump", {})).get("target")
                if target:
                    elements.add(LiveElement(m["name"], _key_text(key), target))
    return LiveTable(frozenset(chains), frozenset(elements), frozenset(counters))


def _key_text(key: Any) -> str:
    if isinstance(key, dict) and "concat" in key:
        return " . ".join(str(part) for part in key["concat"])
    return str(key)
