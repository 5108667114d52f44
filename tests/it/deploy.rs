//! The deployment files, checked by the programs an operator and CI use:
//! `kubectl kustomize` renders both overlays (and the monitoring
//! component), `kubernetes-validate --strict` validates them against the
//! Kubernetes schemas, tests/deploy_check.py checks them against issue
//! 18's lists (roles, replicas, Secrets 0400, probes, securityContext, the
//! PrometheusRule's groups = deploy/prometheus/casd-rules.yml's),
//! `actionlint` passes on .github/workflows and `hadolint` on the
//! Containerfile.
//!
//! The tools come from the venv scripts/test.sh installs (.state/venv),
//! else PATH. Without one the test FAILS, unless
//! `CASD_TEST_SKIP_DEPLOY_TOOLS=1` opts out (said loudly in the output).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The tool `name` from .state/venv/bin or PATH; None (said loudly) only
/// when it is missing and the run opted out.
pub fn tool(name: &str) -> Option<PathBuf> {
    let venv = root().join(".state/venv/bin").join(name);
    if venv.exists() {
        return Some(venv);
    }
    if Command::new(name).arg("--version").output().is_ok() {
        return Some(PathBuf::from(name));
    }
    if std::env::var("CASD_TEST_SKIP_DEPLOY_TOOLS").as_deref() == Ok("1") {
        eprintln!("!!! {name} NOT RUN: not installed, CASD_TEST_SKIP_DEPLOY_TOOLS=1 opted out !!!");
        return None;
    }
    panic!(
        "{name} is not installed: scripts/test.sh installs it into .state/venv \
         (or set CASD_TEST_SKIP_DEPLOY_TOOLS=1 to opt out)"
    );
}

/// Runs the command; fails the test with its output unless it succeeds.
fn check(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A kustomization in a fresh directory: `resources` and `components` are
/// paths relative to the repository, the rest is appended as it is.
/// kustomize wants relative paths, so they are written from the directory.
pub fn kustomization(resources: &[&str], components: &[&str], rest: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("casd-kustomize-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = "../".repeat(dir.components().count() - 1);
    let rel = |p: &&str| {
        format!(
            "{up}{}/{p}",
            root().display().to_string().trim_start_matches('/')
        )
    };
    let list = |ps: &[&str]| ps.iter().map(rel).collect::<Vec<_>>().join(", ");
    let text = format!(
        "resources: [{}]\ncomponents: [{}]\n{rest}",
        list(resources),
        list(components)
    );
    std::fs::write(dir.join("kustomization.yaml"), text).unwrap();
    dir
}

/// `kubectl kustomize dir`, written to `out`.
pub fn render(kubectl: &Path, dir: &Path, out: &Path) {
    let yaml = check(Command::new(kubectl).arg("kustomize").arg(dir));
    std::fs::write(out, yaml).unwrap();
}

#[test]
fn overlays_render_validate_and_match_the_issue() {
    let (Some(kubectl), Some(validate), Some(python)) = (
        tool("kubectl"),
        tool("kubernetes-validate"),
        tool("python3"),
    ) else {
        return;
    };
    let k = root().join("deploy/kubernetes");
    let out = kustomization(
        &["deploy/kubernetes/overlays/split"],
        &["deploy/kubernetes/components/monitoring"],
        "",
    );
    let files = [
        ("split", k.join("overlays/split")),
        ("appliance", k.join("overlays/appliance")),
        ("monitoring", out.clone()),
    ]
    .map(|(name, dir)| {
        let file = out.join(format!("{name}.yaml"));
        render(&kubectl, &dir, &file);
        file
    });
    for f in &files {
        let report = check(Command::new(&validate).arg("--strict").arg(f));
        // The operator's CRDs (ServiceMonitor, PrometheusRule) have no
        // schema there: said in the output, not hidden.
        for l in report
            .lines()
            .filter(|l| !l.contains("passed for resource"))
        {
            eprintln!("kubernetes-validate {}: {l}", f.display());
        }
        assert!(
            report.contains("passed for resource deployment/"),
            "{report}"
        );
    }
    check(
        Command::new(python)
            .arg(root().join("tests/deploy_check.py"))
            .args(&files)
            .arg(root().join("deploy/prometheus/casd-rules.yml")),
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn workflows_pass_actionlint() {
    let Some(actionlint) = tool("actionlint") else {
        return;
    };
    let files: Vec<PathBuf> = std::fs::read_dir(root().join(".github/workflows"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 2, "ci.yml and release.yml: {files:?}");
    check(Command::new(actionlint).args(&files).current_dir(root()));
}

#[test]
fn containerfile_passes_hadolint() {
    let Some(hadolint) = tool("hadolint") else {
        return;
    };
    check(Command::new(hadolint).arg(root().join("deploy/container/Containerfile")));
}
