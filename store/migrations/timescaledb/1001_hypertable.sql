-- Applied only when the server can load TimescaleDB (see Postgres::migrate): the same
-- tables as plain PostgreSQL, with the extension's storage underneath.
CREATE EXTENSION IF NOT EXISTS timescaledb;

-- One chunk per day; the primary key (device_id, metric, time) contains the time column, as
-- a hypertable's unique keys must, so deduplication works unchanged.
SELECT create_hypertable('readings', 'time', chunk_time_interval => INTERVAL '1 day',
                         if_not_exists => TRUE, migrate_data => TRUE);

-- Chunks older than a week are compressed per device and metric; ON CONFLICT DO NOTHING
-- keeps working against compressed chunks (TimescaleDB 2.11 and later).
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id, metric',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('readings', INTERVAL '7 days', if_not_exists => TRUE);

-- Raw readings are kept for a year; the aggregates below outlive them.
SELECT add_retention_policy('readings', INTERVAL '365 days', if_not_exists => TRUE);
