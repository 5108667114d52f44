//! 188-byte transport stream packets (ISO/IEC 13818-1 §2.4.3): a packetizer
//! that carries sections on one PID, and the inverse, a depacketizer that
//! reassembles them and reports what is wrong with a stream.
//!
//! Section carriage rules (13818-1 §2.4.4.1/§2.4.4.2, wire contract §5.1):
//! - `payload_unit_start_indicator` (PUSI) = 1 iff at least one section
//!   starts in the packet; then the first payload byte is the
//!   `pointer_field`, the number of bytes (of the previous section's tail)
//!   before the first section start.
//! - Sections are packed back to back: a section may start in the packet
//!   where the previous one ends, and several may start in one packet.
//! - After the last section in a packet, the rest is 0xFF stuffing (a
//!   `table_id` of 0xFF means "stuffing until the end of the packet").

use bytes::Bytes;

use crate::section::{self, Section, SectionError, LENGTH_PREFIX, MAX_SECTION_LEN};

/// Bytes in a TS packet.
pub const PACKET_LEN: usize = 188;
/// sync_byte.
pub const SYNC_BYTE: u8 = 0x47;
/// Header bytes before the adaptation field / payload.
pub const HEADER_LEN: usize = 4;

/// A new section is started in a packet only if at least this many of its
/// bytes fit there, so a receiver always finds `table_id` and
/// `section_length` in the packet where a section starts. 13818-1 would
/// allow a split after 1 byte; some set-top box demultiplexers mishandle it,
/// and the cost is at most 2 stuffing bytes per packet.
pub const MIN_SECTION_START: usize = LENGTH_PREFIX;

/// A 13-bit packet identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pid(u16);

impl Pid {
    /// Program Association Table.
    pub const PAT: Pid = Pid(0x0000);
    /// Conditional Access Table.
    pub const CAT: Pid = Pid(0x0001);
    /// Null packets (13818-1 Table 2-3).
    pub const NULL: Pid = Pid(0x1FFF);
    /// The EMM PID casd uses unless configured otherwise (wire contract §5.1).
    pub const DEFAULT_EMM: Pid = Pid(0x0101);
    /// Largest value of the 13-bit field.
    pub const MAX: u16 = 0x1FFF;

    /// `None` if `value` does not fit in 13 bits.
    pub const fn new(value: u16) -> Option<Pid> {
        if value <= Self::MAX {
            Some(Pid(value))
        } else {
            None
        }
    }

    /// The low 13 bits of `value` (for reading a field with reserved bits).
    pub const fn from_masked(value: u16) -> Pid {
        Pid(value & Self::MAX)
    }

    pub const fn value(self) -> u16 {
        self.0
    }
}

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#06x}", self.0)
    }
}

/// The null packet: PID 0x1FFF, payload only, CC 0 (receivers ignore the
/// CC of null packets), 184 bytes of 0xFF.
pub const NULL_PACKET: [u8; PACKET_LEN] = {
    let mut p = [0xFF; PACKET_LEN];
    p[0] = SYNC_BYTE;
    p[1] = 0x1F;
    p[2] = 0xFF;
    p[3] = 0x10;
    p
};

/// What is wrong with a packet or the stream on one PID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("packet of {len} bytes, expected 188")]
    PacketLength { len: usize },
    #[error("sync_byte is {found:#04x}, expected 0x47")]
    SyncByte { found: u8 },
    #[error("transport_error_indicator set")]
    TransportError,
    #[error("transport_scrambling_control {control:#04b}: sections are never scrambled")]
    Scrambled { control: u8 },
    #[error("adaptation_field_control '00' is reserved")]
    ReservedAdaptationFieldControl,
    #[error("adaptation_field_length {length} does not fit the packet")]
    AdaptationFieldLength { length: u8 },
    #[error("continuity_counter gap: expected {expected}, found {found}")]
    ContinuityGap { expected: u8, found: u8 },
    #[error("duplicate packet (continuity_counter {cc}), discarded")]
    Duplicate { cc: u8 },
    #[error("pointer_field {pointer} points past the {available} payload bytes")]
    PointerField { pointer: u8, available: usize },
    #[error("section_length {section_length} exceeds the private section limit")]
    SectionTooLong { section_length: usize },
    #[error("section truncated after {got} of {expected:?} bytes")]
    TruncatedSection { got: usize, expected: Option<usize> },
    #[error("invalid section: {0}")]
    InvalidSection(#[from] SectionError),
}

/// A borrowed view of one TS packet with its sync byte checked.
#[derive(Clone, Copy, Debug)]
pub struct PacketRef<'a> {
    bytes: &'a [u8; PACKET_LEN],
}

impl<'a> PacketRef<'a> {
    /// Checks the length and the sync byte.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, StreamError> {
        let bytes: &[u8; PACKET_LEN] = bytes
            .try_into()
            .map_err(|_| StreamError::PacketLength { len: bytes.len() })?;
        if bytes[0] != SYNC_BYTE {
            return Err(StreamError::SyncByte { found: bytes[0] });
        }
        Ok(PacketRef { bytes })
    }
    pub fn as_bytes(&self) -> &'a [u8; PACKET_LEN] {
        self.bytes
    }
    pub fn transport_error(&self) -> bool {
        self.bytes[1] & 0x80 != 0
    }
    pub fn payload_unit_start(&self) -> bool {
        self.bytes[1] & 0x40 != 0
    }
    pub fn pid(&self) -> Pid {
        Pid::from_masked(u16::from_be_bytes([self.bytes[1], self.bytes[2]]))
    }
    pub fn scrambling_control(&self) -> u8 {
        self.bytes[3] >> 6
    }
    /// '01' payload only, '10' adaptation field only, '11' both, '00' reserved.
    pub fn adaptation_field_control(&self) -> u8 {
        (self.bytes[3] >> 4) & 0x03
    }
    pub fn continuity_counter(&self) -> u8 {
        self.bytes[3] & 0x0F
    }
    pub fn has_payload(&self) -> bool {
        self.adaptation_field_control() & 0x01 != 0
    }
    /// The adaptation field after its length byte (empty if length 0),
    /// `None` if the packet has none.
    pub fn adaptation_field(&self) -> Result<Option<&'a [u8]>, StreamError> {
        match self.adaptation_field_control() {
            0b00 => Err(StreamError::ReservedAdaptationFieldControl),
            0b01 => Ok(None),
            afc => {
                let length = self.bytes[4];
                // With a payload the field may use up to 182 bytes (payload
                // ≥ 1 byte), without one it must fill the packet (183).
                let max = if afc == 0b11 { 182 } else { 183 };
                if usize::from(length) > max {
                    return Err(StreamError::AdaptationFieldLength { length });
                }
                Ok(self.bytes.get(5..5 + usize::from(length)))
            }
        }
    }
    /// discontinuity_indicator of the adaptation field.
    pub fn discontinuity(&self) -> bool {
        matches!(self.adaptation_field(), Ok(Some(af)) if af.first().is_some_and(|f| f & 0x80 != 0))
    }
    /// The payload bytes (pointer_field included), `None` without payload.
    pub fn payload(&self) -> Result<Option<&'a [u8]>, StreamError> {
        let start = match self.adaptation_field()? {
            None => HEADER_LEN,
            Some(af) => HEADER_LEN + 1 + af.len(),
        };
        if !self.has_payload() {
            return Ok(None);
        }
        Ok(self.bytes.get(start..))
    }
}

/// Carries sections on one PID in TS packets.
///
/// It is pulled, not pushed: [`Packetizer::next_packet`] asks a source (the
/// carousel schedule, a queue in tests) for the next section only at the
/// moment a section may start, so a section is never taken from the
/// schedule earlier than it can go on air and the schedule's decision is
/// as late as possible. When the source has nothing, the packet is finished
/// with 0xFF stuffing; when nothing at all is pending, no packet is made.
///
/// The continuity_counter lives here, so keep one `Packetizer` per PID for
/// the life of the output: it continues across carousel cycles. The first
/// packet after creation carries an adaptation field with
/// discontinuity_indicator = 1, telling receivers that the counter restarted.
#[derive(Debug)]
pub struct Packetizer {
    pid: Pid,
    pack: bool,
    next_cc: u8,
    discontinuity: bool,
    current: Option<Bytes>,
    offset: usize,
    packets: u64,
    skipped: u64,
}

impl Packetizer {
    /// `pack = true`: sections back to back (a section may start where the
    /// previous one ends). `pack = false`: at most one section start per
    /// packet, the rest of the packet after a section end is stuffing.
    pub fn new(pid: Pid, pack: bool) -> Self {
        Packetizer {
            pid,
            pack,
            next_cc: 0,
            discontinuity: true,
            current: None,
            offset: 0,
            packets: 0,
            skipped: 0,
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }
    /// The continuity_counter the next packet will carry.
    pub fn next_continuity_counter(&self) -> u8 {
        self.next_cc
    }
    /// True while a section is partly sent: the next packet will carry its
    /// tail whatever the source says.
    pub fn in_section(&self) -> bool {
        self.current.is_some()
    }
    /// Starts over as a new stream would: the section in progress is
    /// dropped (a receiver that saw its start from another sender cannot
    /// use its tail) and the next packet carries the discontinuity
    /// indicator, the counter going on from where it was. Used when an
    /// output goes back on air after a pause (a redundant Cycler's
    /// takeover), whoever sent on the PID in between.
    pub fn restart(&mut self) {
        self.current = None;
        self.offset = 0;
        self.discontinuity = true;
    }
    /// Packets made so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }
    /// Sections refused because they were empty or began with 0xFF (which
    /// a receiver would read as stuffing).
    pub fn skipped_sections(&self) -> u64 {
        self.skipped
    }

    fn pull(&mut self, source: &mut impl FnMut() -> Option<Bytes>) -> Option<Bytes> {
        loop {
            let s = source()?;
            match s.first() {
                Some(&b) if b != 0xFF => return Some(s),
                _ => self.skipped += 1,
            }
        }
    }

    /// Writes the next packet into `out` and returns true, or returns false
    /// (leaving `out` untouched) when no section is in progress and `source`
    /// has none either.
    pub fn next_packet(
        &mut self,
        out: &mut [u8; PACKET_LEN],
        mut source: impl FnMut() -> Option<Bytes>,
    ) -> bool {
        if self.current.is_none() {
            match self.pull(&mut source) {
                Some(s) => {
                    self.current = Some(s);
                    self.offset = 0;
                }
                None => return false,
            }
        }
        let tail_len = match &self.current {
            Some(s) => s.len() - self.offset,
            None => return false,
        };
        let mut pos = self.write_header(out);
        let (pointer, pending) = self.pointer_field(tail_len, PACKET_LEN - pos, &mut source);
        if let Some(p) = pointer {
            out[1] |= 0x40;
            out[pos] = p;
            pos += 1;
        }
        pos = self.write_payload(out, pos, pointer.is_some(), pending, &mut source);
        out[pos..].fill(0xFF);
        true
    }

    /// The 4-byte header (plus a discontinuity-only adaptation field once
    /// after creation or [`Packetizer::restart`]); returns where the payload
    /// begins.
    fn write_header(&mut self, out: &mut [u8; PACKET_LEN]) -> usize {
        out[0] = SYNC_BYTE;
        let pid = self.pid.value().to_be_bytes();
        out[1] = pid[0];
        out[2] = pid[1];
        let mut pos = HEADER_LEN;
        if self.discontinuity {
            // adaptation_field_control '11', adaptation_field_length 1,
            // flags: discontinuity_indicator only.
            out[3] = 0x30 | self.next_cc;
            out[4] = 1;
            out[5] = 0x80;
            pos = 6;
            self.discontinuity = false;
        } else {
            out[3] = 0x10 | self.next_cc;
        }
        self.next_cc = (self.next_cc + 1) & 0x0F;
        self.packets += 1;
        pos
    }

    /// Decides PUSI and the pointer_field before any payload byte is
    /// written: a section starts in this packet if the current one does, or
    /// if its tail (`tail_len` bytes) ends here, packing is on and a next
    /// section is available with room for its first MIN_SECTION_START bytes
    /// (that section is returned, pulled from `source`).
    fn pointer_field(
        &mut self,
        tail_len: usize,
        room: usize,
        source: &mut impl FnMut() -> Option<Bytes>,
    ) -> (Option<u8>, Option<Bytes>) {
        if self.offset == 0 {
            return (Some(0), None);
        }
        if !(self.pack && 1 + tail_len + MIN_SECTION_START <= room) {
            return (None, None);
        }
        let pending = self.pull(source);
        // tail_len < room ≤ 184, fits in the 8-bit pointer_field.
        (pending.as_ref().map(|_| tail_len as u8), pending)
    }

    /// Copies the current section (and, in a packet with a pointer_field,
    /// the sections that may follow it) from `pos`; returns the end.
    fn write_payload(
        &mut self,
        out: &mut [u8; PACKET_LEN],
        mut pos: usize,
        has_pointer: bool,
        mut pending: Option<Bytes>,
        source: &mut impl FnMut() -> Option<Bytes>,
    ) -> usize {
        while let Some(cur) = &self.current {
            let n = (cur.len() - self.offset).min(PACKET_LEN - pos);
            out[pos..pos + n].copy_from_slice(&cur[self.offset..self.offset + n]);
            pos += n;
            self.offset += n;
            if self.offset < cur.len() {
                break; // packet full, the section continues in the next one
            }
            self.current = None;
            self.offset = 0;
            // A further section may start here only in a packet that has a
            // pointer_field (PUSI) and, unless packing, none started yet.
            let may_start = has_pointer && (self.pack || pending.is_some());
            if PACKET_LEN - pos < MIN_SECTION_START || !may_start {
                break;
            }
            self.current = match pending.take() {
                Some(s) => Some(s),
                None if self.pack => self.pull(source),
                None => None,
            };
        }
        pos
    }
}

/// How a packet's continuity_counter follows the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Continuity {
    InOrder,
    /// 13818-1 §2.4.3.3: a packet may be sent twice; the duplicate is
    /// discarded, it is not a loss.
    Duplicate,
    Gap {
        expected: u8,
    },
}

/// Packets without payload do not advance the counter; the first packet
/// seen is in order whatever it carries.
fn continuity(last: Option<u8>, cc: u8, has_payload: bool) -> Continuity {
    let Some(last) = last else {
        return Continuity::InOrder;
    };
    let expected = if has_payload { (last + 1) & 0x0F } else { last };
    if has_payload && cc == last {
        Continuity::Duplicate
    } else if cc != expected {
        Continuity::Gap { expected }
    } else {
        Continuity::InOrder
    }
}

/// What the [`Depacketizer`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete section whose CRC_32 checked.
    Section(Bytes),
    /// A discontinuity_indicator: the continuity_counter may jump here.
    Discontinuity,
    /// Something wrong; reassembly resynchronises at the next section start.
    Error(StreamError),
}

/// Counters kept by a [`Depacketizer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DepacketizerStats {
    pub packets: u64,
    pub other_pid: u64,
    pub sections: u64,
    pub errors: u64,
}

/// Reassembles the sections carried on one PID, the inverse of
/// [`Packetizer`]; used by the tests and by `casd-probe`.
///
/// Feed it every packet of the stream in order (packets of other PIDs are
/// counted and ignored, so a whole multiplex can be fed). It never panics;
/// whatever is wrong (sync byte, CC gap or duplicate, bad pointer_field,
/// section too long or cut short, CRC) is reported as an [`Event::Error`]
/// and reassembly picks up again at the next section start.
#[derive(Debug)]
pub struct Depacketizer {
    pid: Pid,
    last_cc: Option<u8>,
    buf: Vec<u8>,
    in_section: bool,
    stats: DepacketizerStats,
}

impl Depacketizer {
    pub fn new(pid: Pid) -> Self {
        Depacketizer {
            pid,
            last_cc: None,
            buf: Vec::with_capacity(MAX_SECTION_LEN),
            in_section: false,
            stats: DepacketizerStats::default(),
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }
    pub fn stats(&self) -> DepacketizerStats {
        self.stats
    }

    /// Pushes one packet and returns what it completed.
    pub fn push(&mut self, packet: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        self.push_with(packet, |e| events.push(e));
        events
    }

    /// Pushes one packet (any slice: a wrong length is reported) and calls
    /// `sink` for every event, in stream order.
    pub fn push_with(&mut self, packet: &[u8], mut sink: impl FnMut(Event)) {
        let (mut sections, mut errors) = (0, 0);
        self.process(packet, &mut |e: Event| {
            match &e {
                Event::Section(_) => sections += 1,
                Event::Error(_) => errors += 1,
                Event::Discontinuity => {}
            }
            sink(e)
        });
        self.stats.sections += sections;
        self.stats.errors += errors;
    }

    fn process(&mut self, packet: &[u8], out: &mut impl FnMut(Event)) {
        let p = match PacketRef::parse(packet) {
            Ok(p) => p,
            Err(e) => return out(Event::Error(e)),
        };
        if p.pid() != self.pid {
            self.stats.other_pid += 1;
            return;
        }
        self.stats.packets += 1;
        if p.transport_error() {
            self.abandon();
            return out(Event::Error(StreamError::TransportError));
        }
        let payload = match p.payload() {
            Ok(pl) => pl,
            Err(e) => {
                self.abandon();
                return out(Event::Error(e));
            }
        };
        if !self.check_continuity(&p, payload.is_some(), out) {
            return;
        }
        let Some(payload) = payload else { return };
        if p.scrambling_control() != 0 {
            self.abandon();
            return out(Event::Error(StreamError::Scrambled {
                control: p.scrambling_control(),
            }));
        }
        if p.payload_unit_start() {
            self.unit_start(payload, out);
        } else if self.in_section {
            // Whatever follows the end of the section must be stuffing:
            // without PUSI no section may start in this packet.
            self.feed(payload, out);
        }
    }

    /// The continuity_counter against the last one; false for a duplicate
    /// packet, which is dropped.
    fn check_continuity(
        &mut self,
        p: &PacketRef<'_>,
        has_payload: bool,
        out: &mut impl FnMut(Event),
    ) -> bool {
        let cc = p.continuity_counter();
        if p.discontinuity() {
            if self.in_section {
                self.truncated(out);
            }
            out(Event::Discontinuity);
        } else {
            match continuity(self.last_cc, cc, has_payload) {
                Continuity::InOrder => {}
                Continuity::Duplicate => {
                    out(Event::Error(StreamError::Duplicate { cc }));
                    return false;
                }
                Continuity::Gap { expected } => {
                    self.abandon();
                    out(Event::Error(StreamError::ContinuityGap {
                        expected,
                        found: cc,
                    }));
                }
            }
        }
        self.last_cc = Some(cc);
        true
    }

    /// A payload with payload_unit_start_indicator: the tail of the section
    /// in progress up to the pointer_field, then the sections starting here.
    fn unit_start(&mut self, payload: &[u8], out: &mut impl FnMut(Event)) {
        let Some((&pointer, rest)) = payload.split_first() else {
            return;
        };
        let Some((tail, mut starts)) = rest
            .get(..usize::from(pointer))
            .zip(rest.get(usize::from(pointer)..))
        else {
            self.abandon();
            return out(Event::Error(StreamError::PointerField {
                pointer,
                available: rest.len(),
            }));
        };
        if self.in_section {
            self.feed(tail, out);
            if self.in_section {
                // A new section starts before this one was complete.
                self.truncated(out);
            }
        }
        while let Some(&first) = starts.first() {
            if first == 0xFF {
                break; // stuffing to the end of the packet
            }
            self.buf.clear();
            self.in_section = true;
            starts = self.feed(starts, out);
            if self.in_section {
                break; // continues in the next packet
            }
        }
    }

    fn truncated(&mut self, out: &mut impl FnMut(Event)) {
        let got = self.buf.len();
        let expected = section::declared_total_len(&self.buf);
        self.abandon();
        out(Event::Error(StreamError::TruncatedSection {
            got,
            expected,
        }));
    }

    fn abandon(&mut self) {
        self.in_section = false;
        self.buf.clear();
    }

    /// Appends bytes of the section in progress; returns the bytes after it
    /// if it completed in `data`.
    fn feed<'d>(&mut self, mut data: &'d [u8], out: &mut impl FnMut(Event)) -> &'d [u8] {
        if self.buf.len() < LENGTH_PREFIX {
            let n = (LENGTH_PREFIX - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        let Some(total) = section::declared_total_len(&self.buf) else {
            return data; // still fewer than 3 bytes
        };
        if total > MAX_SECTION_LEN {
            self.abandon();
            out(Event::Error(StreamError::SectionTooLong {
                section_length: total - LENGTH_PREFIX,
            }));
            return &[];
        }
        let n = (total - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        data = &data[n..];
        if self.buf.len() == total {
            self.in_section = false;
            match Section::parse(&self.buf) {
                Ok(_) => out(Event::Section(Bytes::copy_from_slice(&self.buf))),
                Err(e) => out(Event::Error(StreamError::InvalidSection(e))),
            }
            self.buf.clear();
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{build, LongHeader, TableId};
    use std::collections::VecDeque;

    #[test]
    fn continuity_rules() {
        use Continuity::*;
        assert_eq!(continuity(None, 9, true), InOrder);
        assert_eq!(continuity(Some(15), 0, true), InOrder);
        assert_eq!(continuity(Some(4), 4, true), Duplicate);
        assert_eq!(continuity(Some(4), 6, true), Gap { expected: 5 });
        // Without payload the counter stays.
        assert_eq!(continuity(Some(4), 4, false), InOrder);
        assert_eq!(continuity(Some(4), 5, false), Gap { expected: 4 });
    }

    fn section(len: usize, seed: u8) -> Bytes {
        let body: Vec<u8> = (0..len - 12).map(|i| seed.wrapping_add(i as u8)).collect();
        Bytes::from(
            build(
                &LongHeader::private(TableId::EMM_UNIQUE, seed.into()),
                &body,
            )
            .unwrap(),
        )
    }

    fn packetize(sections: &[Bytes], pack: bool) -> Vec<[u8; PACKET_LEN]> {
        let mut q: VecDeque<Bytes> = sections.iter().cloned().collect();
        let mut p = Packetizer::new(Pid::DEFAULT_EMM, pack);
        let mut out = Vec::new();
        let mut pkt = [0u8; PACKET_LEN];
        while p.next_packet(&mut pkt, || q.pop_front()) {
            out.push(pkt);
        }
        out
    }

    fn depacketize(packets: &[[u8; PACKET_LEN]]) -> (Vec<Bytes>, Vec<Event>) {
        let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
        let mut sections = Vec::new();
        let mut others = Vec::new();
        for p in packets {
            d.push_with(p, |e| match e {
                Event::Section(s) => sections.push(s),
                e => others.push(e),
            });
        }
        (sections, others)
    }

    #[test]
    fn null_packet_bytes() {
        assert_eq!(NULL_PACKET[..4], [0x47, 0x1F, 0xFF, 0x10]);
        assert!(NULL_PACKET[4..].iter().all(|&b| b == 0xFF));
        assert_eq!(PacketRef::parse(&NULL_PACKET).unwrap().pid(), Pid::NULL);
    }

    #[test]
    fn pid_range() {
        assert_eq!(Pid::new(0x1FFF), Some(Pid::NULL));
        assert_eq!(Pid::new(0x2000), None);
        assert_eq!(Pid::CAT.value(), 1);
    }

    #[test]
    fn first_packet_has_discontinuity_then_plain_headers() {
        let pkts = packetize(&[section(300, 1)], true);
        assert_eq!(pkts.len(), 2);
        // PUSI, PID 0x0101, AFC '11', CC 0, AF length 1, discontinuity, pointer 0.
        assert_eq!(pkts[0][..7], [0x47, 0x41, 0x01, 0x30, 0x01, 0x80, 0x00]);
        // Continuation: no PUSI, AFC '01', CC 1.
        assert_eq!(pkts[1][..4], [0x47, 0x01, 0x01, 0x11]);
        // 300 - 181 bytes of tail, then stuffing.
        assert!(pkts[1][4 + 119..].iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn packed_sections_share_a_packet_with_pointer_field() {
        let s = [section(200, 1), section(50, 2), section(40, 3)];
        let pkts = packetize(&s, true);
        // 200 bytes: 181 in packet 0; packet 1 has pointer 19, tail, then
        // the 50- and 40-byte sections, then stuffing.
        assert_eq!(pkts.len(), 2);
        assert_eq!(pkts[1][1] & 0x40, 0x40);
        assert_eq!(pkts[1][4], 19);
        assert_eq!(pkts[1][5 + 19], 0x82);
        assert_eq!(&pkts[1][5 + 19..5 + 19 + 50], &s[1][..]);
        assert_eq!(&pkts[1][5 + 69..5 + 69 + 40], &s[2][..]);
        assert!(pkts[1][5 + 109..].iter().all(|&b| b == 0xFF));
        assert_eq!(depacketize(&pkts), (s.to_vec(), vec![Event::Discontinuity]));
    }

    #[test]
    fn unpacked_mode_starts_each_section_in_a_new_packet() {
        let s = [section(200, 1), section(50, 2), section(40, 3)];
        let pkts = packetize(&s, false);
        assert_eq!(pkts.len(), 4);
        assert_eq!(pkts[1][1] & 0x40, 0); // tail of the first only
        for p in &pkts[2..] {
            assert_eq!(p[1] & 0x40, 0x40);
            assert_eq!(p[4], 0); // pointer_field always 0
        }
        assert_eq!(depacketize(&pkts).0, s.to_vec());
    }

    #[test]
    fn no_section_start_with_fewer_than_three_bytes_of_room() {
        // Tail of 182 bytes leaves 184 - 1 - 182 = 1 byte: stuffing, and the
        // next section starts in the following packet.
        let s = [section(181 + 182, 1), section(20, 2)];
        let pkts = packetize(&s, true);
        assert_eq!(pkts.len(), 3);
        assert_eq!(pkts[1][1] & 0x40, 0);
        assert_eq!(pkts[1][4 + 182..], [0xFF, 0xFF]);
        assert_eq!(pkts[2][4], 0);
        assert_eq!(depacketize(&pkts).0, s.to_vec());
    }

    #[test]
    fn depacketizer_reports_gaps_duplicates_and_bad_crc() {
        let s = [section(400, 1), section(30, 2), section(30, 3)];
        let pkts = packetize(&s, true);
        assert_eq!(pkts.len(), 3);
        // Drop packet 1: the first section is lost, CC gap reported, the
        // sections starting in packet 2 after the pointer survive.
        let (got, ev) = depacketize(&[pkts[0], pkts[2]]);
        assert_eq!(got, s[1..].to_vec());
        assert!(ev.contains(&Event::Error(StreamError::ContinuityGap {
            expected: 1,
            found: 2
        })));
        // Duplicate packet: discarded, everything recovered.
        let (got, ev) = depacketize(&[pkts[0], pkts[1], pkts[1], pkts[2]]);
        assert_eq!(got, s.to_vec());
        assert!(ev.contains(&Event::Error(StreamError::Duplicate { cc: 1 })));
        // A flipped payload bit: CRC mismatch reported, others fine.
        let mut bad = pkts.clone();
        bad[2][5 + 35 + 10] ^= 0x01; // inside the second section
        let (got, ev) = depacketize(&bad);
        assert_eq!(got.len(), 2);
        assert!(ev.iter().any(|e| matches!(
            e,
            Event::Error(StreamError::InvalidSection(
                SectionError::CrcMismatch { .. }
            ))
        )));
        // Bad sync byte.
        let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
        let mut nosync = pkts[0];
        nosync[0] = 0x46;
        assert_eq!(
            d.push(&nosync),
            vec![Event::Error(StreamError::SyncByte { found: 0x46 })]
        );
        assert_eq!(
            d.push(&nosync[..100]),
            vec![Event::Error(StreamError::PacketLength { len: 100 })]
        );
    }

    #[test]
    fn truncated_section_is_reported() {
        let s = [section(400, 1)];
        let mut pkts = packetize(&s, true);
        // Replace the last packet by the start of a new section with CC continuing.
        let mut p2 = Packetizer::new(Pid::DEFAULT_EMM, true);
        let mut q = VecDeque::from([section(20, 9)]);
        let mut fresh = [0u8; PACKET_LEN];
        assert!(p2.next_packet(&mut fresh, || q.pop_front()));
        // Rewrite as a plain PUSI packet with CC 2 and pointer 0.
        let mut pkt = [0xFFu8; PACKET_LEN];
        pkt[..4].copy_from_slice(&[0x47, 0x41, 0x01, 0x12]);
        pkt[4] = 0;
        pkt[5..25].copy_from_slice(&q_section(&fresh));
        pkts[2] = pkt;
        let (got, ev) = depacketize(&pkts);
        assert_eq!(got.len(), 1);
        assert!(ev.contains(&Event::Error(StreamError::TruncatedSection {
            got: 181 + 184,
            expected: Some(400)
        })));
    }

    fn q_section(first_packet: &[u8; PACKET_LEN]) -> [u8; 20] {
        // first packet of a fresh packetizer: 6 header bytes + pointer.
        first_packet[7..27].try_into().unwrap()
    }

    #[test]
    fn cc_continues_across_sources() {
        let mut p = Packetizer::new(Pid::DEFAULT_EMM, true);
        let mut pkt = [0u8; PACKET_LEN];
        let mut ccs = Vec::new();
        for cycle in 0..5 {
            let mut q: VecDeque<Bytes> = (0..7).map(|i| section(100 + i * 30, cycle)).collect();
            while p.next_packet(&mut pkt, || q.pop_front()) {
                ccs.push(pkt[3] & 0x0F);
            }
        }
        for (i, cc) in ccs.iter().enumerate() {
            assert_eq!(usize::from(*cc), i % 16);
        }
        assert!(ccs.len() > 16);
    }
}
