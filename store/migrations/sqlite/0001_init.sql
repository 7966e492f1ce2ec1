-- Times are microseconds since the Unix epoch, UTC.
CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    online      INTEGER
);

-- One row per device, metric and time: the key is what makes redelivery harmless.
CREATE TABLE readings (
    device_id   TEXT NOT NULL,
    metric      TEXT NOT NULL,
    time        INTEGER NOT NULL,
    value       REAL,
    value_text  TEXT,
    unit        TEXT,
    PRIMARY KEY (device_id, metric, time)
) WITHOUT ROWID;
CREATE INDEX readings_time ON readings (time);

CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    identity    TEXT,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    payload     BLOB NOT NULL
);

CREATE TABLE alerts (
    id              TEXT PRIMARY KEY,
    rule            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    priority        TEXT NOT NULL,
    state           TEXT NOT NULL,
    metric          TEXT,
    value           REAL,
    message         TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at INTEGER
);
CREATE UNIQUE INDEX alerts_one_active ON alerts (rule, subject) WHERE state <> 'resolved';
CREATE INDEX alerts_updated ON alerts (updated_at DESC);

CREATE TABLE alert_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id    TEXT NOT NULL REFERENCES alerts (id),
    state       TEXT NOT NULL,
    priority    TEXT NOT NULL,
    at          INTEGER NOT NULL,
    actor       TEXT
);
CREATE INDEX alert_history_alert ON alert_history (alert_id, at);
