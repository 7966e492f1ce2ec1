//! Readings on both backends: deduplication on (device, metric, time) for redeliveries and
//! for the same reading sent as an integer and as a float, round trips of every column, and
//! bucketed history from the raw table or, with TimescaleDB, from its aggregates, compared
//! with what the raw readings define.
//!
//! PostgreSQL tests use the server in TELEMON_TEST_DATABASE_URL (scripts/test.sh starts one)
//! with a fresh database each, and fail loudly when it is not set. When that server preloads
//! TimescaleDB, the same tests run on the hypertable and its aggregates, and the
//! TimescaleDB-only checks run too; without it they say so in the test output.

use std::io::Write as _;
use std::sync::OnceLock;

use chrono::{DateTime, Duration, TimeZone, Utc};
use sqlx::Connection;
use telemon_model::{DeviceId, Reading, Value};
use telemon_store::{DeadLetter, PgWrite, ReadingQuery, Store};

fn reading(device: &str, metric: &str, secs: i64, value: Value) -> Reading {
    Reading {
        device_id: DeviceId::new(device).unwrap(),
        metric: metric.into(),
        time: t(secs),
        value,
        unit: Some("bpm".into()),
    }
}

/// Test readings are from about a day ago: young enough that TimescaleDB's retention and
/// compression policies, which run on their own schedule, leave them alone, and 13 min 20 s
/// past an hour, so that minute and hour buckets split them at known places.
fn t(secs: i64) -> DateTime<Utc> {
    static BASE: OnceLock<i64> = OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let day_ago = Utc::now().timestamp() - 86_400;
        day_ago - day_ago.rem_euclid(3600) + 13 * 60 + 20
    });
    Utc.timestamp_opt(base + secs, 0).unwrap()
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

/// Removes a test database with the write-ahead log files SQLite keeps beside it.
fn remove_sqlite(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
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

    // t(0) is 20 s past a whole minute: minute buckets hold 2 or 3 readings.
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
    remove_sqlite(&path);
}

#[tokio::test]
async fn sqlite_round_trips() {
    let (store, path) = sqlite().await;
    round_trips(&store).await;
    remove_sqlite(&path);
}

#[tokio::test]
async fn sqlite_buckets_from_the_raw_table() {
    let (store, path) = sqlite().await;
    assert!(!store.uses_aggregates());
    buckets(&store).await;
    remove_sqlite(&path);
}

/// The dead-letter table keeps the newest letters only, on both backends.
async fn prunes_dead_letters(store: &Store) {
    let letters: Vec<DeadLetter> = (0..30)
        .map(|n| DeadLetter {
            received_at: t(n),
            topic: format!("devices/bed-{n}/telemetry"),
            identity: None,
            reason: "invalid_json".into(),
            detail: String::new(),
            payload: vec![b'x'; 10],
        })
        .collect();
    store.insert_dead_letters(&letters).await.unwrap();
    assert_eq!(store.prune_dead_letters(10).await.unwrap(), 20);
    let kept = store.dead_letters(100).await.unwrap();
    let topics: Vec<&str> = kept.iter().map(|d| d.topic.as_str()).collect();
    let newest: Vec<String> = (20..30)
        .rev()
        .map(|n| format!("devices/bed-{n}/telemetry"))
        .collect();
    assert_eq!(topics, newest);
    assert_eq!(store.prune_dead_letters(10).await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_prunes_dead_letters() {
    let (store, path) = sqlite().await;
    prunes_dead_letters(&store).await;
    remove_sqlite(&path);
}

#[tokio::test]
async fn postgres_prunes_dead_letters() {
    prunes_dead_letters(&postgres("prune_dead").await).await;
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

/// Whether the test server preloads TimescaleDB, so that `migrate` must have built the
/// hypertable and its aggregates. Says so in the test output when it does not.
async fn timescaledb_expected(test: &str) -> bool {
    let admin = std::env::var("TELEMON_TEST_DATABASE_URL").unwrap();
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let (available,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') \
         AND current_setting('shared_preload_libraries') LIKE '%timescaledb%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    if !available {
        // Straight to stderr: the test harness swallows eprintln! of a passing test, and this
        // must show in every run.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** {test}: TimescaleDB is NOT available on the test server (not installed or \
             not in shared_preload_libraries): checking the plain PostgreSQL path only; the \
             hypertable, policies and continuous aggregates are NOT tested ***\n"
        );
    }
    available
}

/// Bucketed history as the raw readings define it: numeric readings averaged per bucket
/// aligned to the epoch, within `[from, to)`, newest bucket first, then by metric.
fn expected_history(rows: &[Reading], q: &ReadingQuery) -> Vec<Reading> {
    use std::collections::BTreeMap;

    let width = q.bucket_secs.unwrap();
    let mut buckets: BTreeMap<(i64, String), (f64, u32, Option<String>)> = BTreeMap::new();
    for r in rows {
        let Value::Number(v) = r.value else { continue };
        let in_range = r.device_id.as_str() == q.device
            && q.metric.as_ref().is_none_or(|m| *m == r.metric)
            && q.from.is_none_or(|from| r.time >= from)
            && q.to.is_none_or(|to| r.time < to);
        if !in_range {
            continue;
        }
        let start = r.time.timestamp().div_euclid(width) * width;
        let entry = buckets.entry((start, r.metric.clone())).or_default();
        entry.0 += v;
        entry.1 += 1;
        entry.2 = entry.2.clone().max(r.unit.clone());
    }

    let mut out: Vec<Reading> = buckets
        .into_iter()
        .map(|((start, metric), (sum, n, unit))| Reading {
            device_id: DeviceId::new(q.device.clone()).unwrap(),
            metric,
            time: Utc.timestamp_opt(start, 0).unwrap(),
            value: Value::Number(sum / f64::from(n)),
            unit,
        })
        .collect();
    out.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.metric.cmp(&b.metric)));
    out.truncate(q.limit as usize);
    out
}

/// Where `history_rows` starts: 13 s past the first hour after the readings of `buckets`
/// (see `postgres_history_with_or_without_timescaledb` for why a whole hour after).
const HISTORY_START: i64 = 6_400 + 13;

/// Two vital signs every 7 s, from `from_secs`, with integer values so
/// that every average is exact whatever order rows are summed in, plus text readings that
/// history must leave out.
fn history_rows(device: &str, from_secs: i64, count: i64) -> Vec<Reading> {
    let mut rows = Vec::new();
    for i in 0..count {
        let secs = from_secs + i * 7;
        rows.push(reading(
            device,
            "hr",
            secs,
            Value::Number((60 + i % 11) as f64),
        ));
        let mut spo2 = reading(device, "spo2", secs, Value::Number((90 + i % 7) as f64));
        spo2.unit = Some("%".into());
        rows.push(spo2);
        if i % 50 == 0 {
            let mut note = reading(device, "note", secs, Value::Text("moved".into()));
            note.unit = Some("zz".into());
            rows.push(note);
        }
    }
    rows
}

/// Every history query shape the API sends (whole range, `from`/`to` on and off bucket
/// boundaries, both inside one bucket, one metric, a small limit) answers what the raw
/// readings define.
async fn history_matches_raw(store: &Store, stored: &[Reading], device: &str) {
    // t(0) is 13 min 20 s past an hour, so t(6_400), t(10_000) and t(13_600) start hours.
    let ranges = [
        (None, None),
        (
            Some(t(7_400) + Duration::seconds(37)),
            Some(t(11_600) + Duration::seconds(11)),
        ),
        (Some(t(9_160)), None),
        (None, Some(t(10_600) + Duration::milliseconds(1_500))),
        (Some(t(10_000)), Some(t(13_599))),
        (Some(t(7_700)), Some(t(7_715))),
        (Some(t(9_000)), Some(t(9_000))),
    ];
    for bucket in [60, 3_600] {
        for (from, to) in ranges {
            for metric in [None, Some("hr")] {
                for limit in [10_000, 7] {
                    let q = ReadingQuery {
                        device: device.into(),
                        metric: metric.map(str::to_string),
                        from,
                        to,
                        bucket_secs: Some(bucket),
                        limit,
                    };
                    let got = store.readings(&q).await.unwrap();
                    let want = expected_history(stored, &q);
                    assert_eq!(got, want, "history for {q:?}");
                }
            }
        }
    }
}

#[tokio::test]
async fn sqlite_history_matches_raw_readings() {
    let (store, path) = sqlite().await;
    let rows = history_rows("bed-5", HISTORY_START, 1_500);
    store.insert_readings(&rows, t(0)).await.unwrap();
    history_matches_raw(&store, &rows, "bed-5").await;
    remove_sqlite(&path);
}

/// With TimescaleDB, 1-minute and 1-hour history comes from the continuous aggregates and
/// must answer as the raw table does: whether or not a refresh policy has run yet, after a
/// refresh has materialized the buckets, for readings newer than the refreshed buckets, and
/// for a late reading once a refresh has covered it. Without TimescaleDB the same queries
/// answer from the raw table.
///
/// The refresh policies may run at any moment, and a reading in or before the newest
/// materialized bucket stays out of the views until the next refresh; so every batch here,
/// until the late one, starts in a later hour than all before it.
#[tokio::test]
async fn postgres_history_with_or_without_timescaledb() {
    let timescaledb = timescaledb_expected("postgres_history_with_or_without_timescaledb").await;
    let store = postgres("history").await;
    assert_eq!(store.uses_aggregates(), timescaledb);
    buckets(&store).await;

    let mut stored = history_rows("bed-5", HISTORY_START, 1_000);
    store.insert_readings(&stored, t(0)).await.unwrap();
    history_matches_raw(&store, &stored, "bed-5").await;
    if !timescaledb {
        return;
    }

    let admin = std::env::var("TELEMON_TEST_DATABASE_URL").unwrap();
    let url = format!(
        "{}/store_history_{}",
        admin.rsplit_once('/').unwrap().0,
        std::process::id()
    );
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let refresh =
        |view: &'static str| format!("CALL refresh_continuous_aggregate('{view}', NULL, NULL)");
    for view in ["readings_1m", "readings_1h"] {
        sqlx::query(&refresh(view))
            .execute(&mut conn)
            .await
            .unwrap();
        let (materialized,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM {view} WHERE device_id = 'bed-5'"
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(materialized > 0, "{view} is empty after a refresh");
    }
    history_matches_raw(&store, &stored, "bed-5").await;

    // Newer readings than the refreshed buckets: the real-time part of the views answers.
    let newer = history_rows("bed-5", 13_600 + 13, 400);
    store.insert_readings(&newer, t(0)).await.unwrap();
    stored.extend(newer);
    history_matches_raw(&store, &stored, "bed-5").await;

    // A late reading inside refreshed buckets shows once a refresh covers it, as the
    // policies do on their schedule.
    let late = vec![reading(
        "bed-5",
        "hr",
        HISTORY_START + 2_003,
        Value::Number(500.0),
    )];
    store.insert_readings(&late, t(0)).await.unwrap();
    stored.extend(late);
    for view in ["readings_1m", "readings_1h"] {
        sqlx::query(&refresh(view))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    history_matches_raw(&store, &stored, "bed-5").await;
}

/// With TimescaleDB: `readings` is a hypertable with compression, retention and refresh
/// policies, migrating twice changes nothing, and a redelivery into a compressed chunk is
/// still one row on both write paths. Without it: the plain table with its BRIN index and no
/// aggregates.
#[tokio::test]
async fn postgres_timescaledb_storage_or_plain_table() {
    let timescaledb = timescaledb_expected("postgres_timescaledb_storage_or_plain_table").await;
    let store = postgres("storage").await;
    store.migrate().await.unwrap();
    let admin = std::env::var("TELEMON_TEST_DATABASE_URL").unwrap();
    let url = format!(
        "{}/store_storage_{}",
        admin.rsplit_once('/').unwrap().0,
        std::process::id()
    );
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();

    if !timescaledb {
        let (brin, views): (bool, bool) = sqlx::query_as(
            "SELECT to_regclass('readings_time_brin') IS NOT NULL, \
             to_regclass('readings_1m') IS NOT NULL OR to_regclass('readings_1h') IS NOT NULL",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(
            brin && !views,
            "plain PostgreSQL: brin index {brin}, aggregates {views}"
        );
        assert!(!store.uses_aggregates());
        return;
    }

    let (hypertables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM timescaledb_information.hypertables \
         WHERE hypertable_name = 'readings'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(hypertables, 1, "readings is not a hypertable");

    let mut jobs: Vec<(String, String)> = sqlx::query_as(
        "SELECT proc_name::text, hypertable_name::text FROM timescaledb_information.jobs \
         WHERE hypertable_name IS NOT NULL",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    jobs.sort();
    let jobs: Vec<(&str, &str)> = jobs.iter().map(|(p, h)| (p.as_str(), h.as_str())).collect();
    assert_eq!(
        jobs,
        [
            ("policy_compression", "readings"),
            ("policy_refresh_continuous_aggregate", "readings_1h"),
            ("policy_refresh_continuous_aggregate", "readings_1m"),
            ("policy_retention", "readings"),
        ]
    );

    // A month-old batch, its chunk compressed, then the same batch redelivered through
    // both write paths, and one new reading into the compressed chunk.
    let month_ago = -30 * 86_400;
    let batch: Vec<Reading> = (0..100)
        .map(|i| reading("bed-6", "hr", month_ago + i, Value::Number(i as f64)))
        .collect();
    assert_eq!(store.insert_readings(&batch, t(0)).await.unwrap(), 100);
    let (compressed,): (i64,) = sqlx::query_as(
        "SELECT count(compress_chunk(c, if_not_compressed => true)) \
         FROM show_chunks('readings', older_than => INTERVAL '7 days') c",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(compressed, 1, "one month-old chunk");
    let (is_compressed,): (bool,) = sqlx::query_as(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'readings' AND range_end < now() - INTERVAL '7 days'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(is_compressed);

    for write in [PgWrite::Direct, PgWrite::Unnest, PgWrite::Copy] {
        let store = store.clone().with_pg_write(write);
        assert_eq!(
            store.insert_readings(&batch, t(0)).await.unwrap(),
            0,
            "{write:?} redelivery into a compressed chunk"
        );
    }
    let one_more = [reading("bed-6", "hr", month_ago + 100, Value::Number(7.0))];
    assert_eq!(store.insert_readings(&one_more, t(0)).await.unwrap(), 1);
    let rows = store.readings(&query("bed-6", None)).await.unwrap();
    assert_eq!(rows.len(), 101);
}
