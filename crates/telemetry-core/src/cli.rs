//! What every binary's `main` does the same way: report a failed run.

use std::fmt::Display;
use std::process::ExitCode;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_and_failure_map_to_exit_codes() {
        assert_eq!(exit_code::<String>("x", Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit_code("x", Err("broken")), ExitCode::FAILURE);
    }
}
