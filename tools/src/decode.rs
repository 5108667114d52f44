//! The decoding pipeline: TS packets → per-PID sections (the carousel
//! crate's `Depacketizer`, CRC and continuity checked) → the CAT and EMMs
//! (`casd_wire::crypto::parse_section`, `casd_wire::emm::open_emm` when a key is
//! known) → records (JSON values) and counters for the summary.
//!
//! Nothing here trusts its input: every byte sequence gives records and
//! counts, never a panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use carousel::section::SectionError;
use carousel::{Cat, Depacketizer, Event, PacketRef, Pid, Section, StreamError, TableId};
use casd_wire::crypto::{self, Key128, OpenError};
use casd_wire::emm::{self, Address, Command, OpenEmmError};
use serde_json::{json, Value};

use crate::keys::{KeySet, KeySource};

/// TS packet size.
pub const PACKET_LEN: usize = 188;

/// What the probe decodes and how.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// PIDs whose sections are reassembled besides the CAT's (default 0x0101).
    pub section_pids: Vec<u16>,
    /// Also reassemble the EMM PIDs the CAT's CA_descriptors announce.
    pub follow_cat: bool,
    /// Reassemble sections on every PID except the null PID.
    pub all_pids: bool,
    pub keys: KeySet,
    /// Use GROUP_KEY / GLOBAL_KEY from opened unique EMMs for group/global EMMs.
    pub learn_keys: bool,
    /// Print delivered key bytes (test keys only).
    pub show_keys: bool,
    /// Emit a record for every repetition, not only for the first sighting.
    pub repeats: bool,
    /// Keep every sighting time of every section (audit).
    pub keep_times: bool,
    /// Give TS-file packets a time from their position at this bitrate.
    pub ts_bitrate: Option<u64>,
    /// Largest number of error records emitted (counting goes on).
    pub max_error_records: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            section_pids: vec![Pid::DEFAULT_EMM.value()],
            follow_cat: true,
            all_pids: false,
            keys: KeySet::default(),
            learn_keys: true,
            show_keys: false,
            repeats: false,
            keep_times: false,
            ts_bitrate: None,
            max_error_records: 10_000,
        }
    }
}

/// Running min / max / median (median over a bounded deterministic sample).
#[derive(Debug, Clone, Default)]
pub struct IntervalStats {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    sample: Vec<f64>,
    rng: u64,
}

const SAMPLE: usize = 1024;

impl IntervalStats {
    pub fn add(&mut self, x: f64) {
        if self.count == 0 {
            self.min = x;
            self.max = x;
            self.rng = 0x9E37_79B9_7F4A_7C15;
        }
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.count += 1;
        if self.sample.len() < SAMPLE {
            self.sample.push(x);
        } else {
            // Reservoir sampling with a xorshift generator.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let j = self.rng % self.count;
            if (j as usize) < SAMPLE {
                self.sample[j as usize] = x;
            }
        }
    }
    pub fn median(&self) -> Option<f64> {
        if self.sample.is_empty() {
            return None;
        }
        let mut s = self.sample.clone();
        s.sort_by(f64::total_cmp);
        Some(s[s.len() / 2])
    }
    pub fn json(&self) -> Value {
        match self.median() {
            None => Value::Null,
            Some(m) => json!({"min": self.min, "median": m, "max": self.max, "count": self.count}),
        }
    }
}

/// What opening an EMM gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No key for its address / version.
    NoKey(String),
    /// The MAC did not verify with the key we have.
    MacFail(&'static str),
    /// CRC-valid but not a well-formed EMM, or authentic but undecodable.
    Malformed(String),
    /// Authentic and decoded.
    Opened {
        emm_id: u64,
        source: &'static str,
        json: Value,
    },
}

/// What a distinct section is.
#[derive(Debug, Clone)]
pub enum Kind {
    Cat,
    Emm {
        mode: &'static str,
        table_id_extension: u16,
        address: Value,
        key_version: Option<u32>,
        outcome: Outcome,
    },
    Other {
        table_id: u8,
    },
}

/// One distinct section (by its bytes) and every sighting of it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub pid: u16,
    pub kind: Kind,
    pub count: u64,
    pub first_packet: u64,
    pub last_packet: u64,
    pub first_time: Option<f64>,
    pub last_time: Option<f64>,
    /// Seconds between repetitions (when times are known).
    pub cycle_s: IntervalStats,
    /// Packets between repetitions.
    pub cycle_packets: IntervalStats,
    /// Every sighting time, with `keep_times`.
    pub times: Vec<f64>,
    keys_generation: u64,
}

impl Seen {
    fn first(
        pid: u16,
        kind: Kind,
        index: u64,
        t: Option<f64>,
        keep_times: bool,
        keys_generation: u64,
    ) -> Seen {
        Seen {
            pid,
            kind,
            count: 1,
            first_packet: index,
            last_packet: index,
            first_time: t,
            last_time: t,
            cycle_s: IntervalStats::default(),
            cycle_packets: IntervalStats::default(),
            times: if keep_times {
                t.into_iter().collect()
            } else {
                Vec::new()
            },
            keys_generation,
        }
    }

    /// Another sighting, in packet `index` at time `t`.
    fn sighted_again(&mut self, index: u64, t: Option<f64>, keep_times: bool) {
        self.count += 1;
        if let (Some(t), Some(last)) = (t, self.last_time) {
            self.cycle_s.add(t - last);
        }
        self.cycle_packets.add((index - self.last_packet) as f64);
        self.last_packet = index;
        if t.is_some() {
            self.last_time = t;
        }
        if let (true, Some(t)) = (keep_times, t) {
            self.times.push(t);
        }
    }

    /// An EMM that had no key, tried before the keys of `generation`.
    fn awaits_key(&self, generation: u64) -> bool {
        matches!(
            &self.kind,
            Kind::Emm {
                outcome: Outcome::NoKey(_),
                ..
            }
        ) && self.keys_generation != generation
    }

    pub fn emm_id(&self) -> Option<u64> {
        match &self.kind {
            Kind::Emm {
                outcome: Outcome::Opened { emm_id, .. },
                ..
            } => Some(*emm_id),
            _ => None,
        }
    }
}

/// Counters for the summary.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub packets: u64,
    pub datagrams: u64,
    pub rtp_datagrams: u64,
    pub sections: u64,
    pub cat_sections: u64,
    pub other_sections: u64,
    pub emm_sections: [u64; 3],
    pub crc_errors: u64,
    pub cc_errors: u64,
    pub duplicates: u64,
    pub truncated: u64,
    pub other_stream_errors: u64,
    pub invalid_sections: u64,
    pub sync_errors: u64,
    pub discontinuities: u64,
    pub mac_errors: u64,
    pub no_key: u64,
    pub malformed: u64,
    pub opened: u64,
    pub skipped_bytes: u64,
    pub sync_losses: u64,
    pub trailing_bytes: u64,
    pub frames_skipped: u64,
    pub error_records_suppressed: u64,
}

impl Counters {
    /// CRC + CC + MAC + stream + sync errors.
    pub fn total_errors(&self) -> u64 {
        self.crc_errors
            + self.cc_errors
            + self.truncated
            + self.other_stream_errors
            + self.invalid_sections
            + self.sync_errors
            + self.mac_errors
            + self.malformed
    }
}

#[derive(Debug)]
struct PidState {
    packets: u64,
    depack: Option<Depacketizer>,
    sections: u64,
    cc_errors: u64,
}

fn mode_index(mode: &str) -> usize {
    match mode {
        "unique" => 0,
        "group" => 1,
        _ => 2,
    }
}

/// The decoder. Feed it packets with [`Probe::push_packet`]; records come
/// out through the callback; [`Probe::summary`] at any time.
pub struct Probe {
    cfg: ProbeConfig,
    pids: BTreeMap<u16, PidState>,
    section_pids: BTreeSet<u16>,
    sections: HashMap<Bytes, Seen>,
    pub counters: Counters,
    keys_generation: u64,
    first_time: Option<f64>,
    last_time: Option<f64>,
    error_records: u64,
    cat: BTreeSet<(u16, u16)>,
    events: Vec<Event>,
}

impl Probe {
    pub fn new(cfg: ProbeConfig) -> Probe {
        let mut section_pids: BTreeSet<u16> = cfg.section_pids.iter().copied().collect();
        section_pids.insert(Pid::CAT.value());
        Probe {
            cfg,
            pids: BTreeMap::new(),
            section_pids,
            sections: HashMap::new(),
            counters: Counters::default(),
            keys_generation: 0,
            first_time: None,
            last_time: None,
            error_records: 0,
            cat: BTreeSet::new(),
            events: Vec::new(),
        }
    }

    pub fn config(&self) -> &ProbeConfig {
        &self.cfg
    }

    /// Distinct sections seen so far.
    pub fn sections(&self) -> &HashMap<Bytes, Seen> {
        &self.sections
    }

    /// Capture-timeline seconds of the first and last packet.
    pub fn time_span(&self) -> Option<(f64, f64)> {
        self.first_time.zip(self.last_time)
    }

    fn rel(&self, t: Option<f64>) -> Value {
        match (t, self.first_time) {
            (Some(t), Some(f)) => json!(((t - f) * 1e6).round() / 1e6),
            _ => Value::Null,
        }
    }

    fn error_record(
        &mut self,
        pid: Option<u16>,
        packet: u64,
        t: Option<f64>,
        kind: &str,
        msg: String,
        emit: &mut dyn FnMut(Value),
    ) {
        if self.error_records >= self.cfg.max_error_records {
            self.counters.error_records_suppressed += 1;
            return;
        }
        self.error_records += 1;
        emit(
            json!({"type": "error", "t": self.rel(t), "packet": packet, "pid": pid, "kind": kind, "message": msg}),
        );
    }

    /// One TS packet (any slice; a wrong length or sync byte is counted).
    /// `time` is the capture time in seconds (arrival or pcap time), if any.
    pub fn push_packet(&mut self, pkt: &[u8], time: Option<f64>, emit: &mut dyn FnMut(Value)) {
        let index = self.counters.packets;
        self.counters.packets += 1;
        let time = time.or_else(|| {
            self.cfg
                .ts_bitrate
                .filter(|&b| b > 0)
                .map(|b| index as f64 * (PACKET_LEN * 8) as f64 / b as f64)
        });
        if let Some(t) = time {
            if self.first_time.is_none() {
                self.first_time = Some(t);
            }
            self.last_time = Some(self.last_time.map_or(t, |l: f64| l.max(t)));
        }
        let p = match PacketRef::parse(pkt) {
            Ok(p) => p,
            Err(e) => {
                self.counters.sync_errors += 1;
                self.error_record(None, index, time, "sync", e.to_string(), emit);
                return;
            }
        };
        let pid = p.pid().value();
        let wants =
            pid != Pid::NULL.value() && (self.cfg.all_pids || self.section_pids.contains(&pid));
        let st = self.pids.entry(pid).or_insert_with(|| PidState {
            packets: 0,
            depack: None,
            sections: 0,
            cc_errors: 0,
        });
        st.packets += 1;
        if !wants {
            return;
        }
        let d = st
            .depack
            .get_or_insert_with(|| Depacketizer::new(Pid::from_masked(pid)));
        let mut events = std::mem::take(&mut self.events);
        d.push_with(pkt, |e| events.push(e));
        for e in events.drain(..) {
            match e {
                Event::Section(s) => self.on_section(pid, s, index, time, emit),
                Event::Discontinuity => self.counters.discontinuities += 1,
                Event::Error(e) => self.on_stream_error(pid, e, index, time, emit),
            }
        }
        self.events = events;
    }

    fn on_stream_error(
        &mut self,
        pid: u16,
        e: StreamError,
        index: u64,
        t: Option<f64>,
        emit: &mut dyn FnMut(Value),
    ) {
        let c = &mut self.counters;
        let kind = match e {
            StreamError::ContinuityGap { .. } => {
                c.cc_errors += 1;
                if let Some(st) = self.pids.get_mut(&pid) {
                    st.cc_errors += 1;
                }
                "cc"
            }
            StreamError::Duplicate { .. } => {
                c.duplicates += 1;
                "duplicate"
            }
            StreamError::TruncatedSection { .. } => {
                c.truncated += 1;
                "truncated"
            }
            StreamError::InvalidSection(SectionError::CrcMismatch { .. }) => {
                c.crc_errors += 1;
                "crc"
            }
            StreamError::InvalidSection(_) => {
                c.invalid_sections += 1;
                "section"
            }
            StreamError::PacketLength { .. } | StreamError::SyncByte { .. } => {
                c.sync_errors += 1;
                "sync"
            }
            _ => {
                c.other_stream_errors += 1;
                "stream"
            }
        };
        self.error_record(Some(pid), index, t, kind, e.to_string(), emit);
    }

    fn on_section(
        &mut self,
        pid: u16,
        s: Bytes,
        index: u64,
        t: Option<f64>,
        emit: &mut dyn FnMut(Value),
    ) {
        self.counters.sections += 1;
        if let Some(st) = self.pids.get_mut(&pid) {
            st.sections += 1;
        }
        let Some(seen) = self.sections.get_mut(&s) else {
            emit(self.first_sighting(pid, &s, index, t));
            self.count_occurrence(&s);
            return;
        };
        seen.sighted_again(index, t, self.cfg.keep_times);
        let retry = seen.awaits_key(self.keys_generation);
        if !retry && !self.cfg.repeats {
            // The hot path: a repetition, one hash look-up.
            count_kind(&mut self.counters, &seen.kind);
            return;
        }
        if retry {
            // A key arrived since this section was last tried.
            let kind = self.classify(&s);
            let generation = self.keys_generation;
            if let Some(seen) = self.sections.get_mut(&s) {
                seen.kind = kind;
                seen.keys_generation = generation;
            }
        }
        if let Some(seen) = self.sections.get(&s) {
            emit(self.record(&s, seen, index, t, !retry));
        }
        self.count_occurrence(&s);
    }

    /// Classifies a new section, keeps it and returns its record.
    fn first_sighting(&mut self, pid: u16, s: &Bytes, index: u64, t: Option<f64>) -> Value {
        let kind = self.classify(s);
        let seen = Seen::first(
            pid,
            kind,
            index,
            t,
            self.cfg.keep_times,
            self.keys_generation,
        );
        let rec = self.record(s, &seen, index, t, false);
        self.sections.insert(s.clone(), seen);
        rec
    }

    fn count_occurrence(&mut self, s: &Bytes) {
        if let Some(seen) = self.sections.get(s) {
            count_kind(&mut self.counters, &seen.kind);
        }
    }

    fn classify(&mut self, s: &[u8]) -> Kind {
        match s.first().copied().map(TableId) {
            Some(TableId::CAT) => {
                match Section::parse(s)
                    .map_err(carousel::cat::CatError::from)
                    .and_then(Cat::from_section)
                {
                    Ok(cat) => {
                        for d in cat.ca_descriptors() {
                            self.cat.insert((d.ca_system_id, d.ca_pid.value()));
                            if self.cfg.follow_cat {
                                self.section_pids.insert(d.ca_pid.value());
                            }
                        }
                        Kind::Cat
                    }
                    Err(_) => Kind::Other { table_id: 0x01 },
                }
            }
            Some(TableId::EMM_UNIQUE | TableId::EMM_GROUP | TableId::EMM_GLOBAL) => {
                self.classify_emm(s)
            }
            Some(TableId(t)) => Kind::Other { table_id: t },
            None => Kind::Other { table_id: 0xFF },
        }
    }

    fn classify_emm(&mut self, s: &[u8]) -> Kind {
        let mode = emm_mode(s[0]);
        let (view, address) = match parse_emm(s) {
            Ok(parsed) => parsed,
            Err(why) => {
                return Kind::Emm {
                    mode,
                    table_id_extension: s.get(3..5).map_or(0, |b| u16::from_be_bytes([b[0], b[1]])),
                    address: Value::Null,
                    key_version: None,
                    outcome: Outcome::Malformed(why),
                }
            }
        };
        let kv = view.key_version;
        let outcome = match address_key(&mut self.cfg.keys, &address, kv) {
            None => Outcome::NoKey(no_key_reason(&address, kv)),
            Some((key, source)) => self.open(s, &key, source),
        };
        Kind::Emm {
            mode,
            table_id_extension: view.table_id_extension,
            address: serde_json::to_value(&address).unwrap_or(Value::Null),
            key_version: Some(kv),
            outcome,
        }
    }

    /// Opens an EMM with its address's key, learning the keys it delivers.
    fn open(&mut self, s: &[u8], key: &Key128, source: KeySource) -> Outcome {
        match emm::open_emm(s, key) {
            Ok(o) => {
                if self.cfg.learn_keys {
                    self.learn_keys(&o.commands);
                }
                opened(&o, source, self.cfg.show_keys)
            }
            Err(OpenEmmError::Section(OpenError::Mac)) => Outcome::MacFail(source.name()),
            Err(e) => Outcome::Malformed(e.to_string()),
        }
    }

    /// Keeps the GROUP_KEY / GLOBAL_KEY of an opened EMM, as a receiver
    /// does; a new key makes the sections still waiting for one retried.
    fn learn_keys(&mut self, commands: &[Command]) {
        for c in commands {
            let new = match c {
                Command::GroupKey {
                    group_id,
                    key_version,
                    key,
                    ..
                } => self.cfg.keys.learn_gk(*group_id, *key_version, key),
                Command::GlobalKey {
                    key_version, key, ..
                } => self.cfg.keys.learn_glk(*key_version, key),
                _ => false,
            };
            if new {
                self.keys_generation += 1;
            }
        }
    }

    fn record(&self, s: &[u8], seen: &Seen, index: u64, t: Option<f64>, repeat: bool) -> Value {
        let base = |ty: &str| {
            json!({
                "type": ty,
                "t": self.rel(t),
                "packet": index,
                "pid": seen.pid,
                "table_id": s.first().copied().unwrap_or(0),
                "len": s.len(),
            })
        };
        let mut v = match &seen.kind {
            Kind::Cat => {
                let mut v = base("cat");
                let descs: Vec<Value> = Cat::parse(s)
                    .map(|c| {
                        c.ca_descriptors()
                            .iter()
                            .map(|d| json!({"ca_system_id": d.ca_system_id, "ca_pid": d.ca_pid.value()}))
                            .collect()
                    })
                    .unwrap_or_default();
                v["version"] = json!(Section::parse(s).map(|x| x.version_number()).ok());
                v["ca_descriptors"] = Value::Array(descs);
                v
            }
            Kind::Other { table_id } => {
                let mut v = base("section");
                v["table_id"] = json!(table_id);
                v
            }
            Kind::Emm {
                mode,
                table_id_extension,
                address,
                key_version,
                outcome,
            } => {
                let mut v = base("emm");
                v["mode"] = json!(mode);
                v["table_id_extension"] = json!(table_id_extension);
                v["address"] = address.clone();
                v["key_version"] = json!(key_version);
                v["crc"] = json!("ok");
                match outcome {
                    Outcome::NoKey(why) => {
                        v["mac"] = json!("no_key");
                        v["error"] = json!(why);
                    }
                    Outcome::MacFail(src) => {
                        v["mac"] = json!("fail");
                        v["key_source"] = json!(src);
                        v["error"] = json!("MAC check failed (wrong key or altered section)");
                    }
                    Outcome::Malformed(why) => {
                        v["mac"] = Value::Null;
                        v["error"] = json!(why);
                    }
                    Outcome::Opened {
                        source, json: o, ..
                    } => {
                        v["mac"] = json!("ok");
                        v["key_source"] = json!(source);
                        if let (Some(dst), Some(src)) = (v.as_object_mut(), o.as_object()) {
                            for (k, x) in src {
                                dst.insert(k.clone(), x.clone());
                            }
                        }
                    }
                }
                v
            }
        };
        if repeat {
            v["repeat"] = json!(true);
            v["count"] = json!(seen.count);
        }
        v
    }

    /// Seconds covered by the capture, if times are known.
    pub fn duration(&self) -> Option<f64> {
        self.time_span().map(|(a, b)| b - a)
    }

    /// The summary record (`final_` marks the one at the end).
    pub fn summary(&self, final_: bool, per_emm_limit: usize) -> Value {
        let c = &self.counters;
        let dur = self.duration().filter(|d| *d > 0.0);
        let rate = |n: u64| dur.map(|d| (n as f64 / d * 1000.0).round() / 1000.0);
        let (distinct, emms) = self.emms_in_order();
        let timed = self.first_time.is_some();
        let cat: Vec<Value> = self
            .cat
            .iter()
            .map(|(sys, pid)| json!({"ca_system_id": sys, "ca_pid": pid}))
            .collect();
        json!({
            "type": "summary",
            "final": final_,
            "duration_s": dur,
            "packets": c.packets,
            "datagrams": c.datagrams,
            "rtp_datagrams": c.rtp_datagrams,
            "pids": self.pids_json(dur),
            "sections": c.sections,
            "sections_per_s": rate(c.sections),
            "cat_sections": c.cat_sections,
            "other_sections": c.other_sections,
            "cat": cat,
            "emm_sections": {"unique": c.emm_sections[0], "group": c.emm_sections[1], "global": c.emm_sections[2]},
            "emms_distinct": {"unique": distinct[0], "group": distinct[1], "global": distinct[2]},
            "emms_opened": c.opened,
            "errors": c.errors_json(),
            "cycle": cycle_json(&emms, timed),
            "per_emm": emms.iter().take(per_emm_limit).map(|(b, s)| per_emm_json(b, s, timed)).collect::<Vec<_>>(),
            "per_emm_truncated": emms.len() > per_emm_limit,
        })
    }

    fn pids_json(&self, dur: Option<f64>) -> Vec<Value> {
        self.pids
            .iter()
            .map(|(pid, st)| {
                json!({
                    "pid": pid,
                    "packets": st.packets,
                    "bitrate_bps": dur.map(|d| (st.packets as f64 * 1504.0 / d).round()),
                    "sections": st.sections,
                    "cc_errors": st.cc_errors,
                })
            })
            .collect()
    }

    /// Distinct EMM sections by mode, and the EMMs in the order first seen.
    fn emms_in_order(&self) -> ([u64; 3], Vec<(&Bytes, &Seen)>) {
        let mut distinct = [0u64; 3];
        let mut emms: Vec<(&Bytes, &Seen)> = Vec::new();
        for (b, s) in &self.sections {
            if let Kind::Emm { mode, .. } = &s.kind {
                distinct[mode_index(mode)] += 1;
                emms.push((b, s));
            }
        }
        emms.sort_by(|(a, x), (b, y)| (x.first_packet, a).cmp(&(y.first_packet, b)));
        (distinct, emms)
    }
}

impl Counters {
    fn errors_json(&self) -> Value {
        json!({
            "crc": self.crc_errors,
            "cc": self.cc_errors,
            "mac": self.mac_errors,
            "truncated": self.truncated,
            "duplicate": self.duplicates,
            "invalid_section": self.invalid_sections,
            "stream": self.other_stream_errors,
            "sync": self.sync_errors,
            "malformed_emm": self.malformed,
            "no_key": self.no_key,
            "discontinuities": self.discontinuities,
            "skipped_bytes": self.skipped_bytes,
            "sync_losses": self.sync_losses,
            "trailing_bytes": self.trailing_bytes,
            "frames_skipped": self.frames_skipped,
            "error_records_suppressed": self.error_records_suppressed,
        })
    }
}

/// A section's repetition intervals: in seconds when the capture is timed
/// (shown in ms), else in packets.
fn cycle_stats(s: &Seen, timed: bool) -> &IntervalStats {
    if timed {
        &s.cycle_s
    } else {
        &s.cycle_packets
    }
}

/// The cycle time over every EMM: min, median of the medians, max.
fn cycle_json(emms: &[(&Bytes, &Seen)], timed: bool) -> Value {
    let unit = if timed { "ms" } else { "packets" };
    let k = if timed { 1000.0 } else { 1.0 };
    let mut medians = IntervalStats::default();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (_, s) in emms {
        let st = cycle_stats(s, timed);
        if let Some(m) = st.median() {
            medians.add(m * k);
        }
        if st.count > 0 {
            (lo, hi) = (lo.min(st.min * k), hi.max(st.max * k));
        }
    }
    if medians.count == 0 {
        json!({"unit": unit, "emms": 0})
    } else {
        json!({"unit": unit, "emms": medians.count, "min": round3(lo), "median_of_medians": medians.median().map(round3), "max": round3(hi)})
    }
}

fn per_emm_json(b: &Bytes, s: &Seen, timed: bool) -> Value {
    let Kind::Emm {
        mode,
        table_id_extension,
        address,
        ..
    } = &s.kind
    else {
        return Value::Null;
    };
    let cycle = match (timed, s.cycle_s.median()) {
        (false, _) => s.cycle_packets.json(),
        (true, None) => Value::Null,
        (true, Some(m)) => {
            let st = &s.cycle_s;
            json!({"min": ms(st.min), "median": ms(m), "max": ms(st.max), "count": st.count})
        }
    };
    json!({
        "emm_id": s.emm_id(),
        "table_id_extension": table_id_extension,
        "mode": mode,
        "address": address,
        "len": b.len(),
        "count": s.count,
        "cycle": cycle,
    })
}

fn count_kind(c: &mut Counters, kind: &Kind) {
    match kind {
        Kind::Cat => c.cat_sections += 1,
        Kind::Other { .. } => c.other_sections += 1,
        Kind::Emm { mode, outcome, .. } => {
            c.emm_sections[mode_index(mode)] += 1;
            match outcome {
                Outcome::NoKey(_) => c.no_key += 1,
                Outcome::MacFail(_) => c.mac_errors += 1,
                Outcome::Malformed(_) => c.malformed += 1,
                Outcome::Opened { .. } => c.opened += 1,
            }
        }
    }
}

fn emm_mode(table_id: u8) -> &'static str {
    match table_id {
        0x82 => "unique",
        0x83 => "group",
        _ => "global",
    }
}

/// The envelope and the address of an EMM section, or why it is malformed.
fn parse_emm(s: &[u8]) -> Result<(crypto::SectionView<'_>, Address), String> {
    let view = crypto::parse_section(s).map_err(|e| e.to_string())?;
    let address = Address::from_wire(view.table_id, view.address).map_err(|e| e.to_string())?;
    Ok((view, address))
}

/// The key an EMM to `address` under key version `kv` is sealed with.
fn address_key(keys: &mut KeySet, address: &Address, kv: u32) -> Option<(Key128, KeySource)> {
    match address {
        Address::Unique { device_id } => keys.duk(device_id.get(), kv),
        Address::Group { group_id, .. } => keys.gk(*group_id, kv),
        Address::Global => keys.glk(kv),
    }
}

fn no_key_reason(address: &Address, kv: u32) -> String {
    match address {
        Address::Unique { device_id } => {
            format!("no DUK for device {device_id} (PMK version {kv})")
        }
        Address::Group { group_id, .. } => format!("no GK for group {group_id} version {kv}"),
        Address::Global => format!("no GLK version {kv}"),
    }
}

fn opened(o: &emm::OpenedEmm, source: KeySource, show_keys: bool) -> Outcome {
    let commands: Vec<Value> = o
        .commands
        .iter()
        .map(|c| command_json(c, show_keys))
        .collect();
    Outcome::Opened {
        emm_id: o.emm_id.0,
        source: source.name(),
        json: json!({
            "emm_id": o.emm_id.0,
            "issued_at": o.issued_at,
            "not_after": o.not_after,
            "commands": commands,
        }),
    }
}

fn ms(s: f64) -> f64 {
    round3(s * 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One command as JSON: the reviewable form (no key bytes,
/// [`Command::review_json`]), with `"key": "<redacted, 16 bytes>"` on key
/// deliveries unless `show_keys`, and an unknown command's value in hex.
pub fn command_json(c: &Command, show_keys: bool) -> Value {
    let mut v = c.review_json();
    let extra = match c {
        Command::GroupKey { key, .. } | Command::GlobalKey { key, .. } => {
            let shown = if show_keys {
                hex::encode(key.expose())
            } else {
                "<redacted, 16 bytes>".to_owned()
            };
            Some(("key", shown))
        }
        Command::Unknown { value, .. } => Some(("value", hex::encode(value))),
        _ => None,
    };
    if let (Some((name, shown)), Some(obj)) = (extra, v.as_object_mut()) {
        obj.insert(name.into(), Value::String(shown));
    }
    v
}

/// Finds 188-byte packets in a byte stream (a .ts file, stdin), resyncing
/// after lost sync bytes: out of sync, a packet is accepted only where two
/// sync bytes 188 bytes apart agree (or at the very end of the stream).
#[derive(Debug, Default)]
pub struct Resync {
    buf: Vec<u8>,
    locked: bool,
    pub skipped_bytes: u64,
    pub sync_losses: u64,
}

impl Resync {
    pub fn new() -> Resync {
        Resync::default()
    }

    /// Appends `data` and hands out every packet it completes.
    pub fn push(&mut self, data: &[u8], f: &mut dyn FnMut(&[u8])) {
        if self.buf.is_empty() && self.locked {
            // Fast path: aligned data straight from the caller's buffer.
            let n = self.scan(data, false, f);
            self.buf.extend_from_slice(&data[n..]);
            return;
        }
        self.buf.extend_from_slice(data);
        let buf = std::mem::take(&mut self.buf);
        let n = self.scan(&buf, false, f);
        self.buf = buf;
        self.buf.drain(..n);
    }

    /// End of stream: the last packet(s) without a following sync byte.
    /// Returns the number of bytes left over (a partial packet).
    pub fn finish(&mut self, f: &mut dyn FnMut(&[u8])) -> usize {
        let buf = std::mem::take(&mut self.buf);
        let n = self.scan(&buf, true, f);
        buf.len() - n
    }

    /// Consumes packets from `data`; returns how many bytes were used up.
    fn scan(&mut self, data: &[u8], eof: bool, f: &mut dyn FnMut(&[u8])) -> usize {
        let mut i = 0;
        let n = data.len();
        while n - i >= PACKET_LEN {
            if self.locked {
                if data[i] == 0x47 {
                    f(&data[i..i + PACKET_LEN]);
                    i += PACKET_LEN;
                    continue;
                }
                self.locked = false;
                self.sync_losses += 1;
            }
            // Look for two sync bytes a packet apart.
            let mut j = i;
            let mut found = None;
            while j + PACKET_LEN < n {
                if data[j] == 0x47 && data[j + PACKET_LEN] == 0x47 {
                    found = Some(j);
                    break;
                }
                j += 1;
            }
            match found {
                Some(j) => {
                    self.skipped_bytes += (j - i) as u64;
                    i = j;
                    self.locked = true;
                }
                None if eof => {
                    // Last packet of the stream: one sync byte must do.
                    match data[i..=n - PACKET_LEN].iter().position(|&b| b == 0x47) {
                        Some(k) => {
                            self.skipped_bytes += k as u64;
                            i += k;
                            self.locked = true;
                        }
                        None => {
                            self.skipped_bytes += (n - i) as u64;
                            return n;
                        }
                    }
                }
                None => {
                    // Keep the last packet's worth of bytes for the next push.
                    let keep_from = n - PACKET_LEN;
                    self.skipped_bytes += (keep_from - i) as u64;
                    return keep_from;
                }
            }
        }
        if eof && i < n {
            // A partial packet at the end: reported by the caller.
            return i;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(cc: u8) -> [u8; 188] {
        let mut p = [0xFFu8; 188];
        p[..4].copy_from_slice(&[0x47, 0x1F, 0xFF, 0x10 | cc]);
        p
    }

    #[test]
    fn resync_after_garbage_and_at_end() {
        let mut data = Vec::new();
        data.extend_from_slice(&[1, 2, 3]);
        for i in 0..3 {
            data.extend_from_slice(&pkt(i));
        }
        data.extend_from_slice(&[9, 9, 9, 9, 9]); // sync lost
        for i in 3..5 {
            data.extend_from_slice(&pkt(i));
        }
        data.extend_from_slice(&[0x47, 1]);
        let mut r = Resync::new();
        let mut got = Vec::new();
        for chunk in data.chunks(7) {
            r.push(chunk, &mut |p| got.push(p[3] & 0x0F));
        }
        let left = r.finish(&mut |p| got.push(p[3] & 0x0F));
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(r.skipped_bytes, 3 + 5);
        assert_eq!(r.sync_losses, 1);
        assert_eq!(left, 2);
        // A single packet file.
        let mut r = Resync::new();
        let mut n = 0;
        r.push(&pkt(0), &mut |_| n += 1);
        r.finish(&mut |_| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn interval_stats_median() {
        let mut s = IntervalStats::default();
        for x in [5.0, 1.0, 3.0] {
            s.add(x);
        }
        assert_eq!((s.min, s.median(), s.max), (1.0, Some(3.0), 5.0));
        for i in 0..10_000 {
            s.add(f64::from(i % 7));
        }
        assert_eq!(s.median(), Some(3.0));
    }

    fn emm_seen(outcome: Outcome, generation: u64) -> Seen {
        let kind = Kind::Emm {
            mode: "global",
            table_id_extension: 1,
            address: Value::Null,
            key_version: Some(1),
            outcome,
        };
        Seen::first(0x101, kind, 10, Some(1.0), true, generation)
    }

    #[test]
    fn sightings_update_cycles_and_times() {
        let mut s = emm_seen(Outcome::MacFail("glk"), 0);
        s.sighted_again(15, Some(1.5), true);
        s.sighted_again(25, None, true);
        assert_eq!((s.count, s.first_packet, s.last_packet), (3, 10, 25));
        assert_eq!((s.first_time, s.last_time), (Some(1.0), Some(1.5)));
        assert_eq!(s.times, vec![1.0, 1.5]);
        assert_eq!((s.cycle_s.count, s.cycle_s.max), (1, 0.5));
        assert_eq!((s.cycle_packets.min, s.cycle_packets.max), (5.0, 10.0));
        let mut untimed = emm_seen(Outcome::MacFail("glk"), 0);
        untimed.times.clear();
        untimed.sighted_again(11, Some(2.0), false);
        assert!(untimed.times.is_empty());
    }

    #[test]
    fn only_keyless_emms_wait_for_new_keys() {
        let waiting = emm_seen(Outcome::NoKey("no GLK version 1".into()), 2);
        assert!(!waiting.awaits_key(2));
        assert!(waiting.awaits_key(3));
        assert!(!emm_seen(Outcome::MacFail("glk"), 2).awaits_key(3));
    }

    #[test]
    fn emm_modes_and_missing_key_reasons() {
        assert_eq!(
            [emm_mode(0x82), emm_mode(0x83), emm_mode(0x84)],
            ["unique", "group", "global"]
        );
        assert_eq!(no_key_reason(&Address::Global, 4), "no GLK version 4");
        let group = Address::Group {
            group_id: 9,
            bitmap: [0; 32],
        };
        assert_eq!(no_key_reason(&group, 2), "no GK for group 9 version 2");
        let mut keys = KeySet::default();
        assert!(address_key(&mut keys, &group, 2).is_none());
    }

    #[test]
    fn cycle_over_emms_in_the_capture_unit() {
        let b = Bytes::from_static(b"x");
        let mut s = emm_seen(Outcome::MacFail("glk"), 0);
        assert_eq!(
            cycle_json(&[(&b, &s)], true),
            json!({"unit": "ms", "emms": 0})
        );
        s.sighted_again(20, Some(1.25), true);
        s.sighted_again(40, Some(1.75), true);
        assert_eq!(
            cycle_json(&[(&b, &s)], true),
            json!({"unit": "ms", "emms": 1, "min": 250.0, "median_of_medians": 500.0, "max": 500.0})
        );
        assert_eq!(
            cycle_json(&[(&b, &s)], false),
            json!({"unit": "packets", "emms": 1, "min": 10.0, "median_of_medians": 20.0, "max": 20.0})
        );
        assert_eq!(per_emm_json(&b, &s, true)["cycle"]["median"], json!(500.0));
    }
}
