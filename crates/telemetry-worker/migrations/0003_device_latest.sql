-- The latest reading of every device, kept by the worker in the same transaction as each batch
-- (one upsert per device per batch), so "latest value" reads one row instead of scanning history.
CREATE TABLE device_latest (
    user_id         text        NOT NULL,
    device_id       text        NOT NULL,
    received_at     timestamptz NOT NULL,
    device_time     timestamptz,
    seq             bigint,
    payload         jsonb       NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id)
);
