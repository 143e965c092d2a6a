"""The one way natports runs a host tool (nft, iptables-restore, ...): with a timeout.

Every mutation holds the store's lock while its tool runs; a tool that hangs (a
stuck xtables lock holder, a wedged netlink socket) must not hold that lock forever.
It is killed after `timeout` seconds and reported as a runtime failure; the kernel
applies a batch whole or not at all, so a killed `nft -f` changed nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from .errors import NatportsError

DEFAULT_TIMEOUT = 60.0  # generous: a full apply of 30,000 routes takes a few seconds


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class ToolMissing(NatportsError):
    """The tool is not installed (or not on the search path)."""


def run(
    argv: list[str],
    stdin: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    path: str | None = None,
    hint: str | None = None,
) -> Result:
    """Run `argv` (argv[0] looked up on `path`, default $PATH); never raises for a
    non-zero exit, which the caller interprets. Raises ToolMissing or NatportsError
    (timeout, cannot execute)."""
    binary = shutil.which(argv[0], path=path)
    if binary is None:
        raise ToolMissing(f"{argv[0]} not found", hint)
    try:
        proc = subprocess.run(
            [binary, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NatportsError(
            f"{argv[0]} did not finish within {timeout:g} s and was stopped",
            "nothing was changed; is another program holding the kernel's rules busy?",
        ) from None
    except OSError as exc:
        raise NatportsError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    return Result(proc.returncode, proc.stdout, proc.stderr)


def probe(*argv: str, timeout: float = 10.0) -> Result | None:
    """For read-only probes: None when the tool is missing, hangs or cannot run."""
    try:
        return run(list(argv), timeout=timeout)
    except NatportsError:
        return None
