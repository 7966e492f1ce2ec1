//! Decodes every real message in `tests/samples/` (device ecosystems' own messages, kept
//! byte for byte as captured; `SOURCES.md` says where each comes from), on the topic
//! `MESSAGES.tsv` gives it, with the reference `mappings.toml`, and checks each reading a
//! person would expect from it.

use std::collections::HashMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use telemon_ingest::decode::{DecodeConfig, Decoded, Decoder, Message, RejectReason};
use telemon_model::Value;

fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/samples")
}

fn decoder() -> Decoder {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mappings.toml");
    let text = std::fs::read_to_string(&path).expect("reading mappings.toml");
    Decoder::from_config(DecodeConfig::from_toml(&text).expect("parsing mappings.toml"))
        .expect("building a decoder from mappings.toml")
}

/// File name to topic, from MESSAGES.tsv.
fn topics() -> HashMap<String, String> {
    let text = std::fs::read_to_string(samples_dir().join("MESSAGES.tsv")).expect("MESSAGES.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut cols = l.split('\t');
            let file = cols.next().unwrap_or_default().to_string();
            (file, cols.next().unwrap_or_default().to_string())
        })
        .collect()
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("test time").to_utc()
}

/// A time near none of the samples' own: for samples that carry no time.
const NOW: &str = "2024-06-01T12:00:00Z";

fn decode(file: &str, identity: Option<&str>, received_at: &str) -> Result<Decoded, RejectReason> {
    let topic = topics()
        .remove(file)
        .unwrap_or_else(|| panic!("{file} not in MESSAGES.tsv"));
    let payload = std::fs::read(samples_dir().join(file)).expect("reading the sample");
    let msg = Message {
        topic: &topic,
        payload: &payload,
        identity,
        received_at: at(received_at),
    };
    decoder().decode(&msg).map_err(|r| r.reason)
}

fn num(n: f64) -> Value {
    Value::Number(n)
}

/// Asserts exactly these readings (in any order), all of `device` at `time`, and no
/// rejection.
fn assert_readings(
    decoded: Result<Decoded, RejectReason>,
    device: &str,
    time: &str,
    expected: &[(&str, Value, Option<&str>)],
) {
    let decoded = decoded.expect("sample decodes");
    assert_eq!(decoded.rejected, vec![], "no field rejected");

    let mut got: Vec<_> = decoded
        .readings
        .iter()
        .map(|r| {
            assert_eq!(r.device_id.as_str(), device, "{}", r.metric);
            assert_eq!(r.time, at(time), "{}", r.metric);
            (r.metric.clone(), r.value.clone(), r.unit.clone())
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<_> = expected
        .iter()
        .map(|(m, v, u)| (m.to_string(), v.clone(), u.map(str::to_string)))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want);
}

fn assert_ignored(decoded: Result<Decoded, RejectReason>) {
    assert_eq!(decoded, Ok(Decoded::default()));
}

#[test]
fn every_sample_has_a_test_here() {
    let covered = [
        "esphome-sensor-state.txt",
        "esphome-status-birth.txt",
        "fhir-r4-observation-satO2.json",
        "homeassistant-discovery-sensor.json",
        "homeassistant-state-sensorBedroom.json",
        "owntracks-location.json",
        "rpm-pulseox-esp32-health.json",
        "rpm-pulseox-healthcare-monitoring.json",
        "senml-rfc8428-multiple-datapoints.json",
        "senml-rfc8428-single.json",
        "shelly-gen1-ht-temperature.txt",
        "shelly-gen1-relay.txt",
        "tasmota-lwt.txt",
        "tasmota-sensor-am2301.json",
        "thingsboard-telemetry-batch.json",
        "zigbee2mqtt-bridge-state.txt",
        "zigbee2mqtt-contact.json",
        "zigbee2mqtt-temp-humidity.json",
    ];
    let mut listed: Vec<String> = topics().into_keys().collect();
    listed.sort();
    assert_eq!(
        listed,
        covered.map(String::from).to_vec(),
        "a new sample needs a test"
    );
}

#[test]
fn esphome_sensor_state() {
    let decoded = decode("esphome-sensor-state.txt", None, NOW);
    assert_readings(
        decoded,
        "livingroom",
        NOW,
        &[("living_room_temperature", num(23.4), None)],
    );
}

#[test]
fn esphome_birth_message() {
    let decoded = decode("esphome-status-birth.txt", None, NOW);
    assert_readings(
        decoded,
        "livingroom",
        NOW,
        &[("online", Value::Bool(true), None)],
    );
}

#[test]
fn fhir_observation_is_not_device_telemetry() {
    let decoded = decode("fhir-r4-observation-satO2.json", None, NOW);
    assert_eq!(decoded, Err(RejectReason::UnknownTopic));
}

#[test]
fn owntracks_location_is_not_device_telemetry() {
    assert_eq!(
        decode("owntracks-location.json", None, NOW),
        Err(RejectReason::UnknownTopic)
    );
}

#[test]
fn homeassistant_discovery_config_is_ignored() {
    assert_ignored(decode("homeassistant-discovery-sensor.json", None, NOW));
}

#[test]
fn homeassistant_state_object() {
    let decoded = decode("homeassistant-state-sensorBedroom.json", None, NOW);
    let expected = [
        ("temperature", num(23.2), None),
        ("humidity", num(43.7), None),
    ];
    assert_readings(decoded, "sensorBedroom", NOW, &expected);
}

#[test]
fn pulse_oximeter_without_device_id_uses_the_mapped_device() {
    let decoded = decode("rpm-pulseox-esp32-health.json", None, NOW);
    let expected = [
        ("heart_rate", num(82.0), None),
        ("spo2", num(98.0), None),
        ("body_temperature", num(36.5), None),
    ];
    assert_readings(decoded, "pulseox-esp32", NOW, &expected);
}

#[test]
fn monitoring_gateway_names_the_device_in_the_payload() {
    let decoded = decode("rpm-pulseox-healthcare-monitoring.json", None, NOW);
    let expected = [
        ("heart_rate", num(75.0), None),
        ("spo2", num(98.0), None),
        ("body_temperature", num(30.25), None),
    ];
    assert_readings(decoded, "DEVICE_001", NOW, &expected);
}

#[test]
fn senml_base_name_is_the_device() {
    let decoded = decode("senml-rfc8428-multiple-datapoints.json", None, NOW);
    let expected = [
        ("voltage", num(120.1), Some("V")),
        ("current", num(1.2), Some("A")),
    ];
    assert_readings(decoded, "urn:dev:ow:10e2073a01080063", NOW, &expected);
}

#[test]
fn senml_single_datapoint_named_by_its_device() {
    let decoded = decode("senml-rfc8428-single.json", None, NOW);
    let expected = [("temperature", num(23.1), Some("Cel"))];
    assert_readings(decoded, "urn:dev:ow:10e2073a01080063", NOW, &expected);
}

#[test]
fn shelly_gen1_bare_temperature() {
    let decoded = decode("shelly-gen1-ht-temperature.txt", None, NOW);
    assert_readings(
        decoded,
        "shellyht-000000",
        NOW,
        &[("temperature", num(22.5), None)],
    );
}

#[test]
fn shelly_gen1_relay_off() {
    let decoded = decode("shelly-gen1-relay.txt", None, NOW);
    assert_readings(
        decoded,
        "shelly1-000000",
        NOW,
        &[("relay_0", Value::Bool(false), None)],
    );
}

#[test]
fn tasmota_will_message() {
    let decoded = decode("tasmota-lwt.txt", None, NOW);
    assert_readings(
        decoded,
        "tasmota_000000",
        NOW,
        &[("online", Value::Bool(false), None)],
    );
}

#[test]
fn tasmota_sensor_local_time_and_units() {
    let received = "2019-01-01T00:00:07Z";
    let decoded = decode("tasmota-sensor-am2301.json", None, received);
    let expected = [
        ("AM2301_Temperature", num(24.6), Some("Cel")),
        ("AM2301_Humidity", num(58.2), None),
    ];
    assert_readings(decoded, "tasmota_000000", "2019-01-01T00:00:00Z", &expected);
}

#[test]
fn tasmota_sensor_from_a_year_before_receipt_is_out_of_range() {
    let decoded = decode("tasmota-sensor-am2301.json", None, "2020-06-01T00:00:00Z");
    assert_eq!(decoded, Err(RejectReason::TimestampOutOfRange));
}

#[test]
fn thingsboard_batch_with_client_timestamps() {
    let decoded = decode(
        "thingsboard-telemetry-batch.json",
        Some("tb-1"),
        "2016-01-01T12:00:05Z",
    )
    .expect("decodes");
    assert_eq!(decoded.rejected, vec![]);

    let mut got: Vec<_> = decoded
        .readings
        .iter()
        .map(|r| {
            (
                r.device_id.as_str().to_string(),
                r.time,
                r.metric.clone(),
                r.value.clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));
    let first = at("2016-01-01T12:00:00Z");
    let second = at("2016-01-01T12:00:01Z");
    let want = vec![
        ("tb-1".to_string(), first, "humidity".to_string(), num(61.0)),
        (
            "tb-1".to_string(),
            first,
            "temperature".to_string(),
            num(22.5),
        ),
        (
            "tb-1".to_string(),
            second,
            "humidity".to_string(),
            num(60.0),
        ),
        (
            "tb-1".to_string(),
            second,
            "temperature".to_string(),
            num(22.7),
        ),
    ];
    assert_eq!(got, want);
}

#[test]
fn thingsboard_needs_the_publisher_identity() {
    let decoded = decode(
        "thingsboard-telemetry-batch.json",
        None,
        "2016-01-01T12:00:05Z",
    );
    assert_eq!(decoded, Err(RejectReason::InvalidDeviceId));
}

#[test]
fn zigbee2mqtt_bridge_state_is_ignored() {
    assert_ignored(decode("zigbee2mqtt-bridge-state.txt", None, NOW));
}

#[test]
fn zigbee2mqtt_contact_sensor() {
    let decoded = decode("zigbee2mqtt-contact.json", None, NOW);
    let expected = [
        ("battery", num(100.0), None),
        ("contact", Value::Bool(false), None),
        ("device_temperature", num(25.0), None),
        ("linkquality", num(87.0), None),
        ("power_outage_count", num(5.0), None),
        ("voltage", num(3085.0), None),
    ];
    assert_readings(decoded, "front_door", NOW, &expected);
}

#[test]
fn zigbee2mqtt_temperature_and_humidity() {
    let decoded = decode("zigbee2mqtt-temp-humidity.json", None, NOW);
    let expected = [
        ("temperature", num(27.34), None),
        ("humidity", num(44.72), None),
    ];
    assert_readings(decoded, "0x00158d0000000001", NOW, &expected);
}
