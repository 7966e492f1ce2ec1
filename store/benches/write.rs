//! Batched writes on PostgreSQL: COPY through a staging table against one UNNEST insert, both
//! deduplicating, on the same server in the same run. Prints rows per second for each and
//! their ratio.
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

    // Alternate the two twice, each on a fresh database, so that neither profits from a
    // warmer server.
    let mut copy = Vec::new();
    let mut unnest = Vec::new();
    for round in 0..2 {
        let store = fresh(&admin, &format!("copy{round}"))
            .await
            .with_pg_write(PgWrite::Copy);
        copy.push(measure(&store, &data).await);
        let store = fresh(&admin, &format!("unnest{round}"))
            .await
            .with_pg_write(PgWrite::Unnest);
        unnest.push(measure(&store, &data).await);
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (copy, unnest) = (best(&copy), best(&unnest));
    println!("rows: {} in batches of {BATCH}", BATCH * BATCHES);
    println!("COPY + INSERT ... SELECT ON CONFLICT: {copy:>10.0} rows/s");
    println!("INSERT ... UNNEST ON CONFLICT:        {unnest:>10.0} rows/s");
    println!(
        "COPY / UNNEST:                        {:>10.2}",
        copy / unnest
    );
}
