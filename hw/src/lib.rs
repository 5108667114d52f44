//! Hardware-facing parts of the appliance. Each part is a trait with a real
//! and a simulated implementation:
//!
//! - [`key_source`]: the root key (a file readable only by its owner, or simulated);
//! - [`watchdog`]: systemd `sd_notify` (READY / WATCHDOG / STOPPING), or simulated;
//! - [`netif`]: network interface look-up (index, IPv4 addresses), or simulated;
//! - [`clock`]: monotonic and wall clocks, or a manually advanced simulated clock.
//!
//! This crate does not know what the keys are used for and has no unsafe code.
#![deny(unsafe_code)]

pub mod clock;
pub mod key_source;
pub mod netif;
pub mod watchdog;

pub use clock::{Clock, SimulatedClock, SystemClock};
pub use key_source::{FileKeySource, KeySource, KeySourceError, SimulatedKeySource, ROOT_KEY_LEN};
pub use netif::{InterfaceInfo, NetError, NetInterfaces, SimulatedInterfaces, SystemInterfaces};
pub use watchdog::{
    NullWatchdog, SimulatedWatchdog, SystemdWatchdog, Watchdog, WatchdogError, WatchdogEvent,
};
