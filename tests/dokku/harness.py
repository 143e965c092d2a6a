"""A Dokku 0.38 host's moving parts, following Dokku's source, with real containers.

Every behaviour below is Dokku v0.38.27's; the comment next to it names the file and line
(`git -C /work/.mirror/dokku+dokku/repo show v0.38.27:PATH`). What is *not* Dokku's:
the builder does not build an image (every release runs the test image with its tag),
and the process types of one deploy run one after another (Dokku runs the non-web ones
in parallel, scheduler-deploy:79).

- `plugn` is a stand-in for the real one: `plugn trigger NAME ARGS` runs the NAME file of
  every enabled plugin in name order, all reading the same stdin, stdout concatenated, and
  stops at the first one that fails with its exit code.
- Dokku's own plugins are small stand-ins installed as enabled plugins beside natports:
  `ports` (the map, the detected map, ports-get's fallback, ports-clear), `nginx-vhosts`
  (the proxy type and its early proxy-build-config) and `scheduler` (scheduler-detect).
- natports is installed the documented way: scripts/install-dokku-plugin, which calls a
  `dokku` stand-in's plugin:install (a git clone into the plugin path, as Dokku does);
  the triggers find the helper through what the installer wrote, nothing is injected.
- Triggers run as the `dokku` user with DOKKU_PID set to a process that lives as long as
  the Dokku command it stands for (`dokku`:58 exports it once per command).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.infra import NFT_TABLE, TEST_IMAGE, sh

REPO = Path(__file__).resolve().parents[2]
USER = "dokku"
# natports' runtime dependencies and theirs, copied into the harness's venv
RUNTIME_PACKAGES = (
    "click",
    "docker",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset_normalizer",
    "pyroute2",
)

PLUGN = r"""#!/usr/bin/env bash
# Stand-in for plugn: `plugn trigger NAME ARGS...` runs NAME of every enabled plugin in
# name order with the same stdin, and stops at the first failure with its exit code.
set -uo pipefail
[[ "${1:-}" == trigger ]] || exit 1
name="$2"
shift 2
for plugin in $(LC_ALL=C ls "$PLUGIN_ENABLED_PATH"); do
  hook="$PLUGIN_ENABLED_PATH/$plugin/$name"
  [[ -x "$hook" ]] || continue
  "$hook" "$@" || exit "$?"
done
exit 0
"""

DOKKU = r"""#!/usr/bin/env bash
# Stand-in for the `dokku` commands scripts/install-dokku-plugin and uninstall use
# (Dokku v0.38.27 plugins/plugin: plugin:install clones a git URL into the plugin path and
# fires install, plugin:update pulls and fires update, plugin:uninstall fires uninstall).
set -euo pipefail
case "$1" in
  plugin:list)
    LC_ALL=C ls "$PLUGIN_ENABLED_PATH"
    ;;
  plugin:install)
    url="$2" name="$4"
    git clone -q "$url" "$PLUGIN_AVAILABLE_PATH/$name"
    ln -s "$PLUGIN_AVAILABLE_PATH/$name" "$PLUGIN_ENABLED_PATH/$name"
    plugn trigger install
    ;;
  plugin:update)
    git -C "$PLUGIN_AVAILABLE_PATH/$2" pull -q
    plugn trigger update
    ;;
  plugin:uninstall)
    plugn trigger uninstall "$2"
    rm -rf "$PLUGIN_ENABLED_PATH/$2" "$PLUGIN_AVAILABLE_PATH/$2"
    ;;
  *) exit 1 ;;
esac
"""

SYSTEMCTL = r"""#!/usr/bin/env bash
# Stand-in for systemctl (no systemd here), for the units the installer writes into
# NATPORTS_SYSTEMD_DIR: `restart UNIT` runs its ExecStart= in the background, `disable
# --now UNIT` stops it and returns once it is gone. Each call is logged in `calls` with
# whether natports' test table existed at that moment.
set -euo pipefail
dir="$NATPORTS_SYSTEMD_DIR"
table=no
if nft list table inet @TABLE@ >/dev/null 2>&1; then table=yes; fi
echo "$* table=$table" >>"$dir/calls"
stop() {
  local pid
  [[ -f "$dir/$1.pid" ]] || return 0
  pid="$(<"$dir/$1.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 200); do  # gone, or a zombie nobody reaps here
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo gone)"
    [[ "$state" == gone || "$state" == Z ]] && break
    sleep 0.05
  done
  rm -f "$dir/$1.pid"
}
case "$1" in
  restart)
    stop "$2"
    cmd="$(sed -n 's/^ExecStart=//p' "$dir/$2")"
    eval "exec $cmd" </dev/null >>"$dir/$2.log" 2>&1 &
    echo "$!" >"$dir/$2.pid"
    ;;
  disable)
    if [[ "$2" == --now ]]; then stop "$3"; fi
    ;;
esac
""".replace("@TABLE@", NFT_TABLE)

# Dokku's ports plugin, as far as natports meets it (plugins/ports/triggers.go).
PORTS_PLUGIN = {
    # :50-58: the configured map, else the detected one, which is never empty
    # (functions.go:104-126: http:80:5000 when nothing was detected)
    "ports-get": r"""#!/usr/bin/env bash
d="$DOKKU_LIB_ROOT/config/ports/$1"
if [[ -s "$d/map" ]]; then cat "$d/map"
elif [[ -s "$d/map-detected" ]]; then cat "$d/map-detected"
else echo "http:80:5000"; fi
""",
    # :102-115: any other key prints the property file as it is (fmt.Println adds a newline)
    "ports-get-property": r"""#!/usr/bin/env bash
[[ "$2" == map || "$2" == map-detected ]] || exit 0
cat "$DOKKU_LIB_ROOT/config/ports/$1/$2" 2>/dev/null || true
echo
""",
    # :118-132: one entry per line, sorted
    "ports-set-detected": r"""#!/usr/bin/env bash
mkdir -p "$DOKKU_LIB_ROOT/config/ports/$1"
printf '%s\n' $2 | LC_ALL=C sort >"$DOKKU_LIB_ROOT/config/ports/$1/map-detected"
""",
    # :32-35 and functions.go:25-31: both maps go, and no post-proxy-ports-update fires
    "ports-clear": r"""#!/usr/bin/env bash
rm -f "$DOKKU_LIB_ROOT/config/ports/$1/map" "$DOKKU_LIB_ROOT/config/ports/$1/map-detected"
""",
}
NGINX_PLUGIN = {
    "proxy-type": r"""#!/usr/bin/env bash
cat "$DOKKU_LIB_ROOT/config/proxy/$1" 2>/dev/null || echo nginx
""",
    # plugins/nginx-vhosts/scheduler-post-deploy-process:11-21: after the web containers
    "scheduler-post-deploy-process": r"""#!/usr/bin/env bash
[[ "$2" == web ]] || exit 0
[[ "$(plugn trigger proxy-type "$1")" == nginx ]] || exit 0
plugn trigger proxy-build-config "$1"
""",
    # plugins/nginx-vhosts/core-post-deploy:12-17 (before scheduler-docker-local's rename)
    "core-post-deploy": r"""#!/usr/bin/env bash
[[ "$(plugn trigger proxy-type "$1")" == nginx ]] || exit 0
plugn trigger proxy-build-config "$1"
""",
}
SCHEDULER_PLUGIN = {
    "scheduler-detect": r"""#!/usr/bin/env bash
cat "$DOKKU_LIB_ROOT/config/scheduler/$1" 2>/dev/null || echo docker-local
""",
}


@dataclass
class DeployResult:
    ok: bool
    output: str
    new: dict[str, list[str]] = field(default_factory=dict)  # proc -> container ids
    old: list[str] = field(default_factory=list)  # to be retired
    created: int = 0  # containers created by this deploy
    args: dict[str, list[str]] = field(default_factory=dict)  # proc -> its docker args


PRIVATE_PORTS = ("5000", "5025", "5026", "5027", "5030", "5999")


class DokkuHost:
    """The dokku user, DOKKU_ROOT, the plugin path with natports installed by its installer."""

    def __init__(self, systemd: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="natports-dokku-"))
        # systemd: the installer writes its units into `units` and starts the agent
        # through the systemctl stand-in (it runs as long as its unit is enabled)
        self.systemd = systemd
        self.units = self.base / "systemd"
        self.base.chmod(0o755)
        self.created_user = False
        self.dokku_root = self.base / "home"
        self.lib_root = self.base / "lib"
        self.plugins = self.base / "plugins"
        self.state = self.base / "state"
        self.config = self.base / "natports.toml"
        self.bin = self.base / "bin"
        self.helper = Path(f"/usr/local/sbin/natports-dokku-test-{os.getpid()}")
        self.sudoers = Path(f"/etc/sudoers.d/natports-test-{os.getpid()}")
        self.containers: list[str] = []
        self.proxy = "nginx"
        self.build_dirs: dict[str, str] = {}
        self.listen: dict[str, list[str]] = {}  # app -> the ports its containers serve
        self.between_build_and_deploy: Callable[[], None] | None = None
        self.before_post_deploy: Callable[[], None] | None = None
        self.table_at_stop = ""

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self) -> None:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            sh("useradd", "--system", "--user-group", "--shell", "/bin/bash", USER)
            self.created_user = True
        for path in (self.dokku_root, self.lib_root, self.plugins / "available"):
            path.mkdir(parents=True)
        (self.plugins / "enabled").mkdir()
        shutil.chown(self.dokku_root, USER, USER)
        shutil.chown(self.lib_root, USER, USER)
        self.bin.mkdir()
        self.units.mkdir()
        for name, text in (("plugn", PLUGN), ("dokku", DOKKU), ("systemctl", SYSTEMCTL)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        for name, triggers in (
            ("nginx-vhosts", NGINX_PLUGIN),
            ("ports", PORTS_PLUGIN),
            ("scheduler", SCHEDULER_PLUGIN),
        ):
            folder = self.plugins / "available" / name
            folder.mkdir()
            for trigger, text in triggers.items():
                (folder / trigger).write_text(text)
                (folder / trigger).chmod(0o755)
            (self.plugins / "enabled" / name).symlink_to(folder)
        self._venv()
        self._installer("install-dokku-plugin")

    def install_again(self) -> None:
        """An upgrade: the documented install command, run once more (plugin:update)."""
        self._installer("install-dokku-plugin")

    def _env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "DOKKU_ROOT": str(self.dokku_root),
            "DOKKU_LIB_ROOT": str(self.lib_root),
            "PLUGIN_PATH": str(self.plugins),
            "PLUGIN_AVAILABLE_PATH": str(self.plugins / "available"),
            "PLUGIN_ENABLED_PATH": str(self.plugins / "enabled"),
            "PLUGIN_CORE_AVAILABLE_PATH": str(self.plugins / "available"),
            "DOKKU_NOT_IMPLEMENTED_EXIT": "10",
        }

    def _venv(self) -> Path:
        """A venv the dokku user can run (read-source runs as dokku, not through sudo).

        The test venv's interpreter or the checkout may live where dokku cannot go
        (/root/.pyenv, a clone under /root), so this one is made from the system python
        with copies of natports and its runtime dependencies, as the installer's pip would.
        """
        venv = self.base / "venv"
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        sh(python, "-m", "venv", "--without-pip", str(venv))
        query = "import sysconfig; print(sysconfig.get_path('purelib'))"
        site = Path(sh(str(venv / "bin" / "python"), "-c", query).stdout.strip())
        ours = Path(sh(sys.executable, "-c", query).stdout.strip())
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "natports", site / "natports", ignore=skip)
        for name in RUNTIME_PACKAGES:
            shutil.copytree(ours / name, site / name, ignore=skip)
        script = venv / "bin" / "natports"
        script.write_text(
            f"#!{venv}/bin/python\nimport sys\nfrom natports.cli import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)
        return venv

    def uninstall(self, *args: str) -> None:
        """The documented `uninstall-dokku-plugin [--purge]`, as an operator runs it: the
        test's paths, but not NATPORTS_SKIP_PIP, so it removes the venv and the plugin's
        git source too (both under `base`)."""
        self._installer("uninstall-dokku-plugin", *args, skip_pip=False)

    def _installer(self, script: str, *args: str, skip_pip: bool = True) -> None:
        env = {
            **os.environ,
            **self._env(),
            "NATPORTS_VENV": str(self.base / "venv"),
            "NATPORTS_SKIP_PIP": "1" if skip_pip else "",
            "NATPORTS_HELPER": str(self.helper),
            "NATPORTS_SUDOERS": str(self.sudoers),
            "NATPORTS_STATE_DIR": str(self.state),
            "NATPORTS_CONFIG": str(self.config),
            "NATPORTS_NFT_TABLE": NFT_TABLE,
            "NATPORTS_SYSTEMD": "yes" if self.systemd else "no",
            "NATPORTS_SYSTEMD_DIR": str(self.units),  # never a real installation's units
            "NATPORTS_PLUGIN_INSTALL": "yes",
            "NATPORTS_PLUGIN_SRC": str(self.base / "plugin-src"),
        }
        done = subprocess.run(
            [str(REPO / "scripts" / script), *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done

    def agent_pid(self) -> int | None:
        """The agent natports-watch.service runs (through the systemctl stand-in)."""
        path = self.units / "natports-watch.service.pid"
        return int(path.read_text()) if path.exists() else None

    def remove(self) -> None:
        for cid in self.containers:
            sh("docker", "rm", "-f", cid, check=False)
        try:
            self._installer("uninstall-dokku-plugin", "--purge")
        finally:
            for pid_file in self.units.glob("*.pid"):  # a unit the uninstall did not stop
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), 9)
            self.helper.unlink(missing_ok=True)
            self.sudoers.unlink(missing_ok=True)
            if self.created_user:
                sh("userdel", USER, check=False)
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def plugin(self) -> Path:
        """natports as plugin:install left it."""
        return self.plugins / "available" / "natports"

    # -- Dokku commands ---------------------------------------------------------------------

    @contextlib.contextmanager
    def command(self) -> Iterator[str]:
        """One `dokku ...` invocation: DOKKU_PID is a process that lives as long as it."""
        proc = subprocess.Popen(["sleep", "600"])
        try:
            yield str(proc.pid)
        finally:
            proc.kill()
            proc.wait()

    def trigger(
        self, name: str, *args: str, stdin: str = "", pid: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`plugn trigger NAME ARGS` as Dokku runs it: as dokku, every enabled plugin."""
        with contextlib.ExitStack() as stack:
            dokku_pid = pid or stack.enter_context(self.command())
            env = [f"{k}={v}" for k, v in self._env().items()] + [f"DOKKU_PID={dokku_pid}"]
            return subprocess.run(
                ["runuser", "-u", USER, "--", "env", "-i", *env, "plugn", "trigger", name, *args],
                input=stdin,
                capture_output=True,
                text=True,
                cwd=self.base,
            )

    def subcommand(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`dokku natports:NAME ARGS` (Dokku runs subcommands/NAME with the command first)."""
        env = [f"{k}={v}" for k, v in self._env().items()]
        script = str(self.plugin / "subcommands" / name)
        return subprocess.run(
            ["runuser", "-u", USER, "--", "env", "-i", *env, script, f"natports:{name}", *args],
            capture_output=True,
            text=True,
            cwd=self.base,
        )

    def ports_dir(self, app: str) -> Path:
        path = self.lib_root / "config" / "ports" / app
        path.mkdir(parents=True, exist_ok=True)
        return path

    def set_ports_map(self, app: str, *entries: str) -> subprocess.CompletedProcess[str]:
        """`dokku ports:set APP ...`: writes the map, then post-proxy-ports-update
        (plugins/ports/subcommands.go:120-130)."""
        (self.ports_dir(app) / "map").write_text("".join(f"{e}\n" for e in entries))
        return self.trigger("post-proxy-ports-update", app, "set")

    def ports_clear(self, app: str) -> subprocess.CompletedProcess[str]:
        """What domains:enable/disable and proxy:enable/disable do with nginx
        (plugins/nginx-vhosts/pre-disable-vhost:31, pre-enable-vhost:34): no update trigger."""
        return self.trigger("ports-clear", app)

    def ports_get(self, app: str) -> list[str]:
        return self.trigger("ports-get", app).stdout.split()

    def set_scheduler(self, app: str, scheduler: str) -> None:
        folder = self.lib_root / "config" / "scheduler"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / app).write_text(scheduler + "\n")

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

    def git_push(
        self,
        app: str,
        tag: str,
        files: dict[str, str | Callable[[Path], None]],
        scale: dict[str, int] | None = None,
        build_fails: bool = False,
    ) -> DeployResult:
        """`git push`: extract, build, release and deploy in one Dokku command.

        plugins/git/functions: git_build_app_repo (:9-30) checks the source out into a
        work dir, git_trigger_build (:32-57) runs core-post-extract (checked) and
        post-extract (not checked: its failure is ignored, and git_receive_app runs the
        whole build from `||`, :144), then dokku_receive -> dokku_build (builder-build,
        which runs pre-build first) -> release-and-deploy (common/functions:622-716).
        `files` maps a name to its text, or to a function that makes it (symlinks, FIFOs).
        """
        with self.command() as pid:
            work = Path(tempfile.mkdtemp(prefix=f"dokku-{pid}-git_build_app_repo.", dir="/tmp"))
            try:
                work.chmod(0o755)
                for name, content in files.items():
                    path = work / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if callable(content):
                        content(path)
                    else:
                        path.write_text(content)
                for path in [work, *work.rglob("*")]:
                    os.lchown(path, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
                return self._build_and_deploy(app, tag, work, pid, scale, build_fails)
            finally:
                shutil.rmtree(work, ignore_errors=True)

    def _build_and_deploy(
        self,
        app: str,
        tag: str,
        work: Path,
        pid: str,
        scale: dict[str, int] | None,
        build_fails: bool,
    ) -> DeployResult:
        output: list[str] = []
        build_dir = self.build_dirs.get(app)
        if build_dir:  # builder core-post-extract (plugins/builder/triggers.go:69-101)
            keep = Path(tempfile.mkdtemp(dir="/tmp"))
            shutil.copytree(work / build_dir, keep, dirs_exist_ok=True, symlinks=True)
            for entry in work.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            shutil.copytree(keep, work, dirs_exist_ok=True, symlinks=True)
            shutil.rmtree(keep)
        extract = self.trigger("post-extract", app, str(work), "deadbeef", pid=pid)
        output.append(extract.stdout + extract.stderr)  # exit code ignored (git/functions:40)
        # builder-build, e.g. plugins/builder-dockerfile/builder-build:33 (top level, set -e)
        builder = "dockerfile" if (work / "Dockerfile").exists() else "herokuish"
        pre = self.trigger("pre-build", builder, app, str(work), pid=pid)
        output.append(pre.stdout + pre.stderr)
        if pre.returncode != 0 or build_fails:
            output.append(" !     App build failed\n")  # common/functions:640
            return DeployResult(False, "".join(output))
        self.trigger("ports-set-detected", app, _detected_ports(work), pid=pid)
        if self.between_build_and_deploy is not None:
            self.between_build_and_deploy()
        result = self.release_and_deploy(app, tag, scale, pid=pid)
        result.output = "".join(output) + result.output
        return result

    def git_from_image(self, app: str, tag: str, image: str) -> DeployResult:
        """git:from-image: a work dir with only the Dockerfile Dokku writes
        (plugins/git/git-from-image:24-26), then the same build as a push."""
        label = f'LABEL com.dokku.docker-image-labeler/alternate-tags=[\\"{image}\\"]'
        return self.git_push(app, tag, {"Dockerfile": f"FROM {image}\n{label}\n"})

    def release_and_deploy(
        self, app: str, tag: str, scale: dict[str, int] | None = None, pid: str | None = None
    ) -> DeployResult:
        """scheduler-deploy (plugins/scheduler-docker-local/scheduler-deploy); also what
        ps:restart, ps:scale and ps:start run, without a build (then in a command of its own)."""
        with contextlib.ExitStack() as stack:
            pid = pid or stack.enter_context(self.command())
            return self._deploy(app, tag, scale or {"web": 1}, pid)

    def _deploy(self, app: str, tag: str, scale: dict[str, int], pid: str) -> DeployResult:
        output: list[str] = []
        app_dir = self.app_dir(app)
        old_files = self.current(app)
        result = DeployResult(True, "")
        # web first and alone, the other types after it (scheduler-deploy:55-79)
        for proc in sorted(scale, key=lambda p: (p != "web", p)):
            count = scale[proc]
            # once per type, before any container of it: bin/scheduler-deploy-process:54-56
            once = self.trigger("docker-args-process-deploy", app, "dockerfile", tag, proc, pid=pid)
            output.append(once.stderr)
            if once.returncode != 0:
                return DeployResult(False, "".join(output), result.new, [], result.created)
            ids = []
            for index in range(1, count + 1):
                # per container: bin/scheduler-deploy-process-container:27
                args = self.trigger(
                    "docker-args-process-deploy", app, "dockerfile", tag, proc, str(index), pid=pid
                )
                output.append(args.stderr)
                if args.returncode != 0:
                    return DeployResult(False, "".join(output), result.new, [], result.created)
                # the container gets the per-container call's args; the once-per-type
                # output only feeds the "publishing ports" warning (:58-79)
                argv = args.stdout.split()
                result.args[proc] = argv
                cid = self._create(app, proc, index, f"{tag}.{proc}.{index}", argv)
                result.created += 1
                # :76-77: post-container-create, then start
                self.trigger("post-container-create", "app", cid, app, "deploy", proc, pid=pid)
                sh("docker", "container", "start", cid)
                ids.append(cid)
                previous = old_files.get(proc, [])
                if index <= len(previous):
                    result.old.append(previous[index - 1])
                # :113-114 and network-write-*: the files hold no trailing newline
                self._write(app_dir / f"CONTAINER.{proc}.{index}", cid)
                ip = sh(
                    "docker", "inspect", "-f", "{{.NetworkSettings.Networks.bridge.IPAddress}}", cid
                ).stdout.strip()
                self._write(app_dir / f"IP.{proc}.{index}", ip)
                if proc == "web":
                    self._write(app_dir / f"PORT.{proc}.{index}", "5000")
            result.new[proc] = ids
            # scale-down removes the files beyond the count (bin/scheduler-deploy-process:90-110)
            for index, cid in enumerate(old_files.get(proc, []), start=1):
                if index > count:
                    result.old.append(cid)
                    for kind in ("CONTAINER", "IP", "PORT"):
                        (app_dir / f"{kind}.{proc}.{index}").unlink(missing_ok=True)
            # :85: nginx rebuilds its config early, after the web containers
            post = self.trigger("scheduler-post-deploy-process", app, proc, pid=pid)
            output.append(post.stdout + post.stderr)
        # core-post-deploy (scheduler-deploy:82): plugins in name order, so nginx-vhosts'
        # proxy-build-config runs before scheduler-docker-local renames the containers
        core = self.trigger("core-post-deploy", app, "", "", tag, pid=pid)
        output.append(core.stdout + core.stderr)
        epoch = str(int(time.time()))
        for proc, ids in result.new.items():
            for index, cid in enumerate(ids, start=1):
                final = f"{app}.{proc}.{index}"
                if sh("docker", "inspect", final, check=False).returncode == 0:
                    sh("docker", "rename", final, f"{final}.{epoch}")
                sh("docker", "rename", cid, final)
        if self.before_post_deploy is not None:
            self.before_post_deploy()
        # scheduler-deploy:83, under set -eo pipefail: a failure skips the retirement
        done = self.trigger("post-deploy", app, "", "", tag, pid=pid)
        output.append(done.stdout + done.stderr)
        result.ok = done.returncode == 0
        if not result.ok:
            result.old = []
        result.output = "".join(output)
        return result

    def _create(self, app: str, proc: str, index: int, tag: str, args: Sequence[str]) -> str:
        """`docker container create` with Dokku's labels (scheduler-deploy:21,
        bin/scheduler-deploy-process-container)."""
        ports = [a.split("::")[1].split("/")[0] for a in args if a.startswith("127.0.0.1::")]
        if not ports:
            # natports' DOCKER-USER accept in place: no -p; listen on every port the tests map
            ports = self.listen.get(app, list(PRIVATE_PORTS))
        publish = [a for a in args if a.startswith("127.0.0.1::")]
        argv = [
            "docker",
            "container",
            "create",
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

    def ps_stop(self, app: str) -> subprocess.CompletedProcess[str]:
        """ps:stop: scheduler-stop (natports before scheduler-docker-local stops the
        containers, plugins/scheduler-docker-local/scheduler-stop:21-40), then post-stop.
        Returns scheduler-stop's result; `table_at_stop` is the table while they still ran."""
        with self.command() as pid:
            stop = self.trigger("scheduler-stop", "docker-local", app, pid=pid)
            self.table_at_stop = self.table()
            for ids in self.current(app).values():
                for cid in ids:
                    sh("docker", "container", "stop", "-t", "1", cid)
            self.trigger("post-stop", app, pid=pid)
            return stop

    def apps_clone(
        self, old: str, new: str, files: dict[str, str | Callable[[Path], None]]
    ) -> DeployResult:
        """apps:clone: the ports plugin copies the map (plugins/ports/triggers.go:135-143),
        post-app-clone-setup fires (plugins/apps/subcommands.go:44-51), then post-app-clone
        rebuilds the clone from the same repository: its PORTS included."""
        source = self.ports_dir(old)
        for name in ("map", "map-detected"):
            if (source / name).exists():
                shutil.copy(source / name, self.ports_dir(new) / name)
        setup = self.trigger("post-app-clone-setup", old, new)
        result = self.git_push(new, "c1", files)
        result.output = setup.stdout + setup.stderr + result.output
        return result

    def apps_destroy(self, app: str) -> subprocess.CompletedProcess[str]:
        """apps:destroy: scheduler-stop with REMOVE, containers go, then post-delete."""
        with self.command() as pid:
            self.trigger("scheduler-stop", "docker-local", app, "true", pid=pid)
            for ids in self.current(app).values():
                for cid in ids:
                    sh("docker", "rm", "-f", cid, check=False)
            shutil.rmtree(self.dokku_root / app, ignore_errors=True)
            return self.trigger("post-delete", app, "latest", pid=pid)

    def container_ip(self, cid: str) -> str:
        out = sh("docker", "inspect", "-f", "{{.NetworkSettings.Networks.bridge.IPAddress}}", cid)
        return out.stdout.strip()

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

    def stored(self, app: str) -> str | None:
        path = self.state / "apps" / f"{app}.json"
        return path.read_text() if path.exists() else None


def _detected_ports(work: Path) -> str:
    """ports-set-detected's argument: `udp:P:P` / `http:P:P` from EXPOSE, else http:80:5000
    (plugins/builder-dockerfile/internal-functions fn-builder-dockerfile-get-detect-port-map;
    builder-herokuish/builder-build:107)."""
    dockerfile = work / "Dockerfile"
    exposed: list[str] = []
    if dockerfile.is_file() and not dockerfile.is_symlink():
        for line in dockerfile.read_text().splitlines():
            if line.upper().startswith("EXPOSE "):
                exposed += line.split()[1:]
    entries = []
    for port in exposed:
        number = port.split("/")[0]
        entries.append(
            f"udp:{number}:{number}" if port.endswith("/udp") else f"http:{number}:{number}"
        )
    return " ".join(entries) or "http:80:5000"
