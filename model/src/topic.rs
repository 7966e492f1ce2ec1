//! The topic scheme. Devices publish under `devices/{device_id}/...`; alert transitions are
//! published under `alerts/{subject}`.

/// Filter matching every native telemetry topic.
pub const TELEMETRY_FILTER: &str = "devices/+/telemetry";
/// Filter matching every SenML topic.
pub const SENML_FILTER: &str = "devices/+/senml";
/// Filter matching every device status (birth and will) topic.
pub const STATUS_FILTER: &str = "devices/+/status";
/// Filter matching every alert transition.
pub const ALERTS_FILTER: &str = "alerts/#";
/// Where the API asks the alerts service to acknowledge an alert
/// (JSON [`crate::alert::AckRequest`]).
/// Only in-process services may publish here: the device ACL gives devices no `telemon/` topic.
pub const ALERT_ACK_TOPIC: &str = "telemon/alerts/ack";

/// What a device topic carries, from its last level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceTopicKind {
    Telemetry,
    Senml,
    Status,
}

/// Splits `devices/{id}/{kind}` into the device id and kind, or `None` for any other topic.
pub fn parse_device_topic(topic: &str) -> Option<(&str, DeviceTopicKind)> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, kind) = rest.split_once('/')?;
    let kind = match kind {
        "telemetry" => DeviceTopicKind::Telemetry,
        "senml" => DeviceTopicKind::Senml,
        "status" => DeviceTopicKind::Status,
        _ => return None,
    };
    (!device.is_empty()).then_some((device, kind))
}

pub fn telemetry_topic(device: &str) -> String {
    format!("devices/{device}/telemetry")
}

pub fn status_topic(device: &str) -> String {
    format!("devices/{device}/status")
}

pub fn alert_topic(subject: &str) -> String {
    format!("alerts/{subject}")
}

/// MQTT topic filter matching (`+` one level, `#` the rest), as a broker applies it.
/// Topics starting with `$` are not matched by a filter starting with a wildcard (MQTT 4.7.2).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_topics() {
        assert_eq!(
            parse_device_topic("devices/bed-7/telemetry"),
            Some(("bed-7", DeviceTopicKind::Telemetry))
        );
        assert_eq!(parse_device_topic("devices//telemetry"), None);
        assert_eq!(parse_device_topic("devices/a/b/telemetry"), None);
        assert_eq!(parse_device_topic("zigbee2mqtt/x"), None);
    }

    #[test]
    fn matches_filters_like_a_broker() {
        assert!(filter_matches("devices/+/telemetry", "devices/a/telemetry"));
        assert!(!filter_matches(
            "devices/+/telemetry",
            "devices/a/b/telemetry"
        ));
        assert!(filter_matches("devices/a/#", "devices/a"));
        assert!(filter_matches("devices/a/#", "devices/a/x/y"));
        assert!(!filter_matches("devices/a/#", "devices/ab/x"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("a/+", "a/"));
        assert!(!filter_matches("a", "a/b"));
    }
}
