//! `load-tester`: see `load-tester --help` and the crate README.

use std::process::ExitCode;

use clap::Parser;
use load_tester::config::{Args, Config};
use telemetry_core::Shutdown;

/// Exit code for unusable flags, the same one clap uses for the errors it finds itself.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}\n\nFor more information, try '--help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(async {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        load_tester::run(&config, &shutdown).await
    })?;
    if config.json {
        // stdout carries only the JSON line, so it can be piped straight into jq.
        eprint!("{report}");
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(ExitCode::from(report.exit_code()))
}
