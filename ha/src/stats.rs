//! Statistics of a [`DeltaManager`](crate::DeltaManager): messages sent and received per
//! event type (Tomcat's `counterSend_EVT_*` / `counterReceive_EVT_*`), session counts, and the
//! state transfer's outcome.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::message::SessionEvent;
use crate::store::StoreStats;

/// Message counts by event type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventCounts {
    /// `EVT_SESSION_CREATED`.
    pub created: u64,
    /// `EVT_SESSION_EXPIRED`.
    pub expired: u64,
    /// `EVT_SESSION_ACCESSED`.
    pub accessed: u64,
    /// `EVT_GET_ALL_SESSIONS`.
    pub get_all_sessions: u64,
    /// `EVT_ALL_SESSION_DATA` (one per batch).
    pub all_session_data: u64,
    /// `EVT_SESSION_DELTA`.
    pub delta: u64,
    /// `EVT_ALL_SESSION_TRANSFERCOMPLETE`.
    pub transfer_complete: u64,
    /// `EVT_CHANGE_SESSION_ID`.
    pub change_session_id: u64,
    /// `EVT_ALL_SESSION_NOCONTEXTMANAGER`.
    pub no_context_manager: u64,
    /// Requests for a session this node did not know (not in Tomcat).
    pub get_session: u64,
    /// Full sessions sent in answer (not in Tomcat).
    pub session_data: u64,
    /// State requests answered "not ready": the node was still receiving its own (not in
    /// Tomcat).
    pub state_not_ready: u64,
}

impl EventCounts {
    /// All messages counted.
    pub fn total(&self) -> u64 {
        self.created
            + self.expired
            + self.accessed
            + self.get_all_sessions
            + self.all_session_data
            + self.delta
            + self.transfer_complete
            + self.change_session_id
            + self.no_context_manager
            + self.get_session
            + self.session_data
            + self.state_not_ready
    }
}

/// A snapshot of a manager's counters ([`DeltaManager::stats`](crate::DeltaManager::stats)).
///
/// ```
/// use ha::{DeltaManager, ManagerConfig};
/// let m = DeltaManager::new("/", ManagerConfig::default());
/// let id = m.create_session().unwrap(); // no cluster attached: nothing is sent
/// let st = m.stats();
/// assert_eq!((st.sessions_created, st.active, st.max_active), (1, 1, 1));
/// assert_eq!(st.sent.total(), 0);
/// # let _ = id;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStats {
    /// Messages sent (to all members at once counts one), by event type.
    pub sent: EventCounts,
    /// Messages received, by event type (also those queued or dropped during a state
    /// transfer).
    pub received: EventCounts,
    /// Sends that failed for at least one member (logged; the local change stands).
    pub send_errors: u64,
    /// Sessions created on this node (Tomcat `sessionCounter`).
    pub sessions_created: u64,
    /// Sessions that timed out or were invalidated on this node (Tomcat `expiredSessions`);
    /// copies removed on another node's word are in `received.expired`.
    pub sessions_expired: u64,
    /// Sessions held now, primaries and copies.
    pub active: usize,
    /// Most sessions held at once (Tomcat `maxActive`).
    pub max_active: usize,
    /// New sessions refused because this node held
    /// [`max_active_sessions`](crate::ManagerConfig::max_active_sessions) already (Tomcat
    /// `rejectedSessions`).
    pub rejected_sessions: u64,
    /// Starts that got no complete state from the asked member in time (Tomcat
    /// `counterNoStateTransfered`).
    pub state_transfers_failed: u64,
    /// How long the last state transfer took, ms (Tomcat `stateTransferTime` is its start).
    pub state_transfer_ms: u64,
    /// Messages that arrived during a state transfer and were dropped: the queue was full,
    /// or they were older than the snapshot.
    pub transfer_dropped: u64,
    /// Requests whose session id this node did not know and that a member supplied.
    pub sessions_fetched: u64,
    /// Requests whose session id no member knew (expired, or never issued), plus those not
    /// asked because too many asks were already in flight.
    pub fetch_misses: u64,
    /// Copies found behind a sender's (a delta that skipped versions, an access notice for
    /// a newer version, a change to a session this node lacked) and asked for again.
    pub copies_repaired: u64,
    /// Requests that found this node's copy behind the version their client had already
    /// seen, and waited for it ([`crate::DeltaManager::catch_up`]).
    pub version_waits: u64,
    /// Of those, the ones whose copy was still behind after the wait and the members asked.
    pub version_fetches: u64,
    /// Applied, stale, out-of-order and unknown-session counts of the session store.
    pub store: StoreStats,
}

const KINDS: usize = 12;

pub(crate) fn kind(event: &SessionEvent) -> usize {
    match event {
        SessionEvent::Created { .. } => 0,
        SessionEvent::Expired { .. } => 1,
        SessionEvent::Accessed { .. } => 2,
        SessionEvent::GetAllSessions => 3,
        SessionEvent::AllSessionData { .. } => 4,
        SessionEvent::Delta(_) => 5,
        SessionEvent::TransferComplete { .. } => 6,
        SessionEvent::ChangeSessionId { .. } => 7,
        SessionEvent::NoContextManager => 8,
        SessionEvent::GetSession { .. } => 9,
        SessionEvent::SessionData { .. } => 10,
        SessionEvent::StateNotReady => 11,
    }
}

/// The live counters behind [`ManagerStats`]: atomics, bumped without the store lock.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    sent: [AtomicU64; KINDS],
    received: [AtomicU64; KINDS],
    pub(crate) send_errors: AtomicU64,
    pub(crate) sessions_created: AtomicU64,
    pub(crate) sessions_expired: AtomicU64,
    pub(crate) max_active: AtomicU64,
    pub(crate) rejected_sessions: AtomicU64,
    pub(crate) state_transfers_failed: AtomicU64,
    pub(crate) state_transfer_ms: AtomicU64,
    pub(crate) transfer_dropped: AtomicU64,
    pub(crate) sessions_fetched: AtomicU64,
    pub(crate) fetch_misses: AtomicU64,
    pub(crate) copies_repaired: AtomicU64,
    pub(crate) version_waits: AtomicU64,
    pub(crate) version_fetches: AtomicU64,
}

impl Counters {
    pub(crate) fn sent(&self, event: &SessionEvent) {
        self.sent_kind(kind(event));
    }

    /// Like `sent`, with the event's kind (see `kind`).
    pub(crate) fn sent_kind(&self, kind: usize) {
        self.sent[kind].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, event: &SessionEvent) {
        self.received[kind(event)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how many sessions are held now (for `max_active`).
    pub(crate) fn held(&self, now: usize) {
        self.max_active.fetch_max(now as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, active: usize, store: StoreStats) -> ManagerStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counts = |c: &[AtomicU64; KINDS]| EventCounts {
            created: load(&c[0]),
            expired: load(&c[1]),
            accessed: load(&c[2]),
            get_all_sessions: load(&c[3]),
            all_session_data: load(&c[4]),
            delta: load(&c[5]),
            transfer_complete: load(&c[6]),
            change_session_id: load(&c[7]),
            no_context_manager: load(&c[8]),
            get_session: load(&c[9]),
            session_data: load(&c[10]),
            state_not_ready: load(&c[11]),
        };
        ManagerStats {
            sent: counts(&self.sent),
            received: counts(&self.received),
            send_errors: load(&self.send_errors),
            sessions_created: load(&self.sessions_created),
            sessions_expired: load(&self.sessions_expired),
            active,
            max_active: load(&self.max_active) as usize,
            rejected_sessions: load(&self.rejected_sessions),
            state_transfers_failed: load(&self.state_transfers_failed),
            state_transfer_ms: load(&self.state_transfer_ms),
            transfer_dropped: load(&self.transfer_dropped),
            sessions_fetched: load(&self.sessions_fetched),
            fetch_misses: load(&self.fetch_misses),
            copies_repaired: load(&self.copies_repaired),
            version_waits: load(&self.version_waits),
            version_fetches: load(&self.version_fetches),
            store,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionId;

    #[test]
    fn every_event_kind_has_its_own_counter() {
        let c = Counters::default();
        let id = SessionId::new("a");
        let events = [
            SessionEvent::Created {
                id: id.clone(),
                max_inactive_secs: 1,
            },
            SessionEvent::Expired { id: id.clone() },
            SessionEvent::Accessed {
                id: id.clone(),
                at_ms: 1,
                version: 1,
                origin: 0,
            },
            SessionEvent::GetAllSessions,
            SessionEvent::AllSessionData {
                sessions: vec![],
                held_back: vec![],
                buried: vec![],
            },
            SessionEvent::Delta(crate::delta::Delta {
                session_id: id.clone(),
                version: 1,
                last_access_ms: 1,
                actions: vec![],
                origin: 0,
            }),
            SessionEvent::TransferComplete { snapshot_ms: 1 },
            SessionEvent::ChangeSessionId {
                old: id.clone(),
                new: SessionId::new("b"),
            },
            SessionEvent::NoContextManager,
            SessionEvent::GetSession { id: id.clone() },
            SessionEvent::SessionData {
                session: Box::new(crate::session::Session::new(id.clone(), 0, 60)),
            },
            SessionEvent::StateNotReady,
        ];
        for (i, e) in events.iter().enumerate() {
            for _ in 0..=i {
                c.sent(e);
            }
            c.received(e);
        }
        let s = c.snapshot(0, StoreStats::default());
        let sent = s.sent;
        assert_eq!(
            [
                sent.created,
                sent.expired,
                sent.accessed,
                sent.get_all_sessions,
                sent.all_session_data,
                sent.delta,
                sent.transfer_complete,
                sent.change_session_id,
                sent.no_context_manager,
                sent.get_session,
                sent.session_data,
                sent.state_not_ready
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        assert_eq!(s.received.total(), 12);
    }
}
