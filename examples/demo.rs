//! Three channels on 127.0.0.1 with static membership: each sends a greeting to the others in
//! every send mode, and each prints what it received.
//!
//! ```text
//! cargo run --example demo
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tribes::{ChannelMessage, Levels, SendOptions};
use tribes_suite::{static_group, wait_until, GroupOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let nodes = static_group(3, &GroupOptions::default())?;
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
