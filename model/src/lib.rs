//! The data model every telemon service shares: device identity, readings, the topic scheme,
//! alert events, metrics and the settings for reaching an MQTT broker.
//!
//! Services talk to each other only through MQTT topics and the database, so the shapes here
//! are the contract between them. Keep this crate small: behaviour belongs to the services.

pub mod alert;
pub mod bus;
pub mod device;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod reading;
pub mod topic;

pub use alert::{AlertEvent, AlertState, Priority};
pub use device::{DeviceId, InvalidDeviceId};
pub use reading::{Reading, Value};
