//! `GroupChannel`: the application's handle on the group.

mod builder;
mod coordinator;
mod levels;
mod listener;

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::Sender as ChanTx;
use log::{info, warn};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;

pub use builder::ChannelBuilder;
pub use levels::Levels;
pub use listener::{ChannelListener, MembershipListener};

use crate::error::{ChannelError, ProcessError, SendError};
use crate::id::UniqueId;
use crate::interceptors::{Bottom, ErrorHandler, Outgoing, Stack, StackHandle, Top};
use crate::member::Member;
use crate::options::SendOptions;
use crate::transport::{ReceiverStats, SenderStats};
use crate::wire::ChannelMessage;
use coordinator::Coordinator;

/// A member of a group: sends to members, delivers what they send to its listeners.
///
/// ```no_run
/// use tribes::{GroupChannel, SendOptions};
/// use tribes::interceptors::StaticMembershipInterceptor;
///
/// let peer = tribes::Member::new("127.0.0.1:4001".parse()?);
/// let channel = GroupChannel::builder()
///     .name("demo")
///     .port(4000)
///     .interceptor(StaticMembershipInterceptor::new(vec![peer.clone()]))
///     .build()?;
/// channel.add_channel_listener(|msg: &tribes::ChannelMessage| {
///     println!("{} says {:?}", msg.sender, msg.payload);
///     Ok(())
/// });
/// channel.start(tribes::Levels::DEFAULT)?;
/// channel.send(&[peer], b"hello".to_vec(), SendOptions::USE_ACK)?;
/// channel.stop(tribes::Levels::DEFAULT)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct GroupChannel {
    name: String,
    stack: Arc<Stack>,
    top: Arc<ChannelTop>,
    coordinator: Arc<Coordinator>,
    heartbeat_interval: Option<Duration>,
    heartbeat: Mutex<Option<(ChanTx<()>, JoinHandle<()>)>>,
    levels: Mutex<Levels>,
}

impl GroupChannel {
    /// A builder with Tribes' defaults.
    pub fn builder() -> ChannelBuilder {
        ChannelBuilder::default()
    }

    /// The channel's name (used in thread names and logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the given levels: transport first, then interceptors from the bottom up, then
    /// the heartbeat thread (`tribes-heartbeat-<name>`).
    pub fn start(&self, levels: Levels) -> Result<(), ChannelError> {
        let mut running = self.levels.lock();
        if running.intersects(levels) {
            return Err(ChannelError::Level(format!(
                "levels {:?} already started",
                running.intersection(levels)
            )));
        }
        self.coordinator.start(levels, &self.stack)?;
        for i in (0..self.stack.interceptors.len()).rev() {
            let handle = self.handle(i);
            if let Err(e) = self.stack.interceptors[i].start(levels, &handle) {
                for j in i + 1..self.stack.interceptors.len() {
                    self.stack.interceptors[j].stop(levels, &self.handle(j));
                }
                self.coordinator.stop(levels, *running);
                return Err(e);
            }
        }
        *running = running.union(levels);
        drop(running);
        self.start_heartbeat();
        info!(target: "tribes::channel", "channel {} started levels {:?}", self.name, levels);
        Ok(())
    }

    /// Stops the given levels: interceptors from the top down, then the transport. Joins every
    /// thread the matching `start` spawned. Once every level is stopped the member list is
    /// empty (without member-disappeared events): a restart finds its members afresh.
    pub fn stop(&self, levels: Levels) -> Result<(), ChannelError> {
        let mut running = self.levels.lock();
        let levels = running.intersection(levels);
        if levels.is_empty() {
            return Ok(());
        }
        for i in 0..self.stack.interceptors.len() {
            self.stack.interceptors[i].stop(levels, &self.handle(i));
        }
        *running = running.difference(levels);
        self.coordinator.stop(levels, *running);
        if running.is_empty() {
            self.stop_heartbeat();
            // Nothing keeps the member list true any more: a restart starts from what
            // membership then finds, not from members that may have gone meanwhile.
            self.top.members.lock().clear();
            self.top.members_changed.notify_all();
        }
        info!(target: "tribes::channel", "channel {} stopped levels {:?}", self.name, levels);
        Ok(())
    }

    /// Sends raw bytes (BYTE_MESSAGE is set) to `to`. Returns the message id.
    pub fn send(
        &self,
        to: &[Member],
        payload: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<UniqueId, SendError> {
        self.send_payload(
            to,
            payload.into(),
            options.with(SendOptions::BYTE_MESSAGE),
            None,
        )
    }

    /// Sends a serde value serialized with rmp-serde (BYTE_MESSAGE is cleared).
    pub fn send_typed<T: Serialize + ?Sized>(
        &self,
        to: &[Member],
        value: &T,
        options: SendOptions,
    ) -> Result<UniqueId, SendError> {
        let bytes =
            rmp_serde::to_vec_named(value).map_err(|e| SendError::Serialize(e.to_string()))?;
        self.send_payload(
            to,
            Bytes::from(bytes),
            options.without(SendOptions::BYTE_MESSAGE),
            None,
        )
    }

    /// Like [`GroupChannel::send`], with a handler told how the send ended: asynchronous
    /// sends tell it from the dispatch thread, others from the sending thread before this
    /// returns (the returned error then says the same). A send refused before it is queued
    /// (e.g. [`SendError::QueueFull`]) is only returned.
    pub fn send_with_handler(
        &self,
        to: &[Member],
        payload: impl Into<Bytes>,
        options: SendOptions,
        handler: Arc<dyn ErrorHandler>,
    ) -> Result<UniqueId, SendError> {
        self.send_payload(
            to,
            payload.into(),
            options.with(SendOptions::BYTE_MESSAGE),
            Some(handler),
        )
    }

    fn send_payload(
        &self,
        to: &[Member],
        payload: Bytes,
        options: SendOptions,
        handler: Option<Arc<dyn ErrorHandler>>,
    ) -> Result<UniqueId, SendError> {
        if to.is_empty() {
            return Err(SendError::NoDestinations);
        }
        let message = ChannelMessage {
            options,
            timestamp: now_millis(),
            unique_id: UniqueId::random(),
            sender: self.coordinator.local_member(),
            payload,
        };
        let id = message.unique_id;
        self.stack.down().send(Outgoing {
            destinations: to.to_vec(),
            message,
            handler,
        })?;
        Ok(id)
    }

    /// Registers a listener for messages.
    pub fn add_channel_listener(&self, l: impl ChannelListener) {
        let mut list = self.top.channel_listeners.write();
        let mut next = Vec::clone(&list);
        next.push(Arc::new(l));
        *list = Arc::new(next);
    }

    /// Registers a listener for membership changes.
    pub fn add_membership_listener(&self, l: impl MembershipListener) {
        let mut list = self.top.membership_listeners.write();
        let mut next = Vec::clone(&list);
        next.push(Arc::new(l));
        *list = Arc::new(next);
    }

    /// The members currently in the group (as reported by the stack).
    pub fn members(&self) -> Vec<Member> {
        self.top.members.lock().clone()
    }

    /// Changes the payload this member advertises; with multicast membership a beacon goes
    /// out at once.
    pub fn set_member_payload(&self, payload: impl Into<Bytes>) {
        let payload = payload.into();
        self.coordinator.update_local(|m| m.payload = payload);
    }

    /// Changes this member's domain; with multicast membership a beacon goes out at once.
    pub fn set_domain(&self, domain: impl Into<Bytes>) {
        let domain = domain.into();
        self.coordinator.update_local(|m| m.domain = domain);
    }

    /// Members as the membership service sees them, oldest first (empty without a service).
    pub fn service_members(&self) -> Vec<Member> {
        self.coordinator.service_members()
    }

    /// How long after start membership may take to find the members that are already up:
    /// twice the beacon interval with multicast (Tribes sleeps that long in every start;
    /// here only who needs the members at once waits, e.g. a session manager asking for
    /// state); zero for static and DNS membership, whose members are known when `start`
    /// returns (and, under a `TcpFailureDetector`, verified).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tribes::GroupChannel;
    /// let ch = GroupChannel::builder().port(0).build()?;
    /// assert_eq!(ch.discovery_time(), Duration::ZERO);
    /// # Ok::<(), tribes::ChannelError>(())
    /// ```
    pub fn discovery_time(&self) -> Duration {
        self.coordinator.discovery_time()
    }

    /// This node as others see it.
    pub fn local_member(&self) -> Member {
        self.coordinator.local_member()
    }

    /// Waits until at least `n` members are seen; returns whether that happened in time.
    pub fn wait_for_members(&self, n: usize, timeout: Duration) -> bool {
        let deadline = crate::deadline::from_now(timeout);
        let mut members = self.top.members.lock();
        while members.len() < n {
            if self
                .top
                .members_changed
                .wait_until(&mut members, deadline)
                .timed_out()
            {
                return members.len() >= n;
            }
        }
        true
    }

    /// Whether an interceptor of this channel selects messages sent with `options` by its
    /// option flag: one whose flag is not empty and is contained in `options`. Interceptors
    /// with an empty flag, which see every message (Tribes' `okToProcess`), do not count.
    /// For example, without a
    /// [`MessageDispatchInterceptor`](crate::interceptors::MessageDispatchInterceptor)
    /// nothing takes `ASYNCHRONOUS` sends off the caller's thread.
    ///
    /// ```
    /// use tribes::{GroupChannel, SendOptions};
    /// use tribes::interceptors::StaticMembershipInterceptor;
    /// // No interceptor given: the builder adds the dispatch interceptor, as Tribes does.
    /// let plain = GroupChannel::builder().port(0).build()?;
    /// assert!(plain.intercepts(SendOptions::ASYNCHRONOUS));
    /// let bare = GroupChannel::builder()
    ///     .port(0)
    ///     .interceptor(StaticMembershipInterceptor::new(Vec::new()))
    ///     .build()?;
    /// assert!(!bare.intercepts(SendOptions::ASYNCHRONOUS));
    /// # Ok::<(), tribes::ChannelError>(())
    /// ```
    pub fn intercepts(&self, options: SendOptions) -> bool {
        self.stack.interceptors.iter().any(|ic| {
            let flag = ic.option_flag();
            !flag.is_empty() && options.contains(flag)
        })
    }

    /// Runs one heartbeat now (the heartbeat thread does this every interval).
    pub fn heartbeat(&self) {
        self.stack.down().heartbeat();
    }

    /// Receiver counters, when the receiver runs.
    pub fn receiver_stats(&self) -> Option<Arc<ReceiverStats>> {
        self.coordinator.receiver_stats()
    }

    /// Sender counters.
    pub fn sender_stats(&self) -> &SenderStats {
        self.coordinator.sender().stats()
    }

    fn handle(&self, index: usize) -> StackHandle {
        StackHandle {
            stack: Arc::downgrade(&self.stack),
            index,
            channel: Arc::from(self.name.as_str()),
        }
    }

    fn start_heartbeat(&self) {
        let Some(interval) = self.heartbeat_interval else {
            return;
        };
        let mut hb = self.heartbeat.lock();
        if hb.is_some() {
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let stack = Arc::downgrade(&self.stack);
        let spawned = std::thread::Builder::new()
            .name(format!("tribes-heartbeat-{}", self.name))
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(interval)
                {
                    match stack.upgrade() {
                        Some(s) => s.down().heartbeat(),
                        None => break,
                    }
                }
            });
        match spawned {
            Ok(h) => *hb = Some((tx, h)),
            Err(e) => warn!(target: "tribes::channel", "cannot start heartbeat thread: {e}"),
        }
    }

    fn stop_heartbeat(&self) {
        if let Some((tx, h)) = self.heartbeat.lock().take() {
            drop(tx);
            let _ = h.join();
        }
    }
}

impl Drop for GroupChannel {
    fn drop(&mut self) {
        let _ = self.stop(Levels::ALL);
    }
}

/// The top of the stack: listeners and the member view.
#[derive(Default)]
struct ChannelTop {
    /// Copy-on-write lists (as in Tribes): delivery clones one `Arc`, not the list.
    channel_listeners: RwLock<Arc<Vec<Arc<dyn ChannelListener>>>>,
    membership_listeners: RwLock<Arc<Vec<Arc<dyn MembershipListener>>>>,
    members: Mutex<Vec<Member>>,
    members_changed: Condvar,
    /// The transport's sender: a member that left has its pooled connections closed.
    sender: Weak<crate::transport::Sender>,
}

impl Top for ChannelTop {
    fn received(&self, msg: ChannelMessage) -> Result<(), ProcessError> {
        let listeners = Arc::clone(&self.channel_listeners.read());
        let mut result = Ok(());
        let mut accepted = false;
        for l in listeners.iter() {
            if l.accept(&msg) {
                accepted = true;
                if let Err(e) = l.message_received(&msg) {
                    result = Err(e);
                }
            }
        }
        if !accepted {
            log::debug!(target: "tribes::channel", "no listener accepted message {} from {}", msg.unique_id, msg.sender);
        }
        result
    }

    fn member_added(&self, m: Member) {
        {
            let mut members = self.members.lock();
            if let Some(existing) = members.iter_mut().find(|x| **x == m) {
                *existing = m;
                return;
            }
            members.push(m.clone());
        }
        self.members_changed.notify_all();
        info!(target: "tribes::membership", "member added: {m}");
        let listeners = Arc::clone(&self.membership_listeners.read());
        for l in listeners.iter() {
            l.member_added(&m);
        }
    }

    fn member_disappeared(&self, m: Member) {
        let removed = {
            let mut members = self.members.lock();
            let before = members.len();
            members.retain(|x| *x != m);
            before != members.len()
        };
        if !removed {
            return;
        }
        self.members_changed.notify_all();
        info!(target: "tribes::membership", "member disappeared: {m}");
        // Its connections would otherwise stay pooled (and its entry with them) for good.
        if let Some(sender) = self.sender.upgrade() {
            sender.remove(&m);
        }
        let listeners = Arc::clone(&self.membership_listeners.read());
        for l in listeners.iter() {
            l.member_disappeared(&m);
        }
    }

    fn members(&self) -> Vec<Member> {
        self.members.lock().clone()
    }
}

/// Wall clock in ms since the Unix epoch (the envelope timestamp).
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Decodes an rmp-serde payload sent with [`GroupChannel::send_typed`].
///
/// ```
/// # use tribes::channel::decode;
/// let bytes = rmp_serde::to_vec_named(&(1u8, "x")).unwrap();
/// let v: (u8, String) = decode(&bytes).unwrap();
/// assert_eq!(v.1, "x");
/// ```
pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ProcessError> {
    rmp_serde::from_slice(payload)
        .map_err(|e| ProcessError::new(format!("cannot decode payload: {e}")))
}
