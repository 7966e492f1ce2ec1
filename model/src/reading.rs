//! A reading: one value of one metric from one device at one time.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::DeviceId;

/// The value of a reading. Numbers are what alerts and charts use; booleans and text exist
/// because SenML and home-automation devices send them (contact open, relay on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl Value {
    /// The numeric view used by thresholds and charts: booleans are 0 or 1, text has none.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Text(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub device_id: DeviceId,
    pub metric: String,
    pub time: DateTime<Utc>,
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}
