//! Service manager notification: `READY=1` once started, `WATCHDOG=1` at
//! least every half watchdog interval, `STOPPING=1` when draining.
//!
//! [`SystemdWatchdog`] speaks the sd_notify protocol itself: one datagram per
//! message to the `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with `@`), watchdog interval from
//! `$WATCHDOG_USEC` (honoured only if `$WATCHDOG_PID` is unset or is this
//! process). No unsafe code, no libsystemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;
use std::time::Duration;

/// Tells the service manager how the process is doing.
pub trait Watchdog: Send + Sync {
    /// Start-up finished.
    fn ready(&self) -> Result<(), WatchdogError>;
    /// Still alive.
    fn ping(&self) -> Result<(), WatchdogError>;
    /// Shutting down.
    fn stopping(&self) -> Result<(), WatchdogError>;
    /// How often to call [`Watchdog::ping`] (half the manager's timeout), or
    /// `None` when no watchdog is armed.
    fn ping_interval(&self) -> Option<Duration>;
}

/// A notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// `$NOTIFY_SOCKET` is empty or not a usable address.
    #[error("NOTIFY_SOCKET {0:?} is not a usable socket address")]
    BadSocket(String),
    /// Sending failed.
    #[error("sd_notify to {socket}: {source}")]
    Send {
        /// The socket.
        socket: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// sd_notify over a `UnixDatagram`.
#[derive(Debug)]
pub struct SystemdWatchdog {
    socket_name: String,
    addr: SocketAddr,
    sock: UnixDatagram,
    interval: Option<Duration>,
}

impl SystemdWatchdog {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`; `Ok(None)`
    /// when `$NOTIFY_SOCKET` is unset (not started by systemd).
    pub fn from_env() -> Result<Option<Self>, WatchdogError> {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let socket = socket.to_string_lossy().into_owned();
        let pid_ok = match std::env::var("WATCHDOG_PID") {
            Ok(p) => p.trim().parse::<u32>().ok() == Some(std::process::id()),
            Err(_) => true,
        };
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && pid_ok);
        Self::new(&socket, usec).map(Some)
    }

    /// Notifies `socket` (a path, or `@name` for the abstract namespace);
    /// `watchdog_usec` is the manager's timeout, pinged at half of it.
    pub fn new(socket: &str, watchdog_usec: Option<u64>) -> Result<Self, WatchdogError> {
        let addr = parse_notify_socket(socket)?;
        let sock = UnixDatagram::unbound().map_err(|source| WatchdogError::Send {
            socket: socket.to_owned(),
            source,
        })?;
        Ok(SystemdWatchdog {
            socket_name: socket.to_owned(),
            addr,
            sock,
            interval: watchdog_usec.map(|u| Duration::from_micros(u) / 2),
        })
    }

    /// Sends one raw notification (e.g. `STATUS=draining`).
    pub fn notify(&self, message: &str) -> Result<(), WatchdogError> {
        self.sock
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| WatchdogError::Send {
                socket: self.socket_name.clone(),
                source,
            })
    }
}

fn parse_notify_socket(socket: &str) -> Result<SocketAddr, WatchdogError> {
    let bad = || WatchdogError::BadSocket(socket.to_owned());
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

impl Watchdog for SystemdWatchdog {
    fn ready(&self) -> Result<(), WatchdogError> {
        self.notify("READY=1")
    }

    fn ping(&self) -> Result<(), WatchdogError> {
        self.notify("WATCHDOG=1")
    }

    fn stopping(&self) -> Result<(), WatchdogError> {
        self.notify("STOPPING=1")
    }

    fn ping_interval(&self) -> Option<Duration> {
        self.interval
    }
}

/// No service manager: every call succeeds and does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullWatchdog;

impl Watchdog for NullWatchdog {
    fn ready(&self) -> Result<(), WatchdogError> {
        Ok(())
    }
    fn ping(&self) -> Result<(), WatchdogError> {
        Ok(())
    }
    fn stopping(&self) -> Result<(), WatchdogError> {
        Ok(())
    }
    fn ping_interval(&self) -> Option<Duration> {
        None
    }
}

/// What a [`SimulatedWatchdog`] was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogEvent {
    /// `ready()`.
    Ready,
    /// `ping()`.
    Ping,
    /// `stopping()`.
    Stopping,
}

/// Records every call, for tests.
#[derive(Debug, Default)]
pub struct SimulatedWatchdog {
    events: Mutex<Vec<WatchdogEvent>>,
    interval: Option<Duration>,
}

impl SimulatedWatchdog {
    /// A recorder that asks to be pinged every `interval` (or never).
    pub fn new(interval: Option<Duration>) -> Self {
        SimulatedWatchdog {
            events: Mutex::new(Vec::new()),
            interval,
        }
    }

    /// Calls so far, in order.
    pub fn events(&self) -> Vec<WatchdogEvent> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WatchdogEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, e: WatchdogEvent) -> Result<(), WatchdogError> {
        self.lock().push(e);
        Ok(())
    }
}

impl Watchdog for SimulatedWatchdog {
    fn ready(&self) -> Result<(), WatchdogError> {
        self.record(WatchdogEvent::Ready)
    }
    fn ping(&self) -> Result<(), WatchdogError> {
        self.record(WatchdogEvent::Ping)
    }
    fn stopping(&self) -> Result<(), WatchdogError> {
        self.record(WatchdogEvent::Stopping)
    }
    fn ping_interval(&self) -> Option<Duration> {
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifies_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let w = SystemdWatchdog::new(path.to_str().unwrap(), Some(30_000_000)).unwrap();
        assert_eq!(w.ping_interval(), Some(Duration::from_secs(15)));
        w.ready().unwrap();
        w.ping().unwrap();
        w.stopping().unwrap();
        assert_eq!(recv(&server), "READY=1");
        assert_eq!(recv(&server), "WATCHDOG=1");
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("casd-hw-test-{}-{}", std::process::id(), line!());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let w = SystemdWatchdog::new(&format!("@{name}"), None).unwrap();
        assert_eq!(w.ping_interval(), None);
        w.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn bad_socket_names_and_send_errors() {
        assert!(matches!(
            SystemdWatchdog::new("", None),
            Err(WatchdogError::BadSocket(_))
        ));
        assert!(matches!(
            SystemdWatchdog::new("relative/path", None),
            Err(WatchdogError::BadSocket(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let w = SystemdWatchdog::new(dir.path().join("absent").to_str().unwrap(), None).unwrap();
        assert!(matches!(w.ready(), Err(WatchdogError::Send { .. })));
    }

    #[test]
    fn simulated_records_calls() {
        let w = SimulatedWatchdog::new(Some(Duration::from_secs(1)));
        w.ready().unwrap();
        w.ping().unwrap();
        w.ping().unwrap();
        w.stopping().unwrap();
        assert_eq!(
            w.events(),
            vec![
                WatchdogEvent::Ready,
                WatchdogEvent::Ping,
                WatchdogEvent::Ping,
                WatchdogEvent::Stopping
            ]
        );
        assert_eq!(w.ping_interval(), Some(Duration::from_secs(1)));
        let n: Box<dyn Watchdog> = Box::new(NullWatchdog);
        assert!(n.ready().is_ok() && n.ping_interval().is_none());
    }
}
