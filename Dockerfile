# syntax=docker/dockerfile:1.7
#
# Builds telemetry-worker, telemetry-bridge, telemetry-api and load-tester into one small image
# that runs as an unprivileged user. Pick the program with the command, e.g.
#   docker run --rm telemetry-pipeline:0.1.0 telemetry-worker --help
#
# The build stage needs a C toolchain, cmake, make and pkg-config because the rdkafka crate
# compiles the bundled librdkafka; zlib comes from the system (rdkafka's `libz` feature), so the
# runtime stage keeps Debian's zlib1g. The crates' own rust-version is 1.85, but the locked
# dependencies need 1.95, hence the builder's version.

FROM rust:1.95.0-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config perl python3 zlib1g-dev libssl-dev libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target directory between builds; the binaries are
# copied out of the cached target directory because it is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p telemetry-worker -p telemetry-bridge -p telemetry-api -p load-tester \
 && mkdir -p /out \
 && cp target/release/telemetry-worker target/release/telemetry-bridge \
       target/release/telemetry-api target/release/load-tester /out/

FROM debian:12.12-slim AS runtime
# curl serves the container health checks (GET /readyz); ca-certificates, TLS to brokers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 telemetry \
 && useradd --system --uid 10001 --gid telemetry --no-create-home --shell /usr/sbin/nologin telemetry
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# 9101 worker, 9102 bridge: /metrics, /healthz, /readyz. 8080: telemetry-api.
EXPOSE 9101 9102 8080
CMD ["telemetry-worker", "run"]
