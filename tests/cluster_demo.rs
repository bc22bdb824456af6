//! Shorter runs of the main demo (issue #5, acceptance 4 and 5): three app processes behind
//! the round-robin (or sticky) balancer, one SIGKILLed half-way, synchronous replication: no
//! request failed, no session lost, no counter skipping or going backwards, and behind the
//! sticky balancer the killed node's sessions rebound to another route. Runs the example
//! binary `cargo test` builds.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // `cargo test --test cluster_demo` alone does not build examples: build it here, so the
    // test never runs a stale binary (a no-op when `cargo test` just built it).
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("test binary path");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = exe
            .parent()
            .and_then(|deps| deps.parent())
            .is_some_and(|profile| profile.ends_with("release"));
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--example", name]);
        if release {
            build.arg("--release");
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join("examples")
        .join(name);
    assert!(
        dir.exists(),
        "{} is missing: `cargo test` builds the examples first",
        dir.display()
    );
    dir
}

/// Runs the demo with `args`, checks it killed a node and that its summary has no failed
/// request, lost session or counter anomaly; returns the summary line.
fn run_demo(args: &[&str]) -> String {
    let out = Command::new(example("cluster_demo"))
        .args(args)
        .output()
        .expect("run cluster_demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cluster_demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("requests="))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"))
        .to_string();
    assert!(
        stdout.contains("killing node 1"),
        "a node was killed:\n{stdout}"
    );
    assert!(summary.starts_with("requests=400 "), "{summary}");
    for zero in [
        " failed=0 ",
        " sessions_lost=0 ",
        " backward=0 ",
        " skipped=0 ",
    ] {
        assert!(summary.contains(zero), "{summary}");
    }
    summary
}

#[test]
fn cluster_demo_short_run_loses_nothing_when_a_node_is_killed() {
    run_demo(&["--short"]);
}

/// Issue #5, acceptance 5, end to end: behind the sticky balancer, the sessions of the
/// killed node move to the others, their cookies take the new node's route, and nothing is
/// lost or goes wrong.
#[test]
fn sticky_demo_rebinds_the_killed_node_s_sessions() {
    let summary = run_demo(&["--sticky", "--short"]);
    let rebound: u64 = summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rebound="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rebound count in {summary}"));
    assert!(rebound >= 1, "no session changed its route: {summary}");
}
