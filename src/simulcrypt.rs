//! The Cycler's DVB SimulCrypt output: casd as the EMMG of ETSI TS 103 197
//! (EMMG/PDG ⇔ MUX), a TCP client to one MUX with one channel and one
//! stream (data_type EMM). Messages are `carousel::simulcrypt`'s.
//!
//! Two halves:
//! - [`SimulcryptOutput`], the player's [`AsyncOutput`]: it hands what the
//!   player paced (TS packets, or the sections reassembled from them) to
//!   the link, and [`AsyncOutput::ready`] holds the player while the link
//!   is down and gives it the allocated bitrate once it is up. The
//!   schedule is not touched while the link is down: the carousel goes on
//!   where it stopped.
//! - The link task ([`spawn`]): connect, channel_setup → channel_status,
//!   stream_setup → stream_status, stream_BW_request →
//!   stream_BW_allocation, then data_provision (over the TCP connection or
//!   UDP) with channel_test + stream_test every `keepalive_ms`, each
//!   answered within `response_timeout_ms`. It answers the MUX's tests,
//!   follows new allocations, answers a malformed message with the spec's
//!   error_status. Any error, error message or close from the MUX → the
//!   link goes down, waits (backoff doubling from `reconnect_min_ms` to
//!   `reconnect_max_ms`) and sets up afresh. What was handed to it and not
//!   yet written whole is written on the next connection: nothing is lost
//!   but what the MUX's own socket held when it went away. On shutdown:
//!   stream_close_request → stream_close_response, channel_close.
//!
//! Memory: inbound messages are bounded ([`MAX_INBOUND`], refused before
//! their body is read); outbound data is bounded by the player being held
//! as soon as the link is down.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use carousel::simulcrypt::{
    error_name, read_message, Channel, ErrorStatus, Message, MessageType, ParseError, ReadError,
    Stream, DATA_TYPE_EMM,
};
use carousel::ts::{Depacketizer, Event, PACKET_LEN};
use carousel::{AsyncOutput, Pid, Ready};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{OutputConfig, SimulcryptConfig, SimulcryptPayload};

/// Longest message accepted from a MUX (a MUX sends only short control
/// messages; error_information is the only variable part).
pub const MAX_INBOUND: usize = 4096;
/// Data units queued between the player and the link.
const QUEUE: usize = 256;

/// Everything the link needs, parsed from the output's configuration.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub name: String,
    pub mux: SocketAddr,
    pub data_udp: Option<SocketAddr>,
    pub stream: Stream,
    pub data_id: u16,
    pub version: u8,
    pub ts_packets: bool,
    /// The output's bitrate: what is asked for, and the most played.
    pub requested_bps: u64,
    pub keepalive: Duration,
    pub response_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl LinkConfig {
    pub fn new(o: &OutputConfig, sc: &SimulcryptConfig, ca_system_id: u16) -> LinkConfig {
        let ms = Duration::from_millis;
        LinkConfig {
            name: o.name.clone(),
            mux: sc.mux,
            data_udp: sc.data_udp,
            stream: Stream {
                channel: Channel {
                    client_id: sc.client_id.unwrap_or(u32::from(ca_system_id) << 16),
                    data_channel_id: sc.data_channel_id,
                },
                data_stream_id: sc.data_stream_id,
            },
            data_id: sc.data_id,
            version: sc.protocol_version,
            ts_packets: sc.payload == SimulcryptPayload::TsPackets,
            requested_bps: o.bitrate,
            keepalive: ms(sc.keepalive_ms),
            response_timeout: ms(sc.response_timeout_ms),
            reconnect_min: ms(sc.reconnect_min_ms),
            reconnect_max: ms(sc.reconnect_max_ms),
        }
    }

    fn channel(&self) -> Channel {
        self.stream.channel
    }
    /// The bandwidth asked for, kbit/s rounded up.
    fn requested_kbps(&self) -> u16 {
        u16::try_from(self.requested_bps.div_ceil(1000)).unwrap_or(u16::MAX)
    }
}

/// The link as the output sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct LinkState {
    up: bool,
    /// +1 per connection set up.
    epoch: u64,
    /// What the player may send at (bit/s).
    bitrate: u64,
}

/// Counters of one link (read by the metrics at scrape time).
#[derive(Debug, Default)]
pub struct LinkStats {
    pub up: AtomicU64,
    pub setups: AtomicU64,
    pub link_errors: AtomicU64,
    /// Malformed messages from the MUX (answered with an error_status).
    pub protocol_errors: AtomicU64,
    /// channel_error / stream_error received from the MUX.
    pub mux_errors: AtomicU64,
    /// Bandwidth the MUX allocated, bit/s (0: none yet).
    pub allocated_bps: AtomicU64,
    pub data_messages: AtomicU64,
    pub data_bytes: AtomicU64,
}

/// The player's side of a SimulCrypt link.
pub struct SimulcryptOutput {
    state: watch::Receiver<LinkState>,
    tx: mpsc::Sender<Bytes>,
    /// Section mode: the player's TS packets back into sections.
    sections: Option<Depacketizer>,
    /// Units the link went down on before taking them.
    held: VecDeque<Bytes>,
}

/// Starts the link task of one output and returns the output for its
/// player and the link's counters. The link is set up only while `on_air`
/// is true (a redundant Cycler's standby holds no channel to the MUX, and
/// sets one up on takeover: docs/operations.md).
pub fn spawn(
    cfg: LinkConfig,
    pid: Pid,
    on_air: watch::Receiver<bool>,
    cancel: CancellationToken,
) -> (SimulcryptOutput, Arc<LinkStats>) {
    let (state_tx, state) = watch::channel(LinkState::default());
    let (tx, rx) = mpsc::channel(QUEUE);
    let stats = Arc::new(LinkStats::default());
    let output = SimulcryptOutput {
        state,
        tx,
        sections: (!cfg.ts_packets).then(|| Depacketizer::new(pid)),
        held: VecDeque::new(),
    };
    let link = Link {
        cfg,
        state: state_tx,
        rx,
        pending: VecDeque::new(),
        stats: stats.clone(),
        on_air,
        cancel,
    };
    tokio::spawn(link.run());
    (output, stats)
}

impl SimulcryptOutput {
    /// Hands `unit` to the link, or keeps it if the link goes down first.
    async fn hand_over(&mut self, unit: Bytes) {
        let mut down = self.state.clone();
        tokio::select! {
            r = self.tx.send(unit.clone()) => {
                if r.is_err() {
                    self.held.push_back(unit);
                }
            }
            _ = down.wait_for(|s| !s.up) => self.held.push_back(unit),
        }
    }
}

impl AsyncOutput for SimulcryptOutput {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let units: Vec<Bytes> = match &mut self.sections {
            None => vec![Bytes::copy_from_slice(datagram)],
            Some(d) => {
                let mut v = Vec::new();
                for p in datagram.chunks(PACKET_LEN) {
                    d.push_with(p, |e| {
                        if let Event::Section(s) = e {
                            v.push(s);
                        }
                    });
                }
                v
            }
        };
        for u in units {
            self.hand_over(u).await;
        }
        Ok(())
    }

    async fn ready(&mut self) -> Ready {
        loop {
            let up = self.state.wait_for(|s| s.up).await.map(|s| *s);
            // The link task is gone (shutdown): never ready again.
            let Ok(s) = up else {
                return std::future::pending().await;
            };
            while let Some(u) = self.held.pop_front() {
                let mut down = self.state.clone();
                tokio::select! {
                    r = self.tx.send(u.clone()) => if r.is_err() { self.held.push_front(u); break },
                    _ = down.wait_for(|s| !s.up) => { self.held.push_front(u); break }
                }
            }
            if self.held.is_empty() {
                return Ready {
                    bitrate: Some(s.bitrate),
                    epoch: s.epoch,
                };
            }
        }
    }
}

/// Why a link went down.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("no {0} from the MUX within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the MUX sent {message}: {errors}")]
    MuxError {
        message: MessageType,
        errors: String,
    },
    #[error("the MUX sent {0}")]
    Closed(MessageType),
    #[error("the MUX closed the connection")]
    Eof,
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Read(String),
    #[error("stream_BW_allocation of 0 kbit/s: the MUX refuses the stream")]
    Refused,
}

/// One inbound frame, as read by the reader task.
type Frame = Result<Vec<u8>, ReadError>;

struct Link {
    cfg: LinkConfig,
    state: watch::Sender<LinkState>,
    rx: mpsc::Receiver<Bytes>,
    /// Units taken from the queue and not yet written whole.
    pending: VecDeque<Bytes>,
    stats: Arc<LinkStats>,
    /// The Cycler's on-air flag (`carousel::Carousel::on_air_watch`).
    on_air: watch::Receiver<bool>,
    cancel: CancellationToken,
}

/// A connection being set up or up.
struct Conn {
    write: OwnedWriteHalf,
    frames: mpsc::Receiver<Frame>,
    udp: Option<UdpSocket>,
    buf: Vec<u8>,
}

impl Link {
    async fn run(mut self) {
        let mut backoff = self.cfg.reconnect_min;
        let mut epoch = 0;
        while !self.cancel.is_cancelled() {
            if !self.wait_on_air().await {
                break;
            }
            epoch += 1;
            let mut standby = self.on_air.clone();
            let result = tokio::select! {
                r = self.session(epoch) => r,
                // Gone to standby (its lease was taken over): the channel
                // is dropped (TCP closed); the new active one sets up its own.
                _ = standby.wait_for(|on| !*on) => {
                    tracing::info!(output = %self.cfg.name, mux = %self.cfg.mux, "standby: SimulCrypt channel closed");
                    self.set_down();
                    backoff = self.cfg.reconnect_min;
                    continue;
                }
            };
            let was_up = self.state.borrow().up;
            self.set_down();
            match result {
                Ok(()) => break,
                Err(e) => {
                    self.stats.link_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(output = %self.cfg.name, mux = %self.cfg.mux, error = %e, retry_in_ms = backoff.as_millis() as u64, "SimulCrypt link down; reconnecting");
                }
            }
            if was_up {
                backoff = self.cfg.reconnect_min;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    /// Waits until this Cycler is on air; false on shutdown.
    async fn wait_on_air(&mut self) -> bool {
        let mut on_air = self.on_air.clone();
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            r = on_air.wait_for(|on| *on) => r.is_ok(),
        }
    }

    fn set_down(&self) {
        self.stats.up.store(0, Ordering::Relaxed);
        self.state.send_modify(|s| s.up = false);
    }

    /// One connection: set up, run until it fails or casd stops (Ok).
    async fn session(&mut self, epoch: u64) -> Result<(), LinkError> {
        let mut c = self.connect().await?;
        let bitrate = self.setup(&mut c).await?;
        self.stats.setups.fetch_add(1, Ordering::Relaxed);
        self.stats.up.store(1, Ordering::Relaxed);
        tracing::info!(output = %self.cfg.name, mux = %self.cfg.mux, version = self.cfg.version, bitrate, "SimulCrypt stream set up");
        self.state.send_replace(LinkState {
            up: true,
            epoch,
            bitrate,
        });
        self.serve(&mut c).await
    }

    async fn connect(&self) -> Result<Conn, LinkError> {
        let t = self.cfg.response_timeout;
        let tcp = timeout(t, TcpStream::connect(self.cfg.mux))
            .await
            .map_err(|_| LinkError::Timeout("TCP connection", t))?
            .map_err(|e| LinkError::Connect(self.cfg.mux, e))?;
        let _ = tcp.set_nodelay(true);
        let udp = match self.cfg.data_udp {
            None => None,
            Some(a) => {
                let bind: SocketAddr = if a.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let s = UdpSocket::bind(bind).await?;
                s.connect(a).await?;
                Some(s)
            }
        };
        let (read, write) = tcp.into_split();
        let (ftx, frames) = mpsc::channel(16);
        tokio::spawn(read_frames(read, ftx));
        Ok(Conn {
            write,
            frames,
            udp,
            buf: Vec::new(),
        })
    }

    async fn send(&self, c: &mut Conn, m: &Message<'_>) -> Result<(), LinkError> {
        c.buf.clear();
        m.encode(self.cfg.version, &mut c.buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let t = self.cfg.response_timeout;
        timeout(t, c.write.write_all(&c.buf))
            .await
            .map_err(|_| LinkError::Timeout("progress writing to the MUX", t))??;
        Ok(())
    }

    /// channel_setup, stream_setup, stream_BW_request; returns the bitrate
    /// to play at.
    async fn setup(&self, c: &mut Conn) -> Result<u64, LinkError> {
        let cfg = &self.cfg;
        let channel = cfg.channel();
        let stream = cfg.stream;
        let ts_packets = cfg.ts_packets;
        self.send(
            c,
            &Message::ChannelSetup {
                channel,
                ts_packets,
            },
        )
        .await?;
        self.expect(c, MessageType::ChannelStatus).await?;
        let (data_id, data_type) = (cfg.data_id, DATA_TYPE_EMM);
        let m = Message::StreamSetup {
            stream,
            data_id,
            data_type,
        };
        self.send(c, &m).await?;
        self.expect(c, MessageType::StreamStatus).await?;
        let bandwidth = Some(cfg.requested_kbps());
        self.send(c, &Message::StreamBwRequest { stream, bandwidth })
            .await?;
        let alloc = self.expect(c, MessageType::StreamBwAllocation).await?;
        self.allocated(alloc)
    }

    /// The bitrate to play at for an allocation (kbit/s; `None`: the MUX
    /// named none, the request stands).
    fn allocated(&self, kbps: Option<u16>) -> Result<u64, LinkError> {
        let requested = self.cfg.requested_bps;
        let bps = kbps.map_or(requested, |k| u64::from(k) * 1000);
        if bps == 0 {
            return Err(LinkError::Refused);
        }
        self.stats.allocated_bps.store(bps, Ordering::Relaxed);
        if bps < requested {
            tracing::warn!(output = %self.cfg.name, requested_bps = requested, allocated_bps = bps, "the MUX allocated less bandwidth than requested: the carousel plays at the allocation");
        }
        Ok(bps.min(requested))
    }

    /// Reads until a message of type `want` arrives (answering the MUX's
    /// tests meanwhile); returns its bandwidth for an allocation.
    async fn expect(&self, c: &mut Conn, want: MessageType) -> Result<Option<u16>, LinkError> {
        let t = self.cfg.response_timeout;
        let deadline = Instant::now() + t;
        loop {
            let frame = tokio::time::timeout_at(deadline, c.frames.recv())
                .await
                .map_err(|_| LinkError::Timeout(want.name(), t))?;
            if let Some(got) = self.inbound(c, frame).await? {
                if got.0 == want {
                    return Ok(got.1);
                }
            }
        }
    }

    /// Handles one inbound frame: answers tests and malformed messages,
    /// fails on errors and closes. Returns the type of a status or
    /// allocation for the caller, with an allocation's bandwidth.
    async fn inbound(
        &self,
        c: &mut Conn,
        frame: Option<Frame>,
    ) -> Result<Option<(MessageType, Option<u16>)>, LinkError> {
        let bytes = match frame {
            None | Some(Err(ReadError::Closed)) => return Err(LinkError::Eof),
            Some(Err(ReadError::TooLong {
                message_type,
                len,
                max,
            })) => {
                self.protocol_error(
                    c,
                    &ParseError {
                        status: ErrorStatus::MessageTooLong,
                        detail: format!("{len} bytes announced, at most {max} accepted"),
                        message_type: Some(message_type),
                    },
                )
                .await?;
                return Err(LinkError::Read(format!("message of {len} bytes announced")));
            }
            Some(Err(e)) => return Err(LinkError::Read(e.to_string())),
            Some(Ok(b)) => b,
        };
        let m = match Message::parse(&bytes, self.cfg.version) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_error(c, &e).await?;
                return Ok(None);
            }
        };
        self.answer(c, m).await
    }

    async fn answer(
        &self,
        c: &mut Conn,
        m: Message<'_>,
    ) -> Result<Option<(MessageType, Option<u16>)>, LinkError> {
        let (channel, stream) = (self.cfg.channel(), self.cfg.stream);
        let t = m.message_type();
        match m {
            Message::ChannelTest(_) => {
                let ts_packets = self.cfg.ts_packets;
                self.send(
                    c,
                    &Message::ChannelStatus {
                        channel,
                        ts_packets,
                    },
                )
                .await?;
            }
            Message::StreamTest(_) => {
                let (data_id, data_type) = (self.cfg.data_id, DATA_TYPE_EMM);
                let m = Message::StreamStatus {
                    stream,
                    data_id,
                    data_type,
                };
                self.send(c, &m).await?;
            }
            Message::ChannelError { errors, .. } | Message::StreamError { errors, .. } => {
                self.stats.mux_errors.fetch_add(1, Ordering::Relaxed);
                let errors = errors
                    .iter()
                    .map(|&e| error_name(e))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(LinkError::MuxError { message: t, errors });
            }
            Message::ChannelClose(_) => return Err(LinkError::Closed(t)),
            Message::StreamCloseRequest(_) => {
                self.send(c, &Message::StreamCloseResponse(stream)).await?;
                return Err(LinkError::Closed(t));
            }
            Message::ChannelStatus { channel: ch, .. } if ch != channel => {
                return self.wrong_ids(c, t).await;
            }
            Message::StreamStatus { stream: s, .. } | Message::StreamCloseResponse(s)
                if s != stream =>
            {
                return self.wrong_ids(c, t).await;
            }
            Message::StreamBwAllocation {
                stream: s,
                bandwidth,
            } => {
                if s != stream {
                    return self.wrong_ids(c, t).await;
                }
                return Ok(Some((t, bandwidth)));
            }
            Message::ChannelStatus { .. }
            | Message::StreamStatus { .. }
            | Message::StreamCloseResponse(_) => {
                return Ok(Some((t, None)));
            }
            // What only an EMMG sends.
            _ => {
                let e = ParseError {
                    status: ErrorStatus::InvalidMessage,
                    detail: format!("{t} is not sent by a MUX"),
                    message_type: Some(t.code()),
                };
                self.protocol_error(c, &e).await?;
            }
        }
        Ok(None)
    }

    async fn wrong_ids(
        &self,
        c: &mut Conn,
        t: MessageType,
    ) -> Result<Option<(MessageType, Option<u16>)>, LinkError> {
        let e = ParseError {
            status: ErrorStatus::UnknownDataChannelId,
            detail: format!("{t} names another channel or stream than this link's"),
            message_type: Some(t.code()),
        };
        self.protocol_error(c, &e).await?;
        Ok(None)
    }

    /// Answers a malformed message with channel_error (stream_error for a
    /// stream message) and logs it.
    async fn protocol_error(&self, c: &mut Conn, e: &ParseError) -> Result<(), LinkError> {
        self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(output = %self.cfg.name, mux = %self.cfg.mux, status = %error_name(e.status.code()), detail = %e.detail, "malformed SimulCrypt message from the MUX; error sent back");
        let errors = vec![e.status.code()];
        let info = vec![];
        let stream_msg = e.message_type.is_some_and(|t| t & 0xFF00 == 0x0100);
        let m = if stream_msg {
            Message::StreamError {
                stream: self.cfg.stream,
                errors,
                info,
            }
        } else {
            Message::ChannelError {
                channel: self.cfg.channel(),
                errors,
                info,
            }
        };
        self.send(c, &m).await
    }

    /// The link while up: data out, keep-alive, the MUX's messages in.
    async fn serve(&mut self, c: &mut Conn) -> Result<(), LinkError> {
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.cfg.keepalive, self.cfg.keepalive);
        // Statuses owed by the MUX for our tests, and by when.
        let mut owed: Option<(u8, Instant)> = None;
        loop {
            self.flush_pending(c).await?;
            let deadline = owed.map(|o| o.1);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return self.close(c).await,
                frame = c.frames.recv() => {
                    if let Some((t, bw)) = self.inbound(c, frame).await? {
                        owed = settle(owed, t);
                        if t == MessageType::StreamBwAllocation {
                            let bitrate = self.allocated(bw)?;
                            self.state.send_modify(|s| s.bitrate = bitrate);
                        }
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    return Err(LinkError::Timeout("channel_status / stream_status", self.cfg.response_timeout));
                }
                _ = tick.tick() => {
                    let (channel, stream) = (self.cfg.channel(), self.cfg.stream);
                    self.send(c, &Message::ChannelTest(channel)).await?;
                    self.send(c, &Message::StreamTest(stream)).await?;
                    owed.get_or_insert((2, Instant::now() + self.cfg.response_timeout));
                }
                unit = self.rx.recv() => match unit {
                    Some(u) => self.pending.push_back(u),
                    None => return self.close(c).await,
                },
            }
        }
    }

    /// Writes the units taken and not yet written, oldest first; one is
    /// dropped from `pending` only once written whole.
    async fn flush_pending(&mut self, c: &mut Conn) -> Result<(), LinkError> {
        while let Some(u) = self.pending.front().cloned() {
            let m = Message::DataProvision {
                client_id: self.cfg.stream.channel.client_id,
                data_channel_id: Some(self.cfg.stream.channel.data_channel_id),
                data_stream_id: Some(self.cfg.stream.data_stream_id),
                data_id: self.cfg.data_id,
                datagrams: vec![&u],
            };
            match &c.udp {
                None => self.send(c, &m).await?,
                Some(udp) => {
                    let mut b = Vec::new();
                    m.encode(self.cfg.version, &mut b)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                    udp.send(&b).await?;
                }
            }
            self.pending.pop_front();
            self.stats.data_messages.fetch_add(1, Ordering::Relaxed);
            self.stats
                .data_bytes
                .fetch_add(u.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The orderly close: stream_close_request → stream_close_response,
    /// then channel_close.
    async fn close(&self, c: &mut Conn) -> Result<(), LinkError> {
        let stream = self.cfg.stream;
        self.send(c, &Message::StreamCloseRequest(stream)).await?;
        let answered = self.expect(c, MessageType::StreamCloseResponse).await;
        self.send(c, &Message::ChannelClose(stream.channel)).await?;
        let _ = c.write.shutdown().await;
        answered.map(|_| ())
    }
}

/// Counts a status against the tests owed (two per keep-alive round).
fn settle(owed: Option<(u8, Instant)>, t: MessageType) -> Option<(u8, Instant)> {
    match (owed, t) {
        (Some((n, d)), MessageType::ChannelStatus | MessageType::StreamStatus) => {
            (n > 1).then_some((n - 1, d))
        }
        (o, _) => o,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The reader task of one connection: whole frames, bounded, until the
/// connection ends or the session drops the receiver.
async fn read_frames(mut read: OwnedReadHalf, tx: mpsc::Sender<Frame>) {
    loop {
        let mut buf = Vec::new();
        let r = read_message(&mut read, &mut buf, MAX_INBOUND).await;
        let last = r.is_err();
        if tx.send(r.map(|()| buf)).await.is_err() || last {
            return;
        }
    }
}

/// The `casd_simulcrypt_*` metrics of one link, read at scrape time, and a
/// warning (once per change) when the allocation is below what the cycle
/// targets need.
///
/// Need: the carousel is never idle while it has EMMs, so a pass takes
/// its bytes at the played bitrate; the bitrate that would bring the last
/// pass within the shortest cycle target (every class plays once per pass)
/// is `played × last pass / target`.
pub fn watch(
    shared: &crate::app::Shared,
    cfg: &LinkConfig,
    stats: Arc<LinkStats>,
    player: carousel::StatsReader,
) {
    let m = &shared.metrics;
    let l = [("output", cfg.name.clone())];
    let up = m.gauge(
        "casd_simulcrypt_up",
        "1 while the output's SimulCrypt stream is set up.",
        &l,
    );
    let alloc = m.gauge(
        "casd_simulcrypt_allocated_bitrate",
        "Bandwidth the MUX allocated, bit/s (0: none yet).",
        &l,
    );
    let need = m.gauge(
        "casd_simulcrypt_needed_bitrate",
        "Bitrate the last pass needed to stay within the shortest cycle target, bit/s.",
        &l,
    );
    let short = m.gauge(
        "casd_simulcrypt_bandwidth_short",
        "1 when the allocation is below what the cycle targets need.",
        &l,
    );
    let setups = m.counter(
        "casd_simulcrypt_setups_total",
        "SimulCrypt channel + stream set-ups (the first and every reconnect).",
        &l,
    );
    let errors = m.counter(
        "casd_simulcrypt_link_errors_total",
        "SimulCrypt links lost (error, error message or close from the MUX, timeout).",
        &l,
    );
    let proto = m.counter(
        "casd_simulcrypt_protocol_errors_total",
        "Malformed messages from the MUX, answered with an error_status.",
        &l,
    );
    let target = shared
        .cfg
        .cycler
        .cycle_targets_s()
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let requested = cfg.requested_bps;
    let need_of = move |s: &LinkStats, p: &carousel::PlayerStats| -> (f64, f64) {
        let a = s.allocated_bps.load(Ordering::Relaxed) as f64;
        let played = a.min(requested as f64);
        (a, played * (p.last_cycle_ms as f64 / 1000.0) / target)
    };
    {
        let (stats, player) = (stats.clone(), player.clone());
        m.on_scrape(move || {
            let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
            up.set(r(&stats.up) as f64);
            setups.absolute(r(&stats.setups));
            errors.absolute(r(&stats.link_errors));
            proto.absolute(r(&stats.protocol_errors));
            let (a, n) = need_of(&stats, &player.stats());
            alloc.set(a);
            need.set(n);
            short.set(f64::from(u8::from(a > 0.0 && n > a)));
        });
    }
    let name = cfg.name.clone();
    let mut was_short = false;
    crate::metrics::every(Duration::from_secs(1), shared.shutdown.clone(), move || {
        let (a, n) = need_of(&stats, &player.stats());
        let is_short = a > 0.0 && n > a;
        if is_short && !was_short {
            tracing::warn!(output = %name, allocated_bps = a, needed_bps = n.ceil(), "SimulCrypt allocation below what the cycle targets need: the carousel's pass is longer than the shortest cycle target");
        }
        was_short = is_short;
        std::future::ready(())
    });
}
