"""Throughput of the userspace proxy against the direct path and socat, with iperf3.

Run through scripts/bench-proxy (root; dockerd running; test image built).

Topology: a client network namespace joined to the host by a veth pair (the
host side is the "public" address), and a backend container started from the
test image. The image has no iperf3, so the host's iperf3 runs *inside the
container's network namespace* (nsenter --net): the server sits exactly where
an app would, behind Docker's bridge, with no bind mounts or library copying.
The container publishes 5201 on loopback only, which makes Docker add the
FORWARD accept the direct (routed) path needs, as it does for natports' apps.

Paths, each measured RUNS times for SECONDS (median reported):
  direct  client -> container IP (routed by the host: the limit)
  proxy   client -> host address -> natports proxy -> container
  socat   client -> host address -> socat (fork) -> container
Traffic goes only to the namespace and the container created here; everything
is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

from natports.backends.proxy import ProxyBackend
from natports.model import Backend, Protocol, Route, RouteKey

IMAGE = os.environ.get("NATPORTS_TEST_IMAGE", "natports-echod:test")
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
NS = f"npbench-{os.getpid() % 100000}"
HOST_IF = f"npbh{os.getpid() % 100000}"
PEER_IF = f"npbp{os.getpid() % 100000}"
HOST_IP, CLIENT_IP = "198.18.201.1", "198.18.201.2"
IPERF_PORT, PROXY_PORT, SOCAT_PORT = 5201, 26201, 26202
NODE_PROXY_GBITS = (4.9, 5.0)  # the 2014 plugin's Node.js proxy here (DESIGN.md section 6)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@contextlib.contextmanager
def client_namespace() -> Iterator[None]:
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF)
        sh("ip", "link", "set", PEER_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        for cmd in (
            ["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", PEER_IF],
            ["ip", "link", "set", PEER_IF, "up"],
            ["ip", "link", "set", "lo", "up"],
            ["ip", "route", "add", "default", "via", HOST_IP],  # the direct path is routed
        ):
            sh("ip", "netns", "exec", NS, *cmd)
        yield
    finally:
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "netns", "del", NS, check=False)


@contextlib.contextmanager
def backend_container() -> Iterator[str]:
    """A container holding the backend's network namespace, with iperf3 -s inside it."""
    name = f"npbench-{os.getpid()}"
    cid = sh(
        "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1::{IPERF_PORT}/tcp",
        IMAGE, "bench", "5025",
    ).stdout.strip()  # fmt: skip
    server: subprocess.Popen[bytes] | None = None
    try:
        info = json.loads(sh("docker", "inspect", cid).stdout)[0]
        pid = info["State"]["Pid"]
        ip = info["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        server = subprocess.Popen(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        yield ip
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        sh("docker", "rm", "-f", cid, check=False)


@contextlib.contextmanager
def natports_proxy(backend_ip: str) -> Iterator[subprocess.Popen[bytes]]:
    state = Path(tempfile.mkdtemp(prefix="natports-bench-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "natports.proxy", "--state-dir", str(state)],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if (state / "proxy.sock").exists():
                break
            time.sleep(0.05)
        route = Route(
            app="bench",
            process_type="web",
            key=RouteKey(4, Protocol.TCP, PROXY_PORT, ip_address(HOST_IP)),
            private_port=IPERF_PORT,
            backends=(Backend("bench", ip_address(backend_ip), IPERF_PORT),),
        )
        backend = ProxyBackend(state)
        backend.run(backend.plan_reconcile([route]))
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def socat(backend_ip: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            "socat",
            f"TCP-LISTEN:{SOCAT_PORT},bind={HOST_IP},fork,reuseaddr",
            f"TCP:{backend_ip}:{IPERF_PORT}",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        proc.wait()


def iperf(host: str, port: int) -> float:
    """Gbit/s received by the server for one single-stream run (first second omitted)."""
    out = sh(
        "ip", "netns", "exec", NS, "iperf3", "-c", host, "-p", str(port),
        "-t", str(SECONDS), "-O", "1", "-J",
    ).stdout  # fmt: skip
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, host: str, port: int) -> float:
    samples = []
    for _ in range(RUNS):
        samples.append(iperf(host, port))
        time.sleep(0.5)
    median = statistics.median(samples)
    runs = " ".join(f"{s:5.2f}" for s in samples)
    print(f"{name:8s} {median:6.2f} Gbit/s   (runs: {runs})", flush=True)
    return median


def main() -> int:
    print(f"iperf3, 1 stream, {RUNS} x {SECONDS} s per path, client netns -> host -> container")
    with client_namespace(), backend_container() as ip:
        direct = measure("direct", ip, IPERF_PORT)
        with natports_proxy(ip) as proc:
            before = cpu_seconds(proc.pid)
            started = time.monotonic()
            proxy = measure("proxy", HOST_IP, PROXY_PORT)
            busy = (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)
        with socat(ip):
            via_socat = measure("socat", HOST_IP, SOCAT_PORT)
    node = NODE_PROXY_GBITS[0]
    print()
    print(f"proxy / direct  {proxy / direct:5.2f}   (target >= 0.50)")
    print(f"proxy / socat   {proxy / via_socat:5.2f}")
    print(f"proxy / Node.js {proxy / node:5.2f}   (target >= 1.50; Node.js measured {node} Gbit/s)")
    print(f"proxy process CPU while measured: {busy * 100:.0f}% of one core")
    ok = proxy >= 0.5 * direct and proxy >= 1.5 * node
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
