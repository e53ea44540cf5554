//! The `alerts` table as an outbox, and the publisher that empties it over MQTT.
//!
//! - [`store`]: functions the worker calls inside its batch transaction: evaluate a batch
//!   ([`evaluate_batch`]), which locks, loads and saves per-device rule state and inserts the
//!   batch's alert events.
//! - [`publish`]: [`Outbox`], which publishes unpublished rows with QoS 2 in order per device
//!   and marks them published once the broker confirmed them; exactly once, even across a
//!   crash (the guarantee and its conditions are stated there).
//! - [`session`]: the small MQTT client that lets the outbox choose packet ids and the moment
//!   of release.
//! - [`config`]: the publisher's settings.
//!
//! Writing alerts in the batch's transaction and publishing them afterwards means an alert
//! exists exactly when its reading is stored, and a broker outage delays alerts instead of
//! losing them or stalling ingestion.

pub mod config;
pub mod publish;
pub mod session;
pub mod store;

pub use config::{MqttConfig, OutboxConfig};
pub use publish::{packet_id, Outbox, OutboxWaker};
pub use store::{evaluate_batch, insert_events, load_states, save_states};

/// The `alerts` and `alert_state` tables; the worker applies it as one of its migrations.
pub const SCHEMA_SQL: &str = include_str!("../../sql/alerts.sql");

/// `alerts.released_at`, which exactly-once publishing needs; applied after [`SCHEMA_SQL`].
pub const RELEASE_SQL: &str = include_str!("../../sql/alerts_release.sql");
