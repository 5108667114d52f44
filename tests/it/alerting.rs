//! The alerting half of monitoring (docs/operations.md), checked with the
//! programs an operator runs: `promtool` checks and unit-tests the shipped
//! rules (deploy/prometheus/), `promtool`/`amtool` check the example
//! configs, the Grafana dashboard names only metrics casd exports, and a
//! live test runs casd, a real Prometheus scraping it every second with
//! the shipped rules and a real Alertmanager posting to a webhook served
//! here. The programs come from Debian's `prometheus` and
//! `prometheus-alertmanager` (scripts/test.sh installs them): a missing
//! one fails the test, naming the package.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod live;

use crate::common;

/// The alerts of issue 17's table, each with a runbook section.
const ALERTS: &[&str] = &[
    "CasdDown",
    "CasdOffAir",
    "CasdDatabaseDown",
    "CasdReplicationAsync",
    "CasdEmmBacklog",
    "CasdCommandErrors",
    "CasdSchedulerJobFailing",
    "CasdSchedulerJobNotRun",
    "CasdKeyRotationOverdue",
    "CasdCarouselCycleTooLong",
    "CasdTlsCertificateExpiring",
    "CasdCyclersOnAirNotOne",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Runs `program` from Debian package `package`; a missing program fails
/// the test loudly (never a skip).
fn run(program: &str, package: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): install Debian's {package} \
                 (scripts/test.sh does when run as root)"
            )
        })
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_shipped_rules() {
    let dir = repo("deploy/prometheus");
    let check = run(
        "promtool",
        "prometheus",
        &["check", "rules", "casd-rules.yml"],
        &dir,
    );
    assert_success("promtool check rules", &check);
    let found = String::from_utf8_lossy(&check.stdout);
    assert!(
        found.contains(&format!("{} rules found", ALERTS.len())),
        "{found}"
    );
    let test = run(
        "promtool",
        "prometheus",
        &["test", "rules", "casd-rules.test.yml"],
        &dir,
    );
    assert_success("promtool test rules", &test);
}

#[test]
fn example_configs_are_valid() {
    let prom = run(
        "promtool",
        "prometheus",
        &["check", "config", "prometheus.yml"],
        &repo("deploy/prometheus"),
    );
    assert_success("promtool check config", &prom);
    let am = run(
        "amtool",
        "prometheus-alertmanager",
        &["check-config", "alertmanager.yml"],
        &repo("deploy/alertmanager"),
    );
    assert_success("amtool check-config", &am);
}

/// Each alert of the table is in the rules with its labels and annotations,
/// has a runbook section, and a unit test where it fires and one where it
/// does not.
#[test]
fn every_alert_has_annotations_a_runbook_and_both_unit_cases() {
    let rules = read("deploy/prometheus/casd-rules.yml");
    let tests = read("deploy/prometheus/casd-rules.test.yml");
    let runbook = read("docs/operations.md");
    let blocks: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    let names: Vec<&str> = blocks.iter().map(|b| b.lines().next().unwrap()).collect();
    assert_eq!(names, ALERTS, "the rules file's alerts");
    for (name, block) in names.iter().zip(&blocks) {
        let anchor = name.to_lowercase();
        for field in ["severity: ", "summary: ", "description: ", "for: "] {
            assert!(block.contains(field), "{name} has no {field}");
        }
        assert!(
            block.contains(&format!("runbook_url: \"docs/operations.md#{anchor}\"")),
            "{name}'s runbook_url"
        );
        assert!(
            runbook.contains(&format!("\n### {name}\n")),
            "docs/operations.md has no section ### {name}"
        );
        let quiet = format!("alertname: {name}\n        exp_alerts: []\n");
        let fires = format!("alertname: {name}\n        exp_alerts:\n          - exp_labels:");
        assert!(
            tests.contains(&quiet),
            "{name}: no case where it does not fire"
        );
        assert!(tests.contains(&fires), "{name}: no case where it fires");
    }
}

/// The metric names in `text`: identifiers starting with casd_ or process_
/// (and `up`), a histogram's series suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    text.split(|c: char| !ident(c))
        .filter(|w| w.starts_with("casd_") || w.starts_with("process_") || *w == "up")
        .map(|w| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s).filter(|b| common::METRICS.contains(b)));
            base.unwrap_or(w).to_owned()
        })
        .collect()
}

fn unknown(names: &BTreeSet<String>) -> Vec<&String> {
    names
        .iter()
        .filter(|n| n.as_str() != "up" && !common::METRICS.contains(&n.as_str()))
        .collect()
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_and_rules_name_only_contract_metrics() {
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/casd-dashboard.json"))
        .expect("casd-dashboard.json is not valid JSON");
    let mut found = Vec::new();
    exprs(&dash, &mut found);
    assert!(found.len() >= 20, "only {} expressions", found.len());
    for e in &found {
        let names = metric_names(e);
        assert!(!names.is_empty(), "expression names no metric: {e}");
        assert!(unknown(&names).is_empty(), "not in the contract: {e}");
    }
    let panels: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str().map(str::to_owned))
        .collect();
    for title in [
        "Bitrate per output",
        "Cycle time per output and class",
        "EMMG backlog",
        "Commands per second",
        "Command latency",
        "Job status",
        "Key versions",
    ] {
        assert!(panels.iter().any(|p| p == title), "no panel {title}");
    }
    for file in [
        "deploy/prometheus/casd-rules.yml",
        "deploy/prometheus/casd-rules.test.yml",
    ] {
        let names = metric_names(&read(file));
        assert!(unknown(&names).is_empty(), "{file}: {:?}", unknown(&names));
    }
}

#[test]
fn the_name_check_catches_a_metric_outside_the_contract() {
    let names = metric_names("rate(casd_sms_requests_total[1m]) + casd_made_up_seconds");
    assert_eq!(unknown(&names), vec!["casd_made_up_seconds"]);
    let hist = metric_names("rate(casd_sms_request_duration_seconds_bucket[5m])");
    assert!(unknown(&hist).is_empty());
}
