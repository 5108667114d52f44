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
    /// Key store commands (root key file, key versions).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Scheduler jobs: recent runs, run a job now.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Recent runs of every job (or of one), newest first.
    List {
        /// Only this job (purge, rotation, root-rotation, refresh).
        job: Option<String>,
        /// Runs shown.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Ask for a run now: records a trigger that the scheduler instance
    /// holding (or next taking) the job's lease runs at its next tick, and
    /// waits for that run to end. Needs a running scheduler role.
    Run {
        /// purge, rotation, root-rotation or refresh.
        job: String,
        /// Job parameters as a JSON object, e.g. '{"force": true}' for
        /// rotation (also: "activates_at" unix s, "activates_in_s").
        #[arg(long, default_value = "{}")]
        params: String,
        /// Seconds to wait for the run to end (0 = do not wait).
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create the root key file (mode 0600) if it does not exist, migrate,
    /// and create the first PMK and GLK versions.
    Init {
        /// Succeed quietly when the root key file already exists.
        #[arg(long)]
        if_missing: bool,
    },
    /// List key versions (never key material).
    Status,
    /// Root key rotation, offline: create a new root key file and re-seal
    /// every key row under it in one transaction. Then point
    /// keys.root_key_file at it. With the headend running, set
    /// keys.next_root_key_file instead and run `casd jobs run root-rotation`
    /// (the running Encryptor re-seals and switches without a restart).
    RotateRoot {
        /// Path of the new root key file (must not exist yet).
        #[arg(long)]
        new_key_file: PathBuf,
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
        Command::Keys { command } => keys_command(command, &cfg).await,
        Command::Jobs { command } => jobs_command(command, &cfg).await,
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

async fn keys_command(command: KeysCommand, cfg: &Config) -> anyhow::Result<()> {
    use hw::key_source::{FileKeySource, KeySource};
    let path = &cfg.keys.root_key_file;
    match command {
        KeysCommand::Init { if_missing } => {
            if path.exists() {
                if !if_missing {
                    anyhow::bail!("root key file {} already exists (keys.root_key_file); use --if-missing to accept it", path.display());
                }
            } else {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                FileKeySource::create_new(path).map_err(|e| anyhow::anyhow!("{e}"))?;
                println!(
                    "created root key file {} (mode 0600); back it up offline",
                    path.display()
                );
            }
            let db = crate::app::open_db(cfg).await?;
            db.migrate().await?;
            let ks = crate::app::open_keystore(cfg, &db).await?;
            println!("key store ready (root generation {})", ks.root_version());
            db.close().await;
            Ok(())
        }
        KeysCommand::Status => {
            let db = crate::app::open_db(cfg).await?;
            let mut c = db.conn().await?;
            use mysql_async::prelude::*;
            let rows: Vec<(String, u32, u32, String, String)> = c
                .query("SELECT kind, group_id, version, state, DATE_FORMAT(activates_at, '%Y-%m-%dT%H:%i:%SZ') FROM `keys` ORDER BY kind, group_id, version")
                .await?;
            println!(
                "{:<8} {:>8} {:>8} {:<9} activates_at",
                "kind", "group", "version", "state"
            );
            for (k, g, v, st, at) in rows {
                println!("{k:<8} {g:>8} {v:>8} {st:<9} {at}");
            }
            drop(c);
            db.close().await;
            Ok(())
        }
        KeysCommand::RotateRoot { new_key_file } => {
            let db = crate::app::open_db(cfg).await?;
            let ks = crate::app::open_keystore(cfg, &db).await?;
            let new =
                FileKeySource::create_new(&new_key_file).map_err(|e| anyhow::anyhow!("{e}"))?;
            let new_root = new.root_key().map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = ks
                .rewrap(
                    &crate::crypto::Key128::from_bytes(*new_root),
                    ks.root_version() + 1,
                )
                .await?;
            println!(
                "re-sealed {n} key rows under {}; set keys.root_key_file = \"{}\" and restart the encryptor; keep the old file until then",
                new_key_file.display(),
                new_key_file.display()
            );
            db.close().await;
            Ok(())
        }
    }
}

async fn jobs_command(command: JobsCommand, cfg: &Config) -> anyhow::Result<()> {
    use mysql_async::prelude::*;
    const JOBS: [&str; 4] = ["purge", "rotation", "root-rotation", "refresh"];
    let db = crate::app::open_db(cfg).await?;
    let mut c = db.conn().await?;
    let print = |r: &crate::scheduler::RunRecord| {
        let fmt = |us: i64| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default()
        };
        println!(
            "{:>8} {:<14} {:<9} fence {:<5} {} .. {}  {}  {}",
            r.id,
            r.job,
            r.outcome.as_deref().unwrap_or("running"),
            r.fence,
            fmt(r.started_us),
            r.ended_us.map(fmt).unwrap_or_else(|| "-".into()),
            r.holder,
            r.counts.as_ref().map(|c| c.to_string()).unwrap_or_default()
        );
    };
    match command {
        JobsCommand::List { job, limit } => {
            let runs = crate::scheduler::recent_runs(&mut c, job.as_deref(), limit).await?;
            if runs.is_empty() {
                println!("no runs recorded");
            }
            for r in &runs {
                print(r);
            }
        }
        JobsCommand::Run { job, params, wait } => {
            if !JOBS.contains(&job.as_str()) {
                anyhow::bail!("no job named `{job}` (one of {})", JOBS.join(", "));
            }
            let params: serde_json::Value = serde_json::from_str(&params)
                .ok()
                .filter(serde_json::Value::is_object)
                .ok_or_else(|| anyhow::anyhow!("--params must be a JSON object"))?;
            let who = format!("cli:{}", std::env::var("USER").unwrap_or_default());
            let id = crate::scheduler::trigger(&mut c, &job, &params, &who).await?;
            println!("trigger {id} recorded for job {job}");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
            if wait == 0 {
                return Ok(());
            }
            loop {
                let run: Option<Option<u64>> = c
                    .exec_first("SELECT run_id FROM job_triggers WHERE id = ?", (id,))
                    .await?;
                if let Some(Some(run_id)) = run {
                    let ended: Option<Option<String>> = c
                        .exec_first("SELECT outcome FROM job_runs WHERE id = ?", (run_id,))
                        .await?;
                    if let Some(Some(outcome)) = ended {
                        let runs = crate::scheduler::recent_runs(&mut c, Some(&job), 50).await?;
                        if let Some(r) = runs.iter().find(|r| r.id == run_id) {
                            print(r);
                        }
                        if outcome != "ok" {
                            anyhow::bail!("run {run_id} of {job} ended {outcome}");
                        }
                        break;
                    }
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "no run of {job} ended within {wait} s (is a scheduler role running?)"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    drop(c);
    db.close().await;
    Ok(())
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
