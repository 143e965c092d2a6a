"""Measure the cost of switching one app while N other apps are mapped.

Run through scripts/bench-switch (root; dockerd running; test image built).
It uses its own nft table (`inet natports_bench`) and state directory, sends no
traffic, and removes everything it created.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

from natports.backends.nftables import NftBackend
from natports.model import Backend, Mapping, Protocol, Route, RouteKey
from natports.store import Applied, Store

TABLE = "natports_bench"
IMAGE = "natports-echod:test"
SWITCHES = 40
CLI_SWITCHES = 15


def other_routes(count: int) -> list[Route]:
    routes = []
    for i in range(count):
        # Backends in a documentation-free private range; no packet is ever sent there.
        ip = IPv4Address(int(IPv4Address("172.30.0.0")) + 2 + i)
        routes.append(
            Route(
                app=f"other{i}",
                process_type="web",
                key=RouteKey(4, Protocol.TCP, 20000 + i),
                private_port=5025,
                backends=(Backend(f"c{i}", ip, 5025),),
            )
        )
    return routes


def bench_route(ip: str) -> list[Route]:
    return [
        Route(
            app="bench",
            process_type="web",
            key=RouteKey(4, Protocol.TCP, 24025),
            private_port=5025,
            backends=(Backend("bench", IPv4Address(ip), 5025),),
        )
    ]


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p90 = samples[int(len(samples) * 0.9) - 1]
    return f"median {statistics.median(samples):7.2f} ms   p90 {p90:7.2f} ms"


def measure(nft: NftBackend, containers: list[str], others: int) -> tuple[str, str, str, int]:
    """Switch times with `others` apps mapped: nft batch, whole CLI, full reconcile."""
    nft.run(nft.plan_flush_all())
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state")
        populated = other_routes(others)
        for route in populated:
            store.set_mappings(route.app, (Mapping(route.key.public_port, 5025),))
            store.set_applied(route.app, Applied("nftables", (route,)))
        nft.run(nft.plan_reconcile(populated))

        routes = [bench_route("172.31.0.2"), bench_route("172.31.0.3")]
        nft.run(nft.plan_app([], routes[0]))
        kernel = []
        for i in range(SWITCHES):
            batch = nft.plan_app(routes[i % 2], routes[(i + 1) % 2])
            start = time.perf_counter()
            nft.run(batch)
            kernel.append((time.perf_counter() - start) * 1000)
        batch_lines = batch.count("\n")

        store.set_mappings("bench", (Mapping(24025, 5025),))
        argv = [
            sys.executable,
            "-m",
            "natports",
            "--state-dir",
            str(store.root),
            "--nft-table",
            TABLE,
            "apply",
            "--app",
            "bench",
            "--container",
        ]
        cli = []
        for i in range(CLI_SWITCHES):
            start = time.perf_counter()
            subprocess.run([*argv, containers[i % 2]], check=True, capture_output=True)
            cli.append((time.perf_counter() - start) * 1000)

        full = []
        for _ in range(5):
            batch = nft.plan_reconcile([*populated, *routes[0]])
            start = time.perf_counter()
            nft.run(batch)
            full.append((time.perf_counter() - start) * 1000)
    return summary(kernel), summary(cli), summary(full), batch_lines


def main() -> None:
    nft = NftBackend(f"inet {TABLE}")
    containers: list[str] = []
    results: dict[int, tuple[str, str, str, int]] = {}
    try:
        for i in range(2):
            out = subprocess.run(
                ["docker", "run", "-d", "-p", "127.0.0.1::5025", IMAGE, f"bench{i}", "5025"],
                check=True,
                capture_output=True,
                text=True,
            )
            containers.append(out.stdout.strip())
        for others in (1, 1000):
            results[others] = measure(nft, containers, others)
    finally:
        nft.run(nft.plan_flush_all())
        if containers:
            subprocess.run(["docker", "rm", "-f", *containers], capture_output=True)
    for title, column in (
        ("one-app switch, the nft batch alone", 0),
        ("one-app switch, `natports apply --app APP --container ID` end to end", 1),
        ("for contrast: a full reconcile of every app (the kernel part of `natports apply`)", 2),
    ):
        print(title)
        for others, row in results.items():
            print(f"  {others:5d} other apps   {row[column]}")
    for others, row in results.items():
        print(f"per-app batch with {others} other apps: {row[3]} lines")


if __name__ == "__main__":
    main()
