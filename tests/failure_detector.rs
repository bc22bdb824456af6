//! TcpFailureDetector (issue #4): membership changes from below are verified by TCP before
//! they reach the application. The test puts an injector below the detector to play the
//! membership layer, so it can "lose beacons" at will.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tribes::interceptors::{
    FailureDetectorConfig, Interceptor, MessageDispatchInterceptor, StackHandle,
    TcpFailureDetector, PROBE_PAYLOAD,
};
use tribes::{ChannelError, ChannelMessage, GroupChannel, Levels, Member, SendOptions, UniqueId};
use tribes_suite::{static_group, wait_until, ClosedPort, GroupOptions, HangingPort};

/// Plays the membership service: raises events from its position in the stack.
#[derive(Default)]
struct Injector(Mutex<Option<StackHandle>>);

impl Injector {
    fn added(&self, m: &Member) {
        self.0.lock().as_ref().unwrap().member_added(m.clone());
    }
    fn gone(&self, m: &Member) {
        self.0
            .lock()
            .as_ref()
            .unwrap()
            .member_disappeared(m.clone());
    }
}

impl Interceptor for Injector {
    fn name(&self) -> &'static str {
        "injector"
    }
    fn start(&self, _: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        *self.0.lock() = Some(handle.clone());
        Ok(())
    }
}

fn detector_channel() -> (GroupChannel, Arc<TcpFailureDetector>, Arc<Injector>) {
    let fd = Arc::new(TcpFailureDetector::new(FailureDetectorConfig {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    }));
    let inj = Arc::new(Injector::default());
    let ch = GroupChannel::builder()
        .name("fd")
        .port(0)
        .heartbeat_interval(None)
        .interceptor_arc(fd.clone())
        .interceptor_arc(inj.clone())
        .build()
        .unwrap();
    ch.start(Levels::DEFAULT).unwrap();
    (ch, fd, inj)
}

fn plain_node(name: &str) -> GroupChannel {
    let ch = GroupChannel::builder()
        .name(name)
        .port(0)
        .heartbeat_interval(None)
        .build()
        .unwrap();
    ch.start(Levels::DEFAULT).unwrap();
    ch
}

#[test]
fn a_member_whose_beacons_are_lost_but_whose_port_answers_is_kept() {
    let (a, fd, inj) = detector_channel();
    let b = plain_node("b");
    let probes = Arc::new(Mutex::new(0usize));
    let p2 = Arc::clone(&probes);
    // b has no detector: it sees the probe as an ordinary byte message, proving one was sent
    // byte-exact.
    b.add_channel_listener(move |m: &ChannelMessage| {
        if m.payload[..] == PROBE_PAYLOAD[..] {
            *p2.lock() += 1;
        }
        Ok(())
    });
    let bm = b.local_member();
    inj.added(&bm);
    assert!(
        wait_until(Duration::from_secs(3), || a.members().contains(&bm)),
        "verified and added"
    );
    // Beacons lost: the layer below says b is gone, but its receiver answers.
    inj.gone(&bm);
    assert!(wait_until(Duration::from_secs(3), || fd
        .remove_suspects()
        .contains(&bm)));
    assert!(a.members().contains(&bm), "b kept");
    assert!(
        wait_until(Duration::from_secs(3), || *probes.lock() >= 2),
        "probe messages arrived"
    );
    // Beacons come back: no longer a suspect, no duplicate event.
    inj.added(&bm);
    assert!(fd.remove_suspects().is_empty());
    assert_eq!(a.members().len(), 1);
    // Now b really dies: the next report removes it after a failed probe.
    b.stop(Levels::ALL).unwrap();
    inj.gone(&bm);
    assert!(wait_until(Duration::from_secs(3), || !a
        .members()
        .contains(&bm)));
}

#[test]
fn an_unreachable_new_member_is_not_reported_and_probes_do_not_block_events() {
    let (a, _fd, inj) = detector_channel();
    // Twenty members that do not exist. Ten refuse connections; their ports are held without
    // a listener, so no parallel test can start answering on one. Ten drop them, so a probe
    // hangs for the whole 300 ms connect timeout: raising their events in a blocking way
    // would take seconds.
    let closed: Vec<ClosedPort> = (0..10).map(|_| ClosedPort::new().unwrap()).collect();
    let hanging: Vec<HangingPort> = (0..10).map(|_| HangingPort::new().unwrap()).collect();
    let dead: Vec<Member> = closed
        .iter()
        .map(ClosedPort::addr)
        .chain(hanging.iter().map(HangingPort::addr))
        .map(|addr| Member::with_id(addr, UniqueId::random()))
        .collect();
    let b = plain_node("b2");
    let start = Instant::now();
    for d in &dead {
        inj.added(d);
    }
    inj.added(&b.local_member());
    // Raising events never waits for a probe (one hanging probe alone takes 300 ms).
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    // Four probe threads work through the hanging probes first: about 0.9 s.
    assert!(wait_until(Duration::from_secs(10), || a
        .members()
        .contains(&b.local_member())));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(a.members().len(), 1, "only the live member was reported");
}

#[test]
fn a_shutdown_notice_removes_without_probing() {
    let (a, _fd, inj) = detector_channel();
    let b = plain_node("b3");
    let mut bm = b.local_member();
    inj.added(&bm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&bm)));
    bm.command = bytes::Bytes::from_static(tribes::member::SHUTDOWN_COMMAND);
    inj.gone(&bm);
    // Immediate, even though b's port still answers.
    assert!(!a.members().contains(&bm));
}

#[test]
fn pings_reach_members_but_never_their_applications() {
    use tribes::interceptors::TcpPingInterceptor;
    let opts = GroupOptions {
        heartbeat: None,
        extra: Some(Arc::new(|_| {
            vec![Arc::new(TcpPingInterceptor::new()) as Arc<dyn Interceptor>]
        })),
        ..GroupOptions::default()
    };
    let chans = static_group(2, &opts).unwrap();
    let seen = Arc::new(Mutex::new(0usize));
    let s2 = Arc::clone(&seen);
    chans[1].add_channel_listener(move |_: &ChannelMessage| {
        *s2.lock() += 1;
        Ok(())
    });
    let rx = chans[1].receiver_stats().unwrap();
    let before = rx.messages.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..5 {
        chans[0].heartbeat();
    }
    assert!(wait_until(Duration::from_secs(3), || rx
        .messages
        .load(std::sync::atomic::Ordering::Relaxed)
        >= before + 5));
    assert_eq!(*seen.lock(), 0, "pings are swallowed below the application");
}

#[test]
fn a_ping_with_a_detector_is_a_forced_check_that_removes_a_dead_member() {
    use tribes::interceptors::TcpPingInterceptor;
    let fd = Arc::new(TcpFailureDetector::new(FailureDetectorConfig {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    }));
    let inj = Arc::new(Injector::default());
    let a = GroupChannel::builder()
        .name("pa")
        .port(0)
        .heartbeat_interval(None)
        .interceptor(TcpPingInterceptor::new().with_detector(fd.clone()))
        .interceptor_arc(fd.clone())
        .interceptor_arc(inj.clone())
        .build()
        .unwrap();
    a.start(Levels::DEFAULT).unwrap();
    let c = plain_node("pc");
    let cm = c.local_member();
    inj.added(&cm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&cm)));
    // Alive: a forced check changes nothing (and makes no suspect).
    a.heartbeat();
    std::thread::sleep(Duration::from_millis(200));
    assert!(a.members().contains(&cm));
    assert!(fd.remove_suspects().is_empty());
    // Dead without any membership event: the next ping finds out.
    c.stop(Levels::ALL).unwrap();
    a.heartbeat();
    assert!(wait_until(Duration::from_secs(3), || !a
        .members()
        .contains(&cm)));
}

#[test]
fn static_members_are_verified_and_their_goodbye_removes_them_at_once() {
    let detectors: Vec<Arc<TcpFailureDetector>> = (0..3)
        .map(|_| Arc::new(TcpFailureDetector::default()))
        .collect();
    let d = detectors.clone();
    let opts = GroupOptions {
        heartbeat: None,
        extra: Some(Arc::new(
            move |i| vec![d[i].clone() as Arc<dyn Interceptor>],
        )),
        ..GroupOptions::default()
    };
    let g = static_group(3, &opts).unwrap();
    // The static interceptor raises its members below the detector, which verifies them by
    // TCP before the application hears of them.
    for (ch, fd) in g.iter().zip(&detectors) {
        assert!(ch.wait_for_members(2, Duration::from_secs(3)));
        assert_eq!(fd.members().len(), 2);
    }
    // A stopped node says goodbye (the Tribes notice): removed at once, no probe needed.
    let gone = g[2].local_member();
    let start = Instant::now();
    g[2].stop(Levels::ALL).unwrap();
    assert!(wait_until(Duration::from_secs(2), || !g[0]
        .members()
        .contains(&gone)
        && !g[1].members().contains(&gone)));
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[test]
fn a_member_that_dies_silently_is_removed_after_a_failed_asynchronous_send() {
    // The dispatch threads write asynchronous messages in batches, so the detector's `send`
    // only sees them queued; the failures reach it afterwards (`sends_failed`). Before that,
    // a member killed without a goodbye stayed a member for good under static membership,
    // and every asynchronous send to it failed.
    let fd = Arc::new(TcpFailureDetector::new(FailureDetectorConfig {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    }));
    let inj = Arc::new(Injector::default());
    let a = GroupChannel::builder()
        .name("fd-async")
        .port(0)
        .heartbeat_interval(None)
        .interceptor(MessageDispatchInterceptor::default())
        .interceptor_arc(fd.clone())
        .interceptor_arc(inj.clone())
        .build()
        .unwrap();
    a.start(Levels::DEFAULT).unwrap();
    let b = plain_node("b-async");
    let bm = b.local_member();
    inj.added(&bm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&bm)));
    // b's process dies: no goodbye, its port refuses connections from now on (held, so
    // no parallel test's listener can take it and answer the probe).
    b.stop(Levels::ALL).unwrap();
    drop(b);
    let Ok(_dead) = ClosedPort::at(bm.addr()) else {
        eprintln!("skipped: another socket took b's port the moment it closed");
        return;
    };
    let removed = wait_until(Duration::from_secs(5), || {
        let _ = a.send(
            std::slice::from_ref(&bm),
            &b"x"[..],
            SendOptions::ASYNCHRONOUS,
        );
        std::thread::sleep(Duration::from_millis(50));
        !a.members().contains(&bm)
    });
    assert!(
        removed,
        "the failed asynchronous sends got b checked and removed"
    );
    a.stop(Levels::ALL).unwrap();
}

#[test]
fn static_members_that_answer_are_members_when_start_returns() {
    // A session manager asks its members for state right after start; before, the
    // detector's first probes ran after `start` had returned, and a node could find nobody
    // and start empty although its peer was up.
    let peers: Vec<GroupChannel> = (0..2).map(|i| plain_node(&format!("up{i}"))).collect();
    let up: Vec<Member> = peers.iter().map(GroupChannel::local_member).collect();
    let closed = ClosedPort::new().unwrap();
    let hanging = HangingPort::new().unwrap();
    let down = [
        Member::with_id(closed.addr(), UniqueId::random()),
        Member::with_id(hanging.addr(), UniqueId::random()),
    ];
    let all: Vec<Member> = up.iter().chain(&down).cloned().collect();
    let a = GroupChannel::builder()
        .name("fd-start")
        .port(0)
        .heartbeat_interval(None)
        // The hello notices at start wait for their connects too (in parallel).
        .sender(tribes::transport::SenderConfig {
            timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .interceptor(TcpFailureDetector::new(FailureDetectorConfig {
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        }))
        .interceptor(tribes::interceptors::StaticMembershipInterceptor::new(all))
        .build()
        .unwrap();
    let start = Instant::now();
    a.start(Levels::DEFAULT).unwrap();
    let took = start.elapsed();
    let mut members = a.members();
    members.sort_by_key(|m| m.port);
    let mut expected = up.clone();
    expected.sort_by_key(|m| m.port);
    assert_eq!(members, expected, "the live peers, and only they, at once");
    // The hanging peer holds start for its hello's connect timeout and its probe's, not
    // longer.
    assert!(took < Duration::from_millis(3000), "{took:?}");
    a.stop(Levels::ALL).unwrap();
}

#[test]
fn a_member_that_leaves_has_its_pooled_connections_closed() {
    use std::io::Read;
    // A stand-in member that accepts and reads whatever comes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let m = Member::with_id(listener.local_addr().unwrap(), UniqueId::random());
    let inj = Arc::new(Injector::default());
    let a = GroupChannel::builder()
        .name("leaves")
        .port(0)
        .heartbeat_interval(None)
        .interceptor_arc(inj.clone())
        .build()
        .unwrap();
    a.start(Levels::DEFAULT).unwrap();
    inj.added(&m);
    assert!(a.members().contains(&m));
    // A pooled connection to it (no ACK asked, so none is awaited).
    a.send(std::slice::from_ref(&m), &b"x"[..], SendOptions::empty())
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 256];
    assert!(conn.read(&mut buf).unwrap() > 0, "the message");
    // It leaves: the pool lets go of its connection, which the member sees closed.
    inj.gone(&m);
    assert!(!a.members().contains(&m));
    let closed = loop {
        match conn.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false, // still open after 3 s
        }
    };
    assert!(closed, "the connection to a member that left is closed");
    a.stop(Levels::ALL).unwrap();
}

#[test]
fn a_stopped_channel_forgets_its_members_and_a_restart_finds_them_afresh() {
    let b = plain_node("gone-later");
    let bm = b.local_member();
    let a = GroupChannel::builder()
        .name("restarts")
        .port(0)
        .heartbeat_interval(None)
        .interceptor(TcpFailureDetector::new(FailureDetectorConfig {
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        }))
        .interceptor(tribes::interceptors::StaticMembershipInterceptor::new(
            vec![bm.clone()],
        ))
        .build()
        .unwrap();
    a.start(Levels::DEFAULT).unwrap();
    assert_eq!(a.members(), vec![bm.clone()]);
    a.stop(Levels::ALL).unwrap();
    assert!(a.members().is_empty(), "stopped: no members");
    // B goes away while A is down; A's restart must not take it for a member.
    b.stop(Levels::ALL).unwrap();
    let Ok(_dead) = ClosedPort::at(bm.addr()) else {
        eprintln!("skipped: another socket took b's port the moment it closed");
        return;
    };
    a.start(Levels::DEFAULT).unwrap();
    assert!(!a.wait_for_members(1, Duration::from_millis(500)));
    assert!(a.members().is_empty());
    a.stop(Levels::ALL).unwrap();
}

#[test]
fn a_channel_that_was_never_started_does_not_send() {
    let b = plain_node("receiver");
    let a = GroupChannel::builder()
        .name("unstarted")
        .port(0)
        .build()
        .unwrap();
    let to = [b.local_member()];
    for options in [
        SendOptions::empty(),
        SendOptions::USE_ACK,
        SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        SendOptions::ASYNCHRONOUS,
    ] {
        assert!(
            matches!(
                a.send(&to, &b"x"[..], options),
                Err(tribes::SendError::NotStarted)
            ),
            "{options:?}"
        );
    }
}

/// A channel with a detector that runs the read test (short timeouts) above the injector,
/// and the sender timeout given.
fn read_test_channel(name: &str, send_timeout: Duration) -> (GroupChannel, Arc<Injector>) {
    read_test_node(name, Duration::from_millis(300), |b, _| {
        b.sender(tribes::transport::SenderConfig {
            timeout: send_timeout,
            ..Default::default()
        })
    })
}

/// A started channel without heartbeat thread whose detector runs the read test (connect
/// 0.3 s, read `read`) above an injector that plays the membership; `tune` sets up the rest
/// of the builder, and adds what goes above the detector (it gets the detector).
fn read_test_node(
    name: &str,
    read: Duration,
    tune: impl FnOnce(tribes::ChannelBuilder, &Arc<TcpFailureDetector>) -> tribes::ChannelBuilder,
) -> (GroupChannel, Arc<Injector>) {
    let fd = Arc::new(TcpFailureDetector::new(FailureDetectorConfig {
        connect_timeout: Duration::from_millis(300),
        perform_read_test: true,
        read_test_timeout: read,
        ..Default::default()
    }));
    let inj = Arc::new(Injector::default());
    let builder = GroupChannel::builder()
        .name(name)
        .port(0)
        .heartbeat_interval(None);
    let ch = tune(builder, &fd)
        .interceptor_arc(fd)
        .interceptor_arc(inj.clone())
        .build()
        .unwrap();
    ch.start(Levels::DEFAULT).unwrap();
    (ch, inj)
}

/// A plain node behind a relay that can freeze it, and the member at the relay's address.
fn freezable_node(name: &str) -> (GroupChannel, tribes_suite::FreezableRelay, Member) {
    let node = plain_node(name);
    let relay = tribes_suite::FreezableRelay::start(node.local_member().addr()).unwrap();
    let member = Member::with_id(relay.addr(), UniqueId::random());
    (node, relay, member)
}

/// Runs `a`'s heartbeat every 50 ms until `m` is a member (true) or `within` passed.
fn member_after_heartbeats(a: &GroupChannel, m: &Member, within: Duration) -> bool {
    wait_until(within, || {
        a.heartbeat();
        std::thread::sleep(Duration::from_millis(50));
        a.members().contains(m)
    })
}

#[test]
fn the_read_test_tells_a_frozen_member_from_a_live_one() {
    // A stopped process's kernel still accepts connections and buffers the probe, so the
    // send test takes it for alive; only the read test's missing ACK gives it away.
    let (a, inj) = read_test_channel("fd-read", Duration::from_secs(3));
    let (plain, plain_fd, plain_inj) = detector_channel();
    let b = plain_node("b-read");
    let bm = b.local_member();
    let relay = tribes_suite::FreezableRelay::start(bm.addr()).unwrap();
    relay.set_frozen(true);
    let frozen = Member::with_id(relay.addr(), UniqueId::random());
    for i in [&inj, &plain_inj] {
        i.added(&bm);
        i.added(&frozen);
    }
    // A live member answers the read test (its receiver ACKs the probe; a probe slowed
    // past its 0.3 s by a loaded machine is tried again on the next heartbeat).
    assert!(member_after_heartbeats(&a, &bm, Duration::from_secs(5)));
    // The send test alone lets the frozen one in.
    assert!(wait_until(Duration::from_secs(3), || plain
        .members()
        .contains(&frozen)));
    assert_eq!(plain_fd.members().len(), 2);
    // The read test does not, however long it is given (its probe took 0.3 s).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        a.members(),
        vec![bm.clone()],
        "the frozen member was let in"
    );
    // Thawed, it answers the probe of the next heartbeat.
    relay.set_frozen(false);
    assert!(member_after_heartbeats(&a, &frozen, Duration::from_secs(5)));
    a.stop(Levels::ALL).unwrap();
    plain.stop(Levels::ALL).unwrap();
}

#[test]
fn a_member_that_freezes_is_removed_after_a_failed_send_and_back_when_it_thaws() {
    // Static (or DNS) membership keeps listing a member that froze, and would never report
    // it again: the detector reports it gone after the failed send, looks for it on every
    // heartbeat, and reports it added once it answers, without a restart of either side.
    let (a, inj) = read_test_channel("fd-freeze", Duration::from_millis(800));
    let (b, relay, bm) = freezable_node("b-freeze");
    let delivered = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let d = Arc::clone(&delivered);
    b.add_channel_listener(move |m: &ChannelMessage| {
        if m.payload[..] != PROBE_PAYLOAD[..] {
            d.lock().push(m.payload.to_vec());
        }
        Ok(())
    });
    inj.added(&bm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&bm)));
    a.send(
        std::slice::from_ref(&bm),
        &b"before"[..],
        SendOptions::USE_ACK,
    )
    .expect("delivered while b runs");
    relay.set_frozen(true);
    let failed = a.send(
        std::slice::from_ref(&bm),
        &b"frozen"[..],
        SendOptions::USE_ACK,
    );
    assert!(failed.is_err(), "no ACK from a frozen member");
    assert!(
        wait_until(Duration::from_secs(3), || !a.members().contains(&bm)),
        "the failed send got b probed, and the read test found it frozen"
    );
    // Still frozen: heartbeats look for it but do not let it back.
    for _ in 0..3 {
        a.heartbeat();
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(!a.members().contains(&bm));
    relay.set_frozen(false);
    assert!(
        member_after_heartbeats(&a, &bm, Duration::from_secs(5)),
        "b answers again and is a member again"
    );
    a.send(
        std::slice::from_ref(&bm),
        &b"after"[..],
        SendOptions::USE_ACK,
    )
    .expect("delivered once b is back");
    // What b got: the message sent before, the one that waited in the relay, and the one
    // after (the probes are not messages to the application).
    assert!(wait_until(Duration::from_secs(3), || delivered
        .lock()
        .len()
        >= 3));
    let got = delivered.lock().clone();
    assert_eq!(got.first().map(Vec::as_slice), Some(&b"before"[..]));
    assert_eq!(got.last().map(Vec::as_slice), Some(&b"after"[..]));
    a.stop(Levels::ALL).unwrap();
    b.stop(Levels::ALL).unwrap();
}

/// The layer below (multicast) reports a frozen member gone while the probe of a failed
/// send still waits for its ACK. An early version kept looking for it, and once something
/// answered at its address again, the heartbeat brought back a member the layer below no
/// longer lists (and would never report gone again).
#[test]
fn a_member_reported_gone_below_during_the_read_test_is_not_brought_back() {
    let (a, inj) = read_test_channel("fd-ghost", Duration::from_millis(800));
    let (b, relay, bm) = freezable_node("b-ghost");
    inj.added(&bm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&bm)));
    relay.set_frozen(true);
    let failed = a.send(std::slice::from_ref(&bm), &b"x"[..], SendOptions::USE_ACK);
    assert!(failed.is_err());
    // Multicast's drop time passes while the SendFailed probe waits for the ACK.
    inj.gone(&bm);
    assert!(wait_until(Duration::from_secs(3), || !a
        .members()
        .contains(&bm)));
    std::thread::sleep(Duration::from_millis(800)); // both probes settled
    relay.set_frozen(false);
    let ghost = member_after_heartbeats(&a, &bm, Duration::from_secs(3));
    assert!(!ghost, "re-added a member the layer below reported gone");
    a.stop(Levels::ALL).unwrap();
    b.stop(Levels::ALL).unwrap();
}

#[test]
fn a_frozen_member_wanted_again_while_probed_is_back_as_soon_as_it_thaws() {
    // The read test keeps a probe of a frozen member waiting (here 2 s). A heartbeat that
    // comes due meanwhile used to be lost, so a member that thawed between probes came
    // back only a heartbeat later; now the probe runs again at once when it fails, and the
    // member is back the moment it answers.
    let (a, inj) = read_test_node("fd-again", Duration::from_secs(2), |b, _| b);
    let (b, relay, bm) = freezable_node("b-again");
    relay.set_frozen(true);
    // Listed below, frozen: its first probe fails after 2 s.
    inj.added(&bm);
    std::thread::sleep(Duration::from_millis(2300));
    assert!(a.members().is_empty());
    // A heartbeat starts a probe; another comes while it waits.
    a.heartbeat();
    std::thread::sleep(Duration::from_millis(500));
    a.heartbeat();
    // The first fails (2 s after it started) and the next starts at once; it thaws in the
    // middle of that one. No heartbeat from here on.
    std::thread::sleep(Duration::from_millis(2500));
    relay.set_frozen(false);
    assert!(
        wait_until(Duration::from_millis(2500), || a.members().contains(&bm)),
        "back without waiting for another heartbeat"
    );
    a.stop(Levels::ALL).unwrap();
    b.stop(Levels::ALL).unwrap();
}

/// One handler's outcome: which message, how its send ended, and when.
type Outcome = (String, Result<(), tribes::SendError>, Instant);

/// What asynchronous sends' handlers heard, in order.
#[derive(Default)]
struct Outcomes(Mutex<Vec<Outcome>>);

struct Named(&'static str, Arc<Outcomes>);

impl tribes::interceptors::ErrorHandler for Named {
    fn handle_completion(&self, _: UniqueId) {
        (self.1 .0.lock()).push((self.0.into(), Ok(()), Instant::now()));
    }
    fn handle_error(&self, e: tribes::SendError, _: UniqueId) {
        (self.1 .0.lock()).push((self.0.into(), Err(e), Instant::now()));
    }
}

#[test]
fn a_message_queued_before_its_member_left_is_not_sent_to_it() {
    // A frozen member holds the dispatch thread for the send timeout (3 s) on the first
    // message; the next waits in the queue meanwhile. Once the member is reported gone,
    // that next message used to go out to it anyway (a new connection, which a frozen
    // process's kernel still accepts) and hold the thread for another send timeout.
    let (a, inj) = read_test_node("fd-left", Duration::from_millis(200), |b, _| {
        let dispatch = tribes::interceptors::DispatchConfig {
            threads: 1,
            ..Default::default()
        };
        b.sender(tribes::transport::SenderConfig {
            timeout: Duration::from_secs(3),
            ..Default::default()
        })
        .interceptor(MessageDispatchInterceptor::new(dispatch))
    });
    let (b, relay, bm) = freezable_node("b-left");
    inj.added(&bm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&bm)));
    relay.set_frozen(true);
    let outcomes = Arc::new(Outcomes::default());
    let opts = SendOptions::ASYNCHRONOUS | SendOptions::USE_ACK;
    let to = std::slice::from_ref(&bm);
    for name in ["first", "queued"] {
        let handler = Arc::new(Named(name, Arc::clone(&outcomes)));
        a.send_with_handler(to, &b"x"[..], opts, handler).unwrap();
        // The dispatch thread takes the first (and waits for its ACK) before the second
        // is queued.
        std::thread::sleep(Duration::from_millis(50));
    }
    // The membership below loses it (multicast's drop time); the read test confirms.
    std::thread::sleep(Duration::from_millis(50));
    inj.gone(&bm);
    assert!(wait_until(Duration::from_secs(3), || !a
        .members()
        .contains(&bm)));
    assert!(wait_until(Duration::from_secs(5), || outcomes
        .0
        .lock()
        .len()
        == 2));
    let got = outcomes.0.lock();
    let failure = |i: usize| match &got[i].1 {
        Err(tribes::SendError::Faulty(v)) => v[0].failure.clone(),
        other => panic!("{}: {other:?}", got[i].0),
    };
    // The first was under way (its connection is closed when the member leaves, or it
    // times out).
    assert_eq!(got[0].0, "first");
    assert!(got[0].1.is_err());
    assert_eq!(got[1].0, "queued");
    assert_eq!(
        failure(1),
        tribes::Failure::Left,
        "the queued one went out to it"
    );
    // Told at once when its turn came, not a send timeout later.
    assert!(got[1].2.duration_since(got[0].2) < Duration::from_secs(1));
    drop(got);
    a.stop(Levels::ALL).unwrap();
    b.stop(Levels::ALL).unwrap();
}

#[test]
fn a_member_that_froze_while_idle_is_found_by_the_heartbeat_check() {
    // Nothing is sent to it, so no send fails: only the ping's forced check, with the read
    // test, finds it (what `ha::Cluster::failure_detection` sets up).
    let (a, inj) = read_test_node("fd-idle", Duration::from_millis(300), |b, fd| {
        b.interceptor(tribes::interceptors::TcpPingInterceptor::new().with_detector(fd.clone()))
    });
    let (b, relay, bm) = freezable_node("b-idle");
    inj.added(&bm);
    assert!(wait_until(Duration::from_secs(3), || a
        .members()
        .contains(&bm)));
    a.heartbeat();
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.members().contains(&bm), "a live member passes the check");
    relay.set_frozen(true);
    a.heartbeat();
    assert!(
        wait_until(Duration::from_secs(3), || !a.members().contains(&bm)),
        "the heartbeat's check found it frozen"
    );
    relay.set_frozen(false);
    assert!(member_after_heartbeats(&a, &bm, Duration::from_secs(3)));
    a.stop(Levels::ALL).unwrap();
    b.stop(Levels::ALL).unwrap();
}

#[test]
fn stop_returns_while_a_listed_member_stays_frozen() {
    // A probe of a frozen member wanted again (every heartbeat wants it) used to run again
    // on the same thread, for as long as the member stayed frozen: `stop` joined that
    // thread and hung, and the thread took no other probe meanwhile.
    let (a, inj) = read_test_node("fd-stop", Duration::from_millis(500), |b, _| {
        b.heartbeat_interval(Some(Duration::from_millis(200)))
    });
    let a = Arc::new(a);
    let (b, relay, bm) = freezable_node("b-stop");
    relay.set_frozen(true);
    inj.added(&bm);
    std::thread::sleep(Duration::from_millis(1500));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let a2 = Arc::clone(&a);
    let t0 = Instant::now();
    std::thread::spawn(move || {
        a2.stop(Levels::ALL).unwrap();
        let _ = tx.send(());
    });
    let stopped = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    relay.set_frozen(false);
    assert!(
        stopped,
        "stop() hung while a listed member stayed frozen ({:?})",
        t0.elapsed()
    );
    b.stop(Levels::ALL).unwrap();
}
