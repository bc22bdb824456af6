//! `Cluster` (Tribes `SimpleTcpCluster`): owns a `GroupChannel`, routes session messages to
//! the manager of their context (the `ClusterSessionListener` role), and sends for managers.
//! Unlike Tribes, send errors reach the caller.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use log::{debug, warn};
use parking_lot::RwLock;
use tribes::{ChannelMessage, GroupChannel, Member, ProcessError, SendError, SendOptions};

use crate::manager::DeltaManager;
use crate::message::{SessionEvent, SessionMessage};

/// A cluster of nodes sharing session managers over one channel.
///
/// ```no_run
/// use std::sync::Arc;
/// use ha::{Cluster, DeltaManager, ManagerConfig};
/// let channel = tribes::GroupChannel::builder().port(0).build()?;
/// let cluster = Cluster::new(channel);
/// let shop = DeltaManager::new("/shop", ManagerConfig::default());
/// cluster.register(&shop);
/// cluster.start()?;
/// shop.start(&cluster);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

pub(crate) struct ClusterInner {
    pub(crate) channel: GroupChannel,
    managers: RwLock<HashMap<String, Arc<DeltaManager>>>,
}

impl Cluster {
    /// A cluster over `channel` (not started yet). Its listener takes every byte message
    /// that decodes as a session message.
    pub fn new(channel: GroupChannel) -> Self {
        let inner = Arc::new(ClusterInner {
            channel,
            managers: RwLock::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&inner);
        inner.channel.add_channel_listener(SessionListener(weak));
        Self { inner }
    }

    /// A cluster over a channel built from `builder` with Tribes' cluster defaults: when no
    /// interceptor was added, `MessageDispatchInterceptor` then `TcpFailureDetector` (as
    /// `SimpleTcpCluster` does).
    ///
    /// ```no_run
    /// let cluster = ha::Cluster::with_defaults(tribes::GroupChannel::builder().port(4000))?;
    /// cluster.start()?;
    /// # Ok::<(), tribes::ChannelError>(())
    /// ```
    pub fn with_defaults(builder: tribes::ChannelBuilder) -> Result<Self, tribes::ChannelError> {
        let builder = if builder.has_interceptors() {
            builder
        } else {
            builder
                .interceptor(tribes::interceptors::MessageDispatchInterceptor::default())
                .interceptor(tribes::interceptors::TcpFailureDetector::default())
        };
        Ok(Self::new(builder.build()?))
    }

    /// Starts the channel (all levels).
    pub fn start(&self) -> Result<(), tribes::ChannelError> {
        self.inner.channel.start(tribes::Levels::ALL)
    }

    /// Stops the channel.
    pub fn stop(&self) -> Result<(), tribes::ChannelError> {
        self.inner.channel.stop(tribes::Levels::ALL)
    }

    /// The channel.
    pub fn channel(&self) -> &GroupChannel {
        &self.inner.channel
    }

    /// Registers a manager under its context name.
    pub fn register(&self, manager: &Arc<DeltaManager>) {
        self.inner
            .managers
            .write()
            .insert(manager.context().to_string(), Arc::clone(manager));
    }

    pub(crate) fn inner(&self) -> Weak<ClusterInner> {
        Arc::downgrade(&self.inner)
    }
}

impl ClusterInner {
    /// Sends to `to`, or to every member when `None`; with no members it is a no-op.
    /// Returns whether anything was sent.
    pub(crate) fn send(
        &self,
        msg: &SessionMessage,
        to: Option<&Member>,
        options: SendOptions,
    ) -> Result<bool, SendError> {
        let members = match to {
            Some(m) => vec![m.clone()],
            None => self.channel.members(),
        };
        if members.is_empty() {
            return Ok(false);
        }
        let bytes = msg
            .encode()
            .map_err(|e| SendError::Serialize(e.to_string()))?;
        self.channel.send(&members, bytes, options).map(|_| true)
    }
}

/// Routes received session messages to managers (Tribes `ClusterSessionListener`).
struct SessionListener(Weak<ClusterInner>);

impl tribes::ChannelListener for SessionListener {
    fn accept(&self, msg: &ChannelMessage) -> bool {
        msg.options.contains(SendOptions::BYTE_MESSAGE)
    }

    fn message_received(&self, msg: &ChannelMessage) -> Result<(), ProcessError> {
        let Some(cluster) = self.0.upgrade() else {
            return Ok(());
        };
        let sm = match SessionMessage::decode(&msg.payload) {
            Ok(m) => m,
            Err(e) => {
                debug!(target: "ha::cluster", "not a session message from {}: {e}", msg.sender);
                return Ok(());
            }
        };
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
