"""The one runner of host tools: a hung tool is stopped, a missing one is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from natports.errors import NatportsError
from natports.runner import ToolMissing, probe, run


def tool(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(tmp_path)


def test_output_exit_status_and_stdin(tmp_path: Path) -> None:
    where = tool(tmp_path, "fake-nft", 'cat; echo "to stderr" >&2; exit 3')
    result = run(["fake-nft", "-f", "-"], stdin="add table inet x\n", path=where)
    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        "add table inet x\n",
        "to stderr\n",
    )


def test_a_hung_tool_is_stopped_and_reported(tmp_path: Path) -> None:
    where = tool(tmp_path, "fake-nft", "sleep 30")
    with pytest.raises(NatportsError, match=r"fake-nft did not finish within 0.3 s"):
        run(["fake-nft"], timeout=0.3, path=where)


def test_a_missing_tool_is_named_with_the_hint(tmp_path: Path) -> None:
    with pytest.raises(ToolMissing) as caught:
        run(["nft"], path=str(tmp_path), hint="apt-get install nftables")
    assert caught.value.message == "nft not found"
    assert caught.value.hint == "apt-get install nftables"


def test_probes_never_raise(tmp_path: Path) -> None:
    assert probe("no-such-tool-natports") is None
