#!/usr/bin/env bash
# Sourced by install-dokku-plugin and uninstall-dokku-plugin: Dokku's own DOKKU_ROOT.

dokku_root_default() {
    # `dokku` sources /etc/default/dokku, then defaults DOKKU_ROOT to the dokku user's
    # home (Dokku v0.38.27 `dokku`:6-10); the helper must look where Dokku writes.
    local defaults="${NATPORTS_DOKKU_DEFAULTS:-/etc/default/dokku}" found home
    if [ -z "${DOKKU_ROOT:-}" ] && [ -r "$defaults" ]; then
        # A subshell: only DOKKU_ROOT comes out of the operator's file.
        # shellcheck source=/dev/null
        found="$(unset DOKKU_ROOT; . "$defaults" >/dev/null 2>&1; printf '%s' "${DOKKU_ROOT:-}")"
        [ -n "$found" ] && DOKKU_ROOT="$found"
    fi
    if [ -z "${DOKKU_ROOT:-}" ]; then
        home="$(getent passwd "${NATPORTS_DOKKU_USER:-dokku}" | cut -d: -f6 || true)"
        [ -n "$home" ] && DOKKU_ROOT="$home"
    fi
    export DOKKU_ROOT="${DOKKU_ROOT:-/home/dokku}"
}
