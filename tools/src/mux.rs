//! A DVB SimulCrypt MUX simulator (the MUX side of ETSI TS 103 197's
//! EMMG/PDG ⇔ MUX interface) for tests and operators' labs:
//! `casd-probe simulcrypt-mux --listen ADDR`.
//!
//! It accepts EMMG connections, answers channel_setup / stream_setup /
//! stream_BW_request (allocating the request, a cap, or 0 to refuse),
//! answers tests and sends its own, checks every message (the codec's
//! parameter tables, then the protocol's order, the ids and the data
//! format, and the data rate against the allocation) and reports each
//! violation, answering it with the spec's error_status. What arrives in
//! data_provision is decoded by the probe's [`Probe`] (sections, CRC, MAC
//! and, with keys, the commands), TS packets as they are, sections
//! packetized on the EMM PID first. On command it closes its connections,
//! restarts (closes, stops listening, listens again), sends an
//! error_status, raw bytes, a new allocation, or stops reading (stalls).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use carousel::simulcrypt::{
    read_message, Channel, ErrorStatus, Message, MessageType, ParseError, ReadError, Stream,
};
use carousel::ts::{Packetizer, PACKET_LEN};
use carousel::{Pid, Section};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::decode::{Probe, ProbeConfig};

/// Largest message the simulator reads (a data_provision with a few
/// datagrams fits many times over).
pub const MAX_MESSAGE: usize = 65_535;

/// How the simulated MUX behaves.
#[derive(Debug, Clone)]
pub struct MuxSimConfig {
    pub listen: SocketAddr,
    /// Also take data_provision over UDP on this address.
    pub udp: Option<SocketAddr>,
    /// protocol_version it speaks.
    pub version: u8,
    /// Allocate at most this (kbit/s); `None`: what is asked.
    pub cap_kbps: Option<u16>,
    /// Allocate 0 kbit/s (refuse every stream).
    pub refuse: bool,
    /// Send channel_test + stream_test this often.
    pub test_interval: Option<Duration>,
    /// PID to packetize received sections on (section mode).
    pub pid: Pid,
    pub probe: ProbeConfig,
    /// Keep every datagram received, by connection ([`MuxSim::data`]; for
    /// tests: memory grows with the data).
    pub keep_data: bool,
}

impl MuxSimConfig {
    pub fn new(listen: SocketAddr) -> MuxSimConfig {
        MuxSimConfig {
            listen,
            udp: None,
            version: 2,
            cap_kbps: None,
            refuse: false,
            test_interval: None,
            pid: Pid::DEFAULT_EMM,
            probe: ProbeConfig::default(),
            keep_data: false,
        }
    }
}

/// What happened, in order, with when (the monotonic clock).
#[derive(Debug, Clone)]
pub struct MuxEvent {
    pub at: Instant,
    /// Connection number (1, 2, ...; 0: the UDP data path).
    pub conn: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Connected,
    Closed(String),
    /// A well-formed message received.
    Received(MessageType),
    /// One datagram parameter of a data_provision: its bytes.
    Data(usize),
    Allocated(u16),
    /// A protocol violation, answered with this status when it has one.
    Violation(Option<ErrorStatus>, String),
}

/// A command to every open connection.
#[derive(Debug, Clone)]
pub enum Control {
    Close,
    /// channel_error with this status (stream_error if `stream`).
    Error {
        status: u16,
        stream: bool,
    },
    Raw(Vec<u8>),
    /// A new stream_BW_allocation of this many kbit/s.
    Allocate(u16),
    /// Stop reading and answering (the connection stays open).
    Stall,
}

struct Shared {
    cfg: Mutex<MuxSimConfig>,
    events: Mutex<Vec<MuxEvent>>,
    probe: Mutex<Probe>,
    records: Mutex<VecDeque<Value>>,
    data: Mutex<Vec<(u64, bytes::Bytes)>>,
    changed: Notify,
    control: broadcast::Sender<Control>,
    start: Instant,
    /// section_TSpkt_flag of the last channel set up (for the UDP path).
    ts_mode: Mutex<Option<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn event(&self, conn: u64, kind: EventKind) {
        lock(&self.events).push(MuxEvent {
            at: Instant::now(),
            conn,
            kind,
        });
        self.changed.notify_waiters();
    }
}

/// A running simulator.
pub struct MuxSim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MuxSim {
    /// Binds and starts accepting (inside a tokio runtime).
    pub async fn start(cfg: MuxSimConfig) -> std::io::Result<MuxSim> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let udp = match cfg.udp {
            Some(a) => Some(UdpSocket::bind(a).await?),
            None => None,
        };
        let shared = Arc::new(Shared {
            probe: Mutex::new(Probe::new(cfg.probe.clone())),
            cfg: Mutex::new(cfg),
            events: Mutex::new(Vec::new()),
            records: Mutex::new(VecDeque::new()),
            data: Mutex::new(Vec::new()),
            changed: Notify::new(),
            control: broadcast::channel(64).0,
            start: Instant::now(),
            ts_mode: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, shared.clone(), stop.child_token()));
        if let Some(u) = udp {
            tokio::spawn(udp_data(u, shared.clone(), stop.clone()));
        }
        Ok(MuxSim { shared, addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn control(&self, c: Control) {
        let _ = self.shared.control.send(c);
    }
    pub fn set_cap(&self, cap_kbps: Option<u16>) {
        lock(&self.shared.cfg).cap_kbps = cap_kbps;
    }
    pub fn events(&self) -> Vec<MuxEvent> {
        lock(&self.shared.events).clone()
    }
    /// The datagrams received (with `keep_data`), with their connection.
    pub fn data(&self) -> Vec<(u64, bytes::Bytes)> {
        lock(&self.shared.data).clone()
    }
    /// The probe's records (sections, errors, commands) so far, taken.
    pub fn take_records(&self) -> Vec<Value> {
        lock(&self.shared.records).drain(..).collect()
    }
    /// Runs `f` on the probe (its sections, counters, summary).
    pub fn with_probe<R>(&self, f: impl FnOnce(&Probe) -> R) -> R {
        f(&lock(&self.shared.probe))
    }
    /// Waits until `pred` holds on the events, at most `limit`.
    pub async fn wait_for(&self, limit: Duration, pred: impl Fn(&[MuxEvent]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            if pred(&lock(&self.shared.events)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return pred(&lock(&self.shared.events));
            }
        }
    }

    /// Closes every connection and stops listening for `down`, then
    /// listens again on the same address.
    pub async fn restart(&mut self, down: Duration) -> std::io::Result<()> {
        self.stop.cancel();
        self.control(Control::Close);
        tokio::time::sleep(down).await;
        let listener = TcpListener::bind(self.addr).await?;
        self.stop = CancellationToken::new();
        tokio::spawn(accept(listener, self.shared.clone(), self.stop.clone()));
        Ok(())
    }

    pub fn stop(&self) {
        self.stop.cancel();
        self.control(Control::Close);
    }
}

impl Drop for MuxSim {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut n = lock(&shared.events)
        .iter()
        .map(|e| e.conn)
        .max()
        .unwrap_or(0);
    loop {
        let sock = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        n += 1;
        shared.event(n, EventKind::Connected);
        let control = shared.control.subscribe();
        tokio::spawn(Session::new(n, shared.clone()).run(sock, control, stop.clone()));
    }
}

/// The UDP data path: data_provision messages only.
async fn udp_data(sock: UdpSocket, shared: Arc<Shared>, stop: CancellationToken) {
    let mut buf = vec![0u8; 65_536];
    let mut s = Session::new(0, shared);
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv(&mut buf) => match r { Ok(n) => n, Err(_) => return },
        };
        let version = lock(&s.shared.cfg).version;
        match Message::parse(&buf[..n], version) {
            Ok(Message::DataProvision { datagrams, .. }) => {
                s.shared
                    .event(0, EventKind::Received(MessageType::DataProvision));
                for d in datagrams {
                    s.data(d);
                }
            }
            Ok(m) => s.violation(
                None,
                format!("{} over UDP: only data_provision may", m.message_type()),
            ),
            Err(e) => s.violation(Some(e.status), e.detail),
        }
    }
}

/// One EMMG connection.
struct Session {
    conn: u64,
    shared: Arc<Shared>,
    channel: Option<(Channel, bool)>,
    stream: Option<(Stream, u16)>,
    allocated_kbps: Option<u16>,
    /// The rate check's token bucket (bits, when) and last report.
    bucket: Option<(f64, Instant)>,
    reported: Option<Instant>,
    packetizer: Packetizer,
    out: Vec<Vec<u8>>,
}

impl Session {
    fn new(conn: u64, shared: Arc<Shared>) -> Session {
        let pid = lock(&shared.cfg).pid;
        Session {
            conn,
            shared,
            channel: None,
            stream: None,
            allocated_kbps: None,
            bucket: None,
            reported: None,
            packetizer: Packetizer::new(pid, true),
            out: Vec::new(),
        }
    }

    async fn run(
        mut self,
        sock: TcpStream,
        mut control: broadcast::Receiver<Control>,
        stop: CancellationToken,
    ) {
        let (mut read, mut write) = sock.into_split();
        let (version, tests) = {
            let c = lock(&self.shared.cfg);
            (c.version, c.test_interval)
        };
        let mut tick = tests.map(|t| tokio::time::interval_at(tokio::time::Instant::now() + t, t));
        let mut buf = Vec::new();
        let mut stalled = false;
        let why = loop {
            let read_one = async {
                if stalled {
                    std::future::pending::<()>().await;
                }
                read_message(&mut read, &mut buf, MAX_MESSAGE).await
            };
            let r = tokio::select! {
                _ = stop.cancelled() => break "stopped".to_string(),
                c = control.recv() => match c {
                    Ok(Control::Close) | Err(broadcast::error::RecvError::Closed) => break "closed on command".into(),
                    Ok(Control::Stall) => { stalled = true; continue }
                    Ok(c) => { self.command(c); None }
                    Err(_) => None,
                },
                _ = tick_opt(&mut tick) => { self.send_tests(); None }
                r = read_one => Some(r),
            };
            if let Some(r) = r {
                match r {
                    Ok(()) => self.message(&buf, version),
                    Err(ReadError::TooLong {
                        message_type, len, ..
                    }) => {
                        self.violation(
                            Some(ErrorStatus::MessageTooLong),
                            format!("message 0x{message_type:04X} of {len} bytes"),
                        );
                        let _ = flush(&mut self.out, &mut write, version).await;
                        break "message too long".into();
                    }
                    Err(e) => break e.to_string(),
                }
            }
            if flush(&mut self.out, &mut write, version).await.is_err() {
                break "write failed".into();
            }
        };
        self.shared.event(self.conn, EventKind::Closed(why));
    }

    fn command(&mut self, c: Control) {
        match c {
            Control::Error { status, stream } => self.error(status, stream),
            Control::Raw(b) => self.out.push(b),
            Control::Allocate(k) => self.allocate(k),
            Control::Close | Control::Stall => {}
        }
    }

    fn channel_ids(&self) -> Channel {
        self.channel.map_or(
            Channel {
                client_id: 0,
                data_channel_id: 0,
            },
            |c| c.0,
        )
    }
    fn stream_ids(&self) -> Stream {
        self.stream.map_or(
            Stream {
                channel: self.channel_ids(),
                data_stream_id: 0,
            },
            |s| s.0,
        )
    }

    fn reply(&mut self, m: &Message<'_>) {
        let mut b = Vec::new();
        let version = lock(&self.shared.cfg).version;
        if m.encode(version, &mut b).is_ok() {
            self.out.push(b);
        }
    }

    fn error(&mut self, status: u16, stream: bool) {
        let (errors, info) = (vec![status], vec![]);
        let m = if stream {
            Message::StreamError {
                stream: self.stream_ids(),
                errors,
                info,
            }
        } else {
            Message::ChannelError {
                channel: self.channel_ids(),
                errors,
                info,
            }
        };
        self.reply(&m);
    }

    fn violation(&mut self, status: Option<ErrorStatus>, detail: String) {
        self.shared
            .event(self.conn, EventKind::Violation(status, detail));
        if let Some(s) = status {
            let stream = self.stream.is_some();
            self.error(s.code(), stream);
        }
    }

    fn send_tests(&mut self) {
        let c = self.channel_ids();
        self.reply(&Message::ChannelTest(c));
        if self.stream.is_some() {
            self.reply(&Message::StreamTest(self.stream_ids()));
        }
    }

    fn allocate(&mut self, kbps: u16) {
        self.allocated_kbps = Some(kbps);
        self.bucket = None;
        self.shared.event(self.conn, EventKind::Allocated(kbps));
        let stream = self.stream_ids();
        self.reply(&Message::StreamBwAllocation {
            stream,
            bandwidth: Some(kbps),
        });
    }

    fn message(&mut self, bytes: &[u8], version: u8) {
        let m = match Message::parse(bytes, version) {
            Ok(m) => m,
            Err(ParseError { status, detail, .. }) => return self.violation(Some(status), detail),
        };
        self.shared
            .event(self.conn, EventKind::Received(m.message_type()));
        if let Err((status, detail)) = self.check(&m) {
            return self.violation(Some(status), detail);
        }
        self.respond(m);
    }

    /// The protocol's order and ids.
    fn check(&self, m: &Message<'_>) -> Result<(), (ErrorStatus, String)> {
        use ErrorStatus as E;
        let t = m.message_type();
        let channel = match m {
            Message::ChannelSetup { .. } => {
                return match self.channel {
                    Some(_) => Err((E::DataChannelIdInUse, "a second channel_setup".into())),
                    None => Ok(()),
                };
            }
            Message::ChannelTest(c)
            | Message::ChannelStatus { channel: c, .. }
            | Message::ChannelClose(c)
            | Message::ChannelError { channel: c, .. } => *c,
            Message::StreamSetup { stream, .. }
            | Message::StreamTest(stream)
            | Message::StreamStatus { stream, .. }
            | Message::StreamCloseRequest(stream)
            | Message::StreamCloseResponse(stream)
            | Message::StreamError { stream, .. }
            | Message::StreamBwRequest { stream, .. }
            | Message::StreamBwAllocation { stream, .. } => stream.channel,
            Message::DataProvision {
                client_id,
                data_channel_id,
                ..
            } => Channel {
                client_id: *client_id,
                data_channel_id: data_channel_id.unwrap_or(self.channel_ids().data_channel_id),
            },
        };
        let Some((ours, _)) = self.channel else {
            return Err((E::UnknownDataChannelId, format!("{t} before channel_setup")));
        };
        if channel.client_id != ours.client_id {
            return Err((
                E::UnknownClientId,
                format!("{t} for client_id 0x{:08X}", channel.client_id),
            ));
        }
        if channel.data_channel_id != ours.data_channel_id {
            return Err((
                E::UnknownDataChannelId,
                format!("{t} for data_channel_id {}", channel.data_channel_id),
            ));
        }
        self.check_stream(m)
    }

    /// The stream part of [`Session::check`] (the channel is known).
    fn check_stream(&self, m: &Message<'_>) -> Result<(), (ErrorStatus, String)> {
        use ErrorStatus as E;
        let t = m.message_type();
        let stream_id = match m {
            Message::StreamSetup { .. } => {
                return match self.stream {
                    Some(_) => Err((E::DataStreamIdInUse, "a second stream_setup".into())),
                    None => Ok(()),
                };
            }
            Message::DataProvision {
                data_stream_id,
                data_id,
                ..
            } => {
                let Some((s, d)) = self.stream else {
                    return Err((
                        E::UnknownDataStreamId,
                        "data_provision before stream_setup".into(),
                    ));
                };
                if self.allocated_kbps.is_none() {
                    return Err((
                        E::ExceededBandwidth,
                        "data_provision before any stream_BW_allocation".into(),
                    ));
                }
                if *data_id != d {
                    return Err((E::UnknownDataId, format!("data_id {data_id}")));
                }
                data_stream_id.unwrap_or(s.data_stream_id)
            }
            Message::StreamTest(s)
            | Message::StreamStatus { stream: s, .. }
            | Message::StreamCloseRequest(s)
            | Message::StreamCloseResponse(s)
            | Message::StreamError { stream: s, .. }
            | Message::StreamBwRequest { stream: s, .. }
            | Message::StreamBwAllocation { stream: s, .. } => s.data_stream_id,
            _ => return Ok(()),
        };
        match self.stream {
            Some((s, _)) if s.data_stream_id == stream_id => Ok(()),
            _ => Err((
                E::UnknownDataStreamId,
                format!("{t} for data_stream_id {stream_id}"),
            )),
        }
    }

    fn respond(&mut self, m: Message<'_>) {
        match m {
            Message::ChannelSetup {
                channel,
                ts_packets,
            } => {
                self.channel = Some((channel, ts_packets));
                *lock(&self.shared.ts_mode) = Some(ts_packets);
                self.reply(&Message::ChannelStatus {
                    channel,
                    ts_packets,
                });
            }
            Message::ChannelTest(channel) => {
                let ts_packets = self.channel.is_some_and(|c| c.1);
                self.reply(&Message::ChannelStatus {
                    channel,
                    ts_packets,
                });
            }
            Message::StreamSetup {
                stream,
                data_id,
                data_type,
            } => {
                if data_type != carousel::simulcrypt::DATA_TYPE_EMM {
                    self.shared.event(
                        self.conn,
                        EventKind::Violation(None, format!("data_type {data_type}: not EMM")),
                    );
                }
                self.stream = Some((stream, data_id));
                self.reply(&Message::StreamStatus {
                    stream,
                    data_id,
                    data_type,
                });
            }
            Message::StreamTest(stream) => {
                let data_id = self.stream.map_or(0, |s| s.1);
                self.reply(&Message::StreamStatus {
                    stream,
                    data_id,
                    data_type: 0,
                });
            }
            Message::StreamBwRequest { bandwidth, .. } => {
                let c = lock(&self.shared.cfg).clone();
                let asked = bandwidth.unwrap_or(u16::MAX);
                let k = if c.refuse {
                    0
                } else {
                    c.cap_kbps.map_or(asked, |cap| cap.min(asked))
                };
                self.allocate(k);
            }
            Message::StreamCloseRequest(stream) => {
                self.stream = None;
                self.reply(&Message::StreamCloseResponse(stream));
            }
            Message::ChannelClose(_) => self.channel = None,
            Message::DataProvision { datagrams, .. } => {
                for d in datagrams {
                    self.data(d);
                }
            }
            // Statuses and errors from the EMMG: recorded above.
            _ => {}
        }
    }

    /// The allocation as a token bucket: tokens (TS bits) accrue at the
    /// allocated rate up to 200 ms' worth plus one datagram; a datagram
    /// that finds too few is a violation (reported once per second at most).
    fn police(&mut self, now: Instant, kbps: u16, len: usize, ts: bool) {
        let rate = f64::from(kbps) * 1000.0;
        let bits = if ts { len * 8 } else { len * 8 * 188 / 184 } as f64;
        let depth = rate * 0.2 + bits;
        let (mut tokens, last) = self.bucket.unwrap_or((depth, now));
        tokens = (tokens + rate * now.duration_since(last).as_secs_f64()).min(depth) - bits;
        self.bucket = Some((tokens.max(0.0), now));
        if tokens < 0.0
            && self
                .reported
                .is_none_or(|r| now.duration_since(r) > Duration::from_secs(1))
        {
            self.reported = Some(now);
            let detail = format!("data above the {kbps} kbit/s allocated (token bucket of 200 ms)");
            self.violation(None, detail);
        }
    }

    /// One datagram: format check, rate check, then the probe.
    fn data(&mut self, d: &[u8]) {
        if lock(&self.shared.cfg).keep_data {
            lock(&self.shared.data).push((self.conn, bytes::Bytes::copy_from_slice(d)));
        }
        self.shared.event(self.conn, EventKind::Data(d.len()));
        let ts = match self.channel {
            Some(c) => c.1,
            None => lock(&self.shared.ts_mode).unwrap_or(true),
        };
        let now = Instant::now();
        if let Some(k) = self.allocated_kbps {
            self.police(now, k, d.len(), ts);
        }
        let mut packets = Vec::new();
        if ts {
            let whole = d.len().is_multiple_of(PACKET_LEN);
            if !whole || d.chunks(PACKET_LEN).any(|p| p[0] != 0x47) {
                return self.violation(
                    Some(ErrorStatus::InvalidValue),
                    format!("datagram of {} bytes is not whole TS packets", d.len()),
                );
            }
            packets.extend(d.chunks(PACKET_LEN).map(<[u8]>::to_vec));
        } else {
            if Section::parse(d).is_err() {
                return self.violation(
                    Some(ErrorStatus::InvalidValue),
                    format!("datagram of {} bytes is not one whole section", d.len()),
                );
            }
            let mut once = Some(bytes::Bytes::copy_from_slice(d));
            let mut pkt = [0u8; PACKET_LEN];
            while self.packetizer.next_packet(&mut pkt, || once.take()) {
                packets.push(pkt.to_vec());
            }
        }
        let secs = now.duration_since(self.shared.start).as_secs_f64();
        let mut probe = lock(&self.shared.probe);
        let mut records = lock(&self.shared.records);
        for p in packets {
            probe.push_packet(&p, Some(secs), &mut |v| {
                if records.len() < 100_000 {
                    records.push_back(v);
                }
            });
        }
    }
}

async fn tick_opt(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn flush(
    out: &mut Vec<Vec<u8>>,
    w: &mut OwnedWriteHalf,
    _version: u8,
) -> std::io::Result<()> {
    for b in out.drain(..) {
        w.write_all(&b).await?;
    }
    Ok(())
}

/// One line about an event, for the command line.
pub fn event_json(e: &MuxEvent, start: Instant) -> Value {
    let t = e.at.duration_since(start).as_secs_f64();
    let (kind, detail) = match &e.kind {
        EventKind::Connected => ("connected", Value::Null),
        EventKind::Closed(why) => ("closed", json!(why)),
        EventKind::Received(m) => ("received", json!(m.name())),
        EventKind::Data(n) => ("data", json!(n)),
        EventKind::Allocated(k) => ("allocated_kbps", json!(k)),
        EventKind::Violation(s, d) => (
            "violation",
            json!({"status": s.map(|s| s.name()), "detail": d}),
        ),
    };
    json!({"t": t, "conn": e.conn, "event": kind, "detail": detail})
}

/// `casd-probe simulcrypt-mux`.
#[derive(clap::Args, Debug, Clone)]
pub struct MuxArgs {
    /// TCP address to accept EMMG connections on.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Also take data_provision over UDP on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub udp: Option<SocketAddr>,
    /// protocol_version to speak (2 or 3).
    #[arg(long, default_value_t = 2)]
    pub version: u8,
    /// Allocate at most KBPS kbit/s (default: what is asked).
    #[arg(long, value_name = "KBPS")]
    pub cap_kbps: Option<u16>,
    /// Allocate 0 kbit/s to every stream.
    #[arg(long)]
    pub refuse: bool,
    /// Send channel_test and stream_test every MS milliseconds.
    #[arg(long, value_name = "MS")]
    pub test_interval_ms: Option<u64>,
    /// Stop after S seconds.
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    #[command(flatten)]
    pub decode: crate::cli::DecodeArgs,
}

/// Runs the simulator: JSON lines on stdout (events but data, the probe's
/// records, a summary at the end); commands on stdin, one a line:
/// `close`, `restart [MS]`, `error CODE [stream]`, `allocate KBPS`,
/// `stall`, `quit`.
pub fn run(a: MuxArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut cfg = MuxSimConfig::new(a.listen);
    cfg.udp = a.udp;
    cfg.version = a.version;
    cfg.cap_kbps = a.cap_kbps;
    cfg.refuse = a.refuse;
    cfg.test_interval = a.test_interval_ms.map(Duration::from_millis);
    // The first --pid (default 0x0101): where sections are packetized.
    let pid = a.decode.pids.first().copied().unwrap_or(0x0101);
    cfg.pid = Pid::new(pid).ok_or_else(|| anyhow::anyhow!("--pid {pid} is not an EMM PID"))?;
    cfg.probe.keys = a.decode.keys()?;
    cfg.probe.section_pids = vec![pid];
    anyhow::ensure!(
        carousel::simulcrypt::VERSIONS.contains(&a.version),
        "--version must be 2 or 3"
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(serve(cfg, a.duration))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(cfg: MuxSimConfig, duration: Option<f64>) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut sim = MuxSim::start(cfg).await?;
    let start = Instant::now();
    println!(
        "{}",
        json!({"type": "listening", "addr": sim.addr().to_string()})
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut shown = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let end = duration.map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d));
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            l = lines.next_line(), if stdin_open => match l {
                Ok(Some(l)) => if !command_line(&mut sim, l.trim()).await { break },
                _ => stdin_open = false,
            },
        }
        let events = sim.events();
        for e in &events[shown..] {
            if !matches!(e.kind, EventKind::Data(_)) {
                println!("{}", event_json(e, start));
            }
        }
        shown = events.len();
        for r in sim.take_records() {
            println!("{r}");
        }
        if STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
            || end.is_some_and(|e| tokio::time::Instant::now() >= e)
        {
            break;
        }
    }
    println!("{}", sim.with_probe(|p| p.summary(true, 1000)));
    Ok(())
}

use crate::capture::STOP as STOP_REQUESTED;

/// One stdin command; false to stop.
async fn command_line(sim: &mut MuxSim, line: &str) -> bool {
    let mut w = line.split_whitespace();
    let num = |s: Option<&str>| -> Option<u64> {
        let s = s?;
        match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => s.parse().ok(),
        }
    };
    let control = match w.next() {
        Some("quit") => return false,
        Some("restart") => {
            let ms = num(w.next()).unwrap_or(1000);
            if let Err(e) = sim.restart(Duration::from_millis(ms)).await {
                eprintln!("casd-probe: restart: {e}");
            }
            return true;
        }
        Some("close") => Some(Control::Close),
        Some("stall") => Some(Control::Stall),
        Some("error") => num(w.next())
            .and_then(|c| u16::try_from(c).ok())
            .map(|status| Control::Error {
                status,
                stream: w.next() == Some("stream"),
            }),
        Some("allocate") => num(w.next())
            .and_then(|k| u16::try_from(k).ok())
            .map(Control::Allocate),
        _ => None,
    };
    let ok = control.map(|c| sim.control(c));
    if ok.is_none() {
        eprintln!("casd-probe: unknown or failed command {line:?} (close, restart [MS], error CODE [stream], allocate KBPS, stall, quit)");
    }
    true
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn command_line() {
        crate::cli::Cli::command().debug_assert();
        let cli = crate::cli::Cli::try_parse_from([
            "casd-probe",
            "simulcrypt-mux",
            "--listen",
            "127.0.0.1:0",
            "--cap-kbps",
            "100",
            "--pid",
            "0x0200",
        ])
        .unwrap();
        let Some(crate::cli::Cmd::SimulcryptMux(a)) = cli.command else {
            panic!("not simulcrypt-mux");
        };
        assert_eq!(
            (a.cap_kbps, a.decode.pids.as_slice()),
            (Some(100), &[0x0200][..])
        );
    }
}
