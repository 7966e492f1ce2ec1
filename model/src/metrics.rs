//! Process-wide counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Handles are cheap to clone and to bump; look one up once (at start-up or per connection)
//! and keep it, since the lookup takes a lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

struct Family {
    help: &'static str,
    kind: Kind,
    series: BTreeMap<String, Arc<AtomicI64>>,
}

fn registry() -> &'static Mutex<BTreeMap<&'static str, Family>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<&'static str, Family>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// A monotonically increasing count.
#[derive(Clone)]
pub struct Counter(Arc<AtomicI64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n as i64, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed) as u64
    }
}

/// A value that goes up and down (connections open, spool size).
#[derive(Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Decrements its gauge when dropped: for counts of things alive (connections, clients).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: Gauge) -> Self {
        gauge.add(1);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

fn series(
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &[(&str, &str)],
) -> Arc<AtomicI64> {
    let key = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",");
    let mut registry = registry().lock();
    let family = registry.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
    family.series.entry(key).or_default().clone()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn counter(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Counter {
    Counter(series(name, help, Kind::Counter, labels))
}

pub fn gauge(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
    Gauge(series(name, help, Kind::Gauge, labels))
}

/// Every registered series in the Prometheus text exposition format.
pub fn render() -> String {
    let registry = registry().lock();
    let mut out = String::new();
    for (name, family) in registry.iter() {
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", family.help);
        for (labels, value) in &family.series {
            let value = value.load(Ordering::Relaxed);
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series_once_per_family() {
        let a = counter("test_things_total", "Things seen.", &[("reason", "json")]);
        let b = counter("test_things_total", "Things seen.", &[("reason", "utf\"8")]);
        a.add(2);
        b.inc();
        let text = render();
        assert_eq!(text.matches("# TYPE test_things_total counter").count(), 1);
        assert!(
            text.contains("test_things_total{reason=\"json\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("test_things_total{reason=\"utf\\\"8\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn gauge_guard_counts_live_things() {
        let g = gauge("test_live", "Live things.", &[]);
        {
            let _one = GaugeGuard::new(g.clone());
            assert_eq!(g.get(), 1);
        }
        assert_eq!(g.get(), 0);
    }
}
