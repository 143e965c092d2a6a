"""Which legacy xtables tables the kernel has loaded, read from /proc.

Running `ip6tables-legacy-save -t nat` to look at a table loads its kernel module,
only to find it empty; /proc/net/ip6_tables_names lists the loaded ones without
loading anything. An unloaded table holds nothing of natports' (or Docker's).
"""

from __future__ import annotations

from pathlib import Path

IP6_TABLES_NAMES = Path("/proc/net/ip6_tables_names")


def legacy6_loaded(table: str) -> bool:
    """Is the legacy IPv6 `table` (nat, filter) loaded in this network namespace?"""
    try:
        return table in IP6_TABLES_NAMES.read_text().split()
    except OSError:
        return False
