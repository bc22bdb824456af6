//! Failure behaviour (issue #3, acceptance 4 and 5): FAIL_ACK, unreachable members, bad
//! frames, a full dispatch queue, clean shutdown.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tribes::interceptors::DispatchConfig;
use tribes::wire::{encode_frame, AckCommand};
use tribes::{ChannelMessage, Failure, Member, ProcessError, SendError, SendOptions, UniqueId};
use tribes_suite::{static_group, wait_until, ClosedPort, GroupOptions, HangingPort};

#[test]
fn failing_listener_gives_fail_ack_naming_the_member() {
    let g = static_group(2, &GroupOptions::fast_failing()).unwrap();
    g[1].add_channel_listener(|m: &ChannelMessage| {
        if &m.payload[..] == b"bad" {
            Err(ProcessError::new("refused"))
        } else {
            Ok(())
        }
    });
    let to = [g[1].local_member()];
    let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
    let err = g[0].send(&to, &b"bad"[..], sync).unwrap_err();
    let faulty = err.faulty_members();
    assert_eq!(faulty.len(), 1, "{err}");
    assert_eq!(faulty[0].member, to[0]);
    assert_eq!(faulty[0].failure, Failure::RemoteProcess);
    // ACK on receipt cannot report processing failures (as in Tribes).
    g[0].send(&to, &b"bad"[..], SendOptions::USE_ACK).unwrap();
    // The connection stays usable after a FAIL_ACK.
    g[0].send(&to, &b"good"[..], sync).unwrap();
}

#[test]
fn send_to_a_member_not_listening_fails_within_the_timeout() {
    let g = static_group(1, &GroupOptions::fast_failing()).unwrap();
    // A port held without a listener, so no parallel test can take it.
    let closed = ClosedPort::new().unwrap();
    let dead = closed.addr();
    let ghost = Member::with_id(dead, UniqueId::random());
    let live = g[0].local_member();
    let start = Instant::now();
    let err = g[0]
        .send(&[ghost.clone(), live], &b"x"[..], SendOptions::USE_ACK)
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(800) + Duration::from_millis(500));
    let faulty = err.faulty_members();
    assert_eq!(faulty.len(), 1, "only the dead member fails: {err}");
    assert_eq!(faulty[0].member, ghost);
    assert!(
        matches!(faulty[0].failure, Failure::Connect { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&dead.to_string()),
        "error names the member: {err}"
    );
}

#[test]
fn a_panicking_listener_fails_its_message_and_the_node_keeps_delivering() {
    let g = static_group(2, &GroupOptions::fast_failing()).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&got);
    g[1].add_channel_listener(move |m: &ChannelMessage| {
        if &m.payload[..] == b"boom" {
            panic!("listener bug");
        }
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let to = [g[1].local_member()];
    let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
    // More panics than the receiver has workers: each used to end one for good.
    for _ in 0..10 {
        let err = g[0].send(&to, &b"boom"[..], sync).unwrap_err();
        assert_eq!(
            err.faulty_members()[0].failure,
            Failure::RemoteProcess,
            "{err}"
        );
    }
    for _ in 0..5 {
        g[0].send(&to, &b"fine"[..], sync).unwrap();
        g[0].send(&to, &b"fine"[..], SendOptions::USE_ACK).unwrap();
    }
    assert!(wait_until(Duration::from_secs(3), || got
        .load(Ordering::SeqCst)
        == 10));
    let stats = g[1].receiver_stats().unwrap();
    assert_eq!(stats.panics.load(Ordering::Relaxed), 10);
}

#[test]
fn a_member_whose_connect_hangs_does_not_fail_the_healthy_ones() {
    // One deadline for the whole send used to be eaten by the hanging connect: the healthy
    // member, written to after it, was reported as timed out although it applied the
    // message (and its connection was torn down).
    let g = static_group(2, &GroupOptions::fast_failing()).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&got);
    g[1].add_channel_listener(move |_: &ChannelMessage| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let hanging = HangingPort::new().unwrap();
    let stuck = Member::with_id(hanging.addr(), UniqueId::random());
    let live = g[1].local_member();
    let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
    let start = Instant::now();
    let err = g[0]
        .send(&[stuck.clone(), live.clone()], &b"x"[..], sync)
        .unwrap_err();
    let faulty = err.faulty_members();
    assert_eq!(faulty.len(), 1, "only the unreachable member fails: {err}");
    assert_eq!(faulty[0].member, stuck);
    assert_eq!(got.load(Ordering::SeqCst), 1);
    // The connect's timeout, then the healthy member's own ACK time at most.
    assert!(
        start.elapsed() < Duration::from_millis(2 * 800 + 1500),
        "{:?}",
        start.elapsed()
    );
    // The healthy member's connection is still fine.
    g[0].send(std::slice::from_ref(&live), &b"y"[..], sync)
        .unwrap();
    assert_eq!(got.load(Ordering::SeqCst), 2);
}

#[test]
fn a_peer_that_never_acks_times_out_naming_it() {
    let g = static_group(1, &GroupOptions::fast_failing()).unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    // Accept and read, never answer.
    let t = std::thread::spawn(move || {
        let (mut s, _) = silent.accept().unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let m = Member::with_id(addr, UniqueId::random());
    let start = Instant::now();
    let err = g[0]
        .send(std::slice::from_ref(&m), &b"x"[..], SendOptions::USE_ACK)
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(err.faulty_members()[0].member, m);
    assert_eq!(err.faulty_members()[0].failure, Failure::Timeout);
    drop(g);
    t.join().unwrap();
}

fn expect_closed(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the receiver to close the connection, got {other:?}"),
    }
}

#[test]
fn bad_frames_close_only_their_connection() {
    let opts = GroupOptions {
        receiver: tribes::transport::ReceiverConfig {
            max_body_size: 1024 * 1024,
            ..Default::default()
        },
        ..GroupOptions::fast_failing()
    };
    let g = static_group(2, &opts).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&got);
    g[1].add_channel_listener(move |_: &ChannelMessage| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let addr = g[1].local_member().addr();
    let to = [g[1].local_member()];

    // An innocent connection that stays open across the attacks.
    g[0].send(&to, &b"before"[..], SendOptions::USE_ACK)
        .unwrap();

    // 1. Oversize length in the header.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"FLT2002\x7f\x00\x00\x00").unwrap();
    expect_closed(s);
    // 2. Junk instead of a start marker.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    expect_closed(s);
    // 3. Negative length.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"FLT2002\xff\xff\xff\xf0").unwrap();
    expect_closed(s);
    // 4. Well framed, but the body is not an envelope: no ACK, closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&encode_frame(&[0u8; 40])).unwrap();
    expect_closed(s);
    // 5. Bad end marker.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"FLT2002\x00\x00\x00\x01xTLF2004").unwrap();
    expect_closed(s);

    // A valid message first, then garbage on the same connection: the valid one is
    // delivered and ACKed, then the connection closes.
    let mut s = TcpStream::connect(addr).unwrap();
    let msg = ChannelMessage {
        options: SendOptions::USE_ACK | SendOptions::BYTE_MESSAGE,
        timestamp: 0,
        unique_id: UniqueId::random(),
        sender: g[0].local_member(),
        payload: bytes::Bytes::from_static(b"raw"),
    };
    let mut wire = msg.encode_frame().to_vec();
    wire.extend_from_slice(b"garbage!");
    s.write_all(&wire).unwrap();
    let mut ack = [0u8; 21];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, AckCommand::Ack.frame());
    expect_closed(s);

    // The receiver still serves everyone else, on the old and on new connections.
    g[0].send(
        &to,
        &b"after"[..],
        SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || got
        .load(Ordering::SeqCst)
        == 3));
    let stats = g[1].receiver_stats().unwrap();
    assert!(stats.protocol_errors.load(Ordering::Relaxed) >= 6);
}

/// Sends `count` asynchronous `USE_ACK` messages of `size` bytes, with one dispatch thread
/// set up by `dispatch`, to a peer that accepts and never reads or answers (so the thread
/// stalls on the first batch and the queue behind it fills). Returns how many were
/// accepted, the byte budgets that refusals named, and how long the sends took.
fn send_to_a_stalled_peer(
    dispatch: DispatchConfig,
    count: usize,
    size: usize,
) -> (usize, Vec<usize>, Duration) {
    let opts = GroupOptions {
        dispatch: DispatchConfig {
            threads: 1,
            ..dispatch
        },
        ..GroupOptions::fast_failing()
    };
    let g = static_group(1, &opts).unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let m = Member::with_id(silent.local_addr().unwrap(), UniqueId::random());
    let start = Instant::now();
    let (mut accepted, mut refused_max) = (0, Vec::new());
    for _ in 0..count {
        match g[0].send(
            std::slice::from_ref(&m),
            vec![0u8; size],
            SendOptions::ASYNCHRONOUS | SendOptions::USE_ACK,
        ) {
            Ok(_) => accepted += 1,
            Err(SendError::QueueFull { max, .. }) => refused_max.push(max),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let took = start.elapsed();
    drop(silent);
    (accepted, refused_max, took)
}

#[test]
fn full_async_queue_is_an_error_not_a_hang() {
    let bytes_bound = DispatchConfig {
        max_queue_bytes: 4096,
        ..DispatchConfig::default()
    };
    let (_, refused, took) = send_to_a_stalled_peer(bytes_bound, 100, 1000);
    assert!(refused.len() > 90, "refused {}", refused.len());
    assert!(refused.iter().all(|&max| max == 4096), "{refused:?}");
    assert!(took < Duration::from_millis(500), "sends did not block");
}

#[test]
fn the_async_queue_is_bounded_by_message_count_too() {
    let count_bound = DispatchConfig {
        max_queue_messages: 4,
        ..DispatchConfig::default()
    };
    let (accepted, _, _) = send_to_a_stalled_peer(count_bound, 50, 10);
    // What the thread took in its one batch (at most the 4 queued) and 4 queued behind it.
    assert!((4..=8).contains(&accepted), "accepted {accepted} of 50");
}

#[test]
fn a_slow_listener_does_not_hold_up_other_connections() {
    let opts = GroupOptions {
        receiver: tribes::transport::ReceiverConfig {
            read_ahead: 64 * 1024,
            ..Default::default()
        },
        ..GroupOptions::default()
    };
    let g = static_group(3, &opts).unwrap();
    let slow_done = Arc::new(AtomicUsize::new(0));
    let fast_done = Arc::new(AtomicUsize::new(0));
    let (s2, f2) = (Arc::clone(&slow_done), Arc::clone(&fast_done));
    g[2].add_channel_listener(move |m: &ChannelMessage| {
        if m.payload[0] == b's' {
            std::thread::sleep(Duration::from_millis(2));
            s2.fetch_add(1, Ordering::SeqCst);
        } else {
            f2.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    let to = [g[2].local_member()];
    // Node 0 floods node 2 with messages its listener handles slowly: 500 x 2 ms = 1 s of work,
    // 8 MB of data, far more than the 64 KiB read-ahead.
    std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut p = vec![0u8; 16 * 1024];
            p[0] = b's';
            for _ in 0..500 {
                g[0].send(&to, p.clone(), SendOptions::empty()).unwrap();
            }
        });
        // Meanwhile node 1's processed-ACK round trips keep completing quickly.
        std::thread::sleep(Duration::from_millis(50));
        let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
        for _ in 0..50 {
            let start = Instant::now();
            g[1].send(&to, &b"fast"[..], sync).unwrap();
            assert!(
                start.elapsed() < Duration::from_millis(200),
                "a fast peer waited {:?} behind a slow one",
                start.elapsed()
            );
        }
        assert!(
            slow_done.load(Ordering::SeqCst) < 500,
            "the flood was still being processed while the fast peer was served"
        );
        flood.join().unwrap();
    });
    assert!(wait_until(Duration::from_secs(10), || slow_done
        .load(Ordering::SeqCst)
        == 500));
    assert_eq!(fast_done.load(Ordering::SeqCst), 50);
    let stats = g[2].receiver_stats().unwrap();
    assert_eq!(
        stats.messages.load(Ordering::Relaxed) as usize,
        500 + 50 + 2
    );
}

#[test]
fn stop_does_not_deadlock_with_a_listener_that_uses_the_channel() {
    // The coordinator used to hold the receiver's slot locked while it joined the
    // workers; a listener reading the receiver's counters then waited for the lock while
    // stop waited for the listener.
    let mut g = static_group(2, &GroupOptions::fast_failing()).unwrap();
    let b = Arc::new(g.pop().unwrap());
    let weak = Arc::downgrade(&b);
    let (entered_tx, entered_rx) = crossbeam_channel::bounded(1);
    b.add_channel_listener(move |_: &ChannelMessage| {
        let _ = entered_tx.try_send(());
        std::thread::sleep(Duration::from_millis(200));
        if let Some(ch) = weak.upgrade() {
            let _ = ch.receiver_stats();
        }
        Ok(())
    });
    let to = [b.local_member()];
    g[0].send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap();
    entered_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let stopping = Arc::clone(&b);
    std::thread::spawn(move || {
        let _ = stopping.stop(tribes::Levels::ALL);
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "stop finished while a listener used the channel"
    );
}

#[test]
fn stopping_delivers_what_was_acknowledged_on_receipt_and_waits_for_a_worker() {
    // One worker and a slow listener: the pool's queue fills and later connections wait
    // for a worker with messages already read and acknowledged. Stopping used to drop
    // those.
    let opts = GroupOptions {
        receiver: tribes::transport::ReceiverConfig {
            max_threads: 1,
            ..Default::default()
        },
        ..GroupOptions::fast_failing()
    };
    let mut g = static_group(5, &opts).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&got);
    g[0].add_channel_listener(move |_: &ChannelMessage| {
        std::thread::sleep(Duration::from_millis(100));
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let to = [g[0].local_member()];
    // Each sender has its own connection; each send returns once the selector acknowledged.
    let senders: Vec<_> = g.drain(1..).collect();
    std::thread::scope(|s| {
        for ch in &senders {
            s.spawn(|| ch.send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap());
        }
    });
    // Most are still waiting for the worker here (each takes 100 ms).
    g[0].stop(tribes::Levels::ALL).unwrap();
    assert_eq!(
        got.load(Ordering::SeqCst),
        4,
        "every acknowledged message was delivered"
    );
}

/// Counts how the asynchronous sends it is given end.
#[derive(Default)]
struct Outcomes {
    not_started: AtomicUsize,
    other: AtomicUsize,
}

impl tribes::interceptors::ErrorHandler for Outcomes {
    fn handle_completion(&self, _: UniqueId) {
        self.other.fetch_add(1, Ordering::SeqCst);
    }
    fn handle_error(&self, e: SendError, _: UniqueId) {
        match e {
            SendError::NotStarted => self.not_started.fetch_add(1, Ordering::SeqCst),
            _ => self.other.fetch_add(1, Ordering::SeqCst),
        };
    }
}

#[test]
fn stop_sends_what_is_queued_for_a_bounded_time_then_fails_the_rest() {
    let opts = GroupOptions {
        dispatch: DispatchConfig {
            threads: 1,
            batch: 1,
            stop_drain: Duration::from_millis(300),
            ..DispatchConfig::default()
        },
        ..GroupOptions::fast_failing()
    };
    let g = static_group(1, &opts).unwrap();
    // Accepts and never answers: every batch waits the whole 800 ms send timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let m = Member::with_id(silent.local_addr().unwrap(), UniqueId::random());
    let outcomes = Arc::new(Outcomes::default());
    for _ in 0..20 {
        g[0].send_with_handler(
            std::slice::from_ref(&m),
            &b"x"[..],
            SendOptions::ASYNCHRONOUS | SendOptions::USE_ACK,
            outcomes.clone(),
        )
        .unwrap();
    }
    let start = Instant::now();
    g[0].stop(tribes::Levels::ALL).unwrap();
    let took = start.elapsed();
    // The batch in flight, then the rest fail at once (sending them all: 16 s).
    assert!(took < Duration::from_secs(4), "{took:?}");
    let failed = outcomes.not_started.load(Ordering::SeqCst);
    let other = outcomes.other.load(Ordering::SeqCst);
    assert_eq!(
        failed + other,
        20,
        "every handler heard how its message ended"
    );
    assert!(failed >= 15, "{failed} failed unsent");
    drop(silent);
}

/// A node that takes two connections at most, and two connections to it that send nothing.
fn node_full_of_idle_connections() -> (Vec<tribes::GroupChannel>, Vec<TcpStream>) {
    let opts = GroupOptions {
        receiver: tribes::transport::ReceiverConfig {
            max_connections: 2,
            ..Default::default()
        },
        ..GroupOptions::fast_failing()
    };
    let g = static_group(1, &opts).unwrap();
    let addr = g[0].local_member().addr();
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let stats = g[0].receiver_stats().unwrap();
    assert!(wait_until(Duration::from_secs(3), || {
        stats.accepted.load(Ordering::Relaxed) >= 2
    }));
    (g, held)
}

#[test]
fn connections_over_the_limit_are_refused_and_counted_and_the_node_keeps_serving() {
    let (g, held) = node_full_of_idle_connections();
    let addr = g[0].local_member().addr();
    let stats = g[0].receiver_stats().unwrap();
    // Over the limit: closed at once, each one counted (and only sparsely logged).
    for _ in 0..5 {
        expect_closed(TcpStream::connect(addr).unwrap());
    }
    assert_eq!(stats.refused.load(Ordering::Relaxed), 5);
    drop(held);
    // Room again: a real sender gets through.
    let other = static_group(1, &GroupOptions::fast_failing()).unwrap();
    let to = [g[0].local_member()];
    assert!(wait_until(Duration::from_secs(3), || other[0]
        .send(&to, &b"x"[..], SendOptions::USE_ACK)
        .is_ok()));
}

#[test]
fn connections_opened_and_left_make_room_for_new_peers() {
    // Connections that were opened and never used used to hold their places for good:
    // with `max_connections` of them, no new peer could connect (a node that restarted
    // could not replicate to this one again).
    let (g, held) = node_full_of_idle_connections();
    let stats = g[0].receiver_stats().unwrap();
    // Silent for 5 s: the silent longest gives its place to a real sender.
    std::thread::sleep(Duration::from_millis(5200));
    let other = static_group(1, &GroupOptions::fast_failing()).unwrap();
    let to = [g[0].local_member()];
    other[0]
        .send(&to, &b"x"[..], SendOptions::USE_ACK)
        .expect("a new peer gets a place");
    assert_eq!(stats.idle_closed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.refused.load(Ordering::Relaxed), 0);
    let mut held = held.into_iter();
    expect_closed(held.next().unwrap());
}

#[test]
fn a_connection_silent_past_the_idle_timeout_is_closed_and_working_ones_stay() {
    let opts = GroupOptions {
        receiver: tribes::transport::ReceiverConfig {
            idle_timeout: Some(Duration::from_millis(300)),
            selector_timeout: Duration::from_millis(50),
            ..Default::default()
        },
        ..GroupOptions::fast_failing()
    };
    let g = static_group(2, &opts).unwrap();
    let addr = g[0].local_member().addr();
    let stats = g[0].receiver_stats().unwrap();
    let to = [g[0].local_member()];
    g[1].send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap();
    let accepted = stats.accepted.load(Ordering::Relaxed);
    // Opened and left, and half a frame then nothing: both used to stay until their peer
    // closed them, the second holding its buffer.
    let opened = TcpStream::connect(addr).unwrap();
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .write_all(b"FLT2002\x00\x00\x10\x00partial")
        .unwrap();
    let start = Instant::now();
    expect_closed(stalled);
    expect_closed(opened);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(stats.idle_closed.load(Ordering::Relaxed), 2);
    // A peer's working connection stays however long it is silent between messages (a
    // sender that writes without ACK into a closed connection would lose the message):
    // no new connection for the sends after a pause of twice the timeout.
    std::thread::sleep(Duration::from_millis(600));
    for _ in 0..3 {
        g[1].send(&to, &b"x"[..], SendOptions::BYTE_MESSAGE)
            .unwrap();
        g[1].send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap();
    }
    assert_eq!(stats.accepted.load(Ordering::Relaxed), accepted + 2);
    assert_eq!(stats.idle_closed.load(Ordering::Relaxed), 2);
}

#[test]
fn binding_an_address_this_host_does_not_have_fails_at_once() {
    // TEST-NET-1: never a local address. Binding fails on the spot (nothing is sent); it
    // used to be tried on all 100 auto-bind ports before the error came back.
    let err = tribes::GroupChannel::builder()
        .name("elsewhere")
        .receiver(tribes::transport::ReceiverConfig {
            address: [192, 0, 2, 1].into(),
            port: 4000,
            ..Default::default()
        })
        .build()
        .and_then(|ch| ch.start(tribes::Levels::DEFAULT))
        .unwrap_err();
    match err {
        tribes::ChannelError::Bind { tried, .. } => assert_eq!(tried, 1, "{err}"),
        other => panic!("expected a bind error, got {other}"),
    }
}

#[test]
fn settings_as_large_as_a_duration_goes_work_and_zero_heartbeats_or_huge_pools_are_refused() {
    // `Duration::MAX` means "never give up"; these used to panic on `Instant` overflow at
    // the first send, at start or at stop.
    let opts = GroupOptions {
        sender: tribes::transport::SenderConfig {
            timeout: Duration::MAX,
            ..Default::default()
        },
        dispatch: DispatchConfig {
            stop_drain: Duration::MAX,
            ..Default::default()
        },
        extra: Some(Arc::new(|_| {
            let fd = tribes::interceptors::TcpFailureDetector::new(
                tribes::interceptors::FailureDetectorConfig {
                    connect_timeout: Duration::MAX,
                    ..Default::default()
                },
            );
            vec![Arc::new(fd) as Arc<dyn tribes::interceptors::Interceptor>]
        })),
        ..GroupOptions::default()
    };
    let g = static_group(2, &opts).unwrap();
    assert!(g[0].wait_for_members(1, Duration::MAX));
    let to = [g[1].local_member()];
    g[0].send(&to, &b"sync"[..], SendOptions::USE_ACK).unwrap();
    g[0].send(&to, &b"async"[..], SendOptions::ASYNCHRONOUS)
        .unwrap();
    for ch in &g {
        ch.stop(tribes::Levels::ALL).unwrap();
    }
    // A heartbeat every 0 s would spin a core.
    let err = tribes::GroupChannel::builder()
        .heartbeat_interval(Some(Duration::ZERO))
        .build()
        .err()
        .expect("refused");
    assert!(
        matches!(err, tribes::ChannelError::Config(ref e) if e.field == "heartbeat_interval"),
        "{err}"
    );
    // A dispatch pool that cannot be allocated is refused at start, not a panic.
    let huge = tribes::GroupChannel::builder()
        .port(0)
        .interceptor(tribes::interceptors::MessageDispatchInterceptor::new(
            DispatchConfig {
                threads: usize::MAX,
                ..Default::default()
            },
        ))
        .build()
        .unwrap();
    let err = huge.start(tribes::Levels::ALL).unwrap_err();
    assert!(
        matches!(err, tribes::ChannelError::Config(ref e) if e.field == "threads"),
        "{err}"
    );
}

#[test]
fn incomplete_frames_over_the_budget_cost_the_connection_holding_the_most() {
    // Each connection could hold an incomplete frame of up to `max_body_size`, with no
    // bound over all of them: peers that begin large frames and stop could pin gigabytes.
    let opts = GroupOptions {
        receiver: tribes::transport::ReceiverConfig {
            max_body_size: 1024 * 1024,
            max_partial_bytes: 1536 * 1024,
            ..Default::default()
        },
        ..GroupOptions::fast_failing()
    };
    let g = static_group(2, &opts).unwrap();
    let addr = g[0].local_member().addr();
    let begin = |body: usize| {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut head = b"FLT2002".to_vec();
        head.extend_from_slice(&(1024 * 1024i32).to_be_bytes());
        s.write_all(&head).unwrap();
        s.write_all(&vec![0u8; body]).unwrap();
        s
    };
    let small = begin(600 * 1024);
    let stats = g[0].receiver_stats().unwrap();
    assert!(wait_until(Duration::from_secs(3), || {
        stats.accepted.load(Ordering::Relaxed) >= 2
    }));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stats.partial_closed.load(Ordering::Relaxed), 0);
    // 600 + 1000 KiB > 1536 KiB: the one holding more goes.
    let large = begin(1000 * 1024);
    expect_closed(large);
    assert_eq!(stats.partial_closed.load(Ordering::Relaxed), 1);
    // The other keeps its place, and the node keeps serving.
    small
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 8];
    let err = (&small).read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    let to = [g[0].local_member()];
    g[1].send(&to, &b"x"[..], SendOptions::USE_ACK).unwrap();
}
