//! Fault injection for tests: named fail points (the `fail` crate),
//! compiled in only with the cargo feature `testing` (casd's own tests turn
//! it on; a release build has none: [`armed`] is then `false`, inlined
//! away, and the `fail` crate is not even a dependency).
//!
//! A test arms a point with [`Armed::new`]; the code asks [`armed`] where a
//! fault can be injected (e.g. `emmg::before_commit`: the EMMG drops its
//! batch's transaction instead of committing it, as a crash there would).
//!
//! Why the database name: fail points are process-global, and every
//! integration test of a crate runs in one binary, in parallel threads, each
//! on a throwaway database of its own. A point armed by one test must not
//! fire in another one's EMMG, so it is armed *for a database* (the action is
//! `return(<database name>)`) and fires only for code working on that
//! database. Two tests arming points at once would still overwrite each
//! other's configuration: [`Armed`] holds `fail::FailScenario`, whose global
//! lock serializes the tests that arm points (only those; the others never
//! wait), and which clears every point when the test ends, even by a panic.

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

/// A fail point armed for one database until dropped (see the module doc).
#[cfg(feature = "testing")]
pub struct Armed {
    _scenario: fail::FailScenario<'static>,
}

#[cfg(feature = "testing")]
impl Armed {
    /// Arms `name` for `database`, after any other test's armed points
    /// are dropped.
    pub fn new(name: &str, database: &str) -> Armed {
        let scenario = fail::FailScenario::setup();
        if let Err(e) = fail::cfg(name, &format!("return({database})")) {
            panic!("fail point {name}: {e}");
        }
        Armed {
            _scenario: scenario,
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
