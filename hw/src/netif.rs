//! Network interface look-up by name: index and IPv4 addresses, as needed to
//! choose the outgoing interface of multicast (`IP_MULTICAST_IF` takes an
//! IPv4 address or, through `ip_mreqn`, an index; `IPV6_MULTICAST_IF` takes
//! the index).

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// What casd needs to know about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Name, e.g. `eth0`.
    pub name: String,
    /// Kernel index (never 0).
    pub index: u32,
    /// IPv4 addresses, in the order the kernel lists them.
    pub ipv4: Vec<Ipv4Addr>,
    /// IFF_UP.
    pub up: bool,
    /// IFF_MULTICAST.
    pub multicast: bool,
    /// IFF_LOOPBACK.
    pub loopback: bool,
}

impl InterfaceInfo {
    /// The first IPv4 address, the usual choice for `IP_MULTICAST_IF`.
    pub fn primary_ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4.first().copied()
    }
}

/// Why an interface could not be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// No interface of that name.
    #[error("network interface {0:?} does not exist")]
    NotFound(String),
    /// The system call failed.
    #[error("looking up network interface {name:?}: {errno}")]
    Sys {
        /// Interface name.
        name: String,
        /// Error from the kernel.
        errno: nix::errno::Errno,
    },
}

/// Interface look-up.
pub trait NetInterfaces: Send + Sync {
    /// Looks up one interface by name.
    fn lookup(&self, name: &str) -> Result<InterfaceInfo, NetError>;
}

/// The kernel's interfaces (`if_nametoindex`, `getifaddrs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemInterfaces;

impl NetInterfaces for SystemInterfaces {
    fn lookup(&self, name: &str) -> Result<InterfaceInfo, NetError> {
        use nix::net::if_::InterfaceFlags;
        let index = match nix::net::if_::if_nametoindex(name) {
            Ok(0) | Err(nix::errno::Errno::ENODEV) => return Err(NetError::NotFound(name.into())),
            Ok(i) => i,
            Err(errno) => {
                return Err(NetError::Sys {
                    name: name.into(),
                    errno,
                })
            }
        };
        let mut info = InterfaceInfo {
            name: name.to_owned(),
            index,
            ipv4: Vec::new(),
            up: false,
            multicast: false,
            loopback: false,
        };
        let addrs = nix::ifaddrs::getifaddrs().map_err(|errno| NetError::Sys {
            name: name.into(),
            errno,
        })?;
        for a in addrs.filter(|a| a.interface_name == name) {
            info.up |= a.flags.contains(InterfaceFlags::IFF_UP);
            info.multicast |= a.flags.contains(InterfaceFlags::IFF_MULTICAST);
            info.loopback |= a.flags.contains(InterfaceFlags::IFF_LOOPBACK);
            if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                info.ipv4.push(sin.ip());
            }
        }
        Ok(info)
    }
}

/// A fixed table of interfaces, for tests.
#[derive(Debug, Default, Clone)]
pub struct SimulatedInterfaces {
    by_name: HashMap<String, InterfaceInfo>,
}

impl SimulatedInterfaces {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an interface; returns `self` for chaining.
    pub fn with(mut self, info: InterfaceInfo) -> Self {
        self.by_name.insert(info.name.clone(), info);
        self
    }

    /// `lo`, index 1, 127.0.0.1, up, loopback, multicast.
    pub fn loopback() -> Self {
        Self::new().with(InterfaceInfo {
            name: "lo".into(),
            index: 1,
            ipv4: vec![Ipv4Addr::LOCALHOST],
            up: true,
            multicast: true,
            loopback: true,
        })
    }
}

impl NetInterfaces for SimulatedInterfaces {
    fn lookup(&self, name: &str) -> Result<InterfaceInfo, NetError> {
        self.by_name
            .get(name)
            .cloned()
            .ok_or_else(|| NetError::NotFound(name.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_loopback() {
        let lo = SystemInterfaces.lookup("lo").unwrap();
        assert!(lo.index > 0);
        assert!(lo.loopback && lo.up);
        assert!(lo.ipv4.contains(&Ipv4Addr::LOCALHOST), "{lo:?}");
        assert_eq!(lo.primary_ipv4().map(|a| a.is_loopback()), Some(true));
    }

    #[test]
    fn unknown_interface_is_not_found() {
        assert_eq!(
            SystemInterfaces.lookup("nosuchif0"),
            Err(NetError::NotFound("nosuchif0".into()))
        );
        // Longer than IFNAMSIZ: still a clean error, never a panic.
        assert!(SystemInterfaces.lookup(&"x".repeat(40)).is_err());
        assert!(SystemInterfaces.lookup("bad\0name").is_err());
    }

    #[test]
    fn simulated_table() {
        let t = SimulatedInterfaces::loopback().with(InterfaceInfo {
            name: "eth9".into(),
            index: 9,
            ipv4: vec![Ipv4Addr::new(192, 0, 2, 1)],
            up: true,
            multicast: true,
            loopback: false,
        });
        assert_eq!(t.lookup("eth9").unwrap().index, 9);
        assert_eq!(
            t.lookup("lo").unwrap().primary_ipv4(),
            Some(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(t.lookup("x"), Err(NetError::NotFound("x".into())));
        let d: Box<dyn NetInterfaces> = Box::new(t);
        assert!(d.lookup("lo").is_ok());
    }
}
