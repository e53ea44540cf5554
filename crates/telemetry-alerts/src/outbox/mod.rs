//! The `alerts` table as an outbox, and the publisher that empties it over MQTT.
//!
//! - [`store`]: functions the worker calls inside its batch transaction: insert a batch's alert
//!   events, load and save per-device rule state.
//! - [`publish`]: [`Outbox`], which publishes unpublished rows with QoS 1 in order per device
//!   and marks them published once the broker acknowledged them (the guarantee is stated
//!   there).
//! - [`config`]: the publisher's settings.
//!
//! Writing alerts in the batch's transaction and publishing them afterwards means an alert
//! exists exactly when its reading is stored, and a broker outage delays alerts instead of
//! losing them or stalling ingestion.

pub mod config;
pub mod publish;
pub mod store;

pub use config::{MqttConfig, OutboxConfig};
pub use publish::{Outbox, OutboxWaker};
pub use store::{insert_events, load_states, save_states};

/// The `alerts` and `alert_state` tables; the worker applies it as one of its migrations.
pub const SCHEMA_SQL: &str = include_str!("../../sql/alerts.sql");
