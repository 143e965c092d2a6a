"""Backend health: a backend that refused or timed out waits (backoff) before it is first again.

Pure bookkeeping over a clock passed in. A failing backend is not dropped: it goes
to the end of the candidates (a last resort when every other backend fails too), and
once its backoff has passed it is tried normally again; one success clears it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import Backend

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0

Address = tuple[str, int]


@dataclass
class _Failing:
    failures: int
    until: float


def address(backend: Backend) -> Address:
    return (str(backend.ip), backend.port)


class Health:
    def __init__(self) -> None:
        self._failing: dict[Address, _Failing] = {}

    def order(self, candidates: list[Backend], now: float) -> list[Backend]:
        """Candidates in their order, backends still backing off moved to the end."""
        if not self._failing:
            return candidates
        good: list[Backend] = []
        waiting: list[Backend] = []
        for backend in candidates:
            entry = self._failing.get(address(backend))
            (waiting if entry is not None and entry.until > now else good).append(backend)
        return good + waiting

    def failed(self, backend: Backend, now: float) -> None:
        entry = self._failing.get(address(backend))
        failures = 1 if entry is None else entry.failures + 1
        backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures - 1))
        self._failing[address(backend)] = _Failing(failures, now + backoff)

    def succeeded(self, backend: Backend) -> None:
        if self._failing:
            self._failing.pop(address(backend), None)

    def backing_off(self, now: float) -> list[Address]:
        return sorted(a for a, e in self._failing.items() if e.until > now)
