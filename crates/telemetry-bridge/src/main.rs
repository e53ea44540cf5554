//! `telemetry-bridge`: move device telemetry from MQTT into Kafka.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use telemetry_bridge::BridgeConfig;
use telemetry_core::config::{self, flag, Sources};
use telemetry_core::Shutdown;
use telemetry_core::{cli, observe};

/// Settings come from flags, then `TELEMETRY_BRIDGE_*` environment variables (nested fields with
/// `__`, e.g. TELEMETRY_BRIDGE_MQTT__PASSWORD), then the TOML file, then defaults.
#[derive(Debug, Parser)]
#[command(
    name = "telemetry-bridge",
    version,
    about = "Move device telemetry from MQTT into Kafka, losing nothing"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(long, global = true, env = "TELEMETRY_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT broker host (mqtt.host).
    #[arg(long, global = true)]
    mqtt_host: Option<String>,
    /// MQTT broker port (mqtt.port).
    #[arg(long, global = true)]
    mqtt_port: Option<u16>,
    /// Stable MQTT client id (mqtt.client_id).
    #[arg(long, global = true)]
    client_id: Option<String>,
    /// Shared-subscription group for several bridge replicas (mqtt.shared_group).
    #[arg(long, global = true)]
    shared_group: Option<String>,
    /// Kafka bootstrap servers (kafka.brokers).
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// Telemetry topic (kafka.topic).
    #[arg(long, global = true)]
    topic: Option<String>,
    /// Dead-letter topic (kafka.dlq_topic).
    #[arg(long, global = true)]
    dlq_topic: Option<String>,
    /// Address of the /metrics, /healthz and /readyz server (http.listen).
    #[arg(long, global = true)]
    http_listen: Option<SocketAddr>,
    /// Log format: text or json (log_format).
    #[arg(long, global = true)]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bridge until SIGTERM or SIGINT (the default).
    Run,
    /// Print the effective configuration as TOML (secrets shown as ***) and exit.
    PrintConfig,
}

fn main() -> ExitCode {
    cli::exit_code("telemetry-bridge", run(Cli::parse()))
}

fn load_config(cli: &Cli) -> Result<BridgeConfig, config::ConfigError> {
    config::load(Sources {
        file: cli.config.as_deref(),
        env_prefix: "TELEMETRY_BRIDGE_",
        overrides: vec![
            ("mqtt.host", flag(cli.mqtt_host.clone())),
            ("mqtt.port", flag(cli.mqtt_port)),
            ("mqtt.client_id", flag(cli.client_id.clone())),
            ("mqtt.shared_group", flag(cli.shared_group.clone())),
            ("kafka.brokers", flag(cli.brokers.clone())),
            ("kafka.topic", flag(cli.topic.clone())),
            ("kafka.dlq_topic", flag(cli.dlq_topic.clone())),
            ("http.listen", flag(cli.http_listen.map(|a| a.to_string()))),
            ("log_format", flag(cli.log_format.clone())),
        ],
    })
}

// One thread for the forwarder and the acknowledger, which work in step, so a second worker
// thread bought no parallelism, only a cross-thread wake-up per message between them
// (docs/performance.md, "Bridge"). The MQTT session's event loop runs on a thread of its own
// (see telemetry_bridge::session), so that it is never starved by them.
#[tokio::main(flavor = "current_thread")]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli)?;
    observe::init_logging(config.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => telemetry_bridge::run(config, Shutdown::on_signals()).await?,
        Command::PrintConfig => {
            // Secrets serialize as "***" (see telemetry_core::config::Secret and
            // KafkaConfig::properties), so the printed config is safe to share.
            print!(
                "{}",
                toml::to_string_pretty(&config).context("cannot print the config")?
            );
        }
    }
    Ok(())
}
