#!/usr/bin/env bash
# SQLite vs PostgreSQL, one worker vs three, under `courier bench` in its
# external mode with a local workload (PUT /sendToDevice on one worker,
# long-poll GET /sync on another, both through the store).
#
#   scripts/bench-workers.sh [COURIER_BINARY] [N] [K] [C]
#
# Runs three setups, one after the other, each on fresh storage with fsync
# on: `sqlite` (one worker), `postgres-1` (one worker) and `postgres-3`
# (three workers on one database; the bench sends through worker 1 and
# receives on worker 2, so every delivery crosses workers over
# LISTEN/NOTIFY). Starts a throwaway PostgreSQL cluster (as root through
# runuser, like tests/it/support/pg.rs). Prints one JSON report per setup.
set -euo pipefail

BIN=${1:-target/release/courier}
N=${2:-20000}
K=${3:-1}
C=${4:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/courier-bench-workers-XXXXXX)
chmod 755 "$WORK"
SECRET=bench-rpc-secret
PIDS=()

pg_bin() {
  if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; else pg_config --bindir; fi
}
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -d "$WORK/pg/data" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

PGBIN=$(pg_bin)
mkdir -p "$WORK/pg"
[ "$(id -u)" = 0 ] && chown postgres: "$WORK/pg"
as_pg "$PGBIN/initdb" -A trust -U postgres --no-sync -E UTF8 --locale=C -D "$WORK/pg/data" >/dev/null
as_pg "$PGBIN/pg_ctl" -w -D "$WORK/pg/data" -l "$WORK/pg/log" \
  -o "-c listen_addresses='' -k $WORK/pg -c fsync=on -c max_connections=200" start >/dev/null
"$BIN" keygen --out "$WORK/signing.key" >/dev/null

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# write_config NAME STORE_LINE -> prints "client_port rpc_port"
write_config() {
  local name=$1 store=$2 fed client rpc
  fed=$(port); client=$(port); rpc=$(port)
  cat >"$WORK/$name.toml" <<EOF
server_name = "bench.localhost"
signing_key_path = "$WORK/signing.key"
[federation]
bind = "127.0.0.1:$fed"
tls_cert = "$ROOT/certs/localhost.crt"
tls_key = "$ROOT/certs/localhost.key"
[client]
bind = "127.0.0.1:$client"
[rpc]
bind = "127.0.0.1:$rpc"
secret = "$SECRET"
[store]
$store
[worker]
name = "$name"
EOF
  echo "$client $rpc"
}

start_worker() {
  local name=$1 client=$2
  "$BIN" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" &
  PIDS+=($!)
  LAST_PID=$!
  for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$client/_matrix/client/versions" >/dev/null && return 0
    sleep 0.05
  done
  echo "worker $name did not start" >&2; cat "$WORK/$name.log" >&2; exit 1
}

register() { # rpc_port user device token
  curl -sf -X PUT -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \
    -d "{\"access_token\":\"$4\"}" \
    "http://127.0.0.1:$1/_courier/v1/devices/$(python3 -c 'import sys,urllib.parse;print(urllib.parse.quote(sys.argv[1],safe=""))' "$2")/$3" >/dev/null
}

# run_setup LABEL STORE_LINE WORKERS
run_setup() {
  local label=$1 store=$2 workers=$3 i ports clients=() rpcs=() pids=()
  for i in $(seq 1 "$workers"); do
    ports=$(write_config "$label-$i" "$store")
    clients+=("${ports% *}"); rpcs+=("${ports#* }")
  done
  for i in $(seq 1 "$workers"); do
    start_worker "$label-$i" "${clients[$((i-1))]}"; pids+=("$LAST_PID")
  done
  register "${rpcs[0]}" "@sender:bench.localhost" SENDER "tok-$label-sender"
  : >"$WORK/$label.tokens"
  for i in $(seq 0 $(( K > 16 ? K - 1 : 15 ))); do
    register "${rpcs[0]}" "@bench$i:bench.localhost" BENCH "tok-$label-$i"
    echo "tok-$label-$i" >>"$WORK/$label.tokens"
  done
  register "${rpcs[0]}" "@probe:bench.localhost" PROBE "tok-$label-probe"
  local recv=0
  [ "$workers" -gt 1 ] && recv=1
  "$BIN" bench --json --label "$label" -n "$N" -k "$K" -c "$C" \
    --sender-url "http://127.0.0.1:${clients[0]}" --sender-token "tok-$label-sender" \
    --receiver-url "http://127.0.0.1:${clients[$recv]}" \
    --receiver-tokens-file "$WORK/$label.tokens" --probe-token "tok-$label-probe" \
    --sender-pid "${pids[0]}" --receiver-pid "${pids[$recv]}"
  for pid in "${pids[@]}"; do kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; done
}

createdb() { as_pg psql -q -h "$WORK/pg" -U postgres -c "CREATE DATABASE $1" postgres; }

run_setup sqlite "sqlite = \"$WORK/sqlite/courier.db\"" 1
createdb bench1
run_setup postgres-1 "postgres = \"host=$WORK/pg user=postgres dbname=bench1\"" 1
createdb bench3
run_setup postgres-3 "postgres = \"host=$WORK/pg user=postgres dbname=bench3\"" 3
