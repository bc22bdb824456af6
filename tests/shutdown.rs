//! Clean shutdown (issue #3, acceptance 5). Alone in its own test binary, so no other
//! test's threads are alive while it counts `tribes-` threads.

use std::net::TcpListener;
use std::time::Duration;

use tribes::{Levels, SendOptions};
use tribes_suite::{static_group, thread_names, GroupOptions};

#[test]
fn stop_joins_every_thread_and_frees_the_ports() {
    let g = static_group(
        3,
        &GroupOptions {
            heartbeat: Some(Duration::from_millis(50)),
            ..GroupOptions::fast_failing()
        },
    )
    .unwrap();
    let to = g[1].members();
    g[1].send(&to, &b"x"[..], SendOptions::ASYNCHRONOUS)
        .unwrap();
    g[1].send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap();
    assert!(thread_names().iter().any(|n| n.starts_with("tribes-")));
    // Two multicast members too (loopback, TTL 0), so their threads are counted.
    let mcast = tribes::membership::McastConfig {
        port: 47000 + (std::process::id() % 1000) as u16,
        frequency: Duration::from_millis(50),
        drop_time: Duration::from_millis(500),
        ttl: Some(0),
        ..Default::default()
    };
    let m: Vec<_> = (0..2)
        .map(|i| {
            let ch = tribes::GroupChannel::builder()
                .name(format!("mc{i}"))
                .port(0)
                .multicast(mcast.clone())
                .build()
                .unwrap();
            ch.start(Levels::ALL).unwrap();
            ch
        })
        .collect();
    assert!(m[0].wait_for_members(1, Duration::from_secs(2)));
    assert!(thread_names().iter().any(|n| n.starts_with("tribes-mcast")));
    let addrs: Vec<_> = g
        .iter()
        .chain(&m)
        .map(|c| c.local_member().addr())
        .collect();
    for c in g.iter().chain(&m) {
        c.stop(Levels::ALL).unwrap();
    }
    let left: Vec<_> = thread_names()
        .into_iter()
        .filter(|n| n.starts_with("tribes-"))
        .collect();
    assert!(left.is_empty(), "threads left after stop: {left:?}");
    for a in addrs {
        TcpListener::bind(a).unwrap_or_else(|e| panic!("{a} not free after stop: {e}"));
    }
}
