#!/usr/bin/env bash
# The local stack without Docker: PostgreSQL, PgBouncer (transaction mode), Mosquitto (standing
# in for EMQX, with per-user logins and an ACL), Tansu (standing in for Redpanda), the worker
# (with the alert rules of deploy/alerts/rules.toml), the native bridge and the query API, each
# on its own port, with data and logs under $STACK_DIR.
#
#   scripts/stack.sh up                   start whatever is not running (idempotent)
#   scripts/stack.sh down                 stop everything and delete the data
#   scripts/stack.sh status               show what runs where
#   scripts/stack.sh users PREFIX COUNT   add MQTT logins PREFIX1..PREFIXCOUNT, each with the
#                                         password secret-<user> (the load-tester's
#                                         --mqtt-credentials-per-user '{user}:secret-{user}')
#   scripts/stack.sh fresh-kafka          restart Tansu with empty topics, and the worker, the
#                                         bridge and the API that use it (benchmarks do, so that
#                                         records of earlier runs do not slow Tansu down)
#   scripts/stack.sh workers N            run N worker replicas in the consumer group (the first
#                                         on WORKER_HTTP, replica i on its port + 10 x (i - 1))
#   scripts/stack.sh stop-postgres MODE   stop PostgreSQL with pg_ctl's fast or immediate mode
#                                         (`up` starts it again); for fault drills
#
# KAFKA_STORAGE picks Tansu's storage: `memory` (default; fast, but empty after a restart) or
# `postgres` (durable: records, offsets and groups survive a broker restart; about 8k msg/s out)
# on a PostgreSQL instance of its own, so that restarting the pipeline's database is not also a
# Kafka outage.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${STACK_DIR:-/tmp/telemetry-pipeline-stack}
PG_PORT=${PG_PORT:-55432}
PGBOUNCER_PORT=${PGBOUNCER_PORT:-56432}
MQTT_PORT=${MQTT_PORT:-51883}
KAFKA_PORT=${KAFKA_PORT:-59092}
# The Kafka address clients are given. Tansu advertises it; a fault drill points it at a TCP
# proxy in front of KAFKA_PORT to cut the path.
KAFKA_CLIENT_PORT=${KAFKA_CLIENT_PORT:-$KAFKA_PORT}
KAFKA_STORAGE=${KAFKA_STORAGE:-memory}
# Tansu's own PostgreSQL (KAFKA_STORAGE=postgres).
KAFKA_PG_PORT=${KAFKA_PG_PORT:-55433}
WORKER_HTTP=${WORKER_HTTP:-127.0.0.1:9101}
BRIDGE_HTTP=${BRIDGE_HTTP:-127.0.0.1:9102}
API_HTTP=${API_HTTP:-127.0.0.1:9103}
API_LISTEN=${API_LISTEN:-127.0.0.1:8081}
# iot-stream's partitions: 12, as in redpanda/topics.conf, so up to 12 worker replicas share it.
# Tansu's cost is per produce request, one per partition each linger: 4 partitions left
# the machine about twice as much idle CPU at 10,930 msg/s (docs/performance.md), for at most 4
# replicas.
PARTITIONS=${PARTITIONS:-12}
# Empty: the worker's default (batch.max_wait_ms, 100 ms). Lower trades larger batches for latency.
WORKER_BATCH_MAX_WAIT_MS=${WORKER_BATCH_MAX_WAIT_MS:-}
# Empty: the worker's default (batch.linger_ms, 5 ms).
WORKER_BATCH_LINGER_MS=${WORKER_BATCH_LINGER_MS:-}
# A TOML file with more worker settings (e.g. `[kafka.properties]`), used instead of the one the
# stack writes per replica (see worker_config); the flags above win.
WORKER_CONFIG=${WORKER_CONFIG:-}
# How long the bridge's producer waits to fill a batch (librdkafka linger.ms; the bridge's own
# default is 5 ms, right for Kafka and Redpanda). Tansu's CPU cost is per produce batch: at
# 8,905 msg/s on two cores, 5 ms kept it at 75% of a core and left the machine no headroom;
# 20 ms cut its share by about a third and roughly halved the alert p99 (docs/performance.md).
BRIDGE_LINGER_MS=${BRIDGE_LINGER_MS:-20}
# A TOML file of bridge settings used instead of the one written from BRIDGE_LINGER_MS.
BRIDGE_CONFIG=${BRIDGE_CONFIG:-}
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

# Starts the PostgreSQL instance in $STACK_DIR/NAME on PORT (created on first use) and creates
# DATABASE in it.
start_pg_instance() { # name, port, database
    local name=$1 port=$2 database=$3
    local data="$STACK_DIR/$name"
    if [ ! -d "$data" ]; then
        install -d -m 700 "$data"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$data"
        as_db_user "$pg_bin/initdb" -D "$data" -U postgres -A trust >/dev/null
    fi
    if ! as_db_user "$pg_bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "starting PostgreSQL ($name) on 127.0.0.1:$port"
        touch "$STACK_DIR/$name.log"
        install -d "$STACK_DIR/run"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$STACK_DIR/$name.log" "$STACK_DIR/run"
        # A drill's immediate stop can leave the pid file of a dead postmaster behind;
        # pg_ctl start copes with it, and recovery replays the WAL.
        as_db_user "$pg_bin/pg_ctl" -D "$data" -l "$STACK_DIR/$name.log" -w start \
            -o "-p $port -c listen_addresses=127.0.0.1 -k $STACK_DIR/run -c max_connections=200" >/dev/null
    fi
    if ! as_db_user "$pg_bin/psql" -h 127.0.0.1 -p "$port" -U postgres -Atc \
        "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
        as_db_user "$pg_bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$database"
    fi
}

start_postgres() { start_pg_instance postgres "$PG_PORT" "$DATABASE"; }

stop_postgres() { # fast|immediate
    case ${1:-} in fast|immediate) ;; *) log "stop-postgres takes fast or immediate"; exit 2 ;; esac
    as_db_user "$pg_bin/pg_ctl" -D "$STACK_DIR/postgres" -m "$1" -w stop >/dev/null
    log "stopped postgres ($1)"
}

# The bridge's config file: BRIDGE_CONFIG, or one that sets the producer's linger for Tansu.
bridge_config_path() { echo "${BRIDGE_CONFIG:-$STACK_DIR/bridge.toml}"; }

write_bridge_config() {
    [ -n "$BRIDGE_CONFIG" ] ||
        printf '[kafka.properties]\n"linger.ms" = "%s"\n' "$BRIDGE_LINGER_MS" > "$STACK_DIR/bridge.toml"
}

start_pgbouncer() {
    alive "$STACK_DIR/run/pgbouncer.pid" && return
    log "starting PgBouncer (transaction mode) on 127.0.0.1:$PGBOUNCER_PORT"
    # trust: PgBouncer lets in whoever is listed, with any password; the API reads as
    # telemetry_reader (its migration creates the role), everything else connects as postgres.
    printf '"postgres" ""\n"telemetry_reader" ""\n' > "$STACK_DIR/pgbouncer.users"
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

# MQTT logins, as in the Docker stack's deploy/emqx/users.csv (no superuser: load tests log in
# as each user, see `users`).
SERVICE_LOGINS="telemetry-bridge:telemetry-bridge telemetry-worker:telemetry-worker"
DEVICE_LOGINS="alice:alice-dev bob:bob-dev user-1:secret-user-1 user-2:secret-user-2 user-3:secret-user-3"

start_mosquitto() {
    alive "$STACK_DIR/mosquitto.pid" && return
    log "starting Mosquitto on 127.0.0.1:$MQTT_PORT (logins and ACL: make status)"
    install -d "$STACK_DIR/mosquitto"
    local passwords="$STACK_DIR/mosquitto.passwd"
    if [ ! -f "$passwords" ]; then
        printf '%s\n' $SERVICE_LOGINS $DEVICE_LOGINS > "$passwords"
        mosquitto_passwd -U "$passwords"
    fi
    {
        echo "listener $MQTT_PORT 127.0.0.1"
        echo "allow_anonymous false"
        echo "password_file $passwords"
        # Devices publish their own telemetry and read their own alerts, nothing else.
        echo "acl_file $here/scripts/mosquitto-acl.conf"
        # Without it Nagle's algorithm holds back every PUBACK of a burst but the first until
        # the client's delayed ACK, about 40 ms each time.
        echo "set_tcp_nodelay true"
        echo "persistence true"
        echo "persistence_location $STACK_DIR/mosquitto/"
        # Persistent sessions (the bridge's) must not drop a QoS 1 message a device got its
        # PUBACK for. Mosquitto 2.0.11 drops one (after PUBACKing the device) once a session
        # holds max_queued_messages + its Receive Maximum, in flight and queued together
        # (src/database.c, db__ready_for_queue). 100,000,000 is more than memory holds (about
        # 470 bytes each), so memory is the limit: docs/reliability.md sizes it. 0 would mean no
        # limit, but with it 2.0.11 cut subscribers off ("Bad socket read/write ... Unknown
        # error") in 3 of 5 runs of crates/pipeline-tests/tests/isolation.rs.
        echo "max_queued_messages 100000000"
        echo "max_queued_bytes 0"
        echo "max_inflight_messages 1000"
        # Packets over 900 KiB are refused at the door: an MQTT 5 device gets DISCONNECT 0x95
        # (Packet too large), an MQTT 3.1.1 device a closed connection, and neither loses the
        # message silently (src/packet_mosq.c, packet__read). Below the bridge's Maximum Packet
        # Size (1 MiB), so Mosquitto never drops an accepted message on the way to the bridge
        # (src/send_publish.c, send__real_publish).
        echo "max_packet_size 921600"
        echo "log_dest file $STACK_DIR/mosquitto.log"
        echo "pid_file $STACK_DIR/mosquitto.pid"
        [ "$(id -u)" -eq 0 ] && echo "user root"
    } > "$STACK_DIR/mosquitto.conf"
    mosquitto -d -c "$STACK_DIR/mosquitto.conf" 2>> "$STACK_DIR/mosquitto.log"
    wait_for Mosquitto port_open "$MQTT_PORT"
}

# Adds device owners PREFIX1..PREFIXCOUNT with the password secret-<user>, leaving existing
# ones alone, and has Mosquitto reload its password file (SIGHUP keeps every connection).
add_users() { # prefix, count
    local prefix=$1 count=$2
    local passwords="$STACK_DIR/mosquitto.passwd" new="$STACK_DIR/mosquitto.passwd.new"
    alive "$STACK_DIR/mosquitto.pid" || { log "Mosquitto is not running; run: scripts/stack.sh up"; exit 1; }
    case $prefix in ''|*[/+#:]*) log "PREFIX must be non-empty without / + # or :"; exit 2 ;; esac
    case $count in ''|*[!0-9]*) log "COUNT must be a whole number, got '$count'"; exit 2 ;; esac
    [ "$count" -gt 0 ] || return 0
    seq 1 "$count" | awk -F: -v p="$prefix" \
        'NR == FNR { have[$1] = 1; next } !((p $0) in have) { print p $0 ":secret-" p $0 }' \
        "$passwords" - > "$new"
    if [ -s "$new" ]; then
        mosquitto_passwd -U "$new"
        cat "$new" >> "$passwords"
        kill -HUP "$(cat "$STACK_DIR/mosquitto.pid")"
        log "added $(wc -l < "$new") MQTT logins ${prefix}1..$prefix$count (password secret-<user>)"
    fi
    rm -f "$new"
    # The reload is asynchronous: wait until the last login works.
    local last="$prefix$count"
    wait_for "Mosquitto's login for $last" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" \
        -u "$last" -P "secret-$last" -i "stack-users-check-$$" -t "users/$last/devices/+/alerts" -E
}

# Tansu's PostgreSQL engine needs its tables first. Tansu 0.6.0 ships them only as SQLite DDL
# (tansu-storage's src/ddl, which `cargo install` leaves in cargo's registry); its PostgreSQL
# queries use the same tables and columns, so scripts/tansu-pg-schema.pl writes the PostgreSQL
# types its engine binds (and `record.transaction_id`, which its PostgreSQL fetch reads).
tansu_ddl_dir() {
    ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tansu-storage-0.6.0/src/ddl 2>/dev/null | head -n 1
}

start_kafka_storage() {
    [ "$KAFKA_STORAGE" = postgres ] || return 0
    start_pg_instance kafka-postgres "$KAFKA_PG_PORT" tansu
    local has_schema
    has_schema=$(as_db_user "$pg_bin/psql" -h 127.0.0.1 -p "$KAFKA_PG_PORT" -U postgres -d tansu -qAtc \
        "SELECT to_regclass('record') IS NOT NULL")
    [ "$has_schema" = t ] && return
    local ddl; ddl=$(tansu_ddl_dir)
    [ -n "$ddl" ] || { log "Tansu's DDL (tansu-storage-0.6.0/src/ddl) is not in cargo's registry; run: cargo install --locked --force tansu@0.6.0 --features dynostore,postgres"; exit 1; }
    perl "$here/scripts/tansu-pg-schema.pl" "$ddl" |
        as_db_user "$pg_bin/psql" -h 127.0.0.1 -p "$KAFKA_PG_PORT" -U postgres -d tansu -q -v ON_ERROR_STOP=1 >/dev/null
    log "created Tansu's tables in postgres://127.0.0.1:$KAFKA_PG_PORT/tansu"
}

kafka_storage_url() {
    case $KAFKA_STORAGE in
        memory) echo memory://tansu/ ;;
        postgres) echo "postgres://postgres@127.0.0.1:$KAFKA_PG_PORT/tansu?sslmode=disable" ;;
        *) log "KAFKA_STORAGE must be memory or postgres, got '$KAFKA_STORAGE'"; exit 2 ;;
    esac
}

start_tansu() {
    alive "$STACK_DIR/tansu.pid" && return
    local storage; storage=$(kafka_storage_url)
    [ "$KAFKA_STORAGE" = memory ] && forget_offsets
    [ -x "$tansu_bin" ] || { log "tansu not found; run: make deps"; exit 1; }
    start_kafka_storage
    log "starting Tansu (Kafka API, $KAFKA_STORAGE storage) on 127.0.0.1:$KAFKA_PORT, advertised as 127.0.0.1:$KAFKA_CLIENT_PORT"
    # exec: the pid file names Tansu itself, and no shell is left holding this script's stdout
    # open (which would keep a caller reading it, e.g. `make demo | tee`, waiting forever).
    (cd "$STACK_DIR" && RUST_LOG=warn exec nohup "$tansu_bin" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_CLIENT_PORT" \
        --storage-engine "$storage") < /dev/null >> "$STACK_DIR/tansu.log" 2>&1 &
    echo $! > "$STACK_DIR/tansu.pid"
    wait_for Tansu port_open "$KAFKA_PORT"
    for topic in iot-stream iot-stream-dlq; do
        local partitions=$PARTITIONS
        [ "$topic" = iot-stream-dlq ] && partitions=1
        "$tansu_bin" topic create "$topic" --partitions "$partitions" \
            --broker "tcp://127.0.0.1:$KAFKA_PORT" >> "$STACK_DIR/tansu.log" 2>&1 || true
    done
}

# A Tansu that starts has empty topics (memory storage) whose offsets count from 0 again, while
# PostgreSQL still holds the worker's offsets from the previous one: resuming from those would
# skip as many new records. So the worker stops, and forgets them, before Tansu starts.
forget_offsets() {
    stop_pidfile telemetry-worker
    as_db_user "$pg_bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$DATABASE" -qAtc \
        "SELECT to_regclass('ingest_offsets') IS NOT NULL" | grep -q t || return 0
    local forgotten
    forgotten=$(as_db_user "$pg_bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$DATABASE" -qAtc \
        "WITH gone AS (DELETE FROM ingest_offsets RETURNING 1) SELECT count(*) FROM gone")
    [ "$forgotten" -eq 0 ] || log "forgot the worker's Kafka offsets of $forgotten partitions: they belonged to the previous Tansu"
}

start_stage() { # name, args...
    local name=$1; shift
    alive "$STACK_DIR/$name.pid" && return
    log "starting $name"
    # STAGE_BINARY: when the name is a replica's (telemetry-worker-2), not the binary's.
    nohup "$BIN_DIR/${STAGE_BINARY:-$name}" "$@" < /dev/null > "$STACK_DIR/$name.log" 2>&1 &
    echo $! > "$STACK_DIR/$name.pid"
}

start_api() { # brokers
    alive "$STACK_DIR/telemetry-api.pid" && return
    if [ ! -x "$BIN_DIR/telemetry-api" ]; then
        log "skipping the query API: $BIN_DIR/telemetry-api is missing (cargo build --release -p telemetry-api)"
        return
    fi
    # Queries run as the read-only role through PgBouncer; the migration (as postgres) creates
    # the role and grants it SELECT on the worker's tables, which exist once the worker is up.
    local reader="postgres://telemetry_reader@127.0.0.1:$PGBOUNCER_PORT/$DATABASE"
    local admin="postgres://postgres@127.0.0.1:$PGBOUNCER_PORT/$DATABASE"
    "$BIN_DIR/telemetry-api" migrate --database-url "$reader" --admin-database-url "$admin" \
        >> "$STACK_DIR/telemetry-api.log" 2>&1 \
        || { log "the API's migration failed; see $STACK_DIR/telemetry-api.log"; exit 1; }
    start_stage telemetry-api --brokers "$1" --listen "$API_LISTEN" --http-listen "$API_HTTP" \
        --database-url "$reader" --admin-database-url "$admin" --no-migrate
    wait_for "the API's /readyz" curl -fsS "http://$API_HTTP/readyz"
}

# Worker replica I (1 is the stack's first): its pid file, /metrics address and MQTT client id.
worker_name() { if [ "$1" -eq 1 ]; then echo telemetry-worker; else echo "telemetry-worker-$1"; fi; }
worker_http() { echo "${WORKER_HTTP%:*}:$(( ${WORKER_HTTP##*:} + 10 * ($1 - 1) ))"; }

start_worker() { # replica number
    local replica=$1 name; name=$(worker_name "$1")
    alive "$STACK_DIR/$name.pid" && return
    local extra=()
    [ -z "$WORKER_BATCH_MAX_WAIT_MS" ] || extra=(--batch-max-wait-ms "$WORKER_BATCH_MAX_WAIT_MS")
    [ -z "$WORKER_BATCH_LINGER_MS" ] || extra+=(--batch-linger-ms "$WORKER_BATCH_LINGER_MS")
    extra+=(--config "$(worker_config "$replica")")
    local client_id=telemetry-worker-alerts-local
    [ "$replica" -eq 1 ] || client_id="$client_id-$replica"
    TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__USERNAME=telemetry-worker \
    TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__PASSWORD=telemetry-worker \
    STAGE_BINARY=telemetry-worker \
        start_stage "$name" --brokers "$(kafka_brokers)" --http-listen "$(worker_http "$replica")" \
        --database-url "postgres://postgres@127.0.0.1:$PGBOUNCER_PORT/$DATABASE" \
        --alert-rules "$here/deploy/alerts/rules.toml" --alerts-mqtt-host 127.0.0.1 \
        --alerts-mqtt-port "$MQTT_PORT" --alerts-mqtt-client-id "$client_id" \
        ${extra[@]+"${extra[@]}"}
}

kafka_brokers() { echo "127.0.0.1:$KAFKA_CLIENT_PORT"; }

# Replica I's config file: WORKER_CONFIG if given, else one that gives the replica a static
# consumer-group identity. Tansu 0.6.0 never expires a member that died without leaving the
# group (kill -9): the group keeps it, rebalances no more, and a replica started in its place
# is assigned nothing. A restarted replica with the same group.instance.id takes the dead one's
# place and its partitions at once (Kafka's static membership, KIP-345), on Kafka too.
worker_config() { # replica number
    if [ -n "$WORKER_CONFIG" ]; then echo "$WORKER_CONFIG"; return; fi
    local path="$STACK_DIR/worker-$1.toml"
    printf '[kafka.properties]\n"group.instance.id" = "telemetry-worker-local-%s"\n' "$1" > "$path"
    echo "$path"
}

# Runs exactly COUNT worker replicas: starts the missing ones, stops (SIGTERM, so each hands its
# partitions back) those above COUNT.
scale_workers() { # count
    local count=$1
    case $count in ''|*[!0-9]*|0) log "workers takes a number of replicas from 1, got '$count'"; exit 2 ;; esac
    for replica in $(seq 1 "$count"); do start_worker "$replica"; done
    for replica in $(seq 1 "$count"); do
        wait_for "worker $replica's /readyz" curl -fsS "http://$(worker_http "$replica")/readyz"
    done
    for pidfile in "$STACK_DIR"/telemetry-worker-*.pid; do
        [ -e "$pidfile" ] || continue
        local replica=${pidfile##*-}; replica=${replica%.pid}
        [ "$replica" -gt "$count" ] && stop_pidfile "telemetry-worker-$replica" && rm -f "$pidfile"
    done
    log "$count worker replica(s) running"
}

up() {
    install -d -m 755 "$STACK_DIR"
    start_postgres
    start_pgbouncer
    start_mosquitto
    start_tansu
    local brokers; brokers=$(kafka_brokers)
    start_worker 1
    alive "$STACK_DIR/telemetry-bridge.pid" || write_bridge_config
    TELEMETRY_BRIDGE_MQTT__USERNAME=telemetry-bridge \
    TELEMETRY_BRIDGE_MQTT__PASSWORD=telemetry-bridge \
    TELEMETRY_BRIDGE_MQTT__BROKER_STATS=true \
        start_stage telemetry-bridge --config "$(bridge_config_path)" --brokers "$brokers" \
        --http-listen "$BRIDGE_HTTP" --mqtt-host 127.0.0.1 --mqtt-port "$MQTT_PORT" \
        --client-id telemetry-bridge-local
    wait_for "the worker's /readyz" curl -fsS "http://$WORKER_HTTP/readyz"
    wait_for "the bridge's /readyz" curl -fsS "http://$BRIDGE_HTTP/readyz"
    start_api "$brokers"
    status
}

stop_workers() {
    for pidfile in "$STACK_DIR"/telemetry-worker-*.pid; do
        [ -e "$pidfile" ] || continue
        local name=${pidfile##*/}; stop_pidfile "${name%.pid}"; rm -f "$pidfile"
    done
    stop_pidfile telemetry-worker
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
    stop_workers
    for name in telemetry-api telemetry-bridge tansu mosquitto run/pgbouncer; do stop_pidfile "$name"; done
    for instance in postgres kafka-postgres; do
        if [ -d "$STACK_DIR/$instance" ]; then
            as_db_user "$pg_bin/pg_ctl" -D "$STACK_DIR/$instance" -m fast -w stop >/dev/null 2>&1 || true
            log "stopped $instance"
        fi
    done
    rm -rf "$STACK_DIR"
}

status() {
    cat <<STATUS
stack: running, data and logs in $STACK_DIR
  PostgreSQL   postgres://postgres@127.0.0.1:$PG_PORT/$DATABASE
  PgBouncer    postgres://postgres@127.0.0.1:$PGBOUNCER_PORT/$DATABASE   (transaction mode; also telemetry_reader)
  Mosquitto    mqtt://127.0.0.1:$MQTT_PORT   per-user logins and ACL (scripts/mosquitto-acl.conf):
               devices alice/alice-dev, bob/bob-dev, user-1..3/secret-user-1..3 (more: $0 users PREFIX COUNT);
               services telemetry-bridge/telemetry-bridge, telemetry-worker/telemetry-worker
  Tansu/Kafka  127.0.0.1:$KAFKA_CLIENT_PORT   topics iot-stream ($PARTITIONS partitions), iot-stream-dlq; $KAFKA_STORAGE storage
  worker       http://$WORKER_HTTP/metrics  /healthz  /readyz   alert rules $here/deploy/alerts/rules.toml
  bridge       http://$BRIDGE_HTTP/metrics  /healthz  /readyz   config $(bridge_config_path)
  query API    http://$API_LISTEN/v1/openapi.json   http://$API_HTTP/metrics  /healthz  /readyz
STATUS
}

# Tansu's memory storage keeps every record it ever took, and grows slower as it does; a fresh
# one behaves like a Kafka whose old segments expired. With PostgreSQL storage its database is
# emptied. The bridge and the API restart too, as their idempotent producers' state belongs to
# the old broker; the worker forgets its offsets, which belong to the old topics.
fresh_kafka() {
    stop_workers
    for name in telemetry-api telemetry-bridge tansu; do stop_pidfile "$name"; done
    if [ "$KAFKA_STORAGE" = postgres ] && [ -d "$STACK_DIR/kafka-postgres" ]; then
        start_pg_instance kafka-postgres "$KAFKA_PG_PORT" tansu
        as_db_user "$pg_bin/dropdb" -h 127.0.0.1 -p "$KAFKA_PG_PORT" -U postgres tansu
        forget_offsets
    fi
    up
}

usage() { echo "usage: $0 up|down|status|users PREFIX COUNT|fresh-kafka|workers N|stop-postgres fast|immediate" >&2; exit 2; }

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    users) [ $# -eq 3 ] || usage; add_users "$2" "$3" ;;
    fresh-kafka) fresh_kafka ;;
    workers) [ $# -eq 2 ] || usage; scale_workers "$2" ;;
    stop-postgres) [ $# -eq 2 ] || usage; stop_postgres "$2" ;;
    *) usage ;;
esac
