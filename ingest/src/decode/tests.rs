//! Decoder tests by topic kind and by rejection reason; real captured messages are in
//! `tests/samples.rs`.

use chrono::{DateTime, Utc};
use telemon_model::Value;

use super::*;

const NOW: &str = "2024-06-01T12:00:00Z";

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

fn msg<'a>(topic: &'a str, payload: &'a [u8]) -> Message<'a> {
    Message {
        topic,
        payload,
        identity: None,
        received_at: at(NOW),
    }
}

fn native(payload: &str) -> Result<Decoded, Rejection> {
    Decoder::native_only().decode(&msg("devices/bed-7/telemetry", payload.as_bytes()))
}

fn mapped(toml_text: &str, topic: &str, payload: &str) -> Result<Decoded, Rejection> {
    let decoder = Decoder::from_config(DecodeConfig::from_toml(toml_text).unwrap()).unwrap();
    decoder.decode(&msg(topic, payload.as_bytes()))
}

/// (metric, value) pairs sorted by metric.
fn values(decoded: &Decoded) -> Vec<(String, Value)> {
    let mut v: Vec<_> = decoded
        .readings
        .iter()
        .map(|r| (r.metric.clone(), r.value.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn reasons(decoded: &Decoded) -> Vec<&'static str> {
    decoded.rejected.iter().map(|r| r.reason.as_str()).collect()
}

fn err(result: Result<Decoded, Rejection>) -> &'static str {
    result.expect_err("whole message refused").reason.as_str()
}

#[test]
fn native_good_fields_survive_a_bad_neighbour() {
    let decoded = native(r#"{"heart_rate": 71, "spo2": "n/a"}"#).unwrap();
    assert_eq!(
        values(&decoded),
        vec![("heart_rate".into(), Value::Number(71.0))]
    );
    assert_eq!(reasons(&decoded), vec!["sentinel"]);
    assert!(decoded.rejected[0].detail.contains("spo2"));
    assert_eq!(decoded.readings[0].device_id.as_str(), "bed-7");
    assert_eq!(decoded.readings[0].time, at(NOW));
}

#[test]
fn native_numbers_in_strings_are_not_coerced() {
    let decoded = native(r#"{"heart_rate": "71", "rhythm": "sinus", "resp_rate": 14}"#).unwrap();
    assert_eq!(
        values(&decoded),
        vec![("resp_rate".into(), Value::Number(14.0))]
    );
    assert_eq!(reasons(&decoded), vec!["not_a_number", "not_a_number"]);
}

#[test]
fn native_booleans_states_nulls_and_nesting() {
    let payload = r#"{"alarm": true, "pump": "ON", "etco2": null, "bp": {"systolic": 120,
        "diastolic": 80}, "ts": "2024-06-01T11:59:00Z"}"#;
    let decoded = native(payload).unwrap();
    assert_eq!(
        values(&decoded),
        vec![
            ("alarm".into(), Value::Bool(true)),
            ("bp_diastolic".into(), Value::Number(80.0)),
            ("bp_systolic".into(), Value::Number(120.0)),
            ("pump".into(), Value::Bool(true)),
        ]
    );
    assert!(decoded.rejected.is_empty());
    assert!(decoded
        .readings
        .iter()
        .all(|r| r.time == at("2024-06-01T11:59:00Z")));
}

#[test]
fn native_epoch_millisecond_timestamp() {
    let decoded = native(r#"{"ts": 1717243140000, "spo2": 97}"#).unwrap();
    assert_eq!(decoded.readings[0].time, at("2024-06-01T11:59:00Z"));
    let decoded = native(r#"{"ts": 1.71724314e12, "spo2": 97}"#).unwrap();
    assert_eq!(decoded.readings[0].time, at("2024-06-01T11:59:00Z"));
}

#[test]
fn native_timestamps_outside_the_window_refuse_the_message() {
    assert_eq!(
        err(native(r#"{"ts": 0, "spo2": 97}"#)),
        "timestamp_out_of_range"
    );
    assert_eq!(
        err(native(r#"{"ts": "2024-06-03T12:00:00Z", "spo2": 97}"#)),
        "timestamp_out_of_range"
    );
    assert_eq!(
        err(native(r#"{"ts": "soon", "spo2": 97}"#)),
        "invalid_timestamp"
    );
}

#[test]
fn whole_message_rejections() {
    assert_eq!(err(native("")), "empty");
    assert_eq!(err(native("{\"a\":1}\0")), "nul_byte");
    assert_eq!(err(native("{\"heart_rate\": 7")), "invalid_json");
    assert_eq!(err(native("[1, 2]")), "invalid_json");
    let bad_utf8 = Decoder::native_only().decode(&msg("devices/bed-7/telemetry", b"{\"\xff\":1}"));
    assert_eq!(err(bad_utf8), "invalid_utf8");
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    assert_eq!(err(native(&big)), "oversize");
}

#[test]
fn field_rejections() {
    let decoded = native(r#"{"bad name": 1, "trace": [1, 2], "temp": 85.0, "hr": 1e999}"#);
    // 1e999 is not valid JSON for serde_json: the whole message is refused.
    assert_eq!(err(decoded), "invalid_json");

    let decoded = native(r#"{"bad name": 1, "trace": [1, 2], "temp": 85.0, "ok": 1}"#).unwrap();
    let mut got = reasons(&decoded);
    got.sort_unstable();
    assert_eq!(got, vec!["invalid_metric", "sentinel", "unsupported_value"]);
    assert_eq!(values(&decoded), vec![("ok".into(), Value::Number(1.0))]);
}

#[test]
fn unknown_topics_and_bad_device_ids() {
    assert_eq!(
        err(Decoder::native_only().decode(&msg("other/x", b"1"))),
        "unknown_topic"
    );
    let bad_id = Decoder::native_only().decode(&msg("devices/b\u{e9}d/telemetry", b"{}"));
    assert_eq!(err(bad_id), "invalid_device_id");
    let config = "[[mapping]]\ntopic='z/{device}'\ndecoder='bare'";
    assert_eq!(
        err(mapped(config, "z/bad device", "1")),
        "invalid_device_id"
    );
}

#[test]
fn native_topics_belong_to_the_publishing_identity() {
    let mut m = msg("devices/bed-7/telemetry", b"{\"spo2\": 97}");
    m.identity = Some("bed-8");
    assert_eq!(err(Decoder::native_only().decode(&m)), "identity_mismatch");
    m.identity = Some("bed-7");
    assert_eq!(Decoder::native_only().decode(&m).unwrap().readings.len(), 1);
}

#[test]
fn native_status_birth_and_will() {
    let decoder = Decoder::native_only();
    for (payload, online) in [("online", true), ("offline", false), ("Offline\n", false)] {
        let decoded = decoder
            .decode(&msg("devices/bed-7/status", payload.as_bytes()))
            .unwrap();
        assert_eq!(
            values(&decoded),
            vec![(ONLINE_METRIC.into(), Value::Bool(online))]
        );
    }
    let decoded = decoder.decode(&msg("devices/bed-7/status", b"{\"state\":\"online\"}"));
    assert_eq!(
        values(&decoded.unwrap()),
        vec![(ONLINE_METRIC.into(), Value::Bool(true))]
    );
    assert_eq!(
        err(decoder.decode(&msg("devices/bed-7/status", b"rebooting"))),
        "invalid_status"
    );
}

fn senml(payload: &str) -> Result<Decoded, Rejection> {
    Decoder::native_only().decode(&msg("devices/urn:dev:ow:1/senml", payload.as_bytes()))
}

#[test]
fn senml_base_fields_relative_times_and_value_kinds() {
    let pack = r#"[
        {"bn": "urn:dev:ow:1/", "bt": 1717243200, "bu": "Cel", "bv": 20, "n": "temp", "v": 1.5},
        {"n": "temp", "t": -60, "v": 1.0},
        {"n": "door", "vb": true},
        {"n": "mode", "vs": "auto"},
        {"n": "energy", "u": "Wh", "s": 42}
    ]"#;
    let decoded = senml(pack).unwrap();
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
    let r = &decoded.readings;
    assert_eq!(
        (r[0].metric.as_str(), &r[0].value),
        ("temp", &Value::Number(21.5))
    );
    assert_eq!(r[0].unit.as_deref(), Some("Cel"));
    assert_eq!(r[0].time, at("2024-06-01T12:00:00Z"));
    assert_eq!(r[1].time, at("2024-06-01T11:59:00Z"));
    assert_eq!(r[2].value, Value::Bool(true));
    assert_eq!(r[3].value, Value::Text("auto".into()));
    assert_eq!(
        (r[4].metric.as_str(), r[4].unit.as_deref()),
        ("energy_sum", Some("Wh"))
    );
}

#[test]
fn senml_relative_time_is_from_receipt() {
    let decoded = senml(r#"[{"n": "hr", "v": 70, "t": -30}]"#).unwrap();
    assert_eq!(decoded.readings[0].time, at("2024-06-01T11:59:30Z"));
}

#[test]
fn senml_rejections() {
    assert_eq!(err(senml(r#"{"n": "hr", "v": 70}"#)), "invalid_senml");
    assert_eq!(
        err(senml(r#"[{"n": "hr", "v": 70, "crit_": 1}]"#)),
        "invalid_senml"
    );

    let decoded = senml(
        r#"[{"n": "a", "v": 1, "vs": "x"}, {"n": "b"}, {"n": "c", "v": "7"},
        {"n": "d", "v": 1, "bt": 1000000000}, {"n": "e", "v": 2}]"#,
    )
    .unwrap();
    let got = reasons(&decoded);
    assert_eq!(
        got,
        vec![
            "invalid_senml",
            "missing_value",
            "not_a_number",
            "timestamp_out_of_range",
            "timestamp_out_of_range"
        ]
    );
}

#[test]
fn mapped_bare_values() {
    let config = "[[mapping]]\ntopic='s/{device}/{metric}'\ndecoder='bare'\nunit='Cel'";
    let decoded = mapped(config, "s/d1/temperature", " 21.5\n").unwrap();
    assert_eq!(
        values(&decoded),
        vec![("temperature".into(), Value::Number(21.5))]
    );
    assert_eq!(decoded.readings[0].unit.as_deref(), Some("Cel"));

    assert_eq!(
        reasons(&mapped(config, "s/d1/temperature", "nan").unwrap()),
        vec!["non_finite"]
    );
    let unavailable = mapped(config, "s/d1/temperature", "unavailable").unwrap();
    assert_eq!(reasons(&unavailable), vec!["sentinel"]);
    let text = mapped(config, "s/d1/mode", "heat").unwrap();
    assert_eq!(
        values(&text),
        vec![("mode".into(), Value::Text("heat".into()))]
    );
}

#[test]
fn device_prefix_and_metric_templates() {
    let config = "[[mapping]]\ntopic='r/{device}/relay/{channel}'\ndecoder='bare'\n\
                  device_prefix='shelly-'\nmetric='relay_{channel}'";
    let decoded = mapped(config, "r/k1/relay/1", "on").unwrap();
    assert_eq!(decoded.readings[0].device_id.as_str(), "shelly-k1");
    assert_eq!(
        values(&decoded),
        vec![("relay_1".into(), Value::Bool(true))]
    );
}

#[test]
fn tasmota_time_in_the_device_zone() {
    let config = "[[mapping]]\ntopic='tele/{device}/SENSOR'\ndecoder='tasmota'\n\
                  timezone='Europe/Berlin'";
    let payload = r#"{"Time":"2024-06-01T13:59:00","DS18B20":{"Temperature":-127.0},
        "BME280":{"Temperature":21.0,"Pressure":1013.2},"TempUnit":"F","PressureUnit":"hPa"}"#;
    let decoded = mapped(config, "tele/t1/SENSOR", payload).unwrap();
    assert_eq!(reasons(&decoded), vec!["sentinel"]);
    let mut readings = decoded.readings.clone();
    readings.sort_by(|a, b| a.metric.cmp(&b.metric));
    assert_eq!(readings[0].metric, "BME280_Pressure");
    assert_eq!(readings[0].unit.as_deref(), Some("hPa"));
    assert_eq!(readings[1].unit.as_deref(), Some("[degF]"));
    assert!(readings
        .iter()
        .all(|r| r.time == at("2024-06-01T11:59:00Z")));
}

#[test]
fn zigbee2mqtt_text_last_seen_and_arrays() {
    let config = "[[mapping]]\ntopic='z2m/{device}'\ndecoder='zigbee2mqtt'";
    let payload = r#"{"action":"single","state":"OFF","temperature":"21","last_seen":1717243140000,
        "color_options":[1,2],"update":{"state":"idle"}}"#;
    let decoded = mapped(config, "z2m/button", payload).unwrap();
    assert_eq!(
        values(&decoded),
        vec![
            ("action".into(), Value::Text("single".into())),
            ("state".into(), Value::Bool(false)),
            ("update_state".into(), Value::Text("idle".into())),
        ]
    );
    assert_eq!(reasons(&decoded), vec!["not_a_number"]);
    assert!(decoded
        .readings
        .iter()
        .all(|r| r.time == at("2024-06-01T11:59:00Z")));
}

#[test]
fn shelly_gen2_notifications_and_component_status() {
    let config = "[[mapping]]\ntopic='{device}/events/rpc'\ndecoder='shelly_gen2'\n\
                  [[mapping]]\ntopic='{device}/status/{metric}'\ndecoder='shelly_gen2'";
    let rpc = r#"{"src":"shellyplus1-a1","dst":"x/events","method":"NotifyStatus",
        "params":{"ts":1717243140.50,"switch:0":{"id":0,"output":true,"apower":12.5}}}"#;
    let decoded = mapped(config, "shellyplus1-a1/events/rpc", rpc).unwrap();
    assert_eq!(
        values(&decoded),
        vec![
            ("switch:0_apower".into(), Value::Number(12.5)),
            ("switch:0_output".into(), Value::Bool(true)),
        ]
    );
    assert_eq!(decoded.readings[0].time, at("2024-06-01T11:59:00.5Z"));

    let event = r#"{"src":"a","method":"NotifyEvent","params":{"ts":1717243140.5,"events":[]}}"#;
    assert_eq!(
        mapped(config, "a/events/rpc", event),
        Ok(Decoded::default())
    );

    let status = r#"{"id":0,"source":"WS_in","output":false,"temperature":{"tC":41.2}}"#;
    let decoded = mapped(config, "shellyplus1-a1/status/switch:0", status).unwrap();
    assert_eq!(
        values(&decoded),
        vec![
            ("switch:0_output".into(), Value::Bool(false)),
            ("switch:0_temperature_tC".into(), Value::Number(41.2)),
        ]
    );
}

#[test]
fn thingsboard_bad_record_does_not_take_the_batch_down() {
    let config = "[[mapping]]\ntopic='v1/devices/me/telemetry'\ndecoder='thingsboard'\n\
                  device='{identity}'";
    let decoder = Decoder::from_config(DecodeConfig::from_toml(config).unwrap()).unwrap();
    let payload = br#"[{"ts": 5, "values": {"t": 1}}, 7, {"ts": 1717243140000, "values": {"t": 2}},
        {"hum": 40}]"#;
    let mut m = msg("v1/devices/me/telemetry", payload);
    m.identity = Some("tb-9");
    let decoded = decoder.decode(&m).unwrap();
    assert_eq!(
        reasons(&decoded),
        vec!["timestamp_out_of_range", "invalid_json"]
    );
    assert_eq!(
        values(&decoded),
        vec![
            ("hum".into(), Value::Number(40.0)),
            ("t".into(), Value::Number(2.0))
        ]
    );
}

#[test]
fn ignored_topics_yield_nothing_even_when_empty() {
    let config = "[[mapping]]\ntopic='z2m/bridge/#'\ndecoder='ignore'";
    assert_eq!(
        mapped(config, "z2m/bridge/state", ""),
        Ok(Decoded::default())
    );
}

#[test]
fn first_matching_mapping_decides() {
    let config = "[[mapping]]\ntopic='a/special'\ndecoder='ignore'\n\
                  [[mapping]]\ntopic='a/{device}'\ndecoder='bare'";
    assert_eq!(mapped(config, "a/special", "1"), Ok(Decoded::default()));
    assert_eq!(mapped(config, "a/other", "1").unwrap().readings.len(), 1);
}

#[test]
fn renames_and_ignored_fields() {
    let config = "[[mapping]]\ntopic='h/{device}'\ndecoder='json'\nignore_fields=['gps']\n\
                  [mapping.rename]\nvitals_pr = 'heart_rate'";
    let decoded = mapped(
        config,
        "h/p1",
        r#"{"vitals":{"pr":61},"gps":{"fix":[0,0]}}"#,
    )
    .unwrap();
    assert_eq!(
        values(&decoded),
        vec![("heart_rate".into(), Value::Number(61.0))]
    );
    assert!(decoded.rejected.is_empty());
}

#[test]
fn payload_device_field() {
    let config = "[[mapping]]\ntopic='h/v'\ndecoder='json'\ndevice_field='id'";
    let decoded = mapped(config, "h/v", r#"{"id":"p-2","spo2":96}"#).unwrap();
    assert_eq!(decoded.readings[0].device_id.as_str(), "p-2");
    assert_eq!(values(&decoded), vec![("spo2".into(), Value::Number(96.0))]);
    assert_eq!(
        err(mapped(config, "h/v", r#"{"spo2":96}"#)),
        "invalid_device_id"
    );
    assert_eq!(
        err(mapped(config, "h/v", r#"{"id":"p 2","spo2":96}"#)),
        "invalid_device_id"
    );
}

#[test]
fn subscriptions_cover_native_and_mapped_topics() {
    let config = "[[mapping]]\ntopic='z/bridge/#'\ndecoder='ignore'\n\
                  [[mapping]]\ntopic='z/{device}'\ndecoder='zigbee2mqtt'\n\
                  [[mapping]]\ntopic='z/{device}'\ndecoder='bare'";
    let decoder = Decoder::from_config(DecodeConfig::from_toml(config).unwrap()).unwrap();
    let want = [
        "devices/+/telemetry",
        "devices/+/senml",
        "devices/+/status",
        "z/+",
    ];
    assert_eq!(decoder.subscriptions(), want.map(String::from).to_vec());
}

#[test]
fn every_reason_is_produced_by_some_input() {
    // Each entry: the reason, and a message that yields it (as Err or as a field rejection).
    let cases: [(&str, &str, &str); 19] = [
        ("empty", "devices/d/telemetry", " "),
        ("oversize", "devices/d/telemetry", ""),
        ("nul_byte", "devices/d/telemetry", "{}\0"),
        ("invalid_utf8", "devices/d/telemetry", ""),
        ("invalid_json", "devices/d/telemetry", "{"),
        ("invalid_senml", "devices/d/senml", "{}"),
        ("invalid_status", "devices/d/status", "maybe"),
        ("not_a_number", "devices/d/telemetry", r#"{"hr":"71"}"#),
        ("non_finite", "m/d", "inf"),
        ("sentinel", "devices/d/telemetry", r#"{"spo2":127}"#),
        (
            "implausible",
            "devices/d/telemetry",
            r#"{"heart_rate":1.7e308}"#,
        ),
        ("unsupported_value", "devices/d/telemetry", r#"{"hr":[1]}"#),
        ("missing_value", "devices/d/senml", r#"[{"n":"hr"}]"#),
        (
            "invalid_timestamp",
            "devices/d/telemetry",
            r#"{"ts":"x","hr":1}"#,
        ),
        (
            "timestamp_out_of_range",
            "devices/d/telemetry",
            r#"{"ts":1,"hr":1}"#,
        ),
        ("invalid_metric", "devices/d/telemetry", r#"{"h r":1}"#),
        ("unknown_topic", "elsewhere", "1"),
        ("invalid_device_id", "m/d d", "1"),
        ("identity_mismatch", "devices/d/telemetry", r#"{"hr":1}"#),
    ];
    let config = "[[mapping]]\ntopic='m/{device}'\ndecoder='bare'";
    let decoder = Decoder::from_config(DecodeConfig::from_toml(config).unwrap()).unwrap();
    let big = vec![b' '; 70_000];
    for (reason, topic, payload) in cases {
        let mut m = msg(topic, payload.as_bytes());
        match reason {
            "oversize" => m.payload = &big,
            "invalid_utf8" => m.payload = b"\xc3\x28",
            "identity_mismatch" => m.identity = Some("other"),
            _ => {}
        }
        let got: Vec<&str> = match decoder.decode(&m) {
            Err(r) => vec![r.reason.as_str()],
            Ok(decoded) => reasons(&decoded),
        };
        assert_eq!(got, vec![reason], "{topic} {payload:?}");
    }
    assert_eq!(RejectReason::ALL.len(), 19);
}
