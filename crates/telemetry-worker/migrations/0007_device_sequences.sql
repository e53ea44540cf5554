-- Exactly once from device to row for readings that carry "seq" (see src/dedup.rs). The same
-- reading can reach Kafka twice, at two offsets: MQTT delivers it again after the bridge
-- crashed or reconnected before acknowledging it, or the device itself publishes it again.
-- A reading whose seq is above its device's highest stored seq is new; only the others are
-- looked up, by (user, device, seq) and payload, in raw_telemetry.
CREATE TABLE device_sequences (
    user_id    text   NOT NULL,
    device_id  text   NOT NULL,
    max_seq    bigint NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
-- One update per device per batch: leave room for HOT updates, as device_latest does.
ALTER TABLE device_sequences SET (fillfactor = 50);

CREATE INDEX raw_telemetry_device_seq_idx ON raw_telemetry (user_id, device_id, seq)
    WHERE seq IS NOT NULL;

-- Devices that already have rows start from their highest stored seq.
INSERT INTO device_sequences (user_id, device_id, max_seq)
SELECT user_id, device_id, max(seq) FROM raw_telemetry WHERE seq IS NOT NULL
GROUP BY user_id, device_id;
