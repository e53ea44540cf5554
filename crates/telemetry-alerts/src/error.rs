//! The crate's one error type, a variant per place that can fail.

use std::path::PathBuf;

use telemetry_core::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// A rule breaks a rule of the rules file; names the rule, the field and what is allowed.
    #[error("rule '{rule}': field '{field}' {message}")]
    InvalidRule {
        rule: String,
        field: &'static str,
        message: String,
    },
    /// The rules file is not TOML, or a field has the wrong type or name. toml's message carries
    /// the line, the column and the offending key.
    #[error("rules are not valid: {0}")]
    RulesSyntax(#[source] Box<toml::de::Error>),
    #[error("cannot read the rules file {path}: {source}; check the `alerts.rules.path` setting")]
    ReadRules {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Any rules error, with the file it came from.
    #[error("rules file {path}: {source}")]
    RulesFile {
        path: PathBuf,
        #[source]
        source: Box<AlertError>,
    },
    #[error("stored alert state is not valid (it was written by an incompatible version?): {0}")]
    InvalidState(#[source] serde_json::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error while {step}: {source}")]
    Postgres {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("MQTT publish failed: {0}")]
    Mqtt(String),
}

impl AlertError {
    pub(crate) fn invalid_rule(
        rule: &str,
        field: &'static str,
        message: impl Into<String>,
    ) -> AlertError {
        AlertError::InvalidRule {
            rule: rule.to_owned(),
            field,
            message: message.into(),
        }
    }
}

/// Wraps a `tokio_postgres` error with the step that failed.
pub(crate) fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> AlertError {
    move |source| AlertError::Postgres { step, source }
}
