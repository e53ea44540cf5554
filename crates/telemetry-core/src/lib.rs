//! What every Telemetry Pipeline stage shares.
//!
//! - [`contract`]: the wire contract between devices, the bridge and the worker (MQTT topics,
//!   Kafka topic, key, headers, payload rules, dead-letter reasons). `docs/contract.md` is its
//!   prose twin; the two change together.
//! - [`config`]: layered configuration (flags > environment > TOML file > defaults) that rejects
//!   unknown fields and names the field when a value is wrong.
//! - [`kafka`]: broker settings and the durable producer every stage uses.
//! - `migrations` (feature `postgres`): embedded SQL migrations under an advisory lock.
//! - [`backoff`]: capped, jittered retry delays for outages.
//! - [`shutdown`]: one shutdown signal that every long-lived task watches.
//! - [`cli`]: what every binary's `main` shares (the exit code and error line).
//! - [`observe`]: logging set-up, the Prometheus recorder and the `/metrics`, `/healthz` and
//!   `/readyz` server.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod contract;
pub mod kafka;
#[cfg(feature = "postgres")]
pub mod migrations;
pub mod observe;
pub mod shutdown;

pub use shutdown::Shutdown;
