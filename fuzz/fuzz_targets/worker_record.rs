//! A Kafka record as the worker decodes it: the key and the payload through the contract, then
//! the device clock check against the receive time. Nothing panics, and a record that passes
//! has a key that round-trips and a device time the worker can store.
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use telemetry_core::contract::{decode_payload, parse_kafka_key, DEFAULT_MAX_PAYLOAD_BYTES};
use telemetry_worker::record::check_not_ahead;

fuzz_target!(|input: (&[u8], &[u8], i64)| {
    let (key, payload, received_ms) = input;
    let Ok(device) = parse_kafka_key(key) else {
        return;
    };
    assert_eq!(device.kafka_key().as_bytes(), key);
    let Ok(telemetry) = decode_payload(payload, DEFAULT_MAX_PAYLOAD_BYTES) else {
        return;
    };
    let received_at = DateTime::<Utc>::from_timestamp_millis(received_ms).unwrap_or_default();
    if let Some(device_time) = telemetry.device_time {
        use chrono::Datelike;
        assert!((1970..=9999).contains(&device_time.year()));
        if check_not_ahead(device_time, received_at).is_ok() {
            assert!(device_time - received_at <= chrono::TimeDelta::days(1));
        }
    }
});
