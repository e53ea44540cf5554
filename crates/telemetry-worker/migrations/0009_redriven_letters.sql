-- Dead letters `telemetry-worker redrive` copied back to the telemetry topic, by the record
-- they stand for: the source record's position (dlq_source_topic, dlq_source_partition,
-- dlq_source_offset) for the worker's letters, and the letter's own position in the dead-letter
-- topic for the bridge's, which never reached Kafka before. A source record can have more
-- than one letter (a dead letter is sent again when its batch's COMMIT fails or times out), and
-- a redrive can be run again over the same range: a position found here is not copied again.
-- Rows are claimed in a transaction that stays open until Kafka confirmed the copies, so two
-- redrives running at once cannot both copy a letter.
CREATE TABLE redriven_letters (
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    -- The letter that was copied, for audits.
    dlq_topic        text        NOT NULL,
    dlq_partition    integer     NOT NULL,
    dlq_offset       bigint      NOT NULL,
    redriven_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
