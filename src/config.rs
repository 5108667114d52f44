//! Configuration: one TOML file plus `CASD_*` environment overrides.
//!
//! The file is parsed into a loose TOML table first, environment overrides
//! are applied on top (`CASD_SECTION__KEY=value`, double underscore between
//! levels, e.g. `CASD_API__LISTEN=0.0.0.0:8443`; `CASD_DATABASE_URL` is a
//! shorthand for `CASD_DATABASE__URL`), and only then is the result
//! deserialized into typed structs with `deny_unknown_fields`. That order
//! means a misspelt key is caught whether it came from the file or the
//! environment, and every error names the full key path
//! (`cycler.outputs[0].bitrate: ...`).
//!
//! Secrets (`database.url` carries the password) live in [`Secret`], whose
//! `Debug` never prints the value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration error, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("configuration key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// `key` names a PEM file holding at least one certificate.
fn check_pem_certs(key: &str, path: &Path) -> Result<(), ConfigError> {
    crate::tls::read_certs(path)
        .map(|_| ())
        .map_err(|e| key_err(key, format!("{}: {e}", path.display())))
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// A value that must never be printed: `Debug` shows `<redacted>`.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call sites are few and greppable.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The roles one casd process can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Sms,
    Emmg,
    Encryptor,
    Cycler,
    Scheduler,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Sms,
        Role::Emmg,
        Role::Encryptor,
        Role::Cycler,
        Role::Scheduler,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Role::Sms => "sms",
            Role::Emmg => "emmg",
            Role::Encryptor => "encryptor",
            Role::Cycler => "cycler",
            Role::Scheduler => "scheduler",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role `{s}` (expected one of sms, emmg, encryptor, cycler, scheduler)"
                )
            })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Roles `casd run` starts when `--roles` is not given.
    #[serde(default = "default_roles")]
    pub roles: Vec<Role>,
    pub database: DatabaseConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub cas: CasConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub emmg: EmmgConfig,
    #[serde(default)]
    pub cycler: CyclerConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// How this process reaches roles running in other processes.
    #[serde(default)]
    pub peers: PeersConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus endpoint (docs/metrics.md), served on a
/// listener of its own so that scraping needs no token and the API stays
/// closed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// host:port of `GET /metrics`; the empty string turns it off.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_metrics_listen() -> String {
    crate::metrics::DEFAULT_LISTEN.into()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

impl MetricsConfig {
    /// Where to serve the metrics, `None` when turned off. Validated at
    /// load, so a configuration that loaded never fails here.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// Roles in other processes, reached over HTTP(S) with OAuth client
/// credentials. Only needed when a role here depends on one that runs
/// elsewhere (the EMMG and the Scheduler call the Encryptor).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// Base URL of the Encryptor role, e.g. `https://enc.example:8443`.
    #[serde(default)]
    pub encryptor_url: Option<String>,
    /// This process's client credentials for calling its peers (the
    /// Encryptor needs scope `encrypt`).
    #[serde(default)]
    pub client: Option<crate::auth::client::ClientCredentialsConfig>,
}

fn default_roles() -> Vec<Role> {
    Role::ALL.to_vec()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `mysql://user:password@host:port/database`. Secret: it holds the password.
    pub url: Secret,
    /// The members of a replication group, `host:port` each: casd writes
    /// to the one that is writable (`read_only = OFF`) and follows a
    /// failover by itself. Empty: the url's own server, never checked.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Largest number of pooled connections.
    #[serde(default = "default_pool_max")]
    pub pool_max: usize,
    /// Seconds to wait for a connection before answering 503.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
    /// Apply pending migrations at start-up.
    #[serde(default = "yes")]
    pub migrate_on_start: bool,
    /// TLS to the server: `required` (the default) or `disabled`.
    #[serde(default)]
    pub tls: DbTlsMode,
    /// The CA (PEM) the server's certificate must chain to; without it,
    /// the public web PKI roots. Only with `tls = "required"`.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

/// `database.tls`. There is no "preferred": a client that falls back to
/// plain text when the server offers no TLS is downgraded by anyone on the
/// path who strips the server's SSL capability, so it protects nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbTlsMode {
    /// TLS on every connection, the server's certificate verified (chain
    /// to `tls_ca` or the web roots, and the URL's host name or IP); a
    /// server that cannot do TLS is refused.
    #[default]
    Required,
    /// Plain TCP (or the server's socket): only for a server reached on a
    /// path nobody else can read, e.g. a private test server.
    Disabled,
}

fn default_pool_max() -> usize {
    32
}
fn default_connect_timeout_s() -> u64 {
    5
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the HTTP(S) API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest request body accepted, bytes (sms-api.md: default 64 KiB).
    #[serde(default = "default_body_limit")]
    pub body_limit: usize,
    /// TLS certificate chain (PEM). With `tls_key`, the listener speaks HTTPS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Must be set to true to serve plain HTTP (no TLS configured).
    #[serde(default)]
    pub plain_http: bool,
    /// Request log: one JSON line per request.
    #[serde(default = "default_request_log")]
    pub request_log: PathBuf,
    /// Group commit: most SMS commands stored in one transaction.
    #[serde(default = "default_commit_batch")]
    pub commit_batch: usize,
    /// Group commit: transactions of SMS commands in flight at once.
    #[serde(default = "default_committers")]
    pub committers: usize,
}

fn default_commit_batch() -> usize {
    256
}
fn default_committers() -> usize {
    2
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_body_limit() -> usize {
    64 * 1024
}
fn default_request_log() -> PathBuf {
    PathBuf::from("log/requests.jsonl")
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
            body_limit: default_body_limit(),
            tls_cert: None,
            tls_key: None,
            plain_http: false,
            request_log: default_request_log(),
            commit_batch: default_commit_batch(),
            committers: default_committers(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasConfig {
    /// CA_system_ID in the CAT and SimulCrypt client_ID.
    #[serde(default = "default_ca_system_id")]
    pub ca_system_id: u16,
    /// Largest EMM section, bytes (spec default 256, at most 4096).
    #[serde(default = "default_max_section_bytes")]
    pub max_section_bytes: usize,
}

fn default_ca_system_id() -> u16 {
    0x4AFF
}
fn default_max_section_bytes() -> usize {
    256
}

impl Default for CasConfig {
    fn default() -> Self {
        CasConfig {
            ca_system_id: default_ca_system_id(),
            max_section_bytes: default_max_section_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// File holding the root key (mode 0600, owned by the casd user).
    #[serde(default = "default_root_key_file")]
    pub root_key_file: PathBuf,
    /// Root key rotation: the root key to move to. When set, the
    /// `root-rotation` job re-seals every key row under it (nothing when
    /// unset or already done), and start-up accepts it when the store no
    /// longer opens under `root_key_file`.
    #[serde(default)]
    pub next_root_key_file: Option<PathBuf>,
    /// Personalization export (`casd keys export`, `POST
    /// /encryptor/v1/export`): the transport key agreed with the card
    /// vendor, in the root key file's format. Unset: exports are refused
    /// (the CLI may name one with --transport-key).
    #[serde(default)]
    pub transport_key_file: Option<PathBuf>,
}

fn default_root_key_file() -> PathBuf {
    PathBuf::from("keys/root.key")
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            root_key_file: default_root_key_file(),
            next_root_key_file: None,
            transport_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmmgConfig {
    /// Concurrent workers taking work items.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Work items taken per transaction.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Milliseconds between polls of the work queue when idle (in one
    /// process the SMS role also wakes the EMMG at once).
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Lifetime of unique EMMs carrying state (entitlements, enable), days.
    #[serde(default = "default_emm_lifetime_days")]
    pub emm_lifetime_days: u32,
    /// Share of the slowest output's bitrate that the first sending (the
    /// fast-lane burst) of bulk commands' EMMs may take (`casd devices
    /// import`, `POST /bulk`): their work items are spaced to fit it.
    #[serde(default = "default_bulk_bandwidth_share")]
    pub bulk_bandwidth_share: f64,
}

fn default_bulk_bandwidth_share() -> f64 {
    0.25
}

fn default_workers() -> usize {
    4
}
fn default_batch() -> usize {
    32
}
fn default_poll_ms() -> u64 {
    20
}
fn default_emm_lifetime_days() -> u32 {
    30
}

impl Default for EmmgConfig {
    fn default() -> Self {
        EmmgConfig {
            workers: default_workers(),
            batch: default_batch(),
            poll_interval_ms: default_poll_ms(),
            emm_lifetime_days: default_emm_lifetime_days(),
            bulk_bandwidth_share: default_bulk_bandwidth_share(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CyclerConfig {
    /// Milliseconds between polls of carousel_events when nothing woke us.
    #[serde(default = "default_cycler_poll_ms")]
    pub poll_interval_ms: u64,
    /// Times a new EMM is sent in the fast lane before joining the cycle.
    #[serde(default = "default_burst_count")]
    pub burst_count: u32,
    /// Milliseconds between fast-lane repetitions.
    #[serde(default = "default_burst_interval_ms")]
    pub burst_interval_ms: u64,
    /// Play-out log (one JSON line per EMM sent).
    #[serde(default = "default_carousel_log")]
    pub log_file: PathBuf,
    /// Rotate the play-out log when it reaches this many bytes.
    #[serde(default = "default_log_rotate_bytes")]
    pub log_rotate_bytes: u64,
    /// Rotated files kept.
    #[serde(default = "default_log_keep")]
    pub log_keep: u32,
    #[serde(default = "default_outputs")]
    pub outputs: Vec<OutputConfig>,
    /// Longest acceptable full pass of the cycle, in seconds, per class
    /// (exported as `casd_cycler_cycle_target_seconds` for the
    /// `CasdCarouselCycleTooLong` alert; a pass plays every class once).
    #[serde(default = "default_cycle_target_urgent_s")]
    pub cycle_target_urgent_s: f64,
    #[serde(default = "default_cycle_target_change_s")]
    pub cycle_target_change_s: f64,
    #[serde(default = "default_cycle_target_background_s")]
    pub cycle_target_background_s: f64,
    /// Redundant Cyclers: instances with the same group serve the same
    /// outputs, one on air under the lease `cycler:<group>`, the others
    /// hot standbys. Empty: no redundancy, always on air.
    #[serde(default)]
    pub redundancy_group: String,
    /// The group's lease, in ms: a dead instance's outputs are taken over
    /// within `lease_ms` × 1.25 plus a database round trip.
    #[serde(default = "default_cycler_lease_ms")]
    pub lease_ms: u64,
}

fn default_cycler_lease_ms() -> u64 {
    1000
}

impl CyclerConfig {
    /// The cycle targets in `carousel::Class` order (urgent, change,
    /// background).
    pub fn cycle_targets_s(&self) -> [f64; 3] {
        [
            self.cycle_target_urgent_s,
            self.cycle_target_change_s,
            self.cycle_target_background_s,
        ]
    }
}

fn default_cycle_target_urgent_s() -> f64 {
    30.0
}
fn default_cycle_target_change_s() -> f64 {
    120.0
}
fn default_cycle_target_background_s() -> f64 {
    900.0
}

fn default_cycler_poll_ms() -> u64 {
    10
}
fn default_burst_count() -> u32 {
    3
}
fn default_burst_interval_ms() -> u64 {
    200
}
fn default_carousel_log() -> PathBuf {
    PathBuf::from("log/carousel.jsonl")
}
fn default_log_rotate_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_log_keep() -> u32 {
    10
}
fn default_outputs() -> Vec<OutputConfig> {
    vec![OutputConfig::default()]
}

impl Default for CyclerConfig {
    fn default() -> Self {
        CyclerConfig {
            poll_interval_ms: default_cycler_poll_ms(),
            burst_count: default_burst_count(),
            burst_interval_ms: default_burst_interval_ms(),
            log_file: default_carousel_log(),
            log_rotate_bytes: default_log_rotate_bytes(),
            log_keep: default_log_keep(),
            outputs: default_outputs(),
            cycle_target_urgent_s: default_cycle_target_urgent_s(),
            cycle_target_change_s: default_cycle_target_change_s(),
            cycle_target_background_s: default_cycle_target_background_s(),
            redundancy_group: String::new(),
            lease_ms: default_cycler_lease_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Name used in logs and the play-out log.
    #[serde(default = "default_output_name")]
    pub name: String,
    /// UDP destination, unicast or multicast, `host:port`.
    #[serde(default = "default_destination")]
    pub destination: SocketAddr,
    /// EMM PID (spec default 0x0101).
    #[serde(default = "default_pid")]
    pub pid: u16,
    /// Output bitrate cap, bits per second (the exact rate when `cbr`).
    #[serde(default = "default_bitrate")]
    pub bitrate: u64,
    /// TS packets per UDP datagram, 1..=7.
    #[serde(default = "default_ppd")]
    pub packets_per_datagram: u8,
    /// Prefix each datagram with an RTP header (RFC 2250, PT 33).
    #[serde(default)]
    pub rtp: bool,
    /// Fill with null packets to a constant bitrate.
    #[serde(default)]
    pub cbr: bool,
    /// Send the CAT (PID 0x0001) at least every 500 ms.
    #[serde(default = "yes")]
    pub cat: bool,
    /// Pack sections back to back (false: one section start per packet).
    #[serde(default = "yes")]
    pub pack_sections: bool,
    /// IP TTL (multicast TTL for multicast destinations).
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// DSCP code point, 0..=63.
    #[serde(default)]
    pub dscp: u8,
    /// Outgoing interface name for multicast (e.g. "eth1").
    #[serde(default)]
    pub interface: Option<String>,
    /// Loop multicast back to this host.
    #[serde(default)]
    pub multicast_loop: bool,
    /// `udp` (the default) or `simulcrypt` (an EMMG client to a MUX, the
    /// settings in `simulcrypt`).
    #[serde(default)]
    pub kind: OutputKind,
    /// The SimulCrypt link of a `kind = "simulcrypt"` output.
    #[serde(default)]
    pub simulcrypt: Option<SimulcryptConfig>,
}

/// How an output leaves the box.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// MPEG-TS over UDP (`destination`).
    #[default]
    Udp,
    /// DVB SimulCrypt EMMG⇔MUX (ETSI TS 103 197) to `simulcrypt.mux`.
    Simulcrypt,
}

/// Payload of data_provision messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulcryptPayload {
    /// 188-byte TS packets on `pid` (section_TSpkt_flag = 1).
    #[default]
    TsPackets,
    /// Whole sections (section_TSpkt_flag = 0): the MUX packetizes.
    Sections,
}

/// `[cycler.outputs.simulcrypt]`: one EMMG channel with one stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulcryptConfig {
    /// The MUX's TCP address, `host:port`.
    pub mux: SocketAddr,
    /// data_provision over UDP to this address instead of the TCP
    /// connection (TS 103 197 allows either).
    #[serde(default)]
    pub data_udp: Option<SocketAddr>,
    /// client_id; default: `cas.ca_system_id` in the top 16 bits, 0 below.
    #[serde(default)]
    pub client_id: Option<u32>,
    #[serde(default = "one_u16")]
    pub data_channel_id: u16,
    #[serde(default = "one_u16")]
    pub data_stream_id: u16,
    #[serde(default = "one_u16")]
    pub data_id: u16,
    /// 2 (default) or 3.
    #[serde(default = "default_simulcrypt_version")]
    pub protocol_version: u8,
    #[serde(default)]
    pub payload: SimulcryptPayload,
    /// Milliseconds between channel_test + stream_test keep-alives.
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_ms: u64,
    /// Milliseconds a MUX has to answer (connect, setup, test).
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// First and longest wait before reconnecting (doubling in between).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn one_u16() -> u16 {
    1
}
fn default_simulcrypt_version() -> u8 {
    2
}
fn default_keepalive_ms() -> u64 {
    10_000
}
fn default_response_timeout_ms() -> u64 {
    5_000
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}

impl OutputConfig {
    /// The checks of a SimulCrypt output (`k` names a key of this output).
    fn validate_simulcrypt(&self, k: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let sc = match (self.kind, &self.simulcrypt) {
            (OutputKind::Udp, None) => return Ok(()),
            (OutputKind::Udp, Some(_)) => {
                return Err(key_err(k("simulcrypt"), "only for kind = \"simulcrypt\""))
            }
            (OutputKind::Simulcrypt, None) => {
                return Err(key_err(
                    k("simulcrypt"),
                    "kind = \"simulcrypt\" needs [cycler.outputs.simulcrypt] with `mux`",
                ))
            }
            (OutputKind::Simulcrypt, Some(sc)) => sc,
        };
        if self.rtp || self.cbr {
            return Err(key_err(
                k(if self.rtp { "rtp" } else { "cbr" }),
                "UDP only: a MUX takes no RTP and fills with its own null packets",
            ));
        }
        if self.bitrate > 65_535_000 {
            return Err(key_err(
                k("bitrate"),
                "a SimulCrypt bandwidth is at most 65535 kbit/s",
            ));
        }
        let k = |f: &str| k(&format!("simulcrypt.{f}"));
        if !carousel::simulcrypt::VERSIONS.contains(&sc.protocol_version) {
            return Err(key_err(k("protocol_version"), "must be 2 or 3"));
        }
        if sc.mux.port() == 0 || sc.data_udp.is_some_and(|a| a.port() == 0) {
            return Err(key_err(
                k(if sc.mux.port() == 0 {
                    "mux"
                } else {
                    "data_udp"
                }),
                "port 0 is not a destination",
            ));
        }
        let ms = [
            ("keepalive_ms", sc.keepalive_ms),
            ("response_timeout_ms", sc.response_timeout_ms),
            ("reconnect_min_ms", sc.reconnect_min_ms),
            ("reconnect_max_ms", sc.reconnect_max_ms),
        ];
        if let Some((name, _)) = ms.iter().find(|(_, v)| *v == 0 || *v > 3_600_000) {
            return Err(key_err(k(name), "must be 1..=3600000 ms"));
        }
        if sc.reconnect_max_ms < sc.reconnect_min_ms {
            return Err(key_err(
                k("reconnect_max_ms"),
                "must be at least reconnect_min_ms",
            ));
        }
        Ok(())
    }
}

fn default_output_name() -> String {
    "main".into()
}
fn default_destination() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5500))
}
fn default_pid() -> u16 {
    0x0101
}
fn default_bitrate() -> u64 {
    1_000_000
}
fn default_ppd() -> u8 {
    7
}
fn default_ttl() -> u32 {
    16
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            name: default_output_name(),
            destination: default_destination(),
            pid: default_pid(),
            bitrate: default_bitrate(),
            packets_per_datagram: default_ppd(),
            rtp: false,
            cbr: false,
            cat: true,
            pack_sections: true,
            ttl: default_ttl(),
            dscp: 0,
            interface: None,
            multicast_loop: false,
            kind: OutputKind::Udp,
            simulcrypt: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Seconds a scheduler lease lasts without renewal.
    #[serde(default = "default_lease_s")]
    pub lease_seconds: u64,
    /// This instance's name in `leases.holder` / `job_runs.holder`;
    /// empty = host name + process id.
    #[serde(default)]
    pub instance_id: String,
    /// Milliseconds between checks for due jobs and triggers.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Seconds between expiry purges.
    #[serde(default = "default_purge_s")]
    pub purge_interval_s: u64,
    /// Days refused/processed sms_requests and done work items are kept.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Hours `carousel_events` rows are kept (at least 1: the Cycler needs
    /// only recent ones).
    #[serde(default = "default_events_retention_hours")]
    pub events_retention_hours: u32,
    /// Rows per purge / enqueue transaction.
    #[serde(default = "default_sched_batch")]
    pub batch: usize,
    /// When the rotation job runs (checks whether a rotation is due,
    /// delivers, activates, re-seals, retires): `every <n>s|m|h|d`,
    /// `daily HH:MM` (UTC) or `manual`.
    #[serde(default = "default_rotation_schedule")]
    pub rotation_schedule: String,
    /// Days a GK/GLK version is in use before the next one activates;
    /// 0 = no automatic rotation (triggered runs only).
    #[serde(default = "default_rotation_days")]
    pub rotation_days: u32,
    /// Hours before its activation a new version is created and delivered.
    #[serde(default = "default_rotation_lead_hours")]
    pub rotation_lead_hours: u32,
    /// Share (0 < s <= 1) of the output bitrate the key EMMs of a rotation
    /// may take while they are first sent (fast lane); their enqueue is
    /// spread over time accordingly.
    #[serde(default = "default_rotation_bandwidth_share")]
    pub rotation_bandwidth_share: f64,
    /// When the refresh job runs (same forms as rotation_schedule).
    #[serde(default = "default_refresh_schedule")]
    pub refresh_schedule: String,
    /// A device whose live ENTITLEMENT_SET is older than this (or missing)
    /// gets a fresh one.
    #[serde(default = "default_refresh_days")]
    pub refresh_days: u32,
    /// When the root-rotation job runs (same forms; it does nothing unless
    /// keys.next_root_key_file is set).
    #[serde(default = "default_root_rotation_schedule")]
    pub root_rotation_schedule: String,
    /// When the revocation job looks for removals whose GLK rotation is
    /// due (same forms as rotation_schedule).
    #[serde(default = "default_revocation_schedule")]
    pub revocation_schedule: String,
    /// The GLK is rotated (group-addressed, activating at once) once this
    /// many removed devices are not yet excluded from it; 0 = only on
    /// schedule (`rotation_days`).
    #[serde(default = "default_glk_rotation_removals")]
    pub glk_rotation_removals: u32,
}

fn default_lease_s() -> u64 {
    15
}
fn default_tick_ms() -> u64 {
    1000
}
fn default_purge_s() -> u64 {
    60
}
fn default_retention_days() -> u32 {
    90
}
fn default_events_retention_hours() -> u32 {
    24
}
fn default_sched_batch() -> usize {
    1000
}
fn default_rotation_schedule() -> String {
    "every 1h".into()
}
fn default_rotation_days() -> u32 {
    30
}
fn default_rotation_lead_hours() -> u32 {
    48
}
fn default_rotation_bandwidth_share() -> f64 {
    0.5
}
fn default_refresh_schedule() -> String {
    "daily 03:30".into()
}
fn default_refresh_days() -> u32 {
    7
}
fn default_revocation_schedule() -> String {
    "every 10s".into()
}
fn default_glk_rotation_removals() -> u32 {
    1
}
fn default_root_rotation_schedule() -> String {
    "manual".into()
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease_seconds: default_lease_s(),
            instance_id: String::new(),
            tick_ms: default_tick_ms(),
            purge_interval_s: default_purge_s(),
            retention_days: default_retention_days(),
            events_retention_hours: default_events_retention_hours(),
            batch: default_sched_batch(),
            rotation_schedule: default_rotation_schedule(),
            rotation_days: default_rotation_days(),
            rotation_lead_hours: default_rotation_lead_hours(),
            rotation_bandwidth_share: default_rotation_bandwidth_share(),
            refresh_schedule: default_refresh_schedule(),
            refresh_days: default_refresh_days(),
            root_rotation_schedule: default_root_rotation_schedule(),
            revocation_schedule: default_revocation_schedule(),
            glk_rotation_removals: default_glk_rotation_removals(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "casd=debug,info".
    #[serde(default = "default_level")]
    pub level: String,
    /// "text" or "json".
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_level() -> String {
    "info".into()
}
fn default_format() -> String {
    "text".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_level(),
            format: default_format(),
        }
    }
}

/// OAuth 2.0 client credentials and JWT access tokens (docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `iss` of the tokens this process issues and the only issuer it accepts.
    #[serde(default = "default_auth_name")]
    pub issuer: String,
    /// `aud` of the tokens issued and the only audience accepted.
    #[serde(default = "default_auth_name")]
    pub audience: String,
    /// Seconds an access token lives.
    #[serde(default = "default_token_lifetime_s")]
    pub token_lifetime_s: u64,
    /// Seconds of clock skew tolerated when checking `exp`/`nbf`.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Serve `POST /oauth/token` from this process (needs `signing_key_file`).
    #[serde(default = "yes")]
    pub token_endpoint: bool,
    /// Ed25519 private key (PKCS#8 PEM, mode 0600) signing the tokens.
    #[serde(default = "default_signing_key_file")]
    pub signing_key_file: PathBuf,
    /// Milliseconds a client's enabled flag/scopes/rate are cached (0 = check every request).
    #[serde(default = "default_client_cache_ms")]
    pub client_cache_ms: u64,
    /// Seconds between reloads of the public key set (`jwt_keys`).
    #[serde(default = "default_key_refresh_s")]
    pub key_refresh_s: u64,
    /// Requests per second for clients created without `--rate`.
    #[serde(default = "default_rate_per_s")]
    pub default_rate_per_s: u32,
    /// Failed token requests allowed per client id in a burst...
    #[serde(default = "default_failed_token_burst")]
    pub failed_token_burst: u32,
    /// ...and refilled at this many per minute.
    #[serde(default = "default_failed_token_per_min")]
    pub failed_token_per_min: u32,
}

fn default_auth_name() -> String {
    "casd".into()
}
fn default_token_lifetime_s() -> u64 {
    600
}
fn default_leeway_s() -> u64 {
    30
}
fn default_signing_key_file() -> PathBuf {
    PathBuf::from("keys/token-signing.pem")
}
fn default_client_cache_ms() -> u64 {
    1000
}
fn default_key_refresh_s() -> u64 {
    30
}
fn default_rate_per_s() -> u32 {
    100
}
fn default_failed_token_burst() -> u32 {
    5
}
fn default_failed_token_per_min() -> u32 {
    10
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: default_auth_name(),
            audience: default_auth_name(),
            token_lifetime_s: default_token_lifetime_s(),
            leeway_s: default_leeway_s(),
            token_endpoint: true,
            signing_key_file: default_signing_key_file(),
            client_cache_ms: default_client_cache_ms(),
            key_refresh_s: default_key_refresh_s(),
            default_rate_per_s: default_rate_per_s(),
            failed_token_burst: default_failed_token_burst(),
            failed_token_per_min: default_failed_token_per_min(),
        }
    }
}

impl Config {
    /// Reads `path`, applies the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, std::env::vars())
    }

    /// Parses TOML text with the given environment (tests pass their own).
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_owned()
                        + &e.span()
                            .map(|s| format!(" (at line {})", line_of(text, s.start)))
                            .unwrap_or_default(),
                })?;
        apply_env(&mut table, env)?;
        apply_secret_files(&mut table)?;
        let de = toml::Value::Table(table);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            key_err(
                if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                e.into_inner().message().to_owned(),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every key in range and consistent, section by section (the first
    /// error found is reported).
    fn validate(&self) -> Result<(), ConfigError> {
        if self.roles.is_empty() {
            return Err(key_err("roles", "at least one role is needed"));
        }
        self.validate_database()?;
        self.validate_api()?;
        self.validate_cas_and_emmg()?;
        self.validate_cycler()?;
        self.validate_scheduler()?;
        self.validate_auth()?;
        self.validate_metrics()?;
        self.validate_log()
    }

    /// `[metrics]`: an address, or "" for off.
    fn validate_metrics(&self) -> Result<(), ConfigError> {
        let l = &self.metrics.listen;
        if !l.is_empty() && l.parse::<SocketAddr>().is_err() {
            return Err(key_err(
                "metrics.listen",
                "must be host:port with an IP address (e.g. \"127.0.0.1:9464\"), or \"\" to turn the endpoint off",
            ));
        }
        Ok(())
    }

    /// `[database]`.
    fn validate_database(&self) -> Result<(), ConfigError> {
        let url = self.database.url.expose();
        if !url.starts_with("mysql://") {
            return Err(key_err(
                "database.url",
                "must be a mysql://user:password@host:port/database URL",
            ));
        }
        if mysql_async::Opts::from_url(url).is_err() {
            // The parser's message may quote the URL, password included: say why without it.
            return Err(key_err("database.url", "is not a valid mysql:// URL"));
        }
        if self.database.pool_max == 0 {
            return Err(key_err("database.pool_max", "must be at least 1"));
        }
        if let Some(bad) = self
            .database
            .servers
            .iter()
            .find(|s| crate::db::parse_server(s).is_none())
        {
            return Err(key_err(
                "database.servers",
                format!("{bad:?} is not host:port"),
            ));
        }
        match (&self.database.tls, &self.database.tls_ca) {
            (DbTlsMode::Disabled, Some(_)) => Err(key_err(
                "database.tls_ca",
                "is set while database.tls = \"disabled\"",
            )),
            (DbTlsMode::Required, Some(ca)) => check_pem_certs("database.tls_ca", ca),
            _ => Ok(()),
        }
    }

    /// `[api]`: limits, batching, TLS or explicit plain HTTP.
    fn validate_api(&self) -> Result<(), ConfigError> {
        if self.api.body_limit < 1024 || self.api.body_limit > 16 * 1024 * 1024 {
            return Err(key_err(
                "api.body_limit",
                "must be between 1024 and 16777216 bytes",
            ));
        }
        if !(1..=4096).contains(&self.api.commit_batch) {
            return Err(key_err("api.commit_batch", "must be between 1 and 4096"));
        }
        if !(1..=16).contains(&self.api.committers) {
            return Err(key_err("api.committers", "must be between 1 and 16"));
        }
        match (&self.api.tls_cert, &self.api.tls_key) {
            (Some(_), None) => return Err(key_err("api.tls_key", "missing while api.tls_cert is set")),
            (None, Some(_)) => return Err(key_err("api.tls_cert", "missing while api.tls_key is set")),
            (None, None) if !self.api.plain_http => {
                return Err(key_err(
                    "api.plain_http",
                    "no TLS certificate configured (api.tls_cert/api.tls_key); set api.plain_http = true to serve plain HTTP explicitly",
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// `[cas]` and `[emmg]`.
    fn validate_cas_and_emmg(&self) -> Result<(), ConfigError> {
        if !(64..=4096).contains(&self.cas.max_section_bytes) {
            return Err(key_err(
                "cas.max_section_bytes",
                "must be between 64 and 4096",
            ));
        }
        if !(self.emmg.bulk_bandwidth_share > 0.0 && self.emmg.bulk_bandwidth_share <= 1.0) {
            return Err(key_err("emmg.bulk_bandwidth_share", "must be in (0, 1]"));
        }
        if self.emmg.workers == 0 {
            return Err(key_err("emmg.workers", "must be at least 1"));
        }
        if self.emmg.batch == 0 || self.emmg.batch > 1000 {
            return Err(key_err("emmg.batch", "must be between 1 and 1000"));
        }
        Ok(())
    }

    /// `[cycler]`: outputs, each with a unique name and valid transport settings.
    fn validate_cycler(&self) -> Result<(), ConfigError> {
        for (class, t) in ["urgent", "change", "background"]
            .iter()
            .zip(self.cycler.cycle_targets_s())
        {
            if !(t.is_finite() && t > 0.0) {
                return Err(key_err(
                    format!("cycler.cycle_target_{class}_s"),
                    "must be a number of seconds above 0",
                ));
            }
        }
        let group = &self.cycler.redundancy_group;
        if group.len() > 48 || !group.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(key_err(
                "cycler.redundancy_group",
                "at most 48 printable ASCII characters, no spaces",
            ));
        }
        if !(300..=60_000).contains(&self.cycler.lease_ms) {
            return Err(key_err(
                "cycler.lease_ms",
                "must be between 300 and 60000 ms",
            ));
        }
        if self.cycler.outputs.is_empty() && self.roles.contains(&Role::Cycler) {
            return Err(key_err(
                "cycler.outputs",
                "the cycler role needs at least one output",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, o) in self.cycler.outputs.iter().enumerate() {
            let k = |f: &str| format!("cycler.outputs[{i}].{f}");
            if !names.insert(o.name.as_str()) {
                return Err(key_err(
                    k("name"),
                    format!("duplicate output name `{}`", o.name),
                ));
            }
            if o.pid < 0x0010 || o.pid >= 0x1FFF {
                return Err(key_err(
                    k("pid"),
                    "must be in 0x0010..=0x1FFE (0x0000-0x000F and 0x1FFF are reserved)",
                ));
            }
            if o.bitrate < 8_000 || o.bitrate > 1_000_000_000 {
                return Err(key_err(
                    k("bitrate"),
                    "must be between 8000 and 1000000000 bit/s",
                ));
            }
            if !(1..=7).contains(&o.packets_per_datagram) {
                return Err(key_err(k("packets_per_datagram"), "must be 1..=7"));
            }
            if o.dscp > 63 {
                return Err(key_err(k("dscp"), "must be 0..=63"));
            }
            if o.ttl == 0 || o.ttl > 255 {
                return Err(key_err(k("ttl"), "must be 1..=255"));
            }
            if o.destination.port() == 0 {
                return Err(key_err(k("destination"), "port 0 is not a destination"));
            }
            o.validate_simulcrypt(&k)?;
        }
        Ok(())
    }

    /// `[scheduler]`: lease, pacing, rotation and schedules.
    fn validate_scheduler(&self) -> Result<(), ConfigError> {
        if self.scheduler.lease_seconds < 2 {
            return Err(key_err("scheduler.lease_seconds", "must be at least 2"));
        }
        let sc = &self.scheduler;
        if sc.tick_ms == 0 || sc.tick_ms > 60_000 {
            return Err(key_err("scheduler.tick_ms", "must be 1..=60000"));
        }
        if sc.purge_interval_s == 0 {
            return Err(key_err("scheduler.purge_interval_s", "must be at least 1"));
        }
        if sc.events_retention_hours == 0 {
            return Err(key_err(
                "scheduler.events_retention_hours",
                "must be at least 1 (the Cycler waits 120 s for late events)",
            ));
        }
        if sc.batch == 0 || sc.batch > 10_000 {
            return Err(key_err("scheduler.batch", "must be 1..=10000"));
        }
        if !(sc.rotation_bandwidth_share > 0.0 && sc.rotation_bandwidth_share <= 1.0) {
            return Err(key_err(
                "scheduler.rotation_bandwidth_share",
                "must be in (0, 1]",
            ));
        }
        if sc.rotation_days > 0
            && u64::from(sc.rotation_lead_hours) >= u64::from(sc.rotation_days) * 24
        {
            return Err(key_err(
                "scheduler.rotation_lead_hours",
                "must be shorter than rotation_days",
            ));
        }
        for (k, v) in [
            ("scheduler.rotation_schedule", &sc.rotation_schedule),
            ("scheduler.refresh_schedule", &sc.refresh_schedule),
            ("scheduler.revocation_schedule", &sc.revocation_schedule),
            (
                "scheduler.root_rotation_schedule",
                &sc.root_rotation_schedule,
            ),
        ] {
            if let Err(m) = crate::scheduler::Schedule::parse(v) {
                return Err(key_err(k, m));
            }
        }
        Ok(())
    }

    /// `[auth]`.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.issuer.is_empty() || a.issuer.len() > 128 {
            return Err(key_err("auth.issuer", "must be 1..=128 characters"));
        }
        if a.audience.is_empty() || a.audience.len() > 128 {
            return Err(key_err("auth.audience", "must be 1..=128 characters"));
        }
        if !(30..=86_400).contains(&a.token_lifetime_s) {
            return Err(key_err(
                "auth.token_lifetime_s",
                "must be between 30 and 86400",
            ));
        }
        if a.leeway_s > 300 {
            return Err(key_err("auth.leeway_s", "must be at most 300"));
        }
        if a.client_cache_ms > 60_000 {
            return Err(key_err("auth.client_cache_ms", "must be at most 60000"));
        }
        if !(1..=3600).contains(&a.key_refresh_s) {
            return Err(key_err("auth.key_refresh_s", "must be between 1 and 3600"));
        }
        if a.default_rate_per_s == 0 {
            return Err(key_err("auth.default_rate_per_s", "must be at least 1"));
        }
        if a.failed_token_burst == 0 {
            return Err(key_err("auth.failed_token_burst", "must be at least 1"));
        }
        if a.failed_token_per_min == 0 {
            return Err(key_err("auth.failed_token_per_min", "must be at least 1"));
        }
        Ok(())
    }

    /// `[log]`.
    fn validate_log(&self) -> Result<(), ConfigError> {
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(key_err("log.format", "must be \"text\" or \"json\""));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(key_err(
                "log.level",
                "is not a valid filter (e.g. \"info\", \"casd=debug,info\")",
            ));
        }
        Ok(())
    }

    /// The database URL without its password, for messages.
    pub fn database_display(&self) -> String {
        redact_url(self.database.url.expose())
    }
}

/// `mysql://user:pw@host/db` → `mysql://user@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.lines().count().max(1))
        .unwrap_or(1)
}

/// Secrets read from files (a Kubernetes Secret mounted read-only, mode
/// 0400): `database.password_file` becomes the password of `database.url`,
/// `peers.client.client_secret_file` the `client_secret`. The `_file` key
/// is taken out of the table, so the typed pass sees only the value. One
/// trailing newline (what `echo` and editors leave) is dropped.
fn apply_secret_files(table: &mut toml::Table) -> Result<(), ConfigError> {
    if let Some(db) = section_mut(table, &["database"]) {
        if let Some(pw) = take_secret_file(db, "database.password_file")? {
            let url = db
                .get("url")
                .and_then(|u| u.as_str())
                .ok_or_else(|| key_err("database.password_file", "needs database.url"))?;
            let mut parsed = url::Url::parse(url)
                .map_err(|_| key_err("database.url", "is not a valid mysql:// URL"))?;
            parsed
                .set_password(Some(&pw))
                .map_err(|_| key_err("database.url", "has no user to give the password to"))?;
            db.insert("url".into(), toml::Value::String(parsed.into()));
        }
    }
    if let Some(client) = section_mut(table, &["peers", "client"]) {
        if let Some(secret) = take_secret_file(client, "peers.client.client_secret_file")? {
            client.insert("client_secret".into(), toml::Value::String(secret));
        }
    }
    Ok(())
}

/// The sub-table at `path`, if there is one.
fn section_mut<'t>(table: &'t mut toml::Table, path: &[&str]) -> Option<&'t mut toml::Table> {
    path.iter()
        .try_fold(table, |t, seg| t.get_mut(*seg)?.as_table_mut())
}

/// Removes the key `name` (the last segment of the dotted path) from
/// `section` and reads the file it names.
fn take_secret_file(section: &mut toml::Table, name: &str) -> Result<Option<String>, ConfigError> {
    let key = name.rsplit('.').next().unwrap_or(name);
    let Some(v) = section.remove(key) else {
        return Ok(None);
    };
    let path = v
        .as_str()
        .ok_or_else(|| key_err(name, "must be a file path"))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| key_err(name, format!("cannot read {path}: {e}")))?;
    let value = text.strip_suffix('\n').unwrap_or(&text);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(key_err(name, format!("{path} is empty")));
    }
    Ok(Some(value.to_owned()))
}

/// Applies `CASD_A__B=value` overrides onto the table. The value is read as
/// a TOML value when it parses as one (numbers, booleans, arrays), otherwise
/// as a string. Unknown keys are then caught by the typed pass.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("CASD_") else {
            continue;
        };
        // Variables of the scripts and tests, not configuration keys.
        if matches!(rest, "CONFIG" | "STATE_DIR" | "TEST_DATABASE_URL" | "LOG")
            || rest.starts_with("TEST_")
        {
            continue;
        }
        let path: Vec<String> = if rest == "DATABASE_URL" {
            vec!["database".into(), "url".into()]
        } else {
            rest.split("__").map(|p| p.to_ascii_lowercase()).collect()
        };
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var,
                message: "empty key segment (use CASD_SECTION__KEY)".into(),
            });
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let mut cur = &mut *table;
        for seg in &path[..path.len() - 1] {
            let entry = cur
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        message: format!("`{seg}` is not a section"),
                    })
                }
            };
        }
        let last = path.last().cloned().unwrap_or_default();
        cur.insert(last, parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "[database]\nurl = \"mysql://u:pw@127.0.0.1:3306/casd\"\n[api]\nplain_http = true\n";

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(
            text,
            Path::new("t.toml"),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(MIN, &[]).unwrap();
        assert_eq!(c.cas.ca_system_id, 0x4AFF);
        assert_eq!(c.cas.max_section_bytes, 256);
        assert_eq!(c.api.body_limit, 65536);
        assert_eq!(c.cycler.outputs[0].pid, 0x0101);
        assert_eq!(c.roles.len(), 5);
    }

    #[test]
    fn redundancy_keys_are_checked() {
        let c = parse(MIN, &[("CASD_CYCLER__REDUNDANCY_GROUP", "studio-a")]).unwrap();
        assert_eq!(
            (c.cycler.redundancy_group.as_str(), c.cycler.lease_ms),
            ("studio-a", 1000)
        );
        for (key, value) in [("redundancy_group", "\"a b\""), ("lease_ms", "100")] {
            let err = parse(&format!("{MIN}[cycler]\n{key} = {value}\n"), &[]).unwrap_err();
            assert!(err.to_string().contains(&format!("cycler.{key}")), "{err}");
        }
    }

    #[test]
    fn misspelt_key_is_named() {
        let err = parse(&format!("{MIN}[cycler]\nburst_cont = 3\n"), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cycler"), "{msg}");
        assert!(msg.contains("burst_cont"), "{msg}");
    }

    #[test]
    fn bad_value_names_full_path() {
        let err = parse(&format!("{MIN}[[cycler.outputs]]\nbitrate = 5\n"), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration key `cycler.outputs[0].bitrate`: must be between 8000 and 1000000000 bit/s"
        );
        let err = parse(&format!("{MIN}[cas]\nca_system_id = \"x\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("cas.ca_system_id"), "{err}");
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let c = parse(
            MIN,
            &[
                ("CASD_API__LISTEN", "0.0.0.0:9000"),
                ("CASD_EMMG__WORKERS", "7"),
            ],
        )
        .unwrap();
        assert_eq!(c.api.listen.port(), 9000);
        assert_eq!(c.emmg.workers, 7);
        let c = parse(MIN, &[("CASD_DATABASE_URL", "mysql://a:b@h:1/x")]).unwrap();
        assert_eq!(c.database.url.expose(), "mysql://a:b@h:1/x");
        let err = parse(MIN, &[("CASD_EMMG__WORKRS", "7")]).unwrap_err();
        assert!(err.to_string().contains("emmg"), "{err}");
        assert!(err.to_string().contains("workrs"), "{err}");
    }

    #[test]
    fn database_servers_are_host_port_pairs() {
        let c = parse(
            MIN,
            &[(
                "CASD_DATABASE__SERVERS",
                r#"["db-a:3306", "192.0.2.2:3307"]"#,
            )],
        )
        .unwrap();
        assert_eq!(c.database.servers, ["db-a:3306", "192.0.2.2:3307"]);
        assert!(parse(MIN, &[]).unwrap().database.servers.is_empty());
        let err = parse(MIN, &[("CASD_DATABASE__SERVERS", r#"["db-a"]"#)]).unwrap_err();
        assert!(err.to_string().contains("database.servers"), "{err}");
        assert!(err.to_string().contains("host:port"), "{err}");
    }

    #[test]
    fn missing_database_is_named() {
        let err = parse("[api]\nplain_http = true\n", &[]).unwrap_err();
        assert!(err.to_string().contains("database"), "{err}");
    }

    #[test]
    fn plain_http_must_be_explicit() {
        let err = parse("[database]\nurl = \"mysql://u:pw@h/d\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("api.plain_http"), "{err}");
    }

    #[test]
    fn secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("casd-secretfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pw, cs) = (dir.join("db-password"), dir.join("client-secret"));
        std::fs::write(&pw, "p@ss/w:rd\n").unwrap();
        std::fs::write(&cs, "s3cret\n").unwrap();
        let text = format!(
            "[database]\nurl = \"mysql://casd@db.example:3306/casd\"\npassword_file = \"{}\"\n[api]\nplain_http = true\n\
             [peers]\nencryptor_url = \"https://enc:8443\"\n[peers.client]\ntoken_url = \"https://sms:8443/oauth/token\"\nclient_id = \"emmg\"\n",
            pw.display()
        );
        let c = parse(
            &text,
            &[(
                "CASD_PEERS__CLIENT__CLIENT_SECRET_FILE",
                cs.to_str().unwrap(),
            )],
        )
        .unwrap();
        let opts = mysql_async::Opts::from_url(c.database.url.expose()).unwrap();
        assert_eq!(opts.pass(), Some("p@ss/w:rd"));
        assert_eq!(opts.user(), Some("casd"));
        assert_eq!(c.peers.client.unwrap().client_secret.expose(), "s3cret");
        // A missing file is named with its key; nothing else is read.
        let err = parse(&text.replace("db-password", "nope"), &[]).unwrap_err();
        assert!(err.to_string().contains("database.password_file"), "{err}");
        std::fs::write(&pw, "\n").unwrap();
        let err = parse(&text, &[]).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_do_not_print() {
        let c = parse(MIN, &[]).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("pw"), "{dbg}");
        assert_eq!(c.database_display(), "mysql://u@127.0.0.1:3306/casd");
        let err = parse(
            "[database]\nurl = \"mysql://u:topsecret@h:notaport/d\"\n[api]\nplain_http=true\n",
            &[],
        )
        .unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[test]
    fn database_tls_is_required_by_default_and_checked() {
        let c = parse(MIN, &[]).unwrap();
        assert_eq!(c.database.tls, DbTlsMode::Required);
        assert_eq!(c.database.tls_ca, None);
        let with = |extra: &str| MIN.replace("[api]", &format!("{extra}\n[api]"));
        let err = parse(&with("tls = \"preferred\""), &[]).unwrap_err();
        assert!(err.to_string().contains("database.tls"), "{err}");
        let err = parse(&with("tls = \"disabled\"\ntls_ca = \"/x.pem\""), &[]).unwrap_err();
        assert!(err.to_string().contains("database.tls_ca"), "{err}");
        let err = parse(&with("tls_ca = \"/nonexistent/ca.pem\""), &[]).unwrap_err();
        assert!(
            err.to_string().contains("database.tls_ca")
                && err.to_string().contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let c = parse(&with("tls = \"disabled\""), &[]).unwrap();
        assert_eq!(c.database.tls, DbTlsMode::Disabled);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../casd.example.toml");
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.roles.len(), 5);
    }

    #[test]
    fn simulcrypt_outputs() {
        let out = "[[cycler.outputs]]\nname = \"m\"\nkind = \"simulcrypt\"\nbitrate = 300000\n";
        let c = parse(
            &format!("{MIN}{out}[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:2000\"\npayload = \"sections\"\nprotocol_version = 3\n"),
            &[],
        )
        .unwrap();
        let o = &c.cycler.outputs[0];
        assert_eq!(o.kind, OutputKind::Simulcrypt);
        let sc = o.simulcrypt.as_ref().unwrap();
        assert_eq!(
            (sc.payload, sc.protocol_version, sc.data_id, sc.keepalive_ms),
            (SimulcryptPayload::Sections, 3, 1, 10_000)
        );
        let bad = [
            ("", "simulcrypt` : kind"),
            (
                "[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:2000\"\nprotocol_version = 1\n",
                "simulcrypt.protocol_version",
            ),
            (
                "[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:0\"\n",
                "simulcrypt.mux",
            ),
            (
                "[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:1\"\nreconnect_max_ms = 10\n",
                "simulcrypt.reconnect_max_ms",
            ),
            (
                "[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:1\"\nhost = 1\n",
                "host",
            ),
        ];
        for (extra, key) in bad {
            let err = parse(&format!("{MIN}{out}{extra}"), &[])
                .unwrap_err()
                .to_string();
            let key = key.split(" :").next().unwrap();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let udp_with = "[[cycler.outputs]]\nname = \"u\"\n[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:1\"\n";
        let err = parse(&format!("{MIN}{udp_with}"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("only for kind"), "{err}");
        let rtp =
            format!("{MIN}{out}rtp = true\n[cycler.outputs.simulcrypt]\nmux = \"127.0.0.1:1\"\n");
        assert!(parse(&rtp, &[]).unwrap_err().to_string().contains(".rtp"));
    }

    #[test]
    fn metrics_listen_default_off_and_bad() {
        let c = parse(MIN, &[]).unwrap();
        assert_eq!(
            c.metrics.listen_addr(),
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let off = parse(&format!("{MIN}[metrics]\nlisten = \"\"\n"), &[]).unwrap();
        assert_eq!(off.metrics.listen_addr(), None);
        let err = parse(&format!("{MIN}[metrics]\nlisten = \"localhost\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }
}
