//! Where datagrams go: an [`Output`] sends one datagram. [`MemoryOutput`]
//! keeps (or only counts) them for tests; [`UdpOutput`] sends them to a
//! unicast or multicast destination with the socket options of the wire
//! contract §5.2 (TTL, outgoing interface, multicast loop, DSCP).
//!
//! The tokio play-out runner uses the async counterpart
//! [`crate::player::AsyncOutput`]; a `UdpOutput` converts into one.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};

use socket2::{Domain, Protocol, Socket, Type};

/// Sends one datagram.
pub trait Output {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()>;
}

#[derive(Debug, Default)]
struct MemoryInner {
    keep: bool,
    datagrams: Vec<Vec<u8>>,
    count: u64,
    bytes: u64,
}

/// In-memory output. Clones share the same storage, so a test keeps one
/// clone and hands the other to a player.
#[derive(Clone, Debug, Default)]
pub struct MemoryOutput {
    inner: Arc<Mutex<MemoryInner>>,
}

impl MemoryOutput {
    /// Keeps every datagram.
    pub fn new() -> Self {
        MemoryOutput {
            inner: Arc::new(Mutex::new(MemoryInner {
                keep: true,
                ..MemoryInner::default()
            })),
        }
    }
    /// Only counts datagrams and bytes (for long simulated runs).
    pub fn counting() -> Self {
        MemoryOutput::default()
    }
    fn with<R>(&self, f: impl FnOnce(&mut MemoryInner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
    pub fn record(&self, datagram: &[u8]) {
        self.with(|m| {
            m.count += 1;
            m.bytes += datagram.len() as u64;
            if m.keep {
                m.datagrams.push(datagram.to_vec());
            }
        })
    }
    /// Datagrams kept so far (empty for a counting output).
    pub fn datagrams(&self) -> Vec<Vec<u8>> {
        self.with(|m| m.datagrams.clone())
    }
    pub fn count(&self) -> u64 {
        self.with(|m| m.count)
    }
    /// Datagram bytes (RTP header included, if any).
    pub fn bytes(&self) -> u64 {
        self.with(|m| m.bytes)
    }
}

impl Output for MemoryOutput {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.record(datagram);
        Ok(())
    }
}

/// The outgoing interface for multicast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MulticastInterface {
    /// By one of its IPv4 addresses (`IP_MULTICAST_IF`).
    Address(Ipv4Addr),
    /// By interface index (IPv6: `IPV6_MULTICAST_IF`; IPv4: the first IPv4
    /// address of that interface, looked up with getifaddrs).
    Index(u32),
    /// By interface name, e.g. "eth1" (resolved like `Index`).
    Name(String),
}

/// Socket settings of one UDP output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpConfig {
    pub destination: SocketAddr,
    /// Local address to bind (default: any address, ephemeral port).
    pub bind: Option<SocketAddr>,
    /// IP TTL / hop limit: `IP_MULTICAST_TTL` for a multicast destination,
    /// `IP_TTL` otherwise. `None` keeps the system default (1 for multicast).
    pub ttl: Option<u32>,
    /// Outgoing interface for a multicast destination.
    pub interface: Option<MulticastInterface>,
    /// `IP_MULTICAST_LOOP`: deliver to listeners on this host too.
    pub multicast_loop: bool,
    /// DiffServ code point 0..=63, written as `IP_TOS = dscp << 2`.
    pub dscp: Option<u8>,
}

impl UdpConfig {
    pub fn new(destination: SocketAddr) -> Self {
        UdpConfig {
            destination,
            bind: None,
            ttl: None,
            interface: None,
            multicast_loop: false,
            dscp: None,
        }
    }
}

/// A connected UDP socket to one destination.
#[derive(Debug)]
pub struct UdpOutput {
    socket: UdpSocket,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Index and first IPv4 address of an interface, by index or name.
fn lookup_interface(
    by_index: Option<u32>,
    by_name: Option<&str>,
) -> io::Result<(u32, Option<Ipv4Addr>)> {
    let index = match (by_index, by_name) {
        (Some(i), _) => i,
        (None, Some(name)) => nix::net::if_::if_nametoindex(name)
            .map_err(|e| invalid(format!("interface {name:?}: {e}")))?,
        (None, None) => return Err(invalid("no interface given".into())),
    };
    let name = nix::net::if_::if_indextoname(index)
        .map_err(|e| invalid(format!("interface index {index}: {e}")))?;
    let name = name.to_string_lossy().into_owned();
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let v4 = addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip())));
    Ok((index, v4))
}

/// Names the socket option in an error from setting it.
fn ctx(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The traffic class byte (IP_TOS / IPV6_TCLASS) for a DSCP.
fn traffic_class(dscp: u8) -> io::Result<u32> {
    if dscp > 63 {
        return Err(invalid(format!("DSCP {dscp} is above 63")));
    }
    Ok(u32::from(dscp) << 2)
}

/// The local address to bind when none is configured: any, same family.
fn unspecified_for(dest: SocketAddr) -> SocketAddr {
    match dest {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// The IPv4 address to send multicast from, for the configured interface.
fn multicast_if_v4(interface: Option<&MulticastInterface>) -> io::Result<Option<Ipv4Addr>> {
    let (found, name) = match interface {
        None => return Ok(None),
        Some(MulticastInterface::Address(a)) => return Ok(Some(*a)),
        Some(MulticastInterface::Index(i)) => (
            lookup_interface(Some(*i), None)?,
            format!("interface index {i}"),
        ),
        Some(MulticastInterface::Name(n)) => {
            (lookup_interface(None, Some(n))?, format!("interface {n:?}"))
        }
    };
    let addr = found
        .1
        .ok_or_else(|| invalid(format!("{name} has no IPv4 address")))?;
    Ok(Some(addr))
}

/// The interface index to send IPv6 multicast on.
fn multicast_if_v6(interface: Option<&MulticastInterface>) -> io::Result<Option<u32>> {
    match interface {
        None => Ok(None),
        Some(MulticastInterface::Index(i)) => Ok(Some(*i)),
        Some(MulticastInterface::Name(n)) => Ok(Some(lookup_interface(None, Some(n))?.0)),
        Some(MulticastInterface::Address(a)) => Err(invalid(format!(
            "IPv6 destination with IPv4 interface address {a}"
        ))),
    }
}

fn configure_v4(socket: &Socket, config: &UdpConfig, multicast: bool) -> io::Result<()> {
    match (config.ttl, multicast) {
        (Some(ttl), true) => socket
            .set_multicast_ttl_v4(ttl)
            .map_err(ctx("IP_MULTICAST_TTL"))?,
        (Some(ttl), false) => socket.set_ttl_v4(ttl).map_err(ctx("IP_TTL"))?,
        (None, _) => {}
    }
    if let Some(dscp) = config.dscp {
        socket
            .set_tos_v4(traffic_class(dscp)?)
            .map_err(ctx("IP_TOS"))?;
    }
    if !multicast {
        return Ok(());
    }
    socket
        .set_multicast_loop_v4(config.multicast_loop)
        .map_err(ctx("IP_MULTICAST_LOOP"))?;
    if let Some(a) = multicast_if_v4(config.interface.as_ref())? {
        socket
            .set_multicast_if_v4(&a)
            .map_err(ctx("IP_MULTICAST_IF"))?;
    }
    Ok(())
}

fn configure_v6(socket: &Socket, config: &UdpConfig, multicast: bool) -> io::Result<()> {
    match (config.ttl, multicast) {
        (Some(ttl), true) => socket
            .set_multicast_hops_v6(ttl)
            .map_err(ctx("IPV6_MULTICAST_HOPS"))?,
        (Some(ttl), false) => socket
            .set_unicast_hops_v6(ttl)
            .map_err(ctx("IPV6_UNICAST_HOPS"))?,
        (None, _) => {}
    }
    if let Some(dscp) = config.dscp {
        socket
            .set_tclass_v6(traffic_class(dscp)?)
            .map_err(ctx("IPV6_TCLASS"))?;
    }
    if !multicast {
        return Ok(());
    }
    socket
        .set_multicast_loop_v6(config.multicast_loop)
        .map_err(ctx("IPV6_MULTICAST_LOOP"))?;
    if let Some(i) = multicast_if_v6(config.interface.as_ref())? {
        socket
            .set_multicast_if_v6(i)
            .map_err(ctx("IPV6_MULTICAST_IF"))?;
    }
    Ok(())
}

impl UdpOutput {
    /// Creates, configures and connects the socket. Every option is
    /// applied or the call fails naming it.
    pub fn open(config: &UdpConfig) -> io::Result<UdpOutput> {
        let dest = config.destination;
        let multicast = dest.ip().is_multicast();
        let socket = Socket::new(Domain::for_address(dest), Type::DGRAM, Some(Protocol::UDP))?;
        match dest.ip() {
            IpAddr::V4(_) => configure_v4(&socket, config, multicast)?,
            IpAddr::V6(_) => configure_v6(&socket, config, multicast)?,
        }
        let bind = config.bind.unwrap_or(unspecified_for(dest));
        socket.bind(&bind.into()).map_err(ctx("bind"))?;
        socket.connect(&dest.into()).map_err(ctx("connect"))?;
        Ok(UdpOutput {
            socket: socket.into(),
        })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }
    pub fn into_socket(self) -> UdpSocket {
        self.socket
    }
}

impl Output for UdpOutput {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send(datagram).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_options_and_send() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cfg = UdpConfig::new(rx.local_addr().unwrap());
        cfg.ttl = Some(7);
        cfg.dscp = Some(46); // EF
        let mut out = UdpOutput::open(&cfg).unwrap();
        let s = Socket::from(out.socket().try_clone().unwrap());
        assert_eq!(s.ttl_v4().unwrap(), 7);
        assert_eq!(s.tos_v4().unwrap(), 46 << 2);
        out.send(b"hello").unwrap();
        let mut buf = [0u8; 16];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
    }

    #[test]
    fn multicast_options_are_set_without_sending() {
        let mut cfg = UdpConfig::new("239.255.0.1:5000".parse().unwrap());
        cfg.ttl = Some(4);
        cfg.multicast_loop = true;
        cfg.interface = Some(MulticastInterface::Name("lo".into()));
        let out = UdpOutput::open(&cfg).unwrap();
        let s = Socket::from(out.into_socket());
        assert_eq!(s.multicast_ttl_v4().unwrap(), 4);
        assert!(s.multicast_loop_v4().unwrap());
        assert_eq!(s.multicast_if_v4().unwrap(), Ipv4Addr::LOCALHOST);
        cfg.dscp = Some(64);
        assert_eq!(
            UdpOutput::open(&cfg).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        cfg.dscp = None;
        cfg.interface = Some(MulticastInterface::Name("no-such-if0".into()));
        assert!(UdpOutput::open(&cfg).is_err());
    }

    #[test]
    fn option_values() {
        assert_eq!(traffic_class(46).unwrap(), 46 << 2);
        assert_eq!(
            traffic_class(64).unwrap_err().to_string(),
            "DSCP 64 is above 63"
        );
        assert_eq!(
            unspecified_for("[::1]:5".parse().unwrap()),
            "[::]:0".parse().unwrap()
        );
        let a = MulticastInterface::Address(Ipv4Addr::LOCALHOST);
        assert_eq!(
            multicast_if_v4(Some(&a)).unwrap(),
            Some(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(multicast_if_v4(None).unwrap(), None);
        assert!(multicast_if_v6(Some(&a)).is_err());
        assert_eq!(
            multicast_if_v6(Some(&MulticastInterface::Index(3))).unwrap(),
            Some(3)
        );
    }

    #[test]
    fn memory_output_counts_and_keeps() {
        let keep = MemoryOutput::new();
        let mut k = keep.clone();
        k.send(&[1, 2, 3]).unwrap();
        assert_eq!(
            (keep.count(), keep.bytes(), keep.datagrams()),
            (1, 3, vec![vec![1, 2, 3]])
        );
        let count = MemoryOutput::counting();
        let mut c = count.clone();
        c.send(&[0; 100]).unwrap();
        assert_eq!(
            (count.count(), count.bytes(), count.datagrams().len()),
            (1, 100, 0)
        );
    }
}
