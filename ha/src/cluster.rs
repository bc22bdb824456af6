//! `Cluster` (Tribes `SimpleTcpCluster`): owns a `GroupChannel`, routes session messages to
//! the manager of their context (the `ClusterSessionListener` role), sends for managers, and
//! carries the application's own cluster messages to its [`ClusterListener`]s. Unlike Tribes,
//! send errors reach the caller.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use log::{debug, warn};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tribes::{ChannelMessage, GroupChannel, Member, ProcessError, SendError, SendOptions};

use crate::error::SessionError;
use crate::manager::DeltaManager;
use crate::message::{SessionEvent, SessionMessage};

/// Default of [`Cluster::set_expire_interval`].
const DEFAULT_EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// State requests waiting for the donor thread; more are dropped (their askers go on to
/// the next member when nothing comes).
const DONOR_QUEUE: usize = 16;

/// What became of a state request handed to the donor thread.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DonorQueue {
    /// The donor thread answers it.
    Queued,
    /// Its queue was full: dropped, with a warning.
    Dropped,
    /// No donor thread (the channel was started without `Cluster::start`): answer here.
    NotRunning,
}

/// A member's request for one context's sessions, waiting for the donor thread.
struct StateRequest {
    context: String,
    to: Member,
}

/// A message between cluster members that is not a session event (Tribes'
/// `ClusterMessage`): a kind for listeners to filter on, and bytes.
///
/// On the wire it is a MessagePack map `{kind, payload}`, which never decodes as a
/// [`SessionMessage`] (and the other way round), so both share the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMessage {
    /// What the message is, e.g. `"cache-evict"`.
    pub kind: String,
    /// Its content (MessagePack `bin` on the wire).
    pub payload: Bytes,
}

impl ClusterMessage {
    /// A message of `kind` carrying `payload`.
    pub fn new(kind: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            kind: kind.into(),
            payload: payload.into(),
        }
    }
}

/// Receives the [`ClusterMessage`]s other members send (Tribes' `ClusterListener`). Runs on
/// a receiver worker thread: hand long work to a thread of your own.
///
/// ```
/// use ha::{ClusterListener, ClusterMessage};
/// struct Evict;
/// impl ClusterListener for Evict {
///     fn accept(&self, msg: &ClusterMessage) -> bool {
///         msg.kind == "cache-evict"
///     }
///     fn message_received(&self, msg: &ClusterMessage, sender: &tribes::Member) {
///         println!("{sender} evicts {:?}", String::from_utf8_lossy(&msg.payload));
///     }
/// }
/// ```
pub trait ClusterListener: Send + Sync + 'static {
    /// Whether this listener wants the message. Default: every one.
    fn accept(&self, _msg: &ClusterMessage) -> bool {
        true
    }

    /// A message from `sender`.
    fn message_received(&self, msg: &ClusterMessage, sender: &Member);
}

impl<F: Fn(&ClusterMessage, &Member) + Send + Sync + 'static> ClusterListener for F {
    fn message_received(&self, msg: &ClusterMessage, sender: &Member) {
        self(msg, sender);
    }
}

/// A cluster of nodes sharing session managers over one channel.
///
/// ```no_run
/// use std::sync::Arc;
/// use ha::{Cluster, DeltaManager, ManagerConfig};
/// let channel = tribes::GroupChannel::builder().port(0).build()?;
/// let cluster = Cluster::new(channel);
/// let shop = DeltaManager::new("/shop", ManagerConfig::default());
/// cluster.register(&shop)?;
/// cluster.start()?;
/// shop.start(&cluster);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Cluster {
    inner: Arc<ClusterInner>,
    expire_every: Mutex<Duration>,
    /// The expiry thread and the sender whose drop stops it.
    expiry: Mutex<Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>>,
    /// The donor thread (its queue, whose drop stops it, is in `ClusterInner`).
    donor: Mutex<Option<JoinHandle<()>>>,
}

pub(crate) struct ClusterInner {
    pub(crate) channel: GroupChannel,
    managers: RwLock<HashMap<String, Arc<DeltaManager>>>,
    listeners: RwLock<Vec<Arc<dyn ClusterListener>>>,
    send_options: RwLock<SendOptions>,
    /// The queue of the thread that sends state to joining members, while it runs.
    donor_queue: Mutex<Option<crossbeam_channel::Sender<StateRequest>>>,
    /// Set while the donor thread stops: it answers nothing more (queued requests and the
    /// rest of a transfer are dropped), so a stop does not wait for whole transfers.
    donor_stopping: std::sync::atomic::AtomicBool,
    /// Session messages refused by [`SessionEvent::check`].
    refused: std::sync::atomic::AtomicU64,
}

impl Cluster {
    /// A cluster over `channel` (not started yet). Its listener takes every byte message
    /// that decodes as a session message.
    pub fn new(channel: GroupChannel) -> Self {
        let inner = Arc::new(ClusterInner {
            channel,
            managers: RwLock::new(HashMap::new()),
            listeners: RwLock::new(Vec::new()),
            send_options: RwLock::new(SendOptions::ASYNCHRONOUS),
            donor_queue: Mutex::new(None),
            donor_stopping: std::sync::atomic::AtomicBool::new(false),
            refused: std::sync::atomic::AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        inner.channel.add_channel_listener(SessionListener(weak));
        Self {
            inner,
            expire_every: Mutex::new(DEFAULT_EXPIRE_EVERY),
            expiry: Mutex::new(None),
            donor: Mutex::new(None),
        }
    }

    /// A cluster over a channel built from `builder` with Tribes' cluster defaults: when no
    /// interceptor was added, `MessageDispatchInterceptor` then the failure detection of
    /// [`Cluster::failure_detection`] (as `SimpleTcpCluster` does, with the read test on and
    /// every member checked on each heartbeat).
    /// Membership is the builder's: multicast as here (Tribes' own), or static or DNS
    /// membership, which are interceptors, so a builder with one has interceptors and gets
    /// no defaults: add the dispatch interceptor and the failure detector above it yourself
    /// (the README's axum node does). A builder with no membership at all makes a node that
    /// never sees another.
    ///
    /// ```no_run
    /// use tribes::membership::McastConfig;
    /// let builder = tribes::GroupChannel::builder().port(4000).multicast(McastConfig::default());
    /// let cluster = ha::Cluster::with_defaults(builder)?;
    /// cluster.start()?;
    /// # Ok::<(), tribes::ChannelError>(())
    /// ```
    pub fn with_defaults(builder: tribes::ChannelBuilder) -> Result<Self, tribes::ChannelError> {
        let builder = if builder.has_interceptors() {
            builder
        } else {
            Self::failure_detection(
                builder.interceptor(tribes::interceptors::MessageDispatchInterceptor::default()),
            )
        };
        Ok(Self::new(builder.build()?))
    }

    /// Adds to `builder`, below what it has so far (the dispatch interceptor) and above
    /// what comes next (the membership), the failure detection a session cluster wants:
    /// [`Cluster::failure_detector`] (the read test on), and above it a
    /// `TcpPingInterceptor` that has it check every member on each heartbeat. Without the
    /// check, a member that froze while no request replicated to it stays a member until
    /// the next change stalls on it; with it, it is found within a heartbeat and the read
    /// test (5 s + 5 s), traffic or not. Each check costs one connection and one 64-byte
    /// probe per member per heartbeat.
    ///
    /// ```
    /// use tribes::interceptors::{MessageDispatchInterceptor, StaticMembershipInterceptor};
    /// let builder = tribes::GroupChannel::builder()
    ///     .port(0)
    ///     .interceptor(MessageDispatchInterceptor::default());
    /// let channel = ha::Cluster::failure_detection(builder)
    ///     .interceptor(StaticMembershipInterceptor::new(Vec::new()))
    ///     .build()?;
    /// # Ok::<(), tribes::ChannelError>(())
    /// ```
    pub fn failure_detection(builder: tribes::ChannelBuilder) -> tribes::ChannelBuilder {
        let detector = Arc::new(Self::failure_detector());
        let ping =
            tribes::interceptors::TcpPingInterceptor::new().with_detector(Arc::clone(&detector));
        builder.interceptor(ping).interceptor_arc(detector)
    }

    /// The failure detector a session cluster wants: Tribes' `TcpFailureDetector` with its
    /// read test on (`perform_read_test`; Tribes leaves it off). Without it, a member whose
    /// process froze (stopped, swapping, a long pause) stays a member, since its kernel
    /// still accepts the probe's connection, and every synchronous request then waits out
    /// the send timeout on it. With it, the member is reported gone after the first failed
    /// send (within the send timeout plus `read_test_timeout`, 5 s), and added again when it
    /// answers.
    ///
    /// ```
    /// let channel = tribes::GroupChannel::builder()
    ///     .port(0)
    ///     .interceptor(tribes::interceptors::MessageDispatchInterceptor::default())
    ///     .interceptor(ha::Cluster::failure_detector())
    ///     .build()?;
    /// # Ok::<(), tribes::ChannelError>(())
    /// ```
    pub fn failure_detector() -> tribes::interceptors::TcpFailureDetector {
        tribes::interceptors::TcpFailureDetector::new(tribes::interceptors::FailureDetectorConfig {
            perform_read_test: true,
            ..Default::default()
        })
    }

    /// Starts the thread that sends this node's sessions to joining members
    /// (`ha-donor-<channel name>`), the channel (all levels), and the thread that expires
    /// idle sessions (`ha-expiry-<channel name>`, every [`Cluster::set_expire_interval`]).
    ///
    /// State goes out from the donor thread, one request at a time, so a joining member
    /// that is slow to acknowledge its batches holds that thread, not one of the
    /// receiver's workers (which carry every other member's replication meanwhile). Tribes
    /// sends it from the receiving thread, as this node does when the channel was started
    /// without `Cluster::start`. Beyond 16 waiting requests, more are dropped with a
    /// warning (their askers go on to the next member).
    pub fn start(&self) -> Result<(), tribes::ChannelError> {
        self.start_donor()?;
        if let Err(e) = self.inner.channel.start(tribes::Levels::ALL) {
            self.stop_donor();
            return Err(e);
        }
        self.start_expiry()?;
        Ok(())
    }

    /// Stops the expiry thread (joined), the registered managers ([`DeltaManager::stop`]:
    /// with `expire_sessions_on_shutdown` their primary sessions expire cluster-wide), and
    /// the channel. Stop serving requests first: a stopped manager holds no sessions, so a
    /// request still running would find none and start a new one.
    pub fn stop(&self) -> Result<(), tribes::ChannelError> {
        self.stop_expiry();
        let managers: Vec<_> = self.inner.managers.read().values().cloned().collect();
        for m in managers {
            m.stop();
        }
        let stopped = self.inner.channel.stop(tribes::Levels::ALL);
        // After the channel: a transfer still running fails fast instead of waiting for
        // the member's ACKs.
        self.stop_donor();
        stopped
    }

    fn start_donor(&self) -> std::io::Result<()> {
        let mut slot = self.donor.lock();
        if slot.is_some() {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded::<StateRequest>(DONOR_QUEUE);
        let inner = Arc::downgrade(&self.inner);
        let handle = std::thread::Builder::new()
            .name(format!("ha-donor-{}", self.inner.channel.name()))
            .spawn(move || {
                while let Ok(req) = rx.recv() {
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    if inner.donor_stopping() {
                        debug!(target: "ha::cluster", "stopping: state request from {} dropped", req.to);
                        continue;
                    }
                    let manager = inner.managers.read().get(&req.context).cloned();
                    match manager {
                        Some(m) => m.send_state(&req.to, &inner),
                        None => debug!(target: "ha::cluster", "state request from {} for {}: no such context any more", req.to, req.context),
                    }
                }
            })?;
        self.inner
            .donor_stopping
            .store(false, std::sync::atomic::Ordering::Release);
        *self.inner.donor_queue.lock() = Some(tx);
        *slot = Some(handle);
        Ok(())
    }

    fn stop_donor(&self) {
        // The thread drops what is queued and the rest of a running transfer; dropping the
        // queue ends it.
        self.inner
            .donor_stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.donor_queue.lock().take();
        if let Some(handle) = self.donor.lock().take() {
            let _ = handle.join();
        }
        // Stopped: a channel started again without `Cluster::start` answers state requests
        // from its receiving thread, which must not find the flag set.
        self.inner
            .donor_stopping
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// How often the registered managers expire idle sessions ([`DeltaManager::expire`]).
    /// Default 60 s (Tomcat: `processExpiresFrequency` 6 × `backgroundProcessorDelay`
    /// 10 s); zero turns the thread off (call `expire` yourself). On a running cluster the
    /// thread restarts with the new interval.
    pub fn set_expire_interval(&self, every: Duration) -> std::io::Result<()> {
        *self.expire_every.lock() = every;
        let running = self.expiry.lock().is_some();
        if running {
            self.stop_expiry();
            self.start_expiry()?;
        }
        Ok(())
    }

    fn start_expiry(&self) -> std::io::Result<()> {
        let every = *self.expire_every.lock();
        let mut slot = self.expiry.lock();
        if every.is_zero() || slot.is_some() {
            return Ok(());
        }
        // Never sent on: dropping the sender is the stop signal.
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let inner = Arc::downgrade(&self.inner);
        let handle = std::thread::Builder::new()
            .name(format!("ha-expiry-{}", self.inner.channel.name()))
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    let managers: Vec<_> = inner.managers.read().values().cloned().collect();
                    let now = crate::now_ms();
                    for m in managers {
                        let gone = m.expire(now);
                        if !gone.is_empty() {
                            debug!(target: "ha::cluster", "{}: {} session(s) expired", m.context(), gone.len());
                        }
                    }
                }
            })?;
        *slot = Some((stop, handle));
        Ok(())
    }

    fn stop_expiry(&self) {
        if let Some((stop, handle)) = self.expiry.lock().take() {
            drop(stop);
            let _ = handle.join();
        }
    }

    /// Session messages from members refused as forged or corrupt (a malformed session id,
    /// a version beyond [`MAX_VERSION`](crate::message::MAX_VERSION); see
    /// [`SessionEvent::check`]): nothing of them was applied, and their senders got a
    /// FAIL_ACK if they asked for an ACK. Of a state batch, only the bad entries are
    /// refused (each counts one here), and the rest is applied
    /// ([`SessionEvent::drop_malformed`]).
    pub fn refused_messages(&self) -> u64 {
        self.inner
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The channel.
    pub fn channel(&self) -> &GroupChannel {
        &self.inner.channel
    }

    /// Registers a manager under its context name. Refuses a manager whose settings are
    /// invalid ([`ManagerConfig::validate`](crate::ManagerConfig::validate)) or whose context
    /// has a manager already. Logs a warning when a manager with synchronous replication
    /// goes on a channel where nothing takes `ASYNCHRONOUS` sends off the caller's thread (no
    /// `MessageDispatchInterceptor`): the replication layer's ACK waits would then hold the
    /// request's runtime thread.
    pub fn register(&self, manager: &Arc<DeltaManager>) -> Result<(), SessionError> {
        manager.config().validate(manager.context())?;
        {
            let mut managers = self.inner.managers.write();
            if managers.contains_key(manager.context()) {
                return Err(SessionError::DuplicateContext(
                    manager.context().to_string(),
                ));
            }
            managers.insert(manager.context().to_string(), Arc::clone(manager));
            manager.set_origin(&self.inner.channel.local_member());
        }
        if manager.config().sync && !self.inner.channel.intercepts(SendOptions::ASYNCHRONOUS) {
            warn!(
                target: "ha::cluster",
                "context {}: synchronous replication on channel {} without a MessageDispatchInterceptor; \
                 every synchronous send, such as the replication layer's at the end of a request, \
                 waits for the members' ACKs on the sending thread",
                manager.context(),
                self.inner.channel.name()
            );
        }
        Ok(())
    }

    /// Adds a listener for the application's [`ClusterMessage`]s.
    pub fn add_listener(&self, listener: impl ClusterListener) {
        self.inner.listeners.write().push(Arc::new(listener));
    }

    /// The options [`Cluster::send`] uses. Default `ASYNCHRONOUS`, as Tribes'
    /// `channelSendOptions` (8). Session managers choose their own
    /// ([`ManagerConfig::sync`](crate::ManagerConfig::sync)).
    pub fn send_options(&self) -> SendOptions {
        *self.inner.send_options.read()
    }

    /// Changes the options [`Cluster::send`] uses.
    pub fn set_send_options(&self, options: SendOptions) {
        *self.inner.send_options.write() = options;
    }

    /// Sends `msg` to `to`, or to every member when `None`, with the cluster's send options.
    /// Returns whether there was anyone to send to.
    ///
    /// ```no_run
    /// # let cluster = ha::Cluster::with_defaults(tribes::GroupChannel::builder().port(4000))?;
    /// cluster.send(&ha::ClusterMessage::new("cache-evict", "user:42"), None)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send(&self, msg: &ClusterMessage, to: Option<&Member>) -> Result<bool, SendError> {
        self.send_with(msg, to, self.send_options())
    }

    /// Like [`Cluster::send`] with explicit options (e.g. `USE_ACK | SYNCHRONIZED_ACK` to
    /// return once every member's listeners have run).
    pub fn send_with(
        &self,
        msg: &ClusterMessage,
        to: Option<&Member>,
        options: SendOptions,
    ) -> Result<bool, SendError> {
        let bytes =
            rmp_serde::to_vec_named(msg).map_err(|e| SendError::Serialize(e.to_string()))?;
        self.inner.send_bytes(bytes, to, options, None)
    }

    pub(crate) fn inner(&self) -> Weak<ClusterInner> {
        Arc::downgrade(&self.inner)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_expiry();
        self.stop_donor();
    }
}

impl ClusterInner {
    /// Hands `to`'s request for `context`'s state to the donor thread (see [`DonorQueue`]).
    /// A full queue drops it rather than sending from the receiving thread: that is what
    /// the donor thread keeps free. The asker goes on to the next member when no state comes
    /// for a quarter of its transfer timeout.
    pub(crate) fn queue_state_request(&self, context: &str, to: &Member) -> DonorQueue {
        let queue = self.donor_queue.lock();
        let Some(queue) = queue.as_ref() else {
            return DonorQueue::NotRunning;
        };
        let req = StateRequest {
            context: context.to_string(),
            to: to.clone(),
        };
        match queue.try_send(req) {
            Ok(()) => DonorQueue::Queued,
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                warn!(target: "ha::cluster", "{DONOR_QUEUE} state requests waiting; dropping {to}'s request for {context} (it will ask another member)");
                DonorQueue::Dropped
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => DonorQueue::NotRunning,
        }
    }

    /// Whether the donor thread is stopping (see `donor_stopping`).
    /// State requests waiting for the donor thread.
    pub(crate) fn donor_waiting(&self) -> usize {
        self.donor_queue.lock().as_ref().map_or(0, |q| q.len())
    }

    pub(crate) fn donor_stopping(&self) -> bool {
        self.donor_stopping
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn deliver(&self, msg: &ClusterMessage, sender: &Member) {
        let listeners: Vec<_> = self.listeners.read().clone();
        let mut taken = false;
        for l in listeners.iter().filter(|l| l.accept(msg)) {
            l.message_received(msg, sender);
            taken = true;
        }
        if !taken {
            debug!(target: "ha::cluster", "no listener takes cluster message {:?} from {sender}", msg.kind);
        }
    }

    /// Sends to `to`, or to every member when `None`; with no members it is a no-op.
    /// Returns whether anything was sent.
    pub(crate) fn send(
        &self,
        msg: &SessionMessage,
        to: Option<&Member>,
        options: SendOptions,
    ) -> Result<bool, SendError> {
        self.send_with_handler(msg, to, options, None)
    }

    /// Like `send`, with a handler told how the send ended (it hears nothing when there
    /// is nobody to send to).
    pub(crate) fn send_with_handler(
        &self,
        msg: &SessionMessage,
        to: Option<&Member>,
        options: SendOptions,
        handler: Option<Arc<dyn tribes::interceptors::ErrorHandler>>,
    ) -> Result<bool, SendError> {
        let bytes = msg
            .encode()
            .map_err(|e| SendError::Serialize(e.to_string()))?;
        self.send_bytes(bytes, to, options, handler)
    }

    pub(crate) fn send_bytes(
        &self,
        bytes: impl Into<Bytes>,
        to: Option<&Member>,
        options: SendOptions,
        handler: Option<Arc<dyn tribes::interceptors::ErrorHandler>>,
    ) -> Result<bool, SendError> {
        let members = match to {
            Some(m) => vec![m.clone()],
            None => self.channel.members(),
        };
        if members.is_empty() {
            return Ok(false);
        }
        match handler {
            Some(h) => self.channel.send_with_handler(&members, bytes, options, h),
            None => self.channel.send(&members, bytes, options),
        }
        .map(|_| true)
    }
}

/// Routes received session messages to managers (Tribes `ClusterSessionListener`), and the
/// application's cluster messages to its listeners.
struct SessionListener(Weak<ClusterInner>);

impl tribes::ChannelListener for SessionListener {
    fn accept(&self, msg: &ChannelMessage) -> bool {
        msg.options.contains(SendOptions::BYTE_MESSAGE)
    }

    fn message_received(&self, msg: &ChannelMessage) -> Result<(), ProcessError> {
        let Some(cluster) = self.0.upgrade() else {
            return Ok(());
        };
        let mut sm = match SessionMessage::decode(&msg.payload) {
            Ok(m) => m,
            Err(e) => {
                match rmp_serde::from_slice::<ClusterMessage>(&msg.payload) {
                    Ok(cm) => cluster.deliver(&cm, &msg.sender),
                    Err(_) => {
                        debug!(target: "ha::cluster", "neither a session nor a cluster message from {}: {e}", msg.sender)
                    }
                }
                return Ok(());
            }
        };
        // A state batch keeps what is well formed: one bad entry costs that entry, not the
        // joiner's whole batch.
        if let Some((dropped, e)) = sm.event.drop_malformed() {
            let before = cluster
                .refused
                .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
            let n = before + dropped as u64;
            // Sparse, as below: when the count passes a power of two.
            if (before + 1).next_power_of_two() <= n {
                warn!(target: "ha::cluster", "dropped {dropped} malformed entries of a state batch from {} and kept the rest ({n} refused so far): {e}", msg.sender);
            }
        }
        if let Err(e) = sm.event.check() {
            let n = cluster
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            // Sparse: a member sending nothing else cannot fill the log.
            if crate::sparse(n) {
                warn!(target: "ha::cluster", "refused a session message from {} ({n} so far): {e}", msg.sender);
            }
            return Err(ProcessError::new(e.to_string()));
        }
        let manager = cluster.managers.read().get(&sm.context).cloned();
        match manager {
            Some(m) => m.handle(sm, &msg.sender, &cluster),
            None => {
                warn!(target: "ha::cluster", "no manager for context {:?} (from {})", sm.context, msg.sender);
                if matches!(sm.event, SessionEvent::GetAllSessions) {
                    let reply = SessionMessage {
                        context: sm.context,
                        timestamp_ms: crate::now_ms(),
                        event: SessionEvent::NoContextManager,
                    };
                    let _ = cluster.send(&reply, Some(&msg.sender), SendOptions::ASYNCHRONOUS);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionId;

    #[test]
    fn register_refuses_bad_settings_and_a_second_manager_for_a_context() {
        use crate::ManagerConfig;
        let cluster = Cluster::new(GroupChannel::builder().port(0).build().unwrap());
        let bad = DeltaManager::new(
            "/a",
            ManagerConfig {
                route: Some("n;1".into()),
                ..ManagerConfig::default()
            },
        );
        let err = cluster.register(&bad).unwrap_err();
        assert!(
            matches!(err, SessionError::InvalidConfig { field: "route", .. }),
            "{err}"
        );
        let zero = DeltaManager::new(
            "/a",
            ManagerConfig {
                max_transfer_queue: 0,
                ..ManagerConfig::default()
            },
        );
        assert!(cluster.register(&zero).is_err());
        let good = DeltaManager::new("/a", ManagerConfig::default());
        cluster.register(&good).unwrap();
        let again = DeltaManager::new("/a", ManagerConfig::default());
        assert_eq!(
            cluster.register(&again),
            Err(SessionError::DuplicateContext("/a".into()))
        );
    }

    #[test]
    fn cluster_and_session_messages_never_decode_as_each_other() {
        let cm = ClusterMessage::new("k", vec![0u8, 1, 255]);
        let bytes = rmp_serde::to_vec_named(&cm).unwrap();
        assert!(SessionMessage::decode(&bytes).is_err());
        assert_eq!(rmp_serde::from_slice::<ClusterMessage>(&bytes).unwrap(), cm);
        // The payload travels as MessagePack bin: 2 bytes of header, then the bytes.
        assert!(bytes.ends_with(&[0xc4, 3, 0, 1, 255]), "{bytes:?}");

        let sm = SessionMessage {
            context: "/".into(),
            timestamp_ms: 1,
            event: SessionEvent::Expired {
                id: SessionId::new("a"),
            },
        };
        let bytes = sm.encode().unwrap();
        assert!(rmp_serde::from_slice::<ClusterMessage>(&bytes).is_err());
    }
}
