//! The play-out runner (the only part of the crate that knows threads and
//! tokio).
//!
//! A [`Carousel`] is a cloneable handle over the set of live EMMs. Each
//! output gets a player ([`Carousel::spawn_player`]) with its own
//! [`Schedule`], [`Mux`] (packetizer, CC, CAT, pacer) and output; `add` and
//! `remove` go to every player over bounded channels, the section bytes are
//! shared (`Bytes`), not copied. Create the players first, then add the
//! EMMs: a player spawned later starts with an empty carousel.
//!
//! Timing: a player waits until the instant the pacer says the next
//! datagram is due (or until a command arrives), never for a fixed period,
//! and then sends every datagram that is due. Two drivers run the same
//! player core (`Core`: commands, schedule, mux, records, counters):
//!
//! - **Thread** (outputs whose [`AsyncOutput::into_blocking`] gives a
//!   blocking [`Output`]: [`AsyncUdpOutput`], [`RealTime`]): a dedicated OS
//!   thread on the monotonic clock, waiting with
//!   `std::thread::park_timeout` (a futex with an absolute
//!   `CLOCK_MONOTONIC` deadline, timer slack lowered to 1 µs) and sending
//!   with blocking `send`. It wakes within tens of microseconds of the due
//!   instant instead of on tokio's 1 ms timer wheel. Commands and
//!   cancellation wake it with `Thread::unpark`.
//! - **Task** (every other [`AsyncOutput`], e.g. [`MemoryOutput`]): a tokio
//!   task sleeping with `tokio::time::sleep_until`, so it follows paused
//!   tokio time (the tests simulate hours in seconds).
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mux::{Mux, MuxConfig, MuxConfigError};
use crate::output::{MemoryOutput, Output, UdpOutput};
use crate::schedule::{Class, Emm, Lane, Schedule, ScheduleConfig};
use crate::section::{Section, SectionError};

/// A blocking output played from a dedicated thread.
pub type BlockingOutput = Box<dyn Output + Send>;

/// Sends one datagram, asynchronously.
pub trait AsyncOutput: Send + 'static {
    fn send(&mut self, datagram: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// A blocking sender for the same destination, if this output has one:
    /// the player then runs on a dedicated OS thread on the real monotonic
    /// clock with sub-millisecond timing (and never calls
    /// [`AsyncOutput::send`]). The default keeps the output async: the
    /// player is a tokio task on tokio time (1 ms timer granularity; follows
    /// paused time in tests).
    fn into_blocking(self) -> Result<BlockingOutput, Self>
    where
        Self: Sized,
    {
        Err(self)
    }

    /// Waits until the output can take datagrams (task driver only; must
    /// be cancel-safe). A connection-oriented output (DVB SimulCrypt)
    /// waits here while its link is down: the player keeps applying
    /// commands but takes nothing from the schedule, so the carousel goes
    /// on where it stopped. The default is always ready at the configured
    /// bitrate.
    fn ready(&mut self) -> impl Future<Output = Ready> + Send {
        std::future::ready(Ready::default())
    }
}

/// What [`AsyncOutput::ready`] says: the bitrate to play at (`None`: the
/// configured one) and the link's epoch. A new epoch (a new connection)
/// or another bitrate restarts the pacing: nothing is owed for the time
/// the output was not taking datagrams, so nothing bursts out after it.
/// With a bitrate (an allocation the far end polices), a late wake-up is
/// caught up by at most `max_backlog`, as with CBR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    pub bitrate: Option<u64>,
    pub epoch: u64,
}

impl AsyncOutput for MemoryOutput {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.record(datagram);
        Ok(())
    }
}

/// Plays a blocking [`Output`] from a dedicated thread on the real clock
/// (what [`AsyncUdpOutput`] does), e.g. `RealTime(MemoryOutput::new())`.
#[derive(Clone, Debug)]
pub struct RealTime<O>(pub O);

impl<O: Output + Send + 'static> AsyncOutput for RealTime<O> {
    /// Blocking: only for outputs that never block for long.
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.0.send(datagram)
    }
    fn into_blocking(self) -> Result<BlockingOutput, Self> {
        Ok(Box::new(self.0))
    }
}

/// Longest a blocking UDP send may wait for socket buffer space before it
/// counts as a send error (keeps cancellation prompt if the host's queue
/// is stuck).
const UDP_SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// A [`UdpOutput`] for the player: played from a dedicated thread with
/// blocking sends ([`AsyncOutput::into_blocking`]). Used directly as an
/// [`AsyncOutput`], it puts a duplicate of the socket on the tokio reactor
/// at the first send.
#[derive(Debug)]
pub struct AsyncUdpOutput {
    output: UdpOutput,
    reactor: Option<tokio::net::UdpSocket>,
}

impl AsyncUdpOutput {
    pub fn new(output: UdpOutput) -> io::Result<Self> {
        output.socket().set_nonblocking(false)?;
        output.socket().set_write_timeout(Some(UDP_SEND_TIMEOUT))?;
        Ok(AsyncUdpOutput {
            output,
            reactor: None,
        })
    }
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.output.socket().local_addr()
    }
}

impl AsyncOutput for AsyncUdpOutput {
    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let socket = match &mut self.reactor {
            Some(s) => s,
            None => {
                // O_NONBLOCK is shared with the duplicate: from here on the
                // socket is the reactor's (into_blocking restores it).
                let dup = self.output.socket().try_clone()?;
                dup.set_nonblocking(true)?;
                self.reactor.insert(tokio::net::UdpSocket::from_std(dup)?)
            }
        };
        socket.send(datagram).await.map(|_| ())
    }
    fn into_blocking(self) -> Result<BlockingOutput, Self> {
        drop(self.reactor);
        // Best effort: new() already made it blocking unless send() was used.
        let _ = self.output.socket().set_nonblocking(false);
        Ok(Box::new(self.output))
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
    /// Thread driver with real-time priority only ([`thread_scheduling`]):
    /// how long before a datagram is due the play-out thread stops sleeping
    /// and spins on the clock ([`DEFAULT_SPIN`]). A sleeping thread wakes
    /// late by the kernel's wake-up latency; one that is already running
    /// when the instant comes does not. `Duration::ZERO` (and any value
    /// without real-time priority) sleeps up to the due instant.
    pub spin: Duration,
}

/// The default [`PlayerConfig::spin`]. Spinning is worth it only with
/// real-time priority, so the thread spins only when it has it: measured on
/// the development VM (docs/benchmarks.md, `udp_playout`), under SCHED_FIFO
/// a 200 µs spin took the 1 Mbit/s p99 from 1.19 ms to 0.045 ms with the
/// cores loaded, while under SCHED_OTHER it made the tail worse (a spinning
/// ordinary thread loses the wake-up preference a sleeping one has). CPU
/// cost: spin / datagram period (2 % of a core at 1 Mbit/s and 7 packets
/// per datagram, 19 % at 10 Mbit/s).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// The calling thread's scheduling policy, as the kernel reports it in
/// `/proc/thread-self/stat` (no unsafe code, no privilege). A play-out
/// thread inherits the policy of the thread that spawned it, so the
/// Cycler reads it once at start to say whether real-time scheduling was
/// granted (e.g. by the systemd unit's `CPUSchedulingPolicy=fifo`).
pub fn thread_scheduling() -> Scheduling {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| Scheduling::from_stat(&s))
        .unwrap_or(Scheduling::Unknown)
}

/// A thread's scheduling policy (see [`thread_scheduling`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// SCHED_FIFO or SCHED_RR with this priority: wake-ups preempt every
    /// ordinary thread.
    RealTime { policy: &'static str, priority: u32 },
    /// SCHED_OTHER, SCHED_BATCH or SCHED_IDLE.
    Normal { policy: &'static str },
    /// Not readable (not Linux, or /proc not mounted).
    Unknown,
}

impl Scheduling {
    /// From the text of /proc/<pid>/task/<tid>/stat: rt_priority and
    /// policy are fields 40 and 41, counted after the `(comm)` field that
    /// may itself hold spaces.
    fn from_stat(stat: &str) -> Option<Scheduling> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(37);
        let priority: u32 = fields.next()?.parse().ok()?;
        let policy: u32 = fields.next()?.parse().ok()?;
        Some(match policy {
            1 => Scheduling::RealTime {
                policy: "SCHED_FIFO",
                priority,
            },
            2 => Scheduling::RealTime {
                policy: "SCHED_RR",
                priority,
            },
            3 => Scheduling::Normal {
                policy: "SCHED_BATCH",
            },
            5 => Scheduling::Normal {
                policy: "SCHED_IDLE",
            },
            _ => Scheduling::Normal {
                policy: "SCHED_OTHER",
            },
        })
    }

    pub fn is_real_time(&self) -> bool {
        matches!(self, Scheduling::RealTime { .. })
    }
}

impl std::fmt::Display for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scheduling::RealTime { policy, priority } => write!(f, "{policy} priority {priority}"),
            Scheduling::Normal { policy } => f.write_str(policy),
            Scheduling::Unknown => f.write_str("unknown"),
        }
    }
}

/// What the thread driver does until the next datagram is due (pure, so
/// that the pacing logic is tested without a clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Due now: send.
    Now,
    /// Sleep this long (or until a command wakes the thread), then look again.
    Sleep(Duration),
    /// Closer to the due instant than the spin margin: spin until it.
    Spin,
}

fn wait_plan(now: Duration, due: Duration, spin: Duration) -> Wait {
    match due.checked_sub(now) {
        None => Wait::Now,
        Some(left) if left.is_zero() => Wait::Now,
        Some(left) if left > spin => Wait::Sleep(left - spin),
        Some(_) => Wait::Spin,
    }
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
    /// Live EMMs per [`Class`] (index = class).
    live_by_class: [AtomicU64; 3],
    fast_lane: AtomicU64,
    /// Timeline ms of the last datagram (0: none yet).
    last_datagram_ms: AtomicU64,
    /// Timeline ms of the last full pass (0: none completed yet).
    last_cycle_ms: AtomicU64,
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
    /// Live EMMs per class (index = `Class as usize`).
    pub live_by_class: [u64; 3],
    /// EMMs in the fast lane.
    pub fast_lane: u64,
    /// Unix ms (on the player's timeline) of the last datagram; 0 before
    /// the first.
    pub last_datagram_unix_ms: u64,
    /// Duration of the last full pass of the cycle, in ms; 0 before the
    /// first pass completed.
    pub last_cycle_ms: u64,
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
            live_by_class: self.live_by_class.each_ref().map(r),
            fast_lane: r(&self.fast_lane),
            last_datagram_unix_ms: r(&self.last_datagram_ms),
            last_cycle_ms: r(&self.last_cycle_ms),
        }
    }
}

/// Why a player could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Config(#[from] MuxConfigError),
    #[error("starting the play-out thread: {0}")]
    Thread(#[source] io::Error),
}

#[derive(Debug)]
enum Command {
    Add(Emm),
    Remove(u64),
    OnAir(bool),
}

/// Capacity of each player's command channel: `add` waits (backpressure)
/// when a player is this far behind.
const COMMAND_QUEUE: usize = 4096;
/// Datagrams sent per wake-up before looking at commands and cancellation
/// again (a stalled clock must not starve them).
const MAX_DATAGRAMS_PER_WAKE: usize = 256;
/// Commands applied per wake-up at most (a bulk load must not starve
/// play-out)...
const MAX_COMMANDS_PER_WAKE: usize = 256;
/// ...and after every this many, the thread driver goes back to play-out if
/// a datagram has become due.
const COMMANDS_PER_CLOCK_CHECK: usize = 16;
/// Timer slack of a play-out thread (Linux default: 50 µs).
const TIMER_SLACK_NS: u64 = 1_000;
/// Shortest wait of the thread driver when the core says "due now" but
/// produced nothing (should not happen; keeps such a bug from spinning).
const MIN_PARK: Duration = Duration::from_micros(50);

/// One player as the [`Carousel`] sees it.
#[derive(Clone, Debug)]
struct Link {
    tx: mpsc::Sender<Command>,
    /// The play-out thread, woken after each command (thread driver only).
    thread: Option<Thread>,
}

impl Link {
    async fn send(&self, cmd: Command) {
        // A player that stopped has dropped its receiver: nothing to do.
        if self.tx.send(cmd).await.is_ok() {
            if let Some(t) = &self.thread {
                t.unpark();
            }
        }
    }
}

/// Cloneable handle over the EMM set shared by every player.
#[derive(Clone, Debug)]
pub struct Carousel {
    players: Arc<Mutex<Vec<Link>>>,
    /// On air (true) or standby: see [`Carousel::set_on_air`].
    on_air: Arc<watch::Sender<bool>>,
}

impl Default for Carousel {
    fn default() -> Self {
        Carousel {
            players: Arc::default(),
            on_air: Arc::new(watch::Sender::new(true)),
        }
    }
}

#[derive(Debug)]
enum Join {
    Task(JoinHandle<PlayerStats>),
    Thread(oneshot::Receiver<PlayerStats>),
}

/// A running player.
#[derive(Debug)]
pub struct PlayerHandle {
    name: Arc<str>,
    counters: Arc<Counters>,
    join: Join,
}

impl PlayerHandle {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn stats(&self) -> PlayerStats {
        self.counters.snapshot()
    }
    /// A reader of this player's counters that outlives the handle (for a
    /// metrics scrape: loads of atomics, nothing on the play-out path).
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(self.counters.clone())
    }
    /// True when the player runs on its own thread (real clock), false for
    /// a tokio task (tokio time).
    pub fn is_thread(&self) -> bool {
        matches!(self.join, Join::Thread(_))
    }
    /// Waits for the player to stop (after its cancellation token fired)
    /// and returns its final counters.
    pub async fn join(self) -> PlayerStats {
        let done = match self.join {
            Join::Task(j) => j.await.ok(),
            Join::Thread(rx) => rx.await.ok(),
        };
        done.unwrap_or_else(|| self.counters.snapshot())
    }
}

/// Reads a player's live counters (see [`PlayerHandle::stats_reader`]).
#[derive(Clone, Debug)]
pub struct StatsReader(Arc<Counters>);

impl StatsReader {
    pub fn stats(&self) -> PlayerStats {
        self.0.snapshot()
    }
}

/// Stops a play-out thread when dropped: when the cancellation token fires,
/// and also when the runtime that watches the token shuts down (as a tokio
/// task player would stop).
struct StopOnDrop {
    stop: Arc<AtomicBool>,
    thread: Thread,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

impl Carousel {
    pub fn new() -> Self {
        Carousel::default()
    }

    /// A carousel whose players start in standby (see
    /// [`Carousel::set_on_air`]): a redundant Cycler's hot standby.
    pub fn standby() -> Self {
        let c = Carousel::default();
        c.on_air.send_replace(false);
        c
    }

    /// Puts every player on air or in standby. In standby a player keeps
    /// its schedule (adds and removes are applied) but sends nothing and
    /// takes nothing from the schedule; back on air, it starts with the
    /// CAT, every PID's first packet carrying the discontinuity indicator
    /// ([`Mux::resume`]). Players spawned later start in the current state.
    pub async fn set_on_air(&self, on_air: bool) {
        self.on_air.send_replace(on_air);
        for link in self.links() {
            link.send(Command::OnAir(on_air)).await;
        }
    }

    pub fn is_on_air(&self) -> bool {
        *self.on_air.borrow()
    }

    /// Follows the on-air state, for an output kind that must act on it
    /// (e.g. set up or tear down a session with a multiplexer).
    pub fn on_air_watch(&self) -> watch::Receiver<bool> {
        self.on_air.subscribe()
    }

    fn links(&self) -> Vec<Link> {
        let mut players = self.players.lock().unwrap_or_else(PoisonError::into_inner);
        players.retain(|l| !l.tx.is_closed());
        players.clone()
    }

    /// Number of running players.
    pub fn players(&self) -> usize {
        self.links().len()
    }

    /// Starts a player for one output; must be called inside a tokio
    /// runtime. It runs until `cancel` fires. An output with a blocking
    /// form ([`AsyncOutput::into_blocking`], e.g. [`AsyncUdpOutput`]) gets
    /// a dedicated thread on the real clock; any other a tokio task.
    pub fn spawn_player<O: AsyncOutput>(
        &self,
        config: PlayerConfig,
        output: O,
        records: Option<mpsc::Sender<PlayRecord>>,
        cancel: CancellationToken,
    ) -> Result<PlayerHandle, SpawnError> {
        let mux = Mux::new(config.mux.clone())?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let name: Arc<str> = Arc::from(config.name.as_str());
        let counters = Arc::new(Counters::default());
        let anchor = config.clock_anchor_unix_ms.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        let core = Core {
            schedule: Schedule::new(config.schedule),
            mux,
            on_air: self.is_on_air(),
            anchor_ms: anchor,
            pass: (0, 0),
            bitrate: config.mux.bitrate,
            epoch: None,
            rec: Recorder {
                name: name.clone(),
                records,
                counters: counters.clone(),
                played: Vec::new(),
            },
        };
        let (join, thread) = match output.into_blocking() {
            Err(output) => {
                let start = tokio::time::Instant::now();
                let task = tokio::spawn(run_task(core, output, rx, cancel, start));
                (Join::Task(task), None)
            }
            Ok(output) => {
                let stop = Arc::new(AtomicBool::new(false));
                let (done_tx, done_rx) = oneshot::channel();
                let start = std::time::Instant::now();
                let clock = move || std::time::Instant::now().saturating_duration_since(start);
                let flag = stop.clone();
                let spin = config.spin;
                let thread = std::thread::Builder::new()
                    .name(format!("play {}", config.name))
                    .spawn(move || {
                        // The thread's own policy (inherited from its spawner).
                        let spin = if thread_scheduling().is_real_time() {
                            spin
                        } else {
                            Duration::ZERO
                        };
                        let _ = done_tx.send(run_thread(core, output, rx, &flag, clock, spin));
                    })
                    .map_err(SpawnError::Thread)?
                    .thread()
                    .clone();
                let guard = StopOnDrop {
                    stop,
                    thread: thread.clone(),
                };
                tokio::spawn(async move {
                    let _guard = guard;
                    cancel.cancelled().await;
                });
                (Join::Thread(done_rx), Some(thread))
            }
        };
        self.players
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Link { tx, thread });
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
        for link in self.links() {
            link.send(Command::Add(emm.clone())).await;
        }
        Ok(())
    }

    /// Removes an EMM from every player (unknown ids are ignored).
    pub async fn remove(&self, id: u64) {
        for link in self.links() {
            link.send(Command::Remove(id)).await;
        }
    }
}

/// Play-out records and counters of one player.
struct Recorder {
    name: Arc<str>,
    records: Option<mpsc::Sender<PlayRecord>>,
    counters: Arc<Counters>,
    /// Sections taken for the datagram being built.
    played: Vec<(u64, u64, Lane)>,
}

impl Recorder {
    fn emit(&mut self, at_unix_ms: u64) {
        self.counters
            .sections
            .fetch_add(self.played.len() as u64, Ordering::Relaxed);
        for (emm_id, cycle, lane) in self.played.drain(..) {
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

/// Everything a player does except waiting and sending, shared by both
/// drivers. Time is a parameter: the monotonic time elapsed since start,
/// from whichever clock the driver runs on.
struct Core {
    schedule: Schedule,
    mux: Mux,
    /// False in standby: nothing is taken from the schedule or sent.
    on_air: bool,
    anchor_ms: u64,
    /// The pass in progress and the timeline ms it started at (0: its
    /// start was not seen), for the last full pass's duration.
    pass: (u64, u64),
    rec: Recorder,
    /// The configured bitrate, and the output's epoch last seen
    /// ([`Core::gate`]).
    bitrate: u64,
    epoch: Option<u64>,
}

impl Core {
    fn timeline_ms(&self, elapsed: Duration) -> u64 {
        self.anchor_ms
            .saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }

    fn apply(&mut self, cmd: Command, elapsed: Duration) {
        let now = self.timeline_ms(elapsed);
        match cmd {
            Command::Add(emm) => {
                if self.schedule.insert(emm, now).is_err() {
                    self.rec.counters.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Command::Remove(id) => {
                self.schedule.remove(id);
            }
            Command::OnAir(on) => {
                if on && !self.on_air {
                    self.mux.resume(elapsed);
                }
                self.on_air = on;
            }
        }
        self.rec
            .counters
            .live
            .store(self.schedule.len() as u64, Ordering::Relaxed);
    }

    /// Applies queued commands, at most [`MAX_COMMANDS_PER_WAKE`], stopping
    /// early once `clock()` reaches `until` (checked every
    /// [`COMMANDS_PER_CLOCK_CHECK`]). Returns how many were applied.
    fn apply_queued(
        &mut self,
        rx: &mut mpsc::Receiver<Command>,
        clock: &impl Fn() -> Duration,
        until: Option<Duration>,
    ) -> usize {
        let mut n = 0;
        while n < MAX_COMMANDS_PER_WAKE {
            if n > 0 && n % COMMANDS_PER_CLOCK_CHECK == 0 && until.is_some_and(|u| clock() >= u) {
                break;
            }
            let Ok(cmd) = rx.try_recv() else { break };
            self.apply(cmd, clock());
            n += 1;
        }
        n
    }

    /// The datagram due at `elapsed`, if any, pulling sections from the
    /// schedule and emitting their play-out records. Call
    /// [`Core::sent`] with the result of sending it.
    fn next_datagram(&mut self, elapsed: Duration) -> Option<&[u8]> {
        if !self.on_air {
            return None;
        }
        let now_ms = self.timeline_ms(elapsed);
        let schedule = &mut self.schedule;
        let played = &mut self.rec.played;
        let datagram = self.mux.next_datagram(elapsed, || {
            let p = schedule.next(now_ms)?;
            played.push((p.id, p.cycle, p.lane));
            Some(p.section)
        })?;
        self.rec.emit(now_ms);
        let c = &self.rec.counters;
        c.last_datagram_ms.store(now_ms, Ordering::Relaxed);
        let cycle = self.schedule.cycle();
        if cycle != self.pass.0 {
            if self.pass.1 != 0 && cycle == self.pass.0 + 1 {
                c.last_cycle_ms
                    .store(now_ms.saturating_sub(self.pass.1), Ordering::Relaxed);
            }
            self.pass = (cycle, now_ms);
        }
        Some(datagram)
    }

    fn sent(&mut self, result: io::Result<()>) {
        let c = &self.rec.counters;
        if result.is_err() {
            c.send_errors.fetch_add(1, Ordering::Relaxed);
        }
        c.datagrams.fetch_add(1, Ordering::Relaxed);
        c.ts_bytes
            .store(self.mux.stats().ts_bytes, Ordering::Relaxed);
    }

    /// Publishes the schedule counters and returns when the next datagram
    /// may be due (`None`: only a command can make one).
    fn next_wakeup(&mut self) -> Option<Duration> {
        let c = &self.rec.counters;
        c.cycle.store(self.schedule.cycle(), Ordering::Relaxed);
        c.live.store(self.schedule.len() as u64, Ordering::Relaxed);
        for class in Class::ALL {
            c.live_by_class[class as usize]
                .store(self.schedule.class_len(class) as u64, Ordering::Relaxed);
        }
        c.fast_lane
            .store(self.schedule.fast_lane_len() as u64, Ordering::Relaxed);
        if !self.on_air {
            return None; // only a command puts it back on air
        }
        let source_ready = self.schedule.next_due().map(|t| {
            if t == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(t.saturating_sub(self.anchor_ms))
            }
        });
        self.mux.next_wakeup(source_ready)
    }

    fn stats(&self) -> PlayerStats {
        self.rec.counters.snapshot()
    }

    /// Follows the output's [`Ready`]: a new epoch or bitrate restarts the
    /// pacing at `elapsed` (a bitrate the mux refuses keeps the old one).
    fn gate(&mut self, ready: Ready, elapsed: Duration) {
        let bitrate = ready.bitrate.unwrap_or(self.bitrate);
        let new_link = self.epoch != Some(ready.epoch);
        self.epoch = Some(ready.epoch);
        if new_link || bitrate != self.mux.config().bitrate {
            let _ = self.mux.restart_pacing(elapsed, bitrate);
        } else if ready.bitrate.is_some() {
            self.mux.forfeit_backlog(elapsed);
        }
    }
}

/// The tokio task driver: tokio timers (1 ms), tokio time (paused in tests).
async fn run_task<O: AsyncOutput>(
    mut core: Core,
    mut output: O,
    mut rx: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    start: tokio::time::Instant,
) -> PlayerStats {
    let clock = || tokio::time::Instant::now().saturating_duration_since(start);
    let mut commands_open = true;
    loop {
        core.apply_queued(&mut rx, &clock, None);
        let ready = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = output.ready() => r,
            cmd = rx.recv(), if commands_open => {
                match cmd {
                    Some(cmd) => core.apply(cmd, clock()),
                    None => commands_open = false,
                }
                continue;
            }
        };
        core.gate(ready, clock());
        for _ in 0..MAX_DATAGRAMS_PER_WAKE {
            let Some(datagram) = core.next_datagram(clock()) else {
                break;
            };
            let result = output.send(datagram).await;
            core.sent(result);
        }
        let wake = core.next_wakeup();
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(start + w).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            cmd = rx.recv(), if commands_open => match cmd {
                Some(cmd) => core.apply(cmd, clock()),
                // Every handle dropped: keep playing what we have.
                None => commands_open = false,
            },
            _ = sleep => {}
        }
    }
    core.stats()
}

/// The thread driver: the real monotonic clock, futex waits with µs
/// precision, blocking sends. Stops when `stop` is set (and the thread
/// unparked); commands unpark it too.
fn run_thread(
    mut core: Core,
    mut output: BlockingOutput,
    mut rx: mpsc::Receiver<Command>,
    stop: &AtomicBool,
    clock: impl Fn() -> Duration,
    spin: Duration,
) -> PlayerStats {
    // Best effort: timers of this thread fire within 1 µs instead of 50 µs.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_timerslack(TIMER_SLACK_NS);
    while !stop.load(Ordering::Acquire) {
        let mut sent = false;
        for _ in 0..MAX_DATAGRAMS_PER_WAKE {
            let Some(datagram) = core.next_datagram(clock()) else {
                break;
            };
            let result = output.send(datagram);
            core.sent(result);
            sent = true;
        }
        let wake = core.next_wakeup();
        // Commands while nothing is due; play-out first once it is.
        if core.apply_queued(&mut rx, &clock, wake) > 0 {
            continue;
        }
        // Every Carousel handle dropped: try_recv fails, unpark never
        // comes, the thread keeps playing what it has.
        match wake.map(|w| (w, wait_plan(clock(), w, spin))) {
            None => std::thread::park(),
            Some((_, Wait::Sleep(d))) => std::thread::park_timeout(d),
            Some((w, Wait::Spin)) => {
                // Commands wait at most `spin`; a stop is seen at once.
                while clock() < w && !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }
            Some((_, Wait::Now)) if !sent => std::thread::park_timeout(MIN_PARK),
            Some((_, Wait::Now)) => {}
        }
    }
    core.stats()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPIN: Duration = Duration::from_micros(200);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn sleeps_until_the_spin_margin_then_spins_then_sends() {
        // 10 ms early: sleep all but the margin.
        assert_eq!(wait_plan(us(0), us(10_000), SPIN), Wait::Sleep(us(9_800)));
        // Inside the margin (a wake-up on time, or one that came early):
        // spin, never a second sleep whose wake-up could be late.
        assert_eq!(wait_plan(us(9_800), us(10_000), SPIN), Wait::Spin);
        assert_eq!(wait_plan(us(9_999), us(10_000), SPIN), Wait::Spin);
        // At or past the due instant: send.
        assert_eq!(wait_plan(us(10_000), us(10_000), SPIN), Wait::Now);
        assert_eq!(wait_plan(us(12_000), us(10_000), SPIN), Wait::Now);
    }

    #[test]
    fn scheduling_from_proc_stat() {
        // A comm with spaces and parentheses, then fields 3..=41.
        let head = "42 (play a) b) S";
        let mid = " 0".repeat(36);
        let stat = |prio: u32, pol: u32| format!("{head}{mid} {prio} {pol} 0 0");
        assert_eq!(
            Scheduling::from_stat(&stat(10, 1)),
            Some(Scheduling::RealTime {
                policy: "SCHED_FIFO",
                priority: 10
            })
        );
        assert_eq!(
            Scheduling::from_stat(&stat(0, 0)),
            Some(Scheduling::Normal {
                policy: "SCHED_OTHER"
            })
        );
        assert_eq!(Scheduling::from_stat("1 (x) S 0"), None);
        // This very thread, on Linux.
        assert_ne!(thread_scheduling(), Scheduling::Unknown);
    }

    #[test]
    fn zero_spin_is_the_plain_sleep_to_the_due_instant() {
        assert_eq!(
            wait_plan(us(100), us(10_000), Duration::ZERO),
            Wait::Sleep(us(9_900))
        );
        assert_eq!(wait_plan(us(10_000), us(10_000), Duration::ZERO), Wait::Now);
    }
}
