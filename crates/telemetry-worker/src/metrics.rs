//! Every metric the worker exports, named in one place. Labels stay low-cardinality: a reason
//! or a partition, never a device.

use std::time::Duration;

use chrono::{DateTime, Utc};

use telemetry_core::contract::DeadLetterReason;

pub const RECORDS_CONSUMED: &str = "telemetry_worker_records_consumed_total";
pub const ROWS_WRITTEN: &str = "telemetry_worker_rows_written_total";
pub const ROWS_SKIPPED: &str = "telemetry_worker_rows_skipped_total";
/// Records not stored because they are copies of a reading stored already (same device, `seq`
/// and payload): MQTT redeliveries and device retries. Counted in rows skipped too.
pub const COPIES_DROPPED: &str = "telemetry_worker_copies_dropped_total";
pub const DEAD_LETTERS: &str = "telemetry_worker_dead_letters_total";
/// Dead letters the dead-letter topic refused whole and took without their payload.
pub const DEAD_LETTERS_TRUNCATED: &str = "telemetry_worker_dead_letters_truncated_total";
pub const BATCH_SIZE: &str = "telemetry_worker_batch_records";
pub const FLUSH_LATENCY: &str = "telemetry_worker_flush_seconds";
pub const RETRIES: &str = "telemetry_worker_retries_total";
pub const RECORD_AGE: &str = "telemetry_worker_record_age_seconds";
pub const CONSUMER_LAG: &str = "telemetry_worker_consumer_lag";
pub const REBALANCES: &str = "telemetry_worker_rebalances_total";
/// Records never stored that Kafka no longer kept when their partition was assigned
/// (retention ran ahead of the worker), by partition.
pub const RECORDS_LOST: &str = "telemetry_worker_records_lost_to_retention_total";
/// Assigned partitions the worker refused to start, by reason; each stops the worker.
pub const PARTITIONS_REFUSED: &str = "telemetry_worker_partitions_refused_total";

pub fn consumed(records: usize) {
    metrics::counter!(RECORDS_CONSUMED).increment(records as u64);
}

pub fn flushed(batch_records: usize, written: u64, skipped: u64, took: Duration) {
    metrics::histogram!(BATCH_SIZE).record(batch_records as f64);
    metrics::histogram!(FLUSH_LATENCY).record(took.as_secs_f64());
    metrics::counter!(ROWS_WRITTEN).increment(written);
    metrics::counter!(ROWS_SKIPPED).increment(skipped);
}

pub fn copies_dropped(count: usize) {
    metrics::counter!(COPIES_DROPPED).increment(count as u64);
}

pub fn dead_letter(reason: DeadLetterReason) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason.code()).increment(1);
}

pub fn dead_letter_truncated() {
    metrics::counter!(DEAD_LETTERS_TRUNCATED).increment(1);
}

pub fn retry(cause: &'static str) {
    metrics::counter!(RETRIES, "cause" => cause).increment(1);
}

/// End-to-end latency: from the bridge's MQTT receive time to this batch's commit.
pub fn record_age(received: impl Iterator<Item = DateTime<Utc>>) {
    let now = Utc::now();
    let histogram = metrics::histogram!(RECORD_AGE);
    for at in received {
        histogram.record((now - at).as_seconds_f64().max(0.0));
    }
}

/// Records behind the partition's high watermark, as librdkafka last saw it.
pub fn consumer_lag(partition: i32, lag: i64) {
    metrics::gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(lag as f64);
}

pub fn rebalance(kind: &'static str) {
    metrics::counter!(REBALANCES, "kind" => kind).increment(1);
}

pub fn records_lost(partition: i32, count: i64) {
    metrics::counter!(RECORDS_LOST, "partition" => partition.to_string()).increment(count as u64);
}

pub fn partition_refused(reason: &'static str) {
    metrics::counter!(PARTITIONS_REFUSED, "reason" => reason).increment(1);
}
