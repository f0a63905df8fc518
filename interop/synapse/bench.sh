#!/usr/bin/env bash
# interop/synapse/bench.sh: run the same `courier bench` workloads against a
# Synapse pair and a Courier pair on this machine, in one run, and print the
# ratios. Both pairs are separate processes on loopback with real TLS
# federation between the two servers of a pair; `courier bench` drives each
# pair through the client-server API only (PUT /sendToDevice, long-poll GET
# /sync) and reads each server's CPU time and peak RSS from /proc/<pid>.
#
# It reuses the interop harness next to it: setup.sh (pinned Synapse venv),
# make_certs.sh (throwaway CA + localhost certificate), gen_config.py
# (loopback federation config; this script lowers bcrypt_rounds so that
# registering the benchmark users is quick). Courier relays are started
# with `courier serve` from a generated config; Synapse users are created
# through the shared-secret admin API, Courier devices through the RPC.
#
# Usage: interop/synapse/bench.sh            (all workloads, both pairs)
# Environment (all optional):
#   BENCH_WORK        work dir (default interop/synapse/work/bench-<time>)
#   BENCH_COURIER_BIN courier binary (default: cargo build --release, then
#                     target/release/courier). Not a COURIER_* name: Courier
#                     reads every COURIER_* variable as a config override.
#   BENCH_PAIRS       "synapse courier" (default) or one of them
#   BENCH_RECEIVERS   receiving users per pair (default 100; K=100 needs 100)
#   N_K1 N_K100       messages of the K=1,C=32 and K=100,C=8 workloads
#                     (default 5000 and 50000; the same for both pairs)
#   IDLE_SECONDS      length of the idle-probe run (default 20)
#   READY_TIMEOUT     seconds to wait for a server (default 90)
# Output: one summary table on stdout; each run's JSON report and the
# servers' logs under the work dir. Exits non-zero if any run lost or
# duplicated a message.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${SYNAPSE_VENV:-$here/.venv}"
py="$venv/bin/python"
READY_TIMEOUT="${READY_TIMEOUT:-90}"
BENCH_PAIRS="${BENCH_PAIRS:-synapse courier}"
BENCH_RECEIVERS="${BENCH_RECEIVERS:-100}"
N_K1="${N_K1:-5000}"
N_K100="${N_K100:-50000}"
IDLE_SECONDS="${IDLE_SECONDS:-20}"

log() { echo "bench.sh: $*" >&2; }

command -v curl >/dev/null || { log "curl is required"; exit 2; }
command -v setsid >/dev/null || { log "setsid (util-linux) is required"; exit 2; }

"$here/setup.sh"
if [[ -z "${BENCH_COURIER_BIN:-}" ]]; then
    log "building courier (release)"
    (cd "$root" && cargo build --release --quiet)
    BENCH_COURIER_BIN="$root/target/release/courier"
fi
BENCH_COURIER_BIN="$(realpath "$BENCH_COURIER_BIN")"

work="${BENCH_WORK:-$here/work/bench-$(date -u +%Y%m%dT%H%M%S)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
"$here/make_certs.sh" "$work/certs"
ca="$work/certs/dev-ca.crt"
cert="$work/certs/localhost.crt"
key="$work/certs/localhost.key"

# Ten free loopback ports: fed + client for each of the two Synapses,
# fed + client + rpc for each of the two Courier relays.
read -r -a port < <("$py" -c '
import socket
socks = [socket.socket() for _ in range(10)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')

# Alive and not a zombie.
alive() {
    [[ -r "/proc/$1/stat" ]] || return 1
    local state
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "$state" != Z && "$state" != X ]]
}

pids=()
# start DIR CLIENT_URL FED_PORT CMD...: start CMD in DIR in its own process
# group, record its PID, wait until client and federation listeners answer.
start() {
    local dir="$1" client="$2" fed="$3" pid deadline
    shift 3
    (cd "$dir" && exec setsid "$@") >>"$dir/stdout.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/run.pid"
    pids+=("$pid")
    deadline=$((SECONDS + READY_TIMEOUT))
    while true; do
        if ! alive "$pid"; then
            log "$dir: server exited during startup"
            tail -n 30 "$dir/stdout.log" "$dir/homeserver.log" >&2 2>/dev/null || true
            return 1
        fi
        if curl -fsS --max-time 2 -o /dev/null "$client/_matrix/client/versions" 2>/dev/null &&
            curl -fsS --max-time 2 -o /dev/null --cacert "$ca" \
                --resolve "localhost:$fed:127.0.0.1" \
                "https://localhost:$fed/_matrix/key/v2/server" 2>/dev/null; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log "$dir: not ready after ${READY_TIMEOUT}s"
            tail -n 30 "$dir/stdout.log" "$dir/homeserver.log" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.3
    done
}

# SIGTERM each recorded process group, SIGKILL after 20 s.
stop_all() {
    local pid i
    for pid in "${pids[@]}"; do
        alive "$pid" || continue
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 200; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "pid $pid ignored SIGTERM for 20s; SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    pids=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# ---- Synapse pair ---------------------------------------------------------

synapse_node() { # name fed client secret
    local dir="$work/synapse-$1"
    "$py" "$here/gen_config.py" --dir "$dir" --fed-port "$2" --client-port "$3" \
        --tls-cert "$cert" --tls-key "$key" --ca "$ca" --shared-secret "$4" \
        --retry-profile fast
    # homeserver.yaml is JSON; registering 100+ users with the default 12
    # bcrypt rounds would take minutes and measure nothing of interest.
    "$py" - "$dir/homeserver.yaml" <<'EOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["bcrypt_rounds"] = 4
json.dump(config, open(path, "w"), indent=2)
EOF
    start "$dir" "http://127.0.0.1:$3" "$2" "$py" -m synapse.app.homeserver -c homeserver.yaml
}

# synapse_users CLIENT_URL SECRET PREFIX COUNT OUT: register users through the
# shared-secret admin API, one token per line to OUT.
synapse_users() {
    "$py" - "$@" <<'EOF'
import hashlib, hmac, json, secrets, sys, urllib.request
url, secret, prefix, count, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def call(method, path, body=None):
    req = urllib.request.Request(url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)
tokens = []
for i in range(count):
    name = prefix if count == 1 else f"{prefix}{i:05d}"
    nonce = call("GET", "/_synapse/admin/v1/register")["nonce"]
    password = secrets.token_urlsafe(16)
    msg = b"\x00".join(s.encode() for s in (nonce, name, password, "notadmin"))
    mac = hmac.new(secret.encode(), msg, digestmod=hashlib.sha1).hexdigest()
    reg = call("POST", "/_synapse/admin/v1/register",
               {"nonce": nonce, "username": name, "password": password, "admin": False, "mac": mac})
    tokens.append(reg["access_token"])
open(out, "w").write("\n".join(tokens) + "\n")
EOF
}

# ---- Courier pair ---------------------------------------------------------

courier_node() { # name fed client rpc secret
    local dir="$work/courier-$1"
    mkdir -p "$dir"
    "$BENCH_COURIER_BIN" keygen --out "$dir/signing.key" >/dev/null
    cat >"$dir/courier.toml" <<EOF
server_name = "localhost:$2"
signing_key_path = "$dir/signing.key"

[federation]
bind = "127.0.0.1:$2"
tls_cert = "$cert"
tls_key = "$key"
extra_ca = ["$ca"]
ip_allow = ["127.0.0.0/8", "::1/128"]
retry_initial_ms = 500
retry_max_ms = 5000

[client]
bind = "127.0.0.1:$3"

[rpc]
bind = "127.0.0.1:$4"
secret = "$5"

[store]
sqlite = "$dir/courier.db"
EOF
    RUST_LOG="${RUST_LOG:-warn}" start "$dir" "http://127.0.0.1:$3" "$2" \
        "$BENCH_COURIER_BIN" serve --config "$dir/courier.toml"
}

# courier_users RPC_URL SECRET SERVER PREFIX COUNT OUT: register devices over
# the RPC with fresh tokens, one token per line to OUT.
courier_users() {
    "$py" - "$@" <<'EOF'
import json, secrets, sys, urllib.parse, urllib.request
rpc, secret, server, prefix, count, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
tokens = []
for i in range(count):
    name = prefix if count == 1 else f"{prefix}{i:05d}"
    user = f"@{name}:{server}"
    token = secrets.token_urlsafe(24)
    path = "/_courier/v1/devices/%s/%s" % (urllib.parse.quote(user, safe=""), "BENCH")
    req = urllib.request.Request(rpc + path, method="PUT",
        data=json.dumps({"access_token": token}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
    tokens.append(token)
open(out, "w").write("\n".join(tokens) + "\n")
EOF
}

# ---- workloads --------------------------------------------------------------

status=0
# run_workloads KIND SENDER_URL RECEIVER_URL SENDER_PID RECEIVER_PID DIR
run_workloads() {
    local kind="$1" surl="$2" rurl="$3" spid="$4" rpid="$5" dir="$6"
    local common=(--sender-url "$surl" --sender-token "$(cat "$dir/sender.tokens")"
        --receiver-url "$rurl" --receiver-tokens-file "$dir/receivers.tokens"
        --probe-token "$(cat "$dir/probe.tokens")"
        --sender-pid "$spid" --receiver-pid "$rpid" --json)
    local name args
    while read -r name args; do
        [[ -n "$name" ]] || continue
        log "$kind: $name ($args)"
        # shellcheck disable=SC2086  # args is a list of flags
        if ! "$BENCH_COURIER_BIN" bench "${common[@]}" --label "$kind $name" $args \
            >"$work/$kind-$name.json" 2>"$work/$kind-$name.log"; then
            log "$kind $name: FAILED (see $work/$kind-$name.log / .json)"
            status=1
        fi
    done <<EOF
k1c32 -n $N_K1 -k 1 -c 32 --duration 120
k100c8 -n $N_K100 -k 100 -c 8 --duration 120
idle -n 0 --duration $IDLE_SECONDS
EOF
}

for kind in $BENCH_PAIRS; do
    case "$kind" in
        synapse)
            secret_a="$(openssl rand -hex 16)"
            secret_b="$(openssl rand -hex 16)"
            synapse_node a "${port[0]}" "${port[1]}" "$secret_a"
            synapse_node b "${port[2]}" "${port[3]}" "$secret_b"
            sa="http://127.0.0.1:${port[1]}"
            sb="http://127.0.0.1:${port[3]}"
            d="$work/synapse-tokens"
            mkdir -p "$d"
            synapse_users "$sa" "$secret_a" benchsender 1 "$d/sender.tokens"
            synapse_users "$sb" "$secret_b" benchprobe 1 "$d/probe.tokens"
            synapse_users "$sb" "$secret_b" bench "$BENCH_RECEIVERS" "$d/receivers.tokens"
            run_workloads synapse "$sa" "$sb" "$(cat "$work/synapse-a/run.pid")" \
                "$(cat "$work/synapse-b/run.pid")" "$d"
            stop_all
            ;;
        courier)
            secret="$(openssl rand -hex 16)"
            courier_node a "${port[4]}" "${port[5]}" "${port[6]}" "$secret"
            courier_node b "${port[7]}" "${port[8]}" "${port[9]}" "$secret"
            ca_url="http://127.0.0.1:${port[5]}"
            cb_url="http://127.0.0.1:${port[8]}"
            d="$work/courier-tokens"
            mkdir -p "$d"
            courier_users "http://127.0.0.1:${port[6]}" "$secret" "localhost:${port[4]}" \
                benchsender 1 "$d/sender.tokens"
            courier_users "http://127.0.0.1:${port[9]}" "$secret" "localhost:${port[7]}" \
                benchprobe 1 "$d/probe.tokens"
            courier_users "http://127.0.0.1:${port[9]}" "$secret" "localhost:${port[7]}" \
                bench "$BENCH_RECEIVERS" "$d/receivers.tokens"
            run_workloads courier "$ca_url" "$cb_url" "$(cat "$work/courier-a/run.pid")" \
                "$(cat "$work/courier-b/run.pid")" "$d"
            stop_all
            ;;
        *) log "unknown pair kind $kind"; exit 2 ;;
    esac
done

# ---- summary ------------------------------------------------------------------

# shellcheck disable=SC2086  # BENCH_PAIRS is a list of pair kinds
"$py" - "$work" $BENCH_PAIRS <<'EOF'
import json, os, sys
work, kinds = sys.argv[1], sys.argv[2:]
def load(kind, name):
    try:
        return json.load(open(os.path.join(work, f"{kind}-{name}.json")))
    except (OSError, ValueError):
        return None
def cpu(r, role):
    for u in r["usage"]:
        if u["what"].startswith(role):
            return u["cpu_s"], u["peak_rss_mib"]
    return None, None
rows = []
print(f"{'workload':<8} {'pair':<8} {'delivered/s':>11} {'accepted/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
      f"{'probe p50':>9} {'probe p99':>9} {'cpu A s':>7} {'cpu B s':>7} {'rss A MiB':>9} {'rss B MiB':>9} ok")
for name in ("k1c32", "k100c8", "idle"):
    by_kind = {}
    for kind in kinds:
        r = load(kind, name)
        if r is None:
            print(f"{name:<8} {kind:<8} (no report)")
            continue
        by_kind[kind] = r
        lat = r["latency"] or {}
        probe = r["probe"]["latency"] or {}
        ca, ra = cpu(r, "sender")
        cb, rb = cpu(r, "receiver")
        print(f"{name:<8} {kind:<8} {r['delivered_per_s']:>11.0f} {r['accepted_per_s']:>10.0f} "
              f"{lat.get('p50_ms', float('nan')):>7.1f} {lat.get('p99_ms', float('nan')):>7.1f} "
              f"{probe.get('p50_ms', float('nan')):>9.1f} {probe.get('p99_ms', float('nan')):>9.1f} "
              f"{ca or 0:>7.2f} {cb or 0:>7.2f} {ra or 0:>9.1f} {rb or 0:>9.1f} {r['ok']}")
    if "synapse" in by_kind and "courier" in by_kind:
        s, c = by_kind["synapse"], by_kind["courier"]
        if name != "idle" and s["delivered_per_s"]:
            print(f"{'':<8} ratio    courier/synapse delivered/s = {c['delivered_per_s'] / s['delivered_per_s']:.1f}x")
        sp, cp = s["probe"]["latency"], c["probe"]["latency"]
        if sp and cp and cp["p50_ms"] and cp["p99_ms"]:
            print(f"{'':<8} ratio    synapse/courier probe p50 = {sp['p50_ms'] / cp['p50_ms']:.1f}x, "
                  f"p99 = {sp['p99_ms'] / cp['p99_ms']:.1f}x")
print(f"reports: {work}")
EOF
exit "$status"
