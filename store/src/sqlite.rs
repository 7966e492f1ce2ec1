//! SQLite backend: the embedded store for `telemon up` without a database server.
//! Times are stored as microseconds since the Unix epoch.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use telemon_model::{AlertEvent, DeviceId, Reading};

use crate::{
    column_value, parse_alert, value_columns, AlertQuery, DeadLetter, Device, ReadingQuery, Result,
    StoreError,
};

#[derive(Clone, Debug)]
pub struct Sqlite {
    pool: SqlitePool,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> std::result::Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| sqlx::Error::Decode(format!("time {us} out of range").into()))
}

fn opt_time(us: Option<i64>) -> std::result::Result<Option<DateTime<Utc>>, sqlx::Error> {
    us.map(time).transpose()
}

impl Sqlite {
    pub async fn open(path: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite:{path}"))
            .map_err(StoreError::Connect)?
            .create_if_missing(true)
            // WAL lets the API read while ingest writes; NORMAL sync is durable across a
            // process crash, which is what the embedded store promises.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(StoreError::Connect)?;
        Ok(Sqlite { pool })
    }

    /// The pool, for the access-control queries in `access.rs`.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
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
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        for r in readings {
            let (value, text) = value_columns(&r.value);
            inserted += sqlx::query(
                "INSERT OR IGNORE INTO readings (device_id, metric, time, value, value_text, unit) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(r.device_id.as_str())
            .bind(&r.metric)
            .bind(micros(r.time))
            .bind(value)
            .bind(text)
            .bind(&r.unit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        let mut seen: Vec<&str> = readings.iter().map(|r| r.device_id.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        for device in seen {
            sqlx::query(
                "INSERT INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2) \
                 ON CONFLICT (id) DO UPDATE SET last_seen = max(last_seen, ?2)",
            )
            .bind(device)
            .bind(micros(seen_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    pub async fn insert_dead_letters(&self, letters: &[DeadLetter]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for l in letters {
            sqlx::query(
                "INSERT INTO dead_letters (received_at, topic, identity, reason, detail, payload) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(micros(l.received_at))
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
            "INSERT INTO devices (id, first_seen, last_seen, online) VALUES (?1, ?2, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET online = ?3, last_seen = max(last_seen, ?2)",
        )
        .bind(device)
        .bind(micros(at))
        .bind(online)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn readings(&self, q: &ReadingQuery) -> Result<Vec<Reading>> {
        let from = q.from.map(micros);
        let to = q.to.map(micros);
        let rows = match q.bucket_secs {
            None => {
                sqlx::query(
                    "SELECT device_id, metric, time, value, value_text, unit FROM readings \
                     WHERE device_id = ?1 AND (?2 IS NULL OR metric = ?2) \
                     AND (?3 IS NULL OR time >= ?3) AND (?4 IS NULL OR time < ?4) \
                     ORDER BY time DESC LIMIT ?5",
                )
                .bind(&q.device)
                .bind(&q.metric)
                .bind(from)
                .bind(to)
                .bind(q.limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some(bucket) => {
                let width = bucket.max(1) * 1_000_000;
                sqlx::query(
                    "SELECT device_id, metric, (time / ?6) * ?6 AS time, avg(value) AS value, \
                     NULL AS value_text, max(unit) AS unit FROM readings \
                     WHERE device_id = ?1 AND (?2 IS NULL OR metric = ?2) \
                     AND (?3 IS NULL OR time >= ?3) AND (?4 IS NULL OR time < ?4) \
                     AND value IS NOT NULL \
                     GROUP BY 1, 2, 3 ORDER BY 3 DESC, 2 LIMIT ?5",
                )
                .bind(&q.device)
                .bind(&q.metric)
                .bind(from)
                .bind(to)
                .bind(q.limit)
                .bind(width)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(reading_from_row).collect()
    }

    pub async fn latest(&self, device: &str) -> Result<Vec<Reading>> {
        let rows = sqlx::query(
            "SELECT r.device_id, r.metric, r.time, r.value, r.value_text, r.unit FROM readings r \
             JOIN (SELECT metric, max(time) AS time FROM readings WHERE device_id = ?1 \
             GROUP BY metric) m ON r.metric = m.metric AND r.time = m.time \
             WHERE r.device_id = ?1 ORDER BY r.metric",
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
                    first_seen: time(row.try_get("first_seen")?)?,
                    last_seen: time(row.try_get("last_seen")?)?,
                    online: row.try_get("online")?,
                })
            })
            .collect()
    }

    pub async fn prune_dead_letters(&self, keep: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
        )
        .bind(keep)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT received_at, topic, identity, reason, detail, payload FROM dead_letters \
             ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    received_at: time(row.try_get("received_at")?)?,
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT (id) DO UPDATE SET priority = ?4, state = ?5, value = ?7, \
             message = ?8, updated_at = ?10, acknowledged_by = ?11, acknowledged_at = ?12",
        )
        .bind(&a.id)
        .bind(&a.rule)
        .bind(&a.subject)
        .bind(a.priority.as_str())
        .bind(a.state.as_str())
        .bind(&a.metric)
        .bind(a.value)
        .bind(&a.message)
        .bind(micros(a.started_at))
        .bind(micros(a.updated_at))
        .bind(&a.acknowledged_by)
        .bind(a.acknowledged_at.map(micros))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO alert_history (alert_id, state, priority, at, actor) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&a.id)
        .bind(a.state.as_str())
        .bind(a.priority.as_str())
        .bind(micros(a.updated_at))
        .bind(&a.acknowledged_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn alerts(&self, q: &AlertQuery) -> Result<Vec<AlertEvent>> {
        let rows = sqlx::query(
            "SELECT * FROM alerts WHERE (?1 IS NULL OR state = ?1) \
             AND (NOT ?2 OR state <> 'resolved') AND (?3 IS NULL OR subject = ?3) \
             ORDER BY updated_at DESC LIMIT ?4",
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
        let row = sqlx::query("SELECT * FROM alerts WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(alert_from_row).transpose()
    }
}

fn reading_from_row(row: &SqliteRow) -> Result<Reading> {
    let device: String = row.try_get("device_id")?;
    Ok(Reading {
        device_id: DeviceId::new(device).map_err(|e| sqlx::Error::Decode(e.into()))?,
        metric: row.try_get("metric")?,
        time: time(row.try_get("time")?)?,
        value: column_value(row.try_get("value")?, row.try_get("value_text")?),
        unit: row.try_get("unit")?,
    })
}

fn alert_from_row(row: &SqliteRow) -> Result<AlertEvent> {
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
        started_at: time(row.try_get("started_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
        acknowledged_by: row.try_get("acknowledged_by")?,
        acknowledged_at: opt_time(row.try_get("acknowledged_at")?)?,
    })
}
