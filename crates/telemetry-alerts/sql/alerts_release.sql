-- Exactly-once publishing (QoS 2): set once the publisher may have sent PUBREL for the row,
-- written and committed before it does. A row without it is published again under the same
-- packet id, which the broker recognises; a row with it is only released again.
ALTER TABLE alerts ADD COLUMN released_at timestamptz;
