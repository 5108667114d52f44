//! The play-out runner (the only tokio part of the crate).
//!
//! A [`Carousel`] is a cloneable handle over the set of live EMMs. Each
//! output gets a player task ([`Carousel::spawn_player`]) with its own
//! [`Schedule`], [`Mux`] (packetizer, CC, CAT, pacer) and output; `add` and
//! `remove` go to every player over bounded channels, the section bytes are
//! shared (`Bytes`), not copied. Create the players first, then add the
//! EMMs: a player spawned later starts with an empty carousel.
//!
//! Timing: a player sleeps with `tokio::time::sleep_until` until the instant
//! the pacer says the next datagram is due (or until a command arrives),
//! never for a fixed period; when it wakes it sends every datagram that is
//! due (tokio timers have 1 ms granularity, a 20 Mbit/s output needs about
//! two datagrams per millisecond).
//!
//! The schedule's timeline is milliseconds since the Unix epoch, advanced by
//! the monotonic clock from an anchor read once at start: `Emm::not_after`
//! is in Unix milliseconds (an EMM's `not_after` seconds × 1000) and
//! `ScheduleConfig::burst_interval` in milliseconds. Wall-clock steps after
//! start do not disturb the play-out.
//!
//! Every section taken from the schedule produces a [`PlayRecord`] on the
//! optional record channel with `try_send`: a full channel drops the record
//! (counted) rather than ever delaying play-out. The record's time is when
//! the section was taken for packetization, i.e. when its first packet went
//! into a datagram.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::mux::{Mux, MuxConfig, MuxConfigError};
use crate::output::{MemoryOutput, UdpOutput};
use crate::schedule::{Emm, Lane, Schedule, ScheduleConfig};
use crate::section::{Section, SectionError};

/// Sends one datagram, asynchronously.
pub trait AsyncOutput: Send + 'static {
    fn send(&mut self, datagram: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}

impl AsyncOutput for MemoryOutput {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.record(datagram);
        Ok(())
    }
}

/// A [`UdpOutput`] on the tokio reactor.
#[derive(Debug)]
pub struct AsyncUdpOutput {
    socket: tokio::net::UdpSocket,
}

impl AsyncUdpOutput {
    /// Must be called inside a tokio runtime.
    pub fn new(output: UdpOutput) -> io::Result<Self> {
        let socket = output.into_socket();
        socket.set_nonblocking(true)?;
        Ok(AsyncUdpOutput {
            socket: tokio::net::UdpSocket::from_std(socket)?,
        })
    }
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.socket.local_addr()
    }
}

impl AsyncOutput for AsyncUdpOutput {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send(datagram).await.map(|_| ())
    }
}

/// One output's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlayerConfig {
    /// Name of the output, copied into every [`PlayRecord`].
    pub name: String,
    pub mux: MuxConfig,
    pub schedule: ScheduleConfig,
    /// Unix milliseconds at the player's start; `None` reads the system
    /// clock. Tests with paused time set it.
    pub clock_anchor_unix_ms: Option<u64>,
}

/// One EMM section put on air by one output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlayRecord {
    pub emm_id: u64,
    pub output: Arc<str>,
    pub cycle: u64,
    pub lane: Lane,
    /// On the schedule's timeline (Unix milliseconds, monotonic-advanced).
    pub at_unix_ms: u64,
}

/// Live counters of a player (read with [`PlayerHandle::stats`]).
#[derive(Debug, Default)]
struct Counters {
    datagrams: AtomicU64,
    ts_bytes: AtomicU64,
    sections: AtomicU64,
    send_errors: AtomicU64,
    records_dropped: AtomicU64,
    rejected: AtomicU64,
    live: AtomicU64,
    cycle: AtomicU64,
}

/// A snapshot of a player's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlayerStats {
    pub datagrams: u64,
    /// TS bytes sent (RTP headers not counted).
    pub ts_bytes: u64,
    /// EMM sections taken from the schedule.
    pub sections: u64,
    pub send_errors: u64,
    pub records_dropped: u64,
    /// Adds refused by the schedule (duplicate id, expired).
    pub rejected: u64,
    pub live: u64,
    pub cycle: u64,
}

impl Counters {
    fn snapshot(&self) -> PlayerStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PlayerStats {
            datagrams: r(&self.datagrams),
            ts_bytes: r(&self.ts_bytes),
            sections: r(&self.sections),
            send_errors: r(&self.send_errors),
            records_dropped: r(&self.records_dropped),
            rejected: r(&self.rejected),
            live: r(&self.live),
            cycle: r(&self.cycle),
        }
    }
}

#[derive(Debug)]
enum Command {
    Add(Emm),
    Remove(u64),
}

/// Capacity of each player's command channel: `add` waits (backpressure)
/// when a player is this far behind.
const COMMAND_QUEUE: usize = 4096;
/// Datagrams sent per wake-up before looking at commands and cancellation
/// again (a stalled clock must not starve them).
const MAX_DATAGRAMS_PER_WAKE: usize = 256;

/// Cloneable handle over the EMM set shared by every player.
#[derive(Clone, Debug, Default)]
pub struct Carousel {
    players: Arc<Mutex<Vec<mpsc::Sender<Command>>>>,
}

/// A running player.
#[derive(Debug)]
pub struct PlayerHandle {
    name: Arc<str>,
    counters: Arc<Counters>,
    join: JoinHandle<PlayerStats>,
}

impl PlayerHandle {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn stats(&self) -> PlayerStats {
        self.counters.snapshot()
    }
    /// Waits for the player to stop (after its cancellation token fired)
    /// and returns its final counters.
    pub async fn join(self) -> PlayerStats {
        match self.join.await {
            Ok(s) => s,
            Err(_) => self.counters.snapshot(),
        }
    }
}

impl Carousel {
    pub fn new() -> Self {
        Carousel::default()
    }

    fn senders(&self) -> Vec<mpsc::Sender<Command>> {
        let mut players = self.players.lock().unwrap_or_else(PoisonError::into_inner);
        players.retain(|s| !s.is_closed());
        players.clone()
    }

    /// Number of running players.
    pub fn players(&self) -> usize {
        self.senders().len()
    }

    /// Starts a player for one output on the current tokio runtime. It
    /// runs until `cancel` fires.
    pub fn spawn_player<O: AsyncOutput>(
        &self,
        config: PlayerConfig,
        output: O,
        records: Option<mpsc::Sender<PlayRecord>>,
        cancel: CancellationToken,
    ) -> Result<PlayerHandle, MuxConfigError> {
        let mux = Mux::new(config.mux.clone())?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let name: Arc<str> = Arc::from(config.name.as_str());
        let counters = Arc::new(Counters::default());
        let anchor = config.clock_anchor_unix_ms.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        let player = Player {
            name: name.clone(),
            schedule: Schedule::new(config.schedule),
            mux,
            anchor_ms: anchor,
            start: Instant::now(),
            records,
            counters: counters.clone(),
        };
        let join = tokio::spawn(player.run(output, rx, cancel));
        self.players
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        Ok(PlayerHandle {
            name,
            counters,
            join,
        })
    }

    /// Adds an EMM to every player. The section is checked once here; a
    /// duplicate id or an expired EMM is refused by each player (counted
    /// in [`PlayerStats::rejected`]).
    pub async fn add(&self, emm: Emm) -> Result<(), SectionError> {
        Section::parse(&emm.section)?;
        for tx in self.senders() {
            // A player that stopped has dropped its receiver: nothing to do.
            let _ = tx.send(Command::Add(emm.clone())).await;
        }
        Ok(())
    }

    /// Removes an EMM from every player (unknown ids are ignored).
    pub async fn remove(&self, id: u64) {
        for tx in self.senders() {
            let _ = tx.send(Command::Remove(id)).await;
        }
    }
}

struct Player {
    name: Arc<str>,
    schedule: Schedule,
    mux: Mux,
    anchor_ms: u64,
    start: Instant,
    records: Option<mpsc::Sender<PlayRecord>>,
    counters: Arc<Counters>,
}

impl Player {
    fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }

    fn timeline_ms(&self, elapsed: Duration) -> u64 {
        self.anchor_ms
            .saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }

    fn apply(&mut self, cmd: Command) {
        let now = self.timeline_ms(self.elapsed());
        match cmd {
            Command::Add(emm) => {
                if self.schedule.insert(emm, now).is_err() {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Command::Remove(id) => {
                self.schedule.remove(id);
            }
        }
        self.counters
            .live
            .store(self.schedule.len() as u64, Ordering::Relaxed);
    }

    async fn run<O: AsyncOutput>(
        mut self,
        mut output: O,
        mut rx: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) -> PlayerStats {
        let mut commands_open = true;
        let mut played = Vec::new();
        loop {
            while let Ok(cmd) = rx.try_recv() {
                self.apply(cmd);
            }
            for _ in 0..MAX_DATAGRAMS_PER_WAKE {
                let elapsed = self.elapsed();
                let now_ms = self.timeline_ms(elapsed);
                let schedule = &mut self.schedule;
                let Some(datagram) = self.mux.next_datagram(elapsed, || {
                    let p = schedule.next(now_ms)?;
                    played.push((p.id, p.cycle, p.lane));
                    Some(p.section)
                }) else {
                    break;
                };
                if output.send(datagram).await.is_err() {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                }
                self.counters.datagrams.fetch_add(1, Ordering::Relaxed);
                let stats = self.mux.stats();
                self.counters
                    .ts_bytes
                    .store(stats.ts_bytes, Ordering::Relaxed);
                self.emit(&mut played, now_ms);
            }
            self.counters
                .cycle
                .store(self.schedule.cycle(), Ordering::Relaxed);
            self.counters
                .live
                .store(self.schedule.len() as u64, Ordering::Relaxed);

            let source_ready = self.schedule.next_due().map(|t| {
                if t == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(t.saturating_sub(self.anchor_ms))
                }
            });
            let wake = self.mux.next_wakeup(source_ready);
            let sleep = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(self.start + w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = rx.recv(), if commands_open => match cmd {
                    Some(cmd) => self.apply(cmd),
                    // Every handle dropped: keep playing what we have.
                    None => commands_open = false,
                },
                _ = sleep => {}
            }
        }
        self.counters.snapshot()
    }

    fn emit(&mut self, played: &mut Vec<(u64, u64, Lane)>, at_unix_ms: u64) {
        self.counters
            .sections
            .fetch_add(played.len() as u64, Ordering::Relaxed);
        for (emm_id, cycle, lane) in played.drain(..) {
            let Some(tx) = &self.records else { break };
            let rec = PlayRecord {
                emm_id,
                output: self.name.clone(),
                cycle,
                lane,
                at_unix_ms,
            };
            match tx.try_send(rec) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.counters
                        .records_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.records = None,
            }
        }
    }
}
