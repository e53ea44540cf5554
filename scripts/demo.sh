#!/usr/bin/env bash
# Drives a short load through the running local stack (scripts/stack.sh up) and prints messages
# published against rows stored, and alerts expected against alerts received. Exits non-zero
# when they differ.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${STACK_DIR:-/tmp/telemetry-pipeline-stack}
PG_PORT=${PG_PORT:-55432}
MQTT_PORT=${MQTT_PORT:-51883}
BIN_DIR=${BIN_DIR:-$here/target/release}
run="demo$(date +%s)-"
database_url="postgres://postgres@127.0.0.1:$PG_PORT/telemetry"

# Each demo user logs in as itself, as devices do on the stack's ACL'd broker.
"$here/scripts/stack.sh" users "$run" 3 >/dev/null

echo "demo: 3 users x 3 devices, 10 messages per second each, for 10 seconds, 2% too hot (users ${run}*)"
"$BIN_DIR/load-tester" --mqtt-host 127.0.0.1 --mqtt-port "$MQTT_PORT" \
    --mqtt-credentials-per-user '{user}:secret-{user}' \
    --users 3 --devices-per-user 3 --rate 10 --duration 10s --user-prefix "$run" \
    --alert-fraction 0.02 --verify --verify-alerts --database-url "$database_url" \
    --json > "$STACK_DIR/demo.json" || verified=$?

summary=$(tail -n 1 "$STACK_DIR/demo.json")
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$summary" "$1"; }
published=$(field acked)
stored=$(psql "$database_url" -Atc "SELECT count(*) FROM raw_telemetry WHERE user_id LIKE '${run}%'")
echo "demo: messages published (acknowledged by the broker): $published"
echo "demo: rows stored in PostgreSQL:                       $stored"
echo "demo: alerts expected (raised and cleared):            $(field alerts_expected)"
echo "demo: alerts received by the devices' owners:          $(field alerts_received) (p99 $(python3 -c 'import json,sys; a=json.loads(sys.argv[1])["alert_ms"]; print("-" if a is None else "%.0f ms" % a["p99"])' "$summary"))"
if [ "$published" != "$stored" ] || [ "${verified:-0}" -ne 0 ]; then
    echo "demo: MISMATCH; the load-tester's report is above, the logs are in $STACK_DIR" >&2
    exit 1
fi
echo "demo: every published message was stored once, and every alert arrived once. The stack keeps running: make status, make down."
