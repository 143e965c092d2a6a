#!/usr/bin/env bash
# Vagrant provisioner, run as root inside the VM (see Vagrantfile):
#   1. Dokku v0.38.27 through Dokku's official bootstrap.sh (which installs Docker too),
#   2. an ssh key for the vagrant user, registered with Dokku, so that
#      `git push dokku@localhost:APP` works from inside the VM,
#   3. natports through its documented installer, scripts/install-dokku-plugin.
# Idempotent: `vagrant provision` runs it again, which also upgrades natports from /natports
# (after `vagrant rsync` of your host edits).
set -euo pipefail

DOKKU_TAG="v0.38.27"
NATPORTS_SRC="/natports"
VM_USER="vagrant"

log() { printf '==> %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh: run as root" >&2
    exit 1
fi
if [ ! -x "$NATPORTS_SRC/scripts/install-dokku-plugin" ]; then
    echo "provision.sh: $NATPORTS_SRC is not the natports repository (is the synced folder there?)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# 1. Dokku. bootstrap.sh needs a resolvable host name (the Vagrantfile sets one; be sure).
if ! hostname -f >/dev/null 2>&1; then
    printf '127.0.1.1 %s\n' "$(hostname)" >>/etc/hosts
fi
# shellcheck disable=SC2016  # ${Version} is dpkg-query's format, not a shell variable
installed="$(dpkg-query -W -f='${Version}' dokku 2>/dev/null || true)"
if [ "$installed" = "${DOKKU_TAG#v}" ]; then
    log "dokku $installed is already installed"
else
    log "installing dokku $DOKKU_TAG with Dokku's bootstrap.sh"
    workdir="$(mktemp -d)"
    (
        cd "$workdir"
        wget -NP . "https://dokku.com/install/$DOKKU_TAG/bootstrap.sh"
        DOKKU_TAG="$DOKKU_TAG" bash bootstrap.sh
    )
    rm -rf "$workdir"
fi

# 2. The vagrant user's ssh key, as Dokku's ssh key named "vagrant" (re-added on every run,
#    so a regenerated key replaces the old one), and localhost in its known_hosts.
vm_home="$(getent passwd "$VM_USER" | cut -d: -f6)"
vm_group="$(id -gn "$VM_USER")"
key="$vm_home/.ssh/id_ed25519"
if [ ! -f "$key" ]; then
    log "creating $key"
    install -d -m 0700 -o "$VM_USER" -g "$vm_group" "$vm_home/.ssh"
    sudo -u "$VM_USER" ssh-keygen -q -t ed25519 -N '' -C "$VM_USER@natports-vagrant" -f "$key"
fi
log "dokku ssh key '$VM_USER' ($key.pub)"
dokku ssh-keys:remove "$VM_USER" >/dev/null 2>&1 || true
dokku ssh-keys:add "$VM_USER" "$key.pub"
known_hosts="$vm_home/.ssh/known_hosts"
if ! ssh-keygen -F localhost -f "$known_hosts" >/dev/null 2>&1; then
    log "adding localhost to $known_hosts"
    ssh-keyscan -t ed25519 localhost 2>/dev/null >>"$known_hosts"
    chown "$VM_USER:$vm_group" "$known_hosts"
fi

# 3. natports, with the documented command. Re-running it upgrades the plugin in place
#    (plugin:update) and keeps the live rules; restarting natports.service re-applies them.
log "installing natports from $NATPORTS_SRC"
"$NATPORTS_SRC/scripts/install-dokku-plugin"
if systemctl is-enabled --quiet natports.service 2>/dev/null; then
    systemctl restart natports.service \
        || log "warning: natports.service failed; see journalctl -u natports.service"
fi

log "ready: vagrant ssh -c 'bash $NATPORTS_SRC/tests/vagrant/scenario.sh'"
