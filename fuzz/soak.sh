#!/usr/bin/env bash
# `make soak`: every fuzz target for SOAK_SECS seconds each (default 60), on stable Rust through
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly flags). Installs the pinned cargo-fuzz into
# .tools/cargo if missing, seeds the corpora from the committed vectors, copies every crash into
# rust-lib/kez-fuzz/regressions/<target>/ and fails if there was one. One summary line per target.
#
#   SOAK_SECS=20 make soak            # shorter
#   SOAK_TARGETS="sigchain envelope" make soak
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# Not CARGO: cargo forwards a CARGO set in the environment to build scripts and rustc, whose
# fingerprints then differ from `make test`'s and target/ is rebuilt from scratch.
CARGO=${SOAK_CARGO:-cargo}
SOAK_SECS=${SOAK_SECS:-60}
SOAK_MAX_LEN=${SOAK_MAX_LEN:-16384}
CARGO_FUZZ_VERSION=0.13.2
tools=$root/.tools/cargo
export PATH="$tools/bin:$PATH"
# Only for cargo-fuzz's own builds (fuzz/target): cargo fingerprints RUSTC_BOOTSTRAP, so setting it
# for the workspace would rebuild target/ from scratch, twice.
fuzz() { (cd fuzz && RUSTC_BOOTSTRAP=1 "$CARGO" fuzz "$@"); }

if ! cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "soak: installing cargo-fuzz $CARGO_FUZZ_VERSION into .tools/cargo"
    "$CARGO" install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$tools"
fi

all_targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^kez-fuzz-targets$')
targets=${SOAK_TARGETS:-$all_targets}

echo "soak: seeding fuzz/corpus from the committed vectors"
"$CARGO" run -q -p kez-fuzz --bin kez-fuzz-seeds -- fuzz/corpus

echo "soak: building the targets (release, debug assertions, sanitizer coverage)"
fuzz build --debug-assertions

logs=$root/fuzz/artifacts/logs
mkdir -p "$logs"
failed=0
summary=()
for target in $targets; do
    artifacts=$root/fuzz/artifacts/$target
    rm -rf "$artifacts"
    mkdir -p "$artifacts"
    log=$logs/$target.log
    status=0
    fuzz run --debug-assertions "$target" "corpus/$target" -- \
        -max_total_time="$SOAK_SECS" -max_len="$SOAK_MAX_LEN" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    crashes=0
    for crash in "$artifacts"/*; do
        [ -f "$crash" ] || continue
        crashes=$((crashes + 1))
        mkdir -p "rust-lib/kez-fuzz/regressions/$target"
        cp "$crash" "rust-lib/kez-fuzz/regressions/$target/"
    done
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes="?(exit $status, see fuzz/artifacts/logs/$target.log)"
    fi
    if [ "$status" -ne 0 ] || [ "$crashes" != 0 ]; then
        failed=1
    fi
    line=$(printf 'soak: %-16s runs %-10s crashes %s' "$target" "${runs:-?}" "$crashes")
    echo "$line"
    summary+=("$line")
done

echo "soak: summary (${SOAK_SECS}s per target)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "soak: FAILED: crashes were copied into rust-lib/kez-fuzz/regressions/; logs in fuzz/artifacts/logs/" >&2
    exit 1
fi
