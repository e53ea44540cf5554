#!/usr/bin/env bash
# Drives a short load through the running local stack (scripts/stack.sh up) and prints messages
# published against rows stored. Exits non-zero when they differ.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${STACK_DIR:-/tmp/telemetry-pipeline-stack}
PG_PORT=${PG_PORT:-55432}
MQTT_PORT=${MQTT_PORT:-51883}
BIN_DIR=${BIN_DIR:-$here/target/release}
run="demo$(date +%s)-"
database_url="postgres://postgres@127.0.0.1:$PG_PORT/telemetry"

echo "demo: 3 users x 3 devices, 10 messages per second each, for 10 seconds (users ${run}*)"
"$BIN_DIR/load-tester" --mqtt-host 127.0.0.1 --mqtt-port "$MQTT_PORT" \
    --users 3 --devices-per-user 3 --rate 10 --duration 10s --user-prefix "$run" \
    --verify --database-url "$database_url" --json > "$STACK_DIR/demo.json" || verified=$?

summary=$(tail -n 1 "$STACK_DIR/demo.json")
published=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["acked"])' "$summary")
stored=$(psql "$database_url" -Atc "SELECT count(*) FROM raw_telemetry WHERE user_id LIKE '${run}%'")
echo "demo: messages published (acknowledged by the broker): $published"
echo "demo: rows stored in PostgreSQL:                       $stored"
if [ "$published" != "$stored" ] || [ "${verified:-0}" -ne 0 ]; then
    echo "demo: MISMATCH; see the logs in $STACK_DIR" >&2
    exit 1
fi
echo "demo: every published message was stored once. The stack keeps running: make status, make down."
