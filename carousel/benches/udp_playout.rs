//! Real-time play-out figures for docs/carousel.md:
//!
//!     cargo bench -p carousel --bench udp_playout            # 60 s per jitter run
//!     JITTER_SECONDS=10 cargo bench -p carousel --bench udp_playout
//!
//! - Sustained UDP output rate on loopback: a player with a bitrate cap far
//!   above what the machine can send (CBR, 7 packets per datagram) for 5 s,
//!   against a baseline raw loop sending the same 1316-byte datagrams on a
//!   tokio UDP socket as fast as it can, in the same run; reported as a ratio.
//! - Inter-datagram jitter at 1 and 10 Mbit/s (CBR, 7 packets/datagram):
//!   the receiver timestamps every datagram; jitter = |arrival interval −
//!   nominal interval|, p50/p99/max over JITTER_SECONDS (default 60 s).
//!   Two timestamps per datagram: `user` = `Instant::now()` when the
//!   receiving tokio task got it (includes the receiver's own scheduling
//!   delay), `kernel` = the socket's `SO_TIMESTAMPNS` receive stamp (on
//!   loopback taken when the sender's `send` hands the packet to the stack,
//!   so it measures the sender alone). Also the long-run rate measured at the
//!   receiver vs. the target. Each bitrate runs twice, without spin (sleep
//!   to the due instant) then with `DEFAULT_SPIN` (applied only with
//!   real-time priority), first on the machine as it is, then with one
//!   busy-loop process per core (this binary with `--busy`, always
//!   SCHED_OTHER) as the load. The scheduling policy is the bench's own:
//!   run it under `chrt -f 1` for the real-time figures (what the systemd
//!   unit grants casd).
//!
//! Without `--bench` (cargo test --all-targets) it runs a short smoke pass.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use carousel::mux::{MuxConfig, MAX_PACKETS_PER_DATAGRAM};
use carousel::player::{AsyncUdpOutput, Carousel, PlayerConfig, DEFAULT_SPIN};
use carousel::schedule::ScheduleConfig;
use carousel::{UdpConfig, UdpOutput};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const DATAGRAM: usize = 188 * MAX_PACKETS_PER_DATAGRAM;

async fn receiver() -> (UdpSocket, std::net::SocketAddr) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sock = socket2::SockRef::from(&s);
    let _ = sock.set_recv_buffer_size(8 << 20);
    setsockopt(&s, sockopt::ReceiveTimestampns, &true).unwrap();
    s.set_nonblocking(true).unwrap();
    let addr = s.local_addr().unwrap();
    (UdpSocket::from_std(s).unwrap(), addr)
}

/// Arrival times of the datagrams, in seconds: user space, kernel stamp.
#[derive(Default)]
struct Arrivals {
    user: Vec<f64>,
    kernel: Vec<f64>,
}

/// One datagram with its `SO_TIMESTAMPNS` stamp (seconds, CLOCK_REALTIME).
async fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, Option<f64>)> {
    let fd = sock.as_raw_fd();
    sock.async_io(Interest::READABLE, || {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
            .map_err(std::io::Error::from)?;
        let stamp = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::ScmTimestampns(t) => {
                    Some(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
                }
                _ => None,
            })
        });
        Ok((msg.bytes, stamp))
    })
    .await
}

/// Receives for `dur`; returns arrival times (if `keep`) and the count/bytes.
async fn receive(sock: &UdpSocket, dur: Duration, keep: bool) -> (Arrivals, u64, u64) {
    let mut buf = vec![0u8; 2048];
    let mut times = Arrivals::default();
    let t0 = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    let end = tokio::time::Instant::now() + dur;
    while let Ok(Ok((len, stamp))) =
        tokio::time::timeout_at(end, recv_stamped(sock, &mut buf)).await
    {
        if keep {
            times.user.push((Instant::now() - t0).as_secs_f64());
            times.kernel.extend(stamp);
        }
        n += 1;
        bytes += len as u64;
    }
    (times, n, bytes)
}

fn player_config(bitrate: u64, spin: Duration) -> PlayerConfig {
    PlayerConfig {
        name: "bench".into(),
        mux: MuxConfig {
            bitrate,
            cbr: true,
            ..MuxConfig::default()
        },
        schedule: ScheduleConfig::default(),
        clock_anchor_unix_ms: None,
        spin,
    }
}

async fn play(bitrate: u64, spin: Duration, dur: Duration, keep: bool) -> (Arrivals, u64, u64) {
    let (rx, addr) = receiver().await;
    let out = AsyncUdpOutput::new(UdpOutput::open(&UdpConfig::new(addr)).unwrap()).unwrap();
    let stop = CancellationToken::new();
    let h = Carousel::new()
        .spawn_player(player_config(bitrate, spin), out, None, stop.clone())
        .unwrap();
    let r = receive(&rx, dur, keep).await;
    stop.cancel();
    h.join().await;
    r
}

async fn raw_loop(dur: Duration) -> u64 {
    let (rx, addr) = receiver().await;
    let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tx.connect(addr).await.unwrap();
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    let sender = tokio::spawn(async move {
        let d = [0x47u8; DATAGRAM];
        let mut sent = 0u64;
        while !s2.is_cancelled() {
            if tx.send(&d).await.is_ok() {
                sent += 1;
            }
            if sent.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
    });
    let (_, _, bytes) = receive(&rx, dur, false).await;
    stop.cancel();
    let _ = sender.await;
    bytes
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// |interval − nominal| in ms, sorted.
fn deviations(times: &[f64], nominal: f64) -> Vec<f64> {
    let mut dev: Vec<f64> = times
        .windows(2)
        .map(|w| ((w[1] - w[0]) - nominal).abs() * 1e3)
        .collect();
    dev.sort_by(|a, b| a.total_cmp(b));
    dev
}

async fn jitter(bitrate: u64, spin: Duration, dur: Duration) {
    let (times, n, bytes) = play(bitrate, spin, dur, true).await;
    let nominal = DATAGRAM as f64 * 8.0 / bitrate as f64; // seconds
    let span = times
        .user
        .last()
        .zip(times.user.first())
        .map(|(l, f)| l - f)
        .unwrap_or(0.0);
    let rate = if span > 0.0 {
        (bytes as f64 - DATAGRAM as f64) * 8.0 / span
    } else {
        0.0
    };
    println!(
        "jitter {:>6.1} Mbit/s, spin {:>3} µs, over {:>4.0} s: {n} datagrams, nominal interval {:.3} ms; received rate {:.4} Mbit/s ({:+.3}% vs target)",
        bitrate as f64 / 1e6,
        spin.as_micros(),
        dur.as_secs_f64(),
        nominal * 1e3,
        rate / 1e6,
        (rate / bitrate as f64 - 1.0) * 100.0
    );
    for (what, t) in [("user", &times.user), ("kernel", &times.kernel)] {
        let dev = deviations(t, nominal);
        println!(
            "  {what:>6} stamps ({:>6}): |deviation| p50 {:.3} ms p99 {:.3} ms p99.9 {:.3} ms max {:.3} ms",
            t.len(),
            pct(&dev, 0.5),
            pct(&dev, 0.99),
            pct(&dev, 0.999),
            dev.last().copied().unwrap_or(f64::NAN),
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--busy") {
        busy_loop();
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (rate_s, jitter_s) = if bench {
            let j = std::env::var("JITTER_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(60);
            (5, j)
        } else {
            (1, 1)
        };
        let d = Duration::from_secs(rate_s);
        let raw = raw_loop(d).await as f64 * 8.0 / d.as_secs_f64();
        let (_, _, bytes) = play(5_000_000_000, DEFAULT_SPIN, d, false).await;
        let ours = bytes as f64 * 8.0 / d.as_secs_f64();
        println!(
            "udp output on loopback: player {:.0} Mbit/s, raw send loop {:.0} Mbit/s, ratio {:.2}",
            ours / 1e6,
            raw / 1e6,
            ours / raw
        );
        println!(
            "play-out thread scheduling: {}",
            carousel::thread_scheduling()
        );
        // The smoke pass (cargo test) loads no one's cores.
        let loads: &[bool] = if bench { &[false, true] } else { &[false] };
        for &load in loads {
            // Busy loops in processes of their own, one per core.
            let busy: Vec<Busy> = (0..if load { cores() } else { 0 })
                .map(|_| Busy::start())
                .collect();
            println!("load: {} busy-loop processes", busy.len());
            for bitrate in [1_000_000u64, 10_000_000] {
                // No spin (sleep to the due instant) next to the default
                // spin (which the player applies only with real-time
                // priority: under SCHED_OTHER both runs sleep).
                for spin in [Duration::ZERO, DEFAULT_SPIN] {
                    jitter(bitrate, spin, Duration::from_secs(jitter_s)).await;
                }
            }
        }
    });
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A busy-loop process (this binary with `--busy`), killed on drop.
struct Busy(std::process::Child);

impl Busy {
    /// Always SCHED_OTHER (`chrt --other 0`): when the bench itself runs
    /// under `chrt -f`, a child would inherit real-time priority and two
    /// real-time busy loops would starve the whole machine.
    fn start() -> Busy {
        let exe = std::env::current_exe().unwrap();
        let child = std::process::Command::new("chrt")
            .args(["--other", "0"])
            .arg(exe)
            .arg("--busy")
            .spawn()
            .expect("chrt (util-linux) starts the busy loop");
        Busy(child)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn busy_loop() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}
