//! Three channels on 127.0.0.1: each sends a greeting to the others in every send mode, and
//! each prints what it received.
//!
//! ```text
//! cargo run --example demo                          # static membership
//! cargo run --example demo -- --membership multicast   # beacons on 127.0.0.1, TTL 0
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tribes::membership::McastConfig;
use tribes::{ChannelMessage, GroupChannel, Levels, SendOptions};
use tribes_suite::{static_group, wait_until, GroupOptions};

/// Three channels that find each other by multicast beacons on 127.0.0.1 (TTL 0: the
/// beacons never leave the machine).
fn multicast_group(n: usize) -> Result<Vec<GroupChannel>, Box<dyn std::error::Error>> {
    let cfg = McastConfig {
        port: 45564,
        frequency: Duration::from_millis(100),
        drop_time: Duration::from_millis(1000),
        ttl: Some(0),
        ..McastConfig::default()
    };
    let mut nodes = Vec::new();
    for i in 0..n {
        let ch = GroupChannel::builder()
            .name(format!("node{i}"))
            .port(0)
            .multicast(cfg.clone())
            .build()?;
        ch.start(Levels::ALL)?;
        nodes.push(ch);
    }
    for ch in &nodes {
        if !ch.wait_for_members(n - 1, Duration::from_secs(5)) {
            return Err("members did not find each other by multicast".into());
        }
    }
    Ok(nodes)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let membership = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "static".to_string(),
        [flag, value] if flag == "--membership" => value.clone(),
        _ => return Err("usage: demo [--membership static|multicast]".into()),
    };
    let nodes = match membership.as_str() {
        "static" => static_group(3, &GroupOptions::default())?,
        "multicast" => multicast_group(3)?,
        other => return Err(format!("unknown membership {other} (static or multicast)").into()),
    };
    let received = Arc::new(AtomicUsize::new(0));
    for node in &nodes {
        let me = node.local_member();
        let received = Arc::clone(&received);
        node.add_channel_listener(move |m: &ChannelMessage| {
            println!(
                "{me} received {:?} from {} (options: {})",
                String::from_utf8_lossy(&m.payload),
                m.sender,
                m.options
            );
            received.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
    }
    for node in &nodes {
        println!(
            "{} sees {} member(s): {}",
            node.local_member(),
            node.members().len(),
            node.members()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let modes = [
        ("async", SendOptions::ASYNCHRONOUS),
        ("no-ack", SendOptions::empty()),
        ("ack", SendOptions::USE_ACK),
        (
            "sync-ack",
            SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        ),
    ];
    for node in &nodes {
        let others = node.members();
        for (name, opts) in modes {
            let text = format!("hello ({name}) from {}", node.local_member());
            node.send(&others, text.into_bytes(), opts)?;
        }
    }
    let expected = nodes.len() * (nodes.len() - 1) * modes.len();
    let all = wait_until(Duration::from_secs(10), || {
        received.load(Ordering::SeqCst) >= expected
    });
    for node in &nodes {
        node.stop(Levels::ALL)?;
    }
    println!(
        "{} of {expected} messages received{}",
        received.load(Ordering::SeqCst),
        if all { "" } else { " (some missing!)" }
    );
    if all {
        Ok(())
    } else {
        Err("not every message arrived".into())
    }
}
