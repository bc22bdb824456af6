//! The replication layer in axum (issue #5): a counter in the session keeps counting when
//! the client's requests alternate between nodes, and after a node is gone. Requests are
//! driven through the services directly (no HTTP server needed); the cluster is on loopback.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use ha::layer::{ReplicationLayer, Session};
use http::{header, Request, StatusCode};
use tower::ServiceExt;
use tribes_suite::{free_port, ha_node, started_ha_pair};

async fn counter(session: Session) -> String {
    let n = session.get::<u64>("counter").unwrap().unwrap_or(0) + 1;
    session.insert("counter", &n).unwrap();
    n.to_string()
}

fn app(manager: Arc<ha::DeltaManager>) -> (Router, ReplicationLayer) {
    let layer = ReplicationLayer::new(manager)
        .filter(r"/static/.*")
        .unwrap();
    (router(layer.clone()), layer)
}

fn router(layer: ReplicationLayer) -> Router {
    Router::new()
        .route("/counter", get(counter))
        .route("/static/{file}", get(|| async { "static" }))
        .layer(layer)
}

/// One GET; returns (status, body, the session's Set-Cookie value without attributes).
async fn get_with(
    app: &Router,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut req = Request::get(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let set = (resp.headers().get_all(header::SET_COOKIE).iter())
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
        .find(|v| v.starts_with("JSESSIONID="));
    let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
    (status, String::from_utf8_lossy(&body).to_string(), set)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_survives_round_robin_and_a_lost_node() {
    let routed = |r: &str| ha::ManagerConfig {
        route: Some(r.into()),
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (_cb, mb)] = started_ha_pair([routed("a"), routed("b")]).unwrap();
    let (app_a, layer_a) = app(ma);
    let (app_b, _) = app(mb);

    // First request creates the session and sets the cookie.
    let (status, body, set) = get_with(&app_a, "/counter", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
    let mut cookie = set.expect("Set-Cookie on the first request");
    assert!(
        cookie.starts_with("JSESSIONID=") && cookie.ends_with(".a"),
        "{cookie}"
    );

    // Round robin: every other request lands on the other node; the count never skips.
    for (i, app) in [&app_b, &app_a, &app_b, &app_a].into_iter().enumerate() {
        let (_, body, set) = get_with(app, "/counter", Some(&cookie)).await;
        assert_eq!(body, (i + 2).to_string());
        if let Some(c) = set {
            cookie = c; // route rebinding moved the session
        }
    }
    // Static resources are filtered: no replication for them.
    let _ = get_with(&app_a, "/static/logo.png", Some(&cookie)).await;
    assert!(
        layer_a
            .stats()
            .filtered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // Node A is lost; B serves the session and rebinds it to its route.
    ca.stop().unwrap();
    let (_, body, set) = get_with(&app_b, "/counter", Some(&cookie)).await;
    assert_eq!(body, "6");
    if let Some(c) = set {
        cookie = c;
    }
    assert!(
        cookie.ends_with(".b"),
        "cookie rebound to the surviving node: {cookie}"
    );
    let (_, body, _) = get_with(&app_b, "/counter", Some(&cookie)).await;
    assert_eq!(body, "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_saw_the_session_fetches_it_instead_of_starting_over() {
    let (pa, pb) = (free_port(), free_port());
    // A lists no member, so nothing it does reaches B; B lists A.
    let (ca, ma) = ha_node(pa, &[], None).unwrap();
    ma.start(&ca);
    let (cb, mb) = ha_node(pb, &[pa], None).unwrap();
    assert!(cb.channel().wait_for_members(1, Duration::from_secs(5)));
    mb.start(&cb);
    let (app_a, _) = app(Arc::clone(&ma));
    let (app_b, _) = app(Arc::clone(&mb));

    let (_, _, set) = get_with(&app_a, "/counter", None).await;
    let cookie = set.expect("Set-Cookie");
    let (_, body, _) = get_with(&app_a, "/counter", Some(&cookie)).await;
    assert_eq!(body, "2");
    assert_eq!(mb.len(), 0, "B has not heard of it");

    // B asks the cluster before the handler runs: same session, the count goes on.
    let (_, body, set) = get_with(&app_b, "/counter", Some(&cookie)).await;
    assert_eq!(body, "3");
    assert_eq!(set, None, "no new session, no new cookie");
    assert_eq!(mb.stats().sessions_fetched, 1);

    // An id nobody has: a new session, as before.
    let (_, body, set) = get_with(&app_b, "/counter", Some("JSESSIONID=feedbeef")).await;
    assert_eq!(body, "1");
    assert!(set.is_some());
    assert_eq!(mb.stats().fetch_misses, 1);

    // Ids no manager makes (huge, or with other characters): a new session, and nobody
    // is asked about them.
    let huge = format!("JSESSIONID={}", "a".repeat(60_000));
    for forged in [
        huge.as_str(),
        "JSESSIONID=../../etc/passwd",
        "JSESSIONID=a%20b",
    ] {
        let (status, body, set) = get_with(&app_b, "/counter", Some(forged)).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
        assert!(set.is_some());
    }
    assert_eq!(mb.stats().fetch_misses, 1, "no member was asked about them");
    ca.stop().unwrap();
    cb.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_in_cycles_the_session_id_on_every_node() {
    async fn login(session: Session) -> &'static str {
        session.insert("user", &"ada").unwrap();
        session.cycle_id();
        "welcome"
    }
    async fn whoami(session: Session) -> String {
        session.get::<String>("user").unwrap().unwrap_or_default()
    }
    let sync = ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] = started_ha_pair([sync.clone(), sync]).unwrap();
    let routes = |m: Arc<ha::DeltaManager>| {
        Router::new()
            .route("/counter", get(counter))
            .route("/login", get(login))
            .route("/whoami", get(whoami))
            .route(
                "/logout",
                get(|session: Session| async move {
                    session.invalidate();
                    "bye"
                }),
            )
            .layer(ReplicationLayer::new(m))
    };
    let (app_a, app_b) = (routes(Arc::clone(&ma)), routes(Arc::clone(&mb)));

    let (_, _, set) = get_with(&app_a, "/counter", None).await;
    let before = set.expect("cookie");
    let (_, body, set) = get_with(&app_a, "/login", Some(&before)).await;
    assert_eq!(body, "welcome");
    let after = set.expect("a new cookie after login");
    assert_ne!(after, before);
    // The other node knows the session by its new id only, with what login stored.
    let (_, body, _) = get_with(&app_b, "/whoami", Some(&after)).await;
    assert_eq!(body, "ada");
    let old = ha::SessionId::new(before.trim_start_matches("JSESSIONID="));
    assert!(mb.session(&old).is_none() && ma.session(&old).is_none());
    let (_, body, _) = get_with(&app_b, "/counter", Some(&after)).await;
    assert_eq!(body, "2", "same session: the counter goes on");

    // Logging out on B ends the session on both nodes and expires the cookie.
    let resp = app_b
        .clone()
        .oneshot(
            Request::get("/logout")
                .header(header::COOKIE, &after)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let set = resp
        .headers()
        .get(header::SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        set.starts_with("JSESSIONID=;") && set.contains("Max-Age=0"),
        "{set}"
    );
    let id = ha::SessionId::new(after.trim_start_matches("JSESSIONID="));
    assert!(ma.session(&id).is_none() && mb.session(&id).is_none());
    ca.stop().unwrap();
    cb.stop().unwrap();
}

/// One GET with a cookie jar: sends every cookie held, keeps every cookie set.
async fn get_jar(app: &Router, path: &str, jar: &mut Vec<(String, String)>) -> String {
    let mut req = Request::get(path);
    if !jar.is_empty() {
        let line: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        req = req.header(header::COOKIE, line.join("; "));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for v in resp.headers().get_all(header::SET_COOKIE) {
        let pair = v.to_str().unwrap().split(';').next().unwrap_or_default();
        let (k, v) = pair.split_once('=').unwrap();
        jar.retain(|(name, _)| name != k);
        jar.push((k.to_string(), v.to_string()));
    }
    let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
    String::from_utf8_lossy(&body).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_replication_with_read_your_writes_never_goes_back() {
    let cfg = ha::ManagerConfig {
        sync: false,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] = started_ha_pair([cfg.clone(), cfg]).unwrap();
    let app = |m: Arc<ha::DeltaManager>| {
        Router::new()
            .route("/counter", get(counter))
            .layer(ReplicationLayer::new(m).read_your_writes(Duration::from_millis(200)))
    };
    let nodes = [app(Arc::clone(&ma)), app(Arc::clone(&mb))];
    // Alternate nodes with no pause: each request is sent the moment the previous answer
    // is in, before an asynchronous change usually reaches the other node.
    for round in 0..4 {
        let mut jar = Vec::new();
        for n in 1..=100u64 {
            let body = get_jar(&nodes[(n % 2) as usize], "/counter", &mut jar).await;
            assert_eq!(body, n.to_string(), "session {round}, request {n}");
        }
        assert!(
            jar.iter().any(|(k, _)| k == "JSESSIONID_V"),
            "version cookie set: {jar:?}"
        );
    }
    let waited = ma.stats().version_waits + mb.stats().version_waits;
    println!("requests that waited for their own change: {waited} of 400");
    ca.stop().unwrap();
    cb.stop().unwrap();
}

/// Synchronous replication waits for every member's ACK. That wait must not stop the
/// runtime: another request is served while the first one waits (before, the handler's
/// session creation and the end-of-request delta blocked the runtime thread, so the second
/// request could only start after the first had finished).
#[tokio::test(flavor = "current_thread")]
async fn a_request_waiting_for_acks_does_not_hold_up_other_requests() {
    other_requests_go_on_while_one_waits_for_acks().await;
}

/// The same with one worker of a multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_request_waiting_for_acks_does_not_hold_up_the_worker() {
    other_requests_go_on_while_one_waits_for_acks().await;
}

/// Makes `channel` take `pause` over every message it receives while the returned `slow`
/// flag is set (it starts set); the returned `entered` flag is set by the first of them.
fn hold_messages(
    channel: &tribes::GroupChannel,
    pause: Duration,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let slow = Arc::new(AtomicBool::new(true));
    let entered = Arc::new(AtomicBool::new(false));
    let (s, e) = (Arc::clone(&slow), Arc::clone(&entered));
    channel.add_channel_listener(move |_m: &tribes::ChannelMessage| {
        if s.load(Ordering::SeqCst) {
            e.store(true, Ordering::SeqCst);
            std::thread::sleep(pause);
        }
        Ok(())
    });
    (slow, entered)
}

async fn other_requests_go_on_while_one_waits_for_acks() {
    use std::sync::atomic::Ordering;
    let sync = || ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(_ca, ma), (cb, mb)] = started_ha_pair([sync(), sync()]).unwrap();
    // B holds up every message it gets from now on, so A's ACKs take that long.
    let (slow, entered) = hold_messages(cb.channel(), Duration::from_millis(300));
    let (app_a, _) = app(ma);
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));

    let (a, o) = (app_a.clone(), Arc::clone(&order));
    let replicated = tokio::spawn(async move {
        let r = get_with(&a, "/counter", None).await;
        o.lock().push("counter");
        r
    });
    // Until A's first message reaches B, the counter request is running or waiting.
    while !entered.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    // Spawned as well: on a multi-threaded runtime the test body itself does not run on a
    // worker.
    let (a, o) = (app_a.clone(), Arc::clone(&order));
    let (status, body, _) = tokio::spawn(async move {
        let r = get_with(&a, "/static/logo.png", None).await;
        o.lock().push("static");
        r
    })
    .await
    .unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "static"));

    let (status, body, cookie) = replicated.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
    assert_eq!(
        *order.lock(),
        ["static", "counter"],
        "the static request waited for the counter's replication"
    );
    // And the wait was real: B had the session when A answered.
    slow.store(false, Ordering::SeqCst);
    let id = ha::SessionId::new(cookie.unwrap().trim_start_matches("JSESSIONID="));
    assert!(mb.contains(&id), "B lacks {id}");
}

/// With asynchronous replication a session's second request may reach another node before
/// the session's first change does. That node waits a moment for it (the fetch grace)
/// instead of answering from a copy without it, or asking the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_overtakes_its_session_s_first_change_waits_for_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let not_sync = || ha::ManagerConfig {
        sync: false,
        ..ha::ManagerConfig::default()
    };
    for grace in [Duration::from_millis(500), Duration::ZERO] {
        let [(_ca, ma), (cb, mb)] = started_ha_pair([not_sync(), not_sync()]).unwrap();
        // B applies A's first message (the creation), then holds up the next one (the
        // first change) for 150 ms.
        let seen = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&seen);
        cb.channel()
            .add_channel_listener(move |_m: &tribes::ChannelMessage| {
                if s.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(150));
                }
                Ok(())
            });
        let (app_a, _) = app(ma);
        let app_b = router(ReplicationLayer::new(Arc::clone(&mb)).fetch_grace(grace));

        let (_, body, cookie) = get_with(&app_a, "/counter", None).await;
        assert_eq!(body, "1");
        let cookie = cookie.unwrap();
        let id = ha::SessionId::new(cookie.trim_start_matches("JSESSIONID="));
        assert!(
            tribes_suite::wait_until(Duration::from_secs(2), || mb.version(&id) == Some(0)),
            "B never got the creation alone"
        );
        let (_, body, _) = get_with(&app_b, "/counter", Some(&cookie)).await;
        let st = mb.stats();
        if grace.is_zero() {
            // Without the grace, the copy is taken as it is: the count starts over.
            assert_eq!(body, "1");
        } else {
            assert_eq!(body, "2", "B waited for the first change");
            assert_eq!(
                (st.sessions_fetched, st.version_fetches),
                (0, 0),
                "nobody was asked"
            );
        }
    }
}

/// A handler that invalidates the session and then takes its time.
async fn slow_logout(session: Session) -> &'static str {
    session.invalidate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    "bye"
}

fn logout_app(manager: Arc<ha::DeltaManager>) -> Router {
    Router::new()
        .route("/counter", get(counter))
        .route("/logout", get(slow_logout))
        .layer(ReplicationLayer::new(manager))
}

/// An invalidation reaches the members when the handler makes it, not when the request
/// ends: a client that gives up on the logout (the request is dropped) is logged out on
/// every node, and a request that comes in meanwhile with the old cookie does not fetch
/// the session back from a member that has not heard yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_holds_everywhere_even_if_its_request_is_dropped() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for sync in [true, false] {
        let cfg = || ha::ManagerConfig {
            sync,
            ..ha::ManagerConfig::default()
        };
        let [(_ca, ma), (cb, mb)] = started_ha_pair([cfg(), cfg()]).unwrap();
        let app_a = logout_app(Arc::clone(&ma));
        let (_, body, cookie) = get_with(&app_a, "/counter", None).await;
        assert_eq!(body, "1");
        let cookie = cookie.unwrap();
        let id = ha::SessionId::new(cookie.trim_start_matches("JSESSIONID="));
        assert!(tribes_suite::wait_until(Duration::from_secs(2), || mb.contains(&id)));

        // B is slow to hear from now on: the EXPIRED takes 200 ms to apply there.
        let slow = Arc::new(AtomicBool::new(true));
        let s = Arc::clone(&slow);
        cb.channel()
            .add_channel_listener(move |_m: &tribes::ChannelMessage| {
                if s.swap(false, Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(())
            });
        // The client gives up on the logout after 50 ms (the handler is still sleeping).
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            get_with(&app_a, "/logout", Some(&cookie)),
        )
        .await;
        assert!(
            gave_up.is_err(),
            "the logout request was meant to be dropped"
        );
        assert!(!ma.contains(&id));
        // Meanwhile another request with the old cookie: B still has the session, but A
        // does not ask for it back.
        let (_, body, _) = get_with(&app_a, "/counter", Some(&cookie)).await;
        assert_eq!(body, "1", "sync={sync}: the logged-out session came back");
        assert!(
            tribes_suite::wait_until(Duration::from_secs(2), || !mb.contains(&id)),
            "sync={sync}: B still holds the logged-out session"
        );
        assert!(!ma.contains(&id));
    }
}

/// Records the options of every message on its way down (below the dispatch interceptor,
/// above the coordinator that clears the local `LAZY` hint).
#[derive(Default)]
struct OptionsSeen(parking_lot::Mutex<Vec<tribes::SendOptions>>);

impl tribes::interceptors::Interceptor for OptionsSeen {
    fn name(&self) -> &'static str {
        "options-seen"
    }
    fn send(
        &self,
        out: tribes::interceptors::Outgoing,
        next: tribes::interceptors::Down<'_>,
    ) -> Result<(), tribes::SendError> {
        self.0.lock().push(out.message.options);
        next.send(out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_deltas_nobody_waits_for_are_sent_lazy() {
    use tribes::SendOptions;
    let (pa, pb) = (free_port(), free_port());
    let seen = Arc::new(OptionsSeen::default());
    let async_cfg = ha::ManagerConfig {
        sync: false,
        ..ha::ManagerConfig::default()
    };
    let (cluster, manager) =
        tribes_suite::ha_node_with_extra(pa, &[pb], async_cfg.clone(), vec![seen.clone()]).unwrap();
    let (cb, mb) = tribes_suite::ha_node_with(pb, &[pa], async_cfg).unwrap();
    for c in [&cluster, &cb] {
        assert!(c.channel().wait_for_members(1, Duration::from_secs(5)));
    }
    manager.start(&cluster);
    mb.start(&cb);
    let plain = router(ReplicationLayer::new(Arc::clone(&manager)));
    let ryw = router(
        ReplicationLayer::new(Arc::clone(&manager)).read_your_writes(Duration::from_millis(20)),
    );
    let lazy_count = || {
        seen.0
            .lock()
            .iter()
            .filter(|o| o.contains(SendOptions::LAZY))
            .count()
    };
    // The peer holds version `v` of the session: the change was sent (and its options seen).
    let peer_has = |id: &ha::SessionId, v: u64| {
        tribes_suite::wait_until(Duration::from_secs(5), || mb.version(id) == Some(v))
    };

    // A new session: its creation and its first change go out eagerly (another node's
    // request may be waiting for that first change).
    let (_, body, set) = get_with(&plain, "/counter", None).await;
    assert_eq!(body, "1");
    let cookie = set.expect("a new session sets its cookie");
    let id = ha::SessionId::new(cookie.trim_start_matches("JSESSIONID=").to_string());
    assert!(peer_has(&id, 1));
    assert_eq!(lazy_count(), 0, "{:?}", seen.0.lock());

    // Its next change, without read-your-writes: nobody waits for it.
    let (_, body, _) = get_with(&plain, "/counter", Some(&cookie)).await;
    assert_eq!(body, "2");
    assert!(peer_has(&id, 2));
    assert_eq!(lazy_count(), 1, "{:?}", seen.0.lock());

    // With read-your-writes the next request may wait for it: eager again.
    let (_, body, _) = get_with(&ryw, "/counter", Some(&cookie)).await;
    assert_eq!(body, "3");
    assert!(peer_has(&id, 3));
    assert_eq!(lazy_count(), 1, "{:?}", seen.0.lock());

    cluster.stop().unwrap();
    cb.stop().unwrap();
}

/// Drops, once `on` is set, every message to the member on `port` (a connection to it that
/// lost what was written, as when a node dies part-way through replicating a change).
struct CutTo {
    port: u16,
    on: std::sync::atomic::AtomicBool,
    /// Messages that went to nobody for it.
    dropped: std::sync::atomic::AtomicUsize,
}

impl tribes::interceptors::Interceptor for CutTo {
    fn name(&self) -> &'static str {
        "cut-to"
    }
    fn send(
        &self,
        mut out: tribes::interceptors::Outgoing,
        next: tribes::interceptors::Down<'_>,
    ) -> Result<(), tribes::SendError> {
        if self.on.load(std::sync::atomic::Ordering::SeqCst) {
            out.destinations.retain(|m| m.addr().port() != self.port);
            if out.destinations.is_empty() {
                // Gone without a word: its handler never hears.
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Ok(());
            }
        }
        next.send(out)
    }
}

/// Holds up, once `on` is set, every message to the member on `port` for `by` (a slow
/// path to it).
struct SlowTo {
    port: u16,
    by: Duration,
    on: std::sync::atomic::AtomicBool,
}

impl tribes::interceptors::Interceptor for SlowTo {
    fn name(&self) -> &'static str {
        "slow-to"
    }
    fn send(
        &self,
        out: tribes::interceptors::Outgoing,
        next: tribes::interceptors::Down<'_>,
    ) -> Result<(), tribes::SendError> {
        let to_it = out
            .destinations
            .iter()
            .any(|m| m.addr().port() == self.port);
        if to_it && self.on.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(self.by);
        }
        next.send(out)
    }
}

async fn set_attribute(session: Session, axum::extract::Path(name): axum::extract::Path<String>) {
    session.insert(&name, &1u32).unwrap();
}

async fn attributes(session: Session) -> String {
    ["a", "b", "c"]
        .iter()
        .map(|n| format!("{n}={}", session.get::<u32>(n).unwrap().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Read-your-writes with a change that never reached one node: that node gets the next
/// change first (ahead of the one it missed), and its request for a whole copy is slow. It
/// must not serve the session as if it had both: the client that made them sees every
/// attribute it set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_sees_every_change_when_one_never_reached_the_node() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let cfg = ha::ManagerConfig {
        sync: false,
        ..ha::ManagerConfig::default()
    };
    let cut = Arc::new(CutTo {
        port: pc,
        on: AtomicBool::new(false),
        dropped: Default::default(),
    });
    let slow = Arc::new(SlowTo {
        port: pb,
        by: Duration::from_millis(300),
        on: AtomicBool::new(false),
    });
    let (ca, ma) =
        tribes_suite::ha_node_with_extra(pa, &[pb, pc], cfg.clone(), vec![cut.clone()]).unwrap();
    let (cb, mb) = tribes_suite::ha_node_with(pb, &[pa, pc], cfg.clone()).unwrap();
    let (cc, mc) =
        tribes_suite::ha_node_with_extra(pc, &[pa, pb], cfg, vec![slow.clone()]).unwrap();
    for c in [&ca, &cb, &cc] {
        assert!(c.channel().wait_for_members(2, Duration::from_secs(5)));
    }
    for (m, c) in [(&ma, &ca), (&mb, &cb), (&mc, &cc)] {
        m.start(c);
    }
    let app = |m: &Arc<ha::DeltaManager>| {
        Router::new()
            .route("/set/{name}", get(set_attribute))
            .route("/get", get(attributes))
            .layer(
                ReplicationLayer::new(Arc::clone(m)).read_your_writes(Duration::from_millis(200)),
            )
    };
    let (a, b, c) = (app(&ma), app(&mb), app(&mc));
    let mut jar = Vec::new();
    get_jar(&a, "/set/a", &mut jar).await;
    let id = jar
        .iter()
        .find(|(k, _)| k == "JSESSIONID")
        .map(|(_, v)| ha::SessionId::new(v.clone()))
        .expect("session cookie");
    assert!(tribes_suite::wait_until(Duration::from_secs(5), || mc
        .version(&id)
        == Some(1)));

    // v2 (b) reaches B but not C; v3 (c), made on B, reaches C ahead of the v2 it missed,
    // and C's request to B for the whole session takes a while.
    cut.on.store(true, Ordering::SeqCst);
    slow.on.store(true, Ordering::SeqCst);
    get_jar(&a, "/set/b", &mut jar).await;
    assert!(tribes_suite::wait_until(Duration::from_secs(5), || mb
        .version(&id)
        == Some(2)));
    get_jar(&b, "/set/c", &mut jar).await;
    assert!(tribes_suite::wait_until(Duration::from_secs(5), || {
        mc.version(&id) == Some(3) || mc.stats().store.gaps > 0
    }));

    // The client's next request goes to C: it sees all three.
    assert_eq!(get_jar(&c, "/get", &mut jar).await, "a=1 b=1 c=1");
    assert_eq!(mc.version(&id), Some(3));
    assert_eq!(mc.stats().store.forced, 0, "nothing applied over the gap");
    for cl in [ca, cb, cc] {
        cl.stop().unwrap();
    }
}

/// A question to the members whose message an interceptor drops without a word (its
/// handler never hears) ends after the layer's limit: the request is answered without the
/// answer instead of waiting forever. (Time is paused: tokio moves it on
/// whenever the runtime has nothing else to do.)
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_question_dropped_on_its_way_down_does_not_hang_the_request() {
    use std::sync::atomic::AtomicBool;
    let (pa, pb) = (free_port(), free_port());
    let cfg = ha::ManagerConfig {
        sync: false,
        ..ha::ManagerConfig::default()
    };
    let cut = Arc::new(CutTo {
        port: pb,
        on: AtomicBool::new(false),
        dropped: Default::default(),
    });
    let (ca, ma) =
        tribes_suite::ha_node_with_extra(pa, &[pb], cfg.clone(), vec![cut.clone()]).unwrap();
    let (cb, mb) = tribes_suite::ha_node_with(pb, &[pa], cfg).unwrap();
    for c in [&ca, &cb] {
        assert!(c.channel().wait_for_members(1, Duration::from_secs(5)));
    }
    ma.start(&ca);
    mb.start(&cb);
    cut.on.store(true, std::sync::atomic::Ordering::SeqCst);
    // A session only B has; A's question to B about it is dropped.
    let id = mb.create_session().unwrap();
    let (a, _) = app(Arc::clone(&ma));
    let cookie = format!("JSESSIONID={}", id.as_str());
    let answered = tokio::time::timeout(
        Duration::from_secs(600),
        get_with(&a, "/counter", Some(&cookie)),
    )
    .await;
    let (status, body, _) = answered.expect("the request was answered");
    // A asked B (for the session, or for its first change if B's creation had arrived);
    // the question went nowhere (with time paused, the request may be answered before the
    // dispatch thread even got to dropping it), and the request went on without its answer.
    assert!(tribes_suite::wait_until(Duration::from_secs(5), || {
        cut.dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1
    }));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "1");
    ca.stop().unwrap();
    cb.stop().unwrap();
}

/// A handler that answers 503 when no new session may be created.
async fn counter_or_busy(session: Session) -> (StatusCode, String) {
    let n = session.get::<u64>("counter").unwrap().unwrap_or(0) + 1;
    match session.insert("counter", &n) {
        Ok(()) => (StatusCode::OK, n.to_string()),
        Err(e @ ha::SessionError::TooManySessions { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_limit_refuses_new_sessions_but_keeps_old_ones_and_copies() {
    let cfg = |limit| ha::ManagerConfig {
        sync: true,
        max_active_sessions: limit,
        ..ha::ManagerConfig::default()
    };
    let [(_ca, ma), (_cb, mb)] = started_ha_pair([cfg(Some(2)), cfg(None)]).unwrap();
    let app_a = Router::new()
        .route("/counter", get(counter_or_busy))
        .layer(ReplicationLayer::new(Arc::clone(&ma)));
    let app_b = Router::new()
        .route("/counter", get(counter_or_busy))
        .layer(ReplicationLayer::new(Arc::clone(&mb)));

    let mut cookies = Vec::new();
    for _ in 0..2 {
        let (status, body, set) = get_with(&app_a, "/counter", None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
        cookies.push(set.expect("a new session's cookie"));
    }
    // A third client: refused, with no cookie, and nothing sent for it.
    let (status, body, set) = get_with(&app_a, "/counter", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("max_active_sessions"), "{body}");
    assert_eq!(set, None);
    assert_eq!(ma.stats().rejected_sessions, 1);
    assert_eq!(mb.len(), 2, "B got copies of the two sessions only");

    // The sessions A holds keep working.
    let (status, body, _) = get_with(&app_a, "/counter", Some(&cookies[0])).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "2"));

    // B has no limit; its new session's copy reaches A although A is at its limit.
    let (status, _, set) = get_with(&app_b, "/counter", None).await;
    assert_eq!(status, StatusCode::OK);
    let from_b = set.unwrap();
    assert_eq!(ma.len(), 3, "copies are taken over the limit");
    let (status, body, _) = get_with(&app_a, "/counter", Some(&from_b)).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_carries_the_configured_attributes() {
    use ha::layer::{CookieAttributes, SameSite};
    let manager = ha::DeltaManager::new("/", ha::ManagerConfig::default());
    let layer = ReplicationLayer::new(manager)
        .cookie_attributes(CookieAttributes {
            secure: true,
            same_site: Some(SameSite::Strict),
            domain: Some("example.com".into()),
            ..CookieAttributes::default()
        })
        .unwrap();
    let resp = router(layer)
        .oneshot(Request::get("/counter").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let set = resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(set.starts_with("JSESSIONID="), "{set}");
    assert!(
        set.ends_with("; Path=/; Domain=example.com; Secure; HttpOnly; SameSite=Strict"),
        "{set}"
    );
}

async fn log_out(session: Session) -> &'static str {
    session.invalidate();
    "bye"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_shared_by_every_copy_of_a_layer_and_a_logout_clears_both_cookies() {
    let manager = ha::DeltaManager::new("/", ha::ManagerConfig::default());
    let early = ReplicationLayer::new(manager);
    let layer = (early.clone())
        .read_your_writes(Duration::from_millis(20))
        .filter(r"/static/.*")
        .unwrap();
    let app = Router::new()
        .route("/counter", get(counter))
        .route("/logout", get(log_out))
        .layer(layer.clone());
    let resp = app
        .clone()
        .oneshot(Request::get("/counter").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let cookies: Vec<String> = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .collect();
    let jar = cookies.join("; ");
    assert!(
        jar.contains("JSESSIONID=") && jar.contains("JSESSIONID_V="),
        "{jar}"
    );
    let resp = app
        .oneshot(
            Request::get("/logout")
                .header(header::COOKIE, &jar)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let cleared: Vec<&str> = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    for name in ["JSESSIONID=;", "JSESSIONID_V=;"] {
        assert!(
            cleared
                .iter()
                .any(|c| c.starts_with(name) && c.contains("Max-Age=0")),
            "{name} cleared: {cleared:?}"
        );
    }
    // The layer taken before the builder calls counts the same requests.
    assert_eq!(
        early
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(
        layer
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

async fn remember_me(session: Session) -> String {
    session.insert("user", "ada").unwrap();
    assert!(session.set_max_inactive_secs(1234));
    let created = session.created_ms().unwrap();
    assert!(created > 0 && session.last_access_ms().unwrap() >= created);
    format!("{:?} {:?}", session.names(), session.max_inactive_secs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_sets_its_session_s_interval_and_every_copy_keeps_it() {
    let sync = ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] = started_ha_pair([sync.clone(), sync]).unwrap();
    let app = Router::new()
        .route("/remember", get(remember_me))
        .layer(ReplicationLayer::new(Arc::clone(&ma)));
    let (_, body, set) = get_with(&app, "/remember", None).await;
    assert_eq!(body, r#"["user"] Some(1234)"#);
    let id = ha::SessionId::new(set.unwrap().trim_start_matches("JSESSIONID="));
    assert_eq!(ma.session(&id).unwrap().max_inactive_secs(), 1234);
    assert_eq!(
        mb.session(&id).unwrap().max_inactive_secs(),
        1234,
        "replicated"
    );
    ca.stop().unwrap();
    cb.stop().unwrap();
}

/// Two synchronously replicating nodes; the first sends through one dispatch thread that
/// takes one message at a time and queues one more (returned, to look at its queue).
#[allow(clippy::type_complexity)]
fn sync_pair_with_a_one_place_queue() -> (
    Arc<tribes::interceptors::MessageDispatchInterceptor>,
    [(ha::Cluster, Arc<ha::DeltaManager>); 2],
) {
    let sync = || ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let dispatch = Arc::new(tribes::interceptors::MessageDispatchInterceptor::new(
        tribes::interceptors::DispatchConfig {
            threads: 1,
            max_queue_messages: 1,
            batch: 1,
            ..tribes::interceptors::DispatchConfig::default()
        },
    ));
    let nodes =
        tribes_suite::started_ha_pair_custom([sync(), sync()], Vec::new(), Arc::clone(&dispatch))
            .unwrap();
    (dispatch, nodes)
}

/// With synchronous replication and the dispatch queue full (the members are slow to
/// acknowledge), a request's change used to be sent on the request's own runtime thread,
/// which then waited for the members' ACKs with every other request it carries. Now the
/// change waits for room in the queue without holding the thread: another request is
/// answered meanwhile, and the waiting one still replicates before it answers.
#[tokio::test(flavor = "current_thread")]
async fn a_full_dispatch_queue_does_not_block_the_runtime() {
    use std::sync::atomic::Ordering;
    let (dispatch, [(_ca, ma), (cb, mb)]) = sync_pair_with_a_one_place_queue();
    // B takes half a second over every message from now on.
    let (slow, entered) = hold_messages(cb.channel(), Duration::from_millis(500));
    let (app_a, layer) = app(ma.clone());
    // The first request's CREATED goes out and waits for B; its delta takes the queue's
    // one place.
    let mut requests = Vec::new();
    let a = app_a.clone();
    requests.push(tokio::spawn(
        async move { get_with(&a, "/counter", None).await },
    ));
    while !entered.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let a = app_a.clone();
    requests.push(tokio::spawn(
        async move { get_with(&a, "/counter", None).await },
    ));
    while dispatch.queued_messages() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The second and third find the queue full and wait for room; meanwhile the runtime's
    // only thread answers another request at once.
    let start = std::time::Instant::now();
    let a = app_a.clone();
    requests.push(tokio::spawn(
        async move { get_with(&a, "/counter", None).await },
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, body, _) = get_with(&app_a, "/static/logo.png", None).await;
    let took = start.elapsed();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "static"));
    assert!(
        took < Duration::from_millis(400),
        "the static request waited {took:?}: a send held the runtime thread"
    );
    // A request dropped while its change waits for room (its client went away): the
    // change is not sent, but counted as failed (and so retold), not silently lost.
    let errors_before = ma.stats().send_errors;
    let a = app_a.clone();
    let dropped = tokio::spawn(async move { get_with(&a, "/counter", None).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    assert!(ma.stats().send_errors > errors_before);
    // Every request replicated before it answered, the one that waited for room too.
    for r in requests {
        let (status, body, cookie) = r.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
        let cookie = cookie.expect("a new session");
        let id = ha::SessionId::new(cookie.trim_start_matches("JSESSIONID="));
        assert!(mb.contains(&id), "B lacks {id}");
    }
    assert_eq!(layer.stats().errors.load(Ordering::Relaxed), 0);
    slow.store(false, Ordering::SeqCst);
}

/// Requests whose changes wait for room in a full dispatch queue get it in the order they
/// asked: a later request used to take a freed place first whenever its retry timer (which
/// starts short) came up before the older one's (grown to 32 ms), and an old request could
/// wait out its whole 3 s under a queue that stayed full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_room_in_the_dispatch_queue_get_it_in_order() {
    use std::sync::atomic::Ordering;
    let (dispatch, [(_ca, ma), (cb, _mb)]) = sync_pair_with_a_one_place_queue();
    // The sessions B hears of, in the order their first message arrives.
    let heard = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let h = Arc::clone(&heard);
    cb.channel()
        .add_channel_listener(move |m: &tribes::ChannelMessage| {
            if let Ok(sm) = ha::SessionMessage::decode(&m.payload) {
                let id = match &sm.event {
                    ha::SessionEvent::Created { id, .. } => Some(id.as_str().to_string()),
                    ha::SessionEvent::Delta(d) => Some(d.session_id.as_str().to_string()),
                    _ => None,
                };
                let mut heard = h.lock();
                if let Some(id) = id.filter(|id| !heard.contains(id)) {
                    heard.push(id);
                }
            }
            Ok(())
        });
    let (slow, entered) = hold_messages(cb.channel(), Duration::from_millis(150));
    let (app_a, _) = app(ma);
    let request = |app: &Router| {
        let a = app.clone();
        tokio::spawn(async move { get_with(&a, "/counter", None).await })
    };
    // The first request's change holds the dispatch thread (waiting for B), the second's
    // takes the queue's one place.
    let first = request(&app_a);
    while !entered.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = request(&app_a);
    while dispatch.queued_messages() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // (Time for the second request to have sent, or parked, all it sends.)
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The older one waits for room from here on.
    let older = request(&app_a);
    // Newer ones, up to just before the place frees (B holds each message 0.15 s): their
    // first looks come every few milliseconds, the older one's every 32 ms by then. (The
    // last of some fourteen messages gets its place after about 2 s, within the 3 s a
    // message may wait.)
    let mut requests = vec![first, second, older];
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        requests.push(request(&app_a));
    }
    let mut ids = Vec::new();
    for r in requests {
        let (status, body, cookie) = r.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
        let cookie = cookie.expect("a new session");
        ids.push(cookie.trim_start_matches("JSESSIONID=").to_string());
    }
    assert_eq!(*heard.lock(), ids, "B heard the sessions out of order");
    slow.store(false, Ordering::SeqCst);
}

/// Browsers send what sites set: a non-ASCII byte in another cookie used to make the
/// whole `Cookie` header unreadable (a new session, and a Set-Cookie that replaced the
/// user's); and of two `JSESSIONID` cookies (set for different paths) only the first was
/// tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_is_found_among_odd_and_repeated_cookies() {
    let manager = ha::DeltaManager::new("/", ha::ManagerConfig::default());
    let app = router(ReplicationLayer::new(manager));
    let (_, body, cookie) = get_with(&app, "/counter", None).await;
    assert_eq!(body, "1");
    let sid = cookie.unwrap();
    let send = |header_value: Vec<u8>| {
        let req = Request::get("/counter")
            .header(
                header::COOKIE,
                http::HeaderValue::from_bytes(&header_value).unwrap(),
            )
            .body(Body::empty())
            .unwrap();
        app.clone().oneshot(req)
    };
    let mut odd = b"theme=caf\xe9; ".to_vec();
    odd.extend_from_slice(sid.as_bytes());
    let resp = send(odd).await.unwrap();
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    let body = axum::body::to_bytes(resp.into_body(), 64).await.unwrap();
    assert_eq!(&body[..], b"2");
    let repeated = format!("JSESSIONID=0123456789abcdef; {sid}").into_bytes();
    let resp = send(repeated).await.unwrap();
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    let body = axum::body::to_bytes(resp.into_body(), 64).await.unwrap();
    assert_eq!(&body[..], b"3");
}

/// Holds every session delta this node receives while `frozen` is set (at most 10 s): a
/// member that stopped (a long pause, SIGSTOP) with the changes waiting in its sockets.
struct FreezeDeltas {
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl tribes::interceptors::Interceptor for FreezeDeltas {
    fn name(&self) -> &'static str {
        "freeze-deltas"
    }
    fn received(
        &self,
        msg: tribes::ChannelMessage,
        next: tribes::interceptors::Up<'_>,
    ) -> Result<(), tribes::ProcessError> {
        let delta = ha::SessionMessage::decode(&msg.payload)
            .is_ok_and(|m| matches!(m.event, ha::SessionEvent::Delta(_)));
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while delta
            && self.frozen.load(std::sync::atomic::Ordering::SeqCst)
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        next.received(msg)
    }
}

/// Synchronous replication to a member that froze past the send timeout fails (counted),
/// and the request is answered. When the client's next request reaches that member while
/// the change still waits in its socket, plain sync answers from the old copy (a trial
/// saw this after SIGSTOP/SIGCONT); with `read_your_writes` the member sees from the
/// version cookie that it is behind, fetches the session and answers right.
async fn next_request_on_a_member_that_froze(read_your_writes: bool) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sync = || ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let frozen = Arc::new(AtomicBool::new(false));
    let freeze: Arc<dyn tribes::interceptors::Interceptor> = Arc::new(FreezeDeltas {
        frozen: Arc::clone(&frozen),
    });
    // The first node is the one that freezes.
    let [(cl, ml), (cw, mw)] =
        tribes_suite::started_ha_pair_with_extra([sync(), sync()], vec![freeze]).unwrap();
    let app = |m: Arc<ha::DeltaManager>| {
        // Sync layers check versions by default since this test.
        let layer = ReplicationLayer::new(m);
        let layer = if read_your_writes {
            layer
        } else {
            layer.without_read_your_writes()
        };
        Router::new().route("/counter", get(counter)).layer(layer)
    };
    let (lagger, writer) = (app(ml), app(mw));
    let mut jar = Vec::new();
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "1");
    frozen.store(true, Ordering::SeqCst);
    // Its replication to the frozen member times out (3 s); the writer answers anyway.
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "2");
    let third = get_jar(&lagger, "/counter", &mut jar).await;
    frozen.store(false, Ordering::SeqCst);
    cl.stop().unwrap();
    cw.stop().unwrap();
    third
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_version_checks_a_member_that_froze_answers_from_its_old_copy() {
    // The limit `without_read_your_writes` documents: "3" would be right.
    assert_eq!(next_request_on_a_member_that_froze(false).await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_member_that_froze_fetches_what_it_missed() {
    assert_eq!(next_request_on_a_member_that_froze(true).await, "3");
}

/// A member whose process froze (here: the relay every message to it goes through stops,
/// while the kernel still accepts connections) costs one request the send timeout; the
/// failed send gets it probed, the read test of `Cluster::failure_detector` finds it
/// frozen, and the next requests answer at once. Thawed, it is a member again without a
/// restart, and serves the session with every change it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_costs_one_slow_request_and_is_back_when_it_thaws() {
    use std::time::Instant;
    let sync = || ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let (pa, pb) = (free_port(), free_port());
    let relay = tribes_suite::FreezableRelay::start(([127, 0, 0, 1], pb).into()).unwrap();
    let (cb, mb) = tribes_suite::ha_node_with(pb, &[pa], sync()).unwrap();
    // The writer knows the other member by the relay's address.
    let (ca, ma) = tribes_suite::ha_node_with(pa, &[relay.addr().port()], sync()).unwrap();
    for c in [&ca, &cb] {
        assert!(c.channel().wait_for_members(1, Duration::from_secs(5)));
    }
    ma.start(&ca);
    mb.start(&cb);
    let (writer, _) = app(ma);
    let (frozen, _) = app(mb);
    let mut jar = Vec::new();
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "1");
    assert_eq!(get_jar(&frozen, "/counter", &mut jar).await, "2");

    relay.set_frozen(true);
    // This request's replication waits for the ACK until the send timeout (3 s).
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "3");
    assert!(
        tribes_suite::wait_until(Duration::from_secs(10), || ca
            .channel()
            .members()
            .is_empty()),
        "the frozen member is reported gone (send timeout, then the read test's 5 s)"
    );
    // No member left to wait for: the next requests do not wait out another send timeout.
    let t0 = Instant::now();
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "4");
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "5");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "two requests took {:?}",
        t0.elapsed()
    );

    relay.set_frozen(false);
    let back = tribes_suite::wait_until(Duration::from_secs(10), || {
        ca.channel().heartbeat();
        std::thread::sleep(Duration::from_millis(50));
        !ca.channel().members().is_empty()
    });
    assert!(
        back,
        "the thawed member answers a heartbeat's probe and is a member again"
    );
    // It missed versions 4 and 5: the version cookie makes it fetch them.
    assert_eq!(get_jar(&frozen, "/counter", &mut jar).await, "6");
    assert_eq!(get_jar(&writer, "/counter", &mut jar).await, "7");
    assert_eq!(get_jar(&frozen, "/counter", &mut jar).await, "8");
    ca.stop().unwrap();
    cb.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cookie_after_a_logout_asks_nobody() {
    // Sync layers check the version cookie; a tab still sending a logged-out session's
    // cookies must not make the node ask every member about it (and log a warning).
    let sync = || ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let [(ca, ma), (cb, mb)] = started_ha_pair([sync(), sync()]).unwrap();
    let app = |m: Arc<ha::DeltaManager>| {
        Router::new()
            .route("/counter", get(counter))
            .route("/logout", get(log_out))
            .layer(ReplicationLayer::new(m))
    };
    let (a, b) = (app(ma), app(Arc::clone(&mb)));
    let mut jar = Vec::new();
    assert_eq!(get_jar(&a, "/counter", &mut jar).await, "1");
    assert_eq!(get_jar(&a, "/counter", &mut jar).await, "2");
    let stale = jar.clone();
    assert!(stale.iter().any(|(k, _)| k == "JSESSIONID_V"), "{stale:?}");
    assert_eq!(get_jar(&a, "/logout", &mut jar).await, "bye");
    let mut old = stale;
    assert_eq!(
        get_jar(&b, "/counter", &mut old).await,
        "1",
        "a new session"
    );
    assert_eq!(mb.stats().version_fetches, 0);
    ca.stop().unwrap();
    cb.stop().unwrap();
}

/// The dispatch queue is shared out by destinations. With the broadcasts' share full
/// because one member (C) is slow, a fetch's questions (one to each member, each its own
/// share) used to wait in the manager's line behind the broadcasts, for up to 3 s, and
/// the user got a new session although a member had theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_question_does_not_wait_behind_broadcasts_to_a_slow_member() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let sync = || ha::ManagerConfig {
        sync: true,
        ..ha::ManagerConfig::default()
    };
    let dispatch = Arc::new(tribes::interceptors::MessageDispatchInterceptor::new(
        tribes::interceptors::DispatchConfig {
            threads: 64,
            max_queue_messages: 1,
            batch: 1,
            ..tribes::interceptors::DispatchConfig::default()
        },
    ));
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let (cb, mb) = tribes_suite::ha_node_with(pb, &[pa, pc], sync()).unwrap();
    let (cc, mc) = tribes_suite::ha_node_with(pc, &[pa, pb], sync()).unwrap();
    let (ca, ma) =
        tribes_suite::ha_node_custom(pa, &[pb, pc], sync(), Vec::new(), Arc::clone(&dispatch))
            .unwrap();
    for c in [&ca, &cb, &cc] {
        assert!(c.channel().wait_for_members(2, Duration::from_secs(5)));
    }
    for (m, c) in [(&ma, &ca), (&mb, &cb), (&mc, &cc)] {
        m.start(c);
    }
    // C is slow with session changes only (it answers questions at once).
    let slow = Arc::new(AtomicBool::new(true));
    let s = Arc::clone(&slow);
    cc.channel()
        .add_channel_listener(move |m: &tribes::ChannelMessage| {
            let change = ha::SessionMessage::decode(&m.payload).is_ok_and(|sm| {
                matches!(
                    sm.event,
                    ha::SessionEvent::Created { .. } | ha::SessionEvent::Delta(_)
                )
            });
            if change && s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(400));
            }
            Ok(())
        });
    let (app_a, _) = app(Arc::clone(&ma));
    let mut reqs = Vec::new();
    for _ in 0..5 {
        let a = app_a.clone();
        reqs.push(tokio::spawn(
            async move { get_with(&a, "/counter", None).await },
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A session nobody has: B and C are asked, one question each, to their own shards.
    let m = Arc::clone(&ma);
    let took = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        m.fetch(&ha::SessionId::new("nosuchsession0000"));
        t0.elapsed()
    })
    .await
    .unwrap();
    slow.store(false, Ordering::SeqCst);
    for r in reqs {
        let _ = r.await;
    }
    // Behind the broadcasts it took 1.7 s and more; alone, a few milliseconds.
    assert!(
        took < Duration::from_millis(1000),
        "the fetch waited {took:?} behind broadcasts"
    );
    for c in [ca, cb, cc] {
        c.stop().unwrap();
    }
}
