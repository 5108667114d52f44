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
    /// Devices: bulk import of a subscriber base.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
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
    /// Carousel planning: cycle time per class at each output's bitrate, and
    /// the air time an import or a key rotation will take (docs/operations.md).
    Plan(PlanArgs),
    /// OAuth clients (who may ask for access tokens): create, list, rotate-secret, disable, enable.
    Clients {
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// Token signing keys: init-key, rotate-signing-key, keys, retire-key.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// The database's replication group (database.servers).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Failover: promote the most advanced replica of database.servers to
    /// primary and re-point the other replicas at it (docs/operations.md).
    /// Refuses while a member is writable. Runs as a MariaDB administrator
    /// (the casd user cannot change read_only).
    Promote {
        /// MariaDB user with REPLICATION SLAVE ADMIN and READ_ONLY ADMIN.
        #[arg(long)]
        admin_user: String,
        /// File holding that user's password (one line).
        #[arg(long)]
        admin_password_file: PathBuf,
        /// Seconds the replica may take to apply what it received.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
    },
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Devices of an import to plan for.
    #[arg(long, default_value_t = 0)]
    import: u64,
    /// Entitlements per imported device.
    #[arg(long, default_value_t = 1)]
    products: u32,
    /// Devices to plan a rotation for (default: the enabled devices now).
    #[arg(long)]
    devices: Option<u64>,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
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
pub enum ClientsCommand {
    /// Register a client; prints its secret once (only a hash is kept).
    Create {
        #[arg(long)]
        id: String,
        /// Comma-separated: sms:write, sms:read, emm:generate, encrypt, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<crate::auth::Scope>,
        /// Requests per second (default auth.default_rate_per_s).
        #[arg(long)]
        rate: Option<u32>,
    },
    /// List clients (never their secrets).
    List,
    /// Replace a client's secret; prints the new one once. The old secret
    /// stops working at once; tokens already issued run until they expire.
    RotateSecret {
        #[arg(long)]
        id: String,
    },
    /// Disable a client: no new tokens, and its tokens stop working at
    /// their next check (within auth.client_cache_ms).
    Disable {
        #[arg(long)]
        id: String,
    },
    /// Enable a disabled client.
    Enable {
        #[arg(long)]
        id: String,
    },
    /// Change a client's scopes and/or rate.
    Update {
        #[arg(long)]
        id: String,
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<crate::auth::Scope>>,
        #[arg(long)]
        rate: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Create the token signing key file (auth.signing_key_file) if missing
    /// and publish its public key.
    InitKey,
    /// New signing key; the previous one keeps verifying for one token
    /// lifetime (plus leeway), then retires.
    RotateSigningKey,
    /// List the published verification keys.
    Keys,
    /// Stop a key from verifying anything (compromised key): now, or after --in-s seconds.
    RetireKey {
        #[arg(long)]
        kid: String,
        #[arg(long, default_value_t = 0)]
        in_s: u64,
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
    /// Personalization file for a card vendor (docs/format.md §9): each
    /// device's DUK wrapped (AES-KW) under the transport key agreed with
    /// the vendor, never in clear. Needs the root key file; every export is
    /// recorded in `duk_exports` and the log (`casd keys exports` lists them).
    Export {
        /// Devices as ids and ranges: 1-1000,5000,7000-7010.
        #[arg(long, required_unless_present = "device_file")]
        devices: Option<crate::export::DeviceSet>,
        /// A file of device ids and ranges, one or more per line.
        #[arg(long, conflicts_with = "devices")]
        device_file: Option<PathBuf>,
        /// Transport key file (root key file format); default keys.transport_key_file.
        #[arg(long)]
        transport_key: Option<PathBuf>,
        /// Output file (must not exist yet; written mode 0600).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Recorded personalization exports, newest first (no key material).
    Exports {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// Import devices (and their entitlements) from a CSV or JSON-lines
    /// file: `device_id[,product_id,start,end]*` or `{"device_id": 7,
    /// "entitlements": [{"product_id": 3, "start": …, "end": …}]}`.
    /// Idempotent and resumable: a rerun stores only what is missing. Bad
    /// lines are reported with their number and skipped. The EMMs follow at
    /// emmg.bulk_bandwidth_share of the output, in the background class.
    Import {
        file: PathBuf,
        /// Lines per transaction round.
        #[arg(long, default_value_t = 500)]
        batch: usize,
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
        Command::Clients { command } => clients_command(command, &cfg).await,
        Command::Auth { command } => auth_command(command, &cfg).await,
        Command::Keys { command } => keys_command(command, &cfg).await,
        Command::Jobs { command } => jobs_command(command, &cfg).await,
        Command::Plan(args) => plan_command(args, &cfg).await,
        Command::Db { command } => db_command(command, &cfg).await,
        Command::Devices {
            command: DevicesCommand::Import { file, batch },
        } => import_command(&cfg, &file, batch).await,
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            print_config_summary(&cfg);
            Ok(())
        }
    }
}

/// `casd config check`'s summary (no secrets).
fn print_config_summary(cfg: &Config) {
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
    if !cfg.database.servers.is_empty() {
        println!(
            "  replication group: {} (writes to the member with read_only OFF)",
            cfg.database.servers.join(", ")
        );
    }
    println!(
        "  api: {} ({})",
        cfg.api.listen,
        if cfg.api.tls_cert.is_some() {
            "https"
        } else {
            "plain http"
        }
    );
    println!(
        "  auth: issuer {}, audience {}, tokens {} s, {}",
        cfg.auth.issuer,
        cfg.auth.audience,
        cfg.auth.token_lifetime_s,
        if cfg.auth.token_endpoint {
            format!("issues tokens with {}", cfg.auth.signing_key_file.display())
        } else {
            "verifies only".to_owned()
        }
    );
    for o in &cfg.cycler.outputs {
        println!(
            "  output {}: udp://{} pid 0x{:04X} {} bit/s",
            o.name, o.destination, o.pid, o.bitrate
        );
    }
}

async fn db_command(command: DbCommand, cfg: &Config) -> anyhow::Result<()> {
    match command {
        DbCommand::Promote {
            admin_user,
            admin_password_file,
            wait_s,
        } => {
            let password = std::fs::read_to_string(&admin_password_file).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (--admin-password-file)",
                    admin_password_file.display()
                )
            })?;
            let done = crate::db::promote::promote(
                &cfg.database.servers,
                &crate::db::DbTls::from_config(&cfg.database),
                &admin_user,
                password.trim_end_matches(['\r', '\n']),
                std::time::Duration::from_secs(wait_s),
            )
            .await?;
            for line in done {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// `casd plan`: reads the live carousel's counts and prints the plan.
async fn plan_command(args: PlanArgs, cfg: &Config) -> anyhow::Result<()> {
    let ask = crate::plan::Ask {
        import_devices: args.import,
        products: args.products,
        rotation_devices: args.devices,
    };
    let db = crate::app::open_db(cfg).await?;
    let mut c = db.conn().await?;
    let live = crate::plan::read_live(&mut c).await?;
    drop(c);
    db.close().await;
    let plans = crate::plan::plan(cfg, &live, ask);
    if args.json {
        let v = serde_json::json!({"live": live, "outputs": plans});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", crate::plan::render(&plans, &live));
    }
    Ok(())
}

async fn clients_command(command: ClientsCommand, cfg: &Config) -> anyhow::Result<()> {
    use crate::auth::clients::{self, HashCost};
    use crate::auth::Scope;
    let db = crate::app::open_db(cfg).await?;
    let result = async {
        match command {
            ClientsCommand::Create { id, scopes, rate } => {
                let rate = rate.unwrap_or(cfg.auth.default_rate_per_s);
                let secret = clients::create(&db, &id, &scopes, rate, HashCost::Standard).await?;
                let mut scopes = scopes;
                scopes.sort();
                scopes.dedup();
                eprintln!(
                    "client `{id}` created: scopes {}, {rate} requests/s. Its secret is shown \
                     this once; only its hash is stored.",
                    Scope::join(&scopes)
                );
                println!("client_id={id}");
                println!("client_secret={}", secret.expose());
            }
            ClientsCommand::List => {
                println!(
                    "{:<24} {:<8} {:>7}  {:<20}  {:<20}  scopes",
                    "client_id", "state", "rate/s", "created", "updated"
                );
                for c in clients::list(&db).await? {
                    println!(
                        "{:<24} {:<8} {:>7}  {:<20}  {:<20}  {}",
                        c.client_id,
                        if c.enabled { "enabled" } else { "disabled" },
                        c.rate_per_s,
                        c.created_at,
                        c.updated_at,
                        Scope::join(&c.scopes)
                    );
                }
            }
            ClientsCommand::RotateSecret { id } => {
                let secret = clients::rotate_secret(&db, &id, HashCost::Standard).await?;
                eprintln!(
                    "client `{id}` has a new secret, shown this once; the old one no longer works."
                );
                println!("client_id={id}");
                println!("client_secret={}", secret.expose());
            }
            ClientsCommand::Disable { id } => {
                clients::set_enabled(&db, &id, false).await?;
                println!(
                    "client `{id}` disabled; its tokens stop working within {} ms",
                    cfg.auth.client_cache_ms
                );
            }
            ClientsCommand::Enable { id } => {
                clients::set_enabled(&db, &id, true).await?;
                println!("client `{id}` enabled");
            }
            ClientsCommand::Update { id, scopes, rate } => {
                if scopes.is_none() && rate.is_none() {
                    anyhow::bail!("nothing to update: give --scopes and/or --rate");
                }
                if let Some(s) = scopes {
                    clients::set_scopes(&db, &id, &s).await?;
                }
                if let Some(r) = rate {
                    clients::set_rate(&db, &id, r).await?;
                }
                println!("client `{id}` updated");
            }
        }
        anyhow::Ok(())
    }
    .await;
    db.close().await;
    result
}

async fn auth_command(command: AuthCommand, cfg: &Config) -> anyhow::Result<()> {
    use crate::auth::keys;
    let db = crate::app::open_db(cfg).await?;
    let path = &cfg.auth.signing_key_file;
    let result = async {
        match command {
            AuthCommand::InitKey => {
                let (kid, created) = keys::init_signing_key(&db, path).await?;
                if created {
                    println!("created token signing key {kid} in {}", path.display());
                } else {
                    println!("token signing key {kid} in {} already exists; published", path.display());
                }
            }
            AuthCommand::RotateSigningKey => {
                let after = cfg.auth.token_lifetime_s + cfg.auth.leeway_s;
                let r = keys::rotate_signing_key(&db, path, after).await?;
                println!("new token signing key {} in {}", r.current, path.display());
                if let Some(p) = r.previous {
                    println!("previous key {p} verifies for {after} s more, then retires");
                }
            }
            AuthCommand::Keys => {
                let now = crate::auth::token::unix_now();
                println!("{:<44}  {:<6}  {:<20}  state", "kid", "alg", "created");
                for k in keys::list_keys(&db).await? {
                    let state = match k.retires_at {
                        None => "current".to_owned(),
                        Some(t) if t > now => format!("retiring in {} s", t - now),
                        Some(_) => "retired".to_owned(),
                    };
                    println!("{:<44}  {:<6}  {:<20}  {state}", k.kid, k.alg, k.created_at);
                }
            }
            AuthCommand::RetireKey { kid, in_s } => {
                if !keys::retire_key(&db, &kid, in_s).await? {
                    anyhow::bail!("no key `{kid}`");
                }
                println!(
                    "key {kid} retires in {in_s} s; verifiers drop it within auth.key_refresh_s ({} s)",
                    cfg.auth.key_refresh_s
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    db.close().await;
    result
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
            // Metadata only, through the key store (the owner of `keys`).
            let rows = crate::keystore::list_all_meta(&mut c).await?;
            println!(
                "{:<8} {:>8} {:>8} {:<9} activates_at",
                "kind", "group", "version", "state"
            );
            for m in rows {
                let (k, g) = m.kind.db();
                let at = time::OffsetDateTime::from_unix_timestamp(i64::from(m.activates_at))
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                println!("{k:<8} {g:>8} {:>8} {:<9} {at}", m.version, m.state);
            }
            drop(c);
            db.close().await;
            Ok(())
        }
        KeysCommand::Export {
            devices,
            device_file,
            transport_key,
            out,
        } => export_command(cfg, devices, device_file, transport_key, out).await,
        KeysCommand::Exports { limit } => exports_command(cfg, limit).await,
        KeysCommand::RotateRoot { new_key_file } => {
            let db = crate::app::open_db(cfg).await?;
            let ks = crate::app::open_keystore(cfg, &db).await?;
            let new =
                FileKeySource::create_new(&new_key_file).map_err(|e| anyhow::anyhow!("{e}"))?;
            let new_root = new.root_key().map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = ks
                .rewrap(
                    &casd_wire::crypto::Key128::from_bytes(*new_root),
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

/// `casd keys exports`: the recorded exports.
async fn exports_command(cfg: &Config, limit: u32) -> anyhow::Result<()> {
    let db = crate::app::open_db(cfg).await?;
    println!(
        "{:>6}  {:<20}  {:<4}  {:<27}  {:>9}  devices",
        "id", "by", "via", "at", "count"
    );
    for (id, by, via, at, n, devices) in crate::export::list(&db, limit).await? {
        println!("{id:>6}  {by:<20}  {via:<4}  {at:<27}  {n:>9}  {devices}");
    }
    db.close().await;
    Ok(())
}

/// `casd keys export`: the Encryptor's export, run here with the root key,
/// written to a new 0600 file.
async fn export_command(
    cfg: &Config,
    devices: Option<crate::export::DeviceSet>,
    device_file: Option<PathBuf>,
    transport_key: Option<PathBuf>,
    out: PathBuf,
) -> anyhow::Result<()> {
    use crate::encryptor::{Encryptor, ExportRequest, LocalEncryptor};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let devices = match (devices, device_file) {
        (Some(d), _) => d,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
        (None, None) => anyhow::bail!("give --devices or --device-file"),
    };
    let ktk_path = transport_key.or_else(|| cfg.keys.transport_key_file.clone());
    let ktk = crate::app::load_transport_key(ktk_path.as_deref())?.ok_or_else(|| {
        anyhow::anyhow!("no transport key: give --transport-key or set keys.transport_key_file")
    })?;
    // Created before the export, so that a bad path costs no record.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let db = crate::app::open_db(cfg).await?;
    let ks = crate::app::open_keystore(cfg, &db).await?;
    let enc = LocalEncryptor::new(ks, cfg.cas.max_section_bytes).with_transport_key(Some(ktk));
    let req = ExportRequest {
        devices,
        exported_by: os_user(),
        via: crate::export::Via::Cli,
    };
    let export = enc.export_duks(req).await?;
    file.write_all(export.to_jsonl().as_bytes())?;
    file.sync_all()?;
    eprintln!(
        "export {}: {} devices written to {} (transport key {})",
        export.header.export_id,
        export.header.devices,
        out.display(),
        export.header.transport_key_id
    );
    db.close().await;
    Ok(())
}

/// `casd devices import`: progress bar on a terminal, bad lines on
/// stderr, the summary on stdout; exit 1 when a line was bad.
async fn import_command(cfg: &Config, file: &std::path::Path, batch: usize) -> anyhow::Result<()> {
    let total = std::fs::metadata(file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        .len();
    let db = crate::app::open_db(cfg).await?;
    db.migrate().await?;
    // Hidden when stderr is not a terminal.
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let sum = crate::import::import_file(
        &db,
        file,
        batch,
        cfg.cas.max_section_bytes,
        crate::queue::BulkPace::from_config(cfg),
        &mut |pos| bar.set_position(pos),
        &mut |line, why| bar.suspend(|| eprintln!("{}:{line}: {why}", file.display())),
    )
    .await;
    bar.finish_and_clear();
    db.close().await;
    let sum = sum?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} lines in {secs:.1} s: {} devices added, {} already present, {} entitlements added, \
         {} commands already stored, {} bad lines",
        sum.lines,
        sum.devices_added,
        sum.devices_present,
        sum.entitlements_added,
        sum.replayed,
        sum.bad_lines
    );
    if sum.bad_lines > 0 {
        anyhow::bail!(
            "{} bad lines (listed above); the rest is imported",
            sum.bad_lines
        );
    }
    Ok(())
}

/// Who runs the command: the login name behind sudo, else the user.
fn os_user() -> String {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {uid}"));
    match std::env::var("SUDO_USER") {
        Ok(s) if !s.is_empty() => format!("{s} (as {name})"),
        _ => name,
    }
}

async fn jobs_command(command: JobsCommand, cfg: &Config) -> anyhow::Result<()> {
    const JOBS: [&str; 4] = ["purge", "rotation", "root-rotation", "refresh"];
    let db = crate::app::open_db(cfg).await?;
    let mut c = db.conn().await?;
    match command {
        JobsCommand::List { job, limit } => {
            let runs = crate::scheduler::recent_runs(&mut c, job.as_deref(), limit).await?;
            if runs.is_empty() {
                println!("no runs recorded");
            }
            runs.iter().for_each(print_run);
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
            if wait == 0 {
                return Ok(());
            }
            wait_for_run(&mut c, id, &job, wait).await?;
        }
    }
    drop(c);
    db.close().await;
    Ok(())
}

/// Waits up to `wait` seconds for the run of trigger `id` to end, prints
/// it; an error unless it ended `ok`.
async fn wait_for_run(
    c: &mut mysql_async::Conn,
    id: u64,
    job: &str,
    wait: u64,
) -> anyhow::Result<()> {
    use mysql_async::prelude::*;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        let run: Option<Option<u64>> = c
            .exec_first("SELECT run_id FROM job_triggers WHERE id = ?", (id,))
            .await?;
        if let Some(Some(run_id)) = run {
            let ended: Option<Option<String>> = c
                .exec_first("SELECT outcome FROM job_runs WHERE id = ?", (run_id,))
                .await?;
            if let Some(Some(outcome)) = ended {
                let runs = crate::scheduler::recent_runs(c, Some(job), 50).await?;
                if let Some(r) = runs.iter().find(|r| r.id == run_id) {
                    print_run(r);
                }
                if outcome != "ok" {
                    anyhow::bail!("run {run_id} of {job} ended {outcome}");
                }
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("no run of {job} ended within {wait} s (is a scheduler role running?)");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn print_run(r: &crate::scheduler::RunRecord) {
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
