-- History at 1-minute and 1-hour buckets, as Store::readings serves it: average, minimum,
-- maximum and count of numeric values per device, metric and bucket. Real-time
-- (materialized_only = false), so the newest bucket answers before the policy runs.
-- WITH NO DATA keeps the statements valid inside the migration's transaction; the
-- policies fill the views.
CREATE MATERIALIZED VIEW readings_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, time_bucket(INTERVAL '1 minute', time) AS bucket,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(value) AS count,
       max(unit) AS unit
FROM readings
GROUP BY device_id, metric, bucket
WITH NO DATA;

SELECT add_continuous_aggregate_policy('readings_1m',
    start_offset => INTERVAL '2 hours', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE);

CREATE MATERIALIZED VIEW readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, time_bucket(INTERVAL '1 hour', time) AS bucket,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(value) AS count,
       max(unit) AS unit
FROM readings
GROUP BY device_id, metric, bucket
WITH NO DATA;

SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
