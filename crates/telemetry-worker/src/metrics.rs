//! Every metric the worker exports, named in one place. Labels stay low-cardinality: a reason
//! or a partition, never a device.

use std::time::Duration;

use telemetry_core::contract::DeadLetterReason;

pub const RECORDS_CONSUMED: &str = "telemetry_worker_records_consumed_total";
pub const ROWS_WRITTEN: &str = "telemetry_worker_rows_written_total";
pub const ROWS_SKIPPED: &str = "telemetry_worker_rows_skipped_total";
pub const DEAD_LETTERS: &str = "telemetry_worker_dead_letters_total";
pub const BATCH_SIZE: &str = "telemetry_worker_batch_records";
pub const FLUSH_LATENCY: &str = "telemetry_worker_flush_seconds";
pub const RETRIES: &str = "telemetry_worker_retries_total";

pub fn consumed(records: usize) {
    metrics::counter!(RECORDS_CONSUMED).increment(records as u64);
}

pub fn flushed(batch_records: usize, written: u64, skipped: u64, took: Duration) {
    metrics::histogram!(BATCH_SIZE).record(batch_records as f64);
    metrics::histogram!(FLUSH_LATENCY).record(took.as_secs_f64());
    metrics::counter!(ROWS_WRITTEN).increment(written);
    metrics::counter!(ROWS_SKIPPED).increment(skipped);
}

pub fn dead_letter(reason: DeadLetterReason) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason.code()).increment(1);
}

pub fn retry(cause: &'static str) {
    metrics::counter!(RETRIES, "cause" => cause).increment(1);
}
