-- Who may use the API, which patients exist, which devices monitor them, who is assigned
-- to whom, and the audit log of views of patient data. Times are microseconds since the
-- Unix epoch, UTC.

CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'clinician', 'viewer')),
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);

CREATE TABLE sessions (
    token_hash  TEXT PRIMARY KEY,
    user_name   TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX sessions_expires ON sessions (expires_at);

CREATE TABLE api_tokens (
    name        TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'clinician', 'viewer')),
    device_id   TEXT,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE patients (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    ward        TEXT,
    spo2_scale  INTEGER NOT NULL DEFAULT 1 CHECK (spo2_scale IN (1, 2))
);

CREATE TABLE patient_devices (
    device_id   TEXT PRIMARY KEY,
    patient_id  TEXT NOT NULL REFERENCES patients (id) ON DELETE CASCADE
);
CREATE INDEX patient_devices_patient ON patient_devices (patient_id);

CREATE TABLE assignments (
    principal   TEXT NOT NULL,
    patient_id  TEXT NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    PRIMARY KEY (principal, patient_id)
);

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
