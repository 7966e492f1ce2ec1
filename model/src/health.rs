//! The health of each part of a running process, as `/healthz` and `/readyz` report it.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Starting up: not ready yet.
    Starting,
    Ok,
    /// Working, with a fallback in use (for example readings spooling to disk while the
    /// database is down): nothing is lost, but an operator should look.
    Degraded,
    Down,
}

#[derive(Clone, Debug, Serialize)]
pub struct Component {
    pub status: Status,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Shared by every service of a process; each one reports under its own name.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<&'static str, Component>>>);

impl Health {
    pub fn set(&self, part: &'static str, status: Status, detail: impl Into<String>) {
        let detail = detail.into();
        self.0.lock().insert(part, Component { status, detail });
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, Component> {
        self.0.lock().clone()
    }

    /// Every part is running (possibly degraded).
    pub fn live(&self) -> bool {
        self.0
            .lock()
            .values()
            .all(|c| matches!(c.status, Status::Ok | Status::Degraded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_only_when_every_part_runs() {
        let health = Health::default();
        health.set("ingest", Status::Ok, "");
        health.set("broker", Status::Starting, "");
        assert!(!health.live());
        health.set("broker", Status::Degraded, "spooling");
        assert!(health.live());
        health.set("alerts", Status::Down, "stopped");
        assert!(!health.live());
    }
}
