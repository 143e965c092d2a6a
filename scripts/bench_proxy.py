"""The userspace proxy against the direct path, socat and the nftables backend.

Run through scripts/bench-proxy (root; dockerd running; test image built).

Topology: a client network namespace joined to the host by a veth pair (the
host side is the "public" address), and a backend container started from the
test image. The image has no iperf3, so the host's iperf3 runs *inside the
container's network namespace* (nsenter --net): the server sits exactly where
an app would, behind Docker's bridge, with no bind mounts or library copying.
The container publishes 5201 on loopback only, which makes Docker add the
FORWARD accept the direct (routed) path needs, as it does for natports' apps.

Paths, each measured RUNS times for SECONDS (median reported):
  direct    client -> container IP (routed by the host: the limit)
  proxy     client -> host address -> natports proxy -> container
  socat     client -> host address -> socat (fork) -> container
  nftables  client -> host address -> natports' nftables DNAT -> container (connections only)
Measures: iperf3 with 1 and with 8 parallel streams (Gbit/s), and new connections
per second (connrate, below: 8 client threads, each connect, read one byte, close;
its server in the container's namespace writes one byte and closes).
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
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path

from natports.backends.nftables import NftBackend
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
CONN_PORT, CONN_PROXY_PORT, CONN_SOCAT_PORT, CONN_NFT_PORT = 5300, 26203, 26204, 26205
CONN_THREADS = int(os.environ.get("BENCH_CONN_THREADS", "8"))
CONN_SECONDS = float(os.environ.get("BENCH_CONN_SECONDS", "5"))
NFT_TABLE = "inet natports_bench"
NODE_PROXY_GBITS = (4.9, 5.0)  # the 2014 plugin's Node.js proxy here (DESIGN.md section 6)


CONNRATE_C = r"""
/* connrate: `connrate serve PORT` accepts, writes one byte, closes (one thread).
 * `connrate client HOST PORT THREADS SECONDS` opens connections in a loop on each
 * thread (connect, read the byte, close with RST so no TIME_WAIT piles up) and
 * prints connections per second. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in target;
static double seconds;
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
static void *client(void *arg) {
    long *count = arg;
    double end = now() + seconds;
    struct linger lg = {1, 0};
    while (now() < end) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        char c;
        if (fd < 0) continue;
        if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0 && read(fd, &c, 1) == 1)
            (*count)++;
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(fd);
    }
    return NULL;
}
int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) {
        int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) return 1;
        for (;;) {
            int fd = accept(lfd, NULL, NULL);
            if (fd < 0) continue;
            if (write(fd, "x", 1) < 0) { /* the client left */ }
            close(fd);
        }
    }
    if (argc == 6 && strcmp(argv[1], "client") == 0) {
        int n = atoi(argv[4]);
        pthread_t t[256];
        long counts[256] = {0}, total = 0;
        target.sin_family = AF_INET;
        target.sin_port = htons(atoi(argv[3]));
        inet_pton(AF_INET, argv[2], &target.sin_addr);
        seconds = atof(argv[5]);
        if (n < 1 || n > 256) return 2;
        for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, client, &counts[i]);
        for (int i = 0; i < n; i++) { pthread_join(t[i], NULL); total += counts[i]; }
        printf("%.0f\n", total / seconds);
        return 0;
    }
    fprintf(stderr, "usage: connrate serve PORT | connrate client HOST PORT THREADS SECONDS\n");
    return 2;
}
"""


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
def connrate_binary() -> Iterator[str]:
    work = Path(tempfile.mkdtemp(prefix="natports-connrate-"))
    try:
        (work / "connrate.c").write_text(CONNRATE_C)
        sh("gcc", "-O2", "-pthread", "-o", str(work / "connrate"), str(work / "connrate.c"))
        yield str(work / "connrate")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def backend_container(connrate: str) -> Iterator[str]:
    """A container holding the backend's network namespace, with iperf3 -s and connrate inside."""
    name = f"npbench-{os.getpid()}"
    cid = sh(
        "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1::{IPERF_PORT}/tcp",
        "-p", f"127.0.0.1::{CONN_PORT}/tcp", IMAGE, "bench", "5025",
    ).stdout.strip()  # fmt: skip
    servers: list[subprocess.Popen[bytes]] = []
    try:
        info = json.loads(sh("docker", "inspect", cid).stdout)[0]
        pid = info["State"]["Pid"]
        ip = info["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        for argv in (["iperf3", "-s", "-p", str(IPERF_PORT)], [connrate, "serve", str(CONN_PORT)]):
            servers.append(
                subprocess.Popen(
                    ["nsenter", f"--net=/proc/{pid}/ns/net", *argv],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)
        yield ip
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        sh("docker", "rm", "-f", cid, check=False)


def bench_route(port: int, backend_ip: str, backend_port: int) -> Route:
    return Route(
        app="bench",
        process_type="web",
        key=RouteKey(4, Protocol.TCP, port, ip_address(HOST_IP)),
        private_port=backend_port,
        backends=(Backend("bench", ip_address(backend_ip), backend_port),),
    )


@contextlib.contextmanager
def natports_proxy(backend_ip: str, workers: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    state = Path(tempfile.mkdtemp(prefix="natports-bench-"))
    env = {**os.environ, "NATPORTS_PROXY_WORKERS": str(workers)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "natports.proxy", "--state-dir", str(state), "--settings",
         str(state / "none.toml")],
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    try:
        for _ in range(100):
            if (state / "proxy.sock").exists():
                break
            time.sleep(0.05)
        backend = ProxyBackend(state)
        routes = [
            bench_route(PROXY_PORT, backend_ip, IPERF_PORT),
            bench_route(CONN_PROXY_PORT, backend_ip, CONN_PORT),
        ]
        backend.run(backend.plan_reconcile(routes))
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def nftables(backend_ip: str) -> Iterator[None]:
    """natports' own nftables backend, in a table of its own, DNATing one port."""
    nft = NftBackend(NFT_TABLE)
    try:
        nft.run(nft.plan_reconcile([bench_route(CONN_NFT_PORT, backend_ip, CONN_PORT)]))
        yield
    finally:
        sh("nft", "delete", "table", *NFT_TABLE.split(), check=False)


@contextlib.contextmanager
def socat(backend_ip: str) -> Iterator[None]:
    procs = [
        subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{listen},bind={HOST_IP},fork,reuseaddr,backlog=4096",
                f"TCP:{backend_ip}:{port}",
            ],
            stderr=subprocess.DEVNULL,
        )
        for listen, port in ((SOCAT_PORT, IPERF_PORT), (CONN_SOCAT_PORT, CONN_PORT))
    ]
    try:
        time.sleep(0.3)
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def iperf(host: str, port: int, streams: int) -> float:
    """Gbit/s received by the server for one run (first second omitted)."""
    out = sh(
        "ip", "netns", "exec", NS, "iperf3", "-c", host, "-p", str(port),
        "-t", str(SECONDS), "-O", "1", "-P", str(streams), "-J",
    ).stdout  # fmt: skip
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def conn_rate(connrate: str, host: str, port: int) -> float:
    out = sh(
        "ip", "netns", "exec", NS, connrate, "client", host, str(port), str(CONN_THREADS),
        str(CONN_SECONDS),
    ).stdout  # fmt: skip
    return float(out.strip())


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children that were waited for (workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    for child in _children(pid):
        with contextlib.suppress(OSError):
            cf = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(cf[11]) + int(cf[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def measure(name: str, sample: Callable[[], float], unit: str) -> float:
    samples = []
    for _ in range(RUNS):
        samples.append(sample())
        time.sleep(0.5)
    median = statistics.median(samples)
    runs = " ".join(f"{s:7.2f}" if unit == "Gbit/s" else f"{s:7.0f}" for s in samples)
    shown = f"{median:8.2f}" if unit == "Gbit/s" else f"{median:8.0f}"
    print(f"  {name:18s} {shown} {unit:8s} (runs: {runs})", flush=True)
    return median


def main() -> int:
    workers = int(os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 1)))
    print(
        f"{RUNS} runs per path, median; iperf3 {SECONDS} s per run; connrate {CONN_THREADS} "
        f"threads x {CONN_SECONDS:g} s; client netns -> host -> container; {os.cpu_count()} CPUs"
    )
    r: dict[str, float] = {}
    with connrate_binary() as connrate, client_namespace(), backend_container(connrate) as ip:
        proxies = [("proxy", 0)] + ([(f"proxy x{workers}", workers)] if workers > 1 else [])
        for streams in (1, 8):
            print(f"iperf3, {streams} stream{'s' if streams > 1 else ''}:")
            r[f"direct {streams}"] = measure(
                "direct", lambda s=streams: iperf(ip, IPERF_PORT, s), "Gbit/s"
            )
            for name, n in proxies:
                with natports_proxy(ip, n) as proc:
                    before, started = cpu_seconds(proc.pid), time.monotonic()
                    r[f"{name} {streams}"] = measure(
                        name, lambda s=streams: iperf(HOST_IP, PROXY_PORT, s), "Gbit/s"
                    )
                    busy = (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)
                    print(f"  {'':18s} ({name} used {busy * 100:.0f}% of one core)")
            with socat(ip):
                r[f"socat {streams}"] = measure(
                    "socat", lambda s=streams: iperf(HOST_IP, SOCAT_PORT, s), "Gbit/s"
                )
        print("new connections per second:")
        r["conn direct"] = measure("direct", lambda: conn_rate(connrate, ip, CONN_PORT), "conn/s")
        with nftables(ip):
            r["conn nftables"] = measure(
                "nftables", lambda: conn_rate(connrate, HOST_IP, CONN_NFT_PORT), "conn/s"
            )
        for name, n in proxies:
            with natports_proxy(ip, n):
                r[f"conn {name}"] = measure(
                    name, lambda: conn_rate(connrate, HOST_IP, CONN_PROXY_PORT), "conn/s"
                )
        with socat(ip):
            r["conn socat"] = measure(
                "socat", lambda: conn_rate(connrate, HOST_IP, CONN_SOCAT_PORT), "conn/s"
            )
    best = proxies[-1][0]
    print()
    ratios = [
        ("1 stream, proxy / direct", r["proxy 1"] / r["direct 1"], 0.9),
        (f"1 stream, {best} / direct", r[f"{best} 1"] / r["direct 1"], 0.9),
        (f"8 streams, {best} / proxy (one worker)", r[f"{best} 8"] / r["proxy 8"], 1.5),
        (f"connections, {best} / nftables", r[f"conn {best}"] / r["conn nftables"], 0.8),
        ("1 stream, proxy / socat", r["proxy 1"] / r["socat 1"], None),
        ("1 stream, proxy / Node.js (DESIGN.md)", r["proxy 1"] / NODE_PROXY_GBITS[0], 1.5),
    ]
    ok = True
    seen = set()
    for label, value, goal in ratios:
        if label in seen:
            continue
        seen.add(label)
        met = goal is None or value >= goal
        ok = ok and met
        target = "" if goal is None else f"(goal >= {goal:.2f}: {'met' if met else 'NOT met'})"
        print(f"{label:42s} {value:5.2f}  {target}")
    print("all goals met" if ok else "some goals NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
