"""The userspace proxy edge: write the daemon's config, have it reload, read its counters.

For hosts where netfilter cannot be programmed. A batch is the *whole* config
text the daemon will serve (see natports.proxy.config), so --dry-run shows
exactly what goes live. `run` is all or nothing: when the daemon refuses the
config or is not running, the previous file is put back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import NatportsError
from ..model import Route
from ..proxy import config as proxy_config
from ..proxy.control import NoDaemon, request
from .base import PROXY

HINT = "is `natports proxy` running? systemctl status natports-proxy"


class ProxyBackend:
    """Drives `natports proxy` through its config file and control socket."""

    name = PROXY

    def __init__(self, state_dir: Path, timeout: float = 10.0) -> None:
        self.config_path = proxy_config.config_path(state_dir)
        self.socket_path = proxy_config.socket_path(state_dir)
        self.timeout = timeout

    # -- planning (reads only the proxy's own config file) -------------------------------

    def current(self) -> tuple[Route, ...]:
        """The routes the daemon was last given."""
        try:
            return proxy_config.read_config(self.config_path)
        except proxy_config.ConfigError as exc:
            raise NatportsError(
                f"{self.config_path} is corrupt: {exc}",
                "`natports apply` (all apps) writes it anew",
            ) from None
        except OSError as exc:
            raise NatportsError(f"cannot read {self.config_path}: {exc.strerror}") from None

    def plan_app(self, previous: Sequence[Route], desired: Sequence[Route]) -> str:
        merged = proxy_config.merge_app(self.current(), _ports(previous), _ports(desired))
        return proxy_config.render_config(merged)

    def plan_reconcile(self, desired: Sequence[Route], describe: bool = True) -> str:
        return proxy_config.render_config(_ports(desired))

    def plan_flush_all(self) -> str:
        return proxy_config.render_config(())

    # -- effects -----------------------------------------------------------------------------

    def forwards_unpublished(self) -> bool:
        """The proxy's flows start on the host; it keeps asking for published ports."""
        return False

    def intact(self, routes: Sequence[Route] = ()) -> bool:
        """The daemon's config file is natports' own; nothing else removes it. A dead
        daemon is systemd's to restart (and `doctor` reports it)."""
        return self.config_path.exists()

    def run(self, batch: str) -> None:
        """Write the config, reload, and wait until the daemon says it is live."""
        try:
            proxy_config.parse_config(batch)
        except proxy_config.ConfigError as exc:
            raise NatportsError(f"not a proxy config: {exc}") from None
        try:
            old = self.config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise NatportsError(f"cannot read {self.config_path}: {exc.strerror}") from None
        self._write(batch)
        try:
            reply = request(self.socket_path, "reload", self.timeout)
        except NoDaemon:
            self._restore(old)
            raise NatportsError("no natports proxy is running", HINT) from None
        except TimeoutError:
            raise NatportsError(
                f"the natports proxy did not confirm the reload within {self.timeout:g} s", HINT
            ) from None
        except PermissionError:
            self._restore(old)
            raise NatportsError(
                f"cannot reach the natports proxy at {self.socket_path}: permission denied",
                "run as root",
            ) from None
        except OSError as exc:  # it hung up: it may or may not have reloaded
            message = f"the natports proxy did not answer the reload: {exc}"
            raise NatportsError(message, HINT) from None
        if reply.startswith("ok"):
            return
        self._restore(old)
        message = reply.removeprefix("error").strip() or reply
        raise NatportsError(
            f"the natports proxy refused the new routes: {message}",
            "nothing was changed; the proxy keeps serving the previous routes",
        )

    def _write(self, text: str) -> None:
        try:
            proxy_config.write_atomically(self.config_path, text)
        except OSError as exc:
            raise NatportsError(
                f"cannot write {self.config_path}: {exc.strerror}",
                "run as root, or point --state-dir / NATPORTS_STATE_DIR somewhere writable",
            ) from None

    def _restore(self, old: str | None) -> None:
        """Put the file back as the daemon serves it: the batch did not happen."""
        if old is None:
            self.config_path.unlink(missing_ok=True)
        else:
            self._write(old)

    # -- reading -----------------------------------------------------------------------------

    def route_id(self, route: Route) -> str:
        return proxy_config.route_id(route)

    def status(self) -> dict[str, Any] | None:
        """The daemon's `status` document, or None when no daemon runs."""
        try:
            reply = request(self.socket_path, "status", min(self.timeout, 5.0))
        except NoDaemon:
            return None
        except OSError as exc:
            message = f"the natports proxy did not answer `status`: {exc}"
            raise NatportsError(message, HINT) from None
        try:
            doc = json.loads(reply)
        except ValueError:
            message = f"the natports proxy answered `status` with {reply[:80]!r}"
            raise NatportsError(message) from None
        if not isinstance(doc, dict):
            raise NatportsError("the natports proxy's status is not a JSON object")
        return doc

    def counters(self) -> dict[str, tuple[int, int]]:
        """route id -> (connections or UDP flows, bytes both ways) since the daemon started."""
        doc = self.status()
        if doc is None:
            return {}
        routes = doc.get("routes")
        result: dict[str, tuple[int, int]] = {}
        for row in routes if isinstance(routes, list) else []:
            if isinstance(row, dict):
                result[str(row["id"])] = (int(row["connections"]), int(row["bytes"]))
        return result

    def route_metrics(self) -> dict[str, dict[str, Any]]:
        """Per route id, what the daemon counts now (empty when no daemon runs).

        {"open_connections": int, "udp_flows": int, "refused": {cause: int},
         "connections": int, "bytes": int, "backend_failures": int, "idle_closed": int,
         "evicted": int}
        Refusal causes: max_tcp, route_max_tcp, source_max_tcp, max_udp_flows,
        route_max_udp_flows, source_max_udp_flows, no_fds, no_backend.
        """
        doc = self.status()
        return {} if doc is None else route_metrics(doc)


def route_metrics(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-route metrics of a daemon `status` document (pure: see route_metrics above)."""
    result: dict[str, dict[str, Any]] = {}
    routes = doc.get("routes")
    for row in routes if isinstance(routes, list) else []:
        if not isinstance(row, dict) or "id" not in row:
            continue
        refused = row.get("refused")
        result[str(row["id"])] = {
            "open_connections": int(row.get("active", 0)),
            "udp_flows": int(row.get("udp_flows", 0)),
            "refused": (
                {str(k): int(v) for k, v in refused.items()} if isinstance(refused, dict) else {}
            ),
            "connections": int(row.get("connections", 0)),
            "bytes": int(row.get("bytes", 0)),
            "backend_failures": int(row.get("backend_failures", 0)),
            "idle_closed": int(row.get("idle_closed", 0)),
            "evicted": int(row.get("evicted", 0)),
        }
    return result


def _ports(routes: Sequence[Route]) -> list[Route]:
    """The proxy listens port by port: a range route is one route per port here."""
    return [single for route in routes for single in route.expanded()]
