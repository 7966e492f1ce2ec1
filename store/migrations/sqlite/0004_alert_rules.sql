-- Alert rules beyond the rules file (see the PostgreSQL migration of the same number).
-- Times are microseconds since the Unix epoch, UTC.

CREATE TABLE alert_rules (
    id          TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL
);

CREATE TABLE alert_file_rules (
    id          TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL
);
