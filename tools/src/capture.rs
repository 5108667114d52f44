//! The capture loop shared by the capture and audit commands: read chunks
//! from a source, cut them into TS packets, record them, decode them and hand
//! every record to the caller, until EOF, `--count`, `--duration` or a signal.
//!
//! The loop itself ([`capture`]) only sequences named steps; the decisions
//! (when the duration is up, when a periodic summary is due, what the capture
//! window is, what the progress line says) are small pure functions.

use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::InputArgs;
use crate::decode::{Counters, Probe, ProbeConfig, Resync, PACKET_LEN};
use crate::input::{Chunk, ChunkKind, Next, PcapSource, Source, TsSource, UdpSource};
use crate::net::{self, RtpMode};
use crate::record::{PcapOut, TsWriter};

/// Set by SIGINT / SIGTERM: finish the capture and print the summary.
pub static STOP: AtomicBool = AtomicBool::new(false);

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

/// Where a record goes (stdout, the audit's collector).
pub type Emit<'a> = dyn FnMut(&Value) -> std::io::Result<()> + 'a;

/// Runs a capture to its end (EOF, --count, --duration or a signal),
/// handing every record to `emit`.
pub fn capture(
    input: &InputArgs,
    cfg: ProbeConfig,
    rec: &mut Recorders,
    summary_every: Option<f64>,
    per_emm: usize,
    emit: &mut Emit<'_>,
) -> anyhow::Result<Captured> {
    if input.interface.is_some() && input.sel.udp.is_none() {
        bail!("--interface needs --udp");
    }
    let (src, name) = open_source(input)?;
    let mut c = Capture::new(input, src, cfg);
    emit(&json!({"type": "start", "input": name, "at": c.start_unix}))?;
    let mut clock = SummaryClock::new(summary_every, c.wall && !c.limits.live);
    let mut progress = Progress::new(input.progress);
    let mut done = false;
    while !done && !c.interrupted() {
        if c.limits.live_time_up(c.started.elapsed().as_secs_f64()) {
            break;
        }
        let chunk = match c.src.next()? {
            Next::End => break,
            Next::Idle => None,
            Next::Chunk(ch) => Some(ch),
        };
        if let Some(ch) = chunk {
            if c.limits.past_duration(ch.time) {
                break;
            }
            done = !c.feed(&ch, rec)?;
        }
        c.flush(emit);
        if clock.due(c.sink.probe.time_span()) {
            let summary = c.sink.probe.summary(false, per_emm);
            c.sink.records.push(summary);
            c.flush(emit);
        }
        progress.tick(&*c.src, &c.sink.probe.counters, c.started);
    }
    if !done && !STOP.load(Ordering::SeqCst) {
        c.drain_stream(rec)?;
    }
    c.finish(rec, emit, &progress, name)
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

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn rtp_mode(input: &InputArgs) -> RtpMode {
    if input.rtp {
        RtpMode::Force
    } else if input.no_rtp {
        RtpMode::Off
    } else {
        RtpMode::Auto
    }
}

/// One capture in progress.
struct Capture<'a> {
    src: Box<dyn Source + 'a>,
    /// Chunk times are wall-clock (live, pcap).
    wall: bool,
    rtp: RtpMode,
    limits: Limits,
    sink: Sink,
    resync: Resync,
    synth: PcapSynth,
    started: Instant,
    start_unix: f64,
    /// The first output error; the capture stops at the next turn.
    out_err: Option<std::io::Error>,
}

impl<'a> Capture<'a> {
    fn new(input: &InputArgs, src: Box<dyn Source + 'a>, cfg: ProbeConfig) -> Self {
        let start_unix = unix_now();
        Capture {
            wall: src.wall_clock(),
            src,
            rtp: rtp_mode(input),
            limits: Limits {
                duration: input.duration,
                live: input.sel.udp.is_some(),
                first_t: None,
            },
            sink: Sink {
                probe: Probe::new(cfg),
                records: Vec::new(),
                count_limit: input.count.unwrap_or(u64::MAX),
            },
            resync: Resync::new(),
            synth: PcapSynth::new(start_unix, input.ts_bitrate),
            started: Instant::now(),
            start_unix,
            out_err: None,
        }
    }

    fn interrupted(&self) -> bool {
        STOP.load(Ordering::SeqCst) || self.out_err.is_some()
    }

    /// Feeds one chunk; false once --count is reached.
    fn feed(&mut self, ch: &Chunk, rec: &mut Recorders) -> anyhow::Result<bool> {
        match ch.kind {
            ChunkKind::Datagram { src, dst } => self.feed_datagram(ch, src, dst, rec),
            ChunkKind::Stream => self.feed_stream(&ch.data, rec),
        }
    }

    fn feed_datagram(
        &mut self,
        ch: &Chunk,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        rec: &mut Recorders,
    ) -> anyhow::Result<bool> {
        self.sink.probe.counters.datagrams += 1;
        if let Some(p) = rec.pcap.as_mut() {
            p.datagram(ch.time.unwrap_or(self.start_unix), src, dst, &ch.data)?;
        }
        let (ts, stripped) = net::strip_rtp(&ch.data, self.rtp);
        if stripped {
            self.sink.probe.counters.rtp_datagrams += 1;
        }
        for pkt in ts.chunks(PACKET_LEN) {
            if !self.sink.packet(pkt, ch.time, rec)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn feed_stream(&mut self, data: &[u8], rec: &mut Recorders) -> anyhow::Result<bool> {
        let (sink, synth) = (&mut self.sink, &mut self.synth);
        let mut outcome: anyhow::Result<bool> = Ok(true);
        self.resync.push(data, &mut |p| {
            if !matches!(outcome, Ok(true)) {
                return;
            }
            outcome = sink.packet(p, None, rec).and_then(|more| {
                if let (true, Some(pc)) = (more, rec.pcap.as_mut()) {
                    synth.packet(p, pc)?;
                }
                Ok(more)
            });
        });
        outcome
    }

    /// End of a byte stream: the last packet and any partial one.
    fn drain_stream(&mut self, rec: &mut Recorders) -> anyhow::Result<()> {
        let mut pkts: Vec<Vec<u8>> = Vec::new();
        let left = self.resync.finish(&mut |p| pkts.push(p.to_vec()));
        for p in pkts {
            if !self.sink.packet(&p, None, rec)? {
                break;
            }
            if rec.pcap.is_some() {
                self.synth.hold(&p);
            }
        }
        self.sink.probe.counters.trailing_bytes += left as u64;
        Ok(())
    }

    /// Hands the pending records to `emit`; after the first output error
    /// the rest are dropped.
    fn flush(&mut self, emit: &mut Emit<'_>) {
        for r in self.sink.records.drain(..) {
            if self.out_err.is_none() {
                if let Err(e) = emit(&r) {
                    self.out_err = Some(e);
                }
            }
        }
    }

    fn finish(
        mut self,
        rec: &mut Recorders,
        emit: &mut Emit<'_>,
        progress: &Progress,
        input: String,
    ) -> anyhow::Result<Captured> {
        if let Some(pc) = rec.pcap.as_mut() {
            self.synth.finish(pc)?;
        }
        let c = &mut self.sink.probe.counters;
        c.skipped_bytes += self.resync.skipped_bytes;
        c.sync_losses += self.resync.sync_losses;
        c.frames_skipped += self.src.skipped();
        self.flush(emit);
        progress.clear();
        if let Some(w) = self.src.warning() {
            eprintln!("casd-probe: warning: {w}");
        }
        if let Some(e) = self.out_err {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e).context("writing the output");
            }
        }
        let probe = self.sink.probe;
        let window = capture_window(
            self.wall,
            self.limits.live,
            (self.start_unix, unix_now()),
            probe.time_span(),
        );
        Ok(Captured {
            probe,
            window,
            input,
        })
    }
}

/// The decoder and what it has said since the last flush.
struct Sink {
    probe: Probe,
    records: Vec<Value>,
    count_limit: u64,
}

impl Sink {
    /// Records and decodes one packet; false (and nothing done) once
    /// --count packets have been taken.
    fn packet(
        &mut self,
        pkt: &[u8],
        time: Option<f64>,
        rec: &mut Recorders,
    ) -> anyhow::Result<bool> {
        if self.probe.counters.packets >= self.count_limit {
            return Ok(false);
        }
        if let Some(w) = rec.ts.as_mut() {
            w.packet(pkt)?;
        }
        let records = &mut self.records;
        self.probe.push_packet(pkt, time, &mut |r| records.push(r));
        Ok(true)
    }
}

/// --duration: by the wall clock for live input, else by capture time.
#[derive(Debug)]
struct Limits {
    duration: Option<f64>,
    live: bool,
    first_t: Option<f64>,
}

impl Limits {
    fn live_time_up(&self, elapsed_s: f64) -> bool {
        self.live && self.duration.is_some_and(|d| elapsed_s >= d)
    }

    /// True for a file chunk more than --duration after the first one.
    fn past_duration(&mut self, t: Option<f64>) -> bool {
        match (self.duration, t, self.live) {
            (Some(d), Some(t), false) => t - *self.first_t.get_or_insert(t) > d,
            _ => false,
        }
    }
}

/// The wall-clock window of a capture: the run itself for live input, the
/// capture times for a pcap, none for a .ts file.
fn capture_window(
    wall: bool,
    live: bool,
    run: (f64, f64),
    span: Option<(f64, f64)>,
) -> Option<(f64, f64)> {
    match (wall, live) {
        (false, _) => None,
        (true, true) => Some(run),
        (true, false) => span,
    }
}

/// When the periodic summary (--summary-every) is due: by capture time for
/// a file with wall-clock times, else by the wall clock.
struct SummaryClock {
    every: Option<f64>,
    by_capture_time: bool,
    last_wall: Instant,
    last_t: Option<f64>,
}

impl SummaryClock {
    fn new(every: Option<f64>, by_capture_time: bool) -> Self {
        SummaryClock {
            every: every.filter(|e| *e > 0.0),
            by_capture_time,
            last_wall: Instant::now(),
            last_t: None,
        }
    }

    /// `span` is the capture's time span so far.
    fn due(&mut self, span: Option<(f64, f64)>) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        match (self.by_capture_time, span) {
            (true, Some((_, last))) => {
                let base = *self.last_t.get_or_insert(last);
                let due = last - base >= every;
                if due {
                    self.last_t = Some(last);
                }
                due
            }
            _ => {
                let due = self.last_wall.elapsed().as_secs_f64() >= every;
                if due {
                    self.last_wall = Instant::now();
                }
                due
            }
        }
    }
}

/// The progress line on stderr, once a second.
struct Progress {
    on: bool,
    tty: bool,
    last: Instant,
}

impl Progress {
    fn new(asked: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        Progress {
            on: asked || tty,
            tty,
            last: Instant::now(),
        }
    }

    fn tick(&mut self, src: &dyn Source, c: &Counters, started: Instant) {
        if !self.on || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        let line = progress_line(src.progress(), c, started.elapsed().as_secs_f64());
        let mut e = std::io::stderr();
        let _ = if self.tty {
            write!(e, "\r{line}\x1b[K")
        } else {
            writeln!(e, "{line}")
        };
    }

    /// Clears a progress line left on a terminal.
    fn clear(&self) {
        if self.on && self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

fn progress_line((read, total): (u64, Option<u64>), c: &Counters, elapsed_s: f64) -> String {
    let pct = total
        .filter(|t| *t > 0)
        .map(|t| format!(" ({:.0}%)", read as f64 * 100.0 / t as f64))
        .unwrap_or_default();
    format!(
        "casd-probe: {:.1} MB{pct}, {} packets, {} sections, {} errors, {:.0} s",
        read as f64 / 1e6,
        c.packets,
        c.sections,
        c.total_errors(),
        elapsed_s
    )
}

/// Datagrams made up for --write-pcap from a byte stream: 7 packets each,
/// timed by their position at the TS bitrate (2 Mbit/s when not given).
struct PcapSynth {
    group: Vec<u8>,
    sent: u64,
    start_unix: f64,
    bitrate: f64,
}

impl PcapSynth {
    const PACKETS: usize = 7;
    const SRC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5501);
    const DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5500);

    fn new(start_unix: f64, ts_bitrate: Option<u64>) -> Self {
        PcapSynth {
            group: Vec::with_capacity(Self::PACKETS * PACKET_LEN),
            sent: 0,
            start_unix,
            bitrate: ts_bitrate.filter(|&b| b > 0).unwrap_or(2_000_000) as f64,
        }
    }

    /// The next datagram's time: its first packet's.
    fn time(&self) -> f64 {
        let bits = (self.sent * Self::PACKETS as u64) as f64 * (PACKET_LEN * 8) as f64;
        self.start_unix + bits / self.bitrate
    }

    /// Adds a packet and writes the datagram once it is full.
    fn packet(&mut self, p: &[u8], out: &mut PcapOut) -> anyhow::Result<()> {
        self.hold(p);
        if self.group.len() < Self::PACKETS * PACKET_LEN {
            return Ok(());
        }
        let written = out.datagram(self.time(), Self::SRC, Self::DST, &self.group);
        self.group.clear();
        self.sent += 1;
        written
    }

    /// Adds a packet to the datagram being made, without writing it.
    fn hold(&mut self, p: &[u8]) {
        self.group.extend_from_slice(p);
    }

    /// Writes what is left (the end of the stream may overfill it).
    fn finish(&mut self, out: &mut PcapOut) -> anyhow::Result<()> {
        if self.group.is_empty() {
            return Ok(());
        }
        out.datagram(self.time(), Self::SRC, Self::DST, &self.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_counts_from_the_first_chunk_of_a_file() {
        let mut l = Limits {
            duration: Some(2.0),
            live: false,
            first_t: None,
        };
        assert!(!l.live_time_up(100.0));
        assert!(!l.past_duration(Some(10.0)));
        assert!(!l.past_duration(None));
        assert!(!l.past_duration(Some(12.0)));
        assert!(l.past_duration(Some(12.1)));
        let live = Limits { live: true, ..l };
        assert!(!live.live_time_up(1.9));
        assert!(live.live_time_up(2.0));
        let mut none = Limits {
            duration: None,
            live: true,
            first_t: None,
        };
        assert!(!none.live_time_up(1e9) && !none.past_duration(Some(1e9)));
    }

    #[test]
    fn window_by_input_kind() {
        let (run, span) = ((1.0, 2.0), Some((5.0, 6.0)));
        assert_eq!(capture_window(false, false, run, span), None);
        assert_eq!(capture_window(true, true, run, span), Some(run));
        assert_eq!(capture_window(true, false, run, span), span);
    }

    #[test]
    fn summary_due_by_capture_time() {
        let mut c = SummaryClock::new(Some(10.0), true);
        assert!(!c.due(Some((0.0, 100.0))));
        assert!(!c.due(Some((0.0, 109.9))));
        assert!(c.due(Some((0.0, 110.0))));
        assert!(!c.due(Some((0.0, 115.0))));
        assert!(c.due(Some((0.0, 120.0))));
        // Off when not asked for, or asked for with a period of zero.
        assert!(!SummaryClock::new(None, true).due(Some((0.0, 1e9))));
        assert!(!SummaryClock::new(Some(0.0), false).due(None));
    }

    #[test]
    fn progress_line_text() {
        let c = Counters {
            packets: 7,
            sections: 3,
            ..Counters::default()
        };
        assert_eq!(
            progress_line((2_500_000, Some(10_000_000)), &c, 4.4),
            "casd-probe: 2.5 MB (25%), 7 packets, 3 sections, 0 errors, 4 s"
        );
        assert_eq!(
            progress_line((0, Some(0)), &c, 0.0),
            "casd-probe: 0.0 MB, 7 packets, 3 sections, 0 errors, 0 s"
        );
    }

    #[test]
    fn synthesised_datagram_times_follow_the_bitrate() {
        let mut s = PcapSynth::new(100.0, Some(1504 * 7));
        assert_eq!(s.time(), 100.0);
        s.sent = 3;
        assert_eq!(s.time(), 103.0);
        assert_eq!(PcapSynth::new(0.0, Some(0)).bitrate, 2_000_000.0);
    }
}
