#!/usr/bin/env bash
# Installs what the tests and the local stack need: PostgreSQL 15, PgBouncer, Mosquitto and its
# clients from Debian, and Tansu (a Kafka-compatible broker) from crates.io. Idempotent, and
# quick when everything is present. The first Tansu build takes about 20 minutes.
set -euo pipefail

missing=()
have_pg=false
for bin in /usr/lib/postgresql/*/bin/postgres; do [ -x "$bin" ] && have_pg=true; done
$have_pg || missing+=(postgresql)
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || missing+=(pgbouncer)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v curl >/dev/null || missing+=(curl)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# The Dockerfile's test simulates the image's apt-get lines against the package lists, so they
# must be there even when nothing is missing.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    echo "install-deps: fetching Debian's package lists"
    $sudo apt-get update -qq
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    # policy-rc.d-less machines would start the packaged services on their default ports;
    # the stack and the tests start their own instances on their own ports instead.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v tansu >/dev/null && [ ! -x "$cargo_bin/tansu" ]; then
    echo "install-deps: installing tansu 0.6.0 (about 20 minutes the first time)"
    # Without --locked tansu 0.6.0 does not build against today's crates.
    cargo install --locked tansu@0.6.0 --features dynostore,postgres
fi
# The durable local Kafka (KAFKA_STORAGE=postgres: make chaos and its test) writes Tansu's
# PostgreSQL tables from the DDL its tansu-storage crate ships, read from cargo's registry, where
# `cargo install` leaves it. A machine whose tansu came another way, or whose registry was
# cleaned, fetches that crate's source (seconds).
if ! ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-storage-0.6.0/src/ddl >/dev/null 2>&1; then
    echo "install-deps: fetching tansu-storage 0.6.0's source for its DDL"
    fetch_dir=$(mktemp -d)
    printf '[package]\nname = "tansu-ddl"\nversion = "0.0.0"\nedition = "2021"\n[lib]\npath = "lib.rs"\n[dependencies]\ntansu-storage = { version = "=0.6.0", default-features = false }\n' > "$fetch_dir/Cargo.toml"
    touch "$fetch_dir/lib.rs"
    (cd "$fetch_dir" && cargo fetch --quiet)
    rm -rf "$fetch_dir"
fi
# `make fuzz` only: the nightly toolchain and cargo-fuzz (about 2 minutes the first time).
if [ "${INSTALL_FUZZ:-0}" = 1 ]; then
    if ! rustup toolchain list | grep -q '^nightly'; then
        echo "install-deps: installing the nightly toolchain for cargo-fuzz"
        rustup toolchain install nightly --profile minimal
    fi
    if ! command -v cargo-fuzz >/dev/null && [ ! -x "$cargo_bin/cargo-fuzz" ]; then
        echo "install-deps: installing cargo-fuzz (about 2 minutes the first time)"
        cargo install cargo-fuzz --locked
    fi
fi
echo "install-deps: postgresql, pgbouncer, mosquitto, mosquitto-clients and tansu are present"
