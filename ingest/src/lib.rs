//! The ingest service: turns MQTT messages into readings and stores them.
//!
//! - [`decode`] reads one message (native topics, SenML, configured mappings for Zigbee2MQTT,
//!   Tasmota, Shelly, ESPHome, Home Assistant, ThingsBoard) into readings and rejections.
//! - [`validate`] owns what a reading must satisfy and the reasons a message or a field is
//!   refused.

pub mod decode;
pub mod service;
pub mod spool;
pub mod validate;
