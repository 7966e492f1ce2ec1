-- Applied only when the server can load TimescaleDB (see Postgres::migrate): the same
-- tables as plain PostgreSQL, with the extension's storage underneath.
CREATE EXTENSION IF NOT EXISTS timescaledb;

-- Chunks are what keep time-range scans cheap here, and every chunk would carry its own copy
-- of the BRIN index as extra write cost.
DROP INDEX IF EXISTS readings_time_brin;

-- One chunk per day; the primary key (device_id, metric, time) contains the time column, as
-- a hypertable's unique keys must, so ON CONFLICT deduplication works unchanged. Rows
-- already stored move into chunks.
SELECT create_hypertable('readings', by_range('time', INTERVAL '1 day'),
                         if_not_exists => TRUE, migrate_data => TRUE);

-- Chunks older than a week are compressed per device and metric; ON CONFLICT DO NOTHING
-- still finds duplicates in compressed chunks, so a late redelivery stays one row.
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id, metric',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('readings', INTERVAL '7 days', if_not_exists => TRUE);

-- Raw readings are kept for a year (ingest accepts readings up to 366 days old); the
-- aggregates keep what they summarized after the raw chunks are dropped, see 1002.
SELECT add_retention_policy('readings', INTERVAL '365 days', if_not_exists => TRUE);
