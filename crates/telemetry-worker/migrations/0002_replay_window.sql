-- A replay window per partition: offsets in [replay_from, replay_to) are read again and each
-- record whose row is missing from raw_telemetry (deleted by a range rebuild, or by hand) is
-- stored again; rows still present are skipped, so a replay never duplicates. Set by
-- `telemetry-worker replay`; replay_from moves forward as the window is read, and both are
-- cleared when it reaches replay_to.
ALTER TABLE ingest_offsets
    ADD COLUMN replay_from bigint,
    ADD COLUMN replay_to   bigint,
    ADD CONSTRAINT ingest_offsets_replay_window CHECK (
        (replay_from IS NULL AND replay_to IS NULL)
        OR (replay_from IS NOT NULL AND replay_to IS NOT NULL AND replay_from < replay_to));
