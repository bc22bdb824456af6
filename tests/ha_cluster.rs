//! Session replication on loopback (issue #5): the Tomcat cluster HOW-TO scenario and two
//! nodes starting at the same moment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ha::{Cluster, DeltaManager, SessionId};
use tribes_suite::{free_port, ha_node, wait_until};

struct Node {
    cluster: Cluster,
    manager: Arc<DeltaManager>,
}

fn node(port: u16, peers: &[u16]) -> Node {
    node_with_route(port, peers, None)
}

fn node_with_route(port: u16, peers: &[u16], route: Option<&str>) -> Node {
    let (cluster, manager) = ha_node(port, peers, route).unwrap();
    Node { cluster, manager }
}

/// Two nodes that list each other, both members and both managers started.
fn started_pair() -> (Node, Node) {
    let (pa, pb) = (free_port(), free_port());
    let (a, b) = (node(pa, &[pb]), node(pb, &[pa]));
    for n in [&a, &b] {
        assert!(n
            .cluster
            .channel()
            .wait_for_members(1, Duration::from_secs(5)));
        assert!(n.manager.start(&n.cluster));
    }
    (a, b)
}

fn counter(n: &Node, id: &SessionId) -> Option<u32> {
    n.manager.session(id)?.get::<u32>("counter").unwrap()
}

fn bump(n: &Node, id: &SessionId) -> u32 {
    let v = n
        .manager
        .with_session(id, |s| {
            let v = s.get::<u32>("counter").unwrap().unwrap_or(0) + 1;
            s.insert("counter", &v).unwrap();
            v
        })
        .expect("session present");
    n.manager.request_completed(id).unwrap();
    v
}

#[test]
fn howto_scenario_state_transfer_failover_restart_invalidate_expire() {
    let (pa, pb) = (free_port(), free_port());
    // A starts alone.
    let a = node(pa, &[pb]);
    assert!(a.manager.start(&a.cluster));
    let s1 = a.manager.create_session().unwrap();
    assert_eq!(bump(&a, &s1), 1);

    // B starts and pulls A's sessions.
    let b = node(pb, &[pa]);
    assert!(b
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(b.manager.start(&b.cluster), "state transfer from A");
    assert_eq!(counter(&b, &s1), Some(1));
    assert!(a
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));

    // A change on A is readable on B (synchronous replication: applied when it returns).
    assert_eq!(bump(&a, &s1), 2);
    assert_eq!(counter(&b, &s1), Some(2));

    // A goes away; B serves the session.
    a.cluster.stop().unwrap();
    drop(a);
    assert!(wait_until(Duration::from_secs(5), || b
        .cluster
        .channel()
        .members()
        .is_empty()));
    assert_eq!(bump(&b, &s1), 3);

    // A comes back (same port, new process identity) and pulls the state from B.
    let a = node(pa, &[pb]);
    assert!(a
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(a.manager.start(&a.cluster));
    assert_eq!(counter(&a, &s1), Some(3));
    assert!(b
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));

    // Invalidate on A expires the copy on B.
    a.manager.invalidate(&s1);
    assert!(b.manager.session(&s1).is_none());

    // An idle session expires on both.
    let s2 = a.manager.create_session().unwrap();
    a.manager.with_session(&s2, |s| s.set_max_inactive_secs(1));
    a.manager.request_completed(&s2).unwrap();
    assert_eq!(b.manager.session(&s2).unwrap().max_inactive_secs(), 1);
    let later = ha_now() + 1_500;
    assert_eq!(a.manager.expire(later), vec![s2.clone()]);
    assert!(b.manager.session(&s2).is_none(), "expiry replicated");

    // The restarted A's counters: one state request, one session made and two gone
    // (invalidated, expired), each replicated.
    let sa = a.manager.stats();
    assert_eq!(sa.sent.get_all_sessions, 1);
    assert_eq!(sa.received.transfer_complete, 1);
    assert!(sa.received.all_session_data >= 1);
    assert_eq!((sa.sessions_created, sa.sessions_expired), (1, 2), "{sa:?}");
    assert_eq!((sa.sent.created, sa.sent.delta, sa.sent.expired), (1, 1, 2));
    assert_eq!((sa.state_transfers_failed, sa.send_errors), (0, 0));
    assert_eq!(sa.active, 0);
    // B: asked A for the state at its start and answered the restarted A; while alone it
    // sent nothing (its bump of s1 had no member to go to).
    let sb = b.manager.stats();
    assert_eq!(
        (sb.sent.get_all_sessions, sb.received.get_all_sessions),
        (1, 1)
    );
    assert_eq!(sb.sent.transfer_complete, 1);
    assert_eq!(sb.sent.delta, 0, "{sb:?}");
    assert_eq!(sb.received.expired, 2);
    assert_eq!(
        sb.received.delta, 2,
        "A's bump of s1 before it died, and s2's"
    );
    assert_eq!(sb.max_active, 1, "s1 was gone before s2 came");
    assert_eq!(sb.store.stale, 0);
}

fn ha_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn two_nodes_starting_together_both_end_with_every_session() {
    let (pc, pd) = (free_port(), free_port());
    let c = node(pc, &[pd]);
    let d = node(pd, &[pc]);
    assert!(c
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(d
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    // Both ask each other for state at the same moment; neither may stall.
    let start = Instant::now();
    std::thread::scope(|s| {
        let hc = s.spawn(|| c.manager.start(&c.cluster));
        let hd = s.spawn(|| d.manager.start(&d.cluster));
        assert!(hc.join().unwrap());
        assert!(hd.join().unwrap());
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let mut ids = Vec::new();
    for n in [&c, &d] {
        for _ in 0..20 {
            let id = n.manager.create_session().unwrap();
            bump(n, &id);
            ids.push(id);
        }
    }
    for n in [&c, &d] {
        assert_eq!(n.manager.len(), 40);
        for id in &ids {
            assert_eq!(counter(n, id), Some(1));
        }
    }
}

/// Two nodes joining at the same moment next to a node that holds sessions. With static
/// members a joiner may ask the other joiner first (members are listed in the order they
/// were heard, not oldest first); that one is still receiving its own state and says so,
/// and the asker goes on to the node that has the sessions. Both end with all of them.
#[test]
fn two_nodes_joining_together_both_get_the_sessions_of_the_node_already_up() {
    let (pa, px, py) = (free_port(), free_port(), free_port());
    let a = node(pa, &[px, py]);
    assert!(a.manager.start(&a.cluster));
    let ids: Vec<SessionId> = (0..5)
        .map(|_| {
            let id = a.manager.create_session().unwrap();
            bump(&a, &id);
            id
        })
        .collect();
    // Each joiner lists the other one first.
    let x = node(px, &[py, pa]);
    let y = node(py, &[px, pa]);
    for n in [&x, &y] {
        assert!(n
            .cluster
            .channel()
            .wait_for_members(2, Duration::from_secs(5)));
    }
    std::thread::scope(|s| {
        let hx = s.spawn(|| x.manager.start(&x.cluster));
        let hy = s.spawn(|| y.manager.start(&y.cluster));
        assert!(hx.join().unwrap());
        assert!(hy.join().unwrap());
    });
    for n in [&x, &y] {
        for id in &ids {
            assert_eq!(counter(n, id), Some(1), "a joiner is missing {id}");
        }
    }
    for n in [a, x, y] {
        n.cluster.stop().unwrap();
    }
}

#[test]
fn route_rebinding_moves_the_session_to_the_surviving_node() {
    let (pa, pb) = (free_port(), free_port());
    let a = node_with_route(pa, &[pb], Some("a"));
    let b = node_with_route(pb, &[pa], Some("b"));
    assert!(a
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(b
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    a.manager.start(&a.cluster);
    b.manager.start(&b.cluster);
    let id = a.manager.create_session().unwrap();
    assert_eq!(id.route(), Some("a"));
    assert_eq!(bump(&a, &id), 1);
    // A dies; the sticky balancer sends the client (cookie "<id>.a") to B.
    a.cluster.stop().unwrap();
    drop(a);
    let new_id = b.manager.rebind(&id).expect("rebound");
    assert_eq!(new_id.route(), Some("b"));
    assert_eq!(new_id.base(), id.base());
    assert!(b.manager.session(&id).is_none());
    assert_eq!(
        counter(&b, &new_id),
        Some(1),
        "session intact under the new id"
    );
    assert_eq!(bump(&b, &new_id), 2);
    // Same route: nothing to do.
    assert_eq!(b.manager.rebind(&new_id), None);
    // A second request with the old cookie is re-pointed without another rename.
    assert_eq!(b.manager.rebind(&id), Some(new_id));
}

#[test]
fn attribute_filter_and_expire_on_shutdown() {
    let cfg = ha::ManagerConfig {
        attribute_filter: Some(Arc::new(|name: &str| !name.starts_with("local."))),
        expire_sessions_on_shutdown: true,
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(_ca, ma), (_cb, mb)] = tribes_suite::started_ha_pair([cfg.clone(), cfg]).unwrap();
    let id = ma.create_session().unwrap();
    ma.with_session(&id, |s| {
        s.insert("shared", &1u8).unwrap();
        s.insert("local.cache", &2u8).unwrap();
    });
    ma.request_completed(&id).unwrap();
    let copy = mb.session(&id).unwrap();
    assert_eq!(copy.get::<u8>("shared").unwrap(), Some(1));
    assert_eq!(copy.get::<u8>("local.cache").unwrap(), None, "filtered out");
    // A's manager stops with expire-on-shutdown: its primaries go everywhere.
    ma.stop();
    assert!(ma.is_empty());
    assert!(mb.session(&id).is_none());
}

#[test]
fn stopping_the_cluster_stops_its_managers() {
    let cfg = ha::ManagerConfig {
        expire_sessions_on_shutdown: true,
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (_cb, mb)] = tribes_suite::started_ha_pair([cfg.clone(), cfg]).unwrap();
    let id = ma.create_session().unwrap();
    ma.with_session(&id, |s| s.insert("n", &1u8).unwrap());
    ma.request_completed(&id).unwrap();
    assert!(mb.session(&id).is_some());
    // The app's shutdown calls `Cluster::stop` only (as the README's node does).
    ca.stop().unwrap();
    assert!(ma.is_empty());
    assert!(mb.session(&id).is_none(), "expired everywhere on shutdown");
}

/// A cluster with Tribes' defaults over multicast `port` (loopback, TTL 0, beacons every
/// `frequency`), with one started channel and a registered manager, not yet started.
fn multicast_node(
    port: u16,
    frequency: Duration,
    cfg: ha::ManagerConfig,
) -> (Cluster, Arc<DeltaManager>) {
    let mcast = tribes::membership::McastConfig {
        port,
        frequency,
        drop_time: frequency * 6,
        ttl: Some(0),
        ..tribes::membership::McastConfig::default()
    };
    let c = Cluster::with_defaults(
        tribes::GroupChannel::builder()
            .port(0)
            .heartbeat_interval(None)
            .multicast(mcast),
    )
    .unwrap();
    let m = DeltaManager::new("/", cfg);
    c.register(&m).unwrap();
    c.start().unwrap();
    (c, m)
}

#[test]
fn a_cluster_with_tribes_defaults_replicates_over_multicast() {
    let port = 47500 + (std::process::id() % 400) as u16;
    let sync = ha::ManagerConfig {
        sync: true,
        ..Default::default()
    };
    let make = || multicast_node(port, Duration::from_millis(100), sync.clone());
    let (ca, ma) = make();
    let (cb, mb) = make();
    assert!(ca.channel().wait_for_members(1, Duration::from_secs(5)));
    assert!(cb.channel().wait_for_members(1, Duration::from_secs(5)));
    ma.start(&ca);
    mb.start(&cb);
    let id = ma.create_session().unwrap();
    ma.with_session(&id, |s| s.insert("k", &7u8).unwrap());
    ma.request_completed(&id).unwrap();
    assert_eq!(mb.session(&id).unwrap().get::<u8>("k").unwrap(), Some(7));
}

#[test]
fn a_request_for_an_unknown_session_asks_the_cluster() {
    let (pa, pb) = (free_port(), free_port());
    // A lists no member, so what it creates stays on A; B lists A.
    let a = node(pa, &[]);
    assert!(a.manager.start(&a.cluster));
    let b = node(pb, &[pa]);
    assert!(b
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(b.manager.start(&b.cluster), "state transfer (empty) from A");
    let s = a.manager.create_session().unwrap();
    assert_eq!(bump(&a, &s), 1);
    assert!(!b.manager.knows(&s), "A did not replicate to B");

    assert!(b.manager.fetch(&s));
    assert_eq!(counter(&b, &s), Some(1));
    assert!(!b.manager.session(&s).unwrap().is_primary());
    assert_eq!(bump(&b, &s), 2, "B carries on from A's state");

    let unknown = SessionId::new("0123456789abcdef0123456789abcdef");
    assert!(!b.manager.fetch(&unknown));
    let st = b.manager.stats();
    assert_eq!((st.sessions_fetched, st.fetch_misses), (1, 1), "{st:?}");
    assert_eq!((st.sent.get_session, st.received.session_data), (2, 1));
    assert_eq!(a.manager.stats().sent.session_data, 1);
}

#[test]
fn fetching_can_be_switched_off() {
    let (pa, pb) = (free_port(), free_port());
    let a = node(pa, &[]);
    assert!(a.manager.start(&a.cluster));
    let (cluster, manager) = tribes_suite::ha_node_with(
        pb,
        &[pa],
        ha::ManagerConfig {
            max_concurrent_fetches: 0,
            sync: true,
            ..ha::ManagerConfig::default()
        },
    )
    .unwrap();
    assert!(cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(manager.start(&cluster));
    let s = a.manager.create_session().unwrap();
    assert!(!manager.fetch(&s));
    assert_eq!(manager.stats().sent.get_session, 0);
    assert_eq!(a.manager.stats().received.get_session, 0);
}

#[test]
fn a_copy_left_behind_by_a_partial_replication_is_repaired() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    // A replicates only to B (as if A died after B and before C); B and C see everyone.
    // A starts first, so the others find it up when they check their static members.
    let a = node(pa, &[pb]);
    let b = node(pb, &[pa, pc]);
    let c = node(pc, &[pa, pb]);
    for n in [&a, &b, &c] {
        let want = if std::ptr::eq(n, &a) { 1 } else { 2 };
        assert!(n
            .cluster
            .channel()
            .wait_for_members(want, Duration::from_secs(5)));
    }
    for n in [&a, &b, &c] {
        assert!(n.manager.start(&n.cluster));
    }
    let s = b.manager.create_session().unwrap();
    assert_eq!(bump(&b, &s), 1);
    assert_eq!(counter(&c, &s), Some(1));
    // A's change also sets an attribute that later changes do not touch.
    a.manager
        .with_session(&s, |x| x.insert("cart", &"1 book").unwrap())
        .unwrap();
    assert_eq!(bump(&a, &s), 2, "A had the copy");
    assert_eq!(counter(&b, &s), Some(2));
    assert_eq!(counter(&c, &s), Some(1), "C missed A's change");

    // B serves the next request; what it replicates tells C its copy is behind, and C
    // fetches the session from B before B's request returns: C has the cart too.
    assert_eq!(bump(&b, &s), 3);
    assert_eq!(counter(&c, &s), Some(3));
    let cart = c
        .manager
        .session(&s)
        .unwrap()
        .get::<String>("cart")
        .unwrap();
    assert_eq!(cart.as_deref(), Some("1 book"));
    assert_eq!(c.manager.stats().copies_repaired, 1);
    assert_eq!(b.manager.stats().sent.session_data, 1);
}

#[test]
fn cluster_messages_reach_the_listeners_that_accept_them() {
    use ha::{ClusterListener, ClusterMessage};
    use parking_lot::Mutex;

    type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    struct Only(&'static str, Seen);
    impl ClusterListener for Only {
        fn accept(&self, msg: &ClusterMessage) -> bool {
            msg.kind == self.0
        }
        fn message_received(&self, msg: &ClusterMessage, _sender: &tribes::Member) {
            self.1.lock().push((msg.kind.clone(), msg.payload.to_vec()));
        }
    }

    let (a, b) = started_pair();
    let evicts = Arc::new(Mutex::new(Vec::new()));
    b.cluster
        .add_listener(Only("cache-evict", Arc::clone(&evicts)));
    let everything = Arc::new(Mutex::new(Vec::new()));
    let all = Arc::clone(&everything);
    b.cluster
        .add_listener(move |m: &ClusterMessage, _: &tribes::Member| {
            all.lock().push(m.kind.clone());
        });

    assert_eq!(
        a.cluster.send_options(),
        tribes::SendOptions::ASYNCHRONOUS,
        "Tribes' default"
    );
    let payload: Vec<u8> = (0..=255).collect();
    assert!(a
        .cluster
        .send(&ClusterMessage::new("cache-evict", payload.clone()), None)
        .unwrap());
    // Synchronous: returns once B's listeners ran.
    a.cluster
        .send_with(
            &ClusterMessage::new("hello", "hi"),
            None,
            tribes::SendOptions::USE_ACK | tribes::SendOptions::SYNCHRONIZED_ACK,
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || everything
        .lock()
        .len()
        == 2));
    assert_eq!(
        *evicts.lock(),
        vec![("cache-evict".to_string(), payload)],
        "the filtered listener saw only its kind, bytes intact"
    );
    // Session traffic is unaffected and cluster messages never reach a manager.
    let s = a.manager.create_session().unwrap();
    assert_eq!(bump(&a, &s), 1);
    assert_eq!(counter(&b, &s), Some(1));
    let r = b.manager.stats().received;
    assert_eq!(
        (r.created, r.delta, r.get_all_sessions, r.transfer_complete),
        (1, 1, 1, 1)
    );
    assert_eq!(r.total(), 4, "nothing else reached B's manager: {r:?}");
}

#[test]
fn fetching_asks_the_next_member_when_the_first_does_not_have_it() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    // Only A has the session; B knows A and C, and asks them in an order it picks.
    let a = node(pa, &[]);
    let c = node(pc, &[]);
    assert!(a.manager.start(&a.cluster) && c.manager.start(&c.cluster));
    let b = node(pb, &[pa, pc]);
    assert!(b
        .cluster
        .channel()
        .wait_for_members(2, Duration::from_secs(5)));
    assert!(b.manager.start(&b.cluster));
    for i in 0..6 {
        let s = a.manager.create_session().unwrap();
        assert_eq!(bump(&a, &s), 1);
        assert!(b.manager.fetch(&s), "session {i}");
        assert_eq!(counter(&b, &s), Some(1));
    }
    let st = b.manager.stats();
    assert_eq!(st.sessions_fetched, 6);
    // One ask when A came first, two when C did; never more.
    assert!((6..=12).contains(&st.sent.get_session), "{st:?}");
    assert_eq!(
        c.manager.stats().received.get_session + a.manager.stats().received.get_session,
        st.sent.get_session
    );
}

#[test]
fn idle_sessions_expire_by_themselves_on_every_node() {
    let (a, b) = started_pair();
    for n in [&a, &b] {
        n.cluster
            .set_expire_interval(Duration::from_millis(50))
            .unwrap();
    }
    let idle = a.manager.create_session().unwrap();
    a.manager
        .with_session(&idle, |s| s.set_max_inactive_secs(1));
    a.manager.request_completed(&idle).unwrap();
    let busy = a.manager.create_session().unwrap();
    assert!(b.manager.session(&idle).is_some());
    // Nobody calls expire: the clusters' threads do.
    let t0 = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || a
        .manager
        .session(&idle)
        .is_none()
        && b.manager.session(&idle).is_none()));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "not before its interval"
    );
    assert!(a.manager.session(&busy).is_some(), "30 minutes to go");
    assert_eq!(a.manager.stats().sessions_expired, 1);
    assert!(tribes_suite::thread_names()
        .iter()
        .any(|n| n.starts_with("ha-expiry-")));
    a.cluster.stop().unwrap();
    b.cluster.stop().unwrap();
}

#[test]
fn a_node_started_right_after_its_multicast_cluster_still_pulls_the_state() {
    // No `wait_for_members` before `start`: the manager gives multicast membership its
    // discovery time (two beacon intervals, here 1 s: room for a loaded machine) before
    // taking itself for the first node.
    let port = 47100 + (std::process::id() % 400) as u16;
    let make = || {
        let (c, m) = multicast_node(port, Duration::from_millis(500), Default::default());
        m.start(&c);
        (c, m)
    };
    let (_ca, ma) = make();
    let id = ma.create_session().unwrap();
    ma.with_session(&id, |s| s.insert("k", &7u8).unwrap());
    ma.request_completed(&id).unwrap();
    let (_cb, mb) = make();
    let copy = mb.session(&id).expect("B pulled A's session at start");
    assert_eq!(copy.get::<u8>("k").unwrap(), Some(7));
}

/// Fails the sends passing it while armed (as a timeout to every destination), without
/// passing them on, and counts them.
#[derive(Default)]
struct FailWhileArmed {
    armed: std::sync::atomic::AtomicBool,
    failed: std::sync::atomic::AtomicUsize,
}

impl tribes::interceptors::Interceptor for FailWhileArmed {
    fn name(&self) -> &'static str {
        "fail-while-armed"
    }
    fn send(
        &self,
        out: tribes::interceptors::Outgoing,
        next: tribes::interceptors::Down<'_>,
    ) -> Result<(), tribes::SendError> {
        if !self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            return next.send(out);
        }
        self.failed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let faulty = (out.destinations.into_iter())
            .map(|member| tribes::FaultyMember {
                member,
                failure: tribes::Failure::Timeout,
            })
            .collect();
        Err(tribes::SendError::Faulty(faulty))
    }
}

/// A change that fails to reach B (a timeout; B stays a member) and a session not
/// touched again: the expiry sweep tells B the version and B fetches the session; then the
/// same with a request that only reads the session. With `routes`, each node's sessions
/// carry its route.
fn a_failed_change_is_retold(sync: bool, routes: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    let cut = Arc::new(FailWhileArmed::default());
    let cfg = |route: &str| ha::ManagerConfig {
        sync,
        route: routes.then(|| route.to_string()),
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] =
        tribes_suite::started_ha_pair_with_extra([cfg("na"), cfg("nb")], vec![cut.clone()])
            .unwrap();
    // Fails what `change` sends (once the dispatch thread, if any, got to it).
    let failing = |change: &dyn Fn()| {
        let before = cut.failed.load(SeqCst);
        cut.armed.store(true, SeqCst);
        change();
        assert!(wait_until(Duration::from_secs(5), || cut
            .failed
            .load(SeqCst)
            > before));
        cut.armed.store(false, SeqCst);
    };
    let s = ma.create_session().unwrap();
    ma.with_session(&s, |x| x.insert("n", &1u32).unwrap());
    ma.request_completed(&s).unwrap();
    assert!(wait_until(Duration::from_secs(5), || mb.version(&s) == ma.version(&s)));

    failing(&|| {
        ma.with_session(&s, |x| x.insert("n", &2u32).unwrap());
        // Sync: the error comes back here; async: the dispatch thread hears it.
        assert_eq!(ma.request_completed(&s).is_err(), sync);
    });
    assert!(mb.version(&s) < ma.version(&s), "B missed it");
    assert!(
        wait_until(Duration::from_secs(5), || ma.stats().send_errors > 0),
        "counted"
    );
    // The sweep (every 60 s by default; called here until the failure was heard).
    assert!(wait_until(Duration::from_secs(5), || {
        ma.expire(ha_now());
        mb.version(&s) == ma.version(&s)
    }));
    assert_eq!(mb.session(&s).unwrap().get::<u32>("n").unwrap(), Some(2));

    failing(&|| {
        ma.with_session(&s, |x| x.insert("n", &3u32).unwrap());
        let _ = ma.request_completed(&s);
    });
    // Requests that only read it: the first one's end after the failure was heard tells B.
    assert!(wait_until(Duration::from_secs(5), || {
        ma.with_session(&s, |x| x.get::<u32>("n").unwrap());
        ma.request_completed(&s).unwrap();
        mb.version(&s) == ma.version(&s)
    }));
    assert_eq!(mb.session(&s).unwrap().get::<u32>("n").unwrap(), Some(3));
    ca.stop().unwrap();
    cb.stop().unwrap();
}

#[test]
fn a_change_that_failed_to_reach_a_live_member_is_retold_sync() {
    a_failed_change_is_retold(true, false);
}

#[test]
fn a_change_that_failed_to_reach_a_live_member_is_retold_async_with_routes() {
    a_failed_change_is_retold(false, true);
}

/// Holds its channel's start for a while, like a slow interceptor would: the interceptors
/// above it (the dispatcher) start later, while the receiver already runs. Says when its
/// start began.
struct SlowStart {
    by: Duration,
    entered: crossbeam_channel::Sender<()>,
}

impl tribes::interceptors::Interceptor for SlowStart {
    fn name(&self) -> &'static str {
        "slow-start"
    }
    fn start(
        &self,
        _: tribes::Levels,
        _: &tribes::interceptors::StackHandle,
    ) -> Result<(), tribes::ChannelError> {
        let _ = self.entered.try_send(());
        std::thread::sleep(self.by);
        Ok(())
    }
}

#[test]
fn a_node_still_starting_its_channel_answers_a_state_request_at_once() {
    // Async replication: A's "not ready" used to go through its dispatch threads, which
    // had not started yet; the send was refused and B waited for the whole transfer
    // timeout (10 s here, 60 s by default) before serving.
    let (pa, pb) = (free_port(), free_port());
    let cfg = ha::ManagerConfig {
        sync: false,
        ..ha::ManagerConfig::default()
    };
    let (entered, started) = crossbeam_channel::bounded(1);
    let slow: Arc<dyn tribes::interceptors::Interceptor> = Arc::new(SlowStart {
        by: Duration::from_secs(4),
        entered,
    });
    let a_cfg = cfg.clone();
    let a = std::thread::spawn(move || {
        tribes_suite::ha_node_with_extra(pa, &[pb], a_cfg, vec![slow]).unwrap()
    });
    // A's receiver is up and its dispatcher not started yet, for 4 s from here.
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    let (cb, mb) = tribes_suite::ha_node_with(pb, &[pa], cfg).unwrap();
    assert!(
        cb.channel().members().iter().any(|m| m.port == pa),
        "A is up"
    );
    let start = Instant::now();
    assert!(mb.start(&cb), "nobody had state: complete");
    // Well before A's channel finished starting (and the 10 s timeout).
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let (ca, _ma) = a.join().unwrap();
    ca.stop().unwrap();
    cb.stop().unwrap();
}

#[test]
fn a_logout_that_failed_to_reach_a_live_member_is_retold_by_the_sweep() {
    use std::sync::atomic::Ordering::SeqCst;
    // Otherwise B's copy of a logged-out session would live on (for twice its interval,
    // or for good with an interval of zero), and a failover to B would log the user in
    // again.
    let cut = Arc::new(FailWhileArmed::default());
    let cfg = ha::ManagerConfig {
        sync: true,
        max_inactive_secs: 0,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] =
        tribes_suite::started_ha_pair_with_extra([cfg.clone(), cfg], vec![cut.clone()]).unwrap();
    let s = ma.create_session().unwrap();
    ma.with_session(&s, |x| x.insert("user", &"ada").unwrap());
    ma.request_completed(&s).unwrap();
    assert!(mb.session(&s).is_some());
    cut.armed.store(true, SeqCst);
    ma.invalidate(&s);
    cut.armed.store(false, SeqCst);
    assert!(cut.failed.load(SeqCst) > 0);
    assert!(mb.session(&s).is_some(), "B missed the logout");
    assert!(wait_until(Duration::from_secs(5), || {
        ma.expire(ha_now());
        mb.session(&s).is_none()
    }));
    ca.stop().unwrap();
    cb.stop().unwrap();
}

#[test]
fn a_starting_node_asks_the_next_member_when_the_oldest_sends_nothing() {
    // The oldest member, asked first, is up but sends no state (a channel without a
    // session manager here: it stands for a member that hangs). The starting node used to
    // wait the whole transfer timeout for it and start empty; now it gives up after a
    // quarter of it without a batch and asks the next member.
    let port = 46600 + (std::process::id() % 400) as u16;
    let mcast = tribes::membership::McastConfig {
        port,
        frequency: Duration::from_millis(100),
        drop_time: Duration::from_millis(600),
        ttl: Some(0),
        ..tribes::membership::McastConfig::default()
    };
    let silent = tribes::GroupChannel::builder()
        .name("silent")
        .port(0)
        .heartbeat_interval(None)
        .multicast(mcast)
        .build()
        .unwrap();
    silent.start(tribes::Levels::DEFAULT).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the oldest, by a margin
    let cfg = ha::ManagerConfig {
        sync: true,
        state_transfer_timeout: Duration::from_secs(4),
        ..ha::ManagerConfig::default()
    };
    let (cc, mc) = multicast_node(port, Duration::from_millis(100), cfg.clone());
    assert!(cc.channel().wait_for_members(1, Duration::from_secs(5)));
    // C is not the oldest either: it asks the silent member first, and then nobody.
    mc.start(&cc);
    let s = mc.create_session().unwrap();
    mc.with_session(&s, |x| x.insert("n", &5u8).unwrap());
    mc.request_completed(&s).unwrap();
    let (cb, mb) = multicast_node(port, Duration::from_millis(100), cfg);
    assert!(cb.channel().wait_for_members(2, Duration::from_secs(5)));
    assert_eq!(
        cb.channel().service_members()[0].port,
        silent.local_member().port
    );
    assert!(mb.start(&cb), "the state came from the next member");
    assert_eq!(mb.session(&s).unwrap().get::<u8>("n").unwrap(), Some(5));
    for c in [&cb, &cc] {
        c.stop().unwrap();
    }
    silent.stop(tribes::Levels::ALL).unwrap();
}

/// A channel outside the cluster (no membership, no heartbeat), built and not started: it
/// stands for a member that misbehaves.
fn outsider(name: impl Into<String>) -> tribes::GroupChannel {
    tribes::GroupChannel::builder()
        .name(name)
        .port(0)
        .heartbeat_interval(None)
        .build()
        .unwrap()
}

/// `event` for context `/app`, encoded as a member sends it.
fn app_message(event: ha::SessionEvent) -> Vec<u8> {
    ha::SessionMessage {
        context: "/app".into(),
        timestamp_ms: ha_now(),
        event,
    }
    .encode()
    .unwrap()
}

/// What joining members heard: (joiner, session event code, when).
type Heard = Arc<parking_lot::Mutex<Vec<(String, i32, Instant)>>>;

/// A plain channel playing a joining member: it asks `donor` for its state, notes each
/// session message it gets in `heard`, and takes `pause` over every message (so its ACKs
/// come that late).
fn state_asker(
    name: &str,
    donor: &tribes::Member,
    pause: Duration,
    heard: &Heard,
) -> tribes::GroupChannel {
    let ch = outsider(name);
    let (heard, name) = (Arc::clone(heard), name.to_string());
    ch.add_channel_listener(move |m: &tribes::ChannelMessage| {
        if let Ok(sm) = ha::SessionMessage::decode(&m.payload) {
            (heard.lock()).push((name.clone(), sm.event.code(), Instant::now()));
        }
        std::thread::sleep(pause);
        Ok(())
    });
    ch.start(tribes::Levels::ALL).unwrap();
    let ask = app_message(ha::SessionEvent::GetAllSessions);
    let options = tribes::SendOptions::BYTE_MESSAGE | tribes::SendOptions::USE_ACK;
    ch.send(std::slice::from_ref(donor), ask, options).unwrap();
    ch
}

#[test]
fn joining_members_slow_to_acknowledge_their_state_do_not_hold_up_replication() {
    // Each of these "joining members" asks A for its state and then takes 4 s to process
    // (and so acknowledge) every message. A used to send the state from the receiver worker
    // that read the request: with more such members than workers (6), every worker waited
    // for ACKs (A's send timeout, 3 s) and B's changes waited behind them. Now the state goes
    // out from A's donor thread and the workers stay free.
    let (a, b) = started_pair();
    let id = b.manager.create_session().unwrap();
    b.manager.request_completed(&id).unwrap();
    assert_eq!(bump(&b, &id), 1);
    let a_member = a.cluster.channel().local_member();
    let heard = Heard::default();
    let joiners: Vec<_> = (0..8)
        .map(|i| {
            let name = format!("slow-joiner{i}");
            state_asker(&name, &a_member, Duration::from_secs(4), &heard)
        })
        .collect();
    // A's answers to them are under way (and waiting for their ACKs).
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    // Synchronous replication: this returns once A has applied the change.
    assert_eq!(bump(&b, &id), 2);
    assert_eq!(counter(&a, &id), Some(2));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "B's change waited {:?} for a free worker on A",
        start.elapsed()
    );
    // A first: its donor thread then fails the requests still queued at once.
    for n in [&a, &b] {
        n.cluster.stop().unwrap();
    }
    for ch in joiners {
        ch.stop(tribes::Levels::ALL).unwrap();
    }
}

#[test]
fn forged_session_messages_are_refused_and_replication_goes_on() {
    let (a, b) = started_pair();
    let id = b.manager.create_session().unwrap();
    b.manager.request_completed(&id).unwrap();
    assert_eq!(bump(&b, &id), 1);
    assert_eq!(counter(&a, &id), Some(1));
    let version = a.manager.session(&id).unwrap().version();
    let intruder = outsider("intruder");
    intruder.start(tribes::Levels::ALL).unwrap();
    let to = [a.cluster.channel().local_member()];
    let send = |event: ha::SessionEvent| {
        let options = tribes::SendOptions::BYTE_MESSAGE
            | tribes::SendOptions::USE_ACK
            | tribes::SendOptions::SYNCHRONIZED_ACK;
        intruder.send(&to, app_message(event), options)
    };
    let forged = [
        // A rename to an id no cookie could carry: the session would be lost to its user.
        ha::SessionEvent::ChangeSessionId {
            old: id.clone(),
            new: SessionId::new(format!("{}; Domain=evil.example", id.as_str())),
        },
        // A version nothing can follow: every later change would be dropped as stale.
        ha::SessionEvent::Delta(ha::Delta {
            session_id: id.clone(),
            version: u64::MAX,
            last_access_ms: ha_now(),
            actions: vec![ha::Action::SetMaxInactive(i64::MIN)],
            origin: 7,
        }),
        ha::SessionEvent::Created {
            id: SessionId::new("../../etc/passwd"),
            max_inactive_secs: 60,
        },
    ];
    for event in forged {
        let refused = send(event.clone());
        assert!(
            matches!(refused, Err(tribes::SendError::Faulty(_))),
            "{event:?} was acknowledged: {refused:?}"
        );
    }
    assert_eq!(a.cluster.refused_messages(), 3);
    assert!(!a.manager.contains(&SessionId::new("../../etc/passwd")));
    let copy = a.manager.session(&id).expect("the session keeps its id");
    assert_eq!(copy.version(), version);
    // B's changes still reach A.
    assert_eq!(bump(&b, &id), 2);
    assert_eq!(counter(&a, &id), Some(2));
    intruder.stop(tribes::Levels::ALL).unwrap();
    for n in [&a, &b] {
        n.cluster.stop().unwrap();
    }
}

#[test]
fn a_state_request_answered_after_the_manager_stopped_gets_not_ready() {
    // A request that waited for A's donor thread while A's manager stopped used to get an
    // empty state and "complete": its asker started without the sessions, sure it had them.
    let (a, b) = started_pair();
    let id = b.manager.create_session().unwrap();
    b.manager.request_completed(&id).unwrap();
    assert!(a.manager.contains(&id));
    let a_member = a.cluster.channel().local_member();
    let heard = Heard::default();
    let joiner = |name: &str, pause: Duration| state_asker(name, &a_member, pause, &heard);
    // The first holds A's donor thread for about 2 s; the second waits in its queue.
    let slow = joiner("slow", Duration::from_secs(1));
    assert!(wait_until(Duration::from_secs(10), || heard
        .lock()
        .iter()
        .any(|(n, _, _)| n == "slow")));
    let late = joiner("late", Duration::ZERO);
    std::thread::sleep(Duration::from_millis(200));
    a.manager.stop();
    assert!(wait_until(Duration::from_secs(10), || heard
        .lock()
        .iter()
        .any(|(n, _, _)| n == "late")));
    let late_heard: Vec<i32> = (heard.lock().iter())
        .filter(|(n, _, _)| n == "late")
        .map(|(_, c, _)| *c)
        .collect();
    let not_ready = ha::SessionEvent::StateNotReady.code();
    assert_eq!(
        late_heard,
        vec![not_ready],
        "the late asker heard {late_heard:?}"
    );
    for ch in [slow, late] {
        ch.stop(tribes::Levels::ALL).unwrap();
    }
    for n in [&a, &b] {
        n.cluster.stop().unwrap();
    }
}

#[test]
fn a_state_transfer_timeout_of_zero_is_refused_and_one_of_duration_max_works() {
    let cluster = Cluster::new(tribes::GroupChannel::builder().port(0).build().unwrap());
    let zero = DeltaManager::new(
        "/z",
        ha::ManagerConfig {
            state_transfer_timeout: Duration::ZERO,
            ..ha::ManagerConfig::default()
        },
    );
    let err = cluster.register(&zero).unwrap_err();
    assert!(
        matches!(
            err,
            ha::SessionError::InvalidConfig {
                field: "state_transfer_timeout",
                ..
            }
        ),
        "{err}"
    );
    // "Wait for good": the joiner used to panic on `Instant` overflow once it had a member.
    let (pa, pb) = (free_port(), free_port());
    let a = node(pa, &[pb]);
    assert!(a.manager.start(&a.cluster));
    let id = a.manager.create_session().unwrap();
    a.manager.request_completed(&id).unwrap();
    let (cb, mb) = tribes_suite::ha_node_with(
        pb,
        &[pa],
        ha::ManagerConfig {
            sync: true,
            ..ha::ManagerConfig::default()
        },
    )
    .unwrap();
    assert!(cb.channel().wait_for_members(1, Duration::from_secs(5)));
    let forever = DeltaManager::new(
        "/app2",
        ha::ManagerConfig {
            state_transfer_timeout: Duration::MAX,
            ..ha::ManagerConfig::default()
        },
    );
    cb.register(&forever).unwrap();
    // No manager for /app2 on A: it answers NOCONTEXTMANAGER at once.
    forever.start(&cb);
    assert!(mb.start(&cb));
    assert!(mb.contains(&id));
    cb.stop().unwrap();
    a.cluster.stop().unwrap();
}

#[test]
fn a_state_batch_with_a_malformed_entry_loses_only_that_entry() {
    // The "donor" is a plain channel that answers the joiner's GET_ALL_SESSIONS with one
    // batch of three sessions, one of them under an id no cookie could carry, then the
    // transfer's end. The joiner used to refuse the whole batch, and start without the two
    // good sessions.
    let donor = Arc::new(outsider("donor"));
    donor.start(tribes::Levels::ALL).unwrap();
    let (tx, asked) = crossbeam_channel::bounded::<tribes::Member>(4);
    donor.add_channel_listener(move |m: &tribes::ChannelMessage| {
        let asks = ha::SessionMessage::decode(&m.payload)
            .is_ok_and(|sm| matches!(sm.event, ha::SessionEvent::GetAllSessions));
        if asks {
            let _ = tx.try_send(m.sender.clone());
        }
        Ok(())
    });
    let answer = {
        let donor = Arc::clone(&donor);
        std::thread::spawn(move || {
            let joiner = asked.recv_timeout(Duration::from_secs(10)).unwrap();
            let session = |id: &str, n: u32| {
                let mut s = ha::Session::new(SessionId::new(id), ha_now(), 1800);
                s.insert("counter", &n).unwrap();
                s
            };
            let batch = ha::SessionEvent::AllSessionData {
                sessions: vec![
                    session("good1", 1),
                    session("../bad", 2),
                    session("good2", 3),
                ],
                held_back: Vec::new(),
                buried: Vec::new(),
            };
            let end = ha::SessionEvent::TransferComplete {
                snapshot_ms: ha_now(),
            };
            let options = tribes::SendOptions::BYTE_MESSAGE | tribes::SendOptions::USE_ACK;
            for event in [batch, end] {
                donor
                    .send(std::slice::from_ref(&joiner), app_message(event), options)
                    .unwrap();
            }
        })
    };
    let joiner = node(free_port(), &[donor.local_member().addr().port()]);
    assert!(joiner
        .cluster
        .channel()
        .wait_for_members(1, Duration::from_secs(5)));
    assert!(joiner.manager.start(&joiner.cluster), "state received");
    answer.join().unwrap();
    assert_eq!(counter(&joiner, &SessionId::new("good1")), Some(1));
    assert_eq!(counter(&joiner, &SessionId::new("good2")), Some(3));
    assert!(!joiner.manager.contains(&SessionId::new("../bad")));
    assert_eq!(joiner.manager.len(), 2);
    assert_eq!(joiner.cluster.refused_messages(), 1);
    joiner.cluster.stop().unwrap();
    donor.stop(tribes::Levels::ALL).unwrap();
}

#[test]
fn a_donor_gives_up_a_transfer_that_outlasts_the_state_transfer_timeout() {
    // One session per batch, and a joiner that takes 0.6 s to acknowledge each: twelve
    // batches would hold A's donor thread for about 7 s. A gives up after its
    // state-transfer timeout (2 s), tells the joiner, and is free for the next asker.
    let cfg = || ha::ManagerConfig {
        sync: true,
        send_all_sessions_size: 1,
        state_transfer_timeout: Duration::from_secs(2),
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] = tribes_suite::started_ha_pair([cfg(), cfg()]).unwrap();
    for _ in 0..12 {
        let id = mb.create_session().unwrap();
        mb.request_completed(&id).unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || ma.len() == 12));
    let a_member = ca.channel().local_member();
    let heard = Heard::default();
    let joiner = |name: &str, pause: Duration| state_asker(name, &a_member, pause, &heard);
    let asked = Instant::now();
    let slow = joiner("slow", Duration::from_millis(600));
    let next = joiner("next", Duration::ZERO);
    let not_ready = ha::SessionEvent::StateNotReady.code();
    let complete = ha::SessionEvent::TransferComplete { snapshot_ms: 0 }.code();
    let batch = ha::SessionEvent::AllSessionData {
        sessions: Vec::new(),
        held_back: Vec::new(),
        buried: Vec::new(),
    }
    .code();
    let of = |who: &str| -> Vec<(i32, Instant)> {
        (heard.lock().iter())
            .filter(|(n, _, _)| n == who)
            .map(|(_, c, t)| (*c, *t))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || of("next")
            .iter()
            .any(|(c, _)| *c == complete)),
        "the next asker got its whole state: {:?}",
        of("next")
    );
    let slow_heard = of("slow");
    let batches = slow_heard.iter().filter(|(c, _)| *c == batch).count();
    assert!(batches < 12, "the slow joiner got all {batches} batches");
    let told = slow_heard.iter().find(|(c, _)| *c == not_ready);
    let told = told.expect("the slow joiner was told to ask elsewhere").1;
    assert!(
        told.duration_since(asked) < Duration::from_secs(5),
        "told after {:?}",
        told.duration_since(asked)
    );
    // The next asker got all twelve sessions.
    let next_batches = of("next").iter().filter(|(c, _)| *c == batch).count();
    assert_eq!(next_batches, 12);
    for ch in [slow, next] {
        ch.stop(tribes::Levels::ALL).unwrap();
    }
    ca.stop().unwrap();
    cb.stop().unwrap();
}
