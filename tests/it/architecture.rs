//! ARCHITECTURE.md's "does not know" invariants, checked where a command
//! can check them: `cargo tree` for what a crate may depend on, and a look
//! at the imports and SQL of the modules that must not know something.
//! A failure names the file (or the dependency) that broke the rule. What
//! casd-wire and casd-tools may depend on is checked in their own crate
//! (wire/tests/it/deps.rs); that only the key store names the `keys` table,
//! in src/keystore.rs's unit tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The names of every package `package` depends on, through the given
/// edge kinds (`normal`, `dev`, `build`, or several joined by commas).
fn deps(package: &str, edges: &str) -> Vec<String> {
    deps_with(package, edges, &[])
}

/// [`deps`] with extra `cargo tree` arguments (features).
fn deps_with(package: &str, edges: &str, extra: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args([
        "tree",
        "--offline",
        "--quiet",
        "-p",
        package,
        "-e",
        edges,
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    cmd.args(extra);
    let out = cmd.output().expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn assert_no_deps(package: &str, edges: &str, forbidden: &[&str]) {
    let found = deps(package, edges);
    let bad: Vec<&&str> = forbidden
        .iter()
        .filter(|f| found.iter().any(|d| d == **f))
        .collect();
    assert!(
        bad.is_empty(),
        "{package} ({edges} edges) must not depend on {bad:?}; see `cargo tree -p {package} -e {edges} -i <name>`"
    );
}

/// Every `.rs` file below `dir` (relative to the workspace root), with its
/// text up to its `#[cfg(test)]` unit tests (those may use anything).
fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    let base = root().join(dir);
    if base.is_file() {
        files.push(base);
    } else {
        walk(&base, &mut files);
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let code = match text.find("#[cfg(test)]") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            (p.strip_prefix(root()).unwrap().to_owned(), code)
        })
        .collect()
}

fn assert_mentions_none(dir: &str, forbidden: &[&str], rule: &str) {
    for (path, code) in sources(dir) {
        for f in forbidden {
            assert!(
                !code.contains(f),
                "{} mentions `{f}`, but {rule} (ARCHITECTURE.md)",
                path.display()
            );
        }
    }
}

#[test]
fn the_carousel_knows_no_database_http_or_keys() {
    assert_no_deps(
        "carousel",
        "normal,build",
        &[
            "mysql_async",
            "axum",
            "hyper",
            "reqwest",
            "casd",
            "casd-wire",
            "aes",
            "cmac",
        ],
    );
}

#[test]
fn the_carousel_core_does_not_know_tokio() {
    // Only the play-out runner (the default feature `player`) does.
    let pure = deps_with("carousel", "normal,build", &["--no-default-features"]);
    assert!(
        !pure.iter().any(|d| d == "tokio" || d == "tokio-util"),
        "carousel without its `player` feature depends on tokio: {pure:?}"
    );
}

#[test]
fn hw_does_not_know_what_keys_are_for() {
    assert_no_deps(
        "hw",
        "normal,build",
        &["casd", "casd-wire", "aes", "cmac", "mysql_async"],
    );
}

#[test]
fn a_release_build_carries_no_test_support() {
    // The `testing` feature (throwaway databases, token forgers, fail
    // points) comes only through the dev-dependency on casd itself.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args([
            "tree",
            "--offline",
            "--quiet",
            "-p",
            "casd",
            "-e",
            "normal,features",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("casd feature \"testing\"")),
        "the release build of casd enables its `testing` feature:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("fail feature \"failpoints\"")),
        "the release build of casd enables fail points"
    );
}

#[test]
fn the_sms_interface_holds_no_key_and_builds_no_section() {
    assert_mentions_none(
        "src/sms",
        // It sizes an OSM with the wire crate's arithmetic, nothing more.
        &[
            "Key128",
            "seal_",
            "open_",
            "derive_",
            "encryptor::",
            "carousel::",
        ],
        "the SMS-CAS interface holds no key and builds no section",
    );
}

#[test]
fn the_cycler_does_not_know_keys_or_what_an_emm_says() {
    assert_mentions_none(
        "src/cycler.rs",
        &[
            "crypto",
            "Key128",
            "keystore",
            "encryptor",
            "casd_wire::emm",
        ],
        "the Cycler does not know keys or what an EMM says",
    );
}

#[test]
fn auth_does_not_know_what_the_routes_do() {
    assert_mentions_none(
        "src/auth",
        &[
            "crate::sms",
            "crate::emmg",
            "crate::cycler",
            "crate::scheduler",
            "crate::encryptor",
        ],
        "auth does not know what the routes do",
    );
}

#[test]
fn the_repository_points_nowhere_outside_itself() {
    // A user's clone has only what is in it.
    let out = Command::new("git")
        .current_dir(root())
        .args([
            "grep",
            "-n",
            "-I",
            "-e",
            "\\.\\./shared",
            "-e",
            "shared/spec",
            "--",
            ".",
            ":!tests/it/architecture.rs",
        ])
        .output()
        .expect("git grep runs");
    let hits = String::from_utf8_lossy(&out.stdout);
    assert!(
        hits.trim().is_empty(),
        "references outside the repository:\n{hits}"
    );
}
