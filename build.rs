//! Build script: the git commit casd was built from, for
//! `casd_build_info{git_sha}` ("unknown" outside a git checkout). Not
//! `CASD_*`: cargo also sets it when running tests, and casd reads every
//! `CASD_*` variable as a configuration key.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let sha = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_GIT_SHA={sha}");
    // Rebuilt when HEAD moves (a commit or a checkout); in a worktree the
    // git directory is elsewhere, so ask git where it is.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
