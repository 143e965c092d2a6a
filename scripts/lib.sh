# Shared by the scripts: install, venv, dockerd, test image, the installer's settings.
# shellcheck shell=bash

NATPORTS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$NATPORTS_ROOT/.venv"  # the development and test venv
TEST_IMAGE="natports-echod:test"
APT_PACKAGES=(nftables iptables conntrack iproute2 docker.io busybox-static gcc libc6-dev
              python3 python3-venv sudo shellcheck)
STARTED_DOCKERD_PID=""

log() { printf '==> %s\n' "$*" >&2; }

# The installed layout, for install-dokku-plugin and uninstall-dokku-plugin: NATPORTS_*
# settings from the environment, else these defaults.
# shellcheck disable=SC2034  # used by the scripts that source this file
installed_layout() {
    PLUGIN_VENV="${NATPORTS_VENV:-/opt/natports/venv}"
    HELPER="${NATPORTS_HELPER:-/usr/local/sbin/natports-dokku}"
    SUDOERS="${NATPORTS_SUDOERS:-/etc/sudoers.d/natports}"
    STATE_DIR="${NATPORTS_STATE_DIR:-/var/lib/natports}"
    CONFIG="${NATPORTS_CONFIG:-/etc/natports/natports.toml}"
    DOKKU_HOME="${DOKKU_ROOT:-/home/dokku}"
    TABLE="${NATPORTS_NFT_TABLE:-natports}"
    DOKKU_USER="${NATPORTS_DOKKU_USER:-dokku}"
    UNITS=(natports.service natports-watch.service natports-proxy.service)
    SYSTEMD_DIR="${NATPORTS_SYSTEMD_DIR:-/etc/systemd/system}"  # where the units go
}

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$(basename "$0"): run as root (sudo $0)" >&2
        exit 1
    fi
}

install_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep "install ok installed" >/dev/null \
            || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

python_bin() {
    # The newest python3 >= 3.11 on PATH (Debian 12 ships 3.11).
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 \
            && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    echo "no python3 >= 3.11 found" >&2
    return 1
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating venv $VENV"
        "$(python_bin)" -m venv "$VENV"
    fi
    log "installing natports and its test extras into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "${NATPORTS_ROOT}[test]"
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    log "starting dockerd"
    dockerd >/var/log/natports-test-dockerd.log 2>&1 &
    STARTED_DOCKERD_PID=$!
    local _
    for _ in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    echo "dockerd did not come up; see /var/log/natports-test-dockerd.log" >&2
    return 1
}

stop_dockerd() {
    local pid="$STARTED_DOCKERD_PID" current=""
    STARTED_DOCKERD_PID=""
    if [ -n "$pid" ]; then
        log "stopping the dockerd this script started"
        # The agent's tests restart dockerd (a new process, same command line): stop
        # whichever one runs now, as the pid file names it.
        current="$(cat /var/run/docker.pid 2>/dev/null || true)"
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        if [ -n "$current" ] && [ "$current" != "$pid" ]; then
            kill "$current" 2>/dev/null || true
            local _
            for _ in $(seq 1 60); do
                kill -0 "$current" 2>/dev/null || break
                sleep 1
            done
        fi
    fi
}

build_test_image() {
    # busybox-static plus our static echo server, imported (no registry is reachable).
    local dir old
    old="$(docker image inspect -f '{{.Id}}' "$TEST_IMAGE" 2>/dev/null || true)"
    dir="$(mktemp -d)"
    mkdir -p "$dir/bin"
    gcc -static -O2 -Wall -Wextra -Werror -o "$dir/bin/echod" "$NATPORTS_ROOT/tests/image/echod.c"
    cp /bin/busybox "$dir/bin/busybox"
    ln -s busybox "$dir/bin/sh"
    tar -C "$dir" -c . | docker import -c 'ENTRYPOINT ["/bin/echod"]' - "$TEST_IMAGE" >/dev/null
    rm -rf "$dir"
    if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$TEST_IMAGE")" ]; then
        docker rmi "$old" >/dev/null 2>&1 || true  # the replaced build, unless still in use
    fi
    log "built $TEST_IMAGE"
}
