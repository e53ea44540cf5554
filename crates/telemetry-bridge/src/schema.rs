//! JSON Schema checks for routes that name a schema file.
//!
//! A schema is compiled once at start-up (the `jsonschema` crate turns it into a tree of
//! validators, so a check never re-reads the schema) and each payload is parsed once. The cheap
//! `is_valid` pass runs first; only a payload that fails it pays for building the error that
//! names the failing location and keyword. `make bench-bridge` prints the cost per message.
//!
//! A schema is one self-contained file: `$ref`s within it (`#/$defs/...`) work, references to
//! other files or URLs are not fetched.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read the JSON Schema file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the JSON Schema file {path} is not JSON: {source}")]
    NotJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the JSON Schema file {path} is not a valid schema: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A compiled schema.
pub struct Schema {
    /// Shown in dead letters, so a reader knows which schema refused the message.
    name: String,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").field("name", &self.name).finish()
    }
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The payload is not JSON at all.
    NotJson(String),
    /// The payload is JSON but breaks the schema.
    Violation {
        /// JSON Pointer to the failing value in the payload (`""` for the whole payload).
        instance_path: String,
        /// The schema keyword that failed (`required`, `maximum`, `type`, ...).
        keyword: String,
        /// The schema's own words, e.g. `150 is greater than the maximum of 100`.
        message: String,
    },
}

impl Schema {
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        let text = std::fs::read(path).map_err(|source| SchemaError::Read {
            path: path.to_owned(),
            source,
        })?;
        let schema: Value =
            serde_json::from_slice(&text).map_err(|source| SchemaError::NotJson {
                path: path.to_owned(),
                source,
            })?;
        Self::compile(path.display().to_string(), &schema).map_err(|reason| SchemaError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Compiles a schema given as JSON; `name` says where it came from.
    pub fn compile(name: String, schema: &Value) -> Result<Schema, String> {
        let validator = jsonschema::options()
            // Formats (`date-time`, `email`, ...) are checked, not just annotations: a schema
            // author who writes one expects it to hold.
            .should_validate_formats(true)
            .build(schema)
            .map_err(|e| e.to_string())?;
        let name = Path::new(&name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or(name);
        Ok(Schema { name, validator })
    }

    /// The file name the schema came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks one payload.
    pub fn check(&self, payload: &[u8]) -> Result<(), Rejection> {
        let instance: Value =
            serde_json::from_slice(payload).map_err(|e| Rejection::NotJson(e.to_string()))?;
        if self.validator.is_valid(&instance) {
            return Ok(());
        }
        match self.validator.validate(&instance) {
            Ok(()) => Ok(()),
            Err(error) => {
                let keyword = error
                    .schema_path()
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                Err(Rejection::Violation {
                    instance_path: error.instance_path().as_str().to_owned(),
                    keyword,
                    message: error.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn thermometer() -> Schema {
        Schema::compile(
            "/etc/bridge/thermometer.json".into(),
            &json!({
                "type": "object",
                "required": ["temperature"],
                "properties": {
                    "temperature": {"type": "number", "minimum": -50, "maximum": 100},
                    "gps": {"$ref": "#/$defs/position"}
                },
                "$defs": {
                    "position": {
                        "type": "object",
                        "properties": {"lat": {"type": "number", "maximum": 90}}
                    }
                }
            }),
        )
        .unwrap()
    }

    fn violation(schema: &Schema, payload: &str) -> (String, String, String) {
        match schema.check(payload.as_bytes()) {
            Err(Rejection::Violation {
                instance_path,
                keyword,
                message,
            }) => (instance_path, keyword, message),
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn a_conforming_payload_passes() {
        let schema = thermometer();
        assert_eq!(schema.name(), "thermometer.json");
        assert_eq!(
            schema.check(br#"{"temperature": 21.5, "gps": {"lat": 52.3}}"#),
            Ok(())
        );
    }

    #[test]
    fn a_violation_names_the_failing_location_and_keyword() {
        let schema = thermometer();
        let (path, keyword, message) = violation(&schema, r#"{"temperature": 150}"#);
        assert_eq!(
            (path.as_str(), keyword.as_str()),
            ("/temperature", "maximum")
        );
        assert!(message.contains("150"), "{message}");
        let (path, keyword, _) = violation(&schema, r#"{"humidity": 3}"#);
        assert_eq!((path.as_str(), keyword.as_str()), ("", "required"));
        let (path, keyword, _) = violation(&schema, r#"{"temperature": 1, "gps": {"lat": 91}}"#);
        assert_eq!((path.as_str(), keyword.as_str()), ("/gps/lat", "maximum"));
    }

    #[test]
    fn a_payload_that_is_not_json_is_told_apart() {
        assert!(matches!(
            thermometer().check(b"not json"),
            Err(Rejection::NotJson(_))
        ));
    }

    #[test]
    fn an_invalid_schema_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, r#"{"type": "no-such-type"}"#).unwrap();
        let error = Schema::load(&path).unwrap_err().to_string();
        assert!(error.contains("bad.json"), "{error}");
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            Schema::load(&path),
            Err(SchemaError::NotJson { .. })
        ));
    }
}
