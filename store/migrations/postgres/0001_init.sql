-- Devices known to telemon, with when they were last heard from.
CREATE TABLE devices (
    id          text PRIMARY KEY,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    online      boolean
);

-- One row per device, metric and time: the key is what makes redelivery harmless.
CREATE TABLE readings (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    time        timestamptz NOT NULL,
    value       double precision,
    value_text  text,
    unit        text,
    PRIMARY KEY (device_id, metric, time)
);

-- Readings arrive in time order, so a BRIN index keeps time-range scans cheap on plain
-- PostgreSQL; with TimescaleDB the hypertable's chunks do this job.
CREATE INDEX readings_time_brin ON readings USING brin (time);

-- Messages that could not become readings, kept with their raw bytes and the reason.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL,
    topic       text NOT NULL,
    identity    text,
    reason      text NOT NULL,
    detail      text NOT NULL,
    payload     bytea NOT NULL
);
CREATE INDEX dead_letters_received ON dead_letters (received_at);

CREATE TABLE alerts (
    id              text PRIMARY KEY,
    rule            text NOT NULL,
    subject         text NOT NULL,
    priority        text NOT NULL,
    state           text NOT NULL,
    metric          text,
    value           double precision,
    message         text NOT NULL,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    acknowledged_by text,
    acknowledged_at timestamptz
);
-- At most one active alert per rule and subject.
CREATE UNIQUE INDEX alerts_one_active ON alerts (rule, subject) WHERE state <> 'resolved';
CREATE INDEX alerts_updated ON alerts (updated_at DESC);

-- Every transition of every alert.
CREATE TABLE alert_history (
    id          bigserial PRIMARY KEY,
    alert_id    text NOT NULL REFERENCES alerts (id),
    state       text NOT NULL,
    priority    text NOT NULL,
    at          timestamptz NOT NULL,
    actor       text
);
CREATE INDEX alert_history_alert ON alert_history (alert_id, at);
