#!/usr/bin/env bash
# The local stack without Docker: PostgreSQL, PgBouncer (transaction mode), Mosquitto (standing
# in for EMQX), Tansu (standing in for Redpanda), the worker and the native bridge, each on its
# own port, with data and logs under $STACK_DIR.
#
#   scripts/stack.sh up       start whatever is not running (idempotent)
#   scripts/stack.sh down     stop everything and delete the data
#   scripts/stack.sh status   show what runs where
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${STACK_DIR:-/tmp/telemetry-pipeline-stack}
PG_PORT=${PG_PORT:-55432}
PGBOUNCER_PORT=${PGBOUNCER_PORT:-56432}
MQTT_PORT=${MQTT_PORT:-51883}
KAFKA_PORT=${KAFKA_PORT:-59092}
WORKER_HTTP=${WORKER_HTTP:-127.0.0.1:9101}
BRIDGE_HTTP=${BRIDGE_HTTP:-127.0.0.1:9102}
PARTITIONS=${PARTITIONS:-12}
BIN_DIR=${BIN_DIR:-$here/target/release}
DATABASE=telemetry

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
tansu_bin=$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")

# PostgreSQL and PgBouncer refuse to run as root; run them as the postgres account then.
as_db_user() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

log() { echo "stack: $*"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # description, command...
    local what=$1; shift
    for _ in $(seq 1 300); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "$what did not become ready; see the logs in $STACK_DIR/*.log"
    exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_postgres() {
    local data="$STACK_DIR/postgres"
    if [ ! -d "$data" ]; then
        install -d -m 700 "$data"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$data"
        as_db_user "$pg_bin/initdb" -D "$data" -U postgres -A trust >/dev/null
    fi
    if ! as_db_user "$pg_bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
        touch "$STACK_DIR/postgres.log"
        install -d "$STACK_DIR/run"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$STACK_DIR/postgres.log" "$STACK_DIR/run"
        as_db_user "$pg_bin/pg_ctl" -D "$data" -l "$STACK_DIR/postgres.log" -w start \
            -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $STACK_DIR/run -c max_connections=200" >/dev/null
    fi
    if ! as_db_user "$pg_bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -Atc \
        "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1; then
        as_db_user "$pg_bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DATABASE"
    fi
}

start_pgbouncer() {
    alive "$STACK_DIR/run/pgbouncer.pid" && return
    log "starting PgBouncer (transaction mode) on 127.0.0.1:$PGBOUNCER_PORT"
    echo '"postgres" ""' > "$STACK_DIR/pgbouncer.users"
    cat > "$STACK_DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $STACK_DIR/pgbouncer.users
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
server_login_retry = 1
ignore_startup_parameters = extra_float_digits,options
logfile = $STACK_DIR/pgbouncer.log
pidfile = $STACK_DIR/run/pgbouncer.pid
INI
    touch "$STACK_DIR/pgbouncer.log"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$STACK_DIR"/pgbouncer.*
    as_db_user pgbouncer -d "$STACK_DIR/pgbouncer.ini"
    wait_for PgBouncer port_open "$PGBOUNCER_PORT"
}

start_mosquitto() {
    alive "$STACK_DIR/mosquitto.pid" && return
    log "starting Mosquitto on 127.0.0.1:$MQTT_PORT"
    install -d "$STACK_DIR/mosquitto"
    {
        echo "listener $MQTT_PORT 127.0.0.1"
        echo "allow_anonymous true"
        echo "persistence true"
        echo "persistence_location $STACK_DIR/mosquitto/"
        # Persistent sessions (the bridge's) must not drop QoS 1 messages while it is away.
        echo "max_queued_messages 1000000"
        echo "max_queued_bytes 0"
        echo "max_inflight_messages 1000"
        echo "log_dest file $STACK_DIR/mosquitto.log"
        echo "pid_file $STACK_DIR/mosquitto.pid"
        [ "$(id -u)" -eq 0 ] && echo "user root"
    } > "$STACK_DIR/mosquitto.conf"
    mosquitto -d -c "$STACK_DIR/mosquitto.conf"
    wait_for Mosquitto port_open "$MQTT_PORT"
}

start_tansu() {
    alive "$STACK_DIR/tansu.pid" && return
    [ -x "$tansu_bin" ] || { log "tansu not found; run: make deps"; exit 1; }
    log "starting Tansu (Kafka API, memory storage) on 127.0.0.1:$KAFKA_PORT"
    (cd "$STACK_DIR" && RUST_LOG=warn nohup "$tansu_bin" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine memory://tansu/ > "$STACK_DIR/tansu.log" 2>&1 & echo $! > "$STACK_DIR/tansu.pid")
    wait_for Tansu port_open "$KAFKA_PORT"
    for topic in iot-stream iot-stream-dlq; do
        local partitions=$PARTITIONS
        [ "$topic" = iot-stream-dlq ] && partitions=1
        "$tansu_bin" topic create "$topic" --partitions "$partitions" \
            --broker "tcp://127.0.0.1:$KAFKA_PORT" >> "$STACK_DIR/tansu.log" 2>&1 || true
    done
}

start_stage() { # name, args...
    local name=$1; shift
    alive "$STACK_DIR/$name.pid" && return
    log "starting $name"
    nohup "$BIN_DIR/$name" "$@" > "$STACK_DIR/$name.log" 2>&1 &
    echo $! > "$STACK_DIR/$name.pid"
}

up() {
    install -d -m 755 "$STACK_DIR"
    start_postgres
    start_pgbouncer
    start_mosquitto
    start_tansu
    local brokers="127.0.0.1:$KAFKA_PORT"
    start_stage telemetry-worker --brokers "$brokers" --http-listen "$WORKER_HTTP" \
        --database-url "postgres://postgres@127.0.0.1:$PGBOUNCER_PORT/$DATABASE"
    start_stage telemetry-bridge --brokers "$brokers" --http-listen "$BRIDGE_HTTP" \
        --mqtt-host 127.0.0.1 --mqtt-port "$MQTT_PORT" --client-id telemetry-bridge-local
    wait_for "the worker's /readyz" curl -fsS "http://$WORKER_HTTP/readyz"
    wait_for "the bridge's /readyz" curl -fsS "http://$BRIDGE_HTTP/readyz"
    status
}

stop_pidfile() { # name
    local pidfile="$STACK_DIR/$1.pid"
    if alive "$pidfile"; then
        local pid; pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped $1"
    fi
}

down() {
    for name in telemetry-bridge telemetry-worker tansu mosquitto run/pgbouncer; do stop_pidfile "$name"; done
    if [ -d "$STACK_DIR/postgres" ]; then
        as_db_user "$pg_bin/pg_ctl" -D "$STACK_DIR/postgres" -m fast -w stop >/dev/null 2>&1 || true
        log "stopped postgres"
    fi
    rm -rf "$STACK_DIR"
}

status() {
    cat <<STATUS
stack: running, data and logs in $STACK_DIR
  PostgreSQL   postgres://postgres@127.0.0.1:$PG_PORT/$DATABASE
  PgBouncer    postgres://postgres@127.0.0.1:$PGBOUNCER_PORT/$DATABASE   (transaction mode)
  Mosquitto    mqtt://127.0.0.1:$MQTT_PORT
  Tansu/Kafka  127.0.0.1:$KAFKA_PORT   topics iot-stream ($PARTITIONS partitions), iot-stream-dlq
  worker       http://$WORKER_HTTP/metrics  /healthz  /readyz
  bridge       http://$BRIDGE_HTTP/metrics  /healthz  /readyz
STATUS
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
