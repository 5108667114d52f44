//! What the wire contract and the probe do not depend on, checked with
//! `cargo tree` (normal and dev edges): casd-wire is usable by a receiver
//! vendor without an async runtime, a database driver or a web stack, and
//! casd-probe does not link the daemon.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages `cargo tree -p <package> -e normal,dev` lists.
fn tree(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal,dev",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(names.contains(package), "{package} not in its own tree");
    names
}

fn assert_none_of(package: &str, forbidden: &[&str]) {
    let names = tree(package);
    let found: Vec<&&str> = forbidden.iter().filter(|f| names.contains(**f)).collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn casd_wire_has_no_runtime_database_or_web_stack() {
    assert_none_of(
        "casd-wire",
        &["casd", "tokio", "mysql_async", "axum", "hyper", "reqwest"],
    );
}

/// The probe reads the `emms` table for `audit`, so mysql_async (and the
/// tokio it runs on) are its own dependencies; the daemon is not.
#[test]
fn casd_tools_does_not_link_the_daemon() {
    assert_none_of(
        "casd-tools",
        &["casd", "axum", "argon2", "reqwest", "jsonwebtoken", "tower"],
    );
    let tools = tree("casd-tools");
    assert!(tools.contains("casd-wire") && tools.contains("carousel"));
}
