-- Who may use the API, which patients exist, which devices monitor them, who is assigned
-- to whom, and the audit log of views of patient data.

CREATE TABLE users (
    name          text PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('admin', 'clinician', 'viewer')),
    -- PHC string (argon2id, with its own salt and parameters).
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL
);

-- Only the SHA-256 of a session token is kept: a leaked table grants no sessions.
CREATE TABLE sessions (
    token_hash  text PRIMARY KEY,
    user_name   text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX sessions_expires ON sessions (expires_at);

-- Named tokens for integrations (with a role) or for one device (reads its own data only).
CREATE TABLE api_tokens (
    name        text PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    role        text NOT NULL CHECK (role IN ('admin', 'clinician', 'viewer')),
    device_id   text,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE patients (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    ward        text,
    spo2_scale  smallint NOT NULL DEFAULT 1 CHECK (spo2_scale IN (1, 2))
);

-- A device monitors at most one patient at a time.
CREATE TABLE patient_devices (
    device_id   text PRIMARY KEY,
    patient_id  text NOT NULL REFERENCES patients (id) ON DELETE CASCADE
);
CREATE INDEX patient_devices_patient ON patient_devices (patient_id);

-- Which principal (a user, or an integration token by name) is assigned which patients.
CREATE TABLE assignments (
    principal   text NOT NULL,
    patient_id  text NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    PRIMARY KEY (principal, patient_id)
);

CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL,
    actor   text NOT NULL,
    action  text NOT NULL,
    target  text NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
