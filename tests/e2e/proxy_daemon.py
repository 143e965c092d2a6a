"""The proxy daemon as a test fixture: `python -m natports.proxy` in a subprocess.

Each daemon gets its own state directory and its own settings file (never the
host's /etc/natports/natports.toml), and is killed at the end, whatever happens.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natports.backends.proxy import ProxyBackend
from natports.model import Route
from natports.proxy.control import request


class ProxyDaemon:
    """`python -m natports.proxy` in a subprocess, with its log kept for failure messages."""

    def __init__(
        self,
        state: Path,
        env: dict[str, str] | None = None,
        settings: str = "",
        nofile: int | None = None,
    ) -> None:
        self.state = state
        self.log_path = state.parent / f"{state.name}.log"
        self.settings = state.parent / f"{state.name}.toml"
        self.settings.write_text(settings)
        self.backend = ProxyBackend(state)
        state.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "natports.proxy", "--state-dir", str(state)]
        argv += ["--settings", str(self.settings)]

        def limit_fds() -> None:  # `ulimit -n N` for the daemon alone (soft and hard)
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stderr=log, env={**os.environ, **(env or {})}, preexec_fn=limit_fds
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the proxy exited {self.proc.returncode}:\n{self.log()}")
            if answers(self.backend.socket_path):
                return
            time.sleep(0.05)
        raise AssertionError(f"the proxy did not come up:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def apply(self, routes: list[Route]) -> None:
        self.backend.run(self.backend.plan_reconcile(routes))

    def status(self) -> dict[str, Any]:
        doc = self.backend.status()
        assert doc is not None
        return doc

    def route_status(self, rid: str) -> dict[str, Any]:
        rows = {r["id"]: r for r in self.status()["routes"]}
        return dict(rows[rid])

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyDaemon]]:
    started: list[ProxyDaemon] = []

    def start(env: dict[str, str] | None = None, **kwargs: Any) -> ProxyDaemon:
        daemon = ProxyDaemon(tmp_path / f"state{len(started)}", env, **kwargs)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyDaemon]) -> ProxyDaemon:
    return start_proxy()


def answers(path: Path) -> bool:
    try:
        return request(path, "ping", 1.0).startswith("ok")
    except OSError:
        return False
