"""`natports dokku ...`: what the plugin's triggers call (through the root helper).

Every argument is validated here (app names by Dokku's rule, image references,
port-map entries); the shell triggers only pass Dokku's arguments on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import build_source, engine
from . import dokku as plugin
from .cli_support import handles_errors
from .containers import AppProblem
from .errors import InputError, NatportsError
from .model import is_valid_app_name
from .spec import MAX_PORTS_BYTES, excerpt

BUILD_HELP = "DOKKU_PID of the Dokku command running the build (keys the staged PORTS)."
NO_PORTS_EXIT = 3  # read-source: the work dir has no PORTS file
REFUSED_EXIT = 4  # read-source: PORTS is refused (any other code: natports itself failed)

PORTS_MAP_HELP = (
    "Dokku's port map as space-separated SCHEME:HOST:CONTAINER entries "
    "(only tcp and udp are used); omit to keep the last known map."
)


def _map(value: str | None) -> list[str] | None:
    return None if value is None else value.split()


def _ignored(*apps: str) -> bool:
    """A name natports cannot serve (longer than 200 characters, or not Dokku's rule at all)
    holds nothing in natports (every write checks the name), so a trigger for it does
    nothing and succeeds: natports never fails a deploy, destroy or report of an app
    without ports. Nothing reaches a path or the kernel."""
    bad = [app for app in apps if not is_valid_app_name(app)]
    for app in bad:
        click.echo(
            f'natports: "{excerpt(app)}" is not an app name natports serves; nothing done',
            err=True,
        )
    return bool(bad)


def _warn(app: str, warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"natports: {app}: warning: {warning}", err=True)


@click.group()
def dokku() -> None:
    """Commands for the Dokku plugin's triggers."""


@dokku.command("read-source")
@click.argument("work_dir", type=click.Path(path_type=Path))
def read_source(work_dir: Path) -> None:
    """pre-build, as the dokku user: print the work dir's PORTS (exit 0), or exit 3 and print
    the image of a git:from-image deploy (or nothing). A PORTS that is not a regular file of
    at most 64 KiB is refused unread (exit 4). Never as root: root could read any file."""
    if os.geteuid() == 0:
        click.echo("natports: read-source runs as the dokku user, never as root", err=True)
        sys.exit(2)
    try:
        source = build_source.read_build_source(work_dir)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(REFUSED_EXIT)
    if source.ports is None:
        if source.image:
            click.echo(source.image)
        sys.exit(NO_PORTS_EXIT)
    sys.stdout.buffer.write(source.ports)


@dokku.command()
@click.argument("app")
@click.option("--build", required=True, help=BUILD_HELP)
@click.option("--image", help="Read PORTS from this image (git:from-image deploys).")
@click.option("--no-ports-file", is_flag=True, help="The build has no PORTS file.")
@click.pass_obj
@handles_errors
def stage(
    ctx: engine.Context, app: str, build: str, image: str | None, no_ports_file: bool
) -> None:
    """pre-build: validate the build's PORTS (stdin) before any container exists."""
    text = None
    if not (no_ports_file or image):
        text = sys.stdin.buffer.read(MAX_PORTS_BYTES + 1)
    if text is None and not image and _ignored(app):
        return
    try:
        staged = plugin.stage(ctx, app, build, text, image)
    except NatportsError as exc:
        if image is None:
            raise
        # e.g. ps:rebuild after the source image was pruned (the build pulls it again):
        # natports cannot tell, so the app keeps the PORTS it has; never a failed build.
        plugin.discard_stage(ctx, app)
        click.echo(
            f"natports: {app}: warning: cannot read PORTS from image {image} "
            f"({exc.message}); the app keeps its current PORTS",
            err=True,
        )
        return
    found = "no PORTS file" if staged.ports_file is None else f"PORTS: {len(staged.ports_file)}"
    click.echo(f"natports: {app}: {found} mapping(s) checked for this deploy")


@dokku.command("docker-args")
@click.argument("app")
@click.argument("process_type")
@click.option("--build", help=BUILD_HELP)
@click.option("--check", is_flag=True, help="Validate this build's PORTS again (fails the deploy).")
@click.pass_obj
@handles_errors
def docker_args(
    ctx: engine.Context, app: str, process_type: str, build: str | None, check: bool
) -> None:
    """docker-args-process-deploy: publish each private port on loopback only."""
    if _ignored(app):
        return
    args = plugin.docker_args(ctx, app, process_type, build or None, check)
    if args:
        click.echo(" ".join(args))


@dokku.command("post-deploy")
@click.argument("app")
@click.option("--ports-map", help=PORTS_MAP_HELP)
@click.option("--build", help=BUILD_HELP)
@click.pass_obj
@handles_errors
def post_deploy(ctx: engine.Context, app: str, ports_map: str | None, build: str | None) -> None:
    """post-deploy: make this build's PORTS live and route to the new containers.

    Traffic of Dokku's proxy has already moved and Dokku retires the old containers only
    if this succeeds (Dokku v0.38.27 plugins/scheduler-docker-local/scheduler-deploy:2,83-96):
    a problem of the app keeps its previous routes, is reported, and exits 0.
    """
    if _ignored(app):
        return
    try:
        report, warnings = plugin.promote(ctx, app, _map(ports_map), build or None)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(f"natports: {app}: {problem}", err=True)
        click.echo(
            f"natports: {app}: the new PORTS is not live; the previous one stays in effect",
            err=True,
        )
        plugin.discard_stage(ctx, app)
        _reapply_quietly(ctx, app)
        return
    except AppProblem as exc:
        click.echo(f"natports: {app}: kept its previous routes: {exc.message}", err=True)
        return
    _warn(app, warnings)
    if report is not None:
        click.echo(f"natports: {app}: new connections now go to the new containers")


def _reapply_quietly(ctx: engine.Context, app: str) -> None:
    """The previous mappings, routed to the current containers if they can be."""
    try:
        if plugin.reapply(ctx, app) is not None:
            click.echo(f"natports: {app}: its previous PORTS now goes to the new containers")
    except AppProblem as exc:
        click.echo(f"natports: {app}: kept its previous routes: {exc.message}", err=True)


@dokku.command("ports-update")
@click.argument("app")
@click.option("--ports-map", required=True, help=PORTS_MAP_HELP)
@click.pass_obj
@handles_errors
def ports_update(ctx: engine.Context, app: str, ports_map: str) -> None:
    """post-proxy-ports-update: Dokku's port map changed; takes effect without a redeploy.

    An app with no running containers keeps the new map for its next deploy.
    """
    if _ignored(app):
        return
    try:
        report, warnings = plugin.promote(ctx, app, _map(ports_map))
        _warn(app, warnings)
    except AppProblem as exc:
        click.echo(f"natports: {app}: map stored; not routed yet: {exc.message}", err=True)
        return
    if report is not None:
        click.echo(f"natports: {app}: port map applied")


@dokku.command("apply")
@click.argument("app")
@click.option(
    "--build", help=BUILD_HELP + " Given: a build's deploy leaves routing to post-deploy."
)
@click.pass_obj
@handles_errors
def reapply(ctx: engine.Context, app: str, build: str | None) -> None:
    """Route an app to its current containers again (restart, reboot).

    With nginx, proxy-build-config also fires inside deploys, after the web containers
    started and in core-post-deploy (Dokku v0.38.27 plugins/nginx-vhosts/
    scheduler-post-deploy-process:21, core-post-deploy:17). During a build's deploy the
    new PORTS is not live yet: its post-deploy moves the routes, not this.
    """
    if build and plugin.build_in_progress(ctx, app, build):
        return
    try:
        if plugin.reapply(ctx, app) is not None:
            click.echo(f"natports: {app}: routed to the current containers")
    except AppProblem as exc:
        click.echo(f"natports: {app}: kept its previous routes: {exc.message}", err=True)
        sys.exit(1)


@dokku.command()
@click.argument("app")
@click.pass_obj
@handles_errors
def stop(ctx: engine.Context, app: str) -> None:
    """scheduler-stop, post-stop: stop routing the app; its mappings stay for the next start."""
    if _ignored(app):
        return
    plugin.stop(ctx, app)


@dokku.command()
@click.argument("app")
@click.pass_obj
@handles_errors
def delete(ctx: engine.Context, app: str) -> None:
    """post-delete: the app's rules, mappings and sources go."""
    if _ignored(app):
        return
    plugin.delete(ctx, app)


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
    if _ignored(old, new):
        return
    plugin.rename(ctx, old, new)


@dokku.command()
@click.argument("old")
@click.argument("new")
@click.pass_obj
@handles_errors
def clone(ctx: engine.Context, old: str, new: str) -> None:
    """post-app-clone-setup: public ports belong to one app, so a clone starts without them."""
    if _ignored(old, new):
        return
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
    if app is not None and _ignored(app):
        return
    apps = [app] if app else plugin.known_apps(ctx)
    reports = [plugin.report(ctx, name) for name in apps]
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
            ("flows", "Natports live flows"),
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
    for app in plugin.known_apps(ctx):
        mappings = ctx.store.mappings(app) or ()
        click.echo(f"{app}\t{' '.join(m.to_line() for m in mappings)}")
