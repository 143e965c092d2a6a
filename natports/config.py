"""The operator's config file (`/etc/natports/natports.toml`): one reader for every section.

`[policy]` (natports.policy), `[backend]` (natports.backends.select) and `[proxy]` (the
proxy's limits) each read their own section from `read_section`; a missing file means
every default, an unreadable or malformed one is bad input (exit 2), named with its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError


def read(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InputError([f"{path}: cannot read: {exc.strerror}"]) from None
    import tomllib  # here, not at the top: most hosts have no config file to parse

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError([f"{path}: {exc}"]) from None
    return data


def read_section(path: Path, name: str) -> dict[str, Any]:
    """One section as a table ({} when absent)."""
    section = read(path).get(name, {})
    if not isinstance(section, dict):
        raise InputError([f"{path}: [{name}] must be a table"])
    return section
