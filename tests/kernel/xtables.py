"""The xtables side of the kernel tests: the test prefix, reading a nat table, cleaning up."""

from __future__ import annotations

import re
import shlex

from tests.infra import sh

PREFIX = "NPKTEST"  # not NATPORTS_TEST either: the e2e suite may use that one meanwhile
VARIANTS = ["nft", "legacy"]


def tool(variant: str, family: int = 4) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{variant}"


def save(variant: str, counters: bool = False, family: int = 4) -> str:
    """The nat table as iptables-save prints it, minus timestamps and policy counters
    (legacy prints those even without -c; any traffic on the host moves them)."""
    out = sh(f"{tool(variant, family)}-save", *(["-c"] if counters else []), "-t", "nat").stdout
    lines = [re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1", line) for line in out.splitlines()]
    return "".join(line + "\n" for line in lines if not line.startswith("#"))


def ours(variant: str, family: int = 4) -> list[str]:
    return [line for line in save(variant, family=family).splitlines() if f"{PREFIX}-" in line]


def force_clean(variant: str, family: int = 4) -> None:
    """Last resort if flush-all itself failed: remove our prefix's objects one by one."""
    ipt = tool(variant, family)
    lines = save(variant, family=family).splitlines()
    for line in lines:
        words = shlex.split(line)
        foreign = words[:1] == ["-A"] and not words[1].startswith(f"{PREFIX}-")
        if foreign and re.search(rf"-j {PREFIX}-\S+$", line):
            sh(ipt, "-w", "-t", "nat", "-D", *words[1:], check=False)
    chains = [ln[1:].split()[0] for ln in lines if ln.startswith(f":{PREFIX}-")]
    for chain in chains:
        sh(ipt, "-w", "-t", "nat", "-F", chain, check=False)
    for chain in chains:
        sh(ipt, "-w", "-t", "nat", "-X", chain, check=False)
