"""How the nft data plane scales: a one-app switch and a full apply, at 1 to 30,000 routes.

Run through scripts/bench-switch (root). It uses its own nft table
(`inet natports_bench`), sends no traffic, needs no Docker, and removes the table.

For each table size N it fills the table with N single-port routes of N apps
(one full apply), then switches one more app between two backends many times
and reports the median time of the `nft -f -` run of the switch batch; then it
times full applies (`plan_reconcile` + run) of all N routes. A last row switches
an app that maps a 10,000-port UDP range.

`--compare REV` measures the renderer and nft backend of git revision REV the same
way, in the same run (the "before" column): `--compare 4c5f9e8` is the layout with
one chain and named counter per route, `--compare e2e7160` this layout driven by the
`nft` binary with a full apply that reads counters as JSON and rebuilds the table.
`--binary` also measures this tree with NATPORTS_NFT=binary (the `nft` binary and
JSON reads instead of libnftables and netlink). Output: a table, then one JSON line;
`--png FILE` also draws the figures (needs the `bench` extra: matplotlib).

`--process` measures what a person at the CLI waits for: each switch is a fresh
Python process that imports natports, plans and runs the switch, and exits (the
socket close at exit included), alternating libnftables and the nft binary.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType
from typing import Any

from natports.backends.nftables import NftBackend
from natports.model import Backend, Protocol, Route, RouteKey

TABLE = "inet natports_bench"
SIZES = (1, 1000, 10000, 30000)
SWITCHES = 30
FULL_APPLIES = 5
RANGE = 10000


def filler(count: int) -> list[Route]:
    """`count` apps with one route each; backends in a range no packet is ever sent to."""
    routes = []
    for i in range(count):
        ip = IPv4Address(int(IPv4Address("172.30.0.0")) + 2 + i)
        routes.append(
            Route(
                app=f"other{i}",
                process_type="web",
                key=RouteKey(4, Protocol.TCP, 30000 + i),
                private_port=5025,
                backends=(Backend(f"c{i}", ip, 5025),),
                hairpin_subnets=("172.17.0.0/16",),
            )
        )
    return routes


def switched(ip: str, count: int = 1) -> list[Route]:
    port = 10000 if count > 1 else 24025
    return [
        Route(
            app="bench",
            process_type="web",
            key=RouteKey(4, Protocol.UDP if count > 1 else Protocol.TCP, port, None, count),
            private_port=port if count > 1 else 5025,
            backends=(Backend("bench", IPv4Address(ip), port if count > 1 else 5025),),
            hairpin_subnets=("172.17.0.0/16",),
        )
    ]


@dataclass
class Renderer:
    """The nft backend under test (renderer, reads, runs): this tree's, or another
    revision's (`--compare`). Plans as natports does: through the backend's own
    plan_app / plan_reconcile (which read the table where that revision did)."""

    name: str
    backend: Callable[[], Any]
    expand: bool = False  # renderers before ranges were routes: one route per port

    def _routes(self, routes: Sequence[Route]) -> list[Route]:
        return [p for r in routes for p in r.expanded()] if self.expand else list(routes)

    def plan_app(self, nft: Any, prev: Sequence[Route], new: Sequence[Route]) -> str:
        return str(nft.plan_app(self._routes(prev), self._routes(new)))

    def plan_reconcile(self, nft: Any, routes: Sequence[Route]) -> str:
        """As `natports apply` plans it: no text to show (revisions that have the choice)."""
        if "describe" in inspect.signature(nft.plan_reconcile).parameters:
            return str(nft.plan_reconcile(self._routes(routes), describe=False))
        return str(nft.plan_reconcile(self._routes(routes)))


def current(direct: bool = True) -> Renderer:
    """This tree; `direct=False`: driven like NATPORTS_NFT=binary (nft binary, JSON reads)."""
    name = "after (this tree)" if direct else "this tree, nft binary"
    return Renderer(name, lambda: NftBackend(TABLE, direct=direct))


def from_revision(rev: str) -> Renderer:
    """Load natports/backends/nftables.py and the modules of its own that it imports
    (renderer, netlink reader, wire format) as they were at `rev`."""
    root = Path(__file__).resolve().parent.parent
    modules: dict[str, ModuleType] = {}
    sources: dict[str, str] = {}
    own = ("nft_wire", "nft_render", "nft_netlink", "nftables")  # dependencies first
    for name in own:
        found = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:natports/backends/{name}.py"],
            capture_output=True,
            text=True,
        )
        if found.returncode != 0:
            continue  # not in that revision (the reader and the wire format came later)
        text = _from_revision_imports(found.stdout, list(sources))
        sources[name] = text
        full = f"natports.backends._old_{name}"
        spec = importlib.util.spec_from_loader(full, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "natports.backends"
        sys.modules[full] = module
        exec(compile(text, f"{rev}:{name}.py", "exec"), module.__dict__)
        modules[name] = module
    old_backend = modules["nftables"].NftBackend
    # Renderers from before ranges were first-class (4c5f9e8) take one route per port.
    expand = "range_" not in sources["nft_render"]
    return Renderer(f"before ({rev})", lambda: old_backend(TABLE), expand=expand)


def _from_revision_imports(text: str, loaded: list[str]) -> str:
    """Point `from . import a, b` and `from .a import x` at the revision's modules."""
    lines = []
    for line in text.splitlines():
        if line.startswith("from . import "):
            names = [n.strip() for n in line[len("from . import ") :].split(",")]
            kept = [n for n in names if n not in loaded]
            lines += [f"import natports.backends._old_{n} as {n}" for n in names if n in loaded]
            if kept:
                lines.append(f"from . import {', '.join(kept)}")
            continue
        for other in loaded:
            if line.startswith(f"from .{other} import"):
                line = line.replace(
                    f"from .{other} import", f"from natports.backends._old_{other} import"
                )
        lines.append(line)
    return "\n".join(lines) + "\n"


def timed(nft: NftBackend, batch: str) -> float:
    start = time.perf_counter()
    nft.run(batch)
    return (time.perf_counter() - start) * 1000


def measure(renderer: Renderer, size: int, count: int = 1) -> dict[str, Any]:
    """Switch and full-apply times with `size` other routes in the table."""
    nft = renderer.backend()
    nft.run(nft.plan_flush_all())
    others = filler(size)
    nft.run(renderer.plan_reconcile(nft, others))
    pair = [switched("172.31.0.2", count), switched("172.31.0.3", count)]
    nft.run(renderer.plan_app(nft, [], pair[0]))
    switch = []
    for i in range(SWITCHES):
        batch = renderer.plan_app(nft, pair[i % 2], pair[(i + 1) % 2])
        switch.append(timed(nft, batch))
    lines = batch.count("\n")
    intact = []
    for _ in range(5 if hasattr(nft, "intact") else 0):  # 4c5f9e8 had no intact()
        start = time.perf_counter()
        nft.intact()
        intact.append((time.perf_counter() - start) * 1000)
    everything = [*others, *pair[SWITCHES % 2]]
    full_run, full_total = [], []
    for _ in range(FULL_APPLIES if count == 1 else 0):
        start = time.perf_counter()
        batch = renderer.plan_reconcile(nft, everything)
        full_run.append(timed(nft, batch))
        full_total.append((time.perf_counter() - start) * 1000)
    return {
        "routes": size,
        "range_ports": count if count > 1 else None,
        "switch_ms": round(statistics.median(switch), 2),
        "switch_lines": lines,
        "intact_ms": round(statistics.median(intact), 2) if intact else None,
        "full_apply_ms": round(statistics.median(full_run), 1) if full_run else None,
        "full_apply_with_read_ms": round(statistics.median(full_total), 1) if full_total else None,
    }


def paired(small: int, large: int, rounds: int = 40) -> dict[str, Any]:
    """Switches alternating between a table of `small` and one of `large` routes.

    Load from other work on the machine hits both sides alike, so their ratio is
    the cost of the table's size alone.
    """
    tables = {small: NftBackend(TABLE), large: NftBackend(f"{TABLE}_large")}
    pair = [switched("172.31.0.2"), switched("172.31.0.3")]
    times: dict[int, list[float]] = {small: [], large: []}
    try:
        for size, nft in tables.items():
            nft.run(nft.plan_flush_all())
            nft.run(nft.plan_reconcile([*filler(size), *pair[0]]))
        for i in range(rounds):
            for size, nft in tables.items():
                batch = nft.plan_app(pair[i % 2], pair[(i + 1) % 2])
                times[size].append(timed(nft, batch))
    finally:
        for nft in tables.values():
            nft.run(nft.plan_flush_all())
    a, b = statistics.median(times[small]), statistics.median(times[large])
    return {
        "small": small,
        "large": large,
        "small_ms": round(a, 2),
        "large_ms": round(b, 2),
        "ratio": round(b / a, 3),
    }


def run_all(renderer: Renderer, sizes: Sequence[int]) -> list[dict[str, Any]]:
    rows = [measure(renderer, size) for size in sizes]
    rows.append(measure(renderer, sizes[-1], RANGE))
    return rows


CHILD = """
import json, sys, time
start = time.monotonic()
from natports.backends.nftables import NftBackend
from scripts.bench_switch import TABLE, switched
imported = time.monotonic()
i = int(sys.argv[1])
pair = [switched("172.31.0.2"), switched("172.31.0.3")]
nft = NftBackend(TABLE)
batch = nft.plan_app(pair[i % 2], pair[(i + 1) % 2])
planned = time.monotonic()
nft.run(batch)
done = time.monotonic()
print(json.dumps({"import": imported - start, "plan": planned - imported,
                  "run": done - planned, "done": done}))
"""


def processes(size: int, rounds: int = 20) -> dict[str, Any]:
    """CLI-visible switch: a fresh process per switch, libnftables vs the nft binary.

    Alternates the two so that machine load hits both alike. `exit` is the time from
    the end of the batch to the parent seeing the process end: the socket close.
    """
    root = Path(__file__).resolve().parent.parent
    nft = NftBackend(TABLE)
    modes = {"libnftables": {}, "nft binary": {"NATPORTS_NFT": "binary"}}
    times: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    try:
        nft.run(nft.plan_flush_all())
        nft.run(nft.plan_reconcile([*filler(size), *switched("172.31.0.2")]))
        i = 0
        for _ in range(rounds):
            for mode, env in modes.items():
                start = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, str(i)],
                    cwd=root,
                    env={**os.environ, **env},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                end = time.monotonic()
                child = json.loads(proc.stdout)
                for key, value in (
                    ("total", end - start),
                    ("import", child["import"]),
                    ("plan", child["plan"]),
                    ("batch", child["run"]),
                    ("exit", end - child["done"]),
                ):
                    times[mode].setdefault(key, []).append(value * 1000)
                i += 1
    finally:
        nft.run(nft.plan_flush_all())
    return {
        mode: {key: round(statistics.median(v), 2) for key, v in parts.items()}
        for mode, parts in times.items()
    }


def cold(sizes: Sequence[int], rounds: int = 5) -> dict[str, dict[int, float]]:
    """Full applies that change most of the table: into no table (first apply, or after
    `nft flush ruleset`), and where every route moved to a new backend; then one with
    every route in place. Three ways, taking turns round by round (so that the
    machine's load hits them alike): as `natports apply` runs them (netlink where it
    can), the same change as nft text (what --dry-run prints, run), the nft binary.
    Also the ratio of apply to nft text, median of the rounds' ratios."""
    ways = {
        "apply": (NftBackend(TABLE), False),
        "nft text": (NftBackend(TABLE), True),
        "nft binary": (NftBackend(TABLE, direct=False), True),
    }
    scenarios = ("no table", "every route moved", "in place")
    found: dict[str, dict[int, float]] = {}
    try:
        for size in sizes:
            routes = [*filler(size), *switched("172.31.0.2")]
            moved = [replace(r, backends=(replace(r.backends[0], port=6025),)) for r in routes]
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(rounds):
                for way, (nft, describe) in ways.items():
                    nft.run(nft.plan_flush_all())
                    for scenario, target in zip(scenarios, (routes, moved, moved), strict=True):
                        start = time.perf_counter()
                        nft.run(nft.plan_reconcile(target, describe=describe))
                        elapsed = (time.perf_counter() - start) * 1000
                        times.setdefault((way, scenario), []).append(elapsed)
            for (way, scenario), values in times.items():
                found.setdefault(f"{way}, {scenario}", {})[size] = round(
                    statistics.median(values), 1
                )
            for scenario in scenarios:
                pairs = zip(times["apply", scenario], times["nft text", scenario], strict=True)
                ratio = statistics.median(a / b for a, b in pairs)
                found.setdefault(f"apply / nft text, {scenario}", {})[size] = round(ratio, 2)
    finally:
        ways["apply"][0].run(ways["apply"][0].plan_flush_all())
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def table(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"renderer: {name}")
    head = ("table", "switch batch", "lines", "full apply", "plan + full apply", "intact()")
    out = [head]
    for row in rows:
        what = f"{row['routes']} routes"
        if row["range_ports"]:
            what += f", switching a {row['range_ports']}-port range"
        out.append(
            (
                what,
                f"{row['switch_ms']:.2f} ms",
                str(row["switch_lines"]),
                _ms(row["full_apply_ms"]),
                _ms(row["full_apply_with_read_ms"]),
                _ms(row["intact_ms"]),
            )
        )
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    for r in out:
        print(
            "  "
            + " | ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    base = rows[0]["switch_ms"]
    top = [r for r in rows if not r["range_ports"]][-1]
    print(
        f"  switch at {top['routes']} routes / at {rows[0]['routes']}: "
        f"{top['switch_ms'] / base:.2f}x"
    )


def draw(png: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        plain = [r for r in rows if not r["range_ports"]]
        xs = [r["routes"] for r in plain]
        left.plot(xs, [r["switch_ms"] for r in plain], marker="o", label=name)
        right.plot(xs, [r["full_apply_with_read_ms"] for r in plain], marker="o", label=name)
    titles = ((left, "one-app switch: nft batch"), (right, "full apply: plan (reads) + batch"))
    for axis, title in titles:
        axis.set_xscale("symlog", linthresh=1)
        axis.set_yscale("log")  # 0.5 ms and 11 s in one figure
        axis.set_xlabel("routes in the table")
        axis.set_ylabel("ms (median, log scale)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare",
        metavar="REV",
        action="append",
        default=[],
        help="also measure this git revision's renderer and nft backend (repeatable)",
    )
    parser.add_argument("--png", type=Path, help="draw the figures into this PNG")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument(
        "--paired", action="store_true", help="only: switches alternating 1 / 30,000 routes"
    )
    parser.add_argument(
        "--binary", action="store_true", help="also: this tree with NATPORTS_NFT=binary"
    )
    parser.add_argument(
        "--process",
        action="store_true",
        help="only: a fresh process per switch (at the last size), libnftables vs nft binary",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="only: full applies (plan + run) into no table, every route moved, in place",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.cold:
        results = cold(sizes)
        for what, by_size in results.items():
            unit = "x" if what.startswith("apply / ") else " ms"
            figures = ", ".join(f"{n}: {v}{unit}" for n, v in by_size.items())
            print(f"full apply, {what}: {figures}")
        print(json.dumps({"bench": "full-apply-cold", "results": results}))
        return
    if args.process:
        found = processes(sizes[-1])
        for mode, parts in found.items():
            print(
                f"process per switch, {sizes[-1]} routes, {mode}: "
                + ", ".join(f"{k} {v} ms" for k, v in parts.items())
            )
        print(json.dumps({"bench": "switch-process", "routes": sizes[-1], "results": found}))
        return
    if args.paired:
        result = paired(sizes[0], sizes[-1])
        print(
            f"switch batch, alternating: {result['small']} routes {result['small_ms']} ms, "
            f"{result['large']} routes {result['large_ms']} ms, ratio {result['ratio']}"
        )
        print(json.dumps({"bench": "switch-paired", **result}))
        return
    nft = NftBackend(TABLE)
    renderers = [current()]
    if args.binary:
        renderers.append(current(direct=False))
    renderers += [from_revision(rev) for rev in args.compare]
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for renderer in renderers:
            results[renderer.name] = run_all(renderer, sizes)
    finally:
        nft.run(nft.plan_flush_all())
    for name, rows in results.items():
        table(name, rows)
    print(json.dumps({"bench": "switch", "results": results}))
    if args.png:
        draw(args.png, results)


if __name__ == "__main__":
    main()
