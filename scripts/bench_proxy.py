"""The userspace proxy against the direct path, socat and the nftables backend.

Run through scripts/bench-proxy (root; dockerd running; test image built).

Topology: a client network namespace joined to the host by a veth pair (the
host side is the "public" address), and a backend container started from the
test image. The image has no iperf3, so the host's iperf3 runs *inside the
container's network namespace* (nsenter --net): the server sits exactly where
an app would, behind Docker's bridge, with no bind mounts or library copying.
The container publishes 5201 on loopback only, which makes Docker add the
FORWARD accept the direct (routed) path needs, as it does for natports' apps.

Paths (every one runs for the whole bench; each round measures every path once, in
turn, so load from other work on a shared machine hits all of them alike; ratios are
taken within a round, then the median over RUNS rounds):
  direct    client -> container IP (routed by the host: the limit)
  proxy     client -> host address -> natports proxy -> container
  proxy xN  the same with N TCP workers (BENCH_WORKERS, default one per CPU)
  proxy@REV the proxy of git revision REV (BENCH_VS=REV): before/after in one run
  C relay   (BENCH_FLOOR=1) a minimal C proxy (RELAY_C below), 1 and 2 threads: the
            floor of any userspace proxy on this machine
  socat     client -> host address -> socat (fork) -> container
  nftables  client -> host address -> natports' nftables DNAT -> container (connections only)
Each line also gives the CPUs busy (whole machine, /proc/stat) and the CPU used by the
client, the server and the proxy during the samples (medians), so a ratio can be
checked against the CPU that was left.
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
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from natports.backends.nftables import NftBackend
from natports.backends.proxy import ProxyBackend
from natports.model import Backend, Protocol, Route, RouteKey

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("NATPORTS_TEST_IMAGE", "natports-echod:test")
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
NS = f"npbench-{os.getpid() % 100000}"
HOST_IF = f"npbh{os.getpid() % 100000}"
PEER_IF = f"npbp{os.getpid() % 100000}"
HOST_IP, CLIENT_IP = "198.18.201.1", "198.18.201.2"
IPERF_PORT, PROXY_PORT, SOCAT_PORT = 5201, 26201, 26202
CONN_PORT, CONN_PROXY_PORT, CONN_SOCAT_PORT, CONN_NFT_PORT = 5300, 26203, 26204, 26205
# One pair (iperf3, connrate) per proxy daemon: the first is PROXY_PORT, CONN_PROXY_PORT.
PROXY_PORTS = [(PROXY_PORT, CONN_PROXY_PORT)] + [(26211 + 10 * i, 26213 + 10 * i) for i in range(8)]
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


RELAY_C = r"""
/* relay: the floor of a userspace TCP proxy here, for comparison only.
 * `relay LISTEN_IP LISTEN_PORT BACKEND_IP BACKEND_PORT THREADS`: each thread has an
 * SO_REUSEPORT listener and its own edge-triggered epoll; per connection accept4,
 * socket, connect, then read/write through a 64 KiB buffer per direction. No
 * limits, no accounting, no logging: what any proxy has to pay at least. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
struct side { int fd; struct conn *c; int is_up; };
struct dir { char *buf; int len, off, eof, shut, pr, pw; };
static int use_splice;
struct conn { struct side cs, us; struct dir c2u, u2c; int connected, refs; };
static struct sockaddr_in lis, bk;

/* Closed, but events for it may follow in this batch: the struct is kept (a bench). */
static void closeconn(struct conn *c) {
    close(c->cs.fd); close(c->us.fd); c->cs.fd = c->us.fd = -1; c->refs = -1;
    free(c->c2u.buf); free(c->u2c.buf); c->c2u.buf = c->u2c.buf = NULL;
    if (c->c2u.pr >= 0) { close(c->c2u.pr); close(c->c2u.pw); }
    if (c->u2c.pr >= 0) { close(c->u2c.pr); close(c->u2c.pw); }
}
/* returns -1 on error */
static int pump_splice(int src, int dst, struct dir *d) {
    if (d->pr < 0) {
        int p[2];
        if (pipe2(p, O_NONBLOCK)) return -1;
        fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
        d->pr = p[0]; d->pw = p[1];
    }
    for (;;) {
        while (d->len > 0) {
            ssize_t n = splice(d->pr, NULL, dst, NULL, d->len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0) return errno == EAGAIN ? 0 : -1;
            d->len -= n;
        }
        if (d->eof) { if (!d->shut) { shutdown(dst, SHUT_WR); d->shut = 1; } return 0; }
        ssize_t n = splice(src, NULL, d->pw, NULL, 1 << 20, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (n == 0) d->eof = 1; else d->len = n;
    }
}
static int pump(int src, int dst, struct dir *d) {
    if (use_splice) return pump_splice(src, dst, d);
    for (;;) {
        while (d->len > d->off) {
            ssize_t n = write(dst, d->buf + d->off, d->len - d->off);
            if (n < 0) return errno == EAGAIN ? 0 : -1;
            d->off += n;
        }
        d->len = d->off = 0;
        if (d->eof) { if (!d->shut) { shutdown(dst, SHUT_WR); d->shut = 1; } return 0; }
        ssize_t n = read(src, d->buf, BUF);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (n == 0) d->eof = 1; else d->len = n;
    }
}
static void *worker(void *arg) {
    (void)arg;
    int one = 1, ep = epoll_create1(0), lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&lis, sizeof lis) || listen(lfd, 4096)) {
        perror("bind");
        exit(1);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct side *s = evs[i].data.ptr;
            if (s == NULL) {
                for (int k = 0; k < 64; k++) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    int ufd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
                    setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    connect(ufd, (struct sockaddr *)&bk, sizeof bk);
                    struct conn *c = calloc(1, sizeof *c);
                    c->cs = (struct side){cfd, c, 0}; c->us = (struct side){ufd, c, 1};
                    c->c2u.buf = malloc(BUF); c->u2c.buf = malloc(BUF);
                    c->c2u.pr = c->c2u.pw = c->u2c.pr = c->u2c.pw = -1;
                    int et = EPOLLIN | EPOLLOUT | EPOLLET;
                    struct epoll_event e1 = {.events = et, .data.ptr = &c->cs};
                    struct epoll_event e2 = {.events = et, .data.ptr = &c->us};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &e1);
                    epoll_ctl(ep, EPOLL_CTL_ADD, ufd, &e2);
                }
                continue;
            }
            struct conn *c = s->c;
            if (c->refs < 0) continue; /* closed earlier in this batch */
            if (!c->connected) {
                if (!s->is_up) continue;
                int err = 0; socklen_t l = sizeof err;
                getsockopt(c->us.fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) { closeconn(c); continue; }
                c->connected = 1;
            }
            if (pump(c->cs.fd, c->us.fd, &c->c2u) < 0 || pump(c->us.fd, c->cs.fd, &c->u2c) < 0
                || (c->c2u.shut && c->u2c.shut))
                closeconn(c);
        }
    }
}
int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: relay LIP LPORT BIP BPORT THREADS copy|splice\n");
        return 2;
    }
    use_splice = strcmp(argv[6], "splice") == 0;
    signal(SIGPIPE, SIG_IGN); /* a peer that reset: EPIPE, not death */
    lis.sin_family = bk.sin_family = AF_INET;
    inet_pton(AF_INET, argv[1], &lis.sin_addr); lis.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[3], &bk.sin_addr); bk.sin_port = htons(atoi(argv[4]));
    int n = atoi(argv[5]);
    pthread_t t[64];
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    return 0;
}
"""
RELAY_PORTS = ((26231, 26232), (26241, 26242))  # C relay: 1 thread, 2 threads


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
def c_binary(name: str, source: str) -> Iterator[str]:
    work = Path(tempfile.mkdtemp(prefix=f"natports-{name}-"))
    try:
        (work / f"{name}.c").write_text(source)
        sh("gcc", "-O2", "-pthread", "-o", str(work / name), str(work / f"{name}.c"))
        yield str(work / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def connrate_binary() -> contextlib.AbstractContextManager[str]:
    return c_binary("connrate", CONNRATE_C)


@contextlib.contextmanager
def c_relay(backend_ip: str, ports: tuple[int, int], threads: int) -> Iterator[list[int]]:
    """The floor of any userspace proxy here (BENCH_FLOOR=1): RELAY_C, splicing the iperf3
    port through a 1 MiB pipe and copying the connrate port; yields the two pids."""
    with c_binary("relay", RELAY_C) as relay:
        procs = [
            subprocess.Popen(
                [relay, HOST_IP, str(listen), backend_ip, str(port), str(threads), mode]
            )
            for listen, port, mode in (
                (ports[0], IPERF_PORT, "splice"),
                (ports[1], CONN_PORT, "copy"),
            )
        ]
        try:
            time.sleep(0.3)
            yield [proc.pid for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def backend_container(connrate: str) -> Iterator[tuple[str, list[int]]]:
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
        yield ip, [server.pid for server in servers]  # nsenter execs: the servers' own pids
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
def proxy_source(rev: str | None) -> Iterator[str | None]:
    """The natports package of git revision `rev` in a temporary directory (None: this tree)."""
    if rev is None:
        yield None
        return
    work = Path(tempfile.mkdtemp(prefix="natports-vs-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "natports"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
        yield str(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def natports_proxy(
    backend_ip: str,
    ports: tuple[int, int],
    workers: int = 0,
    source: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A proxy daemon (of this tree, or of `source`) serving iperf3 and connrate on `ports`."""
    state = Path(tempfile.mkdtemp(prefix="natports-bench-"))
    env = {**os.environ, "NATPORTS_PROXY_WORKERS": str(workers), **(env_extra or {})}
    if source is not None:
        env["PYTHONPATH"] = source
    proc = subprocess.Popen(
        [sys.executable, "-m", "natports.proxy", "--state-dir", str(state), "--settings",
         str(state / "none.toml")],
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=source or str(ROOT),
    )  # fmt: skip
    try:
        for _ in range(100):
            if (state / "proxy.sock").exists():
                break
            time.sleep(0.05)
        backend = ProxyBackend(state)
        routes = [
            bench_route(ports[0], backend_ip, IPERF_PORT),
            bench_route(ports[1], backend_ip, CONN_PORT),
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


class Usage:
    """CPU used while a sample ran: the whole machine, the proxy, the client and the server."""

    def __init__(self, proxy: tuple[int, ...], server: int) -> None:
        self.proxy, self.server = proxy, server
        self.t0 = time.monotonic()
        self.stat0 = _proc_stat()
        self.own0 = self._own()
        self.children0 = _children_cpu()

    def _own(self) -> tuple[float, float]:
        return sum(cpu_seconds(p) for p in self.proxy), cpu_seconds(self.server)

    def done(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        stat1 = _proc_stat()
        busy = [b - a for a, b in zip(self.stat0, stat1, strict=True)]
        total = sum(busy)
        idle = busy[3] + busy[4]
        own = [b - a for a, b in zip(self.own0, self._own(), strict=True)]
        return {
            "busy": (total - idle) / total * (os.cpu_count() or 1),  # CPUs busy, all processes
            "softirq": busy[6] / total * (os.cpu_count() or 1),
            "proxy": own[0] / wall,
            "server": own[1] / wall,
            "client": (_children_cpu() - self.children0) / wall,
        }


def _proc_stat() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def _children_cpu() -> float:
    """CPU of the waited-for children of this process: the clients (iperf3 -c, connrate)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def iperf(host: str, port: int, streams: int) -> float:
    """Gbit/s received by the server for one run (first second omitted)."""
    for attempt in range(5):
        out = sh(
            "ip", "netns", "exec", NS, "iperf3", "-c", host, "-p", str(port),
            "-t", str(SECONDS), "-O", "1", "-P", str(streams), "-J", check=False,
        ).stdout  # fmt: skip
        result = json.loads(out)
        if "error" not in result:
            return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
        # The server runs one test at a time: a relay still closing the previous one
        # (socat's forked children) makes it answer "busy" for a moment.
        if "busy" not in result["error"] or attempt == 4:
            raise RuntimeError(f"iperf3 -c {host} -p {port} -P {streams}: {result['error']}")
        time.sleep(1.0)
    raise AssertionError("unreachable")


def conn_rate(connrate: str, host: str, port: int, seconds: float = CONN_SECONDS) -> float:
    out = sh(
        "ip", "netns", "exec", NS, connrate, "client", host, str(port), str(CONN_THREADS),
        str(seconds),
    ).stdout  # fmt: skip
    return float(out.strip())


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its live children (workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
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


@dataclass(frozen=True)
class Target:
    """One way from the client to the server: where to connect, whose CPU to count."""

    name: str
    host: str
    iperf_port: int
    conn_port: int
    pids: tuple[int, ...] = ()  # the proxy's processes, for their CPU


def interleaved(
    title: str,
    paths: list[Target],
    sample: Callable[[Target], float],
    unit: str,
    server: int,
) -> dict[str, list[float]]:
    """RUNS rounds, each measuring every path once in turn: load from other work on the
    machine hits all paths alike, and ratios are taken within a round (paired)."""
    print(f"{title}:", flush=True)
    values: dict[str, list[float]] = {p.name: [] for p in paths}
    usage: dict[str, list[dict[str, float]]] = {p.name: [] for p in paths}
    for _ in range(RUNS):
        for path in paths:
            u = Usage(path.pids, server)
            values[path.name].append(sample(path))
            usage[path.name].append(u.done())
            time.sleep(0.5)
    for path in paths:
        samples = values[path.name]
        fmt = "{:7.2f}" if unit == "Gbit/s" else "{:7.0f}"
        runs = " ".join(fmt.format(v) for v in samples)
        cpu = {k: statistics.median(u[k] for u in usage[path.name]) for k in usage[path.name][0]}
        print(
            f"  {path.name:18s} {fmt.format(statistics.median(samples)):>8s} {unit:7s}"
            f" (runs: {runs})  CPUs busy {cpu['busy']:.2f} (softirq {cpu['softirq']:.2f});"
            f" client {cpu['client']:.2f}, server {cpu['server']:.2f}"
            + (f", proxy {cpu['proxy']:.2f}" if path.pids else ""),
            flush=True,
        )
    return values


def paired(a: list[float], b: list[float]) -> float:
    """The median over rounds of a/b, each ratio measured within one round."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> int:
    workers = int(os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 1)))
    vs = os.environ.get("BENCH_VS") or None  # a git revision: its proxy measured alongside
    print(
        f"{RUNS} rounds, every path once per round (interleaved), medians; iperf3 {SECONDS} s"
        f" per run; connrate {CONN_THREADS} threads x {CONN_SECONDS:g} s after a 1 s warm-up;"
        f" client netns -> host -> container; {os.cpu_count()} CPUs",
        flush=True,
    )
    r: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        connrate = stack.enter_context(connrate_binary())
        stack.enter_context(client_namespace())
        ip, server_pids = stack.enter_context(backend_container(connrate))
        old = stack.enter_context(proxy_source(vs))
        proxies: list[tuple[str, int, str | None, dict[str, str]]] = [("proxy", 0, None, {})]
        if workers > 1:
            proxies.append((f"proxy x{workers}", workers, None, {}))
        if vs is not None:
            proxies.append((f"proxy@{vs}", 0, old, {}))
        for size in filter(None, os.environ.get("BENCH_PIPES", "").split(",")):
            # the largest pipe a busy direction grows to (tcp.PIPE_MAX), in bytes
            proxies.append((f"proxy pipe {size}", 0, None, {"NATPORTS_PROXY_PIPE_MAX": size}))
        paths = [Target("direct", ip, IPERF_PORT, CONN_PORT)]
        for (name, n, source, extra), ports in zip(proxies, PROXY_PORTS, strict=False):
            proc = stack.enter_context(natports_proxy(ip, ports, n, source, extra))
            paths.append(Target(name, HOST_IP, ports[0], ports[1], (proc.pid,)))
        if os.environ.get("BENCH_FLOOR") == "1":
            for threads, ports in zip((1, 2), RELAY_PORTS, strict=True):
                pids = stack.enter_context(c_relay(ip, ports, threads))
                name = "C relay" + (f" x{threads}" if threads > 1 else "")
                paths.append(Target(name, HOST_IP, ports[0], ports[1], tuple(pids)))
        stack.enter_context(socat(ip))
        stack.enter_context(nftables(ip))
        socat_path = Target("socat", HOST_IP, SOCAT_PORT, CONN_SOCAT_PORT)
        nft_path = Target("nftables", HOST_IP, 0, CONN_NFT_PORT)
        for streams in (1, 8):

            def throughput(p: Target, streams: int = streams) -> float:
                return iperf(p.host, p.iperf_port, streams)

            got = interleaved(
                f"iperf3, {streams} stream{'s' if streams > 1 else ''}",
                [*paths, socat_path],
                throughput,
                "Gbit/s",
                server_pids[0],
            )
            r.update({f"{k} {streams}": v for k, v in got.items()})

        def connections(p: Target) -> float:
            conn_rate(connrate, p.host, p.conn_port, 1.0)  # warm-up: caches, first allocations
            return conn_rate(connrate, p.host, p.conn_port)

        got = interleaved(
            "new connections per second",
            [paths[0], nft_path, *paths[1:], socat_path],
            connections,
            "conn/s",
            server_pids[1],
        )
        r.update({f"conn {k}": v for k, v in got.items()})
    best = f"proxy x{workers}" if workers > 1 else "proxy"
    print()
    ratios = [
        ("1 stream, proxy / direct", paired(r["proxy 1"], r["direct 1"]), 0.9),
        (f"1 stream, {best} / direct", paired(r[f"{best} 1"], r["direct 1"]), 0.9),
        (f"8 streams, {best} / proxy (one process)", paired(r[f"{best} 8"], r["proxy 8"]), 1.5),
        ("connections, proxy / nftables", paired(r["conn proxy"], r["conn nftables"]), 0.8),
        (f"connections, {best} / nftables", paired(r[f"conn {best}"], r["conn nftables"]), 0.8),
        ("1 stream, proxy / socat", paired(r["proxy 1"], r["socat 1"]), None),
        (
            "1 stream, proxy / Node.js (DESIGN.md)",
            statistics.median(r["proxy 1"]) / NODE_PROXY_GBITS[0],
            1.5,
        ),
    ]
    for name in (n for n in r if n.startswith("proxy pipe ") and n.endswith(" 1")):
        ratios.append((f"1 stream, {name[:-2]} / direct", paired(r[name], r["direct 1"]), None))
    if vs is not None:
        ratios += [
            (f"1 stream, proxy / proxy@{vs}", paired(r["proxy 1"], r[f"proxy@{vs} 1"]), None),
            (f"8 streams, proxy / proxy@{vs}", paired(r["proxy 8"], r[f"proxy@{vs} 8"]), None),
            (
                f"connections, proxy / proxy@{vs}",
                paired(r["conn proxy"], r[f"conn proxy@{vs}"]),
                None,
            ),
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
        print(f"{label:44s} {value:5.2f}  {target}")
    print("all goals met" if ok else "some goals NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
