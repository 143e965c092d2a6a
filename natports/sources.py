"""The Dokku plugin's two records per app: where its mappings come from (its release's PORTS
file and Dokku's tcp/udp port map) and the PORTS of the build in progress. Pure values;
the store keeps them (`dokku/APP.json`, `staged/APP.json`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Mapping
from .spec import overlaps


@dataclass(frozen=True)
class Sources:
    ports_file: tuple[Mapping, ...] | None  # None: the release has no PORTS file
    ports_map: tuple[Mapping, ...]

    def merged(self) -> tuple[Mapping, ...]:
        from_file = self.ports_file or ()
        extra = tuple(m for m in self.ports_map if not any(overlaps(m, f) for f in from_file))
        return from_file + extra

    def shadowed(self) -> tuple[Mapping, ...]:
        """Port-map entries the PORTS file overrides (reported, not an error)."""
        from_file = self.ports_file or ()
        return tuple(m for m in self.ports_map if any(overlaps(m, f) for f in from_file))

    def to_json(self) -> dict[str, object]:
        return {
            "ports_file": None
            if self.ports_file is None
            else [m.to_json() for m in self.ports_file],
            "ports_map": [m.to_json() for m in self.ports_map],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Sources:
        ports_file = data.get("ports_file")
        ports_map = data.get("ports_map", [])
        assert ports_file is None or isinstance(ports_file, list)
        assert isinstance(ports_map, list)
        return cls(
            None if ports_file is None else tuple(Mapping.from_json(m) for m in ports_file),
            tuple(Mapping.from_json(m) for m in ports_map),
        )


@dataclass(frozen=True)
class Stage:
    build: str
    ports_file: tuple[Mapping, ...] | None

    def to_json(self) -> dict[str, object]:
        files = None if self.ports_file is None else [m.to_json() for m in self.ports_file]
        return {"build": self.build, "ports_file": files}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Stage:
        files = data.get("ports_file")
        assert files is None or isinstance(files, list)
        mappings = None if files is None else tuple(Mapping.from_json(m) for m in files)
        return cls(str(data.get("build", "")), mappings)
