#!/usr/bin/env bash
# natports on a real Dokku 0.38, end to end. Run it inside the provisioned Vagrant VM, as the
# vagrant user (or root):
#     bash /natports/tests/vagrant/scenario.sh
# It prints PASS or FAIL per check and exits 1 if any check failed. It creates the Dokku app
# "echo" (renamed "echo2" on the way) and destroys it at the end; leftovers of an earlier run
# are destroyed first. Dokku's own output goes to the log file (see NATPORTS_TEST_LOG).
#
# Settings (environment), with their defaults:
#   NATPORTS_TEST_ADDR=192.168.56.10   a non-loopback address of this VM (the Vagrantfile's)
#   NATPORTS_TEST_SSH_KEY=~vagrant/.ssh/id_ed25519   the key provision.sh gave to Dokku
#   NATPORTS_TEST_LOG=/tmp/natports-scenario.$USER.log
#   NATPORTS_TEST_KEEP=                set to 1: stop before apps:rename, leave "echo" running
#
# shellcheck disable=SC2317  # many functions only run through check/must/trap
set -euo pipefail

APP="echo"
APP2="echo2"
PORT=2525         # the PORTS file's public port
PORT2=2526        # added later with `dokku ports:set`
PORT3=2527        # PORTS of the push after git:from-image
UDP_PORT=5353     # EXPOSEd as udp: Dokku detects udp:5353:5353, natports must not route it
PRIVATE=5025      # the app's port inside its container
RETIRE=30         # dokku checks:set APP wait-to-retire
DOKKU_ROOT="${DOKKU_ROOT:-/home/dokku}"
ADDR="${NATPORTS_TEST_ADDR:-192.168.56.10}"
vagrant_home="$(getent passwd vagrant | cut -d: -f6 || true)"
KEY="${NATPORTS_TEST_SSH_KEY:-${vagrant_home:-/home/vagrant}/.ssh/id_ed25519}"
LOG="${NATPORTS_TEST_LOG:-/tmp/natports-scenario.$(id -un).log}"
KEEP="${NATPORTS_TEST_KEEP:-}"
GIT_SSH="ssh -i $(printf '%q' "$KEY") -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new"

WORK="$(mktemp -d)"
SRC="$WORK/app"
CLIENT="$WORK/client.py"
held_pid=""
probe_pid=""

# ---------------------------------------------------------------------------------- helpers
checks=0
failed=0
pass() { checks=$((checks + 1)); printf 'PASS  %s\n' "$1"; }
fail() {
    checks=$((checks + 1))
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$1"
    if [ -n "${2:-}" ]; then
        printf '%s\n' "$2" | sed 's/^/        /'
    fi
}
summary() { printf '\n%d checks, %d failed (Dokku output: %s)\n' "$checks" "$failed" "$LOG"; }
# check DESCRIPTION COMMAND...: PASS when COMMAND succeeds.
check() {
    local what="$1"
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
# must DESCRIPTION COMMAND...: like check, but the rest of the scenario depends on it.
must() {
    local what="$1"
    shift
    if "$@"; then
        pass "$what"
    else
        local last
        last="$(tail -n 15 "$LOG" 2>/dev/null || true)"
        fail "$what" "${last:+last lines of $LOG:$'\n'$last}"
        echo "aborting: the remaining checks depend on this one" >&2
        summary
        exit 1
    fi
}
# expect_eq DESCRIPTION ACTUAL EXPECTED / expect_like DESCRIPTION ACTUAL GLOB
expect_eq() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "expected: $3"$'\n'"got:      ${2:-<nothing>}"; fi
}
expect_like() {
    # shellcheck disable=SC2053  # $3 is a glob pattern on purpose
    if [[ "$2" == $3 ]]; then pass "$1"; else fail "$1" "expected: $3"$'\n'"got:      ${2:-<nothing>}"; fi
}
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}
# run COMMAND...: COMMAND's output goes to the log.
run() {
    printf '\n$ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}
# push MESSAGE [APP [GIT-PUSH-OPTION...]]: commit the sample app and deploy it with git push.
push() {
    local message="$1" app="${2:-$APP}"
    shift $(($# < 2 ? $# : 2))
    git -C "$SRC" add -A \
        && git -C "$SRC" -c user.name=natports -c user.email=natports@localhost commit -q -m "$message" \
        && run env GIT_SSH_COMMAND="$GIT_SSH" git -C "$SRC" push "$@" "dokku@localhost:$app" HEAD:master
}
# push_fails MESSAGE [APP]: the push is refused; the commit is undone again.
push_fails() {
    local rc=0
    push "$@" || rc=$?
    git -C "$SRC" reset -q --hard HEAD~1
    [ "$rc" -ne 0 ]
}
# greet PORT [COUNT]: the greeting ("RELEASE CONTAINER") of COUNT new connections to ADDR:PORT,
# one line each ("<error ...>" for a failed one).
greet() { python3 "$CLIENT" once "$ADDR" "$1" "${2:-1}" || true; }
# current_cids APP: Dokku's current web containers (its CONTAINER.web.N files), short ids, sorted.
current_cids() {
    # shellcheck disable=SC2016  # expanded by the inner sh
    { as_root sh -c 'cat "$1"/CONTAINER.web.* 2>/dev/null' sh "$DOKKU_ROOT/$1" || true; } \
        | cut -c1-12 | sort
}
nft_table() { as_root nft list table inet natports 2>/dev/null || true; }
# json_ok JSON EXPR [ARG...]: EXPR (Python, on the report r and the arguments a) is true.
json_ok() {
    python3 -c 'import json, sys
r = json.loads(sys.argv[1]); a = sys.argv[3:]
sys.exit(0 if eval("(" + sys.argv[2] + ")") else 1)' "$@" 2>>"$LOG"
}
# has ERE TEXT / no_match ERE TEXT (grep on a variable: no pipe, so no SIGPIPE under pipefail)
has() { grep -Eq "$1" <<<"$2"; }
no_match() { ! grep -Eq "$1" <<<"$2"; }
natports_installed() {
    local plugins
    plugins="$(as_root dokku plugin:list 2>/dev/null || true)"
    [ -x /usr/local/sbin/natports-dokku ] && has '(^|[[:space:]])natports([[:space:]]|$)' "$plugins"
}
is_local_addr() { has "inet6? $1/" "$(ip -o addr show)"; }

# The held connection: a coprocess that prints what the server sends, and sends its stdin.
start_held() {
    coproc HELD { exec python3 "$CLIENT" hold "$ADDR" "$PORT"; }
    # shellcheck disable=SC2153  # HELD_PID is set by coproc
    held_pid="$HELD_PID"
    # Our own copies of its pipes: bash closes the coproc's ones when the coprocess exits.
    exec {held_out}<&"${HELD[0]}" {held_in}>&"${HELD[1]}"
}
# held_read SECONDS: the next line from the held connection, "<no answer>" or "<eof>".
held_read() {
    local line rc=0
    IFS= read -r -t "$1" line <&"$held_out" || rc=$?
    if [ "$rc" -eq 0 ]; then
        printf '%s\n' "$line"
    elif [ "$rc" -gt 128 ]; then
        echo "<no answer>"
    else
        echo "<eof>"
    fi
}
# held_ask LINE: send LINE on the held connection, print the answer.
held_ask() {
    if (printf '%s\n' "$1" >&"$held_in") 2>/dev/null; then held_read 10; else echo "<eof>"; fi
}

cleanup() {
    if [ -n "$probe_pid" ]; then kill "$probe_pid" 2>/dev/null || true; fi
    if [ -n "$held_pid" ]; then kill "$held_pid" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- the sample app and client
mkdir -p "$SRC"
cat >"$SRC/Dockerfile" <<'EOF'
FROM python:3.12-alpine
ENV RELEASE=v1
# EXPOSE makes Dokku's port map http:5025:5025 (its nginx, not natports) and PORT=5025, so
# Dokku's "port listening check" finds the app.
EXPOSE 5025
EXPOSE 5353/udp
COPY server.py /app/server.py
# The image carries PORTS too: git:from-image deploys of it read /app/PORTS.
COPY PORTS /app/PORTS
CMD ["python3", "-u", "/app/server.py"]
EOF
cat >"$SRC/PORTS" <<EOF
# natports: public TCP port $PORT on every host address -> this app's port $PRIVATE
$PORT:$PRIVATE
EOF
cat >"$SRC/server.py" <<'EOF'
"""TCP line echo server on port 5025: the sample app of natports' Vagrant scenario.

On connect it sends "RELEASE HOSTNAME" (Docker's host name is the container's short id);
each line L it receives is answered with "RELEASE L". Dokku 0.38 sends SIGTERM to the old
containers right after a deploy and stops them wait-to-retire seconds later, so like a
well-behaved app it drains: the first SIGTERM closes the listener and open connections
go on being served; a second SIGTERM (docker stop) ends the process.
"""
import os
import signal
import socket
import threading
import time

RELEASE = os.environ.get("RELEASE", "unknown")
HOST = socket.gethostname()
draining = threading.Event()


class Drain(Exception):
    pass


def on_term(signum, frame):
    if draining.is_set():
        os._exit(0)
    draining.set()
    raise Drain


def serve(conn):
    try:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(f"{RELEASE} {HOST}\n".encode())
            for line in lines:
                text = line.decode(errors="replace").rstrip("\r\n")
                conn.sendall(f"{RELEASE} {text}\n".encode())
    except OSError:
        pass


def main():
    signal.signal(signal.SIGTERM, on_term)
    listener = socket.create_server(("", 5025))
    print(f"{RELEASE} on {HOST}: listening on 5025", flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    except Drain:
        listener.close()
        print(f"{RELEASE} on {HOST}: SIGTERM, draining open connections", flush=True)
    while threading.active_count() > 1:
        time.sleep(0.5)


main()
EOF
cat >"$CLIENT" <<'EOF'
"""Client side of the scenario.

client.py once HOST PORT [N]   N new connections, one line each: the greeting or <error ...>
client.py hold HOST PORT       one connection: prints what the server sends, sends stdin;
                               prints <closed> (or <reset ...>) when the server ends it
client.py probe HOST PORT STOP one new connection every 0.1 s (like once) until file STOP exists
"""
import os
import select
import socket
import sys
import time


def once(host, port, count=1):
    rc = 0
    for _ in range(count):
        try:
            with socket.create_connection((host, port), timeout=5) as s, s.makefile("rb") as f:
                line = f.readline()
            print(line.decode(errors="replace").rstrip("\n") if line else "<closed>", flush=True)
            rc |= 0 if line else 1
        except OSError as exc:
            print(f"<error {exc}>", flush=True)
            rc = 1
    return rc


def hold(host, port):
    out = sys.stdout.buffer
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        out.write(f"<error {exc}>\n".encode())
        out.flush()
        return 1
    s.settimeout(None)
    stdin = sys.stdin.fileno()
    inputs = [s, stdin]
    while True:
        ready, _, _ = select.select(inputs, [], [])
        if s in ready:
            try:
                data = s.recv(65536)
            except OSError as exc:
                out.write(f"<reset {exc}>\n".encode())
                out.flush()
                return 0
            if not data:
                out.write(b"<closed>\n")
                out.flush()
                return 0
            out.write(data)
            out.flush()
        if stdin in ready:
            data = os.read(stdin, 65536)
            if data:
                s.sendall(data)
            else:
                inputs.remove(stdin)  # keep holding the connection


def probe(host, port, stop):
    while not os.path.exists(stop):
        once(host, port)
        time.sleep(0.1)
    return 0


mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "once":
    sys.exit(once(host, port, int(sys.argv[4]) if len(sys.argv) > 4 else 1))
if mode == "hold":
    sys.exit(hold(host, port))
sys.exit(probe(host, port, sys.argv[4]))
EOF
git -C "$SRC" init -q -b master

# ------------------------------------------------------------------------------- pre-flight
: >"$LOG"
echo "natports Vagrant scenario: app $APP, public ports $ADDR:$PORT and :$PORT2; log $LOG"
must "dokku is installed" test -x "$(command -v dokku || echo /nonexistent)"
must "natports is installed (root helper and Dokku plugin)" natports_installed
must "$ADDR is an address of this machine (NATPORTS_TEST_ADDR)" is_local_addr "$ADDR"
must "the Dokku ssh key $KEY is readable" test -r "$KEY"
for app in "$APP" "$APP2"; do
    if dokku apps:exists "$app" >/dev/null 2>&1; then
        must "destroy $app, left over from an earlier run" run dokku apps:destroy "$app" --force
    fi
done

# ------------------------------------------------------------- v1, and a connection held open
must "dokku apps:create $APP" run dokku apps:create "$APP"
must "dokku checks:set $APP wait-to-retire $RETIRE" run dokku checks:set "$APP" wait-to-retire "$RETIRE"
must "git push: deploy v1 (PORTS $PORT:$PRIVATE)" push "v1"
v1_cid="$(current_cids "$APP")"
expect_eq "a new connection to $ADDR:$PORT reaches v1 (container $v1_cid)" "$(greet "$PORT")" "v1 $v1_cid"

start_held
expect_eq "a held connection to $ADDR:$PORT is answered by v1" "$(held_read 10)" "v1 $v1_cid"
expect_eq "the held connection echoes a line (v1)" "$(held_ask before-deploy)" "v1 before-deploy"

# ------------------------------------------------- v2, deployed while the connection is held
sed -i 's/^ENV RELEASE=v1$/ENV RELEASE=v2/' "$SRC/Dockerfile"
# New connections all through the deploy: none may fail, and once v2 answers v1 never does.
rm -f "$WORK/probe.stop"
python3 "$CLIENT" probe "$ADDR" "$PORT" "$WORK/probe.stop" >"$WORK/probe.log" 2>&1 &
probe_pid=$!
must "git push: deploy v2 while the connection is held" push "v2"
deployed=$SECONDS
touch "$WORK/probe.stop"
wait "$probe_pid" || true
probe_pid=""
v2_cid="$(current_cids "$APP")"

expect_eq "the held connection is still answered by v1 after the v2 deploy" \
    "$(held_ask after-deploy)" "v1 after-deploy"
expect_eq "10 new connections all reach v2 (container $v2_cid)" \
    "$(greet "$PORT" 10 | sort -u)" "v2 $v2_cid"
probes="$(wc -l <"$WORK/probe.log")"
check "no new connection failed during the deploy ($probes probes)" \
    no_match '^<' "$(cat "$WORK/probe.log")"
# shellcheck disable=SC2016  # an awk program
check "new connections switched from v1 to v2 once (no v1 after the first v2)" \
    awk '$1 == "v2" { seen = 1 } $1 == "v1" && seen { bad = 1 } END { exit bad }' "$WORK/probe.log"

# Dokku stops the old container wait-to-retire seconds after the deploy: the held connection ends.
ended="<no answer>"
while [ $((SECONDS - deployed)) -lt $((RETIRE + 60)) ]; do
    ended="$(held_read 5)"
    case "$ended" in
        "<closed>" | "<reset"* | "<eof>") break ;;
    esac
done
expect_like "the held connection ends once Dokku retires v1 ($((SECONDS - deployed)) s after the deploy, wait-to-retire $RETIRE s)" \
    "$ended" "@(<closed>|<reset*|<eof>)"
wait "$held_pid" 2>/dev/null || true
held_pid=""
exec {held_in}>&- {held_out}<&-
for _ in $(seq 1 15); do
    [ -z "$(as_root docker ps -q --filter "id=$v1_cid")" ] && break
    sleep 1
done
expect_eq "the v1 container is no longer running" "$(as_root docker ps -q --filter "id=$v1_cid")" ""

# -------------------------------------------------------------------------- natports:report
report="$(dokku natports:report "$APP" 2>>"$LOG" || true)"
check "natports:report $APP shows the mapping $PORT:$PRIVATE/tcp" \
    has "Natports mappings: +$PORT:$PRIVATE/tcp\$" "$report"
check "natports:report $APP shows backend nftables" has "Natports backend: +nftables\$" "$report"
check "natports:report $APP shows the v2 container as backend" has "Natports backends: +$v2_cid@" "$report"
json="$(dokku natports:report "$APP" --format json 2>>"$LOG" || true)"
check "natports:report $APP --format json: app, mappings, backend, v2 container, not staged" \
    json_ok "$json" 'r["app"] == a[0] and r["mappings"] == [a[1]] and r["backend"] == "nftables"
and r["routed_ports"] >= 1 and r["staged"] is False
and [b.split("@")[0] for b in r["backends"]] == [a[2]]' "$APP" "$PORT:$PRIVATE/tcp" "$v2_cid"

# ------------------------------------------------------------ ports:set, without a redeploy
check "dokku ports:set $APP tcp:$PORT2:$PRIVATE" run dokku ports:set "$APP" "tcp:$PORT2:$PRIVATE"
expect_eq "port $PORT2 answers, from the same container (no redeploy)" "$(greet "$PORT2")" "v2 $v2_cid"
expect_eq "port $PORT still answers" "$(greet "$PORT")" "v2 $v2_cid"

# ------------------------------------------------------------------------ ps:scale web=2
check "dokku ps:scale $APP web=2" run dokku ps:scale "$APP" web=2
cids="$(current_cids "$APP")"
check "Dokku runs 2 web containers" test "$(grep -c . <<<"$cids")" -eq 2
both="v2 ${cids//$'\n'/$'\n'v2 }"   # "v2 CID" per container
expect_eq "40 new connections to port $PORT reach both web containers" \
    "$(greet "$PORT" 40 | sort -u)" "$both"
expect_eq "40 new connections to port $PORT2 reach both web containers" \
    "$(greet "$PORT2" 40 | sort -u)" "$both"
json="$(dokku natports:report "$APP" --format json 2>>"$LOG" || true)"
# shellcheck disable=SC2086  # $cids: one argument per container id
check "natports:report $APP --format json names both containers as backends" \
    json_ok "$json" 'sorted(b.split("@")[0] for b in r["backends"]) == sorted(a)' $cids

# ------------------------------------------------- pushes Dokku must refuse (issue 7 facts)
# A failing post-extract would not stop the push (plugins/git/functions:40,144): natports
# checks at pre-build and in the once-per-type docker-args call, before any container.
before="$(current_cids "$APP")"
printf '%s\n' "$PORT:$PRIVATE" "$PORT2:70000" >"$SRC/PORTS"
check "git push with an invalid PORTS (private port 70000) fails" push_fails "invalid PORTS"
check "the failed push said where (PORTS:2:...)" has 'PORTS:2:[0-9]+: private port 70000' "$(cat "$LOG")"
expect_eq "no container was replaced by the failed push" "$(current_cids "$APP")" "$before"
expect_like "port $PORT still reaches the running release" "$(greet "$PORT")" "v2 *"
git -C "$SRC" checkout -q -- PORTS 2>/dev/null || printf '%s\n' "$PORT:$PRIVATE" >"$SRC/PORTS"
CLASH="${APP}clash"
if dokku apps:exists "$CLASH" >/dev/null 2>&1; then run dokku apps:destroy "$CLASH" --force || true; fi
check "dokku apps:create $CLASH" run dokku apps:create "$CLASH"
rc=0
run env GIT_SSH_COMMAND="$GIT_SSH" git -C "$SRC" push "dokku@localhost:$CLASH" HEAD:master || rc=$?
check "git push of the same PORTS to $CLASH fails (port $PORT belongs to $APP)" test "$rc" -ne 0
check "the refusal names the owner" has "port $PORT/tcp is already mapped by app \"$APP\"" "$(cat "$LOG")"
expect_eq "$CLASH got no container" "$(current_cids "$CLASH")" ""
check "dokku apps:destroy $CLASH --force" run dokku apps:destroy "$CLASH" --force

# ------------------------------------------------- EXPOSE .../udp is detected, never routed
detected="$(dokku ports:report "$APP" --ports-map-detected 2>>"$LOG" || true)"
check "Dokku detected udp:$UDP_PORT:$UDP_PORT from EXPOSE $UDP_PORT/udp" has "udp:$UDP_PORT:$UDP_PORT" "$detected"
check "natports routes no detected entry (no $UDP_PORT in table inet natports)" \
    no_match "[^0-9]${UDP_PORT}[^0-9]" "$(nft_table)"

# ---------------------------------------- git:from-image, then a git push (source-image stale)
image="dokku/$APP:latest"
check "dokku git:from-image $APP $image" run dokku git:from-image "$APP" "$image"
expect_like "after git:from-image, port $PORT answers (PORTS read from the image)" \
    "$(greet "$PORT")" "v2 *"
printf '%s\n' "$PORT:$PRIVATE" "$PORT3:$PRIVATE" >"$SRC/PORTS"
check "git push -f after git:from-image" push "after from-image" "$APP" -f
expect_like "port $PORT3 of the pushed PORTS answers (not the image's PORTS)" "$(greet "$PORT3")" "v2 *"

# ------------------------------------------- a domains toggle clears Dokku's port map
check "dokku ports:add $APP http:80:$PRIVATE" run dokku ports:add "$APP" "http:80:$PRIVATE"
expect_like "port $PORT2 (ports:set) answers before the toggle" "$(greet "$PORT2")" "v2 *"
check "dokku domains:disable $APP (ports-clear, then a restart)" run dokku domains:disable "$APP"
check "the restart reported the cleared map entry tcp:$PORT2:$PRIVATE" \
    has "no longer lists tcp:$PORT2:$PRIVATE" "$(cat "$LOG")"
expect_like "port $PORT2 is no longer routed, as Dokku's map says" "$(greet "$PORT2")" "<error*"
expect_like "port $PORT (PORTS) still answers" "$(greet "$PORT")" "v2 *"
check "dokku domains:enable $APP" run dokku domains:enable "$APP"
check "dokku ports:add $APP tcp:$PORT2:$PRIVATE restores it" run dokku ports:add "$APP" "tcp:$PORT2:$PRIVATE"
expect_like "port $PORT2 answers again" "$(greet "$PORT2")" "v2 *"

# ------------------- a proxy other than nginx: proxy-build-config does not fire during deploys
if as_root dokku plugin:list 2>/dev/null | grep -qw caddy-vhosts; then
    check "dokku proxy:set $APP caddy" run dokku proxy:set "$APP" caddy
    before="$(current_cids "$APP")"
    check "dokku ps:rebuild $APP with the caddy proxy type" run dokku ps:rebuild "$APP"
    after="$(current_cids "$APP")"
    check "the rebuild replaced the containers" test "$after" != "$before"
    expect_eq "new connections to port $PORT reach the new containers (routed at post-deploy)" \
        "$(greet "$PORT" 10 | cut -d' ' -f2 | sort -u)" "$after"
    check "dokku proxy:set $APP nginx" run dokku proxy:set "$APP" nginx
fi

if [ -n "$KEEP" ]; then
    summary
    echo "NATPORTS_TEST_KEEP: $APP is left running; from the host: nc $ADDR $PORT"
    echo "remove it with: dokku apps:destroy $APP --force"
    exit $((failed > 0))
fi

# ------------------------------------------------------------------------------ apps:rename
check "dokku apps:rename $APP $APP2 (rebuilds $APP2)" run dokku apps:rename "$APP" "$APP2"
table="$(nft_table)"
check "no nft rule names $APP any more (nft list table inet natports)" \
    no_match "(^|[^A-Za-z0-9_])a6?_${APP}_" "$table"
check "$APP2 has a route chain for port $PORT" has "chain a_${APP2}_tcp_$PORT " "$table"
check "$APP2 has a route chain for port $PORT2" has "chain a_${APP2}_tcp_$PORT2 " "$table"
expect_like "port $PORT answers from a container of $APP2" \
    "$(greet "$PORT")" "v2 @($(current_cids "$APP2" | paste -sd '|'))"
check "natports:list no longer names $APP" \
    no_match "^${APP}[[:space:]]" "$(dokku natports:list 2>>"$LOG" || true)"

# ----------------------------------------------------------------------------- apps:destroy
check "dokku apps:destroy $APP2 --force" run dokku apps:destroy "$APP2" --force
# Route chains, their map elements and counters are all named a_APP_... or a6_APP_...
check "no app chain, map element or counter is left in table inet natports" \
    no_match '(^|[^A-Za-z0-9_])a6?_[a-z0-9]' "$(nft_table)"
expect_like "port $PORT no longer answers" "$(greet "$PORT")" "<error*"
expect_like "port $PORT2 no longer answers" "$(greet "$PORT2")" "<error*"
check "natports:list no longer names $APP2" \
    no_match "^${APP2}[[:space:]]" "$(dokku natports:list 2>>"$LOG" || true)"

summary
exit $((failed > 0))
