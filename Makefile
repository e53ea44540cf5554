# The two commands a new user needs:
#   make demo   install what is missing, start the local stack, drive a short load, and print
#               messages published vs rows stored (the stack keeps running; `make down` stops it)
#   make test   install what is missing, check formatting and lints, run every test
.PHONY: deps build demo up down status test fmt clippy bench-api bench-e2e bench-alerts bench-bridge bench-worker bench-overload chaos fuzz

CARGO ?= cargo

deps:
	scripts/install-deps.sh

build:
	$(CARGO) build --release -p telemetry-worker -p telemetry-bridge -p telemetry-api -p load-tester

up: deps build
	scripts/stack.sh up

demo: up
	scripts/demo.sh

down:
	scripts/stack.sh down

status:
	scripts/stack.sh status

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps fmt clippy
	$(CARGO) test --workspace

# Latest-value requests/s and p99 through the API vs plain SELECTs on the same pool (one JSON line last).
bench-api:
	$(CARGO) run --release -p benchmarks --bin bench_api

# The local stack's sustained MQTT -> PostgreSQL rate (verified, e2e p99 under 1 s) and the e2e
# latency at half of it (one JSON line last). Starts the stack; leaves it running.
bench-e2e: deps
	$(CARGO) build --release -p telemetry-worker -p telemetry-bridge -p telemetry-api -p load-tester
	$(CARGO) run --release -p benchmarks --bin bench_e2e

# Device publish -> alert received by its owner, p50/p99, at half the sustained rate (one JSON
# line last). Measures the sustained rate first if bench-e2e has not on this stack.
bench-alerts: deps
	$(CARGO) build --release -p telemetry-worker -p telemetry-bridge -p telemetry-api -p load-tester
	$(CARGO) build --release -p benchmarks --bin bench_e2e
	$(CARGO) run --release -p benchmarks --bin bench_alerts

# The bridge's MQTT -> Kafka rate against the slower bare leg, the latency it adds at half that
# rate, and its peak RSS, on private Mosquitto and Tansu (one JSON line last).
bench-bridge:
	$(CARGO) build --release -p telemetry-bridge
	$(CARGO) run --release -p benchmarks --bin bench_bridge

# The worker's write path (Sink::store) vs psql \copy through the same PgBouncer, and its drain of
# a filled topic vs a consume-and-discard consumer, with its peak RSS (one JSON line last).
# Quicker: make bench-worker BENCH_WORKER_ARGS="--messages 20000 --rounds 1"
bench-worker:
	$(CARGO) build --release -p telemetry-worker -p benchmarks
	$(CARGO) run --release -p benchmarks --bin bench_worker -- $(BENCH_WORKER_ARGS)

# The local stack offered 1.5x its sustained rate (from bench-e2e) for 60 s, then drained:
# acked, stored, lost, duplicated, drain time, bridge reconnects and peak RSS (one JSON line last).
bench-overload: deps
	$(CARGO) build --release -p telemetry-worker -p telemetry-bridge -p telemetry-api -p load-tester
	$(CARGO) build --release -p benchmarks --bin bench_e2e
	$(CARGO) run --release -p benchmarks --bin bench_overload -- $(BENCH_OVERLOAD_ARGS)

# A fault drill: the local stack (its own, on durable Kafka storage) under steady load while a
# seeded schedule of twelve faults runs; per fault the time to recover and the peak lag, then
# lost/duplicated readings and alerts (one JSON line last; exit 1 if a guarantee broke).
# Another order: make chaos CHAOS_ARGS="--seed 7"; some faults: CHAOS_ARGS="--only cut-kafka".
chaos: deps
	$(CARGO) build --release -p telemetry-worker -p telemetry-bridge -p telemetry-api -p load-tester
	$(CARGO) build --release -p benchmarks --bin chaos
	$(CARGO) run --release -p benchmarks --bin chaos -- $(CHAOS_ARGS)

# cargo-fuzz on the parsers of what devices and operators send: MQTT topics through the bridge's
# routing, payloads through the contract and a route's JSON Schema, Kafka records as the worker
# decodes them, and the alert rules file (fuzz/fuzz_targets). Each target runs FUZZ_SECONDS
# (default 60); a crash leaves its input in fuzz/artifacts/<target>/ and fails the run. Needs the
# nightly toolchain and builds in fuzz/target (the first build takes about 20 minutes, librdkafka
# included), so `make test` runs the proptests of the same functions instead.
# Longer: make fuzz FUZZ_SECONDS=600; one target: make fuzz FUZZ_TARGETS=payload
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= topic payload worker_record rules
fuzz:
	INSTALL_FUZZ=1 scripts/install-deps.sh
	cd fuzz && for target in $(FUZZ_TARGETS); do \
		$(CARGO) +nightly fuzz run $$target -O -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done
