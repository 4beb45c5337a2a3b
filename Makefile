# kez-chat developer entry points. `make test` is what CI runs (.ci/run), from a fresh clone.
CARGO ?= cargo

.PHONY: all tools browser-tools browser-chromium build test fmt vectors run demo soak bench

all: test

# The pinned nats-server (nats/VERSION) in .tools/venv; offline no-op once installed.
tools:
	bash nats/install.sh

# The browser tests' tools (tests/tests/ui_browser.rs): Debian's chromium, which only the system
# can install, and the playwright-core pinned in tests/browser/package-lock.json, installed with
# `npm ci` whenever node_modules is missing or older than the lock file.
KEZ_CHROMIUM ?= /usr/bin/chromium
BROWSER_MODULES := tests/browser/node_modules/.package-lock.json

browser-tools: browser-chromium $(BROWSER_MODULES)
	@echo "browser tests: $$("$(KEZ_CHROMIUM)" --version 2>/dev/null | head -n1), playwright-core $$(node -p "require('./tests/browser/node_modules/playwright-core/package.json').version")"

browser-chromium:
	@test -x "$(KEZ_CHROMIUM)" || { echo "chromium not found at $(KEZ_CHROMIUM) (the browser tests need it): sudo apt-get install -y chromium" >&2; exit 1; }

$(BROWSER_MODULES): tests/browser/package-lock.json tests/browser/package.json
	@command -v npm >/dev/null || { echo "npm not found (the browser tests need Node.js 20+ with npm): install Node.js 20+" >&2; exit 1; }
	cd tests/browser && npm ci --no-audit --no-fund
	touch $@

test: tools browser-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# tests/ runs the real kez-chat-server binary (kez_tests::process), so build it first.
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

# Fuzzes every target in fuzz/ for SOAK_SECS (default 60) seconds each; not part of `test`.
# Installs cargo-fuzz into .tools/cargo; crashes land in rust-lib/kez-fuzz/regressions/.
# Then the long form of delivery under faults (tests/tests/delivery_faults.rs): KEZ_SOAK_SECS
# (default 300) seconds of traffic through repeated broker, server and client kills.
KEZ_SOAK_SECS ?= 300
soak: tools build
	SOAK_CARGO=$(CARGO) bash fuzz/soak.sh
	KEZ_SOAK_SECS=$(KEZ_SOAK_SECS) $(CARGO) test -p kez-tests --test delivery_faults -- --nocapture

# Rewrites the committed KEZ test vectors and nats/nats-server.conf.example; review the diff.
vectors:
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --test vectors -- --test-threads=1
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-proto --test vectors
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --lib envelope::tests::committed
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --lib file::tests::committed
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --lib manifest::tests::committed
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --lib chat::tests::committed
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-chat-server --lib nats_conf

build:
	$(CARGO) build --workspace --bins

# A local stack in the foreground until Ctrl-C: nats-server, services, auth callout and HTTP shim
# on 127.0.0.1:14222 (HTTP 14280), domain kez.localhost, state in .kez-dev/ (kept across runs;
# delete it to start over). More flags: make run DEV_ARGS="--port 24222".
DEV_ARGS ?=
run: tools build
	target/debug/kez-chat-server dev --data-dir $(CURDIR)/.kez-dev $(DEV_ARGS)

# The scripted two-user session (scripts/demo.sh) against a throw-away stack on a free port.
demo: tools build
	bash scripts/demo.sh

# Benchmarks (tests/bench, BENCHMARKS.md): a release build of kez-bench and the binaries it runs
# (found beside it in target/release), then the table, also written to target/bench/results.json.
# ARGS=--quick is a smoke run of under two minutes; ARGS="--only chat" runs one section.
# Not part of `test`.
ARGS ?=
bench: tools browser-tools
	$(CARGO) build --release -p kez-bench -p kez-chat-server -p kez-chat
	target/release/kez-bench $(ARGS)
