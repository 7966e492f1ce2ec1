-- Alert rules beyond the rules file. `alert_rules` holds the rules created or changed
-- through the API: each overrides a file rule with the same id (so a file rule can be
-- disabled), and the alerts service merges them over its file rules every few seconds.
-- `alert_file_rules` mirrors the rules file the alerts service runs with, so that the API
-- (possibly another process) can list the merged set. Definitions are the rule as JSON,
-- validated by the alerts crate before they are written.

CREATE TABLE alert_rules (
    id          text PRIMARY KEY,
    definition  text NOT NULL,
    updated_at  timestamptz NOT NULL,
    updated_by  text NOT NULL
);

CREATE TABLE alert_file_rules (
    id          text PRIMARY KEY,
    definition  text NOT NULL,
    updated_at  timestamptz NOT NULL,
    updated_by  text NOT NULL
);
