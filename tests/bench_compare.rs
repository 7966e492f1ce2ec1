//! `telemon bench`: a short comparison of telemon with Mosquitto through the real binary,
//! and the clear failure of a run against a port where no broker listens.

mod common;

use std::process::Command;

use common::{TempDir, BIN};

fn last_json_line(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {text}"))
}

fn positive(summary: &serde_json::Value, path: &[&str]) -> f64 {
    let mut value = summary;
    for key in path {
        value = &value[*key];
    }
    let number = value.as_f64().unwrap_or(-1.0);
    assert!(number > 0.0, "{} is {value} in {summary}", path.join("."));
    number
}

#[test]
fn compare_prints_both_brokers_and_their_ratio_as_json() {
    assert!(
        std::path::Path::new("/usr/sbin/mosquitto").is_file(),
        "/usr/sbin/mosquitto is missing: run scripts/test.sh (it installs mosquitto)"
    );
    let dir = TempDir::new("bench-compare");
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["bench", "compare", "--duration", "1", "--rounds", "1"])
        .args(["--publishers", "2", "--rate", "500", "--json"])
        .output()
        .expect("running telemon bench compare");
    assert!(
        out.status.success(),
        "bench compare failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );

    let summary = last_json_line(&out.stdout);
    for broker in ["telemon", "mosquitto"] {
        let published = positive(&summary, &[broker, "published_per_s"]);
        assert!(
            published < 1_500.0,
            "2 x 500/s cannot give {published}/s: {summary}"
        );
        positive(&summary, &[broker, "delivered_per_s"]);
        positive(&summary, &[broker, "ack_latency", "p99_us"]);
        positive(&summary, &[broker, "delivery_latency", "p50_us"]);
        positive(&summary, &[broker, "delivery_latency", "p999_us"]);
    }
    positive(&summary, &["ratio", "throughput"]);
    positive(&summary, &["ratio", "p99"]);
    positive(&summary, &["generator", "sink_published_per_s"]);
    positive(&summary, &["generator", "headroom"]);
    assert_eq!(summary["qos"], 1);
    assert_eq!(summary["payload_bytes"], 100);
}

#[test]
fn a_port_without_a_broker_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("bench-refused");
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["bench", "--broker", &format!("127.0.0.1:{port}")])
        .args(["--security", "plain", "--duration", "1", "--json"])
        .output()
        .expect("running telemon bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a run without a broker succeeded");
    assert!(
        stderr.contains("cannot connect") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}
