"""Fakes of natports' edges for unit tests of the orchestration: no root, no Docker, no kernel.

- `FakeBackend` is a whole `RouteBackend`: its batches are readable text that `run`
  interprets, so what the engine *planned* is what the fake kernel *holds*; it can be
  told to fail on a given run (atomically: a failing batch changes nothing).
- `FakeDocker` answers `inspect`, `observe`, `labelled` (and a `client` for reading an
  image's PORTS) from container descriptions made with `container(...)`.
- `FakeConntrack` holds flows and records deletions.
- `make_context` builds an `engine.Context` with all of them behind its seams.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from natports import engine
from natports.conntrack import Flow
from natports.containers import AppProblem, ContainerInfo
from natports.errors import NatportsError
from natports.model import Protocol, Route, RouteKey
from natports.store import Store

TCP, UDP = Protocol.TCP, Protocol.UDP


def key_text(key: RouteKey) -> str:
    ip = "*" if key.public_ip is None else str(key.public_ip)
    return f"{key.family}/{key.protocol}/{ip}/{key.public_port}"


class Crash(BaseException):
    """The process died here (kill -9, power loss): nothing after this point runs."""


class FakeBackend:
    """Holds routes in memory the way a kernel backend would.

    A batch is one line per step: `flush`, `del APP KEY` or `set ROUTE-JSON`; `run`
    applies all of its lines or, when told to fail, none of them.
    """

    def __init__(self, name: str = "nftables") -> None:
        self.name = name
        self.held: dict[RouteKey, Route] = {}
        self.batches: list[str] = []  # every batch run successfully, in order
        self.runs = 0  # every call of run, failed ones included
        self.fail_on: set[int] = set()  # 1-based run numbers that fail
        self.fail_always = False
        self.present = True  # the skeleton (False: someone flushed the ruleset)
        self.checked: tuple[Route, ...] = ()
        self.counts: dict[str, tuple[int, int]] = {}
        self.counters_fail = False
        self.on_run: Callable[[str], None] | None = None  # called as a batch starts
        self.running = 0  # runs in progress: more than one means the lock failed
        self.crash_after: set[int] = set()  # 1-based runs after which the process dies

    # -- planning ---------------------------------------------------------------------

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        keys = {r.key for r in desired}
        lines = [f"del {r.app} {key_text(r.key)}" for r in previous if r.key not in keys]
        lines += [f"set {json.dumps(r.to_json(), sort_keys=True)}" for r in desired]
        return "".join(f"{line}\n" for line in lines)

    def plan_reconcile(self, desired: Sequence[Route], describe: bool = True) -> str:
        return "flush\n" + self.plan_app((), desired)

    def plan_flush_all(self) -> str:
        return "flush\n"

    # -- effects ----------------------------------------------------------------------

    def crash_after_next(self) -> None:
        """The next run reaches the kernel, then the process dies."""
        self.crash_after.add(self.runs + 1)

    def fail_next(self, count: int = 1) -> None:
        """The next `count` runs fail."""
        self.fail_on |= {self.runs + i for i in range(1, count + 1)}

    def run(self, batch: str) -> None:
        self.runs += 1
        if self.running:
            raise AssertionError("two batches ran at once")
        self.running += 1
        try:
            if self.on_run is not None:
                self.on_run(batch)
            if self.fail_always or self.runs in self.fail_on:
                raise NatportsError(f"{self.name} failed: injected failure", "nothing changed")
            self._apply(batch)
            if self.runs in self.crash_after:
                raise Crash(f"crashed after run {self.runs}")
        finally:
            self.running -= 1

    def _apply(self, batch: str) -> None:
        held = dict(self.held)
        for line in batch.splitlines():
            op, _, rest = line.partition(" ")
            if op == "flush":
                held.clear()
            elif op == "del":
                app, _, text = rest.partition(" ")
                for key, r in list(held.items()):
                    if r.app == app and key_text(key) == text:
                        del held[key]
            elif op == "set":
                r = Route.from_json(json.loads(rest))
                other = held.get(r.key)
                if other is not None and other.app != r.app:
                    raise AssertionError(f"{r.app} overwrote {other.app}'s route")
                held[r.key] = r
            elif line.strip():
                raise AssertionError(f"not a fake batch line: {line!r}")
        self.held = held
        self.present = True
        self.batches.append(batch)

    def forwards_unpublished(self) -> bool:
        return False

    def intact(self, routes: Sequence[Route] = ()) -> bool:
        self.checked = tuple(routes)  # what the skeleton was checked for
        return self.present

    def flush_ruleset(self) -> None:
        """What `nft flush ruleset` or a firewall reload does to a kernel backend."""
        self.held.clear()
        self.present = False

    def route_id(self, route: Route) -> str:
        return f"{route.app}:{key_text(route.key)}"

    def counters(self) -> dict[str, tuple[int, int]]:
        if self.counters_fail:
            raise NatportsError(f"{self.name}: cannot read counters")
        return dict(self.counts)

    # -- views for assertions -----------------------------------------------------------

    def ports(self, app: str | None = None) -> dict[int, list[str]]:
        """public port -> backend addresses, of one app or all."""
        return {
            r.key.public_port: sorted(str(b.ip) for b in r.backends)
            for r in self.held.values()
            if app is None or r.app == app
        }


def cid(name: str) -> str:
    """A stable 64-hex container id derived from a short name."""
    return (name.encode().hex() + "0" * 64)[:64]


def container(
    name: str,
    ip: str | None = "172.17.0.2",
    *,
    app: str | None = "mail",
    proc: str | None = "web",
    published: Iterable[tuple[int, Protocol] | int] = (5025,),
    running: bool = True,
    image: str = "img1",
    created: str = "2026-01-01T00:00:00Z",
    ipv6: str | None = None,
    pid: int = 0,
    container_type: str | None = "deploy",
) -> ContainerInfo:
    ports = frozenset(p if isinstance(p, tuple) else (p, TCP) for p in published)
    v4 = IPv4Address(ip) if ip else None
    v6 = IPv6Address(ipv6) if ipv6 else None
    subnets = tuple(s for s in ("172.17.0.0/16" if v4 else "", "fd00::/64" if v6 else "") if s)
    return ContainerInfo(
        id=cid(name),
        name=name,
        running=running,
        process_type=proc,
        ipv4=v4,
        ipv6=v6,
        subnets=subnets,
        published=ports,
        created=created,
        image=image,
        app=app,
        pid=pid,
        container_type=container_type,
    )


class FakeApi:
    """The part of the Docker SDK's low-level API that reads PORTS out of an image."""

    def __init__(self, images: dict[str, dict[str, bytes]], workdirs: dict[str, str]) -> None:
        self.images = images
        self.workdirs = workdirs
        self.created: dict[str, str] = {}
        self.removed: list[str] = []

    def inspect_image(self, image: str) -> dict[str, Any]:
        if image not in self.images:
            raise RuntimeError(f"No such image: {image}")
        return {"Config": {"WorkingDir": self.workdirs.get(image, "")}}

    def create_container(self, image: str, **_: Any) -> dict[str, str]:
        ident = f"tmp{len(self.created)}"
        self.created[ident] = image
        return {"Id": ident}

    def get_archive(self, ident: str, path: str) -> tuple[Iterator[bytes], dict[str, Any]]:
        files = self.images[self.created[ident]]
        if path not in files:
            raise RuntimeError(f"Could not find the file {path} in container {ident}")
        data = files[path]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("PORTS")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        return iter([raw[:100], raw[100:]]), {}

    def remove_container(self, ident: str, force: bool = False) -> None:
        self.removed.append(ident)


class FakeClient:
    def __init__(self, api: FakeApi, version: str = "99.0-fake") -> None:
        self.api = api
        self._version = version

    def version(self) -> dict[str, str]:
        return {"Version": self._version}


class FakeDocker:
    """Docker as natports' `Docker` adapter sees it, from container descriptions."""

    def __init__(self, *containers: ContainerInfo) -> None:
        self.containers: dict[str, ContainerInfo] = {c.id: c for c in containers}
        self.down = False  # every call fails as when dockerd is unreachable
        self.images: dict[str, dict[str, bytes]] = {}
        self.workdirs: dict[str, str] = {}
        self.api = FakeApi(self.images, self.workdirs)
        self.inspected: list[str] = []

    def add(self, *containers: ContainerInfo) -> None:
        self.containers.update((c.id, c) for c in containers)

    def remove(self, name: str) -> None:
        del self.containers[cid(name)]

    def stop(self, name: str) -> None:
        from dataclasses import replace

        self.containers[cid(name)] = replace(self.containers[cid(name)], running=False)

    def _check(self) -> None:
        if self.down:
            raise NatportsError("cannot reach Docker: connection refused", "is dockerd running?")

    @property
    def client(self) -> FakeClient:
        self._check()
        return FakeClient(self.api)

    def inspect(self, ref: str) -> ContainerInfo:
        self._check()
        self.inspected.append(ref)
        for c in self.containers.values():
            if ref in (c.id, c.name) or (len(ref) >= 12 and c.id.startswith(ref)):
                return c
        raise AppProblem(f'container "{ref}" does not exist')

    def observe(self, ids: Iterable[str]) -> dict[str, ContainerInfo | None]:
        self._check()
        return {i: self.containers.get(i) for i in sorted(set(ids))}

    def labelled(self, app: str, process_type: str) -> list[ContainerInfo]:
        self._check()
        return [
            c
            for c in self.containers.values()
            if c.running and c.app == app and c.process_type == process_type
        ]


@dataclass
class FakeConntrack:
    """conntrack's table: flows per (protocol, family); deletions recorded."""

    table: list[Flow] = field(default_factory=list)
    deleted: list[Flow] = field(default_factory=list)
    broken: bool = False

    def flows(self, protocol: Protocol, family: int) -> list[Flow]:
        if self.broken:
            raise NatportsError("conntrack netlink: Operation not permitted", "needs root")
        return [f for f in self.table if f.protocol is protocol and f.family == family]

    def delete(self, flows: Sequence[Flow]) -> int:
        if self.broken:
            raise NatportsError("conntrack delete failed")
        self.deleted += list(flows)
        self.table = [f for f in self.table if f not in flows]
        return len(flows)


def udp_flow(client: str, public: str, port: int, target: str, target_port: int) -> Flow:
    return Flow(
        family=ip_address(client).version,
        protocol=UDP,
        client=ip_address(client),
        client_port=40000,
        public=ip_address(public),
        public_port=port,
        target=ip_address(target),
        target_port=target_port,
    )


@dataclass
class World:
    """A context and the fakes behind it."""

    ctx: engine.Context
    docker: FakeDocker
    backends: dict[str, FakeBackend]
    conntrack: FakeConntrack

    @property
    def nft(self) -> FakeBackend:
        return self.backends["nftables"]

    @property
    def ipt(self) -> FakeBackend:
        return self.backends["iptables"]

    def use(self, name: str) -> None:
        """The operator chose another backend (a new process resolves it afresh)."""
        self.ctx._resolved = name


def make_context(root: Path, backend: str = "nftables", docker: FakeDocker | None = None) -> World:
    """A Context over a store in `root`, with a fake backend of every name."""
    ctx = engine.Context(
        Store(root / "state"), root / "dokku", root / "natports.toml", "natports_test", backend
    )
    return attach(ctx, docker or FakeDocker())


def attach(ctx: engine.Context, docker: FakeDocker) -> World:
    backends = {name: FakeBackend(name) for name in ("nftables", "iptables", "proxy")}
    ctx._docker = docker  # type: ignore[assignment]
    ctx._backends.update(backends)  # the fakes satisfy RouteBackend
    if ctx.backend_choice == "auto":
        ctx._resolved = "nftables"
    conntrack = FakeConntrack()
    ctx.conntrack = conntrack  # type: ignore[assignment]
    return World(ctx, docker, backends, conntrack)


HOST = ip_address("198.51.100.1")


def quiet_host(monkeypatch: Any, listeners: Sequence[Any] = ()) -> None:
    """The host's listeners and addresses as a test says, not as this machine has them."""
    from natports import claims, status, switch

    monkeypatch.setattr(claims, "host_listeners", lambda: list(listeners))
    monkeypatch.setattr(switch, "local_addresses", lambda: frozenset({HOST}))
    monkeypatch.setattr(status, "local_addresses", lambda: frozenset({HOST}))


def dokku_files(root: Path, app: str, **procs: Sequence[ContainerInfo]) -> None:
    """Dokku's DOKKU_ROOT/APP/CONTAINER.<proc>.<n> files naming these containers."""
    folder = root / app
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("CONTAINER.*"):
        old.unlink()
    for proc, found in procs.items():
        for n, c in enumerate(found, start=1):
            (folder / f"CONTAINER.{proc}.{n}").write_text(c.id + "\n")


def patch_cli(monkeypatch: Any, world: World) -> None:
    """Every Context the CLI makes gets `world`'s fakes (the store is its --state-dir's)."""
    real = engine.Context

    def make(*args: Any, **kwargs: Any) -> engine.Context:
        ctx = real(*args, **kwargs)
        ctx._docker = world.docker  # type: ignore[assignment]
        ctx._backends.update(world.backends)
        ctx.conntrack = world.conntrack  # type: ignore[assignment]
        if ctx.backend_choice == "auto":
            ctx._resolved = "nftables"
        return ctx

    monkeypatch.setattr(engine, "Context", make)
    monkeypatch.setattr("natports.listeners.host_listeners", lambda *a: [])


def cli_args(root: Path) -> list[str]:
    """The global options that point the CLI at a World made by `make_context(root)`."""
    return [
        "--state-dir",
        str(root / "state"),
        "--dokku-root",
        str(root / "dokku"),
        "--config",
        str(root / "natports.toml"),
        "--nft-table",
        "natports_test",
    ]


_TOOL = """#!/bin/sh
# A fake {name}: records its arguments and stdin, answers from files keyed by its arguments.
dir='{dir}'
touch "$dir/{name}.calls"
n=$(( $(wc -l < "$dir/{name}.calls") + 1 ))
printf '%s\\n' "$*" >> "$dir/{name}.calls"
cat > "$dir/{name}.stdin.$n"
key=$(printf '%s' "$*" | tr -c 'A-Za-z0-9' '_')
for base in "$dir/{name}.$key" "$dir/{name}.default"; do
    if [ -e "$base.rc" ] || [ -e "$base.out" ] || [ -e "$base.err" ]; then
        [ -e "$base.out" ] && cat "$base.out"
        [ -e "$base.err" ] && cat "$base.err" >&2
        exit "$(cat "$base.rc" 2>/dev/null || echo 0)"
    fi
done
exit 0
"""


class FakeTool:
    """An executable on PATH standing in for nft, iptables-*-restore/-save, conntrack...

    `answer(args, out=..., err=..., rc=...)` sets what it prints for exactly these
    arguments (None: for any); `calls` and `stdin(n)` tell what it was asked.
    """

    def __init__(self, bin_dir: Path, name: str) -> None:
        import re

        self._re = re
        self.dir = bin_dir
        self.name = name
        bin_dir.mkdir(parents=True, exist_ok=True)
        path = bin_dir / name
        path.write_text(_TOOL.format(name=name, dir=bin_dir))
        path.chmod(0o755)

    def answer(
        self, args: Sequence[str] | None, out: str = "", err: str = "", rc: int = 0
    ) -> FakeTool:
        key = "default" if args is None else self._re.sub(r"[^A-Za-z0-9]", "_", " ".join(args))
        base = self.dir / f"{self.name}.{key}"
        base.with_name(base.name + ".out").write_text(out)
        base.with_name(base.name + ".err").write_text(err)
        base.with_name(base.name + ".rc").write_text(str(rc))
        return self

    @property
    def calls(self) -> list[str]:
        try:
            return (self.dir / f"{self.name}.calls").read_text().splitlines()
        except FileNotFoundError:
            return []

    def stdin(self, n: int) -> str:
        """What call number n (1-based) read on stdin."""
        return (self.dir / f"{self.name}.stdin.{n}").read_text()


def only_fake_tools(tmp: Path, monkeypatch: Any) -> Path:
    """PATH holds the fakes a test makes (returned dir) and the few tools they run.

    Nothing else: a real nft, iptables or conntrack on this host is never found, and
    the nft backend neither loads libnftables nor reads netlink (NATPORTS_NFT=binary).
    """
    import shutil

    bin_dir, helpers = tmp / "bin", tmp / "helpers"
    bin_dir.mkdir()
    helpers.mkdir()
    for tool in ("cat", "wc", "tr", "touch"):
        found = shutil.which(tool)
        assert found, tool
        (helpers / tool).symlink_to(found)
    monkeypatch.setenv("PATH", f"{bin_dir}:{helpers}")
    monkeypatch.setenv("NATPORTS_NFT", "binary")
    return bin_dir
