#!/usr/bin/env bash
# interop/synapse/make_certs.sh OUT_DIR: write a throwaway development CA and
# one leaf certificate for localhost / 127.0.0.1 / ::1 signed by it:
#   OUT_DIR/dev-ca.crt  OUT_DIR/dev-ca.key  OUT_DIR/localhost.crt  OUT_DIR/localhost.key
# (same file names as Courier's certs/ directory, so either can be passed to
# run.sh). ECDSA P-256, valid 30 days. Never commit the output.
set -euo pipefail

out="${1:?usage: make_certs.sh OUT_DIR}"
mkdir -p "$out"
cd "$out"

ossl() {
    local log
    log="$(openssl "$@" 2>&1)" || { echo "make_certs.sh: openssl $1 failed: $log" >&2; exit 1; }
}

ossl ecparam -name prime256v1 -genkey -noout -out dev-ca.key
ossl req -x509 -new -key dev-ca.key -sha256 -days 30 \
    -subj "/CN=Courier interop throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out dev-ca.crt

ossl ecparam -name prime256v1 -genkey -noout -out localhost.key.sec1
# PKCS#8 is what both Synapse (pyOpenSSL) and rustls-pemfile read happily.
ossl pkcs8 -topk8 -nocrypt -in localhost.key.sec1 -out localhost.key
rm -f localhost.key.sec1
ossl req -new -key localhost.key -subj "/CN=localhost" -out localhost.csr
cat >localhost.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash
EOF
ossl x509 -req -in localhost.csr -CA dev-ca.crt -CAkey dev-ca.key -CAcreateserial \
    -sha256 -days 30 -extfile localhost.ext -out localhost.crt
rm -f localhost.csr localhost.ext dev-ca.srl
chmod 600 dev-ca.key localhost.key
