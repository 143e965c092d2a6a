"""scripts/dokku-root.sh: the installer finds DOKKU_ROOT where Dokku itself does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dokku-root.sh"


def dokku_root(env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-c", f'source "{SCRIPT}"; dokku_root_default; printf %s "$DOKKU_ROOT"'],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_an_explicit_dokku_root_wins(tmp_path: Path) -> None:
    defaults = tmp_path / "dokku"
    defaults.write_text("export DOKKU_ROOT=/srv/dokku\n")
    env = {"DOKKU_ROOT": "/data/dokku", "NATPORTS_DOKKU_DEFAULTS": str(defaults)}
    assert dokku_root(env) == "/data/dokku"


def test_etc_default_dokku_is_read(tmp_path: Path) -> None:
    defaults = tmp_path / "dokku"
    defaults.write_text("# Dokku's defaults\nexport DOKKU_ROOT=/srv/dokku\nOTHER=1\n")
    assert dokku_root({"NATPORTS_DOKKU_DEFAULTS": str(defaults)}) == "/srv/dokku"


def test_else_the_dokku_users_home_else_home_dokku(tmp_path: Path) -> None:
    env = {"NATPORTS_DOKKU_DEFAULTS": str(tmp_path / "missing")}
    assert dokku_root({**env, "NATPORTS_DOKKU_USER": "root"}) == "/root"
    assert dokku_root({**env, "NATPORTS_DOKKU_USER": "no-such-user-x"}) == "/home/dokku"
