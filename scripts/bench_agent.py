"""What the agent costs: CPU and resident memory idle, and during ~100 container events.

Run through scripts/bench-agent (root; dockerd running; test image built). It uses its
own nft table (`inet natports_bench`), state directory and containers, sends no
traffic, and removes everything it created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra import Containers, sh, wait_for

TABLE = "natports_bench"
APPS = 10
IDLE_SECONDS = 30.0
RESTARTS = 20  # each `docker restart` emits kill, die, stop, start and restart: ~100 events
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="natports-bench-agent-"))
    base = [
        sys.executable,
        "-m",
        "natports",
        "--state-dir",
        str(root / "state"),
        "--dokku-root",
        str(root / "dokku"),
        "--config",
        str(root / "none.toml"),
        "--nft-table",
        TABLE,
        "--backend",
        "nftables",
    ]
    (root / "dokku").mkdir()
    made = Containers()
    agent = None
    try:
        ids = []
        for i in range(APPS):
            subprocess.run(
                [*base, "ports", "set", f"bench{i}"],
                input=f"{23025 + i}:5025\n",
                text=True,
                check=True,
                capture_output=True,
            )
            ids.append(made.start(f"bench{i}", app=f"bench{i}").id)
        subprocess.run([*base, "apply"], check=True, capture_output=True)
        agent = subprocess.Popen([*base, "watch"], stderr=subprocess.DEVNULL)
        assert wait_for(lambda: (root / "state" / "agent.json").exists(), timeout=20)
        time.sleep(2)  # start-up and the first resync are not "idle"
        before, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle_cpu = (cpu_seconds(agent.pid) - before) / (time.monotonic() - t0)
        idle_rss = rss_mib(agent.pid)
        since = str(int(time.time()))
        before, t0 = cpu_seconds(agent.pid), time.monotonic()
        for n in range(RESTARTS):
            made.client.containers.get(ids[n % APPS]).restart(timeout=1)
        time.sleep(2)  # let the agent finish the last reroute
        busy_seconds = time.monotonic() - t0
        busy_cpu = cpu_seconds(agent.pid) - before
        events = sh(
            "docker",
            "events",
            "--since",
            since,
            "--until",
            str(int(time.time())),
            "--filter",
            "type=container",
            "--format",
            "{{.Action}}",
        ).stdout.split()
        result = {
            "apps": APPS,
            "idle_cpu_percent": round(100 * idle_cpu, 2),
            "idle_rss_mib": round(idle_rss, 1),
            "container_events": len(events),
            "events_wall_seconds": round(busy_seconds, 1),
            "events_cpu_seconds": round(busy_cpu, 2),
            "cpu_ms_per_event": round(1000 * busy_cpu / max(1, len(events)), 1),
            "rss_mib_after_events": round(rss_mib(agent.pid), 1),
        }
        print(
            f"agent idle:   {result['idle_cpu_percent']} % of one core, "
            f"{result['idle_rss_mib']} MiB resident ({APPS} apps)"
        )
        print(
            f"{len(events)} container events in {result['events_wall_seconds']} s: "
            f"{result['events_cpu_seconds']} s CPU ({result['cpu_ms_per_event']} ms per event), "
            f"{result['rss_mib_after_events']} MiB resident"
        )
        print(json.dumps(result))
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(15)
        made.remove_all()
        subprocess.run([*base, "flush"], capture_output=True)
        sh("nft", "delete", "table", "inet", TABLE, check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
