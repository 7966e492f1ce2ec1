-- History at 1-minute and 1-hour buckets, as Store::readings serves it: average, minimum,
-- maximum and count of the numeric values per device, metric and bucket, with the same
-- unit rule as the raw query (text readings count in neither). Real-time
-- (materialized_only = false): buckets past the last refresh are computed from the raw
-- rows at query time, so a reading shows in history as soon as it is committed.
-- WITH NO DATA keeps the statements valid inside the migration's transaction; the
-- policies fill the views.
CREATE MATERIALIZED VIEW readings_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, time_bucket(INTERVAL '1 minute', time) AS bucket,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count,
       max(unit) AS unit
FROM readings
WHERE value IS NOT NULL
GROUP BY device_id, metric, bucket
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, time_bucket(INTERVAL '1 hour', time) AS bucket,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count,
       max(unit) AS unit
FROM readings
WHERE value IS NOT NULL
GROUP BY device_id, metric, bucket
WITH NO DATA;

-- A late reading (a spool written back after an outage, a device uploading what it
-- buffered) lands below the refreshed range and is invisible in these views until a
-- refresh covers its bucket. The refreshes therefore reach back 364 days, which costs
-- little: past the first run they recompute only the buckets that received rows. They stop
-- short of the 365-day retention because a refresh over a dropped chunk would delete its
-- buckets, and the aggregates are meant to outlive the raw rows.
SELECT add_continuous_aggregate_policy('readings_1m',
    start_offset => INTERVAL '364 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE);

SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '364 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);
