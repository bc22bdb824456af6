//! The interceptor stack, typed messages, static membership notices, keep-alive and
//! pipelining, observed through what arrives at the other end.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tribes::error::SendError;
use tribes::interceptors::{Down, Interceptor, Outgoing, Up};
use tribes::transport::SenderConfig;
use tribes::{
    ChannelMessage, GroupChannel, Levels, Member, MembershipListener, ProcessError, SendOptions,
};
use tribes_suite::{static_group, wait_until, GroupOptions};

/// Counts what passes and appends a trailer byte on the way down, strips it on the way up.
struct Trailer {
    flag: SendOptions,
    down: AtomicU64,
    up: AtomicU64,
}

impl Interceptor for Trailer {
    fn name(&self) -> &'static str {
        "trailer"
    }
    fn option_flag(&self) -> SendOptions {
        self.flag
    }
    fn send(&self, mut out: Outgoing, next: Down<'_>) -> Result<(), SendError> {
        self.down.fetch_add(1, Ordering::SeqCst);
        let mut p = out.message.payload.to_vec();
        p.push(0xEE);
        out.message.payload = p.into();
        next.send(out)
    }
    fn received(&self, mut msg: ChannelMessage, next: Up<'_>) -> Result<(), ProcessError> {
        self.up.fetch_add(1, Ordering::SeqCst);
        if msg.payload.last() != Some(&0xEE) {
            return Err(ProcessError::new("trailer missing"));
        }
        msg.payload.truncate(msg.payload.len() - 1);
        next.received(msg)
    }
}

fn pair_with(flag: SendOptions) -> (Vec<GroupChannel>, Vec<Arc<Trailer>>) {
    // Both channels carry the test interceptor, nearest the application.
    let trailers: Vec<Arc<Trailer>> = (0..2)
        .map(|_| {
            Arc::new(Trailer {
                flag,
                down: AtomicU64::new(0),
                up: AtomicU64::new(0),
            })
        })
        .collect();
    let t = trailers.clone();
    let opts = GroupOptions {
        heartbeat: None,
        extra: Some(Arc::new(
            move |i| vec![t[i].clone() as Arc<dyn Interceptor>],
        )),
        ..GroupOptions::default()
    };
    (static_group(2, &opts).unwrap(), trailers)
}

#[test]
fn interceptor_sees_only_messages_with_its_flag_and_can_rewrite_payloads() {
    let flag = SendOptions::from_bits(0x0100);
    let (g, t) = pair_with(flag);
    let got = Arc::new(Mutex::new(Vec::new()));
    let g2 = Arc::clone(&got);
    g[1].add_channel_listener(move |m: &ChannelMessage| {
        g2.lock().push(m.payload.to_vec());
        Ok(())
    });
    let to = [g[1].local_member()];
    let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
    g[0].send(&to, &b"plain"[..], sync).unwrap();
    g[0].send(&to, &b"flagged"[..], sync | flag).unwrap();
    assert_eq!(
        t[0].down.load(Ordering::SeqCst),
        1,
        "only the flagged message went through"
    );
    assert_eq!(t[1].up.load(Ordering::SeqCst), 1);
    assert_eq!(*got.lock(), vec![b"plain".to_vec(), b"flagged".to_vec()]);
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Order {
    id: u64,
    items: Vec<String>,
}

#[test]
fn typed_messages_round_trip_with_rmp_serde() {
    let g = static_group(2, &GroupOptions::default()).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g2 = Arc::clone(&got);
    g[1].add_channel_listener(move |m: &ChannelMessage| {
        assert!(!m.options.contains(SendOptions::BYTE_MESSAGE));
        g2.lock()
            .push(tribes::channel::decode::<Order>(&m.payload)?);
        Ok(())
    });
    let order = Order {
        id: 7,
        items: vec!["tea".into(), "scones".into()],
    };
    g[0].send_typed(
        &[g[1].local_member()],
        &order,
        SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
    )
    .unwrap();
    assert_eq!(got.lock().as_slice(), &[order]);
}

#[derive(Default)]
struct Events {
    added: AtomicUsize,
    gone: Mutex<Vec<Member>>,
}

struct Recorder(Arc<Events>);

impl MembershipListener for Recorder {
    fn member_added(&self, _: &Member) {
        self.0.added.fetch_add(1, Ordering::SeqCst);
    }
    fn member_disappeared(&self, m: &Member) {
        self.0.gone.lock().push(m.clone());
    }
}

#[test]
fn goodbye_notice_removes_a_static_member_and_hello_brings_it_back() {
    let g = static_group(3, &GroupOptions::default()).unwrap();
    let ev = Arc::new(Events::default());
    g[0].add_membership_listener(Recorder(Arc::clone(&ev)));
    assert_eq!(g[0].members().len(), 2);
    let leaving = g[2].local_member();
    g[2].stop(Levels::ALL).unwrap();
    assert!(wait_until(Duration::from_secs(5), || g[0].members().len() == 1));
    let gone = ev.gone.lock().clone();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0], leaving);
    assert!(gone[0].is_shutting_down());
    // Start again on the same port: its hello brings it back.
    g[2].start(Levels::ALL).unwrap();
    assert!(wait_until(Duration::from_secs(5), || g[0].members().len() == 2));
    assert_eq!(ev.added.load(Ordering::SeqCst), 1);
}

#[test]
fn keep_alive_count_recycles_connections() {
    let opts = GroupOptions {
        sender: SenderConfig {
            keep_alive_count: Some(10),
            ..SenderConfig::default()
        },
        ..GroupOptions::default()
    };
    let g = static_group(2, &opts).unwrap();
    let to = [g[1].local_member()];
    for _ in 0..100 {
        g[0].send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap();
    }
    let connects = g[0].sender_stats().connects.load(Ordering::Relaxed);
    // 100 messages, 10 per connection (plus the hello notice on the first one).
    assert!((10..=12).contains(&connects), "connects = {connects}");
}

#[test]
fn many_threads_share_one_connection_with_pipelined_acks() {
    let opts = GroupOptions {
        sender: SenderConfig {
            pool_size: 1,
            ..SenderConfig::default()
        },
        ..GroupOptions::default()
    };
    let g = static_group(2, &opts).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<(u8, u32)>::new()));
    let s2 = Arc::clone(&seen);
    g[1].add_channel_listener(move |m: &ChannelMessage| {
        let p = &m.payload;
        s2.lock()
            .push((p[0], u32::from_be_bytes([p[1], p[2], p[3], p[4]])));
        Ok(())
    });
    let to = [g[1].local_member()];
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let (ch, to) = (&g[0], &to);
            s.spawn(move || {
                for i in 0..500u32 {
                    let mut p = vec![t];
                    p.extend_from_slice(&i.to_be_bytes());
                    ch.send(to, p, SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(g[0].sender_stats().connects.load(Ordering::Relaxed), 1);
    let seen = seen.lock();
    assert_eq!(seen.len(), 8 * 500);
    for t in 0..8u8 {
        let mine: Vec<u32> = seen
            .iter()
            .filter(|(x, _)| *x == t)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(mine, (0..500).collect::<Vec<_>>(), "thread {t} in order");
    }
}

#[test]
fn large_payloads_written_from_their_own_buffer_arrive_intact() {
    let g = static_group(2, &GroupOptions::default()).unwrap();
    let got = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let g2 = Arc::clone(&got);
    g[1].add_channel_listener(move |m: &ChannelMessage| {
        g2.lock().push(m.payload.to_vec());
        Ok(())
    });
    let to = [g[1].local_member()];
    let sizes = [1usize, 8191, 8192, 8193, 100_000, 300_000];
    let payload =
        |i: usize, n: usize| -> Vec<u8> { (0..n).map(|j| (i * 31 + j * 7) as u8).collect() };
    let mut expected = Vec::new();
    for (i, &n) in sizes.iter().cycle().take(60).enumerate() {
        let opts = match i % 3 {
            0 => SendOptions::ASYNCHRONOUS,
            1 => SendOptions::USE_ACK,
            _ => SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        };
        g[0].send(&to, payload(i, n), opts).unwrap();
        expected.push(payload(i, n));
    }
    assert!(wait_until(Duration::from_secs(10), || got.lock().len() == 60));
    let mut got = got.lock().clone();
    got.sort();
    expected.sort();
    assert!(got == expected, "payloads differ");
}

/// Counts how sends ended, as told to their handler.
#[derive(Default)]
struct Outcomes {
    completed: AtomicUsize,
    failed: AtomicUsize,
}

impl tribes::interceptors::ErrorHandler for Outcomes {
    fn handle_completion(&self, _id: tribes::UniqueId) {
        self.completed.fetch_add(1, Ordering::SeqCst);
    }
    fn handle_error(&self, _error: SendError, _id: tribes::UniqueId) {
        self.failed.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_send_handler_hears_once_how_each_send_ended_async_or_not() {
    let g = static_group(2, &GroupOptions::fast_failing()).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&got);
    g[1].add_channel_listener(move |_m: &ChannelMessage| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let to = [g[1].local_member()];
    let async_ack =
        SendOptions::ASYNCHRONOUS | SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
    let sync_ack = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
    let outcomes = Arc::new(Outcomes::default());
    for opts in [async_ack, sync_ack, async_ack, sync_ack] {
        g[0].send_with_handler(&to, vec![1u8], opts, outcomes.clone())
            .unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || {
        outcomes.completed.load(Ordering::SeqCst) == 4
    }));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        outcomes.completed.load(Ordering::SeqCst),
        4,
        "told once each"
    );
    assert_eq!(outcomes.failed.load(Ordering::SeqCst), 0);
    assert_eq!(got.load(Ordering::SeqCst), 4);

    // A member that is gone: the synchronous send fails and its handler hears it once.
    let closed = tribes_suite::ClosedPort::new().unwrap();
    let gone = [Member::new(closed.addr())];
    let failures = Arc::new(Outcomes::default());
    assert!(g[0]
        .send_with_handler(&gone, vec![2u8], sync_ack, failures.clone())
        .is_err());
    g[0].send_with_handler(&gone, vec![3u8], async_ack, failures.clone())
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        failures.failed.load(Ordering::SeqCst) == 2
    }));
    assert_eq!(failures.completed.load(Ordering::SeqCst), 0);
}

#[test]
fn lazy_messages_arrive_in_order_without_the_local_hint() {
    // Through the dispatch threads (which may gather LAZY messages) and without them.
    for (opts, via) in [
        (SendOptions::ASYNCHRONOUS | SendOptions::LAZY, "dispatch"),
        (SendOptions::USE_ACK | SendOptions::LAZY, "caller's thread"),
    ] {
        let g = static_group(2, &GroupOptions::default()).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g2 = Arc::clone(&got);
        g[1].add_channel_listener(move |m: &ChannelMessage| {
            g2.lock().push((m.options, m.payload.clone()));
            Ok(())
        });
        let to = [g[1].local_member()];
        // From four threads at once, so the dispatch thread has concurrent messages to gather.
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let (ch, to) = (&g[0], &to);
                s.spawn(move || {
                    for i in 0..200u8 {
                        ch.send(to, vec![t, i], opts).unwrap();
                    }
                });
            }
        });
        assert!(
            wait_until(Duration::from_secs(10), || got.lock().len() == 800),
            "{via}: {} of 800 arrived",
            got.lock().len()
        );
        let got = got.lock();
        assert!(
            got.iter().all(|(o, _)| !o.contains(SendOptions::LAZY)),
            "{via}: the local hint went on the wire"
        );
        // Each sender's messages in the order it sent them.
        for t in 0..4u8 {
            let seq: Vec<u8> = got
                .iter()
                .filter(|(_, p)| p[0] == t)
                .map(|(_, p)| p[1])
                .collect();
            assert_eq!(seq, (0..200u8).collect::<Vec<_>>(), "{via}: sender {t}");
        }
    }
}
