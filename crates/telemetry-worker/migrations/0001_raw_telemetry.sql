-- Every stored reading, with the Kafka partition and offset it came from.
CREATE TABLE raw_telemetry (
    device_time     timestamptz,                       -- the payload's "ts", when the device sent one
    received_at     timestamptz NOT NULL,              -- when the bridge received it from MQTT
    ingested_at     timestamptz NOT NULL DEFAULT now(),-- when the worker's transaction stored it
    user_id         text        NOT NULL,
    device_id       text        NOT NULL,
    seq             bigint,                            -- the payload's "seq", when the device sent one
    payload         jsonb       NOT NULL,              -- the device's payload as it came
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL
);

-- Per device history, newest first: the query every reader makes.
CREATE INDEX raw_telemetry_device_idx ON raw_telemetry (user_id, device_id, received_at DESC);
-- Where a row came from, for replay and audits. Not unique: exactly-once is kept by
-- ingest_offsets, and a TimescaleDB hypertable cannot have a unique index without its time column.
CREATE INDEX raw_telemetry_source_idx ON raw_telemetry (kafka_partition, kafka_offset);

-- The next Kafka offset to store, per partition, written in the same transaction as the rows.
-- This table, not Kafka's committed offsets, says what is stored: records below next_offset are
-- skipped, so re-delivery after a crash, a rebalance or an offset reset never duplicates a row.
CREATE TABLE ingest_offsets (
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    next_offset     bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, kafka_partition)
);

-- TimescaleDB when the server has it; the same table and indexes on plain PostgreSQL otherwise.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'timescaledb is installed but cannot be loaded (%); using a plain table', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('raw_telemetry', 'received_at',
                                  chunk_time_interval => interval '1 day');
    END IF;
END
$$;
