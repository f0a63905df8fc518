#!/usr/bin/env bash
# interop/synapse/setup.sh: create (or reuse) the Synapse venv for the interop
# harness at interop/synapse/.venv, with the versions pinned in
# requirements.txt. Idempotent: a venv whose stamp matches requirements.txt is
# left alone. Quiet unless something fails (then pip's output is printed).
#
# Environment:
#   PYTHON        interpreter to build the venv with (default: python3.11,
#                 else python3); must be CPython >= 3.10.
#   SYNAPSE_VENV  venv location (default: interop/synapse/.venv)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SYNAPSE_VENV:-$here/.venv}"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
fail() {
    echo "setup.sh: $1 failed; output follows" >&2
    cat "$log" >&2
    exit 1
}

rm -rf "$venv"
"$PYTHON" -m venv "$venv" >"$log" 2>&1 || fail "python -m venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
    --require-virtualenv -r "$req" >"$log" 2>&1 || fail "pip install -r requirements.txt"
"$venv/bin/python" -c 'import synapse.app.homeserver' >"$log" 2>&1 || fail "import synapse"
echo "$want" >"$stamp"
