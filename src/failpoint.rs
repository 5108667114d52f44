//! Fault injection for tests: named fail points (the `fail` crate),
//! compiled in only with the cargo feature `testing` (casd's own tests turn
//! it on; a release build has none: [`armed`] is then `false`, inlined
//! away, and the `fail` crate is not even a dependency).
//!
//! A test arms a point with [`Armed::new`]; the code asks [`armed`] where a
//! fault can be injected: `emmg::before_commit` (the EMMG drops its batch's
//! transaction instead of committing it, as a crash there would) and
//! `sms::commit` (an SMS round fails right before its COMMIT).
//!
//! Why the database name: fail points are process-global, and every
//! integration test of a crate runs in one binary, in parallel threads, each
//! on a throwaway database of its own. A point armed by one test must not
//! fire in another one's EMMG, so it is armed *for a database* (the action is
//! `return(<database name>)`) and fires only for code working on that
//! database. Two tests arming the same point at once would still overwrite
//! each other's configuration (one per point in the process): [`Armed`]
//! holds one lock shared by every test that arms a point, so they take
//! turns (only those; the others never wait), and disarms its point when
//! dropped, even by a panic.

/// Whether fail point `name` is armed for `database` (always `false`
/// without the `testing` feature).
#[cfg(feature = "testing")]
pub fn armed(name: &str, database: Option<&str>) -> bool {
    fail::fail_point!(name, |arg: Option<String>| {
        arg.is_some() && arg.as_deref() == database
    });
    false
}

/// Whether fail point `name` is armed for `database` (always `false`
/// without the `testing` feature).
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub fn armed(_name: &str, _database: Option<&str>) -> bool {
    false
}

/// Taken by every [`Armed`]: one armed point at a time in the process.
#[cfg(feature = "testing")]
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A fail point armed for one database until dropped (see the module doc).
/// Held across `.await`s on a test's own runtime thread (the std lock is
/// not `Send`: a `#[tokio::test]`'s body may hold it, a spawned task not).
#[cfg(feature = "testing")]
pub struct Armed {
    // Dropped in order: the point is disarmed before the turn passes on.
    _point: fail::FailGuard,
    _turn: std::sync::MutexGuard<'static, ()>,
}

#[cfg(feature = "testing")]
impl Armed {
    /// Arms `name` for `database`, once no other test holds an armed point.
    pub fn new(name: &str, database: &str) -> Armed {
        // A test that panicked while holding its turn poisons the lock;
        // its point was disarmed all the same.
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let point = match fail::FailGuard::new(name, &format!("return({database})")) {
            Ok(p) => p,
            Err(e) => panic!("fail point {name}: {e}"),
        };
        Armed {
            _point: point,
            _turn: turn,
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;

    #[test]
    fn a_point_fires_only_for_its_database() {
        assert!(!armed("failpoint::test", Some("db_a")));
        let a = Armed::new("failpoint::test", "db_a");
        assert!(armed("failpoint::test", Some("db_a")));
        assert!(!armed("failpoint::test", Some("db_b")));
        assert!(!armed("failpoint::test", None));
        assert!(!armed("failpoint::other", Some("db_a")));
        drop(a);
        assert!(!armed("failpoint::test", Some("db_a")));
    }
}
