"""The Dokku plugin's use cases: staged PORTS per deploy, Dokku's `ports:set` map, life cycle.

An app's mappings come from two sources, kept apart in the state directory:
    dokku/APP.json    the live sources: the PORTS file of the running release and
                      Dokku's tcp/udp port map
    staged/APP.json   the sources of the release being deployed (written at
                      post-extract, promoted at post-deploy)
The effective mappings (`apps/APP.json`) are the PORTS file's lines plus every
port-map entry whose public port the PORTS file does not already claim: on a
clash the PORTS file wins, because it travels with the code being deployed.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from . import engine
from .errors import InputError, NatportsError
from .model import DEFAULT_PROCESS_TYPE, Mapping, Protocol, loopback_publish
from .spec import Located, overlaps

LIVE = "dokku"
STAGED = "staged"
_MAP_ENTRY = re.compile(r"^([a-z0-9]+):([0-9]{1,5}):([0-9]{1,5})$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")


@dataclass(frozen=True)
class Sources:
    ports_file: tuple[Mapping, ...] | None  # None: the release has no PORTS file
    ports_map: tuple[Mapping, ...]

    def merged(self) -> tuple[Mapping, ...]:
        from_file = self.ports_file or ()
        extra = tuple(m for m in self.ports_map if not any(overlaps(m, f) for f in from_file))
        return from_file + extra

    def shadowed(self) -> tuple[Mapping, ...]:
        """Port-map entries the PORTS file overrides (reported, not an error)."""
        from_file = self.ports_file or ()
        return tuple(m for m in self.ports_map if any(overlaps(m, f) for f in from_file))

    def to_json(self) -> dict[str, object]:
        return {
            "ports_file": None
            if self.ports_file is None
            else [m.to_json() for m in self.ports_file],
            "ports_map": [m.to_json() for m in self.ports_map],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Sources:
        ports_file = data.get("ports_file")
        ports_map = data.get("ports_map", [])
        assert ports_file is None or isinstance(ports_file, list)
        assert isinstance(ports_map, list)
        return cls(
            None if ports_file is None else tuple(Mapping.from_json(m) for m in ports_file),
            tuple(Mapping.from_json(m) for m in ports_map),
        )


def parse_ports_map(entries: Sequence[str]) -> tuple[list[Located], list[str]]:
    """Dokku's `SCHEME:HOST_PORT:CONTAINER_PORT` entries; only tcp and udp are ours.

    Malformed entries give warnings: Dokku validated the map, so they are not ours to refuse.
    """
    located: list[Located] = []
    errors: list[str] = []
    for index, entry in enumerate(entries, start=1):
        match = _MAP_ENTRY.match(entry.strip())
        if not match:
            errors.append(f'ports:set entry "{entry}" is not SCHEME:HOST_PORT:CONTAINER_PORT')
            continue
        scheme, public, private = match.group(1), int(match.group(2)), int(match.group(3))
        if scheme not in ("tcp", "udp"):
            continue  # http, https, grpc...: Dokku's HTTP proxy serves those
        if not (1 <= public <= 65535 and 1 <= private <= 65535):
            errors.append(f'ports:set entry "{entry}": port out of range (1-65535)')
            continue
        mapping = Mapping(public, private, Protocol(scheme), process_type=DEFAULT_PROCESS_TYPE)
        located.append(Located(mapping, index, 1))
    return located, errors


def _load(ctx: engine.Context, kind: str, app: str) -> Sources | None:
    data = ctx.store.document(kind, app)
    return None if data is None else Sources.from_json(data)


def read_ports_from_image(ctx: engine.Context, image: str) -> bytes | None:
    """The PORTS file inside an image (its working directory, /app, then /), if any."""
    if not _IMAGE_RE.fullmatch(image):
        raise InputError([f'"{image}" is not an image reference'])
    client = ctx.docker().client
    try:
        return _ports_from_image(client, image)
    except NatportsError:
        raise
    except Exception as exc:  # the SDK and requests raise many kinds
        raise NatportsError(f"cannot read PORTS from image {image}: {exc}") from None


def _ports_from_image(client: Any, image: str) -> bytes | None:
    workdir = (client.api.inspect_image(image).get("Config") or {}).get("WorkingDir") or "/"
    created = client.api.create_container(image, command=["/PORTS"], entrypoint=[])
    try:
        for folder in dict.fromkeys([workdir, "/app", "/"]):
            path = str(PurePosixPath(folder) / "PORTS")
            try:
                stream, _ = client.api.get_archive(created["Id"], path)
            except Exception:  # any failure here means "not there"
                continue
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.next()
                handle = tar.extractfile(member) if member and member.isfile() else None
                if handle is not None:
                    return handle.read()
        return None
    finally:
        client.api.remove_container(created["Id"], force=True)


def stage(
    ctx: engine.Context,
    app: str,
    ports_text: bytes | None,
    ports_map: Sequence[str],
    image: str | None = None,
) -> tuple[Sources, list[str]]:
    """post-extract: validate the new release's PORTS; bad input aborts the deploy here."""
    engine.require_app_name(app)
    if image is not None:
        ports_text = read_ports_from_image(ctx, image)
    map_located, warnings = parse_ports_map(ports_map)
    with ctx.store.locked():
        check = engine.claim_checker(ctx, app)
        from_file = None if ports_text is None else engine.validate(ports_text, "PORTS", check)
        sources = Sources(from_file, tuple(m.mapping for m in map_located))
        warnings += _routable_map(check, sources)[1]
        ctx.store.set_document(STAGED, app, sources.to_json())
        return sources, warnings


def _map_text(mapping: Mapping) -> str:
    return f"{mapping.protocol}:{mapping.public_port}:{mapping.private_port}"


def _routable_map(
    check: engine.ClaimCheck, sources: Sources
) -> tuple[tuple[Mapping, ...], list[str]]:
    """Port-map entries to route, and a warning for each one left out.

    Dokku accepts any port map (and `apps:clone` copies it), so an entry whose
    public port another app holds or the host policy refuses is skipped, not fatal.
    """
    shadowed = sources.shadowed()
    candidates = [m for m in sources.ports_map if m not in shadowed]
    located = [Located(m, i, 1) for i, m in enumerate(candidates, start=1)]
    problems = check(located)
    dropped = {e.line for e in problems}
    warnings = [
        f"ports:set {_map_text(candidates[e.line - 1])} is not routed: {e.message}"
        for e in problems
    ]
    warnings += [f"ports:set {_map_text(m)} is overridden by PORTS" for m in shadowed]
    kept = tuple(m for i, m in enumerate(candidates, start=1) if i not in dropped)
    return kept, warnings


def docker_args(ctx: engine.Context, app: str, process_type: str) -> list[str]:
    """`-p 127.0.0.1::PRIVATE[-END][/udp]` per mapping of the process type. Read-only.

    Nothing when natports' flows pass Docker's FORWARD filter by themselves (its
    accept in DOCKER-USER, natports/forwarding.py): then Docker starts no
    docker-proxy process per port. A range is one argument either way.
    """
    engine.require_app_name(app)
    sources = _load(ctx, STAGED, app) or _load(ctx, LIVE, app)
    if sources is None:
        return []
    forwards = getattr(ctx.backend, "forwards_unpublished", None)
    if forwards is not None and forwards():
        return []
    ports: set[tuple[int, int, Protocol]] = set()
    for mapping in sources.merged():
        if mapping.process_type == process_type:
            ports.add((mapping.private_port, mapping.private_end, mapping.protocol))
    args: list[str] = []
    for port, end, proto in sorted(ports):
        args += ["-p", loopback_publish(port, proto, end)]
    return args


def promote(
    ctx: engine.Context, app: str, ports_map: Sequence[str] | None, from_stage: bool = True
) -> tuple[engine.ApplyReport | None, list[str]]:
    """post-deploy (and ports:set): make the staged sources live and route the app.

    `ports_map` None keeps the last known map. Returns the apply report (None when
    the app has nothing to route and never had) and warnings for people.
    """
    engine.require_app_name(app)
    warnings: list[str] = []
    if ports_map is not None:
        map_located, warnings = parse_ports_map(ports_map)
    with ctx.store.locked():
        staged = _load(ctx, STAGED, app) if from_stage else None
        current = staged or _load(ctx, LIVE, app) or Sources(None, ())
        if ports_map is not None:
            current = Sources(current.ports_file, tuple(m.mapping for m in map_located))
        # Claims may have changed since post-extract (another app deployed meanwhile).
        from_file = current.ports_file or ()
        located = [Located(m, i, 1) for i, m in enumerate(from_file, start=1)]
        check = engine.claim_checker(ctx, app)
        clashes = check(located)
        if clashes:
            raise InputError(
                [f"PORTS {from_file[e.line - 1].to_line()}: {e.message}" for e in clashes]
            )
        kept, map_warnings = _routable_map(check, current)
        warnings += map_warnings
        ctx.store.set_document(LIVE, app, current.to_json())
        if from_stage:
            ctx.store.remove_document(STAGED, app)
        merged = from_file + kept
        if merged:
            ctx.store.set_mappings(app, merged)
        else:
            ctx.store.remove_mappings(app)
        report = engine.apply_app_unlocked(ctx, app)
        return (report if report.batch else None), warnings


def reapply(ctx: engine.Context, app: str) -> engine.ApplyReport | None:
    """Containers may have new addresses (restart, reboot): route to the current ones."""
    engine.require_app_name(app)
    with ctx.store.locked():
        if ctx.store.mappings(app) is None and ctx.store.applied(app) is None:
            return None
        report = engine.apply_app_unlocked(ctx, app)
        return report if report.batch else None


def stop(ctx: engine.Context, app: str) -> None:
    """ps:stop: no container serves the app, so stop routing; the config stays."""
    engine.require_app_name(app)
    with ctx.store.locked():
        engine.flush_app_unlocked(ctx, app)


def delete(ctx: engine.Context, app: str) -> None:
    """apps:destroy (and the old name of apps:rename): rules, config and sources go."""
    engine.require_app_name(app)
    with ctx.store.locked():
        engine.flush_app_unlocked(ctx, app)
        ctx.store.remove_mappings(app)
        ctx.store.remove_document(LIVE, app)
        ctx.store.remove_document(STAGED, app)


def rename(ctx: engine.Context, old: str, new: str) -> None:
    """apps:rename: the config follows the new name; the old name's rules go."""
    engine.require_app_name(old)
    engine.require_app_name(new)
    with ctx.store.locked():
        sources = _load(ctx, LIVE, old)
        mappings = ctx.store.mappings(old)
        engine.flush_app_unlocked(ctx, old)
        if sources is not None:
            ctx.store.set_document(LIVE, new, sources.to_json())
        if mappings is not None:
            ctx.store.set_mappings(new, mappings)
        ctx.store.remove_mappings(old)
        ctx.store.remove_document(LIVE, old)
        ctx.store.remove_document(STAGED, old)


def report(ctx: engine.Context, app: str) -> dict[str, object]:
    engine.require_app_name(app)
    sources = _load(ctx, LIVE, app)
    staged = _load(ctx, STAGED, app)
    applied = ctx.store.applied(app)
    routes = applied.routes if applied else ()
    backends = sorted({f"{b.container_id[:12]}@{b.ip}" for r in routes for b in r.backends})
    mappings = ctx.store.mappings(app) or ()
    return {
        "app": app,
        "mappings": [m.to_line() for m in mappings],
        "ports_file": None
        if sources is None or sources.ports_file is None
        else [m.to_line() for m in sources.ports_file],
        "ports_map": [] if sources is None else [m.to_line() for m in sources.ports_map],
        "overridden_by_ports_file": []
        if sources is None
        else [m.to_line() for m in sources.shadowed()],
        "staged": staged is not None,
        "routed_ports": len(routes),
        "backends": backends,
        "backend": applied.backend if applied else None,
    }


def known_apps(ctx: engine.Context) -> list[str]:
    return sorted(
        set(ctx.store.apps()) | set(ctx.store.documents(LIVE)) | set(ctx.store.applied_apps())
    )
