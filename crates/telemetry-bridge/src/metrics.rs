//! Every metric the bridge exports, named in one place. Labels stay low-cardinality: a reason
//! code or a Kafka topic, never a device.

use std::time::Duration;

use telemetry_core::contract::DeadLetterReason;

pub const MESSAGES_RECEIVED: &str = "telemetry_bridge_messages_received_total";
pub const MESSAGES_FORWARDED: &str = "telemetry_bridge_messages_forwarded_total";
pub const DEAD_LETTERS: &str = "telemetry_bridge_dead_letters_total";
/// Messages Kafka refused for good whose dead letter it refused too: logged, counted here and
/// acknowledged, so that they do not stop every message behind them.
pub const DROPPED: &str = "telemetry_bridge_dropped_total";
pub const MQTT_RECONNECTS: &str = "telemetry_bridge_mqtt_reconnects_total";
/// Messages confirmed by Kafka after their MQTT connection was gone: not acknowledged, since
/// the broker delivers them again on the new connection (each becomes a duplicate in Kafka).
pub const STALE_ACKS_SKIPPED: &str = "telemetry_bridge_stale_acks_skipped_total";
pub const IN_FLIGHT: &str = "telemetry_bridge_in_flight_messages";
/// Messages the broker sent that Kafka has not confirmed yet: what the bridge holds in memory,
/// payload and all (see `acknowledge_in_order` for what bounds it).
pub const HELD: &str = "telemetry_bridge_held_messages";
/// Messages Kafka confirmed whose acknowledgement is held back, so that a broker that overshoots
/// the Receive Maximum does not send more: a packet id each.
pub const ACKS_OWED: &str = "telemetry_bridge_acks_owed";
/// Messages the broker marked as delivered again (MQTT DUP flag): after a reconnect or restart.
pub const REDELIVERED: &str = "telemetry_bridge_redelivered_total";
/// From receipt over MQTT to Kafka's confirmation.
pub const DELIVERY_LATENCY: &str = "telemetry_bridge_delivery_seconds";

pub fn received() {
    metrics::counter!(MESSAGES_RECEIVED).increment(1);
}

pub fn dead_letter(reason: DeadLetterReason) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason.code()).increment(1);
}

pub fn dropped() {
    metrics::counter!(DROPPED).increment(1);
}

pub fn delivered(took: Duration) {
    metrics::counter!(MESSAGES_FORWARDED).increment(1);
    metrics::histogram!(DELIVERY_LATENCY).record(took.as_secs_f64());
}

pub fn in_flight(count: usize) {
    metrics::gauge!(IN_FLIGHT).set(count as f64);
}

pub fn reconnect() {
    metrics::counter!(MQTT_RECONNECTS).increment(1);
}

pub fn stale_ack_skipped() {
    metrics::counter!(STALE_ACKS_SKIPPED).increment(1);
}

pub fn held(count: u64) {
    metrics::gauge!(HELD).set(count as f64);
}

pub fn acks_owed(count: usize) {
    metrics::gauge!(ACKS_OWED).set(count as f64);
}

pub fn redelivered() {
    metrics::counter!(REDELIVERED).increment(1);
}

/// Mosquitto's own counters, read from its `$SYS` topics when `mqtt.broker_stats` is on (EMQX
/// exports its own to Prometheus: `emqx_delivery_dropped_queue_full` and the like). Each is the
/// broker's figure, as the broker last published it (every `sys_interval`, 10 s by default).
pub const BROKER_STATS: [(&str, &str); 3] = [
    // QoS 1 and 0 messages dropped because a session's queue was full, once per subscriber
    // (mosquitto 2.0.11 src/database.c, db__message_insert). Must stay 0.
    (
        "$SYS/broker/publish/messages/dropped",
        "telemetry_bridge_broker_messages_dropped",
    ),
    // Messages the broker holds (queued for sessions, in flight, retained).
    (
        "$SYS/broker/store/messages/count",
        "telemetry_bridge_broker_messages_stored",
    ),
    (
        "$SYS/broker/store/messages/bytes",
        "telemetry_bridge_broker_stored_bytes",
    ),
];

/// Records a `$SYS` message as its gauge; ignores topics and payloads it does not know.
pub fn broker_stat(topic: &[u8], payload: &[u8]) {
    let known = BROKER_STATS
        .iter()
        .find(|(sys_topic, _)| sys_topic.as_bytes() == topic);
    let value = std::str::from_utf8(payload)
        .ok()
        .and_then(|text| text.trim().parse::<f64>().ok());
    if let (Some((_, name)), Some(value)) = (known, value) {
        metrics::gauge!(*name).set(value);
    }
}
