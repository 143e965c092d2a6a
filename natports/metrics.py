"""Prometheus text exposition: routes, live flows per backend, apply durations, agent health.

Written by the agent to a file (point node-exporter's textfile collector at it) and
printed by `natports metrics`. No HTTP server: nothing new listens on the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from . import engine
from .errors import NatportsError
from .model import host_text


@dataclass
class AgentCounters:
    started: float = 0.0
    resyncs: int = 0
    repairs: int = 0
    withdrawals: int = 0
    errors: int = 0
    applies: int = 0
    apply_seconds: float = 0.0
    last_apply_seconds: dict[str, float] = field(default_factory=dict)

    def applied(self, app: str, seconds: float) -> None:
        self.applies += 1
        self.apply_seconds += seconds
        self.last_apply_seconds[app] = seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "resyncs": self.resyncs,
            "repairs": self.repairs,
            "withdrawals": self.withdrawals,
            "errors": self.errors,
            "applies": self.applies,
            "apply_seconds": self.apply_seconds,
            "last_apply_seconds": dict(self.last_apply_seconds),
        }


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: dict[str, object], value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    number = repr(float(value)) if isinstance(value, float) else str(value)
    return f"{name}{{{inner}}} {number}" if inner else f"{name} {number}"


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    samples: list[str] = field(default_factory=list)

    def add(self, value: float, **labels: object) -> None:
        self.samples.append(_sample(self.name, labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self.samples


def render_rows(rows: list[dict[str, object]], agent: dict[str, Any] | None) -> str:
    """Pure: `status` rows and the agent's heartbeat -> exposition text."""
    routes = _Family("natports_routes", "gauge", "Public ports routed, per app and backend.")
    flows = _Family(
        "natports_flows", "gauge", "Live flows (established TCP, UDP) per route and target."
    )
    proxy_open = _Family(
        "natports_proxy_open_connections", "gauge", "Open TCP connections through the proxy."
    )
    proxy_udp = _Family("natports_proxy_udp_flows", "gauge", "Live UDP flows through the proxy.")
    proxy_refused = _Family(
        "natports_proxy_refused_total", "counter", "New work the proxy refused, by cause."
    )
    per_app: dict[tuple[str, str], int] = {}
    for row in rows:
        proxied = row.get("proxy")
        if isinstance(proxied, dict):
            where = {
                "app": row["app"],
                "protocol": row["protocol"],
                "public_port": row["public_port"],
            }
            proxy_open.add(int(proxied.get("open_connections", 0)), **where)
            proxy_udp.add(int(proxied.get("udp_flows", 0)), **where)
            for cause, n in sorted(dict(proxied.get("refused") or {}).items()):
                proxy_refused.add(int(n), **where, cause=cause)
        key = (str(row["app"]), str(row["backend"]))
        per_app[key] = per_app.get(key, 0) + 1
        counts = row.get("flows")
        for count in counts if isinstance(counts, list) else ():
            labels = {
                "app": row["app"],
                "protocol": row["protocol"],
                "public_port": row["public_port"],
                "target": f"{host_text(ip_address(str(count['ip'])))}:{count['port']}",
            }
            if row["protocol"] == "tcp":
                flows.add(count["tcp_established"], **labels, state="established")
            else:
                flows.add(count["udp"], **labels, state="active")
    for (app, backend), n in sorted(per_app.items()):
        routes.add(n, app=app, backend=backend)
    families = [routes, flows, proxy_open, proxy_udp, proxy_refused]
    up = _Family("natports_agent_up", "gauge", "1 while `natports watch` runs.")
    up.add(1 if agent else 0)
    families.append(up)
    if agent:
        docker = _Family("natports_agent_docker_up", "gauge", "1 while Docker's events flow.")
        docker.add(1 if agent.get("docker") == "up" else 0)
        families.append(docker)
        for counter, text in (
            ("resyncs", "Full resyncs of every app."),
            ("repairs", "Times natports' rules were found gone and put back."),
            ("withdrawals", "Times dead containers were withdrawn as backends."),
            ("errors", "Agent steps that failed."),
        ):
            fam = _Family(f"natports_agent_{counter}_total", "counter", text)
            fam.add(int(agent.get(counter, 0)))
            families.append(fam)
        summary = _Family(
            "natports_apply_duration_seconds", "summary", "Time the agent's applies took."
        )
        summary.samples.append(
            _sample("natports_apply_duration_seconds_sum", {}, float(agent.get("apply_seconds", 0)))
        )
        summary.samples.append(
            _sample("natports_apply_duration_seconds_count", {}, int(agent.get("applies", 0)))
        )
        families.append(summary)
        last = _Family(
            "natports_last_apply_seconds", "gauge", "Duration of the last apply, per app."
        )
        for app, seconds in sorted(dict(agent.get("last_apply_seconds") or {}).items()):
            last.add(float(seconds), app=app)
        families.append(last)
    return "\n".join(line for fam in families for line in fam.lines()) + "\n"


def render(ctx: engine.Context, agent: dict[str, Any] | None) -> str:
    try:
        rows = engine.status(ctx)
    except NatportsError:
        rows = []
    return render_rows(rows, agent)
