//! The tokio play-out runner under paused time: simulated hours run in
//! seconds and the clock only moves when every task waits.

use crate::common;

use std::time::Duration;

use carousel::mux::{MuxConfig, RtpConfig, RTP_HEADER_LEN};
use carousel::player::{Carousel, PlayRecord, PlayerConfig, RealTime};
use carousel::schedule::{Class, Lane, ScheduleConfig};
use carousel::ts::PacketRef;
use carousel::ts::Pid;
use carousel::MemoryOutput;
use common::{demux, emm, id_of};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ANCHOR_MS: u64 = 1_700_000_000_000;

fn config(name: &str, bitrate: u64, cbr: bool) -> PlayerConfig {
    PlayerConfig {
        name: name.into(),
        mux: MuxConfig {
            bitrate,
            cbr,
            ..MuxConfig::default()
        },
        schedule: ScheduleConfig {
            burst_count: 3,
            burst_interval: 200,
        },
        clock_anchor_unix_ms: Some(ANCHOR_MS),
        spin: carousel::DEFAULT_SPIN,
    }
}

async fn long_run(bitrate: u64, span: Duration) {
    let carousel = Carousel::new();
    let out = MemoryOutput::counting();
    let cancel = CancellationToken::new();
    let player = carousel
        .spawn_player(
            config("cbr", bitrate, true),
            out.clone(),
            None,
            cancel.clone(),
        )
        .unwrap();
    assert!(!player.is_thread(), "MemoryOutput plays on tokio time");
    // A few EMMs so the stream is a real mix of EMM, CAT and null packets.
    for id in 0..50 {
        carousel
            .add(emm(id, Class::Background, u64::MAX, 180))
            .await
            .unwrap();
    }
    // In paused time this sleep is the measurement window, not a wait for
    // another task: the clock advances exactly to `span`.
    tokio::time::sleep(span).await;
    cancel.cancel();
    let stats = player.join().await;
    let ideal = bitrate as f64 * span.as_secs_f64() / 8.0;
    let err = (stats.ts_bytes as f64 - ideal).abs() / ideal;
    assert!(
        err < 0.001,
        "{bitrate} bit/s over {span:?}: {} bytes vs {ideal}, error {err:e}",
        stats.ts_bytes
    );
    assert_eq!(out.bytes(), stats.ts_bytes);
    assert!(stats.sections > 0);
}

#[tokio::test(start_paused = true)]
async fn player_holds_64_kbit_for_three_hours() {
    long_run(64_000, Duration::from_secs(3 * 3600)).await;
}

#[tokio::test(start_paused = true)]
async fn player_holds_1_mbit_for_a_quarter_hour() {
    long_run(1_000_000, Duration::from_secs(900)).await;
}

#[tokio::test(start_paused = true)]
async fn player_holds_20_mbit_for_half_a_minute() {
    long_run(20_000_000, Duration::from_secs(30)).await;
}

#[tokio::test(start_paused = true)]
async fn two_outputs_share_the_emm_set_with_their_own_state() {
    let carousel = Carousel::new();
    let cancel = CancellationToken::new();
    let (rec_tx, mut rec_rx) = mpsc::channel::<PlayRecord>(100_000);
    let a_out = MemoryOutput::new();
    let b_out = MemoryOutput::new();
    let a = carousel
        .spawn_player(
            config("a", 200_000, false),
            a_out.clone(),
            Some(rec_tx.clone()),
            cancel.clone(),
        )
        .unwrap();
    let mut b_cfg = config("b", 100_000, true);
    b_cfg.mux.emm_pid = Pid::new(0x0200).unwrap();
    b_cfg.mux.pack_sections = false;
    b_cfg.mux.packets_per_datagram = 3;
    b_cfg.mux.rtp = Some(RtpConfig::random());
    let b = carousel
        .spawn_player(b_cfg, b_out.clone(), Some(rec_tx), cancel.clone())
        .unwrap();
    assert_eq!(carousel.players(), 2);

    for id in 1..=20 {
        let class = Class::ALL[(id % 3) as usize];
        carousel
            .add(emm(id, class, ANCHOR_MS + 60_000, 120))
            .await
            .unwrap();
    }
    // A broken section is refused up front.
    let mut bad = emm(99, Class::Urgent, u64::MAX, 120);
    bad.section = bytes::Bytes::from_static(b"\x82\xf0\x00");
    assert!(carousel.add(bad).await.is_err());
    tokio::time::sleep(Duration::from_secs(10)).await;
    carousel.remove(5).await;
    tokio::time::sleep(Duration::from_secs(70)).await; // past not_after
    cancel.cancel();
    let (sa, sb) = (a.join().await, b.join().await);
    assert_eq!(sa.live, 0, "expired EMMs dropped");
    assert_eq!(sb.live, 0);

    let mut recs = Vec::new();
    while let Ok(r) = rec_rx.try_recv() {
        recs.push(r);
    }
    for (name, stats) in [("a", sa), ("b", sb)] {
        let mine: Vec<&PlayRecord> = recs.iter().filter(|r| &*r.output == name).collect();
        assert_eq!(
            mine.len() as u64,
            stats.sections,
            "{name}: one record per section played"
        );
        for id in 1..=20u64 {
            let plays: Vec<&&PlayRecord> = mine.iter().filter(|r| r.emm_id == id).collect();
            // Fast lane first: 3 bursts, then the cycle.
            let lanes: Vec<Lane> = plays.iter().take(4).map(|r| r.lane).collect();
            assert_eq!(
                lanes[..3],
                [1, 2, 3].map(|repetition| Lane::Burst { repetition }),
                "{name} EMM {id}"
            );
            assert_eq!(lanes[3], Lane::Cycle);
            assert!(plays
                .windows(2)
                .take(2)
                .all(|w| w[1].at_unix_ms - w[0].at_unix_ms >= 200));
            assert!(
                plays.iter().all(|r| r.at_unix_ms <= ANCHOR_MS + 60_000),
                "played after not_after"
            );
            if id == 5 {
                assert!(
                    plays.iter().all(|r| r.at_unix_ms <= ANCHOR_MS + 10_000),
                    "played after remove"
                );
            }
        }
    }

    // Each output's stream is clean: no CC error, all sections good, CAT present.
    let ts_a: Vec<u8> = a_out.datagrams().concat();
    let (emms, cats, errors) = demux(&ts_a, Pid::DEFAULT_EMM);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(emms.len() as u64, sa.sections);
    assert!(
        cats.len() >= 80 * 1000 / 400 - 1,
        "{} CATs in 80 s",
        cats.len()
    );
    let ts_b: Vec<u8> = b_out
        .datagrams()
        .iter()
        .flat_map(|d| {
            assert_eq!(d.len(), RTP_HEADER_LEN + 3 * 188);
            d[RTP_HEADER_LEN..].to_vec()
        })
        .collect();
    let (emms_b, _, errors) = demux(&ts_b, Pid::new(0x0200).unwrap());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(emms_b.len() as u64, sb.sections);
    assert!(emms_b.iter().all(|s| (1..=20).contains(&id_of(s))));
    // RTP sequence numbers are consecutive.
    let seqs: Vec<u16> = b_out
        .datagrams()
        .iter()
        .map(|d| u16::from_be_bytes([d[2], d[3]]))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
}

#[tokio::test(start_paused = true)]
async fn a_full_record_channel_drops_records_not_play_out() {
    let carousel = Carousel::new();
    let cancel = CancellationToken::new();
    let (tx, _rx) = mpsc::channel(4); // never read
    let out = MemoryOutput::counting();
    let mut cfg = config("x", 500_000, false);
    cfg.schedule.burst_count = 0; // busy from the first instant
    let p = carousel
        .spawn_player(cfg, out.clone(), Some(tx), cancel.clone())
        .unwrap();
    for id in 0..10 {
        carousel
            .add(emm(id, Class::Change, u64::MAX, 150))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    cancel.cancel();
    let s = p.join().await;
    assert!(s.sections > 1000);
    assert_eq!(s.records_dropped, s.sections - 4);
    // The cap is respected (non-CBR, always busy): within 0.1 % of 500 kbit/s.
    let ideal = 500_000.0 * 60.0 / 8.0;
    assert!(
        (out.bytes() as f64 - ideal).abs() / ideal < 0.001,
        "{}",
        out.bytes()
    );
}

#[tokio::test(start_paused = true)]
async fn idle_output_sends_only_the_cat_and_new_emms_go_out_at_once() {
    let carousel = Carousel::new();
    let cancel = CancellationToken::new();
    let out = MemoryOutput::new();
    let (tx, mut rx) = mpsc::channel(1000);
    let mut cfg = config("idle", 1_000_000, false);
    cfg.schedule.burst_count = 1;
    let p = carousel
        .spawn_player(cfg, out.clone(), Some(tx), cancel.clone())
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = out.datagrams();
    assert!(
        idle.iter().all(|d| d.len() == 188),
        "only single CAT packets while idle"
    );
    assert!(
        (25..=26).contains(&idle.len()),
        "{} CATs in 10 s",
        idle.len()
    );
    // An EMM that expires right away: played once from the fast lane, then gone.
    carousel
        .add(emm(7, Class::Urgent, ANCHOR_MS + 10_000, 100))
        .await
        .unwrap();
    let r = rx.recv().await.unwrap();
    assert_eq!((r.emm_id, r.lane), (7, Lane::Burst { repetition: 1 }));
    assert_eq!(
        r.at_unix_ms,
        ANCHOR_MS + 10_000,
        "played the instant it arrived"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    cancel.cancel();
    let s = p.join().await;
    assert_eq!(s.live, 0);
}

/// Waits (real time) until `cond` holds; panics after a generous bound so a
/// broken player fails the test instead of hanging it. Not a timing check.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not reached within 60 s");
}

// The thread driver (what UDP outputs use) on the real clock: more adds
// than the command queue holds (backpressure, nothing lost), removes, a
// duplicate, records, cancellation and join. No timing is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_player_takes_every_command_and_stops_on_cancel() {
    let carousel = Carousel::new();
    let cancel = CancellationToken::new();
    let out = MemoryOutput::counting();
    let (tx, mut rx) = mpsc::channel(1000);
    let mut cfg = config("rt", 2_000_000, false);
    cfg.clock_anchor_unix_ms = None;
    cfg.schedule.burst_count = 0;
    let p = carousel
        .spawn_player(cfg, RealTime(out.clone()), Some(tx), cancel.clone())
        .unwrap();
    assert!(p.is_thread());
    assert_eq!(carousel.players(), 1);
    const N: u64 = 10_000; // > the 4096 command queue
    for id in 0..N {
        carousel
            .add(emm(id, Class::ALL[(id % 3) as usize], u64::MAX, 100))
            .await
            .unwrap();
    }
    for id in 0..100 {
        carousel.remove(id).await;
    }
    carousel
        .add(emm(500, Class::Urgent, u64::MAX, 100))
        .await
        .unwrap(); // duplicate
    eventually("every command applied", || {
        let s = p.stats();
        s.live == N - 100 && s.rejected == 1
    })
    .await;
    let r = rx.recv().await.unwrap();
    assert_eq!((&*r.output, r.lane), ("rt", Lane::Cycle));
    eventually("datagrams sent", || out.count() > 10).await;
    cancel.cancel();
    let s = p.join().await;
    assert_eq!(s.live, N - 100);
    assert_eq!(s.send_errors, 0);
    assert_eq!(s.datagrams, out.count());
    assert_eq!(s.ts_bytes, out.bytes());
    eventually("the stopped player leaves the carousel", || {
        carousel.players() == 0
    })
    .await;
}

// A play-out thread also stops when the runtime that watches its
// cancellation token goes away (as a tokio task player would).
#[test]
fn thread_player_stops_with_its_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let carousel = Carousel::new();
    let p = rt.block_on(async {
        carousel
            .spawn_player(
                config("rt", 1_000_000, true),
                RealTime(MemoryOutput::counting()),
                None,
                CancellationToken::new(),
            )
            .unwrap()
    });
    assert_eq!(carousel.players(), 1);
    drop(rt);
    for _ in 0..6000 {
        if carousel.players() == 0 {
            drop(p);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("play-out thread still running 60 s after its runtime was dropped");
}

/// A hot standby: EMMs applied, nothing sent; on air, the stream starts
/// with the CAT, each PID's first packet flagged as a discontinuity, and
/// every EMM plays; back in standby, nothing more is sent.
#[tokio::test(start_paused = true)]
async fn standby_sends_nothing_until_on_air_then_flags_the_discontinuity() {
    let carousel = Carousel::standby();
    let mut watch = carousel.on_air_watch();
    let out = MemoryOutput::new();
    let cancel = CancellationToken::new();
    let player = carousel
        .spawn_player(
            config("s", 200_000, true),
            out.clone(),
            None,
            cancel.clone(),
        )
        .unwrap();
    for id in 0..20 {
        carousel
            .add(emm(id, Class::Background, u64::MAX, 180))
            .await
            .unwrap();
    }
    // Paused time: the window passes at once, the player's timers in it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(out.count(), 0, "a standby sends nothing");
    assert_eq!(player.stats().live, 20, "but its schedule is loaded");
    assert!(!*watch.borrow_and_update());

    carousel.set_on_air(true).await;
    assert!(watch.has_changed().unwrap() && *watch.borrow_and_update());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let datagrams = out.datagrams();
    assert!(!datagrams.is_empty());
    let first: Vec<PacketRef> = datagrams[0]
        .chunks(188)
        .map(|p| PacketRef::parse(p).unwrap())
        .collect();
    assert_eq!(first[0].pid(), Pid::CAT);
    assert!(first[0].discontinuity());
    let first_emm = datagrams
        .iter()
        .flat_map(|d| d.chunks(188))
        .map(|p| PacketRef::parse(p).unwrap())
        .find(|p| p.pid() == Pid::DEFAULT_EMM)
        .unwrap();
    assert!(first_emm.discontinuity() && first_emm.payload_unit_start());
    let ts: Vec<u8> = datagrams.concat();
    let (emms, cats, errors) = demux(&ts, Pid::DEFAULT_EMM);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!cats.is_empty());
    let ids: std::collections::BTreeSet<u64> = emms.iter().map(|s| id_of(s)).collect();
    assert_eq!(ids, (0..20).collect());

    carousel.set_on_air(false).await;
    let sent = out.count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(out.count(), sent, "back in standby, nothing more");
    cancel.cancel();
    player.join().await;
}
