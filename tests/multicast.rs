//! Multicast membership on loopback (issue #4): beacons go out on 127.0.0.1 with TTL 0, so
//! nothing leaves the machine. Each test uses its own group port.

use std::time::{Duration, Instant};

use tribes::membership::McastConfig;
use tribes::{GroupChannel, Levels, SendOptions};
use tribes_suite::wait_until;

const DROP_MS: u64 = 1000;

fn mcast(port: u16) -> McastConfig {
    McastConfig {
        port,
        frequency: Duration::from_millis(100),
        drop_time: Duration::from_millis(DROP_MS),
        ttl: Some(0),
        ..McastConfig::default()
    }
}

fn node(name: &str, port: u16) -> GroupChannel {
    let ch = GroupChannel::builder()
        .name(name)
        .port(0)
        .heartbeat_interval(None)
        .multicast(mcast(port))
        .build()
        .unwrap();
    ch.start(Levels::DEFAULT).unwrap();
    ch
}

fn group_port(seed: u16) -> u16 {
    // Spread tests (and parallel runs) over distinct ports.
    46000 + (std::process::id() as u16 % 500) * 4 + seed
}

#[test]
fn three_nodes_see_each_other_and_a_stopped_one_leaves_at_once() {
    let port = group_port(0);
    let nodes: Vec<_> = (0..3).map(|i| node(&format!("m{i}"), port)).collect();
    for n in &nodes {
        assert!(
            n.wait_for_members(2, Duration::from_secs(2)),
            "{} sees {:?}",
            n.local_member(),
            n.members()
        );
    }
    // They can talk to whom they discovered.
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = got.clone();
    nodes[1].add_channel_listener(move |_: &tribes::ChannelMessage| {
        g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    });
    let to: Vec<_> = nodes[0]
        .members()
        .into_iter()
        .filter(|m| *m == nodes[1].local_member())
        .collect();
    nodes[0]
        .send(
            &to,
            &b"hi"[..],
            SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        )
        .unwrap();
    assert_eq!(got.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A clean stop sends the shutdown beacon: gone well before the drop time.
    let leaving = nodes[2].local_member();
    let start = Instant::now();
    nodes[2].stop(Levels::ALL).unwrap();
    assert!(wait_until(Duration::from_secs(2), || {
        !nodes[0].members().contains(&leaving) && !nodes[1].members().contains(&leaving)
    }));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "left after {:?}",
        start.elapsed()
    );
}

#[test]
fn payload_changes_propagate_and_stopping_beacons_leaves_the_group() {
    let port = group_port(1);
    let a = node("ea", port);
    let b = node("eb", port);
    assert!(a.wait_for_members(1, Duration::from_secs(2)));
    b.set_member_payload(&b"v2"[..]);
    assert!(wait_until(Duration::from_secs(2), || a
        .service_members()
        .first()
        .is_some_and(|m| &m.payload[..] == b"v2")));
    // Stopping only MBR_TX sends the shutdown beacon; b keeps listening.
    let b_member = b.local_member();
    b.stop(Levels::MBR_TX).unwrap();
    assert!(wait_until(Duration::from_secs(2), || !a
        .members()
        .contains(&b_member)));
    // b still hears a.
    assert!(wait_until(Duration::from_secs(2), || b
        .service_members()
        .contains(&a.local_member())));
    // Beaconing again brings b back.
    b.start(Levels::MBR_TX).unwrap();
    assert!(wait_until(Duration::from_secs(2), || a
        .members()
        .contains(&b_member)));
}

/// Not a test on its own: when `TRIBES_MCAST_CHILD` names a group port, this runs one
/// multicast node in a child process (spawned by the kill test) for at most 30 s.
#[test]
fn child_node() {
    let Ok(port) = std::env::var("TRIBES_MCAST_CHILD") else {
        return;
    };
    let n = node("child", port.parse().unwrap());
    println!("child up at {}", n.local_member());
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn killed_member_expires_after_drop_time() {
    let port = group_port(2);
    let a = node("ka", port);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_node",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("TRIBES_MCAST_CHILD", port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let seen = a.wait_for_members(1, Duration::from_secs(10));
    if !seen {
        let _ = child.kill();
        let _ = child.wait();
        panic!("child never appeared");
    }
    // SIGKILL: no shutdown beacon. The member must expire within drop time + one beacon
    // interval (plus scheduling slack).
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .is_empty()));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(DROP_MS - 200)
            && took <= Duration::from_millis(DROP_MS + 100 + 300),
        "expired after {took:?}"
    );
}
