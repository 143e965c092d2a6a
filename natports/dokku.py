"""The Dokku plugin's use cases: staged PORTS per build, Dokku's `ports:set` map, life cycle.

An app's mappings come from two sources, kept apart in the state directory:
    dokku/APP.json    the live sources: the PORTS file of the running release and
                      Dokku's tcp/udp port map (the configured one, never the detected one)
    staged/APP.json   the PORTS file of the build in progress, written at pre-build and
                      stamped with that build's key; only the same build may use it
                      (docker-args-process-deploy) or promote it (post-deploy)
The effective mappings (`apps/APP.json`) are the PORTS file's lines plus every
port-map entry whose public port the PORTS file does not already claim: on a
clash the PORTS file wins, because it travels with the code being deployed.

A build is one Dokku command: `dokku` exports DOKKU_PID once and every nested call keeps
it (Dokku v0.38.27 `dokku`:58), and Dokku itself keys per-build files by it
(plugins/common/common.go:145, :302). The key adds the process's start time and the boot
id, so a recycled PID never matches an old stage.

(Over 400 lines on purpose: every trigger's use case reads and writes the same per-build
stage and the same two sources; where a build's PORTS comes from is build_source.py.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import engine
from .build_source import read_ports_from_image
from .errors import InputError
from .model import DEFAULT_PROCESS_TYPE, Mapping, Protocol, host_text, loopback_publish
from .sources import Sources, Stage
from .spec import MAX_PORTS_BYTES, Located, excerpt, parse_bytes
from .status import FlowReader
from .store import Applied

_MAP_ENTRY = re.compile(r"^([a-z0-9]+):([0-9]{1,5}):([0-9]{1,5})$")
_PID_RE = re.compile(r"^[1-9][0-9]{0,9}$")


def parse_ports_map(entries: Sequence[str]) -> tuple[list[Located], list[str]]:
    """Dokku's `SCHEME:HOST_PORT:CONTAINER_PORT` entries; only tcp and udp are ours.

    Malformed entries give warnings: Dokku validated the map, so they are not ours to refuse.
    """
    located: list[Located] = []
    errors: list[str] = []
    for index, entry in enumerate(entries, start=1):
        match = _MAP_ENTRY.match(entry.strip())
        if not match:
            errors.append(
                f'ports:set entry "{excerpt(entry)}" is not SCHEME:HOST_PORT:CONTAINER_PORT'
            )
            continue
        scheme, public, private = match.group(1), int(match.group(2)), int(match.group(3))
        if scheme not in ("tcp", "udp"):
            continue  # http, https, grpc...: Dokku's HTTP proxy serves those
        if not (1 <= public <= 65535 and 1 <= private <= 65535):
            errors.append(f'ports:set entry "{excerpt(entry)}": port out of range (1-65535)')
            continue
        mapping = Mapping(public, private, Protocol(scheme), process_type=DEFAULT_PROCESS_TYPE)
        located.append(Located(mapping, index, 1))
    return located, errors


# -- builds ---------------------------------------------------------------------------------


def build_key(pid: str) -> str:
    """The Dokku command (DOKKU_PID) a stage belongs to; see the module docstring."""
    if not _PID_RE.fullmatch(pid):
        raise InputError([f'build "{excerpt(pid)}" is not a process id (DOKKU_PID)'])
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "-"
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        started = fields[19]  # field 22, starttime, counted after "pid (comm)"
    except (OSError, IndexError):
        started = "gone"
    return f"{boot}:{pid}:{started}"


def _build_alive(key: str) -> bool:
    """Whether the Dokku command that wrote a stage still runs."""
    try:
        _, pid, _ = key.split(":")
        return build_key(pid) == key and not key.endswith(":gone")
    except (ValueError, InputError):
        return False


def _stage_of(ctx: engine.Context, app: str, key: str | None) -> Stage | None:
    """The app's stage if it belongs to build `key` (None: no build, e.g. ps:restart)."""
    stage = ctx.store.stage(app)
    if stage is None or key is None:
        return None
    return stage if stage.build == key else None


def _check_outside_lock(
    ctx: engine.Context, app: str, result_errors: list[Any], located: Sequence[Located]
) -> None:
    """Claims are read under the lock, checked after it: other apps' deploys never wait
    for a big PORTS. The check is repeated under the lock at post-deploy, where it counts."""
    with ctx.store.locked():
        check = engine.claim_checker(ctx, app)
    errors = list(result_errors) + check(located)
    if errors:
        errors.sort(key=lambda e: (e.line, e.col))
        raise InputError([e.format("PORTS") for e in errors])


def stage(
    ctx: engine.Context,
    app: str,
    build: str,
    ports_text: bytes | None,
    image: str | None = None,
) -> Stage:
    """pre-build: validate the build's PORTS and stage it for this build only.

    A failing pre-build aborts the build before any container exists (each builder's
    builder-build runs it at top level under `set -eo pipefail`, e.g. Dokku v0.38.27
    plugins/builder-dockerfile/builder-build:5,33; dokku_build then calls dokku_log_fail,
    plugins/common/functions:627-640). On failure no stage is left behind.
    """
    engine.require_app_name(app)
    key = build_key(build)
    try:
        if image is not None:
            ports_text = read_ports_from_image(ctx, image)
        if ports_text is not None and len(ports_text) > MAX_PORTS_BYTES:
            raise InputError([f"PORTS is larger than {MAX_PORTS_BYTES} bytes"])
        from_file = None
        if ports_text is not None:
            result = parse_bytes(ports_text)
            _check_outside_lock(ctx, app, list(result.errors), result.mappings)
            from_file = tuple(loc.mapping for loc in result.mappings)
    except InputError:
        with ctx.store.locked():
            ctx.store.remove_stage(app)
        raise
    staged = Stage(key, from_file)
    with ctx.store.locked():
        ctx.store.set_stage(app, staged)
    return staged


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


def docker_args(
    ctx: engine.Context, app: str, process_type: str, build: str | None, check: bool = False
) -> list[str]:
    """`-p 127.0.0.1::PRIVATE[-END][/udp]` per mapping of the process type.

    Uses this build's stage, else the live sources (ps:restart, ps:scale). `check` (the
    once-per-process-type call, Dokku v0.38.27 bin/scheduler-deploy-process:54-56, under
    `set -eo pipefail` before any container of the type is created) validates the stage
    again against the claims of now: another app may have taken a port since pre-build.

    Nothing to publish when natports' flows pass Docker's FORWARD filter by themselves
    (its accept in DOCKER-USER, natports/forwarding.py): then Docker starts no
    docker-proxy process per port. A range is one argument either way.
    """
    engine.require_app_name(app)
    live = ctx.store.sources(app)
    staged = _stage_of(ctx, app, None if build is None else build_key(build))
    if staged is not None:
        if check and staged.ports_file:
            located = [Located(m, i, 1) for i, m in enumerate(staged.ports_file, start=1)]
            try:
                _check_outside_lock(ctx, app, [], located)
            except InputError as exc:
                raise InputError(_relabel(exc.problems, staged.ports_file)) from None
        sources: Sources | None = Sources(staged.ports_file, live.ports_map if live else ())
    else:
        sources = live
    if sources is None:
        return []
    if ctx.backend.forwards_unpublished():
        return []
    ports: set[tuple[int, int, Protocol]] = set()
    for mapping in sources.merged():
        if mapping.process_type == process_type:
            ports.add((mapping.private_port, mapping.private_end, mapping.protocol))
    args: list[str] = []
    for port, end, proto in sorted(ports):
        args += ["-p", loopback_publish(port, proto, end)]
    return args


def _relabel(problems: list[str], mappings: tuple[Mapping, ...]) -> list[str]:
    """`PORTS:N:1: ...` of a re-check names the stored line N, not a file position."""
    out = []
    for problem in problems:
        head, _, rest = problem.partition(": ")
        parts = head.split(":")
        if len(parts) == 3 and parts[1].isdigit() and 1 <= int(parts[1]) <= len(mappings):
            out.append(f"PORTS {mappings[int(parts[1]) - 1].to_line()}: {rest}")
        else:
            out.append(problem)
    return out


def promote(
    ctx: engine.Context,
    app: str,
    ports_map: Sequence[str] | None,
    build: str | None = None,
) -> tuple[engine.ApplyReport | None, list[str]]:
    """post-deploy (build given) and ports:set (no build): make the sources live, route.

    Only the stage of this very build is promoted; a stage another build left behind
    (it failed after pre-build) is dropped once that build is over, never promoted.
    `ports_map` None keeps the last known map. Returns the apply report (None when
    the app has nothing to route and never had) and warnings for people.
    """
    engine.require_app_name(app)
    key = None if build is None else build_key(build)
    warnings: list[str] = []
    if ports_map is not None:
        map_located, warnings = parse_ports_map(ports_map)
    with ctx.store.locked():
        staged = _stage_of(ctx, app, key)
        leftover = ctx.store.stage(app)
        stale = staged is None and leftover is not None and key is not None
        if stale and leftover is not None and not _build_alive(leftover.build):
            ctx.store.remove_stage(app)
            warnings.append("dropped the PORTS staged by an earlier build that never deployed")
        live = ctx.store.sources(app) or Sources(None, ())
        current = live if staged is None else Sources(staged.ports_file, live.ports_map)
        if ports_map is not None:
            current = Sources(current.ports_file, tuple(m.mapping for m in map_located))
            if key is not None:  # a deploy: the map changed without post-proxy-ports-update
                warnings += _cleared(app, live.ports_map, current.ports_map)
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
        ctx.store.set_sources(app, current)
        if staged is not None:
            ctx.store.remove_stage(app)
        merged = from_file + kept
        if merged:
            ctx.store.set_mappings(app, merged)
        else:
            ctx.store.remove_mappings(app)
        report = engine.apply_app_unlocked(ctx, app)
        return (report if report.batch else None), warnings


def build_in_progress(ctx: engine.Context, app: str, build: str) -> bool:
    """Whether this Dokku command staged a PORTS for the app that post-deploy will promote."""
    engine.require_app_name(app)
    return _stage_of(ctx, app, build_key(build)) is not None


def discard_stage(ctx: engine.Context, app: str) -> None:
    """A stage that cannot go live is dropped: no later deploy may promote it."""
    engine.require_app_name(app)
    with ctx.store.locked():
        ctx.store.remove_stage(app)


def _cleared(app: str, before: Sequence[Mapping], now: Sequence[Mapping]) -> list[str]:
    """Map entries that went without ports:set/add/remove (which would have told natports).

    With nginx, domains:enable/disable and proxy:enable/disable clear the whole map through
    ports-clear and fire no post-proxy-ports-update (Dokku v0.38.27
    plugins/nginx-vhosts/pre-disable-vhost:27-33, pre-enable-vhost:34); the app's restart
    brings natports here. Dokku's map is the truth, so the entries stop being routed.
    """
    return [
        f"Dokku's port map no longer lists {_map_text(m)} (domains:enable/disable and "
        "proxy:enable/disable clear it); natports stops routing it. Restore it with "
        f"`dokku ports:add {app} {_map_text(m)}`"
        for m in before
        if m not in now
    ]


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
        ctx.store.remove_sources(app)
        ctx.store.remove_stage(app)


def rename(ctx: engine.Context, old: str, new: str) -> None:
    """apps:rename: the config follows the new name; the old name's rules go."""
    engine.require_app_name(old)
    engine.require_app_name(new)
    with ctx.store.locked():
        sources = ctx.store.sources(old)
        mappings = ctx.store.mappings(old)
        engine.flush_app_unlocked(ctx, old)
        if sources is not None:
            ctx.store.set_sources(new, sources)
        if mappings is not None:
            ctx.store.set_mappings(new, mappings)
        ctx.store.remove_mappings(old)
        ctx.store.remove_sources(old)
        ctx.store.remove_stage(old)


def report(ctx: engine.Context, app: str) -> dict[str, object]:
    engine.require_app_name(app)
    sources = ctx.store.sources(app)
    staged = ctx.store.stage(app)
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
        "flows": _flows(ctx, applied),
    }


def _flows(ctx: engine.Context, applied: Applied | None) -> list[str]:
    """Live flows per target, `ip:port=N`, old containers still draining included."""
    if applied is None or applied.backend == "proxy":
        return []
    reader = FlowReader(ctx)
    totals: dict[str, int] = {}
    for route in applied.routes:
        for count in reader.of(route) or ():
            target = f"{host_text(count.ip)}:{count.port}"
            totals[target] = totals.get(target, 0) + count.tcp_established + count.udp
    return [f"{target}={n}" for target, n in sorted(totals.items())]


def known_apps(ctx: engine.Context) -> list[str]:
    return sorted(
        set(ctx.store.apps()) | set(ctx.store.sources_apps()) | set(ctx.store.applied_apps())
    )
