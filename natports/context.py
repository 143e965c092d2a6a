"""What every use case works with: the store, the paths, the backends, Docker, conntrack.

The effects live behind these fields, so tests can put fakes there (a backend in
`_backends`, a Docker in `_docker`, a conntrack in `conntrack`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .backends import select
from .backends.base import RouteBackend
from .conntrack import Conntrack
from .containers import ContainerInfo, Docker
from .store import Store


@dataclass
class Context:
    store: Store
    dokku_root: Path
    config_path: Path
    owned_name: str  # natports' nft table, and (upper-cased) its iptables chain prefix
    backend_choice: str  # a backend name, or "auto"
    _docker: Docker | None = None
    _resolved: str | None = None
    _backends: dict[str, RouteBackend] = field(default_factory=dict)
    conntrack: Conntrack = field(default_factory=Conntrack)
    # Containers inspected by the last applies: the agent checks their pids in /proc
    # while Docker cannot be asked.
    inspected: dict[str, ContainerInfo] = field(default_factory=dict)

    def docker(self) -> Docker:
        if self._docker is None:
            self._docker = Docker()
        return self._docker

    def forget_docker(self) -> None:
        """Docker went away: reconnect on next use."""
        self._docker = None

    @property
    def backend(self) -> RouteBackend:
        """The backend new routes go to (resolved once: `auto` probes the host)."""
        if self._resolved is None:
            self._resolved = select.resolve(self.backend_choice)
        return self.backend_named(self._resolved)

    def backend_named(self, name: str) -> RouteBackend:
        if name not in self._backends:
            self._backends[name] = select.make(name, self.owned_name, self.store.root)
        return self._backends[name]
