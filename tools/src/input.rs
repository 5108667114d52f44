//! Where TS comes from: live UDP (unicast or multicast on a chosen
//! interface), a pcap / pcapng file, a raw .ts file or stdin.

use std::fs::File;
use std::io::{BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::TsResolution;

use crate::net;

/// What a chunk of input is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkKind {
    /// One UDP datagram (TS packets, perhaps behind an RTP header).
    Datagram {
        src: SocketAddrV4,
        dst: SocketAddrV4,
    },
    /// Bytes of a TS byte stream (packet boundaries unknown).
    Stream,
}

/// A piece of input with its capture time (unix seconds), if known.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub time: Option<f64>,
    pub kind: ChunkKind,
    pub data: Vec<u8>,
}

/// What a source had.
#[derive(Debug)]
pub enum Next {
    Chunk(Chunk),
    /// Nothing yet (live input); call again.
    Idle,
    End,
}

pub trait Source {
    fn next(&mut self) -> anyhow::Result<Next>;
    /// (bytes read, total bytes) for a progress line.
    fn progress(&self) -> (u64, Option<u64>);
    /// True when chunk times are wall-clock (live, pcap).
    fn wall_clock(&self) -> bool;
    /// Frames that carried no usable UDP datagram (pcap).
    fn skipped(&self) -> u64 {
        0
    }
    /// A warning to print once at the end (e.g. a truncated pcap).
    fn warning(&self) -> Option<String> {
        None
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// .ts file / stdin
// ---------------------------------------------------------------------------

pub struct TsSource {
    reader: Box<dyn Read>,
    read: u64,
    total: Option<u64>,
    buf: Vec<u8>,
}

impl TsSource {
    /// `-` is stdin.
    pub fn open(path: &Path) -> anyhow::Result<TsSource> {
        if path == Path::new("-") {
            return Ok(TsSource {
                reader: Box::new(std::io::stdin()),
                read: 0,
                total: None,
                buf: vec![0; 1 << 16],
            });
        }
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = f
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            bail!("{} is a directory, not a .ts file", path.display());
        }
        Ok(TsSource {
            reader: Box::new(f),
            read: 0,
            total: Some(meta.len()),
            buf: vec![0; 1 << 16],
        })
    }
}

impl Source for TsSource {
    fn next(&mut self) -> anyhow::Result<Next> {
        loop {
            match self.reader.read(&mut self.buf) {
                Ok(0) => return Ok(Next::End),
                Ok(n) => {
                    self.read += n as u64;
                    return Ok(Next::Chunk(Chunk {
                        time: None,
                        kind: ChunkKind::Stream,
                        data: self.buf[..n].to_vec(),
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!("read error: {e}")),
            }
        }
    }
    fn progress(&self) -> (u64, Option<u64>) {
        (self.read, self.total)
    }
    fn wall_clock(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------
// pcap / pcapng
// ---------------------------------------------------------------------------

struct Counting<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

type Input = Counting<BufReader<File>>;

enum PcapKind {
    Pcap {
        reader: PcapReader<Input>,
        link: u32,
    },
    Ng {
        reader: PcapNgReader<Input>,
        /// Per interface: link type and seconds per timestamp unit.
        interfaces: Vec<(u32, f64)>,
    },
}

pub struct PcapSource {
    kind: PcapKind,
    port: Option<u16>,
    read: std::rc::Rc<std::cell::Cell<u64>>,
    total: u64,
    skipped: u64,
    warning: Option<String>,
    done: bool,
}

const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xA1, 0xB2, 0xC3, 0xD4],
    [0xD4, 0xC3, 0xB2, 0xA1],
    [0xA1, 0xB2, 0x3C, 0x4D],
    [0x4D, 0x3C, 0xB2, 0xA1],
];
const PCAPNG_MAGIC: [u8; 4] = [0x0A, 0x0D, 0x0D, 0x0A];

fn tsresol_seconds(v: u8) -> f64 {
    let exp = i32::from(v & 0x7F).min(60);
    if v & 0x80 != 0 {
        2f64.powi(-exp)
    } else {
        10f64.powi(-exp)
    }
}

impl PcapSource {
    pub fn open(path: &Path, port: Option<u16>) -> anyhow::Result<PcapSource> {
        let name = path.display();
        let mut f = File::open(path).with_context(|| format!("cannot open {name}"))?;
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic)
            .map_err(|_| anyhow!("{name} is not a pcap or pcapng file (too short)"))?;
        drop(f);
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let input = || -> anyhow::Result<Input> {
            Ok(Counting {
                inner: BufReader::with_capacity(
                    1 << 16,
                    File::open(path).with_context(|| format!("cannot open {name}"))?,
                ),
                read: read.clone(),
            })
        };
        let kind = if PCAP_MAGICS.contains(&magic) {
            let reader =
                PcapReader::new(input()?).map_err(|e| anyhow!("{name}: bad pcap header: {e}"))?;
            let link = u32::from(reader.header().datalink);
            PcapKind::Pcap { reader, link }
        } else if magic == PCAPNG_MAGIC {
            let reader = PcapNgReader::new(input()?)
                .map_err(|e| anyhow!("{name}: bad pcapng section header: {e}"))?;
            PcapKind::Ng {
                reader,
                interfaces: Vec::new(),
            }
        } else {
            bail!(
                "{name} is not a pcap or pcapng file (starts with {})",
                hex::encode(magic)
            );
        };
        Ok(PcapSource {
            kind,
            port,
            read,
            total,
            skipped: 0,
            warning: None,
            done: false,
        })
    }

    fn datagram(&mut self, link: u32, frame: &[u8], time: f64) -> Option<Chunk> {
        match net::parse_frame(link, frame) {
            Ok(u) if self.port.is_none_or(|p| p == u.dst.port()) => Some(Chunk {
                time: Some(time),
                kind: ChunkKind::Datagram {
                    src: u.src,
                    dst: u.dst,
                },
                data: u.payload.to_vec(),
            }),
            _ => {
                self.skipped += 1;
                None
            }
        }
    }

    fn end_with(&mut self, e: pcap_file::PcapError) -> Next {
        self.done = true;
        self.warning = Some(match e {
            pcap_file::PcapError::IncompleteBuffer => {
                "capture file ends with a truncated record".to_owned()
            }
            e => format!(
                "capture file unreadable after {} bytes: {e}",
                self.read.get()
            ),
        });
        Next::End
    }
}

impl Source for PcapSource {
    fn next(&mut self) -> anyhow::Result<Next> {
        if self.done {
            return Ok(Next::End);
        }
        loop {
            match &mut self.kind {
                PcapKind::Pcap { reader, link } => {
                    let link = *link;
                    let nanos = reader.header().ts_resolution == TsResolution::NanoSecond;
                    let (frame, time) = match reader.next_packet() {
                        None => return Ok(Next::End),
                        Some(Err(e)) => return Ok(self.end_with(e)),
                        Some(Ok(p)) => {
                            // pcap-file already scales the fraction to nanoseconds.
                            let _ = nanos;
                            (p.data.into_owned(), p.timestamp.as_secs_f64())
                        }
                    };
                    if let Some(c) = self.datagram(link, &frame, time) {
                        return Ok(Next::Chunk(c));
                    }
                }
                PcapKind::Ng { reader, interfaces } => {
                    let block = match reader.next_block() {
                        None => return Ok(Next::End),
                        Some(Err(e)) => return Ok(self.end_with(e)),
                        Some(Ok(b)) => b,
                    };
                    let (link, frame, time) = match block {
                        Block::SectionHeader(_) => {
                            interfaces.clear();
                            continue;
                        }
                        Block::InterfaceDescription(idb) => {
                            let mut unit = 1e-6;
                            for o in &idb.options {
                                if let InterfaceDescriptionOption::IfTsResol(r) = o {
                                    unit = tsresol_seconds(*r);
                                }
                            }
                            interfaces.push((u32::from(idb.linktype), unit));
                            continue;
                        }
                        Block::EnhancedPacket(epb) => {
                            let Some(&(link, unit)) = interfaces.get(epb.interface_id as usize)
                            else {
                                self.skipped += 1;
                                continue;
                            };
                            // pcap-file reads the raw 64-bit count as nanoseconds.
                            let raw = epb.timestamp.as_nanos() as f64;
                            (link, epb.data.into_owned(), raw * unit)
                        }
                        Block::SimplePacket(spb) => {
                            let Some(&(link, _)) = interfaces.first() else {
                                self.skipped += 1;
                                continue;
                            };
                            (link, spb.data.into_owned(), 0.0)
                        }
                        _ => continue,
                    };
                    if let Some(c) = self.datagram(link, &frame, time) {
                        return Ok(Next::Chunk(c));
                    }
                }
            }
        }
    }
    fn progress(&self) -> (u64, Option<u64>) {
        (self.read.get(), Some(self.total))
    }
    fn wall_clock(&self) -> bool {
        true
    }
    fn skipped(&self) -> u64 {
        self.skipped
    }
    fn warning(&self) -> Option<String> {
        self.warning.clone()
    }
}

// ---------------------------------------------------------------------------
// live UDP
// ---------------------------------------------------------------------------

pub struct UdpSource {
    socket: UdpSocket,
    dst: SocketAddrV4,
    buf: Vec<u8>,
    read: u64,
}

/// The IPv4 address of a network interface, for error messages and
/// multicast membership; a clear error when there is no such interface.
pub fn interface_index(name: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|_| anyhow!("no network interface named {name:?}"))
}

impl UdpSource {
    /// Binds `addr` (unicast: that address; multicast: the group's port,
    /// joining the group on `interface` or the default one).
    pub fn open(addr: SocketAddr, interface: Option<&str>) -> anyhow::Result<UdpSource> {
        let SocketAddr::V4(v4) = addr else {
            bail!("--udp {addr}: only IPv4 is supported");
        };
        let ifindex = interface.map(interface_index).transpose()?;
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .context("cannot create a UDP socket")?;
        let multicast = v4.ip().is_multicast();
        if multicast {
            sock.set_reuse_address(true).context("SO_REUSEADDR")?;
        }
        // A big receive buffer: bursts at tens of Mbit/s must not be dropped
        // while the decoder catches up (best effort, capped by rmem_max).
        let _ = sock.set_recv_buffer_size(8 << 20);
        let bind = if multicast {
            SocketAddrV4::new(*v4.ip(), v4.port())
        } else {
            v4
        };
        sock.bind(&SocketAddr::V4(bind).into())
            .with_context(|| format!("cannot listen on {bind}"))?;
        if multicast {
            let iface = match ifindex {
                Some(i) => socket2::InterfaceIndexOrAddress::Index(i),
                None => socket2::InterfaceIndexOrAddress::Address(Ipv4Addr::UNSPECIFIED),
            };
            sock.join_multicast_v4_n(v4.ip(), &iface).with_context(|| {
                format!(
                    "cannot join {} on {}",
                    v4.ip(),
                    interface.unwrap_or("the default interface")
                )
            })?;
        } else if let (Some(i), Some(name)) = (ifindex, interface) {
            // Unicast: only take datagrams that arrive on that interface.
            let _ = i;
            sock.bind_device(Some(name.as_bytes()))
                .with_context(|| format!("cannot bind to interface {name}"))?;
        }
        let socket: UdpSocket = sock.into();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("SO_RCVTIMEO")?;
        let local = match socket.local_addr() {
            Ok(SocketAddr::V4(l)) if !multicast => l,
            _ => v4,
        };
        Ok(UdpSource {
            socket,
            dst: local,
            buf: vec![0; 65_536],
            read: 0,
        })
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.dst
    }
}

impl Source for UdpSource {
    fn next(&mut self) -> anyhow::Result<Next> {
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) => {
                self.read += n as u64;
                let src = match from {
                    SocketAddr::V4(s) => s,
                    SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                };
                Ok(Next::Chunk(Chunk {
                    time: Some(now_unix()),
                    kind: ChunkKind::Datagram { src, dst: self.dst },
                    data: self.buf[..n].to_vec(),
                }))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Next::Idle)
            }
            // ICMP errors on a connected socket etc.: keep listening.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Next::Idle),
            Err(e) => Err(anyhow!("receive error: {e}")),
        }
    }
    fn progress(&self) -> (u64, Option<u64>) {
        (self.read, None)
    }
    fn wall_clock(&self) -> bool {
        true
    }
}
