//! `DeltaManager`: all-to-all delta replication of one context's sessions over a [`Cluster`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use parking_lot::{Condvar, Mutex};
use tribes::{Member, ProcessError, SendError, SendOptions};

use crate::cluster::{Cluster, ClusterInner, DonorQueue};
use crate::error::SessionError;
use crate::message::{SessionEvent, SessionMessage};
use crate::session::{Session, SessionId};
use crate::stats::{Counters, ManagerStats};
use crate::store::{Applied, SessionStore};
use crate::transfer::{Offer, StateTransfer};

/// Members [`DeltaManager::fetch`] asks in turn before it gives up on a session id.
const MAX_MEMBERS_ASKED: usize = 3;

/// Settings of a [`DeltaManager`].
#[derive(Clone)]
pub struct ManagerConfig {
    /// Max inactive interval of new sessions, seconds; zero or negative: they never expire
    /// (servlet convention). Default 1800 (servlet default).
    pub max_inactive_secs: i64,
    /// How long `start` waits for the state of the oldest member. Default 60 s (Tribes
    /// `stateTransferTimeout`). Also how long this node, as the donor, gives one joining
    /// member while others wait for their state: past it (counted from when the donor
    /// thread took the request), and with another request waiting, the donor tells the
    /// joiner to ask elsewhere and moves on. A joiner alone gets all of it, however long
    /// it takes (batches that arrive after its own timeout are still applied).
    pub state_transfer_timeout: Duration,
    /// Sessions per state-transfer message. Default 1000 (Tribes `sendAllSessionsSize`).
    pub send_all_sessions_size: usize,
    /// Replicate synchronously (`USE_ACK | SYNCHRONIZED_ACK`: the request waits until every
    /// member applied the change) instead of asynchronously (Tribes' default
    /// `channelSendOptions=8`). Default false.
    pub sync: bool,
    /// Route suffix for new session ids (Tomcat's jvmRoute). Default none.
    pub route: Option<String>,
    /// Queued messages during state transfer. Default 65536.
    pub max_transfer_queue: usize,
    /// Only attributes whose name passes are replicated (Tribes
    /// `sessionAttributeNameFilter`); `None` = all. Default none.
    pub attribute_filter: Option<AttributeFilter>,
    /// On [`DeltaManager::stop`], expire this node's sessions cluster-wide (true) or only
    /// locally (false). Default false (Tribes `expireSessionsOnShutdown`).
    pub expire_sessions_on_shutdown: bool,
    /// A request whose session id this node does not hold asks the members for it
    /// ([`DeltaManager::fetch`]) before the application sees no session; at most this many
    /// asks at a time (each is up to three synchronous round trips, so ids from forged
    /// cookies cannot tie up more), 0 = never ask. Default 32. Not in Tribes, where
    /// such a request starts a new session: with asynchronous replication behind a
    /// round-robin balancer that is most requests that follow a session's first one.
    /// Also bounds the requests that wait for a change in flight
    /// ([`DeltaManager::catch_up`]; 0 = they do not wait either).
    pub max_concurrent_fetches: usize,
    /// Most sessions this node holds (primaries and copies) before it refuses to create
    /// one more ([`SessionError::TooManySessions`], counted as
    /// [`ManagerStats::rejected_sessions`](crate::ManagerStats::rejected_sessions)); `None` =
    /// no limit. Default none (Tomcat `maxActiveSessions=-1`). Copies from members are
    /// always taken, even over the limit: refusing them would lose sessions on a failover.
    /// With a limit on every node, it bounds the memory a flood of new clients (or of
    /// cookie-less requests) can take. At the limit, sessions that timed out are swept at
    /// once (at most once a second) rather than at the next periodic sweep.
    pub max_active_sessions: Option<usize>,
}

/// A predicate on attribute names, for [`ManagerConfig::attribute_filter`].
pub type AttributeFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_inactive_secs: 1800,
            state_transfer_timeout: Duration::from_secs(60),
            send_all_sessions_size: 1000,
            sync: false,
            route: None,
            max_transfer_queue: 65536,
            attribute_filter: None,
            expire_sessions_on_shutdown: false,
            max_concurrent_fetches: 32,
            max_active_sessions: None,
        }
    }
}

/// The longest route a node may have: it goes into every session id, which may be at most
/// [`SessionId::MAX_LEN`] characters.
const MAX_ROUTE_LEN: usize = 64;

impl ManagerConfig {
    /// Checks the settings (done by [`Cluster::register`]).
    ///
    /// ```
    /// let bad = ha::ManagerConfig { route: Some("node 1".into()), ..Default::default() };
    /// assert!(bad.validate("/").is_err());
    /// assert!(ha::ManagerConfig::default().validate("/").is_ok());
    /// ```
    pub fn validate(&self, context: &str) -> Result<(), SessionError> {
        let invalid = |field, reason: &str| {
            Err(SessionError::InvalidConfig {
                context: context.to_string(),
                field,
                reason: reason.to_string(),
            })
        };
        if let Some(route) = &self.route {
            // It ends up in a cookie after a '.': letters, digits, '-' and '_' only.
            let ok = !route.is_empty()
                && route.len() <= MAX_ROUTE_LEN
                && route
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return invalid(
                    "route",
                    "must be 1 to 64 letters, digits, '-' or '_' (it goes into the session cookie)",
                );
            }
        }
        if self.send_all_sessions_size == 0 {
            return invalid("send_all_sessions_size", "must be at least 1");
        }
        if self.state_transfer_timeout.is_zero() {
            return invalid(
                "state_transfer_timeout",
                "must be above zero (a joining node would start without waiting for any state)",
            );
        }
        if self.max_transfer_queue == 0 {
            return invalid(
                "max_transfer_queue",
                "must be at least 1 (messages arriving during a state transfer would all be dropped)",
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for ManagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerConfig")
            .field("max_inactive_secs", &self.max_inactive_secs)
            .field("state_transfer_timeout", &self.state_transfer_timeout)
            .field("send_all_sessions_size", &self.send_all_sessions_size)
            .field("sync", &self.sync)
            .field("route", &self.route)
            .field("attribute_filter", &self.attribute_filter.is_some())
            .field(
                "expire_sessions_on_shutdown",
                &self.expire_sessions_on_shutdown,
            )
            .field("max_concurrent_fetches", &self.max_concurrent_fetches)
            .field("max_transfer_queue", &self.max_transfer_queue)
            .field("max_active_sessions", &self.max_active_sessions)
            .finish()
    }
}

/// Replicates every session change of one context to all members (Tribes `DeltaManager`).
pub struct DeltaManager {
    context: String,
    cfg: ManagerConfig,
    store: Mutex<SessionStore>,
    transfer: Mutex<Option<StateTransfer>>,
    transfer_done: Condvar,
    /// State-transfer batches received so far (a donor that sends is not silent).
    transfer_batches: AtomicU64,
    cluster: Mutex<Weak<ClusterInner>>,
    /// Shared with the send handlers of asynchronous messages, which count their failures.
    counters: Arc<Counters>,
    fetching: Arc<AtomicUsize>,
    /// Waiting [`DeltaManager::version_reached`] futures (also those of
    /// [`DeltaManager::catch_up`]); while there are none, applying a change wakes nobody.
    version_waiters: AtomicUsize,
    /// Their wakers, taken and woken when a replicated change is applied; a future removes
    /// its own entry when dropped, so there is at most one per waiting future.
    version_wakers: Mutex<HashMap<u64, Waker>>,
    /// Messages that wait for room in the dispatch queue (see `send_acked`), oldest first:
    /// each is tried only once those ahead of it got a place, so requests get the room in
    /// the order they asked for it. Not bounded by a number: each entry belongs to a
    /// request in flight (a handful per request), and leaves when it is sent, fails after
    /// [`QUEUE_WAIT`], or its request is dropped.
    room: Mutex<VecDeque<Arc<AckSlot>>>,
    /// Keys of waiting [`VersionReached`] futures in `version_wakers`.
    next_waker_key: AtomicU64,
    /// This node in the changes it makes ([`crate::Delta::origin`]): the first 8 bytes of
    /// its member id, once registered with a cluster (0 before).
    origin: AtomicU64,
    /// [`DeltaManager::start`] has finished: until then a state request gets
    /// [`SessionEvent::StateNotReady`] (what is here is not the cluster's state yet).
    ready: AtomicBool,
    /// When a new session at [`ManagerConfig::max_active_sessions`] last swept expired
    /// sessions (ms; see `create_session_unannounced`).
    limit_sweep_ms: AtomicI64,
    /// Sessions (base ids) a replication of which failed for some member, so members may
    /// hold an older copy: the session's next completion here, or else the next expiry
    /// sweep, tells them its version, and a member behind fetches it. At most
    /// [`MAX_LAGGING`].
    lagging: Arc<Lagging>,
    /// Sessions (base ids) whose expiry or invalidation failed to reach some member, whose
    /// copy may then outlive it (for good, with an interval of zero or less): the next
    /// expiry sweep tells the members again. At most [`MAX_LAGGING`].
    unexpired: Arc<Lagging>,
}

/// Sessions (base ids) a replication of which failed for some member (see
/// `DeltaManager::lagging`).
#[derive(Default)]
struct Lagging {
    set: Mutex<HashSet<String>>,
    /// `set` is not empty: requests skip its lock when it is.
    any: AtomicBool,
    /// Sessions not remembered because the set was full.
    overflow: AtomicU64,
}

impl Lagging {
    /// Takes every remembered base id.
    fn drain(&self) -> Vec<String> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut set = self.set.lock();
        self.any.store(false, Ordering::Release);
        set.drain().collect()
    }

    /// Whether `base` was remembered; forgets it.
    fn take(&self, base: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut set = self.set.lock();
        let was = set.remove(base);
        if set.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        was
    }

    fn note(&self, id: &SessionId) {
        let mut set = self.set.lock();
        if set.len() < MAX_LAGGING {
            set.insert(id.base().to_owned());
            self.any.store(true, Ordering::Release);
        } else if !set.contains(id.base()) {
            let n = self.overflow.fetch_add(1, Ordering::Relaxed) + 1;
            if crate::sparse(n) {
                warn!(target: "ha::manager", "{MAX_LAGGING} sessions already wait to be retold after failed replications; {n} more not remembered (their members catch up on their next change)");
            }
        }
    }
}

/// Logs the `n`th replication failure of a manager ([`crate::sparse`]). While a member is
/// down (until the failure detector removes it) or the dispatch queue is full, every
/// request fails alike; one line each would bury everything else in the log.
fn note_failure(context: &str, e: &SendError, n: u64) {
    if crate::sparse(n) {
        warn!(target: "ha::manager", "{context}: replication failed: {e} ({n} failures so far)");
    } else {
        debug!(target: "ha::manager", "{context}: replication failed: {e}");
    }
}

/// Hears how an asynchronous message about a session ended, on the dispatch thread: a
/// failure makes the session lagging.
struct NoteLagging {
    lagging: Arc<Lagging>,
    session: SessionId,
    counters: Arc<Counters>,
}

impl tribes::interceptors::ErrorHandler for NoteLagging {
    fn handle_completion(&self, _id: tribes::UniqueId) {}

    fn handle_error(&self, error: SendError, _id: tribes::UniqueId) {
        // Missed only members that left: not a failure to count or tell, but remembered,
        // so that a member that comes back (a thawed one keeps its identity) is told.
        if error.missed_only_departed() {
            self.lagging.note(&self.session);
            return;
        }
        // With a handler, the dispatch thread leaves the telling to it, sparsely as for the
        // manager's other failures (a dead member fails every message until the failure
        // detector removes it); a stopping dispatcher's leftovers only at debug level.
        let n = self.counters.send_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if crate::sparse(n) && !matches!(error, SendError::NotStarted) {
            warn!(target: "ha::manager", "replication of session {} failed: {error} ({n} failures so far)", self.session);
        } else {
            debug!(target: "ha::manager", "replication of session {} failed: {error}", self.session);
        }
        self.lagging.note(&self.session);
    }
}

/// How many sessions with a failed replication are remembered for a retelling.
const MAX_LAGGING: usize = 10_000;

/// The access notice for `s`: its last access and the change it is at, so a member whose
/// copy is behind fetches it.
fn access_notice(s: &Session) -> SessionEvent {
    let (version, origin) = s.last_change();
    SessionEvent::Accessed {
        id: s.id().clone(),
        at_ms: s.last_access_ms(),
        version,
        origin,
    }
}

/// The session a message is about, when it changes or vouches for a copy.
fn replicated_session(event: &SessionEvent) -> Option<&SessionId> {
    match event {
        SessionEvent::Delta(d) => Some(&d.session_id),
        SessionEvent::Created { id, .. } | SessionEvent::Accessed { id, .. } => Some(id),
        SessionEvent::ChangeSessionId { new, .. } => Some(new),
        // A repair's answer: if it is lost, the asker stays behind.
        SessionEvent::SessionData { session } => Some(session.id()),
        _ => None,
    }
}

impl DeltaManager {
    /// A manager for `context` (e.g. `/shop`).
    pub fn new(context: impl Into<String>, cfg: ManagerConfig) -> Arc<Self> {
        let store = Mutex::new(SessionStore::new(cfg.max_inactive_secs));
        Arc::new(Self {
            context: context.into(),
            cfg,
            store,
            transfer: Mutex::new(None),
            transfer_done: Condvar::new(),
            transfer_batches: AtomicU64::new(0),
            cluster: Mutex::new(Weak::new()),
            counters: Arc::default(),
            fetching: Arc::new(AtomicUsize::new(0)),
            version_waiters: AtomicUsize::new(0),
            version_wakers: Mutex::new(HashMap::new()),
            room: Mutex::new(VecDeque::new()),
            next_waker_key: AtomicU64::new(0),
            origin: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            limit_sweep_ms: AtomicI64::new(i64::MIN / 2),
            lagging: Arc::default(),
            unexpired: Arc::default(),
        })
    }

    /// Where a failed send of `event` is remembered for a retelling, and under which
    /// session: `unexpired` for an expiry, `lagging` for what changes or vouches for a copy.
    fn lagging_for<'e>(&self, event: &'e SessionEvent) -> Option<(&Arc<Lagging>, &'e SessionId)> {
        match event {
            SessionEvent::Expired { id } => Some((&self.unexpired, id)),
            other => replicated_session(other).map(|id| (&self.lagging, id)),
        }
    }

    /// Tells the members the version of every session remembered as lagging that is still
    /// served here (an access notice: a member behind fetches the session). Called by the
    /// expiry sweep, for sessions no request touched since their replication failed.
    fn retell_lagging(&self) {
        let lagging = self.lagging.drain();
        if lagging.is_empty() {
            return;
        }
        let now = crate::now_ms();
        let notices: Vec<SessionEvent> = {
            let mut store = self.store.lock();
            lagging
                .iter()
                .filter_map(|base| {
                    // Wherever it is held now: with its route, or renamed since.
                    let id = store.follow(&SessionId::new(base.clone()))?;
                    let s = store.get_mut(&id)?;
                    if !s.is_primary() {
                        return None;
                    }
                    s.mark_replicated(now);
                    Some(access_notice(s))
                })
                .collect()
        };
        // Asynchronous whatever the replication mode: the sweep's thread must not wait
        // for thousands of ACKs from a member that hangs. A failure remembers the session
        // again (the handler), for the next sweep.
        for notice in notices {
            let _ = self.send(&self.message(notice), None, SendOptions::ASYNCHRONOUS);
        }
    }

    /// Tells the members again of every expiry or invalidation that failed to reach one of
    /// them (unless the session is held here again). Called by the expiry sweep.
    fn retell_unexpired(&self) {
        let bases = self.unexpired.drain();
        if bases.is_empty() {
            return;
        }
        let gone: Vec<SessionId> = {
            let store = self.store.lock();
            (bases.into_iter().map(SessionId::new))
                .filter(|id| store.follow(id).is_none())
                .collect()
        };
        self.announce_expired(gone, SendOptions::ASYNCHRONOUS);
    }

    /// Takes this node's identity in the changes it makes from `local` (its member).
    pub(crate) fn set_origin(&self, local: &Member) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&local.unique_id.0[..8]);
        self.origin
            .store(u64::from_be_bytes(head), Ordering::Relaxed);
    }

    /// The context name messages are routed by.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The settings.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// Pulls the state from a member (the oldest first; bounded by the transfer timeout),
    /// then replays what arrived meanwhile. A member that is itself still receiving its
    /// state says so, and the next one is asked; if every member asked was starting too,
    /// nobody has sessions yet and the transfer is complete. Returns false when no member
    /// answered in time (the manager still starts, as in Tribes). Until this returns, other
    /// nodes' state requests are answered "not ready": call it once the cluster runs, before
    /// serving requests. It blocks (up to `state_transfer_timeout`): call it from `main`
    /// or a blocking task, not from async code.
    ///
    /// A channel whose membership needs time to find the members that are up (multicast:
    /// [`GroupChannel::discovery_time`](tribes::GroupChannel::discovery_time), two beacon
    /// intervals) is given that time when it has no member yet, so a node started right
    /// after its cluster does not take itself for the first one.
    pub fn start(&self, cluster: &Cluster) -> bool {
        *self.cluster.lock() = cluster.inner();
        let channel = cluster.channel();
        self.set_origin(&channel.local_member());
        let members = || {
            let service = channel.service_members();
            if service.is_empty() {
                channel.members()
            } else {
                service
            }
        };
        let mut candidates = members();
        let discovery = channel.discovery_time();
        if candidates.is_empty() && !discovery.is_zero() {
            channel.wait_for_members(1, discovery);
            candidates = members();
        }
        if candidates.is_empty() {
            info!(target: "ha::manager", "{}: no members; starting as the first node, with no sessions to take over", self.context);
            self.ready.store(true, Ordering::Release);
            return true;
        }
        let now = crate::now_ms();
        let started = Instant::now();
        let deadline = crate::deadline(started, self.cfg.state_transfer_timeout);
        *self.transfer.lock() = Some(StateTransfer::new(
            now,
            i64::try_from(self.cfg.state_transfer_timeout.as_millis()).unwrap_or(i64::MAX),
            self.cfg.max_transfer_queue,
        ));
        let request = self.message(SessionEvent::GetAllSessions);
        // Acknowledged on receipt: the donor sends its state from its donor thread, which
        // can take longer than the send timeout; the transfer's own timeout bounds the wait.
        let ack = SendOptions::USE_ACK;
        // A member that sends nothing for this long is given up for the next one (a donor
        // that sends batches is waited for up to the whole timeout).
        let quiet = (self.cfg.state_transfer_timeout / 4).max(Duration::from_secs(1));
        let (mut donor, mut complete, mut starting) = (None, false, 0);
        for m in &candidates {
            if let Err(e) = self.send(&request, Some(m), ack) {
                warn!(target: "ha::manager", "state request to {m} failed: {e}");
                continue;
            }
            match self.wait_for_state(deadline, quiet) {
                StateWait::Complete => {
                    info!(target: "ha::manager", "{}: state received from {m}", self.context);
                    (donor, complete) = (Some(m), true);
                    break;
                }
                StateWait::NotReady => {
                    info!(target: "ha::manager", "{}: {m} is starting too; asking the next member", self.context);
                    starting += 1;
                }
                StateWait::Silent => {
                    warn!(target: "ha::manager", "{}: no session state from {m} for {quiet:?}; asking the next member", self.context);
                }
                StateWait::TimedOut => {
                    warn!(target: "ha::manager", "{}: no session state from {m} within {:?}", self.context, self.cfg.state_transfer_timeout);
                    donor = Some(m);
                    break;
                }
            }
        }
        if donor.is_none() && starting == candidates.len() {
            info!(target: "ha::manager", "{}: every member is starting too; no state to receive", self.context);
            complete = true;
        }
        let replay = self
            .transfer
            .lock()
            .take()
            .map(|mut t| {
                let replay = t.finish();
                self.counters
                    .transfer_dropped
                    .fetch_add(t.dropped(), Ordering::Relaxed);
                replay
            })
            .unwrap_or_default();
        let c = &self.counters;
        c.state_transfer_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if !complete {
            c.state_transfers_failed.fetch_add(1, Ordering::Relaxed);
        }
        // Everything that arrived meanwhile, in order: versions drop what the state already
        // holds, burials keep invalidated sessions out.
        let mut behind = Vec::new();
        {
            let mut store = self.store.lock();
            let now = crate::now_ms();
            for m in &replay {
                let applied = store.apply(&m.event, now);
                behind.extend(needs_repair(&m.event, &applied).cloned());
            }
            c.held(store.len());
        }
        self.wake_version_waiters();
        let inner = self.cluster.lock().upgrade();
        if let (Some(donor), Some(inner)) = (donor, inner) {
            for id in behind {
                self.repair(&id, donor, &inner);
            }
        }
        self.ready.store(true, Ordering::Release);
        complete
    }

    /// Waits for the state from the member just asked: until it is complete, the member
    /// says it is starting too, `deadline`, or `quiet` passes without a batch from it
    /// ([`StateWait::Silent`]: ask the next member).
    fn wait_for_state(&self, deadline: Instant, quiet: Duration) -> StateWait {
        let mut t = self.transfer.lock();
        let mut seen = self.transfer_batches.load(Ordering::Acquire);
        let mut until = deadline.min(crate::deadline(Instant::now(), quiet));
        loop {
            let outcome = match t.as_mut() {
                None => Some(StateWait::Complete),
                Some(tr) if tr.is_complete() => Some(StateWait::Complete),
                Some(tr) => tr.take_not_ready().then_some(StateWait::NotReady),
            };
            if let Some(outcome) = outcome {
                return outcome;
            }
            let timed_out = self.transfer_done.wait_until(&mut t, until).timed_out();
            let batches = self.transfer_batches.load(Ordering::Acquire);
            if batches != seen {
                seen = batches;
                until = deadline.min(crate::deadline(Instant::now(), quiet));
                continue;
            }
            if timed_out {
                return match t.as_mut() {
                    None => StateWait::Complete,
                    Some(tr) if tr.is_complete() => StateWait::Complete,
                    Some(tr) => {
                        if tr.take_not_ready() {
                            StateWait::NotReady
                        } else if until < deadline {
                            StateWait::Silent
                        } else {
                            StateWait::TimedOut
                        }
                    }
                };
            }
        }
    }

    /// Creates a session, replicates its creation, and returns its id. A member that could
    /// not be told is logged and counted ([`DeltaManager::stats`]); the session's first
    /// delta creates its copy there later. Fails only when this node holds
    /// [`ManagerConfig::max_active_sessions`] already.
    ///
    /// ```
    /// use ha::{DeltaManager, ManagerConfig, SessionError};
    /// let m = DeltaManager::new("/", ManagerConfig { max_active_sessions: Some(1), ..Default::default() });
    /// let id = m.create_session()?;
    /// assert!(matches!(m.create_session(), Err(SessionError::TooManySessions { limit: 1 })));
    /// assert_eq!(m.stats().rejected_sessions, 1);
    /// m.invalidate(&id);
    /// assert!(m.create_session().is_ok());
    /// # Ok::<(), SessionError>(())
    /// ```
    pub fn create_session(&self) -> Result<SessionId, SessionError> {
        let (id, created) = self.create_session_unannounced()?;
        let _ = self.send(&self.message(created), None, self.options());
        Ok(id)
    }

    /// Creates a session here only; returns its id and the event that tells the members.
    pub(crate) fn create_session_unannounced(
        &self,
    ) -> Result<(SessionId, SessionEvent), SessionError> {
        let now = crate::now_ms();
        let (created, swept) = {
            let mut store = self.store.lock();
            let swept = self.sweep_at_limit(&mut store, now);
            let room = self.cfg.max_active_sessions.is_none_or(|l| store.len() < l);
            let created = room.then(|| {
                let id = self.new_id();
                let mut s = Session::new(id.clone(), now, self.cfg.max_inactive_secs);
                s.mark_replicated(now); // its CREATED goes out with it
                store.insert(s);
                self.counters.held(store.len());
                id
            });
            (created, swept)
        };
        // Asynchronously even with sync replication: this runs on a request's thread, and a
        // copy that misses the word expires by itself.
        self.announce_expired(swept, SendOptions::ASYNCHRONOUS);
        let Some(id) = created else {
            let limit = self.cfg.max_active_sessions.unwrap_or_default();
            let n = self
                .counters
                .rejected_sessions
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // A flood of new clients must not flood the log.
            if crate::sparse(n) {
                warn!(target: "ha::manager", "context {}: {limit} sessions held, the limit (max_active_sessions); refusing a new one ({n} refused so far)", self.context);
            }
            return Err(SessionError::TooManySessions { limit });
        };
        self.counters
            .sessions_created
            .fetch_add(1, Ordering::Relaxed);
        let created = SessionEvent::Created {
            id: id.clone(),
            max_inactive_secs: self.cfg.max_inactive_secs,
        };
        Ok((id, created))
    }

    /// At [`ManagerConfig::max_active_sessions`], expires the sessions that timed out but
    /// wait for the next periodic sweep (every 60 s), so they hold no place; at most once a
    /// second, so a flood of refused clients does not scan the store each time. Returns the
    /// primaries expired.
    fn sweep_at_limit(&self, store: &mut SessionStore, now_ms: i64) -> Vec<SessionId> {
        let at_limit = self
            .cfg
            .max_active_sessions
            .is_some_and(|l| store.len() >= l);
        let last = self.limit_sweep_ms.load(Ordering::Relaxed);
        if at_limit && now_ms - last >= 1000 {
            // Under the store lock: no other thread sweeps meanwhile.
            self.limit_sweep_ms.store(now_ms, Ordering::Relaxed);
            self.sweep(store, now_ms).0
        } else {
            Vec::new()
        }
    }

    /// Sends an event a request produced with [`Self::create_session_unannounced`] and the
    /// other `*_unannounced` calls, at once and without waiting: with synchronous
    /// replication through the dispatch threads, which wait for the members' ACKs and tell
    /// `acked` (awaited at the end of the request); otherwise as an asynchronous send whose
    /// outcome `acked` records at once.
    #[cfg(feature = "axum")]
    pub(crate) fn announce(self: &Arc<Self>, event: SessionEvent, acked: &mut Acked) {
        self.announce_with(event, acked, false);
    }

    /// [`Self::announce`]; `lazy` marks an asynchronous message that no reader waits for
    /// ([`SendOptions::LAZY`]: the dispatch thread may gather it with others).
    #[cfg(feature = "axum")]
    fn announce_with(self: &Arc<Self>, event: SessionEvent, acked: &mut Acked, lazy: bool) {
        let msg = self.message(event);
        if self.cfg.sync {
            // Bound first: an `if let` on the guard would hold the lock for the whole send.
            let cluster = self.cluster.lock().upgrade();
            if let Some(cluster) = cluster {
                self.send_acked(&cluster, &msg, None, acked, None);
            }
        } else {
            let options = if lazy {
                self.options().with(SendOptions::LAZY)
            } else {
                self.options()
            };
            acked.done(self.send(&msg, None, options));
        }
    }

    /// A fresh random id (128 bits), with this node's route if one is configured.
    fn new_id(&self) -> SessionId {
        let raw = format!("{:032x}", u128::from_be_bytes(tribes::UniqueId::random().0));
        match &self.cfg.route {
            Some(r) => SessionId::new(format!("{raw}.{r}")),
            None => SessionId::new(raw),
        }
    }

    /// Gives the session a new random id, here and on every member (servlet
    /// `changeSessionId`, against session fixation: call it when a user logs in). Returns
    /// the new id for the cookie, or `None` when this node does not hold the session.
    ///
    /// ```
    /// # use ha::{DeltaManager, ManagerConfig};
    /// let m = DeltaManager::new("/", ManagerConfig::default());
    /// let old = m.create_session().unwrap();
    /// let new = m.cycle_id(&old).unwrap();
    /// assert!(m.session(&old).is_none() && m.session(&new).is_some());
    /// ```
    pub fn cycle_id(&self, old: &SessionId) -> Option<SessionId> {
        let (new, event) = self.cycle_id_unannounced(old)?;
        let _ = self.send(&self.message(event), None, self.options());
        Some(new)
    }

    /// [`Self::cycle_id`] here only; returns the new id and the event that tells the members.
    pub(crate) fn cycle_id_unannounced(
        &self,
        old: &SessionId,
    ) -> Option<(SessionId, SessionEvent)> {
        let new = self.new_id();
        let event = self.change_session_id_unannounced(old, new.clone())?;
        Some((new, event))
    }

    /// Runs `f` on the session (recording the access), if this node has it. Changes are
    /// replicated by [`DeltaManager::request_completed`].
    pub fn with_session<R>(&self, id: &SessionId, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        let mut store = self.store.lock();
        let s = store.get_mut(id)?;
        s.access(crate::now_ms());
        Some(f(s))
    }

    /// [`DeltaManager::with_session`] for the session `id` names wherever it is held now
    /// (another node may have renamed it while a request here runs: another route, or a
    /// new id at login; see [`SessionStore::follow`]), under one lock. Returns the id it is
    /// held under, with `f`'s result.
    #[cfg(feature = "axum")]
    pub(crate) fn with_current<R>(
        &self,
        id: &SessionId,
        f: impl FnOnce(&mut Session) -> R,
    ) -> Option<(SessionId, R)> {
        let mut store = self.store.lock();
        let now = store.follow(id)?;
        let s = store.get_mut(&now)?;
        s.access(crate::now_ms());
        Some((now, f(s)))
    }

    /// Wakes the read-your-writes waits (they check their version again).
    fn wake_version_waiters(&self) {
        if self.version_waiters.load(Ordering::Acquire) > 0 {
            let wakers = std::mem::take(&mut *self.version_wakers.lock());
            for w in wakers.into_values() {
                w.wake();
            }
        }
    }

    /// A copy of the session, if present.
    pub fn session(&self, id: &SessionId) -> Option<Session> {
        self.store.lock().get(id).cloned()
    }

    /// Whether the session is held under exactly this id.
    pub fn contains(&self, id: &SessionId) -> bool {
        self.store.lock().get(id).is_some()
    }

    /// Whether a session with this id's base is held, under any route.
    pub fn knows(&self, id: &SessionId) -> bool {
        self.store.lock().get_by_base(id.base()).is_some()
    }

    /// Asks the members, one after another (at most three), for a session this node does
    /// not hold (a request carried its id); returns whether a copy arrived. A member that
    /// holds it sends it back before it acknowledges the question, so on return it is in the
    /// store (as a non-primary copy, under the holder's id: [`DeltaManager::rebind`] renames
    /// it). Bounded by [`ManagerConfig::max_concurrent_fetches`] and the send timeout. A
    /// session invalidated, expired or renamed away here in the last 30 s is not asked for
    /// (a member that has not heard yet must not bring it back).
    ///
    /// With asynchronous replication behind a round-robin balancer, a session's second
    /// request often arrives before its creation did; this keeps that request on the same
    /// session instead of starting a new one (which would be a lost session for the user).
    pub fn fetch(self: &Arc<Self>, id: &SessionId) -> bool {
        block_on(self.fetch_acked(id), Instant::now() + ACK_WAIT_LIMIT).unwrap_or(false)
    }

    /// [`DeltaManager::fetch`] for async callers: the questions go out through the
    /// dispatch threads, which wait for the answers; no thread of the caller waits.
    pub(crate) async fn fetch_acked(self: &Arc<Self>, id: &SessionId) -> bool {
        if self.knows(id) {
            return true;
        }
        if self.store.lock().is_buried(id) {
            return false;
        }
        let found = self.ask_members_acked(id, |m| m.knows(id)).await;
        self.fetched(id, found)
    }

    /// Counts a fetch's outcome.
    fn fetched(&self, id: &SessionId, found: bool) -> bool {
        if found {
            self.counters
                .sessions_fetched
                .fetch_add(1, Ordering::Relaxed);
            debug!(target: "ha::manager", "{}: fetched unknown session {id} from the cluster", self.context);
        } else {
            self.counters.fetch_misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Whether this node is still to see the first change of session `id`: it does not
    /// hold it (and did not just see it go), or holds only a copy made from its creation
    /// (version 0, not primary here).
    #[cfg(feature = "axum")]
    pub(crate) fn awaits_first_change(&self, id: &SessionId) -> bool {
        let store = self.store.lock();
        match store.get_by_base(id.base()) {
            Some(s) => s.version() == 0 && !s.is_primary(),
            // Invalidated or expired here: nothing is on its way.
            None => !store.is_buried(id),
        }
    }

    /// The version of this node's copy of `id` (any route), if it holds one.
    pub fn version(&self, id: &SessionId) -> Option<u64> {
        self.store
            .lock()
            .get_by_base(id.base())
            .map(Session::version)
    }

    /// Read-your-writes for asynchronous replication: the request's client has already seen
    /// `version` of session `id` (the layer keeps it in a cookie). If this node's copy is
    /// older (or missing) because that change is still on its way, wait up to `wait` for it
    /// to arrive, then ask the members for their copy. Returns whether the copy here is at
    /// `version` or newer. Returns at once when it already is, which is the case for every
    /// request with synchronous replication. At most
    /// [`ManagerConfig::max_concurrent_fetches`] requests wait at a time (forged cookies
    /// cannot park every worker); the others go straight to asking the members, which has
    /// the same bound.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ha::{DeltaManager, ManagerConfig};
    /// let m = DeltaManager::new("/", ManagerConfig::default());
    /// let id = m.create_session().unwrap();
    /// assert!(m.catch_up(&id, 0, Duration::from_millis(5)));
    /// // Nobody will ever bring version 5: waits 5 ms, asks the (absent) members, gives up.
    /// assert!(!m.catch_up(&id, 5, Duration::from_millis(5)));
    ///
    /// // With asking switched off, nobody waits either.
    /// let off = DeltaManager::new("/", ManagerConfig { max_concurrent_fetches: 0, ..Default::default() });
    /// let id = off.create_session().unwrap();
    /// let asked_at = std::time::Instant::now();
    /// assert!(!off.catch_up(&id, 5, Duration::from_secs(30)));
    /// assert!(asked_at.elapsed() < Duration::from_secs(10));
    /// ```
    pub fn catch_up(self: &Arc<Self>, id: &SessionId, version: u64, wait: Duration) -> bool {
        let until = crate::deadline(Instant::now(), wait);
        if block_on(self.version_reached(id, version), until) == Some(true) {
            return true;
        }
        debug!(target: "ha::manager", "{}: v{version} of {id} did not arrive in {wait:?}; asking the members", self.context);
        self.fetch_version(id, version)
    }

    /// [`DeltaManager::catch_up`]'s wait as a future, for async callers: resolves to true
    /// once this node's copy of `id` is at `version` or newer, woken by the receiver thread
    /// that applies the change (no thread of the caller waits). Resolves to false at once
    /// when [`ManagerConfig::max_concurrent_fetches`] requests already wait. Put a timeout
    /// around it, then [`DeltaManager::fetch_version`].
    ///
    /// ```
    /// # use ha::{DeltaManager, ManagerConfig};
    /// # use std::task::{Context, Poll, Waker};
    /// use std::future::Future;
    /// let m = DeltaManager::new("/", ManagerConfig::default());
    /// let id = m.create_session().unwrap();
    /// let mut now = std::pin::pin!(m.version_reached(&id, 0));
    /// let mut later = std::pin::pin!(m.version_reached(&id, 1));
    /// let mut cx = Context::from_waker(Waker::noop());
    /// assert_eq!(now.as_mut().poll(&mut cx), Poll::Ready(true));
    /// assert_eq!(later.as_mut().poll(&mut cx), Poll::Pending);
    /// ```
    pub fn version_reached<'a>(&'a self, id: &'a SessionId, version: u64) -> VersionReached<'a> {
        self.change_reached(id, (version, 0))
    }

    /// [`DeltaManager::version_reached`] for one change: `change` is its (version, origin)
    /// ([`Session::last_change`]), so a copy that holds another node's change of that
    /// version (two nodes wrote at once) does not count.
    pub(crate) fn change_reached<'a>(
        &'a self,
        id: &'a SessionId,
        change: (u64, u64),
    ) -> VersionReached<'a> {
        VersionReached {
            manager: self,
            id,
            change,
            waiting: None,
        }
    }

    /// The newest change of session `id` held here: (version, origin), see
    /// [`Session::last_change`].
    #[cfg(feature = "axum")]
    pub(crate) fn last_change(&self, id: &SessionId) -> Option<(u64, u64)> {
        let store = self.store.lock();
        store.get_by_base(id.base()).map(Session::last_change)
    }

    /// Whether the copy of `id` here has the change `change` ((version, origin)).
    #[cfg(feature = "axum")]
    pub(crate) fn holds(&self, id: &SessionId, change: (u64, u64)) -> bool {
        holds_change(&self.store.lock(), id, change)
    }

    /// Asks the members for a copy of `id` at `version` or newer (the end of
    /// [`DeltaManager::catch_up`] when waiting did not bring it). Returns whether this node
    /// holds one now. Counted as a version fetch.
    pub fn fetch_version(self: &Arc<Self>, id: &SessionId, version: u64) -> bool {
        block_on(
            self.fetch_version_acked(id, version),
            Instant::now() + ACK_WAIT_LIMIT,
        )
        .unwrap_or(false)
    }

    /// [`DeltaManager::fetch_version`] for async callers (see [`DeltaManager::fetch_acked`]).
    pub(crate) async fn fetch_version_acked(
        self: &Arc<Self>,
        id: &SessionId,
        version: u64,
    ) -> bool {
        self.fetch_change_acked(id, (version, 0)).await
    }

    /// [`DeltaManager::fetch_version_acked`] for one change ((version, origin)).
    pub(crate) async fn fetch_change_acked(
        self: &Arc<Self>,
        id: &SessionId,
        change: (u64, u64),
    ) -> bool {
        // Invalidated, expired or renamed away here lately (a logout, a login, a tab still
        // sending the old cookie): nobody's copy would be taken anyway.
        if !self.knows(id) && self.store.lock().is_buried(id) {
            return false;
        }
        self.counters
            .version_fetches
            .fetch_add(1, Ordering::Relaxed);
        self.ask_members_acked(id, |m| holds_change(&m.store.lock(), id, change))
            .await
    }

    /// Before a request reads session `id`: if this copy holds back deltas that arrived
    /// ahead of a version it missed ([`Applied::Early`]), asks the members for a whole copy
    /// at the newest of them (their sender has one), and if none comes, applies them
    /// without the missing version (logged, counted as `forced`), rather than serve the
    /// session without either. Returns at once when nothing is held back, which is every
    /// request with synchronous replication.
    #[cfg(feature = "axum")]
    pub(crate) async fn settle_acked(self: &Arc<Self>, id: &SessionId) {
        let Some(version) = self.store.lock().held_back(id) else {
            return;
        };
        if !self.fetch_version_acked(id, version).await {
            let applied = self.store.lock().settle(id);
            if applied > 0 {
                warn!(target: "ha::manager", "{}: no member had v{version} of {id}; applied {applied} change(s) without the version(s) before them", self.context);
                self.wake_version_waiters();
            }
        }
    }

    /// Asks the members one after another (at most three) for their copy of `id` until
    /// `done` holds; returns whether it does. Each question goes out through the dispatch
    /// threads, which wait for its ACK (a member that holds the session sends it before).
    async fn ask_members_acked(
        self: &Arc<Self>,
        id: &SessionId,
        done: impl Fn(&Self) -> bool,
    ) -> bool {
        let Some(permit) = self.fetch_permit(id).map(Arc::new) else {
            return false;
        };
        let Some(cluster) = self.cluster.lock().upgrade() else {
            return false;
        };
        let (ask, members) = self.askees(id);
        let mut asked = Ok(());
        for m in &members {
            let mut acked = Acked::default();
            self.send_acked(
                &cluster,
                &ask,
                Some(m),
                &mut acked,
                Some(Arc::clone(&permit)),
            );
            asked = acked.await;
            if done(self) {
                return true;
            }
        }
        if asked.is_ok() {
            debug!(target: "ha::manager", "{}: no member had what this node needs of session {id}", self.context);
        }
        false
    }

    /// A place among the [`ManagerConfig::max_concurrent_fetches`] askers, or `None` when
    /// they are all taken.
    fn fetch_permit(&self, id: &SessionId) -> Option<FetchPermit> {
        let cap = self.cfg.max_concurrent_fetches;
        if cap == 0 {
            return None;
        }
        if self.fetching.fetch_add(1, Ordering::AcqRel) >= cap {
            self.fetching.fetch_sub(1, Ordering::AcqRel);
            debug!(target: "ha::manager", "{}: {cap} session fetches in flight; not asking for {id}", self.context);
            return None;
        }
        Some(FetchPermit(Arc::clone(&self.fetching)))
    }

    /// The question for `id` and whom to ask, in order. One member at a time: with
    /// all-to-all replication the first one asked has it, so one answer comes back instead
    /// of one from every member. Starting points differ per session, so the asking is
    /// spread over the members.
    fn askees(&self, id: &SessionId) -> (SessionMessage, Vec<Member>) {
        let members = self
            .cluster
            .lock()
            .upgrade()
            .map(|c| c.channel.members())
            .unwrap_or_default();
        let ask = self.message(SessionEvent::GetSession { id: id.clone() });
        if members.is_empty() {
            return (ask, members);
        }
        let start = id.base().bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let askees = (0..members.len().min(MAX_MEMBERS_ASKED))
            .map(|k| members[(start + k) % members.len()].clone())
            .collect();
        (ask, askees)
    }

    /// Number of sessions held (primaries and copies).
    pub fn len(&self) -> usize {
        self.store.lock().len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// End of a request: sends the session's delta (or an access notice if this node just
    /// took the session over) and marks this copy primary.
    pub fn request_completed(&self, id: &SessionId) -> Result<(), SendError> {
        match self.completion_event(id) {
            Some(e) => self.send(&self.message(e), None, self.options()),
            None => Ok(()),
        }
    }

    /// What [`DeltaManager::request_completed`] sends: the delta, an access notice, or
    /// nothing. Marks the copy primary.
    fn completion_event(&self, id: &SessionId) -> Option<SessionEvent> {
        let mut store = self.store.lock();
        // Where the session is now: a rename may have landed since the caller looked.
        let id = &store.follow(id)?;
        // This request's change goes out above every version known to exist; changes held
        // back for a version that has not come go under it, without that version (the
        // layer asked the members for a whole copy before this, in `settle_acked`).
        if store.settle(id) > 0 {
            warn!(target: "ha::manager", "{}: {id} changed here while changes for it waited for a version that has not come; applied them without it", self.context);
            self.wake_version_waiters();
        }
        let s = store.get_mut(id)?;
        let was_primary = s.is_primary();
        s.set_primary(true);
        let delta = (s.take_delta_from(self.origin.load(Ordering::Relaxed))).map(|mut d| {
            if let Some(keep) = &self.cfg.attribute_filter {
                d.actions.retain(|a| match a {
                    crate::delta::Action::SetAttribute { name, .. }
                    | crate::delta::Action::RemoveAttribute { name } => keep(name),
                    _ => true,
                });
            }
            d
        });
        let now = crate::now_ms();
        let event = match delta {
            Some(d) => {
                // Its version goes out with it: members behind fetch the session anyway.
                self.lagging.take(id.base());
                SessionEvent::Delta(d)
            }
            // Taken over here, or only read for half its interval: the copies hear of it.
            None if !was_primary || s.access_due(now) || self.lagging.take(id.base()) => {
                access_notice(s)
            }
            None => return None,
        };
        s.mark_replicated(now);
        Some(event)
    }

    /// The end of a request, for async callers: sends the session's delta (or access
    /// notice) like [`DeltaManager::request_completed`], through [`DeltaManager::announce`].
    /// `lazy`: with asynchronous replication, no reader waits for this change (no
    /// read-your-writes), so it may travel with the changes of concurrent requests.
    #[cfg(feature = "axum")]
    /// Returns the (version, origin) of the change it sent, if it sent one.
    pub(crate) fn complete_request(
        self: &Arc<Self>,
        id: &SessionId,
        acked: &mut Acked,
        lazy: bool,
    ) -> Option<(u64, u64)> {
        let event = self.completion_event(id)?;
        let sent = match &event {
            SessionEvent::Delta(d) => Some((d.version, d.origin)),
            _ => None,
        };
        self.announce_with(event, acked, lazy);
        sent
    }

    /// Sends `msg` with a handler that reports to `acked`: queued for the dispatch threads,
    /// which wait for the ACKs (`ASYNCHRONOUS | USE_ACK | SYNCHRONIZED_ACK`). `permit` stays
    /// held until the handler hears the outcome.
    ///
    /// When their queue is full the message waits for room instead of going out on this
    /// thread (a runtime thread, which would wait for the members' ACKs with every other
    /// request it carries): it joins the manager's line of waiting messages, which every
    /// waiting request's `acked` offers the room to, oldest first, while it is awaited
    /// (after 1, 2, 4 ... up to 32 ms); a message that finds no room for [`QUEUE_WAIT`]
    /// fails with `QueueFull`.
    fn send_acked(
        self: &Arc<Self>,
        cluster: &Arc<ClusterInner>,
        msg: &SessionMessage,
        to: Option<&Member>,
        acked: &mut Acked,
        permit: Option<Arc<FetchPermit>>,
    ) {
        let wait = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK | SendOptions::ASYNCHRONOUS;
        // Behind messages that wait for room, this one waits too: a request's messages
        // reach the members in order (a rename before the delta under the new id), and a
        // request does not take a freed place from one that asked before it.
        let behind = self.waiting_for_room(to);
        let slot = acked.slot(self, &msg.event, permit);
        // Shared, not copied, by the send and a retry.
        let bytes = match msg.encode() {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => return slot.finish(Err(SendError::Serialize(e.to_string()))),
        };
        let sent = if let Some(refused) = behind {
            Err(refused)
        } else {
            cluster.send_bytes(bytes.clone(), to, wait, Some(slot.clone()))
        };
        if let Err(refused @ SendError::QueueFull { .. }) = &sent {
            debug!(target: "ha::manager", "{}: dispatch queue full; the message waits for room", self.context);
            *slot.retry.lock() = Some(Retry {
                cluster: Arc::downgrade(cluster),
                bytes,
                to: to.cloned(),
                options: wait,
                until: crate::deadline(Instant::now(), QUEUE_WAIT),
                refused: refused.clone(),
            });
            self.room.lock().push_back(slot);
            return;
        }
        match sent {
            Ok(true) => {}
            // Nobody to tell: nothing sent, nothing to count.
            Ok(false) => slot.record(Ok(()), false),
            // Refused before it was queued (its handler hears nothing), or sent here and
            // already reported through the handler: `finish` keeps the first outcome.
            Err(e) => slot.finish(Err(e)),
        }
    }

    /// The refusal of the oldest message waiting for room in the dispatch queue for the
    /// same destinations as `to`, if one waits. (The dispatch queue is shared out by
    /// destinations: a message to other members does not wait for the room of these.)
    fn waiting_for_room(&self, to: Option<&Member>) -> Option<SendError> {
        let mut room = self.room.lock();
        // Those of dropped requests (which failed them) leave here if nobody offered room
        // since.
        while room.front().is_some_and(|s| s.retry.lock().is_none()) {
            room.pop_front();
        }
        (room.iter()).find_map(|s| {
            let retry = s.retry.lock();
            (retry.as_ref())
                .filter(|r| r.to.as_ref() == to)
                .map(|r| r.refused.clone())
        })
    }

    /// Offers the dispatch queue's room to the waiting messages, oldest first; once one
    /// finds the queue for its destinations full, the later ones for the same destinations
    /// wait on (those for others are still offered theirs). One caller at a time: another
    /// that finds it busy leaves the waiting messages to it (the messages of one request
    /// stay in order).
    fn offer_room(&self, now: Instant) {
        let Some(mut room) = self.room.try_lock() else {
            return;
        };
        // Destinations found full in this pass.
        let mut full: Vec<Option<Member>> = Vec::new();
        let mut i = 0;
        while let Some(slot) = room.get(i) {
            let to = slot.retry.lock().as_ref().map(|r| r.to.clone());
            match to {
                // Sent, failed, or its request dropped: it leaves the line.
                None => {
                    room.remove(i);
                }
                Some(to) if full.contains(&to) => i += 1,
                Some(to) if slot.retry(now) == Room::Waiting => {
                    full.push(to);
                    i += 1;
                }
                Some(_) => {
                    room.remove(i);
                }
            }
        }
    }

    /// Invalidates a session here and everywhere (replication failures are logged and
    /// counted).
    pub fn invalidate(&self, id: &SessionId) {
        if let Some(expired) = self.invalidate_unannounced(id) {
            let _ = self.send(&self.message(expired), None, self.options());
        }
    }

    /// [`Self::invalidate`] here only; returns the event that tells the members.
    pub(crate) fn invalidate_unannounced(&self, id: &SessionId) -> Option<SessionEvent> {
        {
            let mut store = self.store.lock();
            store.remove(id)?;
            store.bury(id, crate::now_ms());
        }
        self.counters
            .sessions_expired
            .fetch_add(1, Ordering::Relaxed);
        Some(SessionEvent::Expired { id: id.clone() })
    }

    /// Renames a session (route rebinding, id rotation) and replicates the change; returns
    /// whether the session existed. Replication failures are logged and counted.
    /// A `new` id that is not [well formed](SessionId::is_well_formed) is refused (a
    /// cookie could not name it): the session keeps its id and this returns false.
    pub fn change_session_id(&self, old: &SessionId, new: SessionId) -> bool {
        if !SessionId::is_well_formed(new.as_str()) {
            warn!(target: "ha::manager", "{}: not renaming {old}: the new id is not a well-formed session id", self.context);
            return false;
        }
        match self.change_session_id_unannounced(old, new) {
            Some(event) => {
                let _ = self.send(&self.message(event), None, self.options());
                true
            }
            None => false,
        }
    }

    /// [`Self::change_session_id`] here only; returns the event that tells the members.
    fn change_session_id_unannounced(
        &self,
        old: &SessionId,
        new: SessionId,
    ) -> Option<SessionEvent> {
        // This node's own rename: it goes through even while a request here changes the
        // session (`apply` keeps such a session's name against other nodes' renames).
        let renamed = self.store.lock().rename(old, &new, crate::now_ms());
        renamed.then(|| SessionEvent::ChangeSessionId {
            old: old.clone(),
            new,
        })
    }

    /// Route rebinding (Tomcat `JvmRouteBinderValve`): a request for `requested` reached
    /// this node although its id names another route (that node died, or the balancer moved
    /// the client). Renames the session to this node's route, replicates the change, and
    /// returns the id the client must use from now on (for the cookie). Returns `None` when
    /// nothing is to be done (no route configured, same route, or unknown session).
    pub fn rebind(&self, requested: &SessionId) -> Option<SessionId> {
        let (rebound, renamed) = self.rebind_unannounced(requested)?;
        if let Some(event) = renamed {
            let _ = self.send(&self.message(event), None, self.options());
        }
        Some(rebound)
    }

    /// [`DeltaManager::rebind`] here only; returns the id for the client and, when the
    /// session was renamed here, the event that tells the members.
    pub(crate) fn rebind_unannounced(
        &self,
        requested: &SessionId,
    ) -> Option<(SessionId, Option<SessionEvent>)> {
        let local = self.cfg.route.as_ref()?;
        if requested.route() == Some(local.as_str()) && self.store.lock().get(requested).is_some() {
            return None;
        }
        let rebound = requested.with_route(local);
        // The session may be held under another route than the client's cookie says: a node
        // renamed it and died before the client saw the new cookie.
        let held = self.store.lock().find_by_base(requested.base())?;
        if held == rebound {
            // Renamed already (another request got here first): just re-point the client.
            return (held != *requested).then_some((rebound, None));
        }
        let renamed = self.change_session_id_unannounced(&held, rebound.clone())?;
        info!(target: "ha::manager", "{}: session {requested} rebound to {rebound}", self.context);
        Some((rebound, Some(renamed)))
    }

    /// Expires idle sessions at `now_ms`; expiries of primaries are replicated.
    pub fn expire(&self, now_ms: i64) -> Vec<SessionId> {
        let (primaries, gone) = self.sweep(&mut self.store.lock(), now_ms);
        self.announce_expired(primaries, self.options());
        self.retell_lagging();
        self.retell_unexpired();
        gone
    }

    /// Expires idle sessions in `store` at `now_ms` (counted); returns the primaries among
    /// them, whose expiry the members are to hear, and all of them.
    fn sweep(&self, store: &mut SessionStore, now_ms: i64) -> (Vec<SessionId>, Vec<SessionId>) {
        let primaries: Vec<SessionId> = store
            .iter()
            .filter(|s| s.is_primary() && s.is_expired(now_ms))
            .map(|s| s.id().clone())
            .collect();
        let gone = store.expire(now_ms);
        self.counters
            .sessions_expired
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        (primaries, gone)
    }

    /// Tells the members that these primaries expired.
    fn announce_expired(&self, primaries: Vec<SessionId>, options: SendOptions) {
        for id in primaries {
            let _ = self.send(&self.message(SessionEvent::Expired { id }), None, options);
        }
    }

    /// Stops the manager: with `expire_sessions_on_shutdown` this node's primary sessions are
    /// expired cluster-wide, otherwise only dropped locally (the copies live on).
    pub fn stop(&self) {
        // Not the cluster's state any more: a node joining meanwhile is told "not ready"
        // and asks another member, instead of taking this empty store for the state.
        self.ready.store(false, Ordering::Release);
        // A fresh store like the first one (its placeholder interval is this manager's);
        // the burials go with the old one, as the node leaves the cluster.
        let fresh = SessionStore::new(self.cfg.max_inactive_secs);
        let sessions = std::mem::replace(&mut *self.store.lock(), fresh).snapshot();
        if self.cfg.expire_sessions_on_shutdown {
            for s in sessions.iter().filter(|s| s.is_primary()) {
                let _ = self.send(
                    &self.message(SessionEvent::Expired { id: s.id().clone() }),
                    None,
                    self.options(),
                );
            }
        }
    }

    /// A snapshot of the manager's counters.
    ///
    /// ```
    /// # use ha::{DeltaManager, ManagerConfig};
    /// let m = DeltaManager::new("/", ManagerConfig::default());
    /// let st = m.stats();
    /// assert_eq!(st.send_errors + st.sent.delta + st.received.delta, 0);
    /// ```
    pub fn stats(&self) -> ManagerStats {
        let (active, store) = {
            let s = self.store.lock();
            (s.len(), s.stats().clone())
        };
        self.counters.snapshot(active, store)
    }

    pub(crate) fn handle(
        &self,
        msg: SessionMessage,
        sender: &Member,
        cluster: &ClusterInner,
    ) -> Result<(), ProcessError> {
        self.counters.received(&msg.event);
        let msg = {
            let mut t = self.transfer.lock();
            match t.as_mut() {
                Some(tr) => match tr.offer(msg) {
                    Offer::Apply(m) => {
                        if matches!(m.event, SessionEvent::AllSessionData { .. }) {
                            // The donor is sending: the wait for it goes on.
                            self.transfer_batches.fetch_add(1, Ordering::Release);
                            self.transfer_done.notify_all();
                        }
                        m
                    }
                    Offer::Queued => return Ok(()),
                    // Not applied, and never will be: a sender waiting for this node to
                    // process the change must not count it as replicated here.
                    Offer::Dropped => {
                        return Err(ProcessError::new(
                            "state transfer running and its queue is full; change not applied",
                        ))
                    }
                },
                None => msg,
            }
        };
        match &msg.event {
            SessionEvent::GetAllSessions
                if self.transfer.lock().is_some() || !self.ready.load(Ordering::Acquire) =>
            {
                // Starting too: whatever is here is not the cluster's state yet. Sent from
                // here, acknowledged on receipt, never through the dispatch threads: this
                // node's channel may still be starting them (its receiver runs first), and
                // an asynchronous send would be refused, leaving the asker waiting for
                // the whole state-transfer timeout.
                let reply = self.message(SessionEvent::StateNotReady);
                if let Err(e) = self.send_via(cluster, &reply, Some(sender), SendOptions::USE_ACK) {
                    warn!(target: "ha::manager", "{}: cannot tell {sender} this node is starting: {e}", self.context);
                }
            }
            SessionEvent::GetAllSessions => {
                if cluster.queue_state_request(&self.context, sender) == DonorQueue::NotRunning {
                    self.send_state(sender, cluster);
                }
            }
            SessionEvent::GetSession { id } => {
                // As replicated: a running request's unfinished changes stay here.
                let copy = (self.store.lock().get_by_base(id.base())).map(Session::committed);
                if let Some(s) = copy {
                    // Sent before this message is acknowledged: the asker finds it in its
                    // store when its request returns.
                    let reply = self.message(SessionEvent::SessionData {
                        session: Box::new(s),
                    });
                    let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
                    if let Err(e) = self.send_via(cluster, &reply, Some(sender), sync) {
                        warn!(target: "ha::manager", "{}: cannot send session {id} to {sender}: {e}", self.context);
                    }
                }
            }
            SessionEvent::TransferComplete { .. }
            | SessionEvent::NoContextManager
            | SessionEvent::StateNotReady => {
                self.transfer_done.notify_all();
            }
            event => {
                let applied = {
                    let mut store = self.store.lock();
                    // This node's clock, not the sender's: what the store times with it
                    // (burials, a new copy's age) is local bookkeeping, and a sender's clock
                    // running ahead would otherwise forget recent burials early.
                    let applied = store.apply(event, crate::now_ms());
                    self.counters.held(store.len());
                    applied
                };
                if matches!(applied, Applied::Changed | Applied::Behind) {
                    self.wake_version_waiters();
                }
                // A change or access notice that finds this copy behind, or missing: the
                // sender has the session.
                if let Some(id) = needs_repair(event, &applied) {
                    self.repair(id, sender, cluster);
                }
            }
        }
        Ok(())
    }

    /// This node's copy of `id` is behind the sender's, or missing although the sender
    /// changed it: ask the sender for the whole session. With synchronous replication the
    /// copy is whole again before the sender's request is acknowledged (so before its client
    /// gets an answer); otherwise the request goes out asynchronously.
    ///
    /// The synchronous ask waits on a receiver worker while the sender's answer is
    /// processed by another one here. The answer travels on a connection the sender's
    /// replying thread picks, which is not the one whose message is waiting (that one is
    /// busy) unless the sender's pool toward this node is exhausted; then the wait ends at
    /// the send timeout, the sender's request reports the error, and nothing is lost.
    fn repair(&self, id: &SessionId, sender: &Member, cluster: &ClusterInner) {
        self.counters
            .copies_repaired
            .fetch_add(1, Ordering::Relaxed);
        info!(target: "ha::manager", "{}: copy of {id} is behind {sender}'s; fetching it", self.context);
        let ask = self.message(SessionEvent::GetSession { id: id.clone() });
        if let Err(e) = self.send_via(cluster, &ask, Some(sender), self.options()) {
            warn!(target: "ha::manager", "{}: cannot ask {sender} for {id}: {e}", self.context);
        }
    }

    /// Answers a state request: bounded batches, then the snapshot time (Tribes
    /// `sendAllSessions=false` behaviour, never one unbounded message).
    pub(crate) fn send_state(&self, to: &Member, cluster: &ClusterInner) {
        let snapshot_ms = crate::now_ms();
        let batches = {
            let store = self.store.lock();
            // Looked at under the store's lock: `stop` clears `ready` before it swaps in an
            // empty store, so a stopped (or still starting) manager never passes that off as
            // the state. The request may have waited for the donor thread meanwhile.
            (self.ready.load(Ordering::Acquire))
                .then(|| store.state_batches(self.cfg.send_all_sessions_size))
        };
        let sync = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
        let Some(batches) = batches else {
            let reply = self.message(SessionEvent::StateNotReady);
            if let Err(e) = self.send_via(cluster, &reply, Some(to), SendOptions::USE_ACK) {
                warn!(target: "ha::manager", "{}: cannot tell {to} this node has no state to give: {e}", self.context);
            }
            return;
        };
        // A joiner that acknowledges each batch just within the send timeout could hold
        // this thread, and every joiner queued behind it, for batches × that timeout.
        let give_up = crate::deadline(Instant::now(), self.cfg.state_transfer_timeout);
        for batch in batches {
            let stopping = cluster.donor_stopping() || !self.ready.load(Ordering::Acquire);
            let others = if Instant::now() >= give_up {
                cluster.donor_waiting()
            } else {
                0
            };
            if stopping || others > 0 {
                if stopping {
                    warn!(target: "ha::manager", "{}: stopping; state transfer to {to} abandoned", self.context);
                } else {
                    warn!(target: "ha::manager", "{}: state transfer to {to} abandoned after {:?} (state_transfer_timeout): {others} other member(s) wait for their state", self.context, self.cfg.state_transfer_timeout);
                }
                // So the joiner asks another member now, not after its whole timeout.
                let reply = self.message(SessionEvent::StateNotReady);
                let _ = self.send_via(cluster, &reply, Some(to), SendOptions::USE_ACK);
                return;
            }
            let msg = self.message(batch);
            if let Err(e) = self.send_via(cluster, &msg, Some(to), sync) {
                warn!(target: "ha::manager", "state transfer to {to} failed: {e}");
                return;
            }
        }
        let done = self.message(SessionEvent::TransferComplete { snapshot_ms });
        if let Err(e) = self.send_via(cluster, &done, Some(to), sync) {
            warn!(target: "ha::manager", "state transfer to {to} failed: {e}");
        }
    }

    fn options(&self) -> SendOptions {
        if self.cfg.sync {
            SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK
        } else {
            SendOptions::ASYNCHRONOUS
        }
    }

    pub(crate) fn message(&self, event: SessionEvent) -> SessionMessage {
        SessionMessage {
            context: self.context.clone(),
            timestamp_ms: crate::now_ms(),
            event,
        }
    }

    fn send(
        &self,
        msg: &SessionMessage,
        to: Option<&Member>,
        options: SendOptions,
    ) -> Result<(), SendError> {
        let Some(cluster) = self.cluster.lock().upgrade() else {
            return Ok(());
        };
        self.send_via(&cluster, msg, to, options)
    }

    fn send_via(
        &self,
        cluster: &ClusterInner,
        msg: &SessionMessage,
        to: Option<&Member>,
        options: SendOptions,
    ) -> Result<(), SendError> {
        // An asynchronous message about a session fails on the dispatch thread, after this
        // returns: a handler hears it there.
        let handler = (options.contains(SendOptions::ASYNCHRONOUS))
            .then(|| self.lagging_for(&msg.event))
            .flatten()
            .map(|(lagging, id)| {
                Arc::new(NoteLagging {
                    lagging: Arc::clone(lagging),
                    session: id.clone(),
                    counters: Arc::clone(&self.counters),
                }) as Arc<dyn tribes::interceptors::ErrorHandler>
            });
        match cluster.send_with_handler(msg, to, options, handler) {
            Ok(sent) => {
                if sent {
                    self.counters.sent(&msg.event);
                }
                Ok(())
            }
            Err(e) => {
                let n = self.counters.send_errors.fetch_add(1, Ordering::Relaxed) + 1;
                note_failure(&self.context, &e, n);
                if let Some((lagging, id)) = self.lagging_for(&msg.event) {
                    lagging.note(id);
                }
                Err(e)
            }
        }
    }
}

/// How a wait for a state transfer ended.
enum StateWait {
    Complete,
    /// The member asked is itself starting.
    NotReady,
    /// The member asked sent nothing for a while (it may hang): ask the next one.
    Silent,
    TimedOut,
}

/// The session whose copy here an applied change or access notice found behind (or
/// missing): its sender has the whole session.
fn needs_repair<'a>(event: &'a SessionEvent, applied: &Applied) -> Option<&'a SessionId> {
    let id = match event {
        SessionEvent::Delta(d) => &d.session_id,
        SessionEvent::Accessed { id, .. } => id,
        _ => return None,
    };
    matches!(applied, Applied::Behind | Applied::Early | Applied::Unknown).then_some(id)
}

/// Outcome of sends made with [`DeltaManager::send_acked`] (a request's, through
/// [`DeltaManager::announce`], or a fetch's question): resolves once every message's handler
/// heard how its send ended, to the first failure if any.
#[derive(Default)]
pub(crate) struct Acked {
    /// Messages sent (waited for or not).
    sent: usize,
    /// A pause before messages that wait for room in the dispatch queue are tried again
    /// (on a tokio runtime; elsewhere the polling thread sleeps).
    #[cfg(feature = "axum")]
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The next pause while a message waits for room: 1 ms, doubling up to 32 ms.
    backoff: Duration,
    slots: Vec<Arc<AckSlot>>,
    /// The first failure of a send whose outcome was known at once.
    failed: Option<SendError>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Acked {
    /// A new message's slot, waited for by this future.
    fn slot(
        &mut self,
        manager: &Arc<DeltaManager>,
        event: &SessionEvent,
        permit: Option<Arc<FetchPermit>>,
    ) -> Arc<AckSlot> {
        let slot = Arc::new(AckSlot {
            outcome: Mutex::new(None),
            waker: Arc::clone(&self.waker),
            manager: Arc::downgrade(manager),
            kind: crate::stats::kind(event),
            lagging: (manager.lagging_for(event)).map(|(l, id)| (Arc::clone(l), id.clone())),
            permit: Mutex::new(permit),
            retry: Mutex::new(None),
        });
        self.sent += 1;
        self.slots.push(Arc::clone(&slot));
        slot
    }

    /// Messages sent so far.
    #[cfg(feature = "axum")]
    pub(crate) fn sent(&self) -> usize {
        self.sent
    }

    /// Whether some message's outcome is still to come (it waits for ACKs).
    #[cfg(feature = "axum")]
    pub(crate) fn waits(&self) -> bool {
        self.slots.iter().any(|s| s.outcome.lock().is_none())
    }

    /// Records the outcome of a send that did not wait.
    #[cfg(feature = "axum")]
    fn done(&mut self, outcome: Result<(), SendError>) {
        self.sent += 1;
        if let (Err(e), None) = (outcome, &self.failed) {
            self.failed = Some(e);
        }
    }
}

/// One message's outcome; the dispatch thread (or the sending thread) fills it in.
struct AckSlot {
    outcome: Mutex<Option<Result<(), SendError>>>,
    waker: Arc<Mutex<Option<Waker>>>,
    manager: Weak<DeltaManager>,
    /// The message's event kind, for the sent counters.
    kind: usize,
    /// Where the message's session is remembered if it fails (see `lagging_for`).
    lagging: Option<(Arc<Lagging>, SessionId)>,
    /// A fetch's place among the concurrent fetches, given back with the outcome.
    permit: Mutex<Option<Arc<FetchPermit>>>,
    /// The message, while it waits for room in the dispatch queue (see `send_acked`).
    retry: Mutex<Option<Retry>>,
}

/// A message refused by a full dispatch queue, sent again when its [`Acked`] is polled.
struct Retry {
    cluster: Weak<ClusterInner>,
    /// The message, encoded once.
    bytes: bytes::Bytes,
    to: Option<Member>,
    options: SendOptions,
    /// Past this, it fails with `QueueFull`.
    until: Instant,
    /// The refusal, reported if it never gets room.
    refused: SendError,
}

/// How long a message refused by a full dispatch queue waits for room (see `send_acked`).
pub(crate) const QUEUE_WAIT: Duration = Duration::from_secs(3);

/// Whether a message of an [`Acked`] still waits for room in the dispatch queue.
#[derive(PartialEq, Eq)]
enum Room {
    Taken,
    Waiting,
}

impl AckSlot {
    /// Sends the message again if it waits for room in the dispatch queue.
    fn retry(self: &Arc<Self>, now: Instant) -> Room {
        let Some(r) = self.retry.lock().take() else {
            return Room::Taken;
        };
        let Some(cluster) = r.cluster.upgrade() else {
            self.finish(Err(SendError::NotStarted));
            return Room::Taken;
        };
        let handler: Arc<dyn tribes::interceptors::ErrorHandler> = Arc::clone(self) as _;
        match cluster.send_bytes(r.bytes.clone(), r.to.as_ref(), r.options, Some(handler)) {
            Ok(true) => Room::Taken,
            Ok(false) => {
                self.record(Ok(()), false);
                Room::Taken
            }
            Err(SendError::QueueFull { .. }) if now < r.until => {
                *self.retry.lock() = Some(r);
                Room::Waiting
            }
            Err(SendError::QueueFull { .. }) => {
                self.finish(Err(r.refused));
                Room::Taken
            }
            Err(e) => {
                self.finish(Err(e));
                Room::Taken
            }
        }
    }

    /// Records how the send ended (see `record`), counted.
    fn finish(&self, outcome: Result<(), SendError>) {
        self.record(outcome, true);
    }

    /// Records the outcome unless one is recorded already, counts it (with `count`), gives
    /// back the fetch permit, and wakes the waiting request.
    fn record(&self, outcome: Result<(), SendError>, count: bool) {
        {
            let mut slot = self.outcome.lock();
            if slot.is_some() {
                return;
            }
            if let (true, Some(m)) = (count, self.manager.upgrade()) {
                match &outcome {
                    Ok(()) => m.counters.sent_kind(self.kind),
                    Err(e) => {
                        let n = m.counters.send_errors.fetch_add(1, Ordering::Relaxed) + 1;
                        note_failure(&m.context, e, n);
                        if let Some((lagging, id)) = &self.lagging {
                            lagging.note(id);
                        }
                    }
                }
            }
            *slot = Some(outcome);
        }
        drop(self.permit.lock().take());
        let waker = self.waker.lock().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl tribes::interceptors::ErrorHandler for AckSlot {
    fn handle_completion(&self, _id: tribes::UniqueId) {
        self.finish(Ok(()));
    }

    fn handle_error(&self, error: SendError, _id: tribes::UniqueId) {
        // Every member it did not reach has left the group: it reached every member. The
        // session is remembered all the same, so that a member that comes back (a thawed
        // one keeps its identity) is told by the next sweep.
        if error.missed_only_departed() {
            if let Some((lagging, id)) = &self.lagging {
                lagging.note(id);
            }
            return self.finish(Ok(()));
        }
        self.finish(Err(error));
    }
}

impl Future for Acked {
    type Output = Result<(), SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Registered before looking, so an outcome recorded in between still wakes us.
        *self.waker.lock() = Some(cx.waker().clone());
        // Messages that wait for room are offered it, in the order they (and those of other
        // requests) came; while one of ours still waits, look again after a pause.
        if let Some(manager) = (self.slots.first()).and_then(|s| s.manager.upgrade()) {
            manager.offer_room(Instant::now());
        }
        if self.parked().is_some() {
            self.pause_for_room(cx);
        }
        let mut result = match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        for slot in &self.slots {
            match &*slot.outcome.lock() {
                None => return Poll::Pending,
                Some(Err(e)) if result.is_ok() => result = Err(e.clone()),
                Some(_) => {}
            }
        }
        Poll::Ready(result)
    }
}

impl Acked {
    /// Arranges to be polled again after the next pause (1, 2, 4 ... up to 32 ms), to try
    /// the messages that wait for room in the dispatch queue again.
    fn pause_for_room(&mut self, cx: &mut Context<'_>) {
        let pause = self
            .backoff
            .clamp(Duration::from_millis(1), Duration::from_millis(32));
        #[cfg(feature = "axum")]
        if !IN_BLOCK_ON.get() && tokio::runtime::Handle::try_current().is_ok() {
            let sleep = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
            if sleep.as_mut().poll(cx).is_ready() {
                self.pause = None;
                self.backoff = pause * 2;
                cx.waker().wake_by_ref();
            }
            return;
        }
        // A thread blocked on this future (`block_on`): it may as well sleep.
        std::thread::sleep(pause);
        self.backoff = pause * 2;
        cx.waker().wake_by_ref();
    }

    /// The refusal of a message of this request that waits for room in the dispatch queue,
    /// if one does.
    fn parked(&self) -> Option<SendError> {
        (self.slots.iter()).find_map(|s| s.retry.lock().as_ref().map(|r| r.refused.clone()))
    }
}

/// A request dropped while its messages wait for room (its client went away, a timeout):
/// they are not sent, but counted as failed, so a change is retold like any failed one.
impl Drop for Acked {
    fn drop(&mut self) {
        for slot in &self.slots {
            let parked = slot.retry.lock().take();
            if let Some(r) = parked {
                slot.finish(Err(r.refused));
            }
        }
    }
}

/// See [`DeltaManager::fetch_permit`]; gives the place back when dropped. An async fetch
/// shares it with the handlers of its questions, so a request abandoned half-way keeps
/// its place until its question in flight is answered or given up.
struct FetchPermit(Arc<AtomicUsize>);

impl Drop for FetchPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a blocking caller waits for the ACKs of a question it sent. The sends report
/// well before (the sender's timeout is 3 s); this only ends the wait for a message an
/// interceptor dropped on its way down, whose handler never hears.
pub(crate) const ACK_WAIT_LIMIT: Duration = Duration::from_secs(10);

thread_local! {
    /// Set while [`block_on`] polls on this thread: a future that must pause (see
    /// `Acked::pause_for_room`) sleeps the thread then, whatever runtime it may be on.
    static IN_BLOCK_ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `future` on this thread until it is ready, or `None` once `deadline` passed: the
/// blocking API over the async one (the thread parks; the receiver or dispatch thread that
/// completes the future unparks it).
fn block_on<F: Future>(future: F, deadline: Instant) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        let polled = {
            // Restored when dropped, also if the poll panics (a caught panic must not
            // leave a runtime thread marked as blocking).
            struct Restore(bool);
            impl Drop for Restore {
                fn drop(&mut self) {
                    IN_BLOCK_ON.set(self.0);
                }
            }
            let _restore = Restore(IN_BLOCK_ON.replace(true));
            future.as_mut().poll(&mut cx)
        };
        if let Poll::Ready(out) = polled {
            return Some(out);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        std::thread::park_timeout(left);
    }
}

/// Whether the copy of `id` here has the change `change` (version, origin; origin 0: any
/// change at that version or later will do).
fn holds_change(store: &SessionStore, id: &SessionId, (version, origin): (u64, u64)) -> bool {
    store
        .get_by_base(id.base())
        .is_some_and(|s| s.holds(version, origin))
}

/// The future of [`DeltaManager::version_reached`].
pub struct VersionReached<'a> {
    manager: &'a DeltaManager,
    id: &'a SessionId,
    /// (version, origin) of the change waited for; origin 0: the version will do.
    change: (u64, u64),
    /// Its key in `version_wakers` once it waits (counted in `version_waiters`; both undone
    /// on drop).
    waiting: Option<u64>,
}

impl Future for VersionReached<'_> {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let m = self.manager;
        // The waker is registered under the store lock: a change applied after this check
        // takes the lock after us, and then wakes what is registered.
        let store = m.store.lock();
        if holds_change(&store, self.id, self.change) {
            return Poll::Ready(true);
        }
        let key = match self.waiting {
            Some(key) => key,
            None => {
                if m.version_waiters.fetch_add(1, Ordering::AcqRel) >= m.cfg.max_concurrent_fetches
                {
                    m.version_waiters.fetch_sub(1, Ordering::AcqRel);
                    return Poll::Ready(false);
                }
                m.counters.version_waits.fetch_add(1, Ordering::Relaxed);
                let key = m.next_waker_key.fetch_add(1, Ordering::Relaxed);
                self.waiting = Some(key);
                key
            }
        };
        m.version_wakers.lock().insert(key, cx.waker().clone());
        drop(store);
        Poll::Pending
    }
}

impl Drop for VersionReached<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.waiting {
            // Its waker goes with it (a timed-out wait leaves nothing behind), so the list
            // never holds more than the waiting futures.
            self.manager.version_wakers.lock().remove(&key);
            self.manager.version_waiters.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;

    use super::*;
    use crate::testing::{deltas_setting, Receiving};

    struct Flag(AtomicBool);

    /// A waker that sets its flag when woken.
    fn flag_waker() -> (Arc<Flag>, Waker) {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&flag));
        (flag, waker)
    }

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_rename_to_an_id_no_cookie_could_name_is_refused() {
        let rx = Receiving::new(ManagerConfig::default());
        let id = rx.manager.create_session().unwrap();
        assert!(!rx.manager.change_session_id(&id, SessionId::new("a b; c")));
        assert!(rx.manager.session(&id).is_some(), "kept its id");
        let fine = SessionId::new("0123abcd.n2");
        assert!(rx.manager.change_session_id(&id, fine.clone()));
        assert!(rx.manager.session(&fine).is_some());
    }

    #[test]
    fn a_sender_clock_far_ahead_does_not_make_this_node_forget_its_burials() {
        let rx = Receiving::new(ManagerConfig::default());
        let (x, y) = (SessionId::new("x"), SessionId::new("y"));
        // x is invalidated on another node; its creation, sent earlier, is still on its
        // way on another connection.
        rx.deliver(SessionEvent::Expired { id: x.clone() });
        // Another node, whose clock runs ten minutes ahead, expires y.
        let ahead = crate::now_ms() + 600_000;
        rx.deliver_sent_at(SessionEvent::Expired { id: y }, ahead);
        // The late creation of x must still be refused: no ghost session.
        rx.deliver(SessionEvent::Created {
            id: x.clone(),
            max_inactive_secs: 60,
        });
        assert!(rx.manager.session(&x).is_none());
    }

    #[test]
    fn a_change_the_full_transfer_queue_drops_is_refused_not_acknowledged() {
        let rx = Receiving::new(ManagerConfig::default());
        // A state transfer is running, with room for one message.
        *rx.manager.transfer.lock() = Some(StateTransfer::new(crate::now_ms(), 60_000, 1));
        let id = SessionId::new("s");
        let (_, deltas) = deltas_setting(&id, &["a", "b"]);
        rx.try_deliver(SessionEvent::Delta(deltas[0].clone()))
            .expect("queued: it will be applied after the transfer");
        let refused = rx.try_deliver(SessionEvent::Delta(deltas[1].clone()));
        assert!(refused.is_err(), "dropped: the sender must hear it failed");
    }

    #[test]
    fn a_version_wait_is_woken_by_the_change_that_brings_the_version() {
        let rx = Receiving::new(ManagerConfig::default());
        let node = &rx.manager;
        // The primary, elsewhere: v1 and v2 of a session.
        let id = SessionId::new("s");
        let (_, deltas) = deltas_setting(&id, &["a", "b"]);
        let deliver = |d: &crate::delta::Delta| rx.deliver(SessionEvent::Delta(d.clone()));

        let (flag, waker) = flag_waker();
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(node.version_reached(&id, 2));
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(node.stats().version_waits, 1);

        deliver(&deltas[0]);
        assert!(flag.0.swap(false, Ordering::SeqCst), "woken by v1");
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Pending, "v1 is not v2");

        deliver(&deltas[1]);
        assert!(flag.0.load(Ordering::SeqCst), "woken by v2");
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(true));
        assert_eq!(
            node.stats().version_waits,
            1,
            "one wait, polled three times"
        );
    }

    #[cfg(feature = "axum")]
    #[test]
    fn a_reader_gets_held_back_changes_even_when_their_missing_version_never_comes() {
        // No members to ask.
        let rx = Receiving::new(ManagerConfig::default());
        let node = &rx.manager;
        let id = SessionId::new("s");
        let (_, deltas) = deltas_setting(&id, &["a", "b", "c"]);
        for k in [0, 2] {
            rx.deliver(SessionEvent::Delta(deltas[k].clone()));
        }
        // v3 waits for v2: a reader now would see v1 only.
        assert_eq!(node.version(&id), Some(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(block_on(node.settle_acked(&id), deadline), Some(()));
        // Nobody had v3 to give: v3 is applied without v2, and counted.
        assert_eq!(node.version(&id), Some(3));
        let held = node.session(&id).unwrap();
        assert_eq!(held.get::<u32>("c").unwrap(), Some(1));
        assert_eq!(held.get::<u32>("b").unwrap(), None);
        assert_eq!((node.stats().store.gaps, node.stats().store.forced), (1, 1));
        // Nothing held back: the next reader goes straight on.
        assert_eq!(block_on(node.settle_acked(&id), deadline), Some(()));
    }

    #[test]
    fn a_local_change_goes_out_above_held_back_versions() {
        let rx = Receiving::new(ManagerConfig::default());
        let node = &rx.manager;
        let id = SessionId::new("s");
        let (_, d) = deltas_setting(&id, &["a", "b", "c"]);
        let deliver = |d: &crate::delta::Delta| rx.deliver(SessionEvent::Delta(d.clone()));
        deliver(&d[0]);
        // A request here (already past find_session) writes ...
        node.with_session(&id, |s| s.insert("mine", &1u32).unwrap());
        // ... while the other node's v3 arrives ahead of its v2.
        deliver(&d[2]);
        // The request ends: its delta must not reuse a version the cluster already has.
        let Some(SessionEvent::Delta(out)) = node.completion_event(&id) else {
            panic!("a delta")
        };
        // Every member that has the other node's v2 drops this as stale.
        let mut member = SessionStore::default();
        for x in &d {
            member.apply(&SessionEvent::Delta(x.clone()), 1);
        }
        assert_eq!(
            member.apply(&SessionEvent::Delta(out.clone()), 2),
            Applied::Changed,
            "local change went out as v{} while v3 is held back here",
            out.version
        );
    }

    #[test]
    fn version_waiters_are_woken_when_held_back_deltas_go_in_without_their_gap() {
        let rx = Receiving::new(ManagerConfig::default());
        let node = &rx.manager;
        let id = SessionId::new("s");
        let names: Vec<String> = (0..crate::store::MAX_EARLY_DELTAS + 3)
            .map(|n| format!("a{n}"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (_, d) = deltas_setting(&id, &names);
        let deliver = |d: &crate::delta::Delta| rx.deliver(SessionEvent::Delta(d.clone()));
        deliver(&d[0]);
        let last = d.last().unwrap().version;
        let (flag, waker) = flag_waker();
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(node.version_reached(&id, last));
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Pending);
        for x in &d[2..] {
            deliver(x); // v2 never comes; the 17th applies them all
        }
        assert_eq!(node.version(&id), Some(last));
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the waiter at v{last} was never woken"
        );
    }

    #[test]
    fn a_session_only_read_here_keeps_its_copies_alive() {
        let node = DeltaManager::new(
            "/",
            ManagerConfig {
                max_inactive_secs: 60,
                ..ManagerConfig::default()
            },
        );
        let now = crate::now_ms();
        let id = SessionId::new("s");
        // Written once 130 s ago (replicated then), then only read on this node (a sticky
        // balancer), every few seconds: the user is active.
        let mut s = Session::new(id.clone(), now - 130_000, 60);
        s.insert("user", &1u32).unwrap();
        s.access(now - 130_000);
        let first = s.take_delta().unwrap();
        s.mark_replicated(now - 130_000);
        node.store.lock().insert(s);
        let mut member = SessionStore::new(60);
        member.apply(&SessionEvent::Delta(first), now - 130_000);
        node.with_session(&id, |s| s.get::<u32>("user").unwrap());
        let told = node.completion_event(&id).expect("an access notice");
        assert!(matches!(told, SessionEvent::Accessed { .. }));
        member.apply(&told, now);
        // The member's copy would have gone after 2 x 60 s without news.
        assert!(
            member.expire(now).is_empty(),
            "a copy of a live session expired"
        );
        // The next read, just after, tells nobody again.
        node.with_session(&id, |s| s.get::<u32>("user").unwrap());
        assert_eq!(node.completion_event(&id), None);
    }

    #[test]
    fn a_request_completed_under_an_id_renamed_meanwhile_still_sends_its_change() {
        let rx = Receiving::new(ManagerConfig::default());
        let m = &rx.manager;
        let (s, t) = (SessionId::new("s"), SessionId::new("t"));
        let (_, d) = deltas_setting(&s, &["user"]);
        rx.deliver(SessionEvent::Delta(d[0].clone()));
        m.with_session(&s, |x| x.insert("cart", &1u32).unwrap());
        // The layer has read the id (`Handle::current`, s); a login elsewhere lands before
        // `complete_request` takes the store lock (or while `settle_acked` awaits).
        rx.deliver(SessionEvent::ChangeSessionId {
            old: s.clone(),
            new: t.clone(),
        });
        let _ = m.request_completed(&s);
        assert!(
            !m.session(&t).unwrap().is_dirty(),
            "the request's change was never sent"
        );
    }

    #[test]
    #[cfg(feature = "axum")] // `last_change` serves the layer only
    fn a_read_your_writes_wait_is_for_the_change_not_just_its_version() {
        let rx = Receiving::new(ManagerConfig::default());
        let node = &rx.manager;
        let id = SessionId::new("s");
        let (at_v1, base) = deltas_setting(&id, &["a"]);
        rx.deliver(SessionEvent::Delta(base[0].clone()));
        // Nodes 1 and 2 both make v2 (two parallel requests); node 2's arrives here first.
        let v2 = |name: &str, origin: u64| {
            let mut s = at_v1.clone();
            s.insert(name, &1u32).unwrap();
            s.take_delta_from(origin).unwrap()
        };
        let (from_1, from_2) = (v2("one", 1), v2("two", 2));
        rx.deliver(SessionEvent::Delta(from_2));
        assert_eq!(node.last_change(&id), Some((2, 2)));
        // A client that saw node 1's v2 waits for that one; the version alone is there.
        let (flag, waker) = flag_waker();
        let mut cx = Context::from_waker(&waker);
        let mut theirs = std::pin::pin!(node.change_reached(&id, (2, 1)));
        assert_eq!(theirs.as_mut().poll(&mut cx), Poll::Pending);
        let mut any = std::pin::pin!(node.version_reached(&id, 2));
        assert_eq!(any.as_mut().poll(&mut cx), Poll::Ready(true));
        rx.deliver(SessionEvent::Delta(from_1));
        assert!(flag.0.load(Ordering::SeqCst), "woken by node 1's v2");
        assert_eq!(theirs.as_mut().poll(&mut cx), Poll::Ready(true));
        let held = node.session(&id).unwrap();
        assert_eq!(held.get::<u32>("one").unwrap(), Some(1));
        assert!(held.holds(2, 1) && held.holds(2, 2) && held.holds(1, 0));
        assert!(!held.holds(1, 77), "another node's v1, never seen here");
        assert!(!held.holds(3, 0));
    }

    #[test]
    fn a_wait_for_a_change_that_lost_on_every_name_still_ends_when_it_lands() {
        let rx = Receiving::new(ManagerConfig::default());
        let node = &rx.manager;
        let id = SessionId::new("s");
        let (at_v1, base) = deltas_setting(&id, &["a"]);
        rx.deliver(SessionEvent::Delta(base[0].clone()));
        // Nodes 1 and 2 both set x as v2; node 2's lands first and wins x for good.
        let v2 = |x: u32, origin: u64| {
            let mut s = at_v1.clone();
            s.insert("x", &x).unwrap();
            s.take_delta_from(origin).unwrap()
        };
        let (from_1, from_2) = (v2(1, 1), v2(2, 2));
        rx.deliver(SessionEvent::Delta(from_2));
        let (flag, waker) = flag_waker();
        let mut cx = Context::from_waker(&waker);
        let mut wait = std::pin::pin!(node.change_reached(&id, (2, 1)));
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Pending);
        rx.deliver(SessionEvent::Delta(from_1));
        assert!(flag.0.load(Ordering::SeqCst), "woken although x stays 2");
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(true));
        let held = node.session(&id).unwrap();
        assert_eq!(held.get::<u32>("x").unwrap(), Some(2));
    }

    #[test]
    fn at_the_session_limit_timed_out_sessions_make_room_at_once() {
        let m = DeltaManager::new(
            "/",
            ManagerConfig {
                max_active_sessions: Some(1),
                ..ManagerConfig::default()
            },
        );
        let idle = m.create_session().unwrap();
        // Last used a minute ago, with a one-second interval.
        m.with_session(&idle, |s| {
            s.set_max_inactive_secs(1);
            s.access(crate::now_ms() - 60_000);
        });
        // `idle` timed out but the periodic sweep has not run: it must not hold the place.
        let fresh = m.create_session().unwrap();
        assert!(m.session(&idle).is_none());
        assert_eq!(m.stats().sessions_expired, 1);
        // A live session does hold it.
        assert_eq!(
            m.create_session(),
            Err(SessionError::TooManySessions { limit: 1 })
        );
        assert!(m.session(&fresh).is_some());
        assert_eq!(m.stats().rejected_sessions, 1);
    }

    #[test]
    fn version_waits_beyond_the_bound_give_up_at_once() {
        let node = DeltaManager::new(
            "/",
            ManagerConfig {
                max_concurrent_fetches: 1,
                ..ManagerConfig::default()
            },
        );
        let id = SessionId::new("nowhere");
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = std::pin::pin!(node.version_reached(&id, 1));
        assert_eq!(first.as_mut().poll(&mut cx), Poll::Pending);
        let mut second = std::pin::pin!(node.version_reached(&id, 1));
        assert_eq!(second.as_mut().poll(&mut cx), Poll::Ready(false));
    }

    #[test]
    fn abandoned_version_waits_leave_nothing_behind() {
        let node = DeltaManager::new("/", ManagerConfig::default());
        let id = SessionId::new("nowhere");
        let mut cx = Context::from_waker(Waker::noop());
        let mut long = Box::pin(node.version_reached(&id, 1));
        assert_eq!(long.as_mut().poll(&mut cx), Poll::Pending);
        // Many waits that time out (are dropped) while one goes on waiting.
        for _ in 0..1000 {
            let mut w = Box::pin(node.version_reached(&id, 1));
            assert_eq!(w.as_mut().poll(&mut cx), Poll::Pending);
            assert_eq!(w.as_mut().poll(&mut cx), Poll::Pending, "polled again");
        }
        assert_eq!(node.version_wakers.lock().len(), 1);
        drop(long);
        assert!(node.version_wakers.lock().is_empty());
        assert_eq!(node.version_waiters.load(Ordering::SeqCst), 0);
    }
}
