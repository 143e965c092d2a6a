"""Real test parts: a client network namespace, real containers, the real CLI.

Everything created here is removed again, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NETCLIENT = str(Path(__file__).with_name("netclient.py"))
TEST_IMAGE = os.environ.get("NATPORTS_TEST_IMAGE", "natports-echod:test")
NFT_TABLE = "natports_test"  # tests never touch a real installation's table
TABLE = ("inet", NFT_TABLE)
# Runs a test once per address family (the `family` fixture; see tests/e2e/conftest.py).
BOTH_FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])


def sh(
    *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, input=input)


def delete_natports_table() -> None:
    """The test table, and the test prefix's accept in Docker's DOCKER-USER chain."""
    from natports.forwarding import Forwarding
    from natports.probes import iptables_variant

    sh("nft", "delete", "table", *TABLE, check=False)
    Forwarding(NFT_TABLE.upper(), iptables_variant()).remove()


DOCKERD_LOG = Path("/var/log/natports-test-dockerd.log")


def docker_answers() -> bool:
    return sh("docker", "version", "--format", "{{.Server.Version}}", check=False).returncode == 0


def restart_dockerd(timeout: float = 90.0) -> float:
    """Stop the running dockerd and start it again with the same command line, as a
    Docker package upgrade does (without live-restore every container stops, and those
    with a restart policy come back, addresses handed out anew).

    Returns the wall-clock time at which Docker's API answered again.
    """
    pid = int(Path("/var/run/docker.pid").read_text().strip())
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.05)
    with DOCKERD_LOG.open("ab") as log:
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    while not docker_answers():
        assert time.monotonic() < deadline, f"dockerd did not come back; see {DOCKERD_LOG}"
        time.sleep(0.05)
    return time.time()


def delete_iptables_chains(prefix: str = NFT_TABLE.upper()) -> None:
    """The e2e suite's iptables chains (both variants), also after a test that failed."""
    from natports.backends.iptables import IptablesBackend

    for variant in ("nft", "legacy"):
        backend = IptablesBackend(variant, prefix=prefix)
        backend.run(backend.plan_flush_all())


@dataclass
class ClientNet:
    """A network namespace joined to the host by a veth pair.

    `host_ip` is the host's "public" address as the client sees it. A family 6 net has
    only IPv6 addresses (ULA `fd77:INDEX::/64`), so every test driven through it is a v6
    test: nothing can fall back to v4.
    """

    ns: str
    host_if: str
    host_ip: str
    client_ip: str
    family: int = 4

    @classmethod
    def create(cls, index: int, family: int = 4) -> ClientNet:
        tag = f"{os.getpid() % 10000}{index}"
        if family == 4:
            host_ip, client_ip, plen = f"198.18.{index}.1", f"198.18.{index}.2", 24
        else:
            host_ip, client_ip, plen = f"fd77:{index}::1", f"fd77:{index}::2", 64
        net = cls(
            ns=f"npc-{tag}",
            host_if=f"nph{tag}",
            host_ip=host_ip,
            client_ip=client_ip,
            family=family,
        )
        peer = f"npp{tag}"
        # nodad: a v6 address is usable at once, not after duplicate address detection.
        nodad = ("nodad",) if family == 6 else ()
        try:
            sh("ip", "netns", "add", net.ns)
            sh("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", net.ns)
            sh("ip", "addr", "add", f"{net.host_ip}/{plen}", "dev", net.host_if, *nodad)
            sh("ip", "link", "set", net.host_if, "up")
            net.exec("ip", "addr", "add", f"{net.client_ip}/{plen}", "dev", peer, *nodad)
            net.exec("ip", "link", "set", peer, "up")
            net.exec("ip", "link", "set", "lo", "up")
        except BaseException:
            net.destroy()
            raise
        return net

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *args, check=check)

    def client(self, *args: str) -> dict[str, Any]:
        out = sh(*self._netclient(*args)).stdout.strip().splitlines()
        return dict(json.loads(out[-1]))

    def connect_once(self, port: int, host: str | None = None) -> dict[str, Any]:
        return self.client("once", host or self.host_ip, str(port))

    def _netclient(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, sys.executable, NETCLIENT, *args]

    def hold(self, port: int, host: str | None = None) -> HeldFlow:
        return HeldFlow(self._netclient("hold", host or self.host_ip, str(port)))

    def udp_hold(self, port: int, host: str | None = None) -> UdpFlow:
        return UdpFlow(self._netclient("udphold", host or self.host_ip, str(port)))

    def probe(self, ports: Sequence[int], max_seconds: float, stopfile: Path) -> Hammer:
        """Connects to each port in turn until stopped; `stop()` gives every attempt."""
        argv = self._netclient(
            "probe", self.host_ip, ",".join(map(str, ports)), str(max_seconds), str(stopfile)
        )
        return Hammer(argv, stopfile)

    def hammer(self, port: int, rate: int, max_seconds: float, stopfile: Path) -> Hammer:
        argv = self._netclient(
            "hammer", self.host_ip, str(port), str(rate), str(max_seconds), str(stopfile)
        )
        return Hammer(argv, stopfile)

    def destroy(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class HeldFlow:
    """One long-lived TCP connection, driven line by line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        first = self._line()
        if "tag" not in first:
            self.close()
            raise AssertionError(f"held flow did not connect: {first}")
        self.tag = str(first["tag"])

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            return {"error": f"client exited: {err.strip()[-500:]}"}
        return dict(json.loads(line))

    def ask(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        result = self._line()
        if "answer" not in result:
            raise AssertionError(f"held flow failed: {result}")
        return str(result["answer"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


class UdpFlow:
    """One UDP client socket kept across switches: its conntrack flow is what is tested."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, text: str) -> str | None:
        """The answer, or None when none came within a second."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        return result.get("answer")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


class TagServer:
    """A host-local TCP server that greets with a tag: a backend without Docker."""

    def __init__(self, host: str, tag: str, port: int = 0) -> None:
        self.tag = tag
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(f"{self.tag}\n".encode())
            for line in conn.makefile("rb"):
                conn.sendall(f"{self.tag} {line.decode().strip()}\n".encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept(): the port is free again
        # Closed under a thread still in accept(), the fd number could be reused and the
        # thread (restarted after a signal) accept another test's connections.
        self.thread.join(timeout=5)
        self.sock.close()


class Hammer:
    """Opens connections continuously until stopped; reports per-tag counts and failures."""

    def __init__(self, argv: list[str], stopfile: Path) -> None:
        self.stopfile = stopfile
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"started": True}

    def stop(self) -> dict[str, Any]:
        self.stopfile.touch()
        out, _ = self.proc.communicate(timeout=60)
        return dict(json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Container:
    id: str
    name: str
    ip: str
    ip6: str | None = None  # on a dual-stack network only

    def address(self, family: int) -> str:
        """The container's address of one family (a test of that family dials it)."""
        found = self.ip if family == 4 else self.ip6
        assert found, f"container {self.name} has no IPv{family} address"
        return found


# A user network with IPv6, as `docker network create --ipv6` makes it: Docker 20.10
# needs no daemon-level IPv6 setting for it, and sets net.ipv6.conf.all.forwarding=1
# when it creates it (moby v20.10.24 vendor/github.com/docker/libnetwork/drivers/bridge/
# bridge.go:755, setup_ipv6.go:93-120). Containers started on it get a v4 and a v6 address.
DUAL_NETWORK = "natports-test-dual"
DUAL_BRIDGE = "np-dual0"
DUAL_SUBNET6 = "fd77:1::/64"  # a ULA: never routed beyond this host
DUAL_KEEPER = f"{DUAL_NETWORK}-keeper"


@contextlib.contextmanager
def ipv6_forwarding() -> Iterator[None]:
    """IPv6 forwarding for the block, then the host's settings back.

    Docker turns it on when it creates an IPv6 network (see DUAL_NETWORK) and never back
    off; a host that takes its IPv6 address from router advertisements (accept_ra=1)
    would drop it while forwarding, so nothing a test turns on outlives the test.
    """
    sysctls = [Path(f"/proc/sys/net/ipv6/conf/{i}/forwarding") for i in ("all", "default")]
    before = [path.read_text() for path in sysctls]
    try:
        for path in sysctls:
            path.write_text("1\n")
        yield
    finally:
        for path, value in zip(sysctls, before, strict=True):
            path.write_text(value)


def create_dual_network(timeout: float = 15.0) -> str:
    """The tests' dual-stack network (made if missing), ready for v6 traffic; its name.

    A bridge comes up when its first container joins, and its v6 addresses (the
    containers' gateway among them) are then tentative for about 2 s (duplicate address
    detection): replies from containers are lost meanwhile. On a real host other
    containers keep the bridge up; here a keeper container does, for the whole session.
    """
    found = sh("docker", "network", "inspect", "-f", "{{.EnableIPv6}}", DUAL_NETWORK, check=False)
    if found.returncode == 0 and found.stdout.strip() != "true":
        remove_dual_network()  # a stale one without IPv6: not ours to keep
    if found.returncode != 0 or found.stdout.strip() != "true":
        sh(
            "docker", "network", "create", "--ipv6", "--subnet", DUAL_SUBNET6,
            "-o", f"com.docker.network.bridge.name={DUAL_BRIDGE}", DUAL_NETWORK,
        )  # fmt: skip
    sh("docker", "rm", "-f", DUAL_KEEPER, check=False)
    # A restart policy brings it back after a test restarts dockerd (test_agent.py).
    sh(
        "docker", "run", "-d", "--name", DUAL_KEEPER, "--network", DUAL_NETWORK,
        "--restart", "unless-stopped", TEST_IMAGE, "keeper", "5999",
    )  # fmt: skip
    wait_dual_bridge(timeout)
    keeper = sh(
        "docker", "inspect", "-f",
        f"{{{{(index .NetworkSettings.Networks \"{DUAL_NETWORK}\").GlobalIPv6Address}}}}",
        DUAL_KEEPER,
    ).stdout.strip()  # fmt: skip
    try:
        socket.create_connection((keeper, 5999), timeout=5).close()
    except OSError as exc:
        raise AssertionError(
            f"{TEST_IMAGE} does not answer on IPv6 ([{keeper}]:5999: {exc}): an echod "
            "built before it served IPv6? Rebuild the image (./scripts/test does)"
        ) from None
    return DUAL_NETWORK


def wait_dual_bridge(timeout: float = 15.0) -> None:
    """Until the dual-stack bridge has its v6 addresses and none is tentative (DAD)."""
    deadline = time.monotonic() + timeout
    while True:
        addrs = sh("ip", "-6", "-o", "addr", "show", "dev", DUAL_BRIDGE, "scope", "global").stdout
        tentative = sh("ip", "-6", "-o", "addr", "show", "dev", DUAL_BRIDGE, "tentative").stdout
        if addrs.strip() and not tentative.strip():
            return
        assert time.monotonic() < deadline, f"{DUAL_BRIDGE} stays tentative: {tentative}"
        time.sleep(0.1)


def remove_dual_network() -> None:
    sh("docker", "rm", "-f", DUAL_KEEPER, check=False)
    sh("docker", "network", "rm", DUAL_NETWORK, check=False)


def _addresses(attrs: dict[str, Any]) -> tuple[str, str | None]:
    """The container's v4 and v6 address on the network it was created on (as Dokku's
    `network:set APP initial-network` does, and as natports reads it)."""
    mode = str(attrs["HostConfig"]["NetworkMode"])
    networks = attrs["NetworkSettings"]["Networks"]
    net = networks[mode if mode in networks else "bridge"]
    return str(net["IPAddress"]), net.get("GlobalIPv6Address") or None


class Containers:
    """Starts echod containers the way Dokku would (loopback-published private ports).

    `network`: the network new containers are created on (None: Docker's `bridge`).
    """

    def __init__(self, network: str | None = None) -> None:
        import docker
        import docker.errors

        self.client = docker.from_env()
        try:
            self.client.images.get(TEST_IMAGE)
        except docker.errors.ImageNotFound:
            # Never let Docker try a registry: build the image locally instead.
            raise AssertionError(f"{TEST_IMAGE} is missing: run ./scripts/test") from None
        self.started: list[str] = []
        self.prefix = f"nptest-{uuid.uuid4().hex[:6]}"
        self.network = network

    def start(
        self,
        tag: str,
        ports: Sequence[int] = (5025,),
        app: str | None = None,
        process_type: str = "web",
        name: str | None = None,
        publish: bool = True,
        udp: bool = True,
        restart: str | None = None,
    ) -> Container:
        labels = {}
        if app is not None:
            labels = {
                "com.dokku.app-name": app,
                "com.dokku.process-type": process_type,
                "com.dokku.container-type": "deploy",
            }
        published: dict[str, tuple[str, None]] = {}
        if publish:
            for port in ports:
                published[f"{port}/tcp"] = ("127.0.0.1", None)
                if udp:
                    published[f"{port}/udp"] = ("127.0.0.1", None)
        container = self.client.containers.run(
            TEST_IMAGE,
            command=[tag, *map(str, ports)],
            name=name or f"{self.prefix}-{len(self.started)}",
            labels=labels,
            ports=published,
            detach=True,
            restart_policy={"Name": restart} if restart else None,
            **({"network": self.network} if self.network else {}),
        )
        self.started.append(container.id)
        container.reload()
        ip, ip6 = _addresses(container.attrs)
        if self.network:
            assert ip6, f"no IPv6 address on {self.network}: {container.attrs['NetworkSettings']}"
            if self.network == DUAL_NETWORK:
                wait_dual_bridge()  # at once, unless dockerd restarted since the keeper came up
        return Container(container.id, container.name, ip, ip6)

    def stop(self, cid: str, timeout: int = 5) -> None:
        self.client.containers.get(cid).stop(timeout=timeout)

    def start_again(self, cid: str) -> str:
        """Start a stopped container; returns its (possibly new) address."""
        container = self.client.containers.get(cid)
        container.start()
        container.reload()
        return _addresses(container.attrs)[0]

    def ip(self, cid: str) -> str:
        return _addresses(self.client.containers.get(cid).attrs)[0]

    def rename(self, cid: str, name: str) -> None:
        self.client.containers.get(cid).rename(name)

    def remove_all(self) -> None:
        import docker.errors

        for cid in self.started:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(cid).remove(force=True)
        self.started.clear()


class Cli:
    """The real `natports` CLI, run as a subprocess against a private state directory."""

    def __init__(self, root: Path, backend: str | None = None) -> None:
        self.backend = backend
        self.env: dict[str, str] = {}
        self.state = root / "state"
        self.dokku_root = root / "dokku"
        self.config = root / "natports.toml"
        self.dokku_root.mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "natports",
            "--state-dir",
            str(self.state),
            "--dokku-root",
            str(self.dokku_root),
            "--config",
            str(self.config),
            "--nft-table",
            NFT_TABLE,
            *(["--backend", self.backend] if self.backend else []),
            *args,
        ]

    def __call__(
        self, *args: str, input: str | None = None, expect: int | None = 0
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            input=input,
            env={**os.environ, **self.env},
        )
        if expect is not None and proc.returncode != expect:
            raise AssertionError(
                f"natports {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def status(self) -> list[dict[str, Any]]:
        return list(json.loads(self("status", "--json").stdout))


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def iter_lines(text: str) -> Iterator[str]:
    yield from (line for line in text.splitlines() if line.strip())
