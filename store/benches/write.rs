//! Batched writes on PostgreSQL, on the same server in the same run: binary COPY straight into
//! `readings` (the default, deduplicating inside each batch), COPY through a staging table and
//! one UNNEST insert (both `ON CONFLICT DO NOTHING`), and raw binary COPY without any
//! deduplication as the yardstick. Prints rows per second for each and their ratio to raw.
//!
//!     TELEMON_TEST_DATABASE_URL=postgres://... cargo bench -p telemon-store --bench write

use std::time::Instant;

use chrono::{TimeZone, Utc};
use sqlx::Connection;
use telemon_model::{DeviceId, Reading, Value};
use telemon_store::{PgWrite, Store};

const BATCH: usize = 2_000;
const BATCHES: usize = 100;

fn batches() -> Vec<Vec<Reading>> {
    let start = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let devices: Vec<DeviceId> = (0..100)
        .map(|i| DeviceId::new(format!("bed-{i}")).unwrap())
        .collect();
    (0..BATCHES)
        .map(|b| {
            (0..BATCH)
                .map(|i| {
                    let n = b * BATCH + i;
                    Reading {
                        device_id: devices[n % devices.len()].clone(),
                        metric: "heart_rate".into(),
                        time: start + chrono::Duration::milliseconds(n as i64),
                        value: Value::Number(60.0 + (n % 40) as f64),
                        unit: Some("bpm".into()),
                    }
                })
                .collect()
        })
        .collect()
}

async fn fresh(admin: &str, name: &str) -> Store {
    let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
    let db = format!("bench_write_{name}_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!("CREATE DATABASE {db}"),
    ] {
        sqlx::query(&sql).execute(&mut conn).await.unwrap();
    }
    let base = admin.rsplit_once('/').unwrap().0;
    let store = Store::connect(&format!("{base}/{db}")).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn measure(store: &Store, batches: &[Vec<Reading>]) -> f64 {
    let started = Instant::now();
    let mut rows = 0;
    for batch in batches {
        rows += store.insert_readings(batch, Utc::now()).await.unwrap();
    }
    assert_eq!(rows as usize, BATCH * BATCHES);
    rows as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let Ok(admin) = std::env::var("TELEMON_TEST_DATABASE_URL") else {
        eprintln!("set TELEMON_TEST_DATABASE_URL to a PostgreSQL server to run this benchmark");
        std::process::exit(2);
    };
    let data = batches();

    // Alternate the paths twice, each on a fresh database, so that none profits from a
    // warmer server; the best of the two rounds counts.
    let paths = [
        ("binary COPY into readings (default)", Some(PgWrite::Direct)),
        ("COPY + INSERT ... SELECT ON CONFLICT", Some(PgWrite::Copy)),
        ("INSERT ... UNNEST ON CONFLICT", Some(PgWrite::Unnest)),
        ("raw binary COPY, no deduplication", None),
    ];
    let mut best = [0.0f64; 4];
    for round in 0..2 {
        for (i, (_, write)) in paths.iter().enumerate() {
            let store = fresh(&admin, &format!("p{i}r{round}")).await;
            let rate = match write {
                Some(write) => measure(&store.with_pg_write(*write), &data).await,
                None => measure_raw(&store, &data).await,
            };
            best[i] = best[i].max(rate);
        }
    }
    println!("rows: {} in batches of {BATCH}", BATCH * BATCHES);
    for ((name, _), rate) in paths.iter().zip(best) {
        println!(
            "{name:<38} {rate:>10.0} rows/s  {:>5.1}% of raw",
            100.0 * rate / best[3]
        );
    }
}

async fn measure_raw(store: &Store, batches: &[Vec<Reading>]) -> f64 {
    let started = Instant::now();
    let mut rows = 0;
    for batch in batches {
        rows += store.copy_readings_raw(batch).await.unwrap();
    }
    assert_eq!(rows as usize, BATCH * BATCHES);
    rows as f64 / started.elapsed().as_secs_f64()
}
