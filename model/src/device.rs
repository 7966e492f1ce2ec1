//! Device identity: the name a device is known by everywhere, taken from its certificate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest identity accepted. Long enough for URNs and EUI-64 based names, short enough to
/// keep topics and index keys small.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// A validated device identity.
///
/// Identities become topic levels and primary-key parts, so they may not contain MQTT
/// wildcards, the level separator or control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid device id {0:?}: use 1-128 characters of A-Z a-z 0-9 . _ : -")]
pub struct InvalidDeviceId(pub String);

impl DeviceId {
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidDeviceId> {
        let id = id.into();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN || !id.chars().all(valid_char) {
            return Err(InvalidDeviceId(id));
        }
        Ok(DeviceId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        DeviceId::new(value)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_names() {
        for id in [
            "bed-7",
            "urn:dev:ow:10e2073a01080063",
            "0x00158d0000000001",
            "a.b_c",
        ] {
            assert_eq!(DeviceId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_topic_syntax_and_control_characters() {
        for id in ["", "a/b", "+", "#", "bed 7", "bed\0", "é", &"x".repeat(129)] {
            assert!(DeviceId::new(id).is_err(), "{id:?} accepted");
        }
    }
}
