//! One output's transport stream: EMM packets, the CAT and null packets,
//! grouped into datagrams of 1..=7 TS packets with an optional RTP header,
//! paced to the configured bitrate.
//!
//! Datagram rules (chosen here, `docs/carousel.md`):
//! - A datagram may be built as soon as everything sent before it is
//!   covered by the bytes due (`bytes_due(now) ≥ sent`), so the first one
//!   leaves at once and the k-th at `due_at(bytes of the first k−1)`. The
//!   bytes counted are TS bytes (RTP/UDP/IP headers not counted: the
//!   bitrate is the TS bitrate a multiplexer allocates).
//! - Each TS slot, in order of preference: the CAT when it is due (at most
//!   one CAT packet per datagram), an EMM packet, a null packet when
//!   `cbr = true`. Without CBR a datagram is **flushed as soon as the EMM
//!   source runs dry**: it leaves with however many packets it has (≥ 1)
//!   and never waits for more; nothing at all means no datagram.
//! - Without CBR, budget not used while idle is forfeited (the bitrate is a
//!   cap, not a debt). With CBR, a stall longer than `max_backlog` forfeits
//!   the excess instead of bursting it out.
//! - The CAT is sent at least every `cat.interval` (default 400 ms, the
//!   13818-1/TR 101 290 limit is 500 ms): it goes into the first datagram
//!   built less than one datagram period before it is due.
//! - RTP (RFC 3550/RFC 2250): V=2, no padding/extension/CSRC, M=0,
//!   PT=33 (MP2T), sequence +1 per datagram, 90 kHz timestamp of the
//!   monotonic send time (plus a random offset), fixed SSRC.

use std::time::Duration;

use bytes::Bytes;

use crate::cat::{build_cat, CaDescriptor};
use crate::pacing::Pacer;
use crate::section::SectionError;
use crate::ts::{Packetizer, Pid, NULL_PACKET, PACKET_LEN};

/// RTP header length without CSRCs.
pub const RTP_HEADER_LEN: usize = 12;
/// RTP payload type of MPEG-2 TS (RFC 3551).
pub const RTP_PT_MP2T: u8 = 33;
/// Largest number of TS packets per datagram (7 × 188 + IP/UDP/RTP < 1500).
pub const MAX_PACKETS_PER_DATAGRAM: usize = 7;

/// CAT repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatConfig {
    /// CA_system_ID in the CA_descriptor (casd default 0x4AFF).
    pub ca_system_id: u16,
    /// version_number of the CAT (0..=31).
    pub version: u8,
    /// Maximum spacing of two CATs (≤ 500 ms).
    pub interval: Duration,
}

impl Default for CatConfig {
    fn default() -> Self {
        CatConfig {
            ca_system_id: 0x4AFF,
            version: 0,
            interval: Duration::from_millis(400),
        }
    }
}

/// RTP header fields fixed for the life of an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtpConfig {
    pub ssrc: u32,
    pub initial_sequence: u16,
    pub initial_timestamp: u32,
}

impl RtpConfig {
    /// Random SSRC, sequence and timestamp offset (RFC 3550 §5.1), from the
    /// standard library's per-process random hash keys.
    pub fn random() -> RtpConfig {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5254_5020);
        let a = h.finish();
        h.write_u64(a);
        let b = h.finish();
        RtpConfig {
            ssrc: a as u32,
            initial_sequence: (a >> 32) as u16,
            initial_timestamp: b as u32,
        }
    }
}

/// Everything that shapes one output's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MuxConfig {
    /// PID of the EMM sections (wire contract default 0x0101).
    pub emm_pid: Pid,
    /// Sections back to back (true) or one section start per packet.
    pub pack_sections: bool,
    /// 1..=7.
    pub packets_per_datagram: usize,
    /// TS bitrate in bit/s: the rate with `cbr`, the cap without.
    pub bitrate: u64,
    /// Fill with null packets to a constant bitrate.
    pub cbr: bool,
    /// Play the CAT (PID 0x0001) pointing at `emm_pid`.
    pub cat: Option<CatConfig>,
    pub rtp: Option<RtpConfig>,
    /// Longest stall that is caught up by sending faster; beyond, the
    /// budget is forfeited.
    pub max_backlog: Duration,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            emm_pid: Pid::DEFAULT_EMM,
            pack_sections: true,
            packets_per_datagram: MAX_PACKETS_PER_DATAGRAM,
            bitrate: 1_000_000,
            cbr: false,
            cat: Some(CatConfig::default()),
            rtp: None,
            max_backlog: Duration::from_millis(100),
        }
    }
}

/// A configuration the mux cannot honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MuxConfigError {
    #[error("packets_per_datagram must be 1..=7, got {0}")]
    PacketsPerDatagram(usize),
    #[error("bitrate must be above 0")]
    ZeroBitrate,
    #[error("the EMM PID {0} collides with the CAT or null PID")]
    ReservedPid(Pid),
    #[error("CAT interval {0:?} must be between 1 ms and 500 ms")]
    CatInterval(Duration),
    #[error("one datagram takes {period:?} at this bitrate, longer than the CAT interval {interval:?}: raise the bitrate or lower packets_per_datagram")]
    CatUnreachable {
        period: Duration,
        interval: Duration,
    },
    #[error("CAT: {0}")]
    Cat(#[from] SectionError),
}

/// Counters of one mux.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxStats {
    pub datagrams: u64,
    pub emm_packets: u64,
    pub cat_packets: u64,
    pub null_packets: u64,
    /// TS bytes (headers of RTP/UDP/IP not included).
    pub ts_bytes: u64,
}

struct CatState {
    packetizer: Packetizer,
    section: Bytes,
    interval: Duration,
    next_due: Duration,
}

/// Builds the datagrams of one output. Pure: time is passed in as the
/// monotonic time elapsed since the mux was created.
pub struct Mux {
    config: MuxConfig,
    emm: Packetizer,
    cat: Option<CatState>,
    pacer: Pacer,
    period: Duration,
    rtp_seq: u16,
    buf: Vec<u8>,
    stats: MuxStats,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Mux {
    pub fn new(config: MuxConfig) -> Result<Mux, MuxConfigError> {
        let n = config.packets_per_datagram;
        if !(1..=MAX_PACKETS_PER_DATAGRAM).contains(&n) {
            return Err(MuxConfigError::PacketsPerDatagram(n));
        }
        let pacer = Pacer::new(config.bitrate).ok_or(MuxConfigError::ZeroBitrate)?;
        if config.emm_pid == Pid::CAT || config.emm_pid == Pid::NULL {
            return Err(MuxConfigError::ReservedPid(config.emm_pid));
        }
        let period = pacer.due_at((n * PACKET_LEN) as u64);
        let cat = match config.cat {
            None => None,
            Some(c) => {
                if c.interval < Duration::from_millis(1) || c.interval > Duration::from_millis(500)
                {
                    return Err(MuxConfigError::CatInterval(c.interval));
                }
                if period > c.interval {
                    return Err(MuxConfigError::CatUnreachable {
                        period,
                        interval: c.interval,
                    });
                }
                let section = build_cat(
                    CaDescriptor {
                        ca_system_id: c.ca_system_id,
                        ca_pid: config.emm_pid,
                    },
                    c.version,
                )?;
                Some(CatState {
                    packetizer: Packetizer::new(Pid::CAT, false),
                    section: Bytes::from(section),
                    interval: c.interval,
                    next_due: Duration::ZERO,
                })
            }
        };
        Ok(Mux {
            emm: Packetizer::new(config.emm_pid, config.pack_sections),
            rtp_seq: config.rtp.map_or(0, |r| r.initial_sequence),
            buf: Vec::with_capacity(RTP_HEADER_LEN + MAX_PACKETS_PER_DATAGRAM * PACKET_LEN),
            config,
            cat,
            pacer,
            period,
            stats: MuxStats::default(),
        })
    }

    pub fn config(&self) -> &MuxConfig {
        &self.config
    }
    pub fn stats(&self) -> MuxStats {
        self.stats
    }
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }
    /// Time one full datagram takes at the configured bitrate.
    pub fn datagram_period(&self) -> Duration {
        self.period
    }

    /// Back on air at `now` after a pause (a standby Cycler taking over):
    /// every PID's next packet carries the discontinuity indicator, a
    /// section cut short is dropped, the CAT goes first and the budget of
    /// the pause is forfeited (no burst to catch up).
    pub fn resume(&mut self, now: Duration) {
        self.emm.restart();
        if let Some(c) = self.cat.as_mut() {
            c.packetizer.restart();
            c.next_due = now;
        }
        self.pacer.forfeit(now, 0);
    }

    /// Paces from `now` on at `bitrate` (bit/s), owing nothing for the
    /// time before: a link that came back, or a new bandwidth allocation.
    /// Refused (the old rate kept) for a zero bitrate or one too low for
    /// the CAT interval.
    pub fn restart_pacing(&mut self, now: Duration, bitrate: u64) -> Result<(), MuxConfigError> {
        let mut pacer = Pacer::new(bitrate).ok_or(MuxConfigError::ZeroBitrate)?;
        let period = pacer.due_at((self.config.packets_per_datagram * PACKET_LEN) as u64);
        if let Some(c) = &self.cat {
            if period > c.interval {
                return Err(MuxConfigError::CatUnreachable {
                    period,
                    interval: c.interval,
                });
            }
        }
        pacer.forfeit(now, 0);
        self.pacer = pacer;
        self.period = period;
        self.config.bitrate = bitrate;
        Ok(())
    }

    /// Forfeits the budget beyond `max_backlog` at `now`: a stall longer
    /// than that is not caught up (done before every datagram with CBR,
    /// and by the player for outputs paced to an allocation).
    pub fn forfeit_backlog(&mut self, now: Duration) {
        let keep =
            u64::try_from(self.pacer.bytes_due_in(self.config.max_backlog)).unwrap_or(u64::MAX);
        self.pacer.forfeit(now, keep);
    }

    fn cat_due(&self, now: Duration) -> bool {
        self.cat
            .as_ref()
            .is_some_and(|c| now.saturating_add(self.period) >= c.next_due)
    }

    /// When [`Mux::next_datagram`] should be called next. `source_ready`:
    /// when the EMM source will have a section (`Some(ZERO)` = now), `None`
    /// if it has nothing scheduled (a new EMM will wake the caller).
    /// Returns `None` when only new input can make a datagram.
    pub fn next_wakeup(&self, source_ready: Option<Duration>) -> Option<Duration> {
        let budget = self.pacer.due_at(0);
        if self.config.cbr {
            return Some(budget);
        }
        let cat = self
            .cat
            .as_ref()
            .map(|c| c.next_due.saturating_sub(self.period));
        let data = if self.emm.in_section() {
            Some(Duration::ZERO)
        } else {
            source_ready
        };
        let ready = match (cat, data) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(ready.max(budget))
    }

    /// The next datagram if one is due at `now`, pulling EMM sections from
    /// `source` as packets need them. `None`: not due yet, or (without CBR)
    /// nothing to send.
    pub fn next_datagram(
        &mut self,
        now: Duration,
        mut source: impl FnMut() -> Option<Bytes>,
    ) -> Option<&[u8]> {
        if self.config.cbr {
            self.forfeit_backlog(now);
        }
        if !self.pacer.is_due(now, 0) {
            return None;
        }
        self.buf.clear();
        if let Some(rtp) = self.config.rtp {
            let ts = (now.as_nanos() * 90_000 / 1_000_000_000) as u32;
            self.buf.extend_from_slice(&[0x80, RTP_PT_MP2T]);
            self.buf.extend_from_slice(&self.rtp_seq.to_be_bytes());
            self.buf
                .extend_from_slice(&rtp.initial_timestamp.wrapping_add(ts).to_be_bytes());
            self.buf.extend_from_slice(&rtp.ssrc.to_be_bytes());
        }
        let header_len = self.buf.len();
        let mut packets = 0;
        let mut cat_sent = false;
        let mut pkt = [0u8; PACKET_LEN];
        while packets < self.config.packets_per_datagram {
            if !cat_sent && self.cat_due(now) {
                if let Some(c) = self.cat.as_mut() {
                    let mut once = Some(c.section.clone());
                    if c.packetizer.next_packet(&mut pkt, || once.take()) {
                        c.next_due = now.saturating_add(c.interval);
                        self.stats.cat_packets += 1;
                        cat_sent = true;
                        self.buf.extend_from_slice(&pkt);
                        packets += 1;
                        continue;
                    }
                }
            }
            if self.emm.next_packet(&mut pkt, &mut source) {
                self.stats.emm_packets += 1;
                self.buf.extend_from_slice(&pkt);
            } else if self.config.cbr {
                self.stats.null_packets += 1;
                self.buf.extend_from_slice(&NULL_PACKET);
            } else {
                break; // flush: never wait for more
            }
            packets += 1;
        }
        if packets == 0 {
            // Idle without CBR: the unused budget is not owed to anyone.
            self.pacer.forfeit(now, 0);
            return None;
        }
        let bytes = (packets * PACKET_LEN) as u64;
        self.pacer.record(bytes);
        self.rtp_seq = self.rtp_seq.wrapping_add(1);
        self.stats.datagrams += 1;
        self.stats.ts_bytes += bytes;
        debug_assert_eq!(self.buf.len(), header_len + packets * PACKET_LEN);
        Some(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{build, LongHeader, TableId};
    use crate::ts::{Depacketizer, Event, PacketRef};
    use std::collections::VecDeque;

    fn emm_section(n: usize) -> Bytes {
        Bytes::from(
            build(
                &LongHeader::private(TableId::EMM_UNIQUE, 1),
                &vec![0x5A; n - 12],
            )
            .unwrap(),
        )
    }

    fn packets(d: &[u8], rtp: bool) -> Vec<&[u8]> {
        d[if rtp { RTP_HEADER_LEN } else { 0 }..]
            .chunks(PACKET_LEN)
            .collect()
    }

    #[test]
    fn config_validation() {
        let bad = |f: fn(&mut MuxConfig)| {
            let mut c = MuxConfig::default();
            f(&mut c);
            Mux::new(c).unwrap_err()
        };
        assert_eq!(
            bad(|c| c.packets_per_datagram = 0),
            MuxConfigError::PacketsPerDatagram(0)
        );
        assert_eq!(
            bad(|c| c.packets_per_datagram = 8),
            MuxConfigError::PacketsPerDatagram(8)
        );
        assert_eq!(bad(|c| c.bitrate = 0), MuxConfigError::ZeroBitrate);
        assert_eq!(
            bad(|c| c.emm_pid = Pid::CAT),
            MuxConfigError::ReservedPid(Pid::CAT)
        );
        assert!(matches!(
            bad(|c| c.bitrate = 20_000),
            MuxConfigError::CatUnreachable { .. }
        ));
        assert!(matches!(
            bad(|c| c.cat = Some(CatConfig {
                interval: Duration::from_millis(501),
                ..CatConfig::default()
            })),
            MuxConfigError::CatInterval(_)
        ));
    }

    #[test]
    fn idle_without_cbr_sends_only_the_cat_then_flushes_partial() {
        let mut m = Mux::new(MuxConfig::default()).unwrap();
        // t=0: only the CAT, alone in a 1-packet datagram.
        let d = m.next_datagram(Duration::ZERO, || None).unwrap().to_vec();
        assert_eq!(d.len(), PACKET_LEN);
        assert_eq!(PacketRef::parse(&d).unwrap().pid(), Pid::CAT);
        // Nothing else until the CAT is due again.
        assert!(m
            .next_datagram(Duration::from_millis(10), || None)
            .is_none());
        let wake = m.next_wakeup(None).unwrap();
        assert!(
            wake <= Duration::from_millis(400) && wake >= Duration::from_millis(380),
            "{wake:?}"
        );
        // Two EMM sections of 200 bytes: flushed at once as 3 packets.
        let mut q = VecDeque::from([emm_section(200), emm_section(200)]);
        let d = m
            .next_datagram(Duration::from_millis(20), || q.pop_front())
            .unwrap();
        assert_eq!(d.len(), 3 * PACKET_LEN);
    }

    #[test]
    fn restart_pacing_owes_nothing_for_the_past() {
        let mut mux = Mux::new(MuxConfig {
            cat: None,
            packets_per_datagram: 1,
            bitrate: 188 * 8 * 100, // 100 packets/s
            ..MuxConfig::default()
        })
        .unwrap();
        let s = emm_section(1000);
        let mut src = || Some(s.clone());
        let t = Duration::from_secs(10);
        // Ten seconds of unused budget, then a new link at half the rate:
        // one packet at once, the next only 20 ms later.
        mux.restart_pacing(t, 188 * 8 * 50).unwrap();
        assert!(mux.next_datagram(t, &mut src).is_some());
        assert!(mux.next_datagram(t, &mut src).is_none());
        assert!(mux
            .next_datagram(t + Duration::from_millis(19), &mut src)
            .is_none());
        assert!(mux
            .next_datagram(t + Duration::from_millis(20), &mut src)
            .is_some());
        assert_eq!(mux.config().bitrate, 188 * 8 * 50);
        assert_eq!(mux.restart_pacing(t, 0), Err(MuxConfigError::ZeroBitrate));
        assert_eq!(mux.config().bitrate, 188 * 8 * 50);
    }

    #[test]
    fn cbr_fills_with_null_packets_and_rtp_header() {
        let rtp = RtpConfig {
            ssrc: 0xDEADBEEF,
            initial_sequence: 0xFFFF,
            initial_timestamp: 10,
        };
        let mut m = Mux::new(MuxConfig {
            cbr: true,
            rtp: Some(rtp),
            ..MuxConfig::default()
        })
        .unwrap();
        let mut q = VecDeque::from([emm_section(100)]);
        let d = m
            .next_datagram(Duration::ZERO, || q.pop_front())
            .unwrap()
            .to_vec();
        assert_eq!(d.len(), RTP_HEADER_LEN + 7 * PACKET_LEN);
        assert_eq!(
            d[..12],
            [0x80, 33, 0xFF, 0xFF, 0, 0, 0, 10, 0xDE, 0xAD, 0xBE, 0xEF]
        );
        let pids: Vec<Pid> = packets(&d, true)
            .iter()
            .map(|p| PacketRef::parse(p).unwrap().pid())
            .collect();
        assert_eq!(pids[0], Pid::CAT);
        assert_eq!(pids[1], Pid::DEFAULT_EMM);
        assert!(pids[2..].iter().all(|&p| p == Pid::NULL));
        // Not due again before one period; then sequence wraps to 0 and the
        // timestamp follows the 90 kHz clock.
        let period = m.datagram_period();
        assert!(m
            .next_datagram(period - Duration::from_nanos(1), || None)
            .is_none());
        let d = m.next_datagram(period, || None).unwrap();
        assert_eq!(d[2..4], [0, 0]);
        let ts = u32::from_be_bytes(d[4..8].try_into().unwrap());
        assert_eq!(ts, 10 + (period.as_nanos() * 90_000 / 1_000_000_000) as u32);
    }

    #[test]
    fn resume_flags_every_pid_drops_the_cut_section_and_starts_with_the_cat() {
        let mut m = Mux::new(MuxConfig {
            packets_per_datagram: 1,
            ..MuxConfig::default()
        })
        .unwrap();
        let mut q = VecDeque::from([emm_section(1000), emm_section(100)]);
        // CAT, then the first EMM packet: both flagged (a new stream).
        for t in 0..2 {
            let d = m.next_datagram(m.datagram_period() * t, || q.pop_front());
            assert!(PacketRef::parse(d.unwrap()).unwrap().discontinuity());
        }
        // Paused mid-section (1000 bytes need 6 packets), resumed later.
        let later = Duration::from_secs(10);
        m.resume(later);
        let d = m.next_datagram(later, || q.pop_front()).unwrap().to_vec();
        let cat = PacketRef::parse(&d).unwrap();
        assert_eq!((cat.pid(), cat.discontinuity()), (Pid::CAT, true));
        assert_eq!(cat.continuity_counter(), 1);
        // The pause's budget is forfeited: one datagram now, not a burst.
        assert!(m.next_datagram(later, || q.pop_front()).is_none());
        let next = later + m.datagram_period();
        let d = m.next_datagram(next, || q.pop_front()).unwrap().to_vec();
        let emm = PacketRef::parse(&d).unwrap();
        // The counter goes on; the cut section's tail is gone: the next
        // section starts right here (PUSI, pointer 0).
        assert_eq!((emm.pid(), emm.discontinuity()), (Pid::DEFAULT_EMM, true));
        assert_eq!(emm.continuity_counter(), 1);
        assert!(emm.payload_unit_start());
        assert_eq!(emm.payload().unwrap().unwrap()[..2], [0, 0x82]);
    }

    #[test]
    fn cat_at_least_every_interval_and_stream_is_clean() {
        let mut m = Mux::new(MuxConfig {
            bitrate: 64_000,
            ..MuxConfig::default()
        })
        .unwrap();
        let mut cat = Depacketizer::new(Pid::CAT);
        let mut emm = Depacketizer::new(Pid::DEFAULT_EMM);
        let mut last_cat: Option<Duration> = None;
        let mut now = Duration::ZERO;
        let mut emm_sections = 0;
        while now < Duration::from_secs(60) {
            let mut src = || Some(emm_section(150));
            if let Some(d) = m.next_datagram(now, &mut src) {
                for p in packets(d, false) {
                    for e in cat.push(p) {
                        match e {
                            Event::Section(_) => {
                                if let Some(l) = last_cat {
                                    assert!(
                                        now - l <= Duration::from_millis(400),
                                        "gap {:?}",
                                        now - l
                                    );
                                }
                                last_cat = Some(now);
                            }
                            Event::Error(e) => panic!("{e}"),
                            Event::Discontinuity => {}
                        }
                    }
                    for e in emm.push(p) {
                        assert!(!matches!(e, Event::Error(_)), "{e:?}");
                        emm_sections += usize::from(matches!(e, Event::Section(_)));
                    }
                }
            }
            now = m.next_wakeup(Some(Duration::ZERO)).unwrap();
        }
        // 64 kbit/s for 60 s = 480000 bytes, minus CAT packets, 150-byte sections.
        assert!(emm_sections > 2800 && emm_sections < 3000, "{emm_sections}");
    }
}
