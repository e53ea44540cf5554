//! `vector/vector.toml` produces the wire contract: it is read here and checked against the
//! contract's constants, so renaming a topic, a header or the key format in the contract fails
//! this test until the Vector config follows.

use std::collections::BTreeSet;

use telemetry_bridge::forward::STAGE;
use telemetry_core::contract::{
    header, DeadLetterReason, DEFAULT_DLQ_TOPIC, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_TOPIC,
    TELEMETRY_FILTER,
};
use toml::Value;

fn vector_config() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../vector/vector.toml");
    let text = std::fs::read_to_string(path).expect("vector/vector.toml exists");
    toml::from_str(&interpolate_defaults(&text)).expect("vector/vector.toml is valid TOML")
}

/// What Vector makes of `${VAR:-default}` and `${VAR}` when none of the variables is set: the
/// default, or nothing.
fn interpolate_defaults(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("an unclosed ${") + start;
        let inside = &rest[start + 2..end];
        if let Some((_, default)) = inside.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn interpolation_keeps_defaults_and_drops_unset_variables() {
    assert_eq!(
        interpolate_defaults(r#"a = "${X:-b:9}" c = "${Y}""#),
        r#"a = "b:9" c = """#
    );
}

/// The one component of `kind` ("sources", "transforms", "sinks") with `type`.
fn component<'a>(config: &'a Value, kind: &str, component_type: &str) -> (&'a str, &'a Value) {
    let found: Vec<_> = config[kind]
        .as_table()
        .unwrap_or_else(|| panic!("no [{kind}]"))
        .iter()
        .filter(|(_, c)| c["type"].as_str() == Some(component_type))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {component_type} in [{kind}]");
    (found[0].0.as_str(), found[0].1)
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("'{key}' is missing or not a string"))
}

/// The remap program's text.
fn vrl(config: &Value) -> String {
    let (_, remap) = component(config, "transforms", "remap");
    str_of(remap, "source").to_owned()
}

/// Names of the Kafka headers the program sets: keys of the `.kafka_headers = { ... }` object
/// and `.kafka_headers.<name> = ...` assignments.
fn header_names(program: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if let Some(start) = program.find(".kafka_headers = {") {
        let object = &program[start..];
        let object = &object[..object.find('}').expect("the headers object closes")];
        for line in object.lines().skip(1) {
            if let Some(name) = line
                .trim()
                .strip_prefix('"')
                .and_then(|l| l.split('"').next())
            {
                names.insert(name.to_owned());
            }
        }
    }
    for assignment in program.split(".kafka_headers.").skip(1) {
        let name: String = assignment
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// The string values assigned to `field` (e.g. `.kafka_topic = "iot-stream"`).
fn assigned(program: &str, field: &str) -> Vec<String> {
    let prefix = format!("{field} = ");
    program
        .lines()
        .filter_map(|line| line.trim().strip_prefix(&prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn vector_subscribes_to_the_device_telemetry_on_emqx_with_a_stable_session() {
    let config = vector_config();
    let (_, mqtt) = component(&config, "sources", "mqtt");
    assert_eq!(str_of(mqtt, "host"), "emqx");
    assert_eq!(mqtt["port"].as_integer(), Some(1883));
    assert_eq!(str_of(mqtt, "topic"), TELEMETRY_FILTER);
    assert!(
        !str_of(mqtt, "client_id").is_empty(),
        "a stable client id keeps the session"
    );
    assert_eq!(
        str_of(mqtt, "password"),
        "",
        "the password comes from the environment only"
    );
    assert_eq!(
        str_of(&mqtt["decoding"], "codec"),
        "bytes",
        "the payload stays as sent"
    );
    let max_packet = mqtt["max_packet_size"]
        .as_integer()
        .expect("max_packet_size is set: Vector's default is 10 KiB") as usize;
    assert!(
        max_packet > DEFAULT_MAX_PAYLOAD_BYTES,
        "Vector must take every contract-sized payload, and larger ones to dead-letter them"
    );
    assert_eq!(
        max_packet,
        emqx_max_packet_bytes(),
        "Vector's max_packet_size must equal EMQX's mqtt.max_packet_size: a packet EMQX accepts \
         and Vector does not is redelivered to Vector forever"
    );
}

/// `mqtt.max_packet_size` of `deploy/emqx/emqx.conf`, in bytes (EMQX's KB is 1,024 bytes).
fn emqx_max_packet_bytes() -> usize {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/emqx/emqx.conf");
    let text = std::fs::read_to_string(path).expect("deploy/emqx/emqx.conf exists");
    let value = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("max_packet_size = "))
        .expect("deploy/emqx/emqx.conf sets mqtt.max_packet_size");
    let kilobytes: usize = value
        .strip_suffix("KB")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("max_packet_size = {value}: expected a size in KB"));
    kilobytes * 1024
}

#[test]
fn vector_produces_to_the_contract_topics_with_the_contract_key_and_value() {
    let config = vector_config();
    let (source_name, _) = component(&config, "sources", "mqtt");
    let (remap_name, remap) = component(&config, "transforms", "remap");
    assert_eq!(
        remap["inputs"].as_array().unwrap(),
        &[Value::from(source_name)]
    );
    let (_, kafka) = component(&config, "sinks", "kafka");
    assert_eq!(
        kafka["inputs"].as_array().unwrap(),
        &[Value::from(remap_name)]
    );
    assert_eq!(str_of(kafka, "bootstrap_servers"), "redpanda:9092");
    assert_eq!(str_of(kafka, "topic"), "{{ kafka_topic }}");
    assert_eq!(str_of(kafka, "key_field"), ".kafka_key");
    assert_eq!(str_of(kafka, "headers_key"), ".kafka_headers");
    assert_eq!(
        str_of(&kafka["encoding"], "codec"),
        "raw_message",
        "the value is the payload, unchanged"
    );
    assert_eq!(kafka["acknowledgements"]["enabled"].as_bool(), Some(true));
    assert_eq!(str_of(&kafka["librdkafka_options"], "acks"), "all");

    let program = vrl(&config);
    let topics: BTreeSet<String> = assigned(&program, ".kafka_topic").into_iter().collect();
    let expected: BTreeSet<String> = [DEFAULT_TOPIC, DEFAULT_DLQ_TOPIC]
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect();
    assert_eq!(topics, expected);
    // The key of a telemetry record is `{user}/{device}`, the second and fourth topic levels.
    let keys = assigned(&program, ".kafka_key");
    assert!(
        keys.contains(&r#"user + "/" + device"#.to_owned()),
        "{keys:?}"
    );
    assert!(program.contains("user = string(levels[1])"));
    assert!(program.contains("device = string(levels[3])"));
    let shape = TELEMETRY_FILTER.split('/').collect::<Vec<_>>();
    for (index, level) in shape.iter().enumerate().filter(|(_, l)| **l != "+") {
        assert!(
            program.contains(&format!("levels[{index}] != \"{level}\"")),
            "the program checks level {index} is '{level}'"
        );
    }
    assert!(program.contains(&format!("length(levels) != {}", shape.len())));
    assert!(program.contains(&format!("> {DEFAULT_MAX_PAYLOAD_BYTES}")));
}

#[test]
fn vector_sets_only_contract_headers_and_contract_dead_letter_reasons() {
    let program = vrl(&vector_config());
    let names = header_names(&program);
    let contract: BTreeSet<String> = [
        header::MQTT_TOPIC,
        header::RECEIVED_AT_MS,
        header::MQTT_QOS,
        header::MQTT_RETAIN,
        header::MQTT_DUP,
        header::DLQ_REASON,
        header::DLQ_DETAIL,
        header::DLQ_STAGE,
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    assert!(
        names.is_subset(&contract),
        "not in the contract: {:?}",
        names.difference(&contract)
    );
    // Vector's MQTT source does not expose QoS, retain or dup; the contract allows records
    // without them. Topic and receive time it does know, and the worker uses the latter.
    for required in [
        header::MQTT_TOPIC,
        header::RECEIVED_AT_MS,
        header::DLQ_REASON,
        header::DLQ_DETAIL,
        header::DLQ_STAGE,
    ] {
        assert!(names.contains(required), "{required} is set");
    }
    let reasons: BTreeSet<String> = assigned(&program, ".kafka_headers.dlq_reason")
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = [
        DeadLetterReason::InvalidTopic,
        DeadLetterReason::PayloadTooLarge,
    ]
    .iter()
    .map(|r| format!("\"{}\"", r.code()))
    .collect();
    assert_eq!(reasons, expected);
    let stages: BTreeSet<String> = assigned(&program, ".kafka_headers.dlq_stage")
        .into_iter()
        .collect();
    assert_eq!(stages, BTreeSet::from([format!("\"{STAGE}\"")]));
}
