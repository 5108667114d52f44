//! Long-run bitrate of the pacer over 30 simulated days at 64 kbit/s,
//! 1 Mbit/s and 20 Mbit/s, driven with synthetic `now` values (no sleeping).
//!
//! The play-out rule is: the next datagram goes at `due_at(0)` (when all
//! bytes sent so far are covered), then `record(datagram bytes)`. The
//! pacer's only state is the byte count, so stepping one datagram at a time
//! from day 0 and jumping to day d with `record(k × size)` reach the same
//! state; the test uses that to check every step inside windows spread
//! over the 30 days (and every step of all 30 days at 64 kbit/s).

use std::time::Duration;

use carousel::Pacer;

const DATAGRAM: u64 = 7 * 188;
const DAY: u64 = 86_400;

/// Steps `steps` datagrams from the pacer's state; checks every interval is
/// the nominal period within 1 ns and returns the time of the last send.
fn step(p: &mut Pacer, steps: u64) -> Duration {
    let nominal_ns = DATAGRAM as f64 * 8e9 / p.bitrate() as f64;
    let mut prev = p.due_at(0);
    for _ in 0..steps {
        p.record(DATAGRAM);
        let t = p.due_at(0);
        let dt = (t - prev).as_nanos() as f64;
        assert!(
            (dt - nominal_ns).abs() <= 1.0,
            "interval {dt} ns, nominal {nominal_ns}"
        );
        prev = t;
    }
    prev
}

fn check_rate(bitrate: u64, full: bool) {
    let span = Duration::from_secs(30 * DAY);
    let mut p = Pacer::new(bitrate).unwrap();
    let per_day = Pacer::new(bitrate)
        .unwrap()
        .bytes_due(Duration::from_secs(DAY)) as u64
        / DATAGRAM;
    if full {
        step(&mut p, 30 * per_day);
    } else {
        // Windows of 200k datagrams at the start of each simulated day.
        for day in 0..30 {
            let at = day * per_day;
            let done = (p.sent() as u64) / DATAGRAM;
            p.record((at - done) * DATAGRAM);
            step(&mut p, 200_000.min(per_day));
        }
        let done = (p.sent() as u64) / DATAGRAM;
        p.record((30 * per_day - done) * DATAGRAM);
    }
    // Send every datagram due up to exactly 30 days.
    while p.due_at(0) <= span {
        p.record(DATAGRAM);
    }
    let sent_bits = p.sent() as f64 * 8.0;
    let rate = sent_bits / span.as_secs_f64();
    let err = (rate - bitrate as f64).abs() / bitrate as f64;
    assert!(
        err < 0.001,
        "{bitrate} bit/s: measured {rate:.3} bit/s, error {err:e}"
    );
    // In fact within one datagram of the ideal byte count.
    let ideal = Pacer::new(bitrate).unwrap().bytes_due(span);
    assert!(
        p.sent().abs_diff(ideal) <= u128::from(DATAGRAM),
        "{} vs {ideal}",
        p.sent()
    );
}

#[test]
fn thirty_days_at_64_kbit_every_datagram() {
    check_rate(64_000, true);
}

#[test]
fn thirty_days_at_1_mbit() {
    check_rate(1_000_000, false);
}

#[test]
fn thirty_days_at_20_mbit() {
    check_rate(20_000_000, false);
}

#[test]
fn no_overflow_for_years_of_uptime() {
    let mut p = Pacer::new(20_000_000).unwrap();
    let years = Duration::from_secs(50 * 365 * DAY);
    p.record(p.bytes_due(years) as u64);
    let t = p.due_at(DATAGRAM);
    assert!(t > years && t - years < Duration::from_millis(1));
}
