"""The `natports` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad input or usage."""

from __future__ import annotations

import json
import re
import sys
from ipaddress import ip_address
from pathlib import Path

import click

from . import engine
from .backends import select
from .cli_support import handles_errors, read_input
from .errors import InputError
from .model import Mapping, host_text
from .store import Store

DEFAULT_STATE_DIR = "/var/lib/natports"
DEFAULT_DOKKU_ROOT = "/home/dokku"
DEFAULT_CONFIG = "/etc/natports/natports.toml"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    envvar="NATPORTS_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where app config and applied state live.",
)
@click.option(
    "--dokku-root",
    envvar="DOKKU_ROOT",
    default=DEFAULT_DOKKU_ROOT,
    show_default=True,
    type=click.Path(path_type=Path),
    help="Dokku's home, holding APP/CONTAINER.<proc>.<n> files.",
)
@click.option(
    "--config",
    "config_path",
    envvar="NATPORTS_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(path_type=Path),
    help="The operator's config file (host policy).",
)
@click.option(
    "--nft-table",
    envvar="NATPORTS_NFT_TABLE",
    default="natports",
    show_default=True,
    hidden=True,
    help="Name of the inet table natports owns (tests use their own).",
)
@click.option(
    "--backend",
    envvar="NATPORTS_BACKEND",
    type=click.Choice(["auto", *select.NAMES]),
    default=None,
    help="How routes are served [default: backend.default in the config, else auto].",
)
@click.pass_context
def main(
    ctx: click.Context,
    state_dir: Path,
    dokku_root: Path,
    config_path: Path,
    nft_table: str,
    backend: str | None,
) -> None:
    """Public TCP/UDP ports for Dokku apps through kernel DNAT."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", nft_table):
        raise click.BadParameter("must be a plain nft identifier", param_hint="--nft-table")
    try:
        choice = backend or select.configured_default(config_path) or "auto"
    except InputError as exc:
        raise click.UsageError("; ".join(exc.problems)) from None
    ctx.obj = engine.Context(
        Store(state_dir), dokku_root, config_path, owned_name=nft_table, backend_choice=choice
    )


@main.command()
@click.argument("file")
@handles_errors
def check(file: str) -> None:
    """Validate a PORTS file (grammar only); FILE may be - for stdin."""
    data, name = read_input(file)
    result = engine.check_file(data, name)
    click.echo(f"{name}: ok, {len(result.mappings)} mapping(s)")


@main.group()
def ports() -> None:
    """Store, show and remove an app's mappings."""


@ports.command("set")
@click.argument("app")
@click.argument("file", default="-")
@click.pass_obj
@handles_errors
def ports_set(ctx: engine.Context, app: str, file: str) -> None:
    """Validate FILE (default: stdin) and store it as APP's mappings. Run `apply` to route."""
    data, name = read_input(file)
    if name == "<stdin>":
        name = "PORTS"
    mappings = engine.set_ports(ctx, app, data, name)
    click.echo(f"{app}: stored {len(mappings)} mapping(s)")


@ports.command("show")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@handles_errors
def ports_show(ctx: engine.Context, app: str, as_json: bool) -> None:
    """Print APP's stored mappings, as PORTS lines or JSON."""
    engine.require_app_name(app)
    mappings: tuple[Mapping, ...] | None = ctx.store.mappings(app)
    if mappings is None:
        raise InputError([f'app "{app}" has no stored mappings'])
    if as_json:
        click.echo(json.dumps([m.to_json() for m in mappings], indent=2))
    else:
        for m in mappings:
            click.echo(m.to_line())


@ports.command("rm")
@click.argument("app")
@click.pass_obj
@handles_errors
def ports_rm(ctx: engine.Context, app: str) -> None:
    """Remove APP's rules from the kernel and forget its mappings."""
    existed = engine.remove_ports(ctx, app)
    click.echo(f"{app}: removed" if existed else f"{app}: had no stored mappings")


@main.command("apply")
@click.option("--app", help="Only this app (default: all apps).")
@click.option(
    "--container",
    "containers",
    multiple=True,
    metavar="ID",
    help="Use these containers instead of discovering them (repeatable; needs --app).",
)
@click.option("--dry-run", is_flag=True, help="Print the batch that would run; change nothing.")
@click.pass_obj
@handles_errors
def apply_cmd(
    ctx: engine.Context, app: str | None, containers: tuple[str, ...], dry_run: bool
) -> None:
    """Make the kernel match the stored mappings and the current containers."""
    report = engine.apply(ctx, app, containers, dry_run)
    if dry_run:
        click.echo(report.batch, nl=False)
    else:
        for name in report.applied:
            click.echo(f"{name}: routed")
    if app is not None and not report.batch:
        click.echo(f"{app}: no mappings, nothing to route")
    for name, why in sorted(report.failed.items()):
        click.echo(f"natports: {name}: kept its previous routes: {why}", err=True)
    if report.failed:
        sys.exit(1)


@main.command()
@click.option("--app", help="Only this app's rules (default: all of natports' rules).")
@click.option("--dry-run", is_flag=True, help="Print the batch that would run; change nothing.")
@click.pass_obj
@handles_errors
def flush(ctx: engine.Context, app: str | None, dry_run: bool) -> None:
    """Remove natports' rules (stored mappings stay; `apply` brings them back)."""
    batch = engine.flush(ctx, app, dry_run)
    if dry_run:
        click.echo(batch, nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")
@click.pass_obj
@handles_errors
def status(ctx: engine.Context, as_json: bool) -> None:
    """What natports routes now: public port, app, backends and counters."""
    rows = engine.status(ctx)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no routes")
        _agent_line(ctx)
        return
    table = [("APP", "PROCESS", "PUBLIC", "PRIVATE", "BACKENDS", "PACKETS", "BYTES", "FLOWS")]
    for r in rows:
        ip = r["public_ip"]
        host = "*" if ip is None else host_text(ip_address(str(ip)))
        backends = r["backends"]
        assert isinstance(backends, list)
        table.append(
            (
                str(r["app"]),
                str(r["process_type"]),
                f"{host}:{_ports(r, 'public')}/{r['protocol']}",
                _ports(r, "private"),
                ",".join(f"{b['container_id'][:12]}@{b['ip']}" for b in backends),
                "-" if r["packets"] is None else str(r["packets"]),
                "-" if r["bytes"] is None else str(r["bytes"]),
                _flows_text(r["flows"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    _agent_line(ctx)


def _flows_text(flows: object) -> str:
    """`ip:port=N` (`[ip6]:port=N`) per target holding live flows (old containers draining
    included)."""
    if not isinstance(flows, list):
        return "-"
    parts = [
        f"{host_text(ip_address(str(f['ip'])))}:{f['port']}="
        f"{int(f['tcp_established']) + int(f['udp'])}"
        for f in flows
        if isinstance(f, dict)
    ]
    return ",".join(parts) or "-"


def _agent_line(ctx: engine.Context) -> None:
    from .agent import agent_state, routed_listener_conflicts
    from .listeners import host_listeners

    agent = agent_state(ctx.store.root)
    if agent is None:
        click.echo(
            "agent: not running (routes do not follow container restarts; "
            "systemctl enable --now natports-watch, or run `natports watch`)"
        )
    else:
        click.echo(f"agent: running (pid {agent['pid']}, Docker {agent['docker']})")
    for line in routed_listener_conflicts(ctx.store, host_listeners()):
        click.echo(f"warning: {line}")


def _ports(row: dict[str, object], side: str) -> str:
    """`25`, or `10000-19999` for a range (rows without `*_port_end` are single ports)."""
    start, end = row[f"{side}_port"], row.get(f"{side}_port_end", row[f"{side}_port"])
    return str(start) if start == end else f"{start}-{end}"


@main.command()
@click.pass_obj
@handles_errors
def proxy(ctx: engine.Context) -> None:
    """Run the userspace TCP/UDP proxy (the `proxy` backend's daemon) in the foreground."""
    from .proxy.config import config_path
    from .proxy.daemon import serve

    serve(ctx.store.root, config_path(ctx.store.root), ctx.config_path)


@main.command()
@click.option(
    "--resync",
    "resync_every",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    help="Seconds between full resyncs of every app.",
)
@click.option(
    "--metrics-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write Prometheus metrics here (for node-exporter's textfile collector).",
)
@click.option("--max-seconds", type=float, default=None, hidden=True)
@click.pass_obj
@handles_errors
def watch(
    ctx: engine.Context, resync_every: float, metrics_file: Path | None, max_seconds: float | None
) -> None:
    """Run the agent: keep the kernel equal to Docker's truth (events, drift, resyncs)."""
    from .agent import Agent

    Agent(ctx, resync_every=resync_every, metrics_file=metrics_file).run(max_seconds)


@main.command()
@click.pass_obj
@handles_errors
def metrics(ctx: engine.Context) -> None:
    """Print Prometheus metrics: routes, live flows, the agent's counters."""
    from .agent import agent_state
    from .metrics import render

    click.echo(render(ctx, agent_state(ctx.store.root)), nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@handles_errors
def doctor(ctx: engine.Context, as_json: bool) -> None:
    """What this host offers natports, which backend `auto` picks and why."""
    from . import doctor as probes

    checks, chosen, why, works = probes.run_all(ctx.store.root, ctx.owned_name.upper())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "checks": [c.to_json() for c in checks],
                    "backend": chosen,
                    "why": why,
                    "backend_works": works,
                },
                indent=2,
            )
        )
    else:
        for check in checks:
            click.echo(f"{'ok ' if check.ok else 'NO '} {check.name:<15}{check.detail}")
            if not check.ok and check.hint:
                click.echo(f"    {'':<15}hint: {check.hint}")
        click.echo(f"backend: {chosen} ({why})")
    if not works:
        sys.exit(1)


from .dokku_cli import dokku  # noqa: E402  (registers after main exists)

main.add_command(dokku)
