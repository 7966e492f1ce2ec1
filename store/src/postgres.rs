//! PostgreSQL backend. Readings go in with one binary COPY per batch straight into
//! `readings`, and a batch that meets rows already stored goes again through a deduplicating
//! UNNEST insert (the write paths are measured side by side in `benches/write.rs`); when the
//! server has the TimescaleDB extension, a separate
//! migration set makes `readings` a hypertable with compression, retention and continuous
//! aggregates, and history at 1-minute and 1-hour buckets reads the aggregates.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use telemon_model::{AlertEvent, DeviceId, Reading};
use tracing::{debug, info};

use crate::{
    column_value, parse_alert, value_columns, AlertQuery, DeadLetter, Device, ReadingQuery, Result,
    StoreError,
};

/// How batches of readings reach the `readings` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgWrite {
    /// Binary COPY straight into `readings`, after dropping repeats inside the batch. The
    /// default: a batch that meets no stored row (the usual case, redeliveries are rare) costs
    /// what raw COPY costs. The primary key refuses a batch that does meet one; that batch is
    /// then written again with `Unnest`, in a new transaction, so that nothing is stored twice.
    Direct,
    /// COPY into a session-local staging table, then one `INSERT ... SELECT ... ON CONFLICT
    /// DO NOTHING`.
    Copy,
    /// One `INSERT ... SELECT FROM UNNEST(arrays) ON CONFLICT DO NOTHING`: every row pays
    /// the speculative insertion of `ON CONFLICT`, which in `benches/write.rs` halves the
    /// rows per second of a plain COPY.
    Unnest,
}

#[derive(Clone, Debug)]
pub struct Postgres {
    pool: PgPool,
    write: PgWrite,
    /// Whether the TimescaleDB continuous aggregates exist, so that 1-minute and 1-hour
    /// history reads them instead of scanning raw rows.
    aggregates: Arc<AtomicBool>,
}

impl Postgres {
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // Fail fast while the server is down, so that ingest spools instead of waiting.
            .acquire_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .map_err(StoreError::Connect)?;
        let db = Postgres {
            pool,
            write: PgWrite::Direct,
            aggregates: Arc::default(),
        };
        db.detect_aggregates().await?;
        Ok(db)
    }

    pub fn with_write(mut self, write: PgWrite) -> Self {
        self.write = write;
        self
    }

    pub fn uses_aggregates(&self) -> bool {
        self.aggregates.load(Ordering::Relaxed)
    }

    async fn detect_aggregates(&self) -> Result<()> {
        let (present,): (bool,) = sqlx::query_as(
            "SELECT to_regclass('readings_1m') IS NOT NULL \
             AND to_regclass('readings_1h') IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        self.aggregates.store(present, Ordering::Relaxed);
        Ok(())
    }

    /// The pool, for the access-control queries in `access.rs`.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the base schema, then the TimescaleDB steps when the server can load the
    /// extension. Both sets are versioned in the same `_sqlx_migrations` table (TimescaleDB
    /// steps number from 1001), and each migrator ignores the other's versions.
    pub async fn migrate(&self) -> Result<()> {
        let mut base = sqlx::migrate!("./migrations/postgres");
        base.set_ignore_missing(true);
        base.run(&self.pool).await?;

        if self.timescaledb_loadable().await? {
            let mut timescale = sqlx::migrate!("./migrations/timescaledb");
            timescale.set_ignore_missing(true);
            timescale.run(&self.pool).await?;
            info!("readings in a TimescaleDB hypertable with 1-minute and 1-hour aggregates");
        } else {
            info!("timescaledb extension not available; readings stay in a plain table");
        }
        self.detect_aggregates().await
    }

    /// True when `CREATE EXTENSION timescaledb` can succeed: the package is installed and
    /// the library preloaded (without `shared_preload_libraries` the extension refuses to
    /// be created), or the extension already exists in this database.
    async fn timescaledb_loadable(&self) -> Result<bool> {
        let (loadable,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') \
             OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') \
             AND current_setting('shared_preload_libraries') LIKE '%timescaledb%')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(loadable)
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn insert_readings(
        &self,
        readings: &[Reading],
        seen_at: DateTime<Utc>,
    ) -> Result<u64> {
        if self.write != PgWrite::Direct {
            return self.insert_batch(self.write, readings, seen_at).await;
        }
        match self.insert_batch(PgWrite::Direct, readings, seen_at).await {
            Err(StoreError::Query(e)) if refused_as_stored(&e) => {
                debug!(rows = readings.len(), cause = %e, "batch meets stored rows; deduplicating");
                self.insert_batch(PgWrite::Unnest, readings, seen_at).await
            }
            other => other,
        }
    }

    /// One transaction: the readings, then the devices' last-seen times.
    async fn insert_batch(
        &self,
        write: PgWrite,
        readings: &[Reading],
        seen_at: DateTime<Utc>,
    ) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let inserted = match write {
            PgWrite::Direct => copy_direct(&mut tx, readings).await?,
            PgWrite::Copy => copy_staged(&mut tx, readings).await?,
            PgWrite::Unnest => insert_unnest(&mut tx, readings).await?,
        };

        let mut seen: Vec<&str> = readings.iter().map(|r| r.device_id.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        sqlx::query(
            "INSERT INTO devices (id, first_seen, last_seen) SELECT id, $2, $2 \
             FROM UNNEST($1::text[]) AS id \
             ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, $2)",
        )
        .bind(&seen)
        .bind(seen_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Binary COPY straight into `readings`, without deduplication or device bookkeeping: the
    /// fastest the server can take rows, the yardstick the ingest benchmark compares with.
    pub async fn copy_readings_raw(&self, readings: &[Reading]) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let mut copy = conn
            .copy_in_raw(
                "COPY readings (device_id, metric, time, value, value_text, unit) \
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        copy.send(copy_binary(readings.iter())).await?;
        Ok(copy.finish().await?)
    }

    pub async fn insert_dead_letters(&self, letters: &[DeadLetter]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for l in letters {
            sqlx::query(
                "INSERT INTO dead_letters (received_at, topic, identity, reason, detail, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(l.received_at)
            .bind(&l.topic)
            .bind(&l.identity)
            .bind(&l.reason)
            .bind(&l.detail)
            .bind(&l.payload)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_online(&self, device: &str, online: bool, at: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO devices (id, first_seen, last_seen, online) VALUES ($1, $2, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET online = $3, \
             last_seen = GREATEST(devices.last_seen, $2)",
        )
        .bind(device)
        .bind(at)
        .bind(online)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn readings(&self, q: &ReadingQuery) -> Result<Vec<Reading>> {
        let rows = match q.bucket_secs {
            None => {
                sqlx::query(
                    "SELECT device_id, metric, time, value, value_text, unit FROM readings \
                     WHERE device_id = $1 AND ($2::text IS NULL OR metric = $2) \
                     AND ($3::timestamptz IS NULL OR time >= $3) \
                     AND ($4::timestamptz IS NULL OR time < $4) \
                     ORDER BY time DESC LIMIT $5",
                )
                .bind(&q.device)
                .bind(&q.metric)
                .bind(q.from)
                .bind(q.to)
                .bind(q.limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some(bucket @ (60 | 3600)) if self.uses_aggregates() => {
                self.bucket_rows_from_aggregates(q, bucket).await?
            }
            Some(bucket) => {
                sqlx::query(
                    "SELECT device_id, metric, \
                     to_timestamp(floor(extract(epoch FROM time) / $6) * $6) AS time, \
                     avg(value) AS value, NULL::text AS value_text, max(unit) AS unit \
                     FROM readings \
                     WHERE device_id = $1 AND ($2::text IS NULL OR metric = $2) \
                     AND ($3::timestamptz IS NULL OR time >= $3) \
                     AND ($4::timestamptz IS NULL OR time < $4) AND value IS NOT NULL \
                     GROUP BY 1, 2, 3 ORDER BY 3 DESC, 2 LIMIT $5",
                )
                .bind(&q.device)
                .bind(&q.metric)
                .bind(q.from)
                .bind(q.to)
                .bind(q.limit)
                .bind(bucket as f64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(reading_from_row).collect()
    }

    /// Bucketed history from `readings_1m` or `readings_1h`, the same rows the raw query
    /// gives. The views hold whole buckets only, so a bucket cut by `from` or `to` (the
    /// dashboard asks for "the last 24 hours" at any second) is averaged from the raw rows
    /// inside the range, and only the whole buckets between come from the view.
    ///
    /// A reading written into a bucket that a refresh has already materialized (one that
    /// arrives minutes late, a spool written back after an outage) is left out until the next
    /// policy refresh recomputes that bucket: within a minute for 1-minute history, five
    /// minutes for hourly history (see `migrations/timescaledb/1002_aggregates.sql`).
    async fn bucket_rows_from_aggregates(
        &self,
        q: &ReadingQuery,
        bucket: i64,
    ) -> Result<Vec<PgRow>> {
        let (view, width) = if bucket == 60 {
            ("readings_1m", "1 minute")
        } else {
            ("readings_1h", "1 hour")
        };
        let whole_from = q.from.map(|from| bucket_start(from, bucket, true));
        let whole_to = q.to.map(|to| bucket_start(to, bucket, false));

        // The views are real-time (materialized_only = false), so the newest buckets, not
        // yet refreshed, come from the raw rows inside the view itself.
        let rows = sqlx::query(&format!(
            "SELECT device_id, metric, bucket AS time, avg AS value, NULL::text AS value_text, \
             unit FROM {view} \
             WHERE device_id = $1 AND ($2::text IS NULL OR metric = $2) \
             AND ($6::timestamptz IS NULL OR bucket >= $6) \
             AND ($7::timestamptz IS NULL OR bucket < $7) \
             UNION ALL \
             SELECT device_id, metric, time_bucket(INTERVAL '{width}', time) AS time, \
             avg(value) AS value, NULL::text AS value_text, max(unit) AS unit FROM readings \
             WHERE device_id = $1 AND ($2::text IS NULL OR metric = $2) \
             AND ($3::timestamptz IS NULL OR time >= $3) \
             AND ($4::timestamptz IS NULL OR time < $4) AND value IS NOT NULL \
             AND (time < $6 OR time >= $7) \
             GROUP BY 1, 2, 3 \
             ORDER BY 3 DESC, 2 LIMIT $5"
        ))
        .bind(&q.device)
        .bind(&q.metric)
        .bind(q.from)
        .bind(q.to)
        .bind(q.limit)
        .bind(whole_from)
        .bind(whole_to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn latest(&self, device: &str) -> Result<Vec<Reading>> {
        let rows = sqlx::query(
            "SELECT DISTINCT ON (metric) device_id, metric, time, value, value_text, unit \
             FROM readings WHERE device_id = $1 ORDER BY metric, time DESC",
        )
        .bind(device)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(reading_from_row).collect()
    }

    pub async fn devices(&self) -> Result<Vec<Device>> {
        let rows = sqlx::query("SELECT id, first_seen, last_seen, online FROM devices ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Device {
                    id: row.try_get("id")?,
                    first_seen: row.try_get("first_seen")?,
                    last_seen: row.try_get("last_seen")?,
                    online: row.try_get("online")?,
                })
            })
            .collect()
    }

    pub async fn prune_dead_letters(&self, keep: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - $1",
        )
        .bind(keep)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT received_at, topic, identity, reason, detail, payload FROM dead_letters \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    received_at: row.try_get("received_at")?,
                    topic: row.try_get("topic")?,
                    identity: row.try_get("identity")?,
                    reason: row.try_get("reason")?,
                    detail: row.try_get("detail")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }

    pub async fn record_alert(&self, a: &AlertEvent) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO alerts (id, rule, subject, priority, state, metric, value, message, \
             started_at, updated_at, acknowledged_by, acknowledged_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (id) DO UPDATE SET priority = $4, state = $5, value = $7, \
             message = $8, updated_at = $10, acknowledged_by = $11, acknowledged_at = $12",
        )
        .bind(&a.id)
        .bind(&a.rule)
        .bind(&a.subject)
        .bind(a.priority.as_str())
        .bind(a.state.as_str())
        .bind(&a.metric)
        .bind(a.value)
        .bind(&a.message)
        .bind(a.started_at)
        .bind(a.updated_at)
        .bind(&a.acknowledged_by)
        .bind(a.acknowledged_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO alert_history (alert_id, state, priority, at, actor) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&a.id)
        .bind(a.state.as_str())
        .bind(a.priority.as_str())
        .bind(a.updated_at)
        .bind(&a.acknowledged_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn alerts(&self, q: &AlertQuery) -> Result<Vec<AlertEvent>> {
        let rows = sqlx::query(
            "SELECT * FROM alerts WHERE ($1::text IS NULL OR state = $1) \
             AND (NOT $2 OR state <> 'resolved') AND ($3::text IS NULL OR subject = $3) \
             ORDER BY updated_at DESC LIMIT $4",
        )
        .bind(q.state.map(|s| s.as_str()))
        .bind(q.active_only)
        .bind(&q.subject)
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    pub async fn alert(&self, id: &str) -> Result<Option<AlertEvent>> {
        let row = sqlx::query("SELECT * FROM alerts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(alert_from_row).transpose()
    }
}

/// The start of the bucket of `bucket_secs` holding `time` (buckets are aligned to the Unix
/// epoch, as `time_bucket` aligns minutes and hours), or with `up` the first bucket start at
/// or after `time`.
fn bucket_start(time: DateTime<Utc>, bucket_secs: i64, up: bool) -> DateTime<Utc> {
    let width = bucket_secs * 1_000_000;
    let micros = time.timestamp_micros();
    let mut start = micros.div_euclid(width) * width;
    if up && start < micros {
        start += width;
    }
    DateTime::from_timestamp_micros(start).unwrap_or(time)
}

fn reading_from_row(row: &PgRow) -> Result<Reading> {
    let device: String = row.try_get("device_id")?;
    Ok(Reading {
        device_id: DeviceId::new(device).map_err(|e| sqlx::Error::Decode(e.into()))?,
        metric: row.try_get("metric")?,
        time: row.try_get("time")?,
        value: column_value(row.try_get("value")?, row.try_get("value_text")?),
        unit: row.try_get("unit")?,
    })
}

fn alert_from_row(row: &PgRow) -> Result<AlertEvent> {
    let (state, priority) = parse_alert(row.try_get("state")?, row.try_get("priority")?)?;
    Ok(AlertEvent {
        id: row.try_get("id")?,
        rule: row.try_get("rule")?,
        subject: row.try_get("subject")?,
        priority,
        state,
        metric: row.try_get("metric")?,
        value: row.try_get("value")?,
        message: row.try_get("message")?,
        started_at: row.try_get("started_at")?,
        updated_at: row.try_get("updated_at")?,
        acknowledged_by: row.try_get("acknowledged_by")?,
        acknowledged_at: row.try_get("acknowledged_at")?,
    })
}

/// Whether a direct COPY failed because a row of the batch is already stored (or is being
/// stored by a concurrent batch, which can also surface as a deadlock between the two): the
/// batch is then written again through the deduplicating path.
fn refused_as_stored(e: &sqlx::Error) -> bool {
    const UNIQUE_VIOLATION: &str = "23505";
    const DEADLOCK_DETECTED: &str = "40P01";
    let sqlx::Error::Database(e) = e else {
        return false;
    };
    matches!(
        e.code().as_deref(),
        Some(UNIQUE_VIOLATION | DEADLOCK_DETECTED)
    )
}

/// Binary COPY into `readings` of the batch's first reading of each (device, metric, time):
/// a later repeat inside the batch (a redelivery, or the same reading once as an integer and
/// once as a float) is dropped here, as `ON CONFLICT DO NOTHING` would drop it.
async fn copy_direct(conn: &mut PgConnection, readings: &[Reading]) -> Result<u64> {
    let mut seen = HashSet::with_capacity(readings.len());
    let unique = readings.iter().filter(|r| {
        let key = (r.device_id.as_str(), r.metric.as_str(), pg_micros(&r.time));
        seen.insert(key)
    });
    let data = copy_binary(unique);

    let mut copy = conn
        .copy_in_raw(
            "COPY readings (device_id, metric, time, value, value_text, unit) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(data).await?;
    Ok(copy.finish().await?)
}

/// Microseconds since 2000-01-01 UTC, PostgreSQL's `timestamptz`, truncated like sqlx's
/// binary encoding of the other paths, so that every path stores the same instant.
fn pg_micros(time: &DateTime<Utc>) -> i64 {
    const PG_EPOCH_SECS: i64 = 946_684_800;
    let since = *time - DateTime::from_timestamp(PG_EPOCH_SECS, 0).unwrap_or_default();
    since.num_microseconds().unwrap_or(i64::MAX)
}

/// The readings in COPY's binary format: a header, then per row the field count and each
/// field as a length (-1 for NULL) and its bytes, then a -1 trailer.
fn copy_binary<'a>(readings: impl Iterator<Item = &'a Reading>) -> Vec<u8> {
    const FIELDS: i16 = 6;
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    for r in readings {
        let (value, text) = value_columns(&r.value);
        out.extend_from_slice(&FIELDS.to_be_bytes());
        binary_text(&mut out, Some(r.device_id.as_str()));
        binary_text(&mut out, Some(&r.metric));
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&pg_micros(&r.time).to_be_bytes());
        match value {
            Some(v) => {
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&v.to_bits().to_be_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        binary_text(&mut out, text.as_deref());
        binary_text(&mut out, r.unit.as_deref());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// One `text` field; NUL cannot be stored in a text column, so it is left out, as in the
/// text format (validation refuses it before storage anyway).
fn binary_text(out: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return;
    };
    let bytes = value.as_bytes();
    let kept = bytes.iter().filter(|&&b| b != 0).count();
    out.extend_from_slice(&(kept as i32).to_be_bytes());
    if kept == bytes.len() {
        out.extend_from_slice(bytes);
    } else {
        out.extend(bytes.iter().filter(|&&b| b != 0));
    }
}

/// COPYs the batch into a staging table private to this session and moves the rows new to
/// `readings` across in one statement. `ON CONFLICT DO NOTHING` also absorbs duplicates
/// inside the batch itself (the second copy conflicts with the first).
async fn copy_staged(conn: &mut PgConnection, readings: &[Reading]) -> Result<u64> {
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS readings_stage \
         (device_id text, metric text, time timestamptz, value float8, value_text text, \
         unit text) ON COMMIT DELETE ROWS",
    )
    .execute(&mut *conn)
    .await?;

    let mut copy = conn
        .copy_in_raw(
            "COPY readings_stage (device_id, metric, time, value, value_text, unit) FROM STDIN",
        )
        .await?;
    copy.send(copy_text(readings)).await?;
    copy.finish().await?;

    let inserted = sqlx::query(
        "INSERT INTO readings (device_id, metric, time, value, value_text, unit) \
         SELECT device_id, metric, time, value, value_text, unit FROM readings_stage \
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted)
}

async fn insert_unnest(conn: &mut PgConnection, readings: &[Reading]) -> Result<u64> {
    let n = readings.len();
    let (mut devices, mut metrics, mut times) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut values, mut texts, mut units) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in readings {
        let (value, text) = value_columns(&r.value);
        devices.push(r.device_id.as_str());
        metrics.push(r.metric.as_str());
        times.push(r.time);
        values.push(value);
        texts.push(text);
        units.push(r.unit.as_deref());
    }

    let inserted = sqlx::query(
        "INSERT INTO readings (device_id, metric, time, value, value_text, unit) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::float8[], \
         $5::text[], $6::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(&devices)
    .bind(&metrics)
    .bind(&times)
    .bind(&values)
    .bind(&texts)
    .bind(&units)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted)
}

/// The batch in COPY's text format: tab-separated, `\N` for NULL.
fn copy_text(readings: &[Reading]) -> Vec<u8> {
    let mut out = String::with_capacity(readings.len() * 96);
    for r in readings {
        let (value, text) = value_columns(&r.value);
        copy_field(&mut out, Some(r.device_id.as_str()));
        out.push('\t');
        copy_field(&mut out, Some(&r.metric));
        out.push('\t');
        // Microseconds, truncated, like sqlx's binary encoding of the UNNEST path, so that
        // both paths store the same instant for the same reading.
        let _ = write!(out, "{}", r.time.format("%Y-%m-%d %H:%M:%S%.6f+00"));
        out.push('\t');
        match value {
            Some(v) if v.is_nan() => out.push_str("NaN"),
            Some(v) if v.is_infinite() => {
                out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" })
            }
            // Display of f64 is the shortest text that reads back as the same number.
            Some(v) => {
                let _ = write!(out, "{v}");
            }
            None => out.push_str("\\N"),
        }
        out.push('\t');
        copy_field(&mut out, text.as_deref());
        out.push('\t');
        copy_field(&mut out, r.unit.as_deref());
        out.push('\n');
    }
    out.into_bytes()
}

/// One text-format field, escaped so that no byte of the value can end the field or row.
fn copy_field(out: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        out.push_str("\\N");
        return;
    };
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            // NUL cannot be stored in a text column; validation refuses it before storage.
            '\0' => {}
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemon_model::Value;

    fn reading(metric: &str, value: Value, unit: Option<&str>) -> Reading {
        Reading {
            device_id: DeviceId::new("bed-1").unwrap(),
            metric: metric.into(),
            time: DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap(),
            value,
            unit: unit.map(str::to_string),
        }
    }

    #[test]
    fn copy_text_escapes_separators_and_marks_nulls() {
        let rows = [
            reading("hr", Value::Number(71.5), Some("bpm")),
            reading("note", Value::Text("a\tb\nc\\d".into()), None),
        ];
        let text = String::from_utf8(copy_text(&rows)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "bed-1\thr\t2023-11-14 22:13:20.123456+00\t71.5\t\\N\tbpm",
                "bed-1\tnote\t2023-11-14 22:13:20.123456+00\t\\N\ta\\tb\\nc\\\\d\t\\N",
            ]
        );
    }

    #[test]
    fn copy_text_writes_booleans_as_numbers_and_special_floats_by_name() {
        let rows = [
            reading("on", Value::Bool(true), None),
            reading("x", Value::Number(f64::INFINITY), None),
        ];
        let text = String::from_utf8(copy_text(&rows)).unwrap();
        let values: Vec<&str> = text
            .lines()
            .map(|l| l.split('\t').nth(3).unwrap())
            .collect();
        assert_eq!(values, ["1", "Infinity"]);
    }

    #[test]
    fn copy_binary_frames_rows_and_marks_nulls() {
        let rows = [reading("n\0te", Value::Text("ok".into()), None)];
        let data = copy_binary(rows.iter());
        assert_eq!(&data[..11], b"PGCOPY\n\xff\r\n\0");
        let mut expected = Vec::new();
        expected.extend_from_slice(&6i16.to_be_bytes());
        expected.extend_from_slice(&5i32.to_be_bytes());
        expected.extend_from_slice(b"bed-1");
        expected.extend_from_slice(&3i32.to_be_bytes());
        expected.extend_from_slice(b"nte");
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(&753_315_200_123_456i64.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&2i32.to_be_bytes());
        expected.extend_from_slice(b"ok");
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&data[19..], &expected[..]);
    }

    /// A batch mixing stored rows, repeats and new rows: the direct COPY is refused by the
    /// primary key, and the batch is stored again without its duplicates.
    #[tokio::test]
    async fn direct_write_of_a_partly_stored_batch_stores_only_the_new_rows() {
        let Ok(admin) = std::env::var("TELEMON_TEST_DATABASE_URL") else {
            panic!("TELEMON_TEST_DATABASE_URL is not set: scripts/test.sh starts a PostgreSQL");
        };
        let mut conn = <PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap();
        let db = format!("store_direct_partly_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("CREATE DATABASE {db}"),
        ] {
            sqlx::query(&sql).execute(&mut conn).await.unwrap();
        }
        let base = admin.rsplit_once('/').unwrap().0;
        let store = Postgres::connect(&format!("{base}/{db}")).await.unwrap();
        store.migrate().await.unwrap();
        let at = |ms: i64| DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap();
        let hr = |ms: i64, v: f64| Reading {
            time: at(ms),
            ..reading("hr", Value::Number(v), None)
        };

        assert_eq!(
            store.insert_readings(&[hr(0, 70.0)], at(0)).await.unwrap(),
            1
        );
        let batch = [hr(1, 71.0), hr(0, 70.0), hr(1, 71.0), hr(2, 72.0)];
        assert_eq!(store.insert_readings(&batch, at(2)).await.unwrap(), 2);

        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM readings")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(rows, 3);
    }
}
