-- The legs of each alert of the last `bench_alerts` run on the local stack, in ms from the
-- reading's device time: the bridge took the reading from MQTT, the worker's transaction that
-- stored it started, the alert's release mark was committed (just before PUBREL), and it was
-- marked published (after PUBCOMP). Run before `make down`:
--   psql -h 127.0.0.1 -p 55432 -U postgres telemetry -f benchmarks/alert-legs.sql
WITH legs AS (
    SELECT extract(epoch FROM r.received_at - a.occurred_at) * 1000 AS bridge_received,
           extract(epoch FROM a.created_at - a.occurred_at) * 1000 AS batch_started,
           extract(epoch FROM a.released_at - a.occurred_at) * 1000 AS release_marked,
           extract(epoch FROM a.published_at - a.occurred_at) * 1000 AS marked_published
    FROM alerts a
    JOIN raw_telemetry r USING (kafka_partition, kafka_offset)
)
SELECT q AS percentile,
       round(percentile_cont(q) WITHIN GROUP (ORDER BY bridge_received)::numeric, 1) AS bridge_received,
       round(percentile_cont(q) WITHIN GROUP (ORDER BY batch_started)::numeric, 1) AS batch_started,
       round(percentile_cont(q) WITHIN GROUP (ORDER BY release_marked)::numeric, 1) AS release_marked,
       round(percentile_cont(q) WITHIN GROUP (ORDER BY marked_published)::numeric, 1) AS marked_published,
       count(*) AS alerts
FROM legs CROSS JOIN unnest(ARRAY[0.5, 0.9, 0.99]) AS q
GROUP BY q
ORDER BY q;
