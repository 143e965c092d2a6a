"""Replays Dokku 0.38's docker-local deploy with real containers and the real trigger files.

What Dokku does (plugins/scheduler-docker-local: scheduler-deploy,
bin/scheduler-deploy-process-container, core-post-deploy), step by step:
  post-extract APP TMP_WORK_DIR REV
  per process type and index: docker-args-process-deploy APP SOURCE TAG PROC INDEX,
      create + start APP.PROC.N.upcoming-RANDOM (Dokku's labels), check it,
      then write CONTAINER.PROC.N and IP.PROC.N (PORT.web.N for web)
  files of indexes beyond the new scale are removed
  core-post-deploy: old APP.PROC.N -> APP.PROC.N.<epoch>, new -> APP.PROC.N
      (nginx-vhosts fires proxy-build-config here)
  post-deploy APP "" "" TAG
  SIGTERM to the old containers (the harness lets the test choose when)
Triggers run as the `dokku` user, with Dokku's argument order, reaching root only
through the sudo-whitelisted helper installed by scripts/install-dokku-plugin.
`plugn` is the one stand-in: it answers the three Dokku triggers the plugin asks
(scheduler-detect, ports-get, git-get-property) from files the test writes.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.infra import NFT_TABLE, TEST_IMAGE, sh

REPO = Path(__file__).resolve().parents[2]
USER = "dokku"

PLUGN = """#!/usr/bin/env bash
# Stand-in for Dokku's plugn: answers the triggers natports' hooks ask.
set -euo pipefail
[[ "$1" == trigger ]] || exit 1
case "$2" in
  scheduler-detect) cat "$HARNESS/scheduler/$3" 2>/dev/null || echo docker-local ;;
  ports-get) cat "$HARNESS/ports/$3" 2>/dev/null || true ;;
  git-get-property) cat "$HARNESS/source-image/$3" 2>/dev/null || true ;;
  *) exit 0 ;;
esac
"""


@dataclass
class DeployResult:
    ok: bool
    output: str
    new: dict[str, list[str]] = field(default_factory=dict)  # proc -> container ids
    old: list[str] = field(default_factory=list)  # to be retired


PRIVATE_PORTS = ("5000", "5025", "5026", "5027", "5030", "5999")


class DokkuHost:
    """A Dokku host's moving parts: the dokku user, DOKKU_ROOT, the installed plugin."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="natports-dokku-"))
        self.base.chmod(0o755)
        self.created_user = False
        self.dokku_root = self.base / "home"
        self.state = self.base / "state"
        self.config = self.base / "natports.toml"
        self.plugin = self.base / "plugin"
        self.bin = self.base / "bin"
        self.helper = Path(f"/usr/local/sbin/natports-dokku-test-{os.getpid()}")
        self.sudoers = Path(f"/etc/sudoers.d/natports-test-{os.getpid()}")
        self.containers: list[str] = []

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self) -> None:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            sh(
                "useradd",
                "--system",
                "--user-group",
                "--shell",
                "/bin/bash",
                "--home-dir",
                str(self.dokku_root),
                USER,
            )
            self.created_user = True
        self.dokku_root.mkdir()
        shutil.chown(self.dokku_root, USER, USER)
        for sub in ("ports", "scheduler", "source-image"):
            (self.base / sub).mkdir()
        # plugin:install copies the plugin: a copy the dokku user can read
        shutil.copytree(REPO / "hooks", self.plugin)
        self.bin.mkdir()
        plugn = self.bin / "plugn"
        plugn.write_text(PLUGN)
        plugn.chmod(0o755)
        self._installer("install-dokku-plugin")

    def install_again(self) -> None:
        """An upgrade: the documented install command, run once more."""
        self._installer("install-dokku-plugin")

    def _installer(self, script: str, *args: str) -> None:
        env = {
            **os.environ,
            "NATPORTS_VENV": sys.prefix,
            "NATPORTS_SKIP_PIP": "1",
            "NATPORTS_HELPER": str(self.helper),
            "NATPORTS_SUDOERS": str(self.sudoers),
            "NATPORTS_STATE_DIR": str(self.state),
            "NATPORTS_CONFIG": str(self.config),
            "DOKKU_ROOT": str(self.dokku_root),
            "NATPORTS_NFT_TABLE": NFT_TABLE,
            "NATPORTS_SYSTEMD": "no",
            "NATPORTS_PLUGIN_INSTALL": "no",
        }
        subprocess.run(
            [str(REPO / "scripts" / script), *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )

    def remove(self) -> None:
        for cid in self.containers:
            sh("docker", "rm", "-f", cid, check=False)
        try:
            self._installer("uninstall-dokku-plugin", "--purge")
        finally:
            self.helper.unlink(missing_ok=True)
            self.sudoers.unlink(missing_ok=True)
            if self.created_user:
                sh("userdel", USER, check=False)
            shutil.rmtree(self.base, ignore_errors=True)

    # -- Dokku's moving parts ------------------------------------------------------------------

    def trigger(
        self, name: str, *args: str, stdin: str = "", helper: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one of the plugin's trigger files as Dokku does: as dokku, Dokku's env."""
        env = [
            f"PATH={self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f"DOKKU_ROOT={self.dokku_root}",
            f"HARNESS={self.base}",
            f"NATPORTS_HELPER={helper or self.helper}",
            "DOKKU_NOT_IMPLEMENTED_EXIT=10",
        ]
        return subprocess.run(
            ["runuser", "-u", USER, "--", "env", "-i", *env, str(self.plugin / name), *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.base,
        )

    def set_ports_map(self, app: str, *entries: str) -> None:
        """What `dokku ports:set APP ...` stores (and `ports-get` prints)."""
        (self.base / "ports" / app).write_text("".join(f"{e}\n" for e in entries))

    def app_dir(self, app: str) -> Path:
        path = self.dokku_root / app
        if not path.exists():
            path.mkdir()
            shutil.chown(path, USER, USER)
        return path

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        shutil.chown(path, USER, USER)

    def current(self, app: str) -> dict[str, list[str]]:
        """proc -> container ids, from the CONTAINER.PROC.N files."""
        found: dict[str, list[tuple[int, str]]] = {}
        for f in self.app_dir(app).glob("CONTAINER.*.*"):
            _, proc, index = f.name.split(".")
            found.setdefault(proc, []).append((int(index), f.read_text().strip()))
        return {p: [cid for _, cid in sorted(v)] for p, v in found.items()}

    def deploy(
        self,
        app: str,
        tag: str,
        ports_file: str | None,
        scale: dict[str, int] | None = None,
        extract: bool = True,
    ) -> DeployResult:
        """One deploy (extract=False: ps:restart, ps:scale: no new source, same sequence)."""
        scale = scale or {"web": 1}
        output: list[str] = []
        if extract:
            work = self.base / f"tmp-{app}-{random.randrange(1 << 30)}"
            work.mkdir()
            shutil.chown(work, USER, USER)
            if ports_file is not None:
                self._write(work / "PORTS", ports_file)
            done = self.trigger("post-extract", app, str(work), "deadbeef")
            shutil.rmtree(work)
            output.append(done.stdout + done.stderr)
            if done.returncode != 0:
                return DeployResult(False, "".join(output))
        app_dir = self.app_dir(app)
        old_files = self.current(app)
        result = DeployResult(True, "")
        for proc, count in scale.items():
            ids = []
            for index in range(1, count + 1):
                args = self.trigger(
                    "docker-args-process-deploy",
                    app,
                    "dockerfile",
                    f"dokku/{app}:{tag}",
                    proc,
                    str(index),
                )
                assert args.returncode == 0, args
                cid = self._start(app, proc, index, f"{tag}.{proc}.{index}", args.stdout.split())
                ids.append(cid)
                previous = old_files.get(proc, [])
                if index <= len(previous):
                    result.old.append(previous[index - 1])
                self._write(app_dir / f"CONTAINER.{proc}.{index}", cid + "\n")
                ip = sh(
                    "docker", "inspect", "-f", "{{.NetworkSettings.Networks.bridge.IPAddress}}", cid
                ).stdout.strip()
                self._write(app_dir / f"IP.{proc}.{index}", ip + "\n")
                if proc == "web":
                    self._write(app_dir / f"PORT.{proc}.{index}", "5000\n")
            result.new[proc] = ids
            for index, cid in enumerate(old_files.get(proc, []), start=1):
                if index > count:  # scaled down: Dokku deletes these files
                    result.old.append(cid)
                    for kind in ("CONTAINER", "IP", "PORT"):
                        (app_dir / f"{kind}.{proc}.{index}").unlink(missing_ok=True)
        # core-post-deploy
        epoch = str(int(time.time()))
        for proc, ids in result.new.items():
            for index, cid in enumerate(ids, start=1):
                final = f"{app}.{proc}.{index}"
                if sh("docker", "inspect", final, check=False).returncode == 0:
                    sh("docker", "rename", final, f"{final}.{epoch}")
                sh("docker", "rename", cid, final)
        pbc = self.trigger("proxy-build-config", app)
        output.append(pbc.stdout + pbc.stderr)
        done = self.trigger("post-deploy", app, "", "", tag)
        output.append(done.stdout + done.stderr)
        result.ok = done.returncode == 0
        result.output = "".join(output)
        return result

    def _start(self, app: str, proc: str, index: int, tag: str, args: Sequence[str]) -> str:
        ports = [a.split("::")[1].split("/")[0] for a in args if a.startswith("127.0.0.1::")]
        if not ports:
            # natports' DOCKER-USER accept in place: no -p; listen on every port the tests map
            ports = list(PRIVATE_PORTS)
        publish = [a for a in args if a != "-p"]
        argv = [
            "docker",
            "run",
            "-d",
            "--pull",
            "never",
            "--name",
            f"{app}.{proc}.{index}.upcoming-{random.randrange(32768)}",
            "--label",
            f"com.dokku.app-name={app}",
            "--label",
            f"com.dokku.process-type={proc}",
            "--label",
            f"com.dokku.dyno={proc}.{index}",
            "--label",
            "com.dokku.container-type=deploy",
        ]
        for p in publish:
            argv += ["-p", p]
        cid = sh(*argv, TEST_IMAGE, tag, *ports).stdout.strip()
        self.containers.append(cid)
        return cid

    def retire(self, ids: Sequence[str]) -> None:
        """Dokku's retirement: SIGTERM (echod exits at once, like an app that drained)."""
        for cid in ids:
            sh("docker", "kill", "--signal", "TERM", cid, check=False)
        for cid in ids:
            sh("docker", "wait", cid, check=False)

    def destroy_containers(self, app: str) -> None:
        for ids in self.current(app).values():
            for cid in ids:
                sh("docker", "rm", "-f", cid, check=False)

    def table(self) -> str:
        return sh("nft", "list", "table", "inet", NFT_TABLE, check=False).stdout
