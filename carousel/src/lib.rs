#![forbid(unsafe_code)]
//! DVB/MPEG-2 carousel for casd: everything between "here are some EMM
//! sections" and "UDP datagrams leave the box at the configured bitrate".
//!
//! Vocabulary follows ISO/IEC 13818-1 (MPEG-2 Systems) and the casd wire
//! contract (`docs/format.md` §3, §5). The crate does not
//! know what is inside an EMM: an EMM is an id, a class, a `not_after` and
//! opaque section bytes.
//!
//! Layers, bottom up (all pure, no tokio, except [`player`]):
//! - [`crc`] — CRC-32/MPEG-2.
//! - [`section`] — long-syntax private sections — build and zero-copy parse.
//! - [`cat`] — the Conditional Access Table with its CA_descriptor.
//! - [`ts`] — 188-byte transport stream packets, [`ts::Packetizer`] and
//!   [`ts::Depacketizer`].
//! - [`schedule`] — the carousel (fast lane, classes, cycles, expiry).
//! - [`pacing`] — bytes due from a monotonic clock and a bitrate.
//! - [`mux`] — EMM packets + CAT + null packets → datagrams (optional RTP).
//! - [`output`] — where datagrams go (memory for tests, UDP).
//! - [`simulcrypt`] — DVB SimulCrypt EMMG⇔MUX messages (TS 103 197).
//! - [`player`] — the tokio play-out runner, one per output (the default
//!   cargo feature `player`; without it the crate has no tokio).
//!
//! See `docs/carousel.md` for the design and measured figures.

pub mod cat;
pub mod crc;
pub mod mux;
pub mod output;
pub mod pacing;
#[cfg(feature = "player")]
pub mod player;
pub mod schedule;
pub mod section;
pub mod simulcrypt;
pub mod ts;

pub use cat::{build_cat, CaDescriptor, Cat};

pub use mux::{CatConfig, Mux, MuxConfig, MuxConfigError, RtpConfig};
pub use output::{MemoryOutput, MulticastInterface, Output, UdpConfig, UdpOutput};
pub use pacing::Pacer;
#[cfg(feature = "player")]
pub use player::thread_scheduling;
#[cfg(feature = "player")]
pub use player::{
    AsyncOutput, AsyncUdpOutput, BlockingOutput, Carousel, PlayRecord, PlayerConfig, PlayerHandle,
    PlayerStats, Ready, RealTime, Scheduling, SpawnError, StatsReader, DEFAULT_SPIN,
};
pub use schedule::{Class, Emm, InsertError, Lane, Played, Schedule, ScheduleConfig};
pub use section::{LongHeader, Section, SectionError, TableId};
pub use ts::{Depacketizer, Event, PacketRef, Packetizer, Pid, StreamError};
