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
from .nft_render import LiveTable


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

    def live(self) -> LiveTable | None:
        """Only what reconciling carries over: the routes' counters."""
        doc = self._list_table()
        return None if doc is None else LiveTable(parse_counters(doc))

    def intact(self) -> bool:
        """One cheap read: the dispatch chain holds the skeleton's rules.

        It lists one chain (no elements), so it costs the same at any table size.
        """
        out = self._nft(["-j", "list", "chain", *self.table.split(), "dispatch"], missing_ok=True)
        if out is None:
            return False
        rules = [i for i in json.loads(out).get("nftables", []) if "rule" in i]
        return len(rules) == DISPATCH_RULES

    def route_id(self, route: Route) -> str:
        return nft_render.route_id(route.key)

    def counters(self) -> dict[str, tuple[int, int]]:
        """route_id -> (packets, bytes) of each route's element in the counter sets."""
        doc = self._list_table()
        return {} if doc is None else parse_counters(doc)

    def _list_table(self) -> dict[str, Any] | None:
        out = self._nft(["-j", "list", "table", *self.table.split()], missing_ok=True)
        return None if out is None else dict(json.loads(out))

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


DISPATCH_RULES = sum(
    1
    for line in nft_render.skeleton("inet t")
    if " dispatch " in line and line.startswith("add rule")
)


def parse_counters(doc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """route_id -> (packets, bytes), from `nft -j list table`'s counter sets."""
    result: dict[str, tuple[int, int]] = {}
    for item in doc.get("nftables", []):
        found = item.get("set")
        if not found or not str(found.get("name", "")).startswith("count_"):
            continue
        for elem in found.get("elem", []):
            inner = elem.get("elem") if isinstance(elem, dict) else None
            if inner is None:
                continue  # an element without a counter (cannot happen in our sets)
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
