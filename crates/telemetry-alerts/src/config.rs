//! All alert settings in one section, for the worker's config file (`[alerts]`).

use serde::{Deserialize, Serialize};
use telemetry_core::config::{ConfigError, Validate};

use crate::outbox::OutboxConfig;
use crate::watch::RulesConfig;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `[alerts.rules]`: the rules file and how often it is checked for changes.
    pub rules: RulesConfig,
    /// `[alerts.outbox]`: the MQTT broker alerts are published to, and the publisher's pace.
    pub outbox: OutboxConfig,
}

impl Validate for AlertsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.rules.validate()?;
        self.outbox.validate()
    }
}
