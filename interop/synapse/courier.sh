#!/usr/bin/env bash
# Starts a Courier relay for run.sh from the environment it exports
# (INTEROP_COURIER_*, INTEROP_TLS_*, INTEROP_CA_CERT, INTEROP_DATA_DIR).
# Writes the config and, on first start only, the signing key into
# $INTEROP_DATA_DIR, then execs `courier serve`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${COURIER_BIN:-$repo/target/debug/courier}"
data="${INTEROP_DATA_DIR:?}"
mkdir -p "$data"
[[ -f "$data/signing.key" ]] || "$bin" keygen --out "$data/signing.key" --version interop >/dev/null
cat >"$data/courier.toml" <<TOML
server_name = "${INTEROP_COURIER_SERVER_NAME:?}"
signing_key_path = "$data/signing.key"

[federation]
bind = "127.0.0.1:${INTEROP_COURIER_FED_PORT:?}"
tls_cert = "${INTEROP_TLS_CERT:?}"
tls_key = "${INTEROP_TLS_KEY:?}"
extra_ca = ["${INTEROP_CA_CERT:?}"]
ip_allow = ["127.0.0.0/8", "::1/128"]
retry_initial_ms = 500
retry_max_ms = 5000

[client]
bind = "127.0.0.1:${INTEROP_COURIER_CLIENT_PORT:?}"

[rpc]
bind = "127.0.0.1:${INTEROP_COURIER_RPC_PORT:?}"
secret = "${INTEROP_COURIER_RPC_SECRET:?}"

[store]
sqlite = "$data/courier.db"
TOML
export COURIER_LOG="${COURIER_LOG:-info,courier=debug}"
exec "$bin" serve --config "$data/courier.toml"
