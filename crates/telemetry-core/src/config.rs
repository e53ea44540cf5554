//! Layered configuration: command-line flags > environment > TOML file > defaults.
//!
//! Each stage describes its config as a serde struct with `deny_unknown_fields`, so a typo in
//! the file or the environment stops start-up instead of being silently ignored. Errors name the
//! field (`kafka.brokers`), where the bad value came from, and what is allowed.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist; pass an existing file or leave the option out")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Load(Box<figment::Error>),
    #[error("invalid configuration: field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl ConfigError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// Cross-field and range checks that serde cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Where a stage's settings come from, lowest precedence first.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    /// Optional TOML file.
    pub file: Option<&'a Path>,
    /// Environment prefix, e.g. `TELEMETRY_WORKER_`; nested fields use `__`
    /// (`TELEMETRY_WORKER_KAFKA__BROKERS`).
    pub env_prefix: &'a str,
    /// Settings given as flags, as dotted keys (`kafka.brokers`); `None` values are skipped.
    pub overrides: Vec<(&'static str, Option<figment::value::Value>)>,
}

/// Environment variables under the prefix that are not config fields: the config file path
/// itself is read by the flag parser.
const ENV_NOT_FIELDS: &[&str] = &["config"];

/// Loads and validates a config. `T::default()` supplies the defaults.
pub fn load<T>(sources: Sources<'_>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = sources.file {
        if !file.exists() {
            return Err(ConfigError::MissingFile(file.to_owned()));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(
        Env::prefixed(sources.env_prefix)
            .split("__")
            .ignore(ENV_NOT_FIELDS),
    );
    for (key, value) in sources.overrides {
        if let Some(value) = value {
            figment = figment.merge(Serialized::default(key, value));
        }
    }
    let config: T = figment
        .extract()
        .map_err(|e| ConfigError::Load(Box::new(e)))?;
    config.validate()?;
    Ok(config)
}

/// Turns a flag's value into an override, `None` when the flag was not given.
pub fn flag<V: Serialize>(value: Option<V>) -> Option<figment::value::Value> {
    value.and_then(|v| figment::value::Value::serialize(v).ok())
}

/// A password, passphrase or token from the configuration.
///
/// It shows as `***` wherever it could be printed (`Debug`, `Display` and `Serialize`, so
/// `print-config` and log lines too); [`Secret::expose`] is the only way to read it, at the one
/// place that hands it to a client library.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the client library that needs it. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What every printed form of a secret shows.
pub const REDACTED: &str = "***";

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Reads a secret kept in a file (a Kubernetes or Docker secret, a file only the service user
/// may read). One trailing newline is dropped, as `echo` and most editors add one. Errors name
/// the setting and the path, never the content.
pub fn read_secret_file(field: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::invalid(
            field,
            format!(
                "cannot read the secret file {}: {error}; check the path and that this user may read it",
                path.display()
            ),
        )
    })?;
    let value = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(ConfigError::invalid(
            field,
            format!("the secret file {} is empty", path.display()),
        ));
    }
    Ok(Secret::new(value))
}

/// The secret given either inline (`inline_field`, best from the environment) or in a file
/// (`file_field`); both at once is a mistake worth stopping for, since one would silently win.
pub fn resolve_secret(
    inline_field: &'static str,
    inline: Option<&Secret>,
    file_field: &'static str,
    file: Option<&Path>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            file_field,
            format!("set either `{inline_field}` or `{file_field}`, not both"),
        )),
        (Some(secret), None) => Ok(Some(secret.clone())),
        (None, Some(path)) => read_secret_file(file_field, path).map(Some),
        (None, None) => Ok(None),
    }
}

/// For `#[serde(serialize_with = ...)]` on a connection URL in a config: serializes it with
/// its password hidden, so `print-config` never shows it, whichever binary prints.
pub fn serialize_redacted_url<S: serde::Serializer>(
    url: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

/// Hides the password in a `scheme://user:password@host/...` URL before it is printed.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let Some(at) = url.rfind('@').filter(|&at| at > scheme_end) else {
        return url.to_owned();
    };
    match url[scheme_end..at].split_once(':') {
        Some((user, _password)) => format!("{}{user}:***{}", &url[..scheme_end], &url[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
// figment's `Jail` fixes its closures' error type to `figment::Error`, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        size: u32,
        mode: Mode,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq, Clone, Copy)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Safe,
    }

    impl Default for Example {
        fn default() -> Self {
            Example {
                name: "default".into(),
                inner: Inner::default(),
            }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Inner {
                size: 1,
                mode: Mode::Safe,
            }
        }
    }

    impl Validate for Example {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.inner.size == 0 {
                return Err(ConfigError::invalid("inner.size", "must be at least 1"));
            }
            Ok(())
        }
    }

    fn load_with(
        file: &str,
        prefix: &str,
        overrides: Vec<(&'static str, Option<figment::value::Value>)>,
    ) -> Result<Example, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        load(Sources {
            file: Some(&path),
            env_prefix: prefix,
            overrides,
        })
    }

    #[test]
    fn flags_beat_env_which_beats_file_which_beats_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CFGTEST_A_INNER__SIZE", "7");
            jail.set_env("CFGTEST_A_NAME", "from-env");
            let c = load_with(
                "name = 'from-file'\n[inner]\nsize = 3\nmode = 'fast'\n",
                "CFGTEST_A_",
                vec![
                    ("name", flag(Some("from-flag"))),
                    ("inner.size", flag(None::<u32>)),
                ],
            )
            .unwrap();
            assert_eq!(c.name, "from-flag");
            assert_eq!(c.inner.size, 7);
            assert_eq!(c.inner.mode, Mode::Fast);
            Ok(())
        });
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = load_with("", "CFGTEST_B_", vec![]).unwrap();
        assert_eq!(c, Example::default());
    }

    #[test]
    fn an_unknown_field_is_named() {
        let e = load_with("[inner]\nsise = 3\n", "CFGTEST_C_", vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sise"), "{e}");
    }

    #[test]
    fn a_wrong_enum_value_lists_the_allowed_values_and_names_the_field() {
        let e = load_with("[inner]\nmode = 'turbo'\n", "CFGTEST_D_", vec![])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("turbo") && e.contains("fast") && e.contains("safe"),
            "{e}"
        );
        assert!(e.contains("inner.mode"), "{e}");
    }

    #[test]
    fn a_wrong_type_from_the_environment_names_the_field_and_the_prefix() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CFGTEST_E_INNER__SIZE", "lots");
            let e = load_with("", "CFGTEST_E_", vec![]).unwrap_err().to_string();
            // figment reports environment keys upper-cased, with the prefix.
            assert!(
                e.to_lowercase().contains("inner.size") && e.contains("CFGTEST_E_"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn validation_failures_name_the_field() {
        let e = load_with("[inner]\nsize = 0\n", "CFGTEST_F_", vec![])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid configuration: field `inner.size`: must be at least 1"
        );
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://me:secret@db:5432/x"),
            "postgres://me:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://me@db/x"), "postgres://me@db/x");
        assert_eq!(redact_url("db:5432"), "db:5432");
    }

    #[test]
    fn a_url_field_serializes_without_its_password() {
        #[derive(Serialize)]
        struct Database {
            #[serde(serialize_with = "serialize_redacted_url")]
            url: String,
        }
        let shown = serde_json::to_string(&Database {
            url: "postgres://me:secret@db/x".into(),
        })
        .unwrap();
        assert_eq!(shown, r#"{"url":"postgres://me:***@db/x"}"#);
    }

    #[test]
    fn a_secret_never_prints_and_a_secret_file_loses_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "hunter2\n").unwrap();
        let secret = read_secret_file("mqtt.password_file", &path).unwrap();
        assert_eq!(secret.expose(), "hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
        #[derive(Serialize)]
        struct Shown {
            password: Secret,
        }
        let shown = serde_json::to_string(&Shown { password: secret }).unwrap();
        assert_eq!(shown, r#"{"password":"***"}"#);
    }

    #[test]
    fn a_secret_given_twice_or_in_a_missing_file_names_the_setting() {
        let inline = Secret::new("x");
        let both = resolve_secret(
            "a.password",
            Some(&inline),
            "a.password_file",
            Some(Path::new("/p")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            both.contains("a.password_file") && both.contains("not both"),
            "{both}"
        );
        let missing = resolve_secret(
            "a.password",
            None,
            "a.password_file",
            Some(Path::new("/nonexistent/p")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            missing.contains("/nonexistent/p") && missing.contains("a.password_file"),
            "{missing}"
        );
        assert_eq!(
            resolve_secret("a.password", None, "a.password_file", None).unwrap(),
            None
        );
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let e = load::<Example>(Sources {
            file: Some(Path::new("/nonexistent/x.toml")),
            env_prefix: "CFGTEST_G_",
            overrides: vec![],
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::MissingFile(_)));
    }
}
