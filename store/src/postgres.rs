//! PostgreSQL backend. Readings go in with one UNNEST insert per batch; the TimescaleDB
//! extension, when the server has it, turns `readings` into a hypertable.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use telemon_model::{AlertEvent, DeviceId, Reading};
use tracing::info;

use crate::{
    column_value, parse_alert, value_columns, AlertQuery, DeadLetter, Device, ReadingQuery, Result,
    StoreError,
};

#[derive(Clone, Debug)]
pub struct Postgres {
    pool: PgPool,
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
        Ok(Postgres { pool })
    }

    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        self.enable_timescaledb().await
    }

    /// Makes `readings` a hypertable when the extension can be installed; plain PostgreSQL
    /// keeps the same table with its BRIN index.
    async fn enable_timescaledb(&self) -> Result<()> {
        let available: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM pg_available_extensions WHERE name = 'timescaledb'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if available.is_none() {
            info!("timescaledb extension not available; readings stay in a plain table");
            return Ok(());
        }
        sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb").execute(&self.pool).await?;
        sqlx::query(
            "SELECT create_hypertable('readings', 'time', if_not_exists => TRUE, \
             migrate_data => TRUE)",
        )
        .execute(&self.pool)
        .await?;
        info!("readings stored in a TimescaleDB hypertable");
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn insert_readings(&self, readings: &[Reading], seen_at: DateTime<Utc>) -> Result<u64> {
        let n = readings.len();
        let (mut devices, mut metrics, mut times) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut values, mut texts, mut units) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for r in readings {
            let (value, text) = value_columns(&r.value);
            devices.push(r.device_id.as_str());
            metrics.push(r.metric.as_str());
            times.push(r.time);
            values.push(value);
            texts.push(text);
            units.push(r.unit.as_deref());
        }
        let mut seen: Vec<&str> = devices.clone();
        seen.sort_unstable();
        seen.dedup();

        let mut tx = self.pool.begin().await?;
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
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "INSERT INTO devices (id, first_seen, last_seen) SELECT id, $2, $2 FROM UNNEST($1::text[]) \
             AS id ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, $2)",
        )
        .bind(&seen)
        .bind(seen_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted)
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
