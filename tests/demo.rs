//! `mtad demo` as a newcomer runs it: three nodes, a kill of the VIP's
//! owner midway, and a report in which every acknowledged message was
//! delivered.

#[test]
fn the_demo_fails_over_and_loses_nothing() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["demo", "--messages", "40", "--keep"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(
        text.contains("the VIP was on node-a at the start"),
        "{text}"
    );
    assert!(text.contains("node-a was killed (SIGKILL)"), "{text}");
    assert!(text.contains("node-a was restarted and rejoined"), "{text}");
    let counts = text
        .lines()
        .find(|l| l.starts_with("messages:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(counts.starts_with("messages: 40 sent,"), "{counts}");
    assert!(counts.ends_with("none lost"), "{counts}");
    // Before the kill every message is acknowledged: at least half.
    let acked: u64 = counts
        .split(", ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(acked >= 20, "{counts}");
    // The directory it names holds the nodes' logs.
    let dir = text
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("configs and logs: ");
    let log = std::fs::read_to_string(std::path::Path::new(dir).join("node-b.log")).unwrap();
    assert!(log.contains("joined the cluster"));
    let _ = std::fs::remove_dir_all(dir);
    without_keep_the_demo_leaves_nothing_behind();
    with_wipe_what_the_dead_owner_held_comes_from_its_shadows();
}

/// Run after the first demo: two at once would share its addresses.
fn without_keep_the_demo_leaves_nothing_behind() {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["demo", "--messages", "10"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("mtad-demo-{}", child.id()));
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("configs and logs: removed"), "{text}");
    assert!(!dir.exists(), "{} is left", dir.display());
}

/// Run after the others, for the same reason: the owner holds all it
/// acknowledged (the sink defers) and dies with its disk; the survivors
/// deliver all of it.
fn with_wipe_what_the_dead_owner_held_comes_from_its_shadows() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["demo", "--messages", "20", "--wipe"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(text.contains("its data directory deleted"), "{text}");
    assert!(
        text.contains("the first message it held reached the sink from a shadow copy"),
        "{text}"
    );
    assert!(
        text.contains("node-a was restarted on an empty data directory and rejoined"),
        "{text}"
    );
    let counts = text.lines().find(|l| l.starts_with("messages:")).unwrap();
    assert!(
        counts.starts_with("messages: 20 sent, 20 acknowledged, 20 of those delivered"),
        "{counts}"
    );
    assert!(counts.ends_with("none lost"), "{counts}");
}
