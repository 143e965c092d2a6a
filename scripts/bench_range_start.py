"""Container start time of an app mapping a 10,000-port UDP range, against no published port.

Run through scripts/bench-range-start (root; dockerd running; test image built). The
docker arguments are the ones natports' `docker-args-process-deploy` answer gives for
`10000-19999:10000-19999/udp` (a staged build, as in a Dokku deploy), for the backend
natports chooses on this host and for the proxy backend (the published-port fallback).
Starts alternate between the two kinds so that load on a shared machine hits both
alike; the ratio of the medians is the cost of the range. It also counts docker-proxy
processes and times `natports apply` of the range app into its own table
(`inet natports_bench`). No traffic; it removes every container and rule it made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra import TEST_IMAGE, sh

TABLE = "natports_bench"
APP = "rtp"
RANGE = "10000-19999:10000-19999/udp"


def natports(root: Path, *args: str, stdin: str | None = None) -> str:
    argv = [sys.executable, "-m", "natports", "--state-dir", str(root / "state")]
    argv += ["--dokku-root", str(root / "dokku"), "--config", str(root / "none.toml")]
    argv += ["--nft-table", TABLE, *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def docker_proxies() -> int:
    out = subprocess.run(["pgrep", "-c", "-x", "docker-proxy"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def start(args: list[str], name: str) -> float:
    """Wall time of `docker run -d` (create and start, until Docker says it runs)."""
    began = time.perf_counter()
    sh("docker", "run", "-d", "--pull", "never", "--name", name, *args, TEST_IMAGE, "b", "10000")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="natports-bench-range-"))
    (root / "dokku" / APP).mkdir(parents=True)
    build = "4242"
    natports(root, "dokku", "stage", APP, "--build", build, stdin=RANGE + "\n")
    args = natports(root, "dokku", "docker-args", APP, "web", "--build", build).split()
    fallback = natports(
        root, "--backend", "proxy", "dokku", "docker-args", APP, "web", "--build", build
    ).split()
    names: list[str] = []
    timings: dict[str, list[float]] = {"range": [], "none": []}
    proxies_before = docker_proxies()
    proxies_added = 0
    try:
        for index in range(options.rounds):
            order = ["range", "none"] if index % 2 == 0 else ["none", "range"]
            for kind in order:
                name = f"natports-bench-{kind}-{index}"
                names.append(name)
                timings[kind].append(start(args if kind == "range" else [], name))
                if kind == "range":
                    proxies_added = max(proxies_added, docker_proxies() - proxies_before)
                sh("docker", "rm", "-f", name)
                names.remove(name)
        cid = sh(
            "docker", "run", "-d", "--pull", "never", *args, TEST_IMAGE, "b", "10000"
        ).stdout.strip()
        names.append(cid)
        natports(root, "ports", "set", APP, stdin=RANGE + "\n")
        began = time.perf_counter()
        natports(root, "apply", "--app", APP, "--container", cid)
        apply_ms = (time.perf_counter() - began) * 1000
    finally:
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        natports(root, "flush")
        subprocess.run(["rm", "-rf", str(root)], check=False)
    med = {kind: statistics.median(values) * 1000 for kind, values in timings.items()}
    result = {
        "mapping": RANGE,
        "docker_args": args,
        "fallback_docker_args": fallback,
        "start_ms_range": round(med["range"], 1),
        "start_ms_no_port": round(med["none"], 1),
        "ratio": round(med["range"] / med["none"], 3),
        "docker_proxy_processes_added": proxies_added,
        "apply_ms": round(apply_ms, 1),
        "rounds": options.rounds,
    }
    print(f"mapping {RANGE}: docker args {args or 'none'} (fallback: {' '.join(fallback)})")
    print(
        f"docker run -d, median of {options.rounds}: range app {med['range']:.1f} ms, "
        f"no published port {med['none']:.1f} ms, ratio {result['ratio']:.3f}"
    )
    print(f"docker-proxy processes added: {proxies_added}; natports apply --app: {apply_ms:.0f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
