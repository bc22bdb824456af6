//! Three channels on loopback exchange messages in every send mode (issue #3, acceptance 3).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tribes::{ChannelMessage, SendOptions};
use tribes_suite::{static_group, wait_until, GroupOptions};

const PER_MODE: u32 = 10_000;

fn modes() -> [(u8, SendOptions); 4] {
    [
        (0, SendOptions::ASYNCHRONOUS),
        (1, SendOptions::empty()),
        (2, SendOptions::USE_ACK),
        (3, SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK),
    ]
}

fn payload(mode: u8, from: u8, seq: u32) -> Vec<u8> {
    let mut p = vec![mode, from];
    p.extend_from_slice(&seq.to_be_bytes());
    // Some content that depends on the sequence, checked on receipt.
    p.extend((0..(seq % 61) as u8).map(|i| i ^ from));
    p
}

#[derive(Default)]
struct Log {
    /// (mode, from) -> sequence numbers in arrival order.
    seen: HashMap<(u8, u8), Vec<u32>>,
    corrupt: usize,
}

#[test]
fn three_nodes_every_mode_every_message_once_and_in_order() {
    let _ = env_logger::builder().is_test(true).try_init();
    let channels = static_group(3, &GroupOptions::default()).expect("start group");
    let logs: Vec<Arc<Mutex<Log>>> = (0..3).map(|_| Arc::default()).collect();
    for (ch, log) in channels.iter().zip(&logs) {
        let log = Arc::clone(log);
        ch.add_channel_listener(move |m: &ChannelMessage| {
            let p = &m.payload[..];
            let mut log = log.lock();
            if p.len() < 6 {
                log.corrupt += 1;
                return Ok(());
            }
            let seq = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
            if p != payload(p[0], p[1], seq).as_slice() {
                log.corrupt += 1;
            }
            log.seen.entry((p[0], p[1])).or_default().push(seq);
            Ok(())
        });
    }
    for ch in &channels {
        assert!(
            ch.wait_for_members(2, Duration::from_secs(5)),
            "static members seen"
        );
    }

    std::thread::scope(|s| {
        for (i, ch) in channels.iter().enumerate() {
            s.spawn(move || {
                let others = ch.members();
                for (mode, opts) in modes() {
                    for seq in 0..PER_MODE {
                        ch.send(&others, payload(mode, i as u8, seq), opts)
                            .unwrap_or_else(|e| panic!("node {i} mode {mode} seq {seq}: {e}"));
                    }
                }
            });
        }
    });

    let expected = 2 * 4 * PER_MODE as usize;
    for (r, log) in logs.iter().enumerate() {
        let complete = wait_until(Duration::from_secs(30), || {
            log.lock().seen.values().map(Vec::len).sum::<usize>() >= expected
        });
        let log = log.lock();
        assert!(
            complete,
            "receiver {r} got {} of {expected}",
            log.seen.values().map(Vec::len).sum::<usize>()
        );
        assert_eq!(log.corrupt, 0, "receiver {r} saw corrupt payloads");
        for from in (0..3u8).filter(|f| *f as usize != r) {
            for (mode, _) in modes() {
                let seqs = &log.seen[&(mode, from)];
                let mut sorted = seqs.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(
                    sorted.len(),
                    PER_MODE as usize,
                    "receiver {r} from {from} mode {mode}: duplicates or losses"
                );
                assert_eq!(
                    seqs.len(),
                    PER_MODE as usize,
                    "receiver {r} from {from} mode {mode}: duplicates"
                );
                if mode != 0 {
                    assert!(
                        seqs.windows(2).all(|w| w[0] < w[1]),
                        "receiver {r} from {from} mode {mode}: out of order"
                    );
                }
            }
        }
    }
    for ch in &channels {
        ch.stop(tribes::Levels::ALL).expect("stop");
    }
}
