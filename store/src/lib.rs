//! Storage for readings, dead letters, devices and alerts.
//!
//! Two backends with the same tables and the same answers: PostgreSQL (with TimescaleDB when
//! the extension is available) for production, and SQLite for the embedded default that lets
//! `telemon up` run with no database server. Migrations are versioned per backend under
//! `migrations/` and embedded in the binary.

/// Runs `$body` against the backend's pool, with `$ts` turning a time into the backend's
/// column type and `$get_ts` reading one back from a row.
macro_rules! on_backend {
    ($store:expr, |$pool:ident, $ts:ident, $get_ts:ident| $body:block) => {
        match $store {
            Store::Postgres(db) => {
                let $pool = db.pool();
                #[allow(unused_variables)]
                let $ts = |t: DateTime<Utc>| t;
                #[allow(unused_variables)]
                let $get_ts =
                    |row: &sqlx::postgres::PgRow, col: &str| row.try_get::<DateTime<Utc>, _>(col);
                $body
            }
            Store::Sqlite(db) => {
                let $pool = db.pool();
                #[allow(unused_variables)]
                let $ts = |t: DateTime<Utc>| t.timestamp_micros();
                #[allow(unused_variables)]
                let $get_ts = |row: &sqlx::sqlite::SqliteRow, col: &str| {
                    let us: i64 = row.try_get(col)?;
                    DateTime::from_timestamp_micros(us).ok_or_else(|| {
                        sqlx::Error::Decode(format!("time {us} out of range").into())
                    })
                };
                $body
            }
        }
    };
}

mod access;
mod postgres;
mod rules;
#[cfg(test)]
mod scratch;
mod sqlite;

pub use access::{ApiToken, AuditEntry, NewPatient, Patient, PatientDirectory, User};
pub use postgres::PgWrite;
pub use rules::{RuleTable, StoredRule};

use chrono::{DateTime, Utc};
use telemon_model::{AlertEvent, AlertState, Reading};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL (expected postgres://, postgresql:// or sqlite:)")]
    UnsupportedUrl,
    #[error("connecting to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("running migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query: {0}")]
    Query(#[from] sqlx::Error),
    #[error("{0} is not supported by the {1} store")]
    Unsupported(&'static str, &'static str),
}

impl StoreError {
    /// True when the database could not be reached, as opposed to refusing the data: the
    /// caller should keep the data and retry later rather than give up on it.
    pub fn is_unavailable(&self) -> bool {
        let e = match self {
            StoreError::Connect(e) | StoreError::Query(e) => e,
            _ => return false,
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => {
                // 57P01 admin shutdown, 57P03 cannot connect now, 08* connection exceptions.
                let code = db.code().unwrap_or_default();
                code.starts_with("08") || code.starts_with("57P")
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A message that could not become readings, with why.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub received_at: DateTime<Utc>,
    pub topic: String,
    pub identity: Option<String>,
    pub reason: String,
    pub detail: String,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Device {
    pub id: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub online: Option<bool>,
}

/// Which readings of one device to return.
#[derive(Clone, Debug)]
pub struct ReadingQuery {
    pub device: String,
    pub metric: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// When set, numeric readings are averaged per bucket of this many seconds.
    pub bucket_secs: Option<i64>,
    /// Newest first, at most this many.
    pub limit: i64,
}

#[derive(Clone, Debug, Default)]
pub struct AlertQuery {
    pub state: Option<AlertState>,
    pub active_only: bool,
    pub subject: Option<String>,
    pub limit: i64,
}

/// A connection pool to one of the backends.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(postgres::Postgres),
    Sqlite(sqlite::Sqlite),
}

/// Calls the same method on whichever backend this is.
macro_rules! dispatch {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self {
            Store::Postgres(db) => db.$method($($arg),*).await,
            Store::Sqlite(db) => db.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens `url`: `postgres://...`, or `sqlite:<path>` (created if missing).
    pub async fn connect(url: &str) -> Result<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(postgres::Postgres::connect(url).await?))
        } else if let Some(path) = url.strip_prefix("sqlite:") {
            Ok(Store::Sqlite(
                sqlite::Sqlite::open(path.trim_start_matches("//")).await?,
            ))
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgresql",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Chooses how PostgreSQL batches are written (UNNEST by default); SQLite ignores it.
    pub fn with_pg_write(self, write: PgWrite) -> Store {
        match self {
            Store::Postgres(db) => Store::Postgres(db.with_write(write)),
            other => other,
        }
    }

    /// Whether 1-minute and 1-hour history comes from TimescaleDB continuous aggregates
    /// (`readings_1m`, `readings_1h`) rather than from the raw table.
    pub fn uses_aggregates(&self) -> bool {
        match self {
            Store::Postgres(db) => db.uses_aggregates(),
            Store::Sqlite(_) => false,
        }
    }

    /// COPYs readings straight into the table with no deduplication and no device
    /// bookkeeping (PostgreSQL only): the raw-speed yardstick for the ingest benchmark, and
    /// a bulk load into a table known not to hold these rows.
    pub async fn copy_readings_raw(&self, readings: &[Reading]) -> Result<u64> {
        match self {
            Store::Postgres(db) => db.copy_readings_raw(readings).await,
            Store::Sqlite(_) => Err(StoreError::Unsupported("raw COPY", "sqlite")),
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        dispatch!(self, migrate())
    }

    /// Cheap round trip, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        dispatch!(self, ping())
    }

    /// Stores readings in one transaction, ignoring any already stored (same device, metric
    /// and time), and records each device as seen at `seen_at`. Returns rows newly inserted.
    pub async fn insert_readings(
        &self,
        readings: &[Reading],
        seen_at: DateTime<Utc>,
    ) -> Result<u64> {
        if readings.is_empty() {
            return Ok(0);
        }
        dispatch!(self, insert_readings(readings, seen_at))
    }

    pub async fn insert_dead_letters(&self, letters: &[DeadLetter]) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        dispatch!(self, insert_dead_letters(letters))
    }

    pub async fn set_online(&self, device: &str, online: bool, at: DateTime<Utc>) -> Result<()> {
        dispatch!(self, set_online(device, online, at))
    }

    pub async fn readings(&self, query: &ReadingQuery) -> Result<Vec<Reading>> {
        dispatch!(self, readings(query))
    }

    /// The newest reading of every metric of a device.
    pub async fn latest(&self, device: &str) -> Result<Vec<Reading>> {
        dispatch!(self, latest(device))
    }

    pub async fn devices(&self) -> Result<Vec<Device>> {
        dispatch!(self, devices())
    }

    /// Deletes all but about the newest `keep` dead letters (ids are increasing; a gap only
    /// keeps fewer): a device sending nothing but refused messages must not fill the disk.
    pub async fn prune_dead_letters(&self, keep: i64) -> Result<u64> {
        dispatch!(self, prune_dead_letters(keep))
    }

    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>> {
        dispatch!(self, dead_letters(limit))
    }

    /// Stores an alert as of this transition, and the transition in its history.
    pub async fn record_alert(&self, alert: &AlertEvent) -> Result<()> {
        dispatch!(self, record_alert(alert))
    }

    pub async fn alerts(&self, query: &AlertQuery) -> Result<Vec<AlertEvent>> {
        dispatch!(self, alerts(query))
    }

    pub async fn alert(&self, id: &str) -> Result<Option<AlertEvent>> {
        dispatch!(self, alert(id))
    }
}

fn parse_alert(
    state: &str,
    priority: &str,
) -> std::result::Result<(AlertState, telemon_model::Priority), sqlx::Error> {
    let bad = |what: &str, v: &str| sqlx::Error::Decode(format!("invalid {what} {v:?}").into());
    let state = AlertState::parse(state).ok_or_else(|| bad("state", state))?;
    let priority =
        telemon_model::Priority::parse(priority).ok_or_else(|| bad("priority", priority))?;
    Ok((state, priority))
}

/// Splits a reading's value into the numeric and text columns.
fn value_columns(value: &telemon_model::Value) -> (Option<f64>, Option<String>) {
    match value {
        telemon_model::Value::Text(t) => (None, Some(t.clone())),
        other => (other.as_f64(), None),
    }
}

fn column_value(number: Option<f64>, text: Option<String>) -> telemon_model::Value {
    match (number, text) {
        (_, Some(t)) => telemon_model::Value::Text(t),
        (Some(n), None) => telemon_model::Value::Number(n),
        (None, None) => telemon_model::Value::Number(f64::NAN),
    }
}
