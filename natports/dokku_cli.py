"""`natports dokku ...`: what the plugin's triggers call (through the root helper).

Every argument is validated here (app names by Dokku's rule, image references,
port-map entries); the shell triggers only pass Dokku's arguments on.
"""

from __future__ import annotations

import json
import sys

import click

from . import dokku as use
from . import engine
from .cli_support import handles_errors
from .containers import AppProblem

PORTS_MAP_HELP = (
    "Dokku's port map as space-separated SCHEME:HOST:CONTAINER entries "
    "(only tcp and udp are used); omit to keep the last known map."
)


def _map(value: str | None) -> list[str] | None:
    return None if value is None else value.split()


def _warn(app: str, warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"natports: {app}: warning: {warning}", err=True)


@click.group()
def dokku() -> None:
    """Commands for the Dokku plugin's triggers."""


@dokku.command()
@click.argument("app")
@click.option("--ports-map", help=PORTS_MAP_HELP)
@click.option("--image", help="Read PORTS from this image (image-based deploys).")
@click.option("--no-ports-file", is_flag=True, help="The release has no PORTS file.")
@click.pass_obj
@handles_errors
def stage(
    ctx: engine.Context, app: str, ports_map: str | None, image: str | None, no_ports_file: bool
) -> None:
    """post-extract: validate the new release's PORTS (stdin) before any container changes."""
    text = None if (no_ports_file or image) else sys.stdin.buffer.read()
    sources, warnings = use.stage(ctx, app, text, _map(ports_map) or [], image)
    _warn(app, warnings)
    found = "no PORTS file" if sources.ports_file is None else f"PORTS: {len(sources.ports_file)}"
    click.echo(f"natports: {app}: {found} mapping(s) checked for this deploy")


@dokku.command("docker-args")
@click.argument("app")
@click.argument("process_type")
@click.pass_obj
@handles_errors
def docker_args(ctx: engine.Context, app: str, process_type: str) -> None:
    """docker-args-process-deploy: publish each private port on loopback only."""
    args = use.docker_args(ctx, app, process_type)
    if args:
        click.echo(" ".join(args))


@dokku.command("post-deploy")
@click.argument("app")
@click.option("--ports-map", help=PORTS_MAP_HELP)
@click.pass_obj
@handles_errors
def post_deploy(ctx: engine.Context, app: str, ports_map: str | None) -> None:
    """post-deploy / ports:set: make the staged mappings live and route to the new containers."""
    report, warnings = use.promote(ctx, app, _map(ports_map))
    _warn(app, warnings)
    if report is not None:
        click.echo(f"natports: {app}: new connections now go to the new containers")


@dokku.command("ports-update")
@click.argument("app")
@click.option("--ports-map", required=True, help=PORTS_MAP_HELP)
@click.pass_obj
@handles_errors
def ports_update(ctx: engine.Context, app: str, ports_map: str) -> None:
    """post-proxy-ports-update: Dokku's port map changed; takes effect without a redeploy.

    An app with no running containers keeps the new map for its next deploy.
    """
    try:
        report, warnings = use.promote(ctx, app, _map(ports_map), from_stage=False)
        _warn(app, warnings)
    except AppProblem as exc:
        click.echo(f"natports: {app}: map stored; not routed yet: {exc.message}", err=True)
        return
    if report is not None:
        click.echo(f"natports: {app}: port map applied")


@dokku.command("apply")
@click.argument("app")
@click.pass_obj
@handles_errors
def reapply(ctx: engine.Context, app: str) -> None:
    """Route an app to its current containers again (restart, reboot)."""
    try:
        if use.reapply(ctx, app) is not None:
            click.echo(f"natports: {app}: routed to the current containers")
    except AppProblem as exc:
        click.echo(f"natports: {app}: kept its previous routes: {exc.message}", err=True)
        sys.exit(1)


@dokku.command()
@click.argument("app")
@click.pass_obj
@handles_errors
def stop(ctx: engine.Context, app: str) -> None:
    """post-stop: stop routing the app; its mappings stay for the next start."""
    use.stop(ctx, app)


@dokku.command()
@click.argument("app")
@click.pass_obj
@handles_errors
def delete(ctx: engine.Context, app: str) -> None:
    """post-delete: the app's rules, mappings and sources go."""
    use.delete(ctx, app)


@dokku.command("flush-all")
@click.pass_obj
@handles_errors
def flush_all(ctx: engine.Context) -> None:
    """uninstall: remove every natports rule (stored mappings stay)."""
    engine.flush(ctx)


@dokku.command()
@click.argument("old")
@click.argument("new")
@click.pass_obj
@handles_errors
def rename(ctx: engine.Context, old: str, new: str) -> None:
    """post-app-rename-setup: mappings follow the new name; the old name's rules go."""
    use.rename(ctx, old, new)


@dokku.command()
@click.argument("old")
@click.argument("new")
@click.pass_obj
@handles_errors
def clone(ctx: engine.Context, old: str, new: str) -> None:
    """post-app-clone-setup: public ports belong to one app, so a clone starts without them."""
    engine.require_app_name(old)
    engine.require_app_name(new)
    click.echo(
        f"natports: {new}: public ports are not cloned from {old} (a port belongs to one app); "
        f"give {new} its own PORTS or ports:set tcp/udp entries"
    )


@dokku.command()
@click.argument("app", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_obj
@handles_errors
def report(ctx: engine.Context, app: str | None, fmt: str) -> None:
    """natports:report: mappings, their sources, current backends, backend kind."""
    apps = [app] if app else use.known_apps(ctx)
    reports = [use.report(ctx, name) for name in apps]
    if fmt == "json":
        click.echo(json.dumps(reports[0] if app else reports, indent=2))
        return
    for item in reports:
        click.echo(f"=====> {item['app']} natports information")
        for key, label in (
            ("mappings", "Natports mappings"),
            ("ports_file", "Natports ports file"),
            ("ports_map", "Natports ports map"),
            ("overridden_by_ports_file", "Natports overridden map"),
            ("backends", "Natports backends"),
            ("backend", "Natports backend"),
            ("routed_ports", "Natports routed ports"),
            ("staged", "Natports deploy staged"),
        ):
            value = item[key]
            if isinstance(value, list):
                value = " ".join(str(v) for v in value)
            elif value is None:
                value = ""
            click.echo(f"       {label + ':':<32}{value}")


@dokku.command("list")
@click.pass_obj
@handles_errors
def list_apps(ctx: engine.Context) -> None:
    """natports:list: every app with mappings, and what it maps."""
    for app in use.known_apps(ctx):
        mappings = ctx.store.mappings(app) or ()
        click.echo(f"{app}\t{' '.join(m.to_line() for m in mappings)}")
