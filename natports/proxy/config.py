"""The proxy's config file: the full list of routes the daemon serves.

Schema (JSON): {"version": 1, "routes": [Route.to_json(), ...]}. The backend
writes it, the daemon reads it on `reload`; both sides parse it here, so a
batch shown by --dry-run is byte for byte what the daemon will serve.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..model import Route, RouteKey, host_text
from ..store import write_file_atomically

CONFIG_VERSION = 1
CONFIG_NAME = "proxy.json"
SOCKET_NAME = "proxy.sock"


class ConfigError(Exception):
    """The config text is not a valid proxy config (the daemon keeps its current one)."""


def config_path(state_dir: Path) -> Path:
    return state_dir / CONFIG_NAME


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def route_id(route: Route) -> str:
    """The counters' name of a route: readable, and unique (`tcp6` keeps families apart)."""
    key = route.key
    proto = f"{key.protocol}6" if key.family == 6 else str(key.protocol)
    host = "*" if key.public_ip is None else str(key.public_ip)
    return f"{route.app}/{proto}/{host}/{key.public_port}"


def describe_key(key: RouteKey) -> str:
    """`198.51.100.7:25/tcp`, `*:53/udp`, `[::]:25/tcp` for log lines and errors."""
    if key.public_ip is None:
        host = "*" if key.family == 4 else "[::]"
    else:
        host = host_text(key.public_ip)
    return f"{host}:{key.public_port}/{key.protocol}"


def render_config(routes: Iterable[Route]) -> str:
    """Deterministic text: the same routes always give the same bytes."""
    ordered = sorted(routes, key=Route.sort_key)
    doc = {"version": CONFIG_VERSION, "routes": [r.to_json() for r in ordered]}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def parse_config(text: str) -> tuple[Route, ...]:
    """Routes of a config text; ConfigError names what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != CONFIG_VERSION:
        raise ConfigError(f"not a natports proxy config (version {CONFIG_VERSION} expected)")
    items = doc.get("routes")
    if not isinstance(items, list):
        raise ConfigError('"routes" must be a list')
    routes: list[Route] = []
    seen: dict[RouteKey, str] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"route {index} is not an object")
        try:
            route = Route.from_json(item)
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"route {index} is invalid ({type(exc).__name__}: {exc})") from None
        if route.key.family not in (4, 6):
            raise ConfigError(f"route {index}: family must be 4 or 6")
        if route.key.public_ip is not None and route.key.public_ip.version != route.key.family:
            raise ConfigError(f"route {index}: public_ip is not an IPv{route.key.family} address")
        if not 1 <= route.key.public_port <= 65535:
            raise ConfigError(f"route {index}: public_port out of range")
        if route.key in seen:
            raise ConfigError(
                f"route {index}: {describe_key(route.key)} is already routed for {seen[route.key]}"
            )
        seen[route.key] = route.app
        routes.append(route)
    return tuple(routes)


def merge_app(
    current: Sequence[Route], previous: Sequence[Route], desired: Sequence[Route]
) -> tuple[Route, ...]:
    """current - previous + desired: one app's switch leaves every other route as it is."""
    gone = {(r.app, r.key) for r in previous}
    replaced = {r.key for r in desired}
    kept = [r for r in current if (r.app, r.key) not in gone and r.key not in replaced]
    return tuple(sorted([*kept, *desired], key=Route.sort_key))


def read_config(path: Path) -> tuple[Route, ...]:
    """The routes in `path`; no file means no routes."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    return parse_config(text)


def write_atomically(path: Path, text: str) -> None:
    """The daemon's config, written like every state file (see store)."""
    write_file_atomically(path, text.encode("utf-8"))
