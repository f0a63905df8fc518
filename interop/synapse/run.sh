#!/usr/bin/env bash
# interop/synapse/run.sh: send-to-device interop over real TLS federation on
# loopback. Server A is always Synapse; its peer B is a second Synapse (the
# default) or a Courier relay started by $INTEROP_COURIER_CMD. Sets up the pinned
# Synapse venv, makes (or takes) certificates, starts both servers (each by
# PID, in its own process group, logs under the work dir), waits until they
# answer, runs check.py and always stops both. Exits with the checker's status.
#
# Inputs (all optional; see interop/README.md):
#   INTEROP_WORK            work dir (default interop/synapse/work/run-<time>)
#   INTEROP_CA_CERT, INTEROP_TLS_CERT, INTEROP_TLS_KEY
#                           CA + localhost leaf (all three, or none: then a
#                           throwaway CA is made in $INTEROP_WORK/certs)
#   SYNAPSE_RETRY_PROFILE   fast (default) | default: Synapse's federation
#                           retry intervals (gen_config.py)
#   READY_TIMEOUT           seconds to wait for a server to answer (default 90)
#   INTEROP_ONLY            comma-separated check groups of check.py to run
#                           (to_device, capture, olm, downtime, device_lists; default all)
#   SYNAPSE_A_FED_PORT, SYNAPSE_A_CLIENT_PORT, SYNAPSE_B_FED_PORT,
#   SYNAPSE_B_CLIENT_PORT   ports (default: free ports chosen at run time)
#   INTEROP_COURIER_CMD             if set, B is Courier, started as `bash -c "$INTEROP_COURIER_CMD"`
#                           in $INTEROP_WORK/b with these exported to it:
#   INTEROP_COURIER_FED_PORT, INTEROP_COURIER_CLIENT_PORT, INTEROP_COURIER_RPC_PORT (default: free),
#   INTEROP_COURIER_RPC_SECRET (default: random), INTEROP_COURIER_SERVER_NAME
#                           (localhost:$INTEROP_COURIER_FED_PORT), SYNAPSE_SERVER_NAME,
#                           INTEROP_DATA_DIR ($INTEROP_WORK/b, kept across the
#                           restart in the downtime check), and the three
#                           INTEROP_* certificate paths.
#
# Internal subcommands used by check.py's downtime checks (need the
# environment run.sh exports): run.sh start a|b, run.sh stop a|b.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SYNAPSE_VENV:-$here/.venv}"
py="$venv/bin/python"
READY_TIMEOUT="${READY_TIMEOUT:-90}"

log() { echo "run.sh: $*" >&2; }

# Alive and not a zombie.
alive() {
    [[ -r "/proc/$1/stat" ]] || return 1
    local state
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "$state" != Z && "$state" != X ]]
}

node_kind() { if [[ "$1" == b && -n "${INTEROP_COURIER_CMD:-}" ]]; then echo courier; else echo synapse; fi; }

node_client_port() {
    case "$1" in
        a) echo "$SYNAPSE_A_CLIENT_PORT" ;;
        b) if [[ "$(node_kind b)" == courier ]]; then echo "$INTEROP_COURIER_CLIENT_PORT"; else echo "$SYNAPSE_B_CLIENT_PORT"; fi ;;
    esac
}

node_fed_port() {
    case "$1" in
        a) echo "$SYNAPSE_A_FED_PORT" ;;
        b) if [[ "$(node_kind b)" == courier ]]; then echo "$INTEROP_COURIER_FED_PORT"; else echo "$SYNAPSE_B_FED_PORT"; fi ;;
    esac
}

# Start node a|b in its own process group (setsid: pid == pgid) and wait
# until its client API and its federation listener (TLS, our CA) answer.
start_node() {
    local name="$1" dir="$INTEROP_WORK/$1" pid
    if [[ "$(node_kind "$name")" == courier ]]; then
        (cd "$dir" && exec setsid bash -c "$INTEROP_COURIER_CMD") >>"$dir/stdout.log" 2>&1 </dev/null &
    else
        (cd "$dir" && exec setsid "$py" -m synapse.app.homeserver -c homeserver.yaml) \
            >>"$dir/stdout.log" 2>&1 </dev/null &
    fi
    pid=$!
    echo "$pid" >"$dir/run.pid"
    local client fed deadline=$((SECONDS + READY_TIMEOUT))
    client="http://127.0.0.1:$(node_client_port "$name")/_matrix/client/versions"
    fed="https://localhost:$(node_fed_port "$name")/_matrix/key/v2/server"
    while true; do
        if ! alive "$pid"; then
            log "$name (pid $pid) exited during startup; last log lines:"
            tail -n 30 "$dir/stdout.log" "$dir/homeserver.log" >&2 2>/dev/null || true
            return 1
        fi
        if curl -fsS --max-time 2 -o /dev/null "$client" 2>/dev/null &&
            curl -fsS --max-time 2 -o /dev/null --cacert "$INTEROP_CA_CERT" \
                --resolve "localhost:$(node_fed_port "$name"):127.0.0.1" "$fed" 2>/dev/null; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) not ready after ${READY_TIMEOUT}s"
            tail -n 30 "$dir/stdout.log" "$dir/homeserver.log" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.3
    done
}

# Stop node a|b by the PID we recorded: SIGTERM to its process group, then
# SIGKILL after 20 s.
stop_node() {
    local dir="$INTEROP_WORK/$1" pid i
    [[ -f "$dir/run.pid" ]] || return 0
    pid="$(cat "$dir/run.pid")"
    rm -f "$dir/run.pid"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    alive "$pid" || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "$1 (pid $pid) ignored SIGTERM for 20s; SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
    start) start_node "$2"; exit ;;
    stop) stop_node "$2"; exit ;;
    "") ;;
    *) echo "usage: run.sh [start|stop a|b]" >&2; exit 2 ;;
esac

command -v curl >/dev/null || { log "curl is required"; exit 2; }
command -v setsid >/dev/null || { log "setsid (util-linux) is required"; exit 2; }

t0=$SECONDS
"$here/setup.sh"
log "venv ready in $((SECONDS - t0))s ($("$py" -c 'import synapse; print(synapse.__version__.split()[0])'))"

export INTEROP_WORK="${INTEROP_WORK:-$here/work/run-$(date -u +%Y%m%dT%H%M%S)}"
mkdir -p "$INTEROP_WORK"
INTEROP_WORK="$(cd "$INTEROP_WORK" && pwd)"

if [[ -z "${INTEROP_CA_CERT:-}${INTEROP_TLS_CERT:-}${INTEROP_TLS_KEY:-}" ]]; then
    "$here/make_certs.sh" "$INTEROP_WORK/certs"
    INTEROP_CA_CERT="$INTEROP_WORK/certs/dev-ca.crt"
    INTEROP_TLS_CERT="$INTEROP_WORK/certs/localhost.crt"
    INTEROP_TLS_KEY="$INTEROP_WORK/certs/localhost.key"
elif [[ -z "${INTEROP_CA_CERT:-}" || -z "${INTEROP_TLS_CERT:-}" || -z "${INTEROP_TLS_KEY:-}" ]]; then
    log "set all of INTEROP_CA_CERT, INTEROP_TLS_CERT, INTEROP_TLS_KEY, or none"
    exit 2
fi
INTEROP_CA_CERT="$(realpath "$INTEROP_CA_CERT")"
INTEROP_TLS_CERT="$(realpath "$INTEROP_TLS_CERT")"
INTEROP_TLS_KEY="$(realpath "$INTEROP_TLS_KEY")"
export INTEROP_CA_CERT INTEROP_TLS_CERT INTEROP_TLS_KEY

# Free loopback ports for everything not given.
read -r -a free < <("$py" -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
export SYNAPSE_A_FED_PORT="${SYNAPSE_A_FED_PORT:-${free[0]}}"
export SYNAPSE_A_CLIENT_PORT="${SYNAPSE_A_CLIENT_PORT:-${free[1]}}"
export SYNAPSE_B_FED_PORT="${SYNAPSE_B_FED_PORT:-${free[2]}}"
export SYNAPSE_B_CLIENT_PORT="${SYNAPSE_B_CLIENT_PORT:-${free[3]}}"
export SYNAPSE_SERVER_NAME="localhost:$SYNAPSE_A_FED_PORT"
export SYNAPSE_A_SECRET SYNAPSE_B_SECRET
SYNAPSE_A_SECRET="$(openssl rand -hex 16)"
SYNAPSE_B_SECRET="$(openssl rand -hex 16)"

gen() { # name fed client secret
    "$py" "$here/gen_config.py" --dir "$INTEROP_WORK/$1" --fed-port "$2" --client-port "$3" \
        --tls-cert "$INTEROP_TLS_CERT" --tls-key "$INTEROP_TLS_KEY" --ca "$INTEROP_CA_CERT" \
        --shared-secret "$4" --retry-profile "${SYNAPSE_RETRY_PROFILE:-fast}"
}
gen a "$SYNAPSE_A_FED_PORT" "$SYNAPSE_A_CLIENT_PORT" "$SYNAPSE_A_SECRET"
if [[ -n "${INTEROP_COURIER_CMD:-}" ]]; then
    export INTEROP_COURIER_CMD
    export INTEROP_COURIER_FED_PORT="${INTEROP_COURIER_FED_PORT:-${free[4]}}"
    export INTEROP_COURIER_CLIENT_PORT="${INTEROP_COURIER_CLIENT_PORT:-${free[5]}}"
    export INTEROP_COURIER_RPC_PORT="${INTEROP_COURIER_RPC_PORT:-${free[6]}}"
    export INTEROP_COURIER_RPC_SECRET="${INTEROP_COURIER_RPC_SECRET:-$(openssl rand -hex 16)}"
    export INTEROP_COURIER_SERVER_NAME="localhost:$INTEROP_COURIER_FED_PORT"
    export INTEROP_DATA_DIR="$INTEROP_WORK/b"
    mkdir -p "$INTEROP_DATA_DIR"
    b_args=(--b-kind courier --b-server "$INTEROP_COURIER_SERVER_NAME"
        --b-client "http://127.0.0.1:$INTEROP_COURIER_CLIENT_PORT"
        --b-rpc "http://127.0.0.1:$INTEROP_COURIER_RPC_PORT" --b-rpc-secret "$INTEROP_COURIER_RPC_SECRET")
else
    gen b "$SYNAPSE_B_FED_PORT" "$SYNAPSE_B_CLIENT_PORT" "$SYNAPSE_B_SECRET"
    b_args=(--b-kind synapse --b-server "localhost:$SYNAPSE_B_FED_PORT"
        --b-client "http://127.0.0.1:$SYNAPSE_B_CLIENT_PORT" --b-secret "$SYNAPSE_B_SECRET")
fi

# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
    stop_node a || true
    stop_node b || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t1=$SECONDS
start_node a
start_node b
log "A=localhost:$SYNAPSE_A_FED_PORT (synapse), B=$(node_kind b) ready in $((SECONDS - t1))s; work dir $INTEROP_WORK"

self="$here/run.sh"
set +e
"$py" "$here/check.py" --work "$INTEROP_WORK" \
    --ca "$INTEROP_CA_CERT" --tls-cert "$INTEROP_TLS_CERT" --tls-key "$INTEROP_TLS_KEY" \
    --a-server "localhost:$SYNAPSE_A_FED_PORT" --a-client "http://127.0.0.1:$SYNAPSE_A_CLIENT_PORT" \
    --a-secret "$SYNAPSE_A_SECRET" --a-stop "'$self' stop a" --a-start "'$self' start a" \
    --b-stop "'$self' stop b" --b-start "'$self' start b" \
    ${INTEROP_ONLY:+--only "$INTEROP_ONLY"} "${b_args[@]}"
status=$?
set -e
# Nothing is printed after check.py's closing "N passed, M failed" line.
exit "$status"
