//! The `casd-probe` command line and the capture loop shared by the
//! capture and audit commands.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::decode::{Probe, ProbeConfig, Resync, PACKET_LEN};
use crate::input::{ChunkKind, Next, PcapSource, Source, TsSource, UdpSource};
use crate::keys::KeySet;
use crate::net::{self, RtpMode};
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

/// Set by SIGINT / SIGTERM: finish the capture and print the summary.
pub static STOP: AtomicBool = AtomicBool::new(false);
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

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Recording targets.
#[derive(Default)]
pub struct Recorders {
    pub ts: Option<TsWriter>,
    pub pcap: Option<PcapOut>,
}

/// What a finished capture leaves.
pub struct Captured {
    pub probe: Probe,
    /// Wall-clock capture window (unix seconds), when the input has one.
    pub window: Option<(f64, f64)>,
    pub input: String,
}

fn open_source(input: &InputArgs) -> anyhow::Result<(Box<dyn Source>, String)> {
    if let Some(a) = input.sel.udp {
        let s = UdpSource::open(a, input.interface.as_deref())?;
        let name = match &input.interface {
            Some(i) => format!("udp {a} on {i}"),
            None => format!(
                "udp {}",
                if a.ip().is_multicast() {
                    a.to_string()
                } else {
                    s.local_addr().to_string()
                }
            ),
        };
        return Ok((Box::new(s), name));
    }
    if let Some(p) = &input.sel.pcap {
        return Ok((
            Box::new(PcapSource::open(p, input.port)?),
            format!("pcap {}", p.display()),
        ));
    }
    if let Some(p) = &input.sel.ts {
        return Ok((Box::new(TsSource::open(p)?), format!("ts {}", p.display())));
    }
    bail!("no input: give --udp, --pcap or --ts")
}

/// Runs a capture to its end (EOF, --count, --duration or a signal),
/// handing every record to `emit`.
pub fn capture(
    input: &InputArgs,
    cfg: ProbeConfig,
    rec: &mut Recorders,
    summary_every: Option<f64>,
    per_emm: usize,
    emit: &mut dyn FnMut(&Value) -> std::io::Result<()>,
) -> anyhow::Result<Captured> {
    if input.interface.is_some() && input.sel.udp.is_none() {
        bail!("--interface needs --udp");
    }
    let (mut src, name) = open_source(input)?;
    let wall = src.wall_clock();
    let rtp = if input.rtp {
        RtpMode::Force
    } else if input.no_rtp {
        RtpMode::Off
    } else {
        RtpMode::Auto
    };
    let mut probe = Probe::new(cfg);
    let started = Instant::now();
    let start_unix = unix_now();
    emit(&json!({"type": "start", "input": name, "at": start_unix}))?;
    let progress = input.progress || std::io::stderr().is_terminal();
    let tty = std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    let mut last_summary_wall = Instant::now();
    let mut last_summary_t: Option<f64> = None;
    let mut first_chunk_time: Option<f64> = None;
    let mut resync = Resync::new();
    let count_limit = input.count.unwrap_or(u64::MAX);
    let mut out_err: Option<std::io::Error> = None;
    let mut records: Vec<Value> = Vec::new();
    // Datagrams synthesised for --write-pcap from a byte stream.
    let mut pcap_ts_index: u64 = 0;
    let mut pcap_group: Vec<u8> = Vec::with_capacity(7 * PACKET_LEN);
    let synth_src: SocketAddrV4 = "127.0.0.1:5501".parse().expect("literal address");
    let synth_dst: SocketAddrV4 = "127.0.0.1:5500".parse().expect("literal address");
    let synth_rate = input.ts_bitrate.filter(|&b| b > 0).unwrap_or(2_000_000) as f64;
    let mut done = false;

    macro_rules! flush_records {
        () => {
            for r in records.drain(..) {
                if out_err.is_none() {
                    if let Err(e) = emit(&r) {
                        out_err = Some(e);
                    }
                }
            }
        };
    }

    while !done {
        if STOP.load(Ordering::SeqCst) || out_err.is_some() {
            break;
        }
        if let (Some(d), true) = (input.duration, input.sel.udp.is_some()) {
            if started.elapsed().as_secs_f64() >= d {
                break;
            }
        }
        let chunk = match src.next()? {
            Next::End => break,
            Next::Idle => None,
            Next::Chunk(c) => Some(c),
        };
        if let Some(c) = chunk {
            if let (Some(d), Some(t), false) = (input.duration, c.time, input.sel.udp.is_some()) {
                let f = *first_chunk_time.get_or_insert(t);
                if t - f > d {
                    break;
                }
            }
            let mut push = |probe: &mut Probe,
                            pkt: &[u8],
                            time: Option<f64>,
                            rec: &mut Recorders|
             -> anyhow::Result<bool> {
                if probe.counters.packets >= count_limit {
                    return Ok(false);
                }
                if let Some(w) = rec.ts.as_mut() {
                    w.packet(pkt)?;
                }
                probe.push_packet(pkt, time, &mut |r| records.push(r));
                Ok(true)
            };
            match &c.kind {
                ChunkKind::Datagram { src: s, dst } => {
                    probe.counters.datagrams += 1;
                    if let Some(p) = rec.pcap.as_mut() {
                        p.datagram(c.time.unwrap_or(start_unix), *s, *dst, &c.data)?;
                    }
                    let (ts, stripped) = net::strip_rtp(&c.data, rtp);
                    if stripped {
                        probe.counters.rtp_datagrams += 1;
                    }
                    for pkt in ts.chunks(PACKET_LEN) {
                        if !push(&mut probe, pkt, c.time, rec)? {
                            done = true;
                            break;
                        }
                    }
                }
                ChunkKind::Stream => {
                    let mut err: Option<anyhow::Error> = None;
                    let mut stop = false;
                    resync.push(&c.data, &mut |p| {
                        if stop {
                            return;
                        }
                        match push(&mut probe, p, None, &mut *rec) {
                            Ok(true) => {}
                            Ok(false) => {
                                stop = true;
                                return;
                            }
                            Err(e) => {
                                err = Some(e);
                                stop = true;
                                return;
                            }
                        }
                        if let Some(pc) = rec.pcap.as_mut() {
                            pcap_group.extend_from_slice(p);
                            if pcap_group.len() == 7 * PACKET_LEN {
                                // A datagram's time is its first packet's.
                                let t =
                                    start_unix + (pcap_ts_index * 7) as f64 * 1504.0 / synth_rate;
                                if let Err(e) = pc.datagram(t, synth_src, synth_dst, &pcap_group) {
                                    err = Some(e);
                                    stop = true;
                                }
                                pcap_group.clear();
                                pcap_ts_index += 1;
                            }
                        }
                    });
                    if let Some(e) = err {
                        return Err(e);
                    }
                    if stop {
                        done = true;
                    }
                }
            }
        }
        flush_records!();
        // Periodic summary.
        if let Some(every) = summary_every.filter(|e| *e > 0.0) {
            let due = match (wall && input.sel.udp.is_none(), probe.time_span()) {
                (true, Some((_, last))) => {
                    let base = *last_summary_t.get_or_insert(last);
                    if last - base >= every {
                        last_summary_t = Some(last);
                        true
                    } else {
                        false
                    }
                }
                _ => {
                    if last_summary_wall.elapsed().as_secs_f64() >= every {
                        last_summary_wall = Instant::now();
                        true
                    } else {
                        false
                    }
                }
            };
            if due {
                records.push(probe.summary(false, per_emm));
                flush_records!();
            }
        }
        if progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let (read, total) = src.progress();
            let pct = total
                .filter(|t| *t > 0)
                .map(|t| format!(" ({:.0}%)", read as f64 * 100.0 / t as f64))
                .unwrap_or_default();
            let c = &probe.counters;
            let line = format!(
                "casd-probe: {:.1} MB{pct}, {} packets, {} sections, {} errors, {:.0} s",
                read as f64 / 1e6,
                c.packets,
                c.sections,
                c.total_errors(),
                started.elapsed().as_secs_f64()
            );
            let mut e = std::io::stderr();
            let _ = if tty {
                write!(e, "\r{line}\x1b[K")
            } else {
                writeln!(e, "{line}")
            };
        }
    }
    // End of a byte stream: the last packet and any partial one.
    if !done && !STOP.load(Ordering::SeqCst) {
        let mut pkts: Vec<Vec<u8>> = Vec::new();
        let left = resync.finish(&mut |p| pkts.push(p.to_vec()));
        for p in pkts {
            if probe.counters.packets >= count_limit {
                break;
            }
            if let Some(w) = rec.ts.as_mut() {
                w.packet(&p)?;
            }
            if rec.pcap.is_some() {
                pcap_group.extend_from_slice(&p);
            }
            probe.push_packet(&p, None, &mut |r| records.push(r));
        }
        probe.counters.trailing_bytes += left as u64;
    }
    if let Some(pc) = rec.pcap.as_mut() {
        if !pcap_group.is_empty() {
            let t = start_unix + (pcap_ts_index * 7) as f64 * 1504.0 / synth_rate;
            pc.datagram(t, synth_src, synth_dst, &pcap_group)?;
        }
    }
    probe.counters.skipped_bytes += resync.skipped_bytes;
    probe.counters.sync_losses += resync.sync_losses;
    probe.counters.frames_skipped += src.skipped();
    flush_records!();
    if progress && tty {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
    if let Some(w) = src.warning() {
        eprintln!("casd-probe: warning: {w}");
    }
    if let Some(e) = out_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing the output");
        }
    }
    let window = if wall {
        if input.sel.udp.is_some() {
            Some((start_unix, unix_now()))
        } else {
            probe.time_span()
        }
    } else {
        None
    };
    Ok(Captured {
        probe,
        window,
        input: name,
    })
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
