-- Every alert event, written in the same transaction as the batch of readings that produced it.
-- The table is also the outbox: rows with published_at NULL are waiting to be published over
-- MQTT, in id order per device.
CREATE TABLE alerts (
    id              bigserial   PRIMARY KEY,         -- insertion order = per-device order
    alert_id        text        NOT NULL,            -- deterministic: rule, device, start offset
    event           text        NOT NULL CHECK (event IN ('raised', 'cleared')),
    rule            text        NOT NULL,
    severity        text        NOT NULL,
    user_id         text        NOT NULL,
    device_id       text        NOT NULL,
    kafka_partition integer     NOT NULL,            -- the reading that produced the event
    kafka_offset    bigint      NOT NULL,
    occurred_at     timestamptz NOT NULL,            -- the reading's time (device time, else receive time)
    body            jsonb       NOT NULL,            -- exactly the MQTT message that is published
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,                     -- NULL until the broker acknowledged it
    -- A replayed batch produces the same events with the same ids; they are not stored again.
    UNIQUE (alert_id, event)
);

-- What the publisher reads: the unpublished rows of a partition, in order. Stays small because
-- rows leave it once published.
CREATE INDEX alerts_unpublished_idx ON alerts (kafka_partition, id) WHERE published_at IS NULL;
-- A device's alert history, newest first.
CREATE INDEX alerts_device_idx ON alerts (user_id, device_id, occurred_at DESC);

-- Per-device rule state (pending streaks, open alerts, cooldowns), saved with each batch so a
-- restarted worker, or the replica that takes over a partition, carries on where it stopped.
CREATE TABLE alert_state (
    user_id    text        NOT NULL,
    device_id  text        NOT NULL,
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id)
);
