//! The `casd` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role};

#[derive(Parser, Debug)]
#[command(
    name = "casd",
    version,
    about = "casd — open conditional-access headend: SMS-CAS interface, EMMG, Encryptor, Cycler, Scheduler",
    long_about = "casd — open conditional-access headend.\n\n\
        One binary runs every role in one process (the appliance) or a chosen subset per process.\n\
        Start with `casd --config casd.toml config check`, then `casd keys init`, then `casd run`.\n\
        Every configuration key can be overridden with CASD_SECTION__KEY environment variables."
)]
pub struct Cli {
    /// Configuration file (TOML; see casd.example.toml).
    #[arg(
        long,
        short,
        global = true,
        env = "CASD_CONFIG",
        default_value = "/etc/casd/casd.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the headend: every role in `roles`, or those given with --roles.
    Run {
        /// Comma-separated roles: sms, emmg, encryptor, cycler, scheduler.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<Role>>,
        /// Override api.listen.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Parse and validate the configuration; print a summary (no secrets).
    Check,
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("casd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let _guard = init_logging(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("casd: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = rt.block_on(dispatch(cli.command, cfg));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // One line on stderr, no backtrace, even when logs go to a file.
            eprintln!("casd: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command, cfg: Config) -> anyhow::Result<()> {
    match command {
        Command::Run { roles, listen } => {
            let mut cfg = cfg;
            if let Some(l) = listen {
                cfg.api.listen = l;
            }
            let mut roles = roles.unwrap_or_else(|| cfg.roles.clone());
            roles.sort();
            roles.dedup();
            let listener = tokio::net::TcpListener::bind(cfg.api.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot listen on {} (api.listen): {e}", cfg.api.listen)
                })?;
            let shutdown = CancellationToken::new();
            crate::shutdown::on_signals(shutdown.clone())?;
            crate::app::run(cfg, roles, listener, shutdown).await
        }
        Command::Migrate => {
            let db = crate::app::open_db(&cfg).await?;
            let applied = db.migrate().await?;
            if applied.is_empty() {
                println!("database {} is up to date", db.display());
            } else {
                println!("applied migrations {applied:?} to {}", db.display());
            }
            db.close().await;
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            println!("configuration OK");
            println!(
                "  roles: {}",
                cfg.roles
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            println!("  database: {}", cfg.database_display());
            println!(
                "  api: {} ({})",
                cfg.api.listen,
                if cfg.api.tls_cert.is_some() {
                    "https"
                } else {
                    "plain http"
                }
            );
            for o in &cfg.cycler.outputs {
                println!(
                    "  output {}: udp://{} pid 0x{:04X} {} bit/s",
                    o.name, o.destination, o.pid, o.bitrate
                );
            }
            Ok(())
        }
    }
}

/// stderr logging through a non-blocking writer; the guard flushes on drop
/// (at exit, after the roles have drained).
fn init_logging(cfg: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = std::env::var("CASD_LOG").unwrap_or_else(|_| cfg.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if cfg.log.format == "json" {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
    guard
}
