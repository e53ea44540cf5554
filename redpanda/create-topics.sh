#!/usr/bin/env bash
# Creates the topics in topics.conf on the broker in $RPK_BROKERS, or, when a topic exists,
# sets its retention and grows it to the declared partition count (Kafka never shrinks one).
# Idempotent: safe to run on every `docker compose up`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
: "${RPK_BROKERS:?set RPK_BROKERS, e.g. redpanda:9092}"

partitions_of() { # topic -> current partition count, or nothing when it does not exist
    rpk topic describe "$1" --print-summary 2>/dev/null | awk '$1 == "PARTITIONS" { print $2 }'
}

while read -r name partitions retention_ms _; do
    case "$name" in ''|'#'*) continue ;; esac
    current=$(partitions_of "$name" || true)
    if [ -z "$current" ]; then
        echo "redpanda-init: creating $name ($partitions partitions, retention.ms=$retention_ms)"
        rpk topic create "$name" --partitions "$partitions" --replicas 1 \
            --topic-config "retention.ms=$retention_ms" --topic-config cleanup.policy=delete
    else
        echo "redpanda-init: $name exists with $current partitions; setting retention.ms=$retention_ms"
        rpk topic alter-config "$name" --set "retention.ms=$retention_ms"
        if [ "$current" -lt "$partitions" ]; then
            rpk topic add-partitions "$name" --num $((partitions - current))
        fi
    fi
done < "$here/topics.conf"
rpk topic list
