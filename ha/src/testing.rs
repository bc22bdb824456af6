//! Test fixtures shared by the unit tests: a manager that receives without sockets.

use std::sync::Arc;

use tribes::Member;

use crate::cluster::{Cluster, ClusterInner};
use crate::delta::Delta;
use crate::manager::{DeltaManager, ManagerConfig};
use crate::message::SessionEvent;
use crate::session::{Session, SessionId};

/// A manager registered on a channel that is built but never started (no sockets), and a
/// way to hand it another node's message as the receiver would.
pub(crate) struct Receiving {
    /// Keeps the cluster the manager reports to alive.
    _cluster: Cluster,
    pub(crate) manager: Arc<DeltaManager>,
    inner: Arc<ClusterInner>,
    sender: Member,
}

impl Receiving {
    pub(crate) fn new(cfg: ManagerConfig) -> Self {
        let cluster = Cluster::new(tribes::GroupChannel::builder().build().unwrap());
        let manager = DeltaManager::new("/", cfg);
        cluster.register(&manager).unwrap();
        let inner = cluster.inner().upgrade().unwrap();
        Self {
            _cluster: cluster,
            manager,
            inner,
            sender: Member::new(([127, 0, 0, 1], 4000).into()),
        }
    }

    /// Delivers `event` as from another node.
    pub(crate) fn deliver(&self, event: SessionEvent) {
        self.try_deliver(event).unwrap();
    }

    /// Delivers `event` as from another node; the handler's answer (an `Err` becomes a
    /// FAIL_ACK for a sender that asked for one).
    pub(crate) fn try_deliver(&self, event: SessionEvent) -> Result<(), tribes::ProcessError> {
        let msg = self.manager.message(event);
        self.manager.handle(msg, &self.sender, &self.inner)
    }

    /// Delivers `event` as from another node whose clock read `sent_ms` when it sent it.
    pub(crate) fn deliver_sent_at(&self, event: SessionEvent, sent_ms: i64) {
        let mut msg = self.manager.message(event);
        msg.timestamp_ms = sent_ms;
        self.manager.handle(msg, &self.sender, &self.inner).unwrap();
    }
}

/// Session `id` as another node's primary and its deltas: one per name, each setting that
/// attribute to `1`.
pub(crate) fn deltas_setting(id: &SessionId, names: &[&str]) -> (Session, Vec<Delta>) {
    let mut primary = Session::new(id.clone(), 0, 60);
    let deltas = names
        .iter()
        .map(|name| {
            primary.insert(name, &1u32).unwrap();
            primary.take_delta().unwrap()
        })
        .collect();
    (primary, deltas)
}
