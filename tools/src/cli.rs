//! The `casd-probe` command line (the capture loop is in `capture.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::capture::{capture, Recorders, STOP};
use crate::decode::ProbeConfig;
use crate::keys::KeySet;
use crate::record::{PcapOut, TsWriter};
use crate::report::Printer;

#[derive(Parser, Debug)]
#[command(
    name = "casd-probe",
    version,
    about = "Capture, decode and audit the EMM stream casd puts on air",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Decode and print what is on air (the default command).
    Capture(CaptureArgs),
    /// Compare what is on air with the `emms` table; exit 1 when they differ.
    Audit(crate::audit::AuditArgs),
    /// Simulate a DVB SimulCrypt MUX (EMMG/PDG<=>MUX, ETSI TS 103 197) and
    /// decode what casd sends it.
    SimulcryptMux(crate::mux::MuxArgs),
}

#[derive(Args, Debug, Clone)]
#[group(id = "input", required = true, multiple = false)]
pub struct InputSel {
    /// Listen for UDP on ADDR:PORT (unicast, or a multicast group to join).
    #[arg(long, value_name = "ADDR:PORT", group = "input")]
    pub udp: Option<SocketAddr>,
    /// Read a pcap or pcapng file (UDP in IPv4).
    #[arg(long, value_name = "FILE", group = "input")]
    pub pcap: Option<PathBuf>,
    /// Read a raw .ts file of 188-byte packets ("-" for stdin).
    #[arg(long, value_name = "FILE", group = "input")]
    pub ts: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    #[command(flatten)]
    pub sel: InputSel,
    /// Interface to join the multicast group on (or to bind a unicast listener to).
    #[arg(long, value_name = "NAME", requires = "udp")]
    pub interface: Option<String>,
    /// Strip an RTP header from every datagram (default: auto-detect RFC 2250).
    #[arg(long, conflicts_with = "no_rtp")]
    pub rtp: bool,
    /// Never strip RTP headers.
    #[arg(long)]
    pub no_rtp: bool,
    /// pcap input: only UDP datagrams to this destination port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Stop after N TS packets.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after S seconds (live: wall clock; pcap: capture time).
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    /// .ts input: time packets by their position at this TS bitrate (bit/s),
    /// so bitrates and cycle times come out in seconds.
    #[arg(long, value_name = "BPS")]
    pub ts_bitrate: Option<u64>,
    /// A progress line on stderr (default: only when stderr is a terminal).
    #[arg(long)]
    pub progress: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct DecodeArgs {
    /// PID(s) to reassemble sections on besides the CAT (default 0x0101;
    /// decimal or 0x hex). EMM PIDs announced in the CAT are added.
    #[arg(long = "pid", value_name = "PID", value_parser = parse_pid)]
    pub pids: Vec<u16>,
    /// Reassemble sections on every PID (except null packets).
    #[arg(long)]
    pub all_pids: bool,
    /// Do not follow the CAT's CA_descriptors to EMM PIDs.
    #[arg(long)]
    pub no_follow_cat: bool,
    /// PMK (32 hex digits), or VERSION=HEX: every device's DUK derives from it.
    #[arg(long, value_name = "[VERSION=]HEX")]
    pub pmk: Vec<String>,
    /// One device's DUK.
    #[arg(long, value_name = "DEVICE_ID=HEX")]
    pub duk: Vec<String>,
    /// A group key.
    #[arg(long, value_name = "GROUP:VERSION=HEX")]
    pub gk: Vec<String>,
    /// A global key.
    #[arg(long, value_name = "VERSION=HEX")]
    pub glk: Vec<String>,
    /// A JSON key file (see docs/tools.md).
    #[arg(long, value_name = "FILE")]
    pub keys: Vec<PathBuf>,
    /// Do not use keys delivered in opened unique EMMs for group/global EMMs.
    #[arg(long)]
    pub no_learn_keys: bool,
}

fn parse_pid(s: &str) -> Result<u16, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a PID"))?;
    if v > 0x1FFF {
        return Err(format!("PID {v} does not fit in 13 bits"));
    }
    Ok(v)
}

impl DecodeArgs {
    pub fn keys(&self) -> anyhow::Result<KeySet> {
        let mut ks = KeySet::default();
        for f in &self.keys {
            ks.load_file(f)?;
        }
        for a in &self.pmk {
            ks.parse_pmk_arg(a)?;
        }
        for a in &self.duk {
            ks.parse_duk_arg(a)?;
        }
        for a in &self.gk {
            ks.parse_gk_arg(a)?;
        }
        for a in &self.glk {
            ks.parse_glk_arg(a)?;
        }
        Ok(ks)
    }

    pub fn probe_config(&self, input: &InputArgs) -> anyhow::Result<ProbeConfig> {
        let mut pids = self.pids.clone();
        if pids.is_empty() {
            pids.push(carousel::Pid::DEFAULT_EMM.value());
        }
        Ok(ProbeConfig {
            section_pids: pids,
            follow_cat: !self.no_follow_cat,
            all_pids: self.all_pids,
            keys: self.keys()?,
            learn_keys: !self.no_learn_keys,
            ts_bitrate: input.ts_bitrate,
            ..ProbeConfig::default()
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// JSON lines on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print a summary every N seconds (plus the one at the end).
    #[arg(long, value_name = "N")]
    pub summary_every: Option<f64>,
    /// Print every repetition of a section, not only its first sighting.
    #[arg(long)]
    pub repeats: bool,
    /// Only the summary (no per-section records).
    #[arg(long, short)]
    pub quiet: bool,
    /// Print delivered GROUP_KEY / GLOBAL_KEY bytes. Test keys only!
    #[arg(long)]
    pub show_keys: bool,
    /// EMMs listed one by one in the summary.
    #[arg(long = "per-emm", value_name = "N", default_value_t = 1000)]
    pub per_emm: usize,
    /// Record the TS packets to a .ts file.
    #[arg(long, value_name = "FILE")]
    pub write_ts: Option<PathBuf>,
    /// Record the datagrams to a pcap file (Ethernet/IPv4/UDP).
    #[arg(long, value_name = "FILE")]
    pub write_pcap: Option<PathBuf>,
    /// Exit 1 if any CRC, CC, MAC, sync or section error was seen.
    #[arg(long)]
    pub fail_on_errors: bool,
}

static SIGNALS: AtomicU32 = AtomicU32::new(0);

fn install_signal_handler() {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    STOP.store(true, Ordering::SeqCst);
                    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
                        // Second signal: the user does not want to wait.
                        std::process::exit(130);
                    }
                }
            });
        });
}

fn run_capture(a: CaptureArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = a.decode.probe_config(&a.input)?;
    cfg.show_keys = a.show_keys;
    cfg.repeats = a.repeats;
    let mut rec = Recorders {
        ts: a.write_ts.as_deref().map(TsWriter::create).transpose()?,
        pcap: a.write_pcap.as_deref().map(PcapOut::create).transpose()?,
    };
    let stdout = std::io::stdout();
    let mut printer = Printer::new(std::io::BufWriter::new(stdout.lock()), a.json);
    let quiet = a.quiet;
    let live = a.input.sel.udp.is_some();
    let mut emit = |v: &Value| -> std::io::Result<()> {
        let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
        if quiet && ty != "summary" {
            return Ok(());
        }
        if ty == "start" && !a.json {
            eprintln!("casd-probe: reading {}", v["input"].as_str().unwrap_or("?"));
            return Ok(());
        }
        printer.emit(v)?;
        if live || ty == "start" {
            printer.flush()?;
        }
        Ok(())
    };
    let cap = capture(
        &a.input,
        cfg,
        &mut rec,
        a.summary_every,
        a.per_emm,
        &mut emit,
    )?;
    let summary = cap.probe.summary(true, a.per_emm);
    match emit(&summary) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("writing the output")?,
    }
    match printer.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("writing the output")?,
    }
    if let Some(w) = rec.ts.take() {
        w.finish()?;
    }
    if let Some(p) = rec.pcap.take() {
        p.finish()?;
    }
    if a.fail_on_errors && cap.probe.counters.total_errors() > 0 {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit codes: 0 fine, 1 errors found (--fail-on-errors) or audit
/// differences, 2 could not run (bad arguments, files, keys, interfaces).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    install_signal_handler();
    let r = match cli.command {
        Some(Cmd::Capture(a)) => run_capture(a),
        None => run_capture(cli.capture),
        Some(Cmd::Audit(a)) => crate::audit::run(a),
        Some(Cmd::SimulcryptMux(a)) => crate::mux::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("casd-probe: error: {}", msg.join(": "));
            ExitCode::from(2)
        }
    }
}
