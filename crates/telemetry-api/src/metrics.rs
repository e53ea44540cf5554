//! Every metric the API exports, named in one place. Labels stay low-cardinality: the route
//! template (`/v1/devices/{user}/{device}/latest`), a status code, an outcome; never a user or a
//! device.

use std::time::Duration;

pub const REQUESTS: &str = "telemetry_api_requests_total";
pub const REQUEST_LATENCY: &str = "telemetry_api_request_seconds";
pub const AUTH_FAILURES: &str = "telemetry_api_auth_failures_total";
pub const TOKEN_CACHE: &str = "telemetry_api_token_cache_total";
pub const INGESTED: &str = "telemetry_api_ingest_total";

pub fn request(route: &str, status: u16, took: Duration) {
    let route = route.to_owned();
    metrics::histogram!(REQUEST_LATENCY, "route" => route.clone()).record(took.as_secs_f64());
    metrics::counter!(REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
}

/// `reason`: `missing` (no bearer token), `unknown` (not a stored token), `forbidden` (another
/// user's path).
pub fn auth_failure(reason: &'static str) {
    metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

pub fn token_cache(hit: bool) {
    metrics::counter!(TOKEN_CACHE, "result" => if hit { "hit" } else { "miss" }).increment(1);
}

/// `outcome`: `accepted` (Kafka confirmed), `invalid` (the payload breaks the contract),
/// `failed` (Kafka did not confirm in time).
pub fn ingested(outcome: &'static str) {
    metrics::counter!(INGESTED, "outcome" => outcome).increment(1);
}
