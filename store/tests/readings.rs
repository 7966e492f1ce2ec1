//! Readings on both backends: deduplication on (device, metric, time) for redeliveries and
//! for the same reading sent as an integer and as a float, round trips of every column, and
//! bucketed history from the raw table or, with TimescaleDB, from its aggregates.
//!
//! PostgreSQL tests use the server in TELEMON_TEST_DATABASE_URL (scripts/test.sh starts one)
//! with a fresh database each, and fail loudly when it is not set.

use chrono::{DateTime, Duration, TimeZone, Utc};
use sqlx::Connection;
use telemon_model::{DeviceId, Reading, Value};
use telemon_store::{PgWrite, ReadingQuery, Store};

fn reading(device: &str, metric: &str, secs: i64, value: Value) -> Reading {
    Reading {
        device_id: DeviceId::new(device).unwrap(),
        metric: metric.into(),
        time: t(secs),
        value,
        unit: Some("bpm".into()),
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

fn query(device: &str, bucket: Option<i64>) -> ReadingQuery {
    ReadingQuery {
        device: device.into(),
        metric: None,
        from: None,
        to: None,
        bucket_secs: bucket,
        limit: 10_000,
    }
}

async fn sqlite() -> (Store, std::path::PathBuf) {
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let path = std::env::temp_dir().join(format!(
        "telemon-store-test-{}-{nanos}.db",
        std::process::id()
    ));
    let store = Store::connect(&format!("sqlite:{}", path.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    (store, path)
}

/// A fresh, migrated database on the test server.
async fn postgres(name: &str) -> Store {
    let admin = std::env::var("TELEMON_TEST_DATABASE_URL").expect(
        "TELEMON_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which \
         starts a private PostgreSQL",
    );
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let db = format!("store_{name}_{}", std::process::id());
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    let store = Store::connect(&format!("{base}/{db}")).await.unwrap();
    store.migrate().await.unwrap();
    store
}

/// Redelivered batches, duplicates inside one batch, and an integer and a float for the same
/// (device, metric, time) all end as one row each.
async fn deduplicates(store: &Store) {
    let first = vec![
        reading("bed-1", "heart_rate", 0, Value::Number(71.0)),
        reading("bed-1", "heart_rate", 1, Value::Number(72.0)),
        reading("bed-1", "spo2", 0, Value::Number(97.0)),
    ];
    assert_eq!(store.insert_readings(&first, t(0)).await.unwrap(), 3);

    // The whole batch again, as after a redelivery.
    assert_eq!(store.insert_readings(&first, t(5)).await.unwrap(), 0);

    // The same reading as an integer payload and as a float payload decode to the same
    // number; sent twice in one batch and once more later, it is still one row.
    let int_and_float = vec![
        reading("bed-1", "temp", 2, Value::Number(37.0)),
        reading("bed-1", "temp", 2, Value::Number(37.0_f64.floor())),
        reading("bed-1", "heart_rate", 2, Value::Number(73.0)),
    ];
    assert_eq!(
        store.insert_readings(&int_and_float, t(6)).await.unwrap(),
        2
    );
    let again = [reading("bed-1", "temp", 2, Value::Number(37.0))];
    assert_eq!(store.insert_readings(&again, t(7)).await.unwrap(), 0);

    let rows = store.readings(&query("bed-1", None)).await.unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    let temps: Vec<_> = rows.iter().filter(|r| r.metric == "temp").collect();
    assert_eq!(temps.len(), 1);
    assert_eq!(temps[0].value, Value::Number(37.0));

    let devices = store.devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].last_seen, t(7));
}

/// Values with separators, NULLs, text and sub-second times come back exactly.
async fn round_trips(store: &Store) {
    let mut text = reading("bed-2", "note", 0, Value::Text("a\tb\nc\\d \"q\" é".into()));
    text.unit = None;
    let mut precise = reading("bed-2", "hr", 0, Value::Number(0.1 + 0.2));
    precise.time = t(0) + Duration::microseconds(123_456);
    precise.unit = Some("tab\there".into());
    let mut tiny = reading("bed-2", "x", 1, Value::Number(-1.5e-7));
    tiny.unit = None;
    store
        .insert_readings(&[text.clone(), precise.clone(), tiny.clone()], t(1))
        .await
        .unwrap();

    let rows = store.readings(&query("bed-2", None)).await.unwrap();
    for want in [&text, &precise, &tiny] {
        assert!(rows.contains(want), "{want:?} not in {rows:?}");
    }
}

/// Averages per minute and per hour, from whichever source the store has.
async fn buckets(store: &Store) {
    let rows: Vec<Reading> = (0..180)
        .map(|i| reading("bed-3", "hr", i * 20, Value::Number((i % 3) as f64)))
        .collect();
    store.insert_readings(&rows, t(0)).await.unwrap();

    // 1_700_000_000 is 20 s past a whole minute: minute buckets hold 2 or 3 readings.
    let minutes = store.readings(&query("bed-3", Some(60))).await.unwrap();
    assert_eq!(minutes.len(), 61, "{minutes:?}");
    let start = t(-20);
    let first = minutes.iter().find(|r| r.time == start).unwrap();
    assert_eq!(
        first.value,
        Value::Number(0.5),
        "readings 0 and 1 at :20 and :40"
    );

    let hours = store.readings(&query("bed-3", Some(3600))).await.unwrap();
    let total: usize = hours.len();
    assert!((1..=2).contains(&total), "{hours:?}");
    for h in &hours {
        assert_eq!(
            h.time.timestamp() % 3600,
            0,
            "hour buckets start on the hour"
        );
        assert_eq!(h.unit.as_deref(), Some("bpm"));
    }
}

#[tokio::test]
async fn sqlite_deduplicates() {
    let (store, path) = sqlite().await;
    deduplicates(&store).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn sqlite_round_trips() {
    let (store, path) = sqlite().await;
    round_trips(&store).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn sqlite_buckets_from_the_raw_table() {
    let (store, path) = sqlite().await;
    assert!(!store.uses_aggregates());
    buckets(&store).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn postgres_copy_deduplicates() {
    deduplicates(&postgres("copy_dedup").await).await;
}

#[tokio::test]
async fn postgres_unnest_deduplicates() {
    let store = postgres("unnest_dedup")
        .await
        .with_pg_write(PgWrite::Unnest);
    deduplicates(&store).await;
}

#[tokio::test]
async fn postgres_copy_round_trips() {
    round_trips(&postgres("copy_round").await).await;
}

#[tokio::test]
async fn postgres_unnest_round_trips() {
    let store = postgres("unnest_round")
        .await
        .with_pg_write(PgWrite::Unnest);
    round_trips(&store).await;
}

#[tokio::test]
async fn postgres_raw_copy_stores_every_row() {
    let store = postgres("raw_copy").await;
    let rows: Vec<Reading> = (0..500)
        .map(|i| reading("bed-4", "hr", i, Value::Number(i as f64)))
        .collect();
    assert_eq!(store.copy_readings_raw(&rows).await.unwrap(), 500);
    // Raw COPY does not deduplicate: the primary key refuses a second copy outright.
    assert!(store.copy_readings_raw(&rows[..1]).await.is_err());
    assert_eq!(
        store.readings(&query("bed-4", None)).await.unwrap().len(),
        500
    );
}

/// With TimescaleDB, history comes from the continuous aggregates; without it (as on this
/// machine's plain PostgreSQL) the same queries answer from the raw table.
#[tokio::test]
async fn postgres_history_with_or_without_timescaledb() {
    let store = postgres("history").await;
    let admin = std::env::var("TELEMON_TEST_DATABASE_URL").unwrap();
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let (available,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') \
         AND current_setting('shared_preload_libraries') LIKE '%timescaledb%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();

    if available {
        assert!(
            store.uses_aggregates(),
            "timescaledb loadable but no aggregates"
        );
    } else {
        eprintln!(
            "timescaledb is not available on this server: checking the plain PostgreSQL \
             path (history from the raw table, no hypertable, no aggregates)"
        );
        assert!(!store.uses_aggregates());
    }
    buckets(&store).await;
}
