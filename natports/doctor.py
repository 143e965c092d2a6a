"""`natports doctor`: what this host offers natports, which backend would serve, and
whether natports' own processes (the proxy, the agent) run. Every check only reads.
"""

from __future__ import annotations

from pathlib import Path

from .probes import (
    Check,
    check_cap_net_admin,
    check_conntrack,
    check_docker,
    check_docker_forward,
    check_forwarding,
    check_forwarding6,
    check_ip6tables,
    check_ip_forward,
    check_iptables,
    check_nft,
    choose_backend,
)


def check_proxy(state_dir: Path) -> Check:
    """A daemon that answers on its control socket (a stale socket file is not one)."""
    from .proxy.config import socket_path
    from .proxy.control import request

    sock = socket_path(state_dir)
    try:
        request(sock, "ping", 2.0)
        return Check("proxy", True, f"a natports proxy answers at {sock}")
    except OSError:
        pass
    return Check(
        "proxy",
        False,
        "no natports proxy is running",
        "systemctl enable --now natports-proxy (or run `natports proxy`)",
    )


def check_agent(state_dir: Path) -> Check:
    """Is `natports watch` alive (a fresh heartbeat from a live process)?"""
    from .agent import agent_state

    agent = agent_state(state_dir)
    if agent is None:
        return Check(
            "agent",
            False,
            "natports watch is not running: routes do not follow container restarts, "
            "dockerd restarts or a flushed ruleset",
            "systemctl enable --now natports-watch (or run `natports watch`)",
        )
    detail = f"natports watch runs (pid {agent['pid']}, Docker {agent['docker']})"
    return Check("agent", True, detail)


def check_listeners(state_dir: Path) -> Check:
    """Host processes that started listening on a port natports routes."""
    from .agent import routed_listener_conflicts
    from .listeners import host_listeners
    from .store import Store

    try:
        conflicts = routed_listener_conflicts(Store(state_dir), host_listeners())
    except Exception as exc:  # a corrupt state file is reported by other commands
        return Check("listeners", False, f"cannot compare: {exc}")
    if conflicts:
        return Check(
            "listeners", False, "; ".join(conflicts), "stop the host process or unmap the port"
        )
    return Check("listeners", True, "no host process listens on a routed port")


def run_all(state_dir: Path, prefix: str = "NATPORTS") -> tuple[list[Check], str, str, bool]:
    """All checks, the backend `auto` picks, why, and whether that backend can work."""
    nft, ipt = check_nft(), check_iptables()
    checks = [
        nft,
        ipt,
        check_ip6tables(),
        check_cap_net_admin(),
        check_ip_forward(),
        check_docker(),
        check_docker_forward(),
        check_forwarding(prefix),
        check_forwarding6(prefix),
        check_conntrack(),
        check_proxy(state_dir),
        check_agent(state_dir),
        check_listeners(state_dir),
    ]
    backend, why = choose_backend(nft, lambda: ipt)
    by_name = {c.name: c for c in checks}
    works = backend != "proxy" or by_name["proxy"].ok
    return checks, backend, why, works
