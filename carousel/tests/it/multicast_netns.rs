//! Multicast play-out inside a network namespace this test creates (never
//! on the host's interfaces). The test re-executes its own binary under
//! `ip netns exec` so that sender and receiver both live in the namespace,
//! where only `lo` exists. Needs root (CI runs as root) and iproute2.

use crate::common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use carousel::mux::MuxConfig;
use carousel::output::{MulticastInterface, UdpConfig, UdpOutput};
use carousel::player::{AsyncUdpOutput, Carousel, PlayerConfig};
use carousel::schedule::{Class, ScheduleConfig};
use carousel::ts::Pid;
use common::{demux, emm, id_of};
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "CAROUSEL_NETNS_CHILD";
const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 42, 17);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` ({e}): apt-get install iproute2"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace when the test ends, passed or failed.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let name = format!("casd-mc-{:08x}", h.finish() as u32);
        ip(&["netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn multicast_inside_own_network_namespace() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates a network namespace and must run as root (CI does)"
    );
    let ns = Netns::create();
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&["-n", &ns.0, "link", "set", "lo", "multicast", "on"]);
    ip(&["-n", &ns.0, "route", "add", "239.255.0.0/16", "dev", "lo"]);
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(&exe)
        .args([
            "multicast_netns::netns_child_multicast",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("multicast child: received"), "{stderr}");
}

#[test]
#[ignore = "run by multicast_inside_own_network_namespace inside its namespace"]
fn netns_child_multicast() {
    if std::env::var_os(CHILD_ENV).is_none() {
        eprintln!("skipped: only meaningful inside the namespace made by multicast_inside_own_network_namespace");
        return;
    }
    // Refuse to send multicast anywhere but in a fresh namespace.
    let ifaces: std::collections::BTreeSet<String> = nix::ifaddrs::getifaddrs()
        .unwrap()
        .map(|a| a.interface_name)
        .collect();
    assert_eq!(
        ifaces.into_iter().collect::<Vec<_>>(),
        vec!["lo".to_string()],
        "not in a fresh namespace"
    );
    let lo = nix::net::if_::if_nametoindex("lo").unwrap();

    let rx = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let port = rx.local_addr().unwrap().port();
    rx.join_multicast_v4(&GROUP, &Ipv4Addr::LOCALHOST).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let mut udp = UdpConfig::new(SocketAddr::from((GROUP, port)));
    udp.ttl = Some(1);
    udp.interface = Some(MulticastInterface::Index(lo));
    udp.multicast_loop = true;
    udp.dscp = Some(46);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let player = rt.block_on(async {
        let output = AsyncUdpOutput::new(UdpOutput::open(&udp).unwrap()).unwrap();
        let carousel = Carousel::new();
        let player = carousel
            .spawn_player(
                PlayerConfig {
                    name: "multicast".into(),
                    mux: MuxConfig {
                        bitrate: 2_000_000,
                        ..MuxConfig::default()
                    },
                    schedule: ScheduleConfig::default(),
                    clock_anchor_unix_ms: None,
                    spin: carousel::DEFAULT_SPIN,
                },
                output,
                None,
                cancel.clone(),
            )
            .unwrap();
        for id in 0..25 {
            carousel
                .add(emm(id, Class::Change, u64::MAX, 200))
                .await
                .unwrap();
        }
        player
    });

    let mut ts = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..100 {
        let n = rx
            .recv(&mut buf)
            .expect("no multicast datagram within 10 s");
        assert_eq!(n % 188, 0);
        ts.extend_from_slice(&buf[..n]);
    }
    cancel.cancel();
    let stats = rt.block_on(player.join());
    assert_eq!(stats.send_errors, 0);
    let (emms, cats, errors) = demux(&ts, Pid::DEFAULT_EMM);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!cats.is_empty());
    let mut ids: Vec<u64> = emms.iter().map(|s| id_of(s)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, (0..25).collect::<Vec<_>>());
    eprintln!(
        "multicast child: received {} sections over {GROUP}",
        emms.len()
    );
}
