"""Per-app config and last applied state on disk, as typed records.

Every file of the state directory is listed in docs/state.md; the main ones:
    lock                 flock(2) held by every mutation and apply
    apps/APP.json        the app's validated mappings (what it asked for)
    applied/APP.json     what the kernel was last told for the app (routes and backend)
    leftover/APP.json    routes an earlier backend still holds (a change of backend)
    dokku/APP.json       the Dokku plugin's sources of the app's mappings
    staged/APP.json      the PORTS of the build in progress

Every write is temp file + fsync + rename + directory fsync, so a crash leaves
either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import NatportsError
from .model import Backend, Mapping, Route
from .sources import Sources, Stage

SCHEMA_VERSION = 1
T = TypeVar("T")


@dataclass(frozen=True)
class Applied:
    backend: str
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class Leftover:
    """Routes a backend still holds for an app that another backend serves now (a switch
    of backend is make before break; a failed removal is retried at the next apply)."""

    backend: str
    routes: tuple[Route, ...]
    # True until the new backend's batch succeeded: the old routes are then still the
    # ones serving, and must not be removed yet.
    pending: bool = False


def write_file_atomically(path: Path, payload: bytes) -> None:
    """temp + fsync + rename + directory fsync: readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _state_error(what: str, exc: OSError) -> NatportsError:
    return NatportsError(
        f"{what}: {exc.strerror}",
        "run as root, or point --state-dir / NATPORTS_STATE_DIR somewhere writable",
    )


@contextlib.contextmanager
def _shape_checked(path: Path) -> Iterator[None]:
    """A state file that parses as JSON but has the wrong shape is corrupt, not a crash."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError) as exc:
        raise NatportsError(
            f"{path} is corrupt ({type(exc).__name__}: {exc})", "restore or remove the file"
        ) from None


def _items(data: dict[str, object], key: str) -> list[dict[str, object]]:
    items = data[key]
    assert isinstance(items, list)
    return items


def _routes(data: dict[str, object]) -> tuple[Route, ...]:
    return tuple(Route.from_json(r) for r in _items(data, "routes"))


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    # -- locking ---------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One lock for all apps: two deploys at once never lose each other's update."""
        self._ensure_dirs()
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _state_error(f"cannot open {self.root / 'lock'}", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- app config ------------------------------------------------------------

    def apps(self) -> list[str]:
        return self._names("apps")

    def mappings(self, app: str) -> tuple[Mapping, ...] | None:
        return self._load(
            self.root / "apps" / f"{app}.json",
            lambda data: tuple(Mapping.from_json(m) for m in _items(data, "mappings")),
        )

    def all_mappings(self) -> dict[str, tuple[Mapping, ...]]:
        result: dict[str, tuple[Mapping, ...]] = {}
        for app in self.apps():
            mappings = self.mappings(app)
            if mappings is not None:
                result[app] = mappings
        return result

    def set_mappings(self, app: str, mappings: tuple[Mapping, ...]) -> None:
        self._write(
            self.root / "apps" / f"{app}.json",
            {"version": SCHEMA_VERSION, "app": app, "mappings": [m.to_json() for m in mappings]},
        )

    def remove_mappings(self, app: str) -> bool:
        return self._unlink(self.root / "apps" / f"{app}.json")

    # -- applied state -----------------------------------------------------------

    def applied_apps(self) -> list[str]:
        return self._names("applied")

    def applied(self, app: str) -> Applied | None:
        return self._load(
            self.root / "applied" / f"{app}.json",
            lambda data: Applied(str(data["backend"]), _routes(data)),
        )

    def set_applied(self, app: str, applied: Applied) -> None:
        self._write(
            self.root / "applied" / f"{app}.json",
            {
                "version": SCHEMA_VERSION,
                "app": app,
                "backend": applied.backend,
                "routes": [r.to_json() for r in applied.routes],
            },
        )

    def remove_applied(self, app: str) -> bool:
        return self._unlink(self.root / "applied" / f"{app}.json")

    # -- leftovers of a backend switch, and retired UDP backends ----------------------------

    def leftover_apps(self) -> list[str]:
        return self._names("leftover")

    def leftover(self, app: str) -> Leftover | None:
        return self._load(
            self.root / "leftover" / f"{app}.json",
            lambda data: Leftover(
                str(data["backend"]), _routes(data), bool(data.get("pending", False))
            ),
        )

    def set_leftover(self, app: str, leftover: Leftover) -> None:
        self._write(
            self.root / "leftover" / f"{app}.json",
            {
                "version": SCHEMA_VERSION,
                "backend": leftover.backend,
                "routes": [r.to_json() for r in leftover.routes],
                "pending": leftover.pending,
            },
        )

    def remove_leftover(self, app: str) -> bool:
        return self._unlink(self.root / "leftover" / f"{app}.json")

    def retired_udp(self) -> tuple[Backend, ...]:
        """UDP backends a switch removed whose containers may still hold flows."""
        found = self._load(
            self.root / "conntrack" / "udp-retired.json",
            lambda data: tuple(Backend.from_json(b) for b in _items(data, "backends")),
        )
        return found or ()

    def set_retired_udp(self, backends: tuple[Backend, ...]) -> None:
        path = self.root / "conntrack" / "udp-retired.json"
        if not backends:
            self._unlink(path)
            return
        ordered = sorted(backends, key=lambda b: (b.container_id, str(b.ip), b.port))
        self._write(path, {"version": SCHEMA_VERSION, "backends": [b.to_json() for b in ordered]})

    # -- the Dokku plugin's records: an app's sources, and the build in progress ----------

    def sources_apps(self) -> list[str]:
        return self._names("dokku")

    def sources(self, app: str) -> Sources | None:
        return self._load(self.root / "dokku" / f"{app}.json", Sources.from_json)

    def set_sources(self, app: str, sources: Sources) -> None:
        self._write(
            self.root / "dokku" / f"{app}.json", {"version": SCHEMA_VERSION, **sources.to_json()}
        )

    def remove_sources(self, app: str) -> bool:
        return self._unlink(self.root / "dokku" / f"{app}.json")

    def stage(self, app: str) -> Stage | None:
        return self._load(self.root / "staged" / f"{app}.json", Stage.from_json)

    def set_stage(self, app: str, stage: Stage) -> None:
        self._write(
            self.root / "staged" / f"{app}.json", {"version": SCHEMA_VERSION, **stage.to_json()}
        )

    def remove_stage(self, app: str) -> bool:
        return self._unlink(self.root / "staged" / f"{app}.json")

    # -- files -------------------------------------------------------------------

    def _ensure_dirs(self) -> None:
        try:
            for sub in ("apps", "applied"):
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise NatportsError(
                f"cannot create state directory {self.root}: {exc.strerror}",
                "run as root, or point --state-dir / NATPORTS_STATE_DIR somewhere writable",
            ) from None

    def _names(self, sub: str) -> list[str]:
        try:
            return sorted(p.stem for p in (self.root / sub).glob("*.json"))
        except OSError:
            return []

    def _load(self, path: Path, parse: Callable[[dict[str, object]], T]) -> T | None:
        """A record, or None when the file does not exist; a wrong shape is `corrupt`."""
        data = self._read(path)
        if data is None:
            return None
        with _shape_checked(path):
            return parse(data)

    def _read(self, path: Path) -> dict[str, object] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise NatportsError(
                f"cannot read {path}: {exc}", "restore or remove the file"
            ) from None
        if not isinstance(data, dict) or data.get("version") != SCHEMA_VERSION:
            raise NatportsError(f"{path} is not a natports v{SCHEMA_VERSION} state file")
        return data

    def _write(self, path: Path, data: dict[str, object]) -> None:
        try:
            self._write_atomically(path, data)
        except OSError as exc:
            raise _state_error(f"cannot write {path}", exc) from None

    def _write_atomically(self, path: Path, data: dict[str, object]) -> None:
        self._ensure_dirs()
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        write_file_atomically(path, payload)

    def _unlink(self, path: Path) -> bool:
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _state_error(f"cannot remove {path}", exc) from None
        return True
