"""Which containers are current for an app, and their addresses (the Docker edge).

Rule, in order:
1. `--container ID` given: exactly those.
2. Dokku's `DOKKU_ROOT/APP/CONTAINER.<proc>.<n>` files exist: the containers they
   name. Dokku rewrites them as each new container passes its checks, so during
   and after a deploy they name the new release.
3. A Dokku app (DOKKU_ROOT/APP exists) without files for a process type runs no
   container of it: scaled to 0 or removed from the Procfile (Dokku v0.38.27
   bin/scheduler-deploy-process:90-110 removes the files beyond the scale). Nothing is
   routed for it; containers still labelled for it are old ones draining.
4. Otherwise (no Dokku app dir): running containers labelled `com.dokku.app-name=APP`
   and `com.dokku.process-type=<proc>`, deploy containers only (never `dokku run`
   ones: `com.dokku.container-type=run`), that run the image of the most recently
   created one among them (the newest release only).

A container's address is the one on its initial network, as Dokku's own
GetContainerIpaddress (plugins/network/network.go:99-135): the network it was created
on (`network:set APP initial-network`, HostConfig.NetworkMode), else `bridge`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from .errors import NatportsError
from .liveness import Seen
from .model import Protocol

LABEL_APP = "com.dokku.app-name"
LABEL_PROCESS = "com.dokku.process-type"
LABEL_TYPE = "com.dokku.container-type"  # deploy, or run for `dokku run` (scheduler-deploy:21)
_CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
_CONTAINER_FILE = re.compile(r"^CONTAINER\.([A-Za-z][A-Za-z0-9_-]*)\.([0-9]+)$")


class AppProblem(NatportsError):
    """A failure that belongs to one app; other apps carry on."""


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    running: bool
    process_type: str | None
    ipv4: IPv4Address | None
    ipv6: IPv6Address | None
    subnets: tuple[str, ...]
    published: frozenset[tuple[int, Protocol]]  # private ports that have a host binding
    created: str
    image: str
    app: str | None = None  # the com.dokku.app-name label
    pid: int = 0  # the container's init process on the host, 0 when not running
    started_at: str = ""
    container_type: str | None = None  # com.dokku.container-type

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def seen(self) -> Seen:
        addresses = frozenset(a for a in (self.ipv4, self.ipv6) if a is not None)
        return Seen(self.id, self.running, self.app, self.process_type, addresses)


def parse_inspect(data: dict[str, Any]) -> ContainerInfo:
    """Turn `docker inspect` output into what natports needs; pure, so unit-testable."""
    settings = data.get("NetworkSettings") or {}
    networks: dict[str, Any] = settings.get("Networks") or {}
    # The initial network (the one the container was created on), then Docker's default
    # bridge, then the others in name order (only when the first ones give no address).
    mode = str((data.get("HostConfig") or {}).get("NetworkMode") or "")
    initial = mode if mode in networks else "bridge"
    ordered = sorted(networks.items(), key=lambda kv: (kv[0] != initial, kv[0] != "bridge", kv[0]))
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None
    subnets: list[str] = []
    for _, net in ordered:
        if ipv4 is None and net.get("IPAddress"):
            ipv4 = IPv4Address(net["IPAddress"])
            prefix = int(net.get("IPPrefixLen") or 32)
            subnets.append(str(IPv4Network(f"{ipv4}/{prefix}", strict=False)))
        if ipv6 is None and net.get("GlobalIPv6Address"):
            ipv6 = IPv6Address(net["GlobalIPv6Address"])
            prefix = int(net.get("GlobalIPv6PrefixLen") or 128)
            subnets.append(str(IPv6Network(f"{ipv6}/{prefix}", strict=False)))
    published: set[tuple[int, Protocol]] = set()
    for key, bindings in (settings.get("Ports") or {}).items():
        port, _, proto = key.partition("/")
        if bindings and proto in ("tcp", "udp"):
            published.add((int(port), Protocol(proto)))
    state = data.get("State") or {}
    labels = (data.get("Config") or {}).get("Labels") or {}
    return ContainerInfo(
        id=str(data["Id"]),
        name=str(data.get("Name", "")).lstrip("/"),
        running=bool(state.get("Running")),
        process_type=labels.get(LABEL_PROCESS),
        ipv4=ipv4,
        ipv6=ipv6,
        subnets=tuple(subnets),
        published=frozenset(published),
        created=str(data.get("Created", "")),
        image=str(data.get("Image", "")),
        app=labels.get(LABEL_APP),
        pid=int(state.get("Pid") or 0),
        started_at=str(state.get("StartedAt", "")),
        container_type=labels.get(LABEL_TYPE),
    )


def newest_release(containers: Iterable[ContainerInfo]) -> list[ContainerInfo]:
    """The running deploy containers that share the image of the most recently created one.

    A `dokku run` container (container-type run) may carry a process-type label too: never
    a backend.
    """
    running = [c for c in containers if c.running and c.container_type in (None, "deploy")]
    if not running:
        return []
    newest = max(running, key=lambda c: _created_order(c.created))
    return sorted((c for c in running if c.image == newest.image), key=lambda c: c.name)


class Docker:
    """A thin wrapper over the Docker SDK that turns its failures into natports errors."""

    def __init__(self) -> None:
        import docker
        import docker.errors
        import requests.exceptions

        # requests' own errors (a dockerd restart, a timeout) are not DockerExceptions.
        self._failures = (docker.errors.DockerException, requests.exceptions.RequestException)
        self._errors = docker.errors
        try:
            self._client = docker.from_env(timeout=30)
            self._client.ping()
        except Exception as exc:
            raise NatportsError(
                f"cannot reach Docker: {_first_line(exc)}",
                "is dockerd running, and may this user use its socket (DOCKER_HOST)?",
            ) from None

    @property
    def client(self) -> Any:
        """The SDK client, for the few callers that need more than discovery."""
        return self._client

    def inspect(self, ref: str) -> ContainerInfo:
        try:
            data = self._client.api.inspect_container(ref)
        except self._errors.NotFound:
            raise AppProblem(f'container "{ref}" does not exist') from None
        except self._failures as exc:
            raise NatportsError(f"Docker failed to inspect {ref}: {_first_line(exc)}") from None
        return parse_inspect(data)

    def observe(self, ids: Iterable[str]) -> dict[str, ContainerInfo | None]:
        """Each container as it is now; None for one that no longer exists."""
        found: dict[str, ContainerInfo | None] = {}
        for cid in sorted(set(ids)):
            try:
                found[cid] = self.inspect(cid)
            except AppProblem:
                found[cid] = None
        return found

    def labelled(self, app: str, process_type: str) -> list[ContainerInfo]:
        try:
            found = self._client.api.containers(
                all=False,
                filters={"label": [f"{LABEL_APP}={app}", f"{LABEL_PROCESS}={process_type}"]},
            )
        except self._failures as exc:
            raise NatportsError(f"Docker failed to list containers: {_first_line(exc)}") from None
        return [self.inspect(str(c["Id"])) for c in found]


def container_files(dokku_root: Path, app: str) -> dict[str, list[str]]:
    """process type -> container ids, from Dokku's CONTAINER.<proc>.<n> files, in index order."""
    found: dict[str, list[tuple[int, str]]] = {}
    try:
        entries = list((dokku_root / app).iterdir())
    except OSError:
        return {}
    for entry in entries:
        match = _CONTAINER_FILE.match(entry.name)
        if not match:
            continue
        cid = _read_container_id(entry)
        if cid:
            found.setdefault(match.group(1), []).append((int(match.group(2)), cid))
    return {proc: [cid for _, cid in sorted(items)] for proc, items in found.items()}


def _read_container_id(path: Path) -> str | None:
    """A container id from a file the dokku user controls, read as root: no symlink, no
    FIFO, a few bytes, and only an id comes out (never the content of another file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 128).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return text if _CONTAINER_ID.fullmatch(text) else None


def current_containers(
    docker: Docker,
    dokku_root: Path,
    app: str,
    process_types: Iterable[str],
    override: Iterable[str] = (),
) -> dict[str, list[ContainerInfo]]:
    """process type -> the app's current containers (see the module docstring)."""
    wanted = sorted(set(process_types))
    pinned = [docker.inspect(ref) for ref in override]
    if pinned:
        return {proc: [c for c in pinned if c.process_type in (None, proc)] for proc in wanted}
    files = container_files(dokku_root, app)
    dokku_app = _is_dir(dokku_root / app)
    result: dict[str, list[ContainerInfo]] = {}
    for proc in wanted:
        if proc in files:
            result[proc] = [docker.inspect(cid) for cid in files[proc]]
        elif dokku_app:
            result[proc] = []  # Dokku runs none of this type: nothing to route (rule 3)
        else:
            found = newest_release(docker.labelled(app, proc))
            if found:  # absent: "no running container" is a problem of the app
                result[proc] = found
    return result


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _created_order(created: str) -> str:
    """Docker's RFC 3339 times drop trailing zeros of the fraction: pad it to compare as text."""
    head, dot, rest = created.partition(".")
    if not dot:
        return created.removesuffix("Z") + ".000000000"
    digits = "".join(ch for ch in rest if ch.isdigit())
    return f"{head}.{digits:0<9}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
