# The two commands a new user needs:
#   make demo   install what is missing, start the local stack, drive a short load, and print
#               messages published vs rows stored (the stack keeps running; `make down` stops it)
#   make test   install what is missing, check formatting and lints, run every test
.PHONY: deps build demo up down status test fmt clippy

CARGO ?= cargo

deps:
	scripts/install-deps.sh

build:
	$(CARGO) build --release -p telemetry-worker -p telemetry-bridge -p load-tester

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
