//! Every metric this crate exports, named in one place. Labels stay low-cardinality: a
//! severity, a result or a cause, never a rule, user or device.

use crate::engine::{AlertEvent, EventKind};

/// Alerts raised, by severity; counted once their batch is committed.
pub const ALERTS_RAISED: &str = "telemetry_alerts_raised_total";
/// Alerts cleared; counted once their batch is committed.
pub const ALERTS_CLEARED: &str = "telemetry_alerts_cleared_total";
/// Alert messages the MQTT broker confirmed (QoS 2, PUBCOMP) and the outbox marked published.
pub const ALERTS_PUBLISHED: &str = "telemetry_alerts_published_total";
/// Alert rows waiting in the outbox (`published_at IS NULL`), across all replicas.
pub const OUTBOX_PENDING: &str = "telemetry_alerts_outbox_pending";
/// Rules file reloads, by result (`ok` or `error`).
pub const RULE_RELOADS: &str = "telemetry_alerts_rule_reloads_total";
/// Outbox rounds that failed and will be retried, by cause (`postgres` or `mqtt`).
pub const OUTBOX_RETRIES: &str = "telemetry_alerts_outbox_retries_total";
/// Seconds an outbox round took that published something, from locking to commit.
pub const OUTBOX_ROUND_SECONDS: &str = "telemetry_alerts_outbox_round_seconds";

/// Counts the events of a batch. Call after the batch's transaction committed, so a batch that
/// is retried is not counted twice.
pub fn events_committed(events: &[AlertEvent]) {
    for event in events {
        match event.kind {
            EventKind::Raised => {
                metrics::counter!(ALERTS_RAISED, "severity" => event.severity.as_str()).increment(1)
            }
            EventKind::Cleared => metrics::counter!(ALERTS_CLEARED).increment(1),
        }
    }
}

pub(crate) fn published(count: usize) {
    metrics::counter!(ALERTS_PUBLISHED).increment(count as u64);
}

pub(crate) fn pending(count: i64) {
    metrics::gauge!(OUTBOX_PENDING).set(count as f64);
}

pub(crate) fn rule_reload(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(RULE_RELOADS, "result" => result).increment(1);
}

pub(crate) fn outbox_round(took: std::time::Duration) {
    metrics::histogram!(OUTBOX_ROUND_SECONDS).record(took.as_secs_f64());
}

pub(crate) fn outbox_retry(cause: &'static str) {
    metrics::counter!(OUTBOX_RETRIES, "cause" => cause).increment(1);
}
