//! `telemetry-api`: the HTTP query API, its migrations and its tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use telemetry_api::{schema, store, tokens, ApiConfig};
use telemetry_core::config::{self, flag, Sources};
use telemetry_core::Shutdown;
use telemetry_core::{cli, observe};

/// Settings come from flags, then `TELEMETRY_API_*` environment variables (nested fields with
/// `__`, e.g. TELEMETRY_API_LIMITS__MAX_PAGE_SIZE), then the TOML file, then defaults.
#[derive(Debug, Parser)]
#[command(
    name = "telemetry-api",
    version,
    about = "Serve stored telemetry to the owners of devices, and take readings over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(long, global = true, env = "TELEMETRY_API_CONFIG")]
    config: Option<PathBuf>,
    /// Address the API listens on (listen).
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Kafka bootstrap servers (kafka.brokers).
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// Telemetry topic that HTTP ingest produces to (kafka.topic).
    #[arg(long, global = true)]
    topic: Option<String>,
    /// PostgreSQL URL for queries, normally PgBouncer's as the read-only role (postgres.url).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// PostgreSQL URL for migrations and token commands (postgres.admin_url).
    #[arg(long, global = true)]
    admin_database_url: Option<String>,
    /// Address of the /metrics, /healthz and /readyz server (http.listen).
    #[arg(long, global = true)]
    http_listen: Option<SocketAddr>,
    /// Do not apply migrations at start-up (migrate_on_start = false).
    #[arg(long, global = true)]
    no_migrate: bool,
    /// Log format: text or json (log_format).
    #[arg(long, global = true)]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve until SIGTERM or SIGINT (the default).
    Run,
    /// Apply the API's migrations and grants, and exit.
    Migrate,
    /// Create or revoke API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the effective configuration as TOML and exit.
    PrintConfig,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token for a user and print it once on stdout; only its hash is stored.
    Create {
        /// The user whose devices the token may read.
        #[arg(long)]
        user: String,
        /// A note on who or what uses the token.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Delete a token by the id that `token create` reported.
    Revoke {
        #[arg(long)]
        id: i64,
    },
}

fn main() -> ExitCode {
    cli::exit_code("telemetry-api", run(Cli::parse()))
}

fn load_config(cli: &Cli) -> Result<ApiConfig, config::ConfigError> {
    config::load(Sources {
        file: cli.config.as_deref(),
        env_prefix: "TELEMETRY_API_",
        overrides: vec![
            ("listen", flag(cli.listen.map(|a| a.to_string()))),
            ("kafka.brokers", flag(cli.brokers.clone())),
            ("kafka.topic", flag(cli.topic.clone())),
            ("postgres.url", flag(cli.database_url.clone())),
            ("postgres.admin_url", flag(cli.admin_database_url.clone())),
            ("http.listen", flag(cli.http_listen.map(|a| a.to_string()))),
            ("migrate_on_start", flag(cli.no_migrate.then_some(false))),
            ("log_format", flag(cli.log_format.clone())),
        ],
    })
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli)?;
    observe::init_logging(config.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => telemetry_api::run(config, Shutdown::on_signals()).await?,
        Command::Migrate => {
            let mut client = admin_client(&config).await?;
            let migrated = schema::migrate(&mut client, &config.postgres.reader_role).await?;
            println!("applied API migrations: {:?}", migrated.applied);
            if !config.postgres.reader_role.is_empty() {
                println!(
                    "role {} may read: {:?}",
                    config.postgres.reader_role, migrated.granted
                );
            }
        }
        Command::Token(TokenCommand::Create { user, label }) => {
            let mut client = admin_client(&config).await?;
            schema::migrate(&mut client, &config.postgres.reader_role).await?;
            let created = tokens::create(&client, &user, &label).await?;
            eprintln!(
                "created token {} for user '{}'; it is shown only now, keep it secret",
                created.id, created.user
            );
            println!("{}", created.token);
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let client = admin_client(&config).await?;
            if !tokens::revoke(&client, id).await? {
                anyhow::bail!("no token has id {id}");
            }
            eprintln!(
                "revoked token {id}; replicas that cached it accept it for up to {} s more",
                config.auth.token_cache_seconds
            );
        }
        Command::PrintConfig => {
            // The URLs' passwords serialize as "***": what is printed may end up in a ticket or
            // a log.
            print!(
                "{}",
                toml::to_string_pretty(&config).context("cannot print the config")?
            );
        }
    }
    Ok(())
}

async fn admin_client(config: &ApiConfig) -> anyhow::Result<deadpool_postgres::Object> {
    let url = config.postgres.admin_url();
    let pool = store::create_pool(url, 1)?;
    pool.get().await.with_context(|| {
        format!(
            "cannot connect to the database at {}",
            config::redact_url(url)
        )
    })
}
