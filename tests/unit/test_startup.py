"""What a deploy's `natports` processes import: none of the heavy modules they do not use.

Dokku runs several natports processes per deploy (stage, docker-args per process type
and per container, apply, post-deploy), and each pays its imports before doing anything.
These run a fresh interpreter (imports are per process) against a state dir in tmp_path:
no kernel, no Docker. They check which modules load, never how long anything takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Modules a command loads only when it uses them: the Docker SDK (and its HTTP stack)
# for container discovery, pyroute2 for conntrack, the kernel backends and the proxy
# daemon for their own backend, tarfile for image deploys, tomllib for a config file.
# Small standard modules a dependency may well import itself (subprocess, logging,
# ctypes) are not listed: a click release must not turn this red; natports' own use
# of them is covered by its modules below (libnft is the one that loads ctypes).
HEAVY = (
    "docker",
    "requests",
    "urllib3",
    "pyroute2",
    "tarfile",
    "tomllib",
    "hypothesis",
    "matplotlib",
    "natports.agent",
    "natports.backends.iptables",
    "natports.backends.libnft",
    "natports.backends.nft_netlink",
    "natports.backends.nftables",
    "natports.backends.proxy",
    "natports.proxy.control",
    "natports.proxy.daemon",
)

# Runs the CLI as the console script does, then prints every module it loaded.
PROBE = """
import sys
sys.argv = ["natports", *sys.argv[1:]]
from natports.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print("--modules--")
print("\\n".join(sorted(sys.modules)))
sys.exit(code)
"""


def loaded(*args: str, stdin: bytes = b"") -> tuple[list[str], str]:
    """Modules a fresh `natports ARGS` process loaded, and what it printed before."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATPORTS_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        input=stdin,
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    printed, _, modules = out.partition("--modules--\n")
    return modules.split(), printed


def heavy_in(modules: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """The HEAVY modules (or their submodules) among `modules`, bar `allowed`."""
    return sorted(
        m for m in modules for h in HEAVY if h not in allowed and (m == h or m.startswith(h + "."))
    )


@pytest.fixture
def state(tmp_path: Path) -> list[str]:
    """Options for a host with a config file absent and nothing routed yet."""
    (tmp_path / "dokku" / "shop").mkdir(parents=True)
    return [
        "--state-dir",
        str(tmp_path / "state"),
        "--dokku-root",
        str(tmp_path / "dokku"),
        "--config",
        str(tmp_path / "natports.toml"),
        "--nft-table",
        "natports_test",
    ]


def test_importing_the_cli_loads_none_of_them() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, natports.cli; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    modules = proc.stdout.split()
    assert "natports.dokku_cli" in modules  # the probe sees what the CLI imports
    assert heavy_in(modules) == []


def test_help_loads_none_of_them(state: list[str]) -> None:
    modules, printed = loaded(*state, "--help")
    assert "Usage: natports" in printed
    assert heavy_in(modules) == []


def test_a_deploys_stage_and_early_apply_load_none_of_them(state: list[str]) -> None:
    """pre-build's stage (PORTS checked against other apps and host listeners), then
    proxy-build-config's apply during that build, which leaves routing to post-deploy."""
    build = str(os.getpid())
    modules, printed = loaded(
        *state, "dokku", "stage", "shop", "--build", build, stdin=b"7000:7000\n7001:7001/udp\n"
    )
    assert "PORTS: 2 mapping(s) checked" in printed
    assert heavy_in(modules) == []
    modules, printed = loaded(*state, "dokku", "apply", "shop", "--build", build)
    assert printed == ""  # the build is in progress: nothing routed now
    assert heavy_in(modules) == []


def test_docker_args_loads_only_the_chosen_backend(state: list[str]) -> None:
    """The proxy backend here (no kernel): its client loads, no other backend, no daemon."""
    build = str(os.getpid())
    loaded(*state, "dokku", "stage", "shop", "--build", build, stdin=b"7000:7000\n")
    modules, printed = loaded(
        *state, "--backend", "proxy", "dokku", "docker-args", "shop", "web", "--build", build
    )
    assert printed.split() == ["-p", "127.0.0.1::7000"]
    assert "natports.backends.proxy" in modules
    client = ("natports.backends.proxy", "natports.proxy.control", "logging")
    assert heavy_in(modules, allowed=client) == []


def test_a_config_file_still_loads_tomllib(state: list[str], tmp_path: Path) -> None:
    """The lazy import is still there when needed: a config file is parsed."""
    (tmp_path / "natports.toml").write_text('[backend]\ndefault = "proxy"\n')
    modules, _ = loaded(*state, "dokku", "apply", "shop", "--build", str(os.getpid()))
    assert "tomllib" in modules
