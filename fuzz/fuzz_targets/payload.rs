//! Any payload through the contract's decoder (what the worker applies to each record) and a
//! bridge route's JSON Schema check: neither panics, and what the decoder accepts is a JSON
//! object with readings that PostgreSQL's `jsonb` parser would also read.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use telemetry_bridge::schema::Schema;
use telemetry_core::contract::{decode_payload, MAX_READING_DEPTH};

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::compile(
            "fuzz.json".into(),
            &serde_json::json!({
                "type": "object",
                "required": ["temperature"],
                "properties": {
                    "ts": {"type": ["integer", "string"], "format": "date-time"},
                    "temperature": {"type": "number", "minimum": -50, "maximum": 100},
                    "gps": {"$ref": "#/$defs/position"}
                },
                "$defs": {
                    "position": {
                        "type": "object",
                        "properties": {"lat": {"type": "number", "maximum": 90}}
                    }
                }
            }),
        )
        .unwrap()
    })
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|payload: &[u8]| {
    let _ = schema().check(payload);
    let Ok(telemetry) = decode_payload(payload, 64 * 1024) else {
        return;
    };
    assert!(telemetry.readings >= 1);
    let value: serde_json::Value =
        serde_json::from_slice(payload).expect("accepted payloads are JSON");
    let object = value.as_object().expect("accepted payloads are objects");
    // Members besides ts and seq are readings, nested at most MAX_READING_DEPTH deep.
    for (name, reading) in object {
        assert!(!name.is_empty() && !name.contains('\0'));
        if name != "ts" && name != "seq" {
            assert!(depth(reading) < MAX_READING_DEPTH, "{name}");
        }
    }
    if let Some(seq) = telemetry.seq {
        assert!(seq >= 0);
    }
});
