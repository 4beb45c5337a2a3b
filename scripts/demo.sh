#!/usr/bin/env bash
# The scripted two-user kez-chat session (`make demo`).
#
# Starts `kez-chat-server dev --pin --federate` (nats-server child + services + auth callout + pin
# node) in a temporary directory on a free loopback port, then alice and bob, each with their own
# home, register, add each other and chat (offline delivery, `inbox`, live `listen`, `history`),
# alice shares a file with bob, and publishes files that bob browses and downloads; a second
# server (far.localhost) starts, and carol there chats with alice across the two servers and
# browses her files; bob pairs his phone, which
# then receives and sends as him; alice makes a paper key, and recovers from it on a new home
# that revokes her lost laptop. Every step prints the
# command and its output and is checked; the first failed check stops the demo with exit 1. The
# stack and any background listener are always torn down, and the temporary directory removed
# (KEZ_DEMO_KEEP=1 keeps it).
#
# Needs the built binaries (cargo build --workspace --bins) and nats-server (make tools);
# `make demo` does both first. KEZ_DEMO_BIN_DIR overrides where the binaries are (target/debug).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${KEZ_DEMO_BIN_DIR:-$root/target/debug}"
for bin in kez-chat kez-chat-server; do
    [[ -x "$bin_dir/$bin" ]] || {
        echo "demo: $bin_dir/$bin not found; run \`make demo\` (or cargo build --workspace --bins)" >&2
        exit 1
    }
done
# The printed commands are exactly the ones run: `kez-chat` from the build, homes relative to
# the demo directory.
export PATH="$bin_dir:$PATH"
unset KEZ_CHAT_HOME KEZ_CHAT_SERVER KEZ_DEV_DATA_DIR
export NO_COLOR=1

demo_dir="$(mktemp -d "${TMPDIR:-/tmp}/kez-demo.XXXXXX")"
dev_pid=""
far_pid=""
listen_pid=""
join_pid=""
steps=0
started=$SECONDS

stop_pid() { # pid signal: signal it, wait up to 15 s, then SIGKILL
    local pid="$1" signal="$2" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_pid "$listen_pid" INT
    stop_pid "$join_pid" INT
    # Each home's kez-chat service (the first command of a registered home started it).
    for home in "$demo_dir"/*/; do
        [[ -S "$home/service.sock" ]] && "$bin_dir/kez-chat" --home "$home" service stop >/dev/null 2>&1 || true
    done
    # dev stops its services, then its nats-server child.
    stop_pid "$far_pid" TERM
    stop_pid "$dev_pid" TERM
    if [[ "${KEZ_DEMO_KEEP:-}" == 1 || $status -ne 0 ]]; then
        echo "demo: files kept in $demo_dir (dev.out, dev.log, data/nats-server.log, homes)"
    else
        rm -rf "$demo_dir"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    echo >&2
    echo "demo: FAILED: $*" >&2
    if [[ -s "$demo_dir/dev.log" ]]; then
        echo "demo: the last lines of the dev stack's log ($demo_dir/dev.log):" >&2
        tail -n 15 "$demo_dir/dev.log" | sed 's/^/    /' >&2
    fi
    exit 1
}

say() { printf '\n# %s\n' "$*"; }

# step EXPECTED COMMAND...: prints `$ COMMAND`, runs it (stdout and stderr together), prints the
# output indented, and fails unless it exits 0 and its output contains EXPECTED (a fixed string).
step() {
    local expected="$1" output status
    shift
    steps=$((steps + 1))
    printf '$ %s\n' "$(quote "$@")"
    set +e
    output="$("$@" 2>&1)"
    status=$?
    set -e
    if [[ -n "$output" ]]; then printf '%s\n' "$output" | sed 's/^/    /'; fi
    [[ $status -eq 0 ]] || fail "\`$(quote "$@")\` exited with status $status"
    [[ "$output" == *"$expected"* ]] || fail "\`$(quote "$@")\` did not print \"$expected\""
}

# Shell-quotes arguments for display, only where needed.
quote() {
    local arg out=()
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9@%_+=:,./-]+$ ]]; then
            out+=("$arg")
        elif [[ "$arg" != *"'"* ]]; then
            out+=("'$arg'")
        else
            out+=("$(printf '%q' "$arg")")
        fi
    done
    printf '%s' "${out[*]}"
}

# free_port: a loopback TCP port nothing listens on (the two servers must know each other's
# WebFinger address before either starts).
free_port() {
    local port i
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    fail "no free loopback port found"
}

# start_dev OUT LOG ARGS...: starts `kez-chat-server dev ARGS` in the background (pid in
# $started_pid), waits for its banner in OUT and prints it; its NATS URL goes into $started_url.
start_dev() {
    local out="$1" log="$2" i
    shift 2
    kez-chat-server dev "$@" >"$out" 2>"$log" &
    started_pid=$!
    for ((i = 0; i < 600; i++)); do
        grep -q '^  NATS URL' "$out" 2>/dev/null && break
        kill -0 "$started_pid" 2>/dev/null || { cat "$out" >&2; fail "kez-chat-server dev exited before serving"; }
        sleep 0.1
    done
    grep -q '^  NATS URL' "$out" || fail "kez-chat-server dev did not serve within 60s"
    sed 's/^/    /' "$out"
    started_url="$(awk '/^  NATS URL/ { print $3; exit }' "$out")"
    [[ "$started_url" == nats://127.0.0.1:* ]] || fail "no NATS URL in the dev banner"
}

# wait_for FILE TEXT SECONDS WHAT: waits until FILE contains TEXT.
wait_for() {
    local file="$1" text="$2" seconds="$3" what="$4" i
    for ((i = 0; i < seconds * 10; i++)); do
        grep -qF -- "$text" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "$what: \"$text\" did not appear in $file within ${seconds}s"
}

cd "$demo_dir"
echo "kez-chat demo in $demo_dir"

say "A local stack: nats-server (child), registry + sigchain services, auth callout, HTTP shim"
http_port="$(free_port)"
far_http_port="$(free_port)"
while [[ "$far_http_port" == "$http_port" ]]; do far_http_port="$(free_port)"; done
# It federates: a second server, far.localhost, starts later; each finds the other's WebFinger
# on loopback (plain HTTP: a development allowance; production asks https://<domain>).
dev_args=(--data-dir data --port 0 --http-port "$http_port" --pin --federate --federation-allow-http
    --peer-webfinger "far.localhost=http://127.0.0.1:$far_http_port")
printf '$ kez-chat-server dev %s &\n' "$(quote "${dev_args[@]}")"
start_dev dev.out dev.log "${dev_args[@]}"
dev_pid=$started_pid
url=$started_url

say "alice and bob register, each with their own home (key, contacts, messages)"
step "registered as @alice@kez.localhost" kez-chat --home alice --server "$url" register alice --no-paper-key
step "registered as @bob@kez.localhost" kez-chat --home bob --server "$url" register bob --no-paper-key
step "@alice@kez.localhost" kez-chat --home alice whoami

say "They add each other: look up, verify the sigchain, pin the key"
step "added @bob@kez.localhost (key pinned)" kez-chat --home alice add @bob
step "added @alice@kez.localhost (key pinned)" kez-chat --home bob add @alice
step "sigchain    verified: seq 3" kez-chat --home alice profile @bob

say "alice writes while bob is offline: the broker keeps the ciphertext for him"
step "delivered to server for @bob@kez.localhost" kez-chat --home alice send @bob "hi bob, are you there?"
step "delivered to server for @bob@kez.localhost" kez-chat --home alice send @bob "(sent while you were away)"

say "bob comes online and reads his inbox"
step "@alice@kez.localhost: hi bob, are you there?" kez-chat --home bob inbox

say "bob listens in the background; alice's messages show up live"
printf '$ kez-chat --home bob listen > bob-listen.out &\n'
kez-chat --home bob listen >bob-listen.out 2>&1 &
listen_pid=$!
wait_for bob-listen.out "listening as @bob@kez.localhost" 30 "bob's listen"
step "delivered to server" kez-chat --home alice send @bob "are you getting these live?"
step "delivered to server" kez-chat --home alice send @bob "one more"
steps=$((steps + 1))
wait_for bob-listen.out "@alice@kez.localhost: are you getting these live?" 30 "bob's listen"
wait_for bob-listen.out "@alice@kez.localhost: one more" 30 "bob's listen"
echo "bob's listen printed:"
sed 's/^/    /' bob-listen.out
stop_pid "$listen_pid" INT
listen_pid=""

say "bob answers; alice reads it"
step "delivered to server for @alice@kez.localhost" kez-chat --home bob send @alice "yes, loud and clear"
step "@bob@kez.localhost: yes, loud and clear" kez-chat --home alice inbox

say "Both keep the whole conversation locally"
step "you: are you getting these live?" kez-chat --home alice history @bob
step "@alice@kez.localhost: one more" kez-chat --home bob history @alice

say "alice shares a file with bob: encrypted on her machine, offered end to end, served by her node"
head -c 3000000 /dev/urandom >holiday.jpg
printf '$ head -c 3000000 /dev/urandom > holiday.jpg\n'
step "shared holiday.jpg (2.9 MiB) with @bob@kez.localhost" kez-chat --home alice share --no-wait @bob holiday.jpg
step "offers the file holiday.jpg (2.9 MiB)" kez-chat --home bob inbox
step "holiday.jpg  2.9 MiB  not downloaded" kez-chat --home bob files
offer="$(kez-chat --home bob files --json | grep -o '"offer":"[0-9a-f]\{12\}' | head -n 1 | cut -d'"' -f4)"
[[ -n "$offer" ]] || fail "no offer id in \`kez-chat --home bob files --json\`"

say "bob downloads it while alice's node runs (her listen serves her files)"
printf '$ kez-chat --home alice listen > alice-listen.out &\n'
kez-chat --home alice listen >alice-listen.out 2>&1 &
listen_pid=$!
wait_for alice-listen.out "serving your shared files" 30 "alice's listen"
step "verified (BLAKE3) and decrypted" kez-chat --home bob download "$offer" -o holiday-from-alice.jpg
stop_pid "$listen_pid" INT
listen_pid=""
steps=$((steps + 1))
printf '$ cmp holiday.jpg holiday-from-alice.jpg\n'
cmp holiday.jpg holiday-from-alice.jpg || fail "the downloaded file differs from the original"
echo "    identical"

say "alice publishes notes.txt for everyone and plans.txt only for bob, pinned on her server"
printf 'notes anyone may read\n' >notes.txt
printf 'the surprise party is on friday\n' >plans.txt
printf '$ printf ... > notes.txt; printf ... > plans.txt\n'
step "published notes.txt" kez-chat --home alice publish --public --pin notes.txt
step "published plans.txt" kez-chat --home alice publish --to @bob --pin plans.txt
step "to @bob@kez.localhost" kez-chat --home alice shared

say "bob browses alice's files while she is offline: manifest verified, plans.txt sealed to him"
step "shared with you" kez-chat --home bob browse @alice
step "verified (BLAKE3) and decrypted" kez-chat --home bob download @alice/plans.txt -o plans-from-alice.txt
printf '$ cmp plans.txt plans-from-alice.txt\n'
cmp plans.txt plans-from-alice.txt || fail "the downloaded file differs from the published one"
echo "    identical"
step "files       2 visible to you" kez-chat --home bob profile @alice

say "A second home server, far.localhost: carol lives there; the servers find each other through WebFinger"
far_args=(--data-dir data-far --port 0 --http-port "$far_http_port" --domain far.localhost --federate
    --federation-allow-http --peer-webfinger "kez.localhost=http://127.0.0.1:$http_port")
printf '$ kez-chat-server dev %s &\n' "$(quote "${far_args[@]}")"
start_dev far.out far.log "${far_args[@]}"
far_pid=$started_pid
far_url=$started_url
step "registered as @carol@far.localhost" kez-chat --home carol --server "$far_url" register carol --no-paper-key

say "alice writes to carol on the other server: her server queues it and hands it to carol's"
step "added @carol@far.localhost (key pinned)" kez-chat --home alice add @carol@far.localhost
step "handed to your server for @carol@far.localhost" kez-chat --home alice send @carol@far.localhost "hello from kez.localhost"
step "@alice@kez.localhost" kez-chat --home carol inbox --wait 30

say "carol adds alice (her client verifies alice's sigchain through far.localhost) and answers"
step "added @alice@kez.localhost (key pinned)" kez-chat --home carol add @alice@kez.localhost
step "handed to your server for @alice@kez.localhost" kez-chat --home carol send @alice@kez.localhost "hi alice, greetings from far away"
step "@carol@far.localhost: hi alice, greetings from far away" kez-chat --home alice inbox --wait 30

say "carol browses alice's public files across the servers and downloads one"
step "notes.txt" kez-chat --home carol browse @alice@kez.localhost
step "verified (BLAKE3) and decrypted" kez-chat --home carol download @alice@kez.localhost/notes.txt -o notes-from-alice.txt
printf '$ cmp notes.txt notes-from-alice.txt\n'
cmp notes.txt notes-from-alice.txt || fail "the file downloaded across servers differs"
echo "    identical"

say "bob adds his phone: the new device shows a pairing request, bob confirms it on his laptop"
printf '$ kez-chat --home bob-phone --server %s device join @bob --name phone --kind mobile &\n' "$url"
kez-chat --home bob-phone --server "$url" device join @bob --name phone --kind mobile >join.out 2>join.err &
join_pid=$!
wait_for join.out "kez-pair:" 30 "kez-chat device join"
wait_for join.err "Fingerprint: " 30 "kez-chat device join"
request="$(grep -m 1 '^kez-pair:' join.out)"
grep -v '█\|▀\|▄' join.err | sed 's/^/    /'
step "Added device phone (mobile)" kez-chat --home bob device add "$request" --yes
steps=$((steps + 1))
wait "$join_pid" || fail "kez-chat device join failed: $(cat join.err)"
join_pid=""
grep -v '^kez-pair:' join.out | sed 's/^/    /'
grep -q "This home is now device phone (mobile) of @bob@kez.localhost" join.out ||
    fail "the phone did not become bob's device"
step "phone  mobile" kez-chat --home bob-phone devices
step "delivered to server for @bob@kez.localhost" kez-chat --home alice send @bob "see you on your phone too"
step "@alice@kez.localhost: see you on your phone too" kez-chat --home bob-phone inbox
step "@alice@kez.localhost: see you on your phone too" kez-chat --home bob inbox
step "delivered to server for @alice@kez.localhost" kez-chat --home bob-phone send @alice "typed on my phone"
step "you → @alice@kez.localhost: typed on my phone" kez-chat --home bob inbox
step "@bob@kez.localhost: typed on my phone" kez-chat --home alice inbox

say "alice makes a paper key: 24 words shown once, one typed back, then a device in her chain"
printf '$ kez-chat --home alice paperkey\n'
mkfifo paperkey.in
kez-chat --home alice paperkey <paperkey.in >paperkey.out 2>paperkey.err &
paper_pid=$!
exec {paper_in}>paperkey.in
wait_for paperkey.err "wrote them down: " 30 "kez-chat paperkey"
paper_words=()
while IFS= read -r line; do
    if [[ "$line" == "  "* ]]; then
        read -ra tokens <<<"$line"
        for ((k = 1; k < ${#tokens[@]}; k += 2)); do paper_words+=("${tokens[k]}"); done
    fi
done <paperkey.out
((${#paper_words[@]} == 24)) || fail "kez-chat paperkey did not show 24 words"
position="$(grep -o 'Type word [0-9]*' paperkey.err | awk '{ print $3 }')"
printf '%s\n' "${paper_words[position - 1]}" >&"$paper_in"
exec {paper_in}>&-
wait "$paper_pid" || fail "kez-chat paperkey failed: $(cat paperkey.err)"
sed 's/^/    /' paperkey.out
[[ "$(cat paperkey.out)" == *"Added paper key paper1"* ]] || fail "the paper key was not added"
steps=$((steps + 1))

say "alice loses her laptop: the paper key makes a new home her device and revokes the laptop"
printf '$ echo "<the 24 words>" | kez-chat --home alice-desk --server %s recover @alice --name desk --revoke primary\n' "$url"
recovered="$(printf '%s\n' "${paper_words[*]}" | kez-chat --home alice-desk --server "$url" recover @alice --name desk --revoke primary 2>&1)" ||
    fail "kez-chat recover failed: $recovered"
printf '%s\n' "$recovered" | sed 's/^/    /'
[[ "$recovered" == *"This home is now @alice@kez.localhost, device desk"* ]] || fail "recover did not make the device"
steps=$((steps + 1))
step "REVOKED at link" kez-chat --home alice-desk devices
step "added @bob@kez.localhost (key pinned)" kez-chat --home alice-desk add @bob
step "delivered to server for @alice@kez.localhost" kez-chat --home bob send @alice "is this your new device?"
step "@bob@kez.localhost: is this your new device?" kez-chat --home alice-desk inbox
step "you: is this your new device?" kez-chat --home bob history @alice
printf '$ kez-chat --home alice inbox    # the lost laptop\n'
if lost="$(kez-chat --home alice inbox 2>&1)"; then fail "the revoked laptop still reads mail: $lost"; fi
printf '%s\n' "$lost" | sed 's/^/    /'
steps=$((steps + 1))

say "Stop far.localhost, then the first stack (SIGTERM): services first, then their nats-servers"
stop_pid "$far_pid" TERM
far_pid=""
printf '$ kill -TERM %s\n' "$dev_pid"
kill -TERM "$dev_pid"
for ((i = 0; i < 300; i++)); do
    kill -0 "$dev_pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$dev_pid" 2>/dev/null && fail "kez-chat-server dev did not stop within 30s of SIGTERM"
dev_status=0
wait "$dev_pid" || dev_status=$?
dev_pid=""
[[ $dev_status -eq 0 ]] || fail "kez-chat-server dev exited with status $dev_status after SIGTERM"
grep -q "dev: stopped" dev.out || fail "kez-chat-server dev did not report a clean stop"
echo "    $(tail -n 1 dev.out)"

echo
echo "demo: all $steps steps passed in $((SECONDS - started))s"
