//! What every binary's `main` does the same way: report a failed run, and print the effective
//! configuration.

use std::fmt::Display;
use std::process::ExitCode;

use serde::Serialize;

/// The exit code for `result`. An error is printed to stderr as `{binary}: error: ...` with
/// its causes (`{:#}`), so a broken config at start-up names the field in one line.
pub fn exit_code<E: Display>(binary: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{binary}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration as `print-config` shows it: pretty TOML. Secrets serialize as `***`
/// ([`crate::config::Secret`]); redact URLs that may carry a password before calling this
/// ([`crate::config::redact_url`]).
pub fn config_toml<T: Serialize>(config: &T) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[derive(Serialize)]
    struct Example {
        url: String,
        password: Secret,
    }

    #[test]
    fn printed_config_hides_secrets() {
        let text = config_toml(&Example {
            url: "postgres://db/telemetry".into(),
            password: Secret::new("hunter2"),
        })
        .unwrap();
        assert!(text.contains("url = \"postgres://db/telemetry\""), "{text}");
        assert!(
            text.contains("password = \"***\"") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn success_and_failure_map_to_exit_codes() {
        assert_eq!(exit_code::<String>("x", Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit_code("x", Err("broken")), ExitCode::FAILURE);
    }
}
