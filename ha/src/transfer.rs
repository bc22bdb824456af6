//! State transfer on join, the requester's side: which messages are applied at once, which
//! wait until the state has arrived, and which of those are replayed. Pure: time is a
//! parameter.
//!
//! Two departures from Tribes, both for correctness:
//!
//! - Tribes queues a GET_ALL_SESSIONS that arrives while its own transfer is running and
//!   then drops it, so two nodes starting together wait for each other until the timeout
//!   (pain point 3). Here such a request is answered at once, with
//!   [`SessionEvent::StateNotReady`]: the asker goes on to the next member, and ends with
//!   an empty state only if every member it could ask was itself starting.
//! - Tribes drops queued events sent before the donor's snapshot, by timestamp. An
//!   invalidation or a change that was still on its way to the donor when it took the
//!   snapshot is then lost on the joiner for good (a logged-out session comes back). Here
//!   every queued event is replayed, in arrival order: per-session versions drop what the
//!   snapshot already holds, and burials keep invalidated sessions out.

use std::collections::VecDeque;

use log::warn;

use crate::message::{SessionEvent, SessionMessage};

/// What to do with a message offered during a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Offer {
    /// Apply (or answer) it now.
    Apply(SessionMessage),
    /// Held until the transfer ends.
    Queued,
    /// The queue is full: the message was dropped (counted and logged).
    Dropped,
}

/// The requester's side of one state transfer.
///
/// ```
/// use ha::{Offer, SessionEvent, SessionId, SessionMessage, StateTransfer};
/// let mut t = StateTransfer::new(1_000, 60_000, 1024);
/// let logout = SessionMessage {
///     context: "/".into(),
///     timestamp_ms: 1_100,
///     event: SessionEvent::Expired { id: SessionId::new("a") },
/// };
/// assert_eq!(t.offer(logout), Offer::Queued);
/// let done = SessionMessage {
///     context: "/".into(),
///     timestamp_ms: 2_000,
///     event: SessionEvent::TransferComplete { snapshot_ms: 1_200 },
/// };
/// assert!(matches!(t.offer(done), Offer::Apply(_)));
/// assert!(t.is_complete());
/// // Replayed even though it was sent before the snapshot: the donor may not have had it.
/// assert_eq!(t.finish().len(), 1);
/// ```
#[derive(Debug)]
pub struct StateTransfer {
    deadline_ms: i64,
    queue: VecDeque<SessionMessage>,
    max_queue: usize,
    complete: bool,
    /// The member asked answered that it is itself still receiving its state.
    not_ready: bool,
    dropped: u64,
}

impl StateTransfer {
    /// A transfer requested at `requested_ms` that gives up at `requested_ms + timeout_ms`,
    /// holding at most `max_queue` messages meanwhile.
    pub fn new(requested_ms: i64, timeout_ms: i64, max_queue: usize) -> Self {
        Self {
            deadline_ms: requested_ms.saturating_add(timeout_ms),
            queue: VecDeque::new(),
            max_queue,
            complete: false,
            not_ready: false,
            dropped: 0,
        }
    }

    /// Offers a received message. State data, the end markers and other nodes' requests are
    /// handled at once; session events wait for [`StateTransfer::finish`].
    pub fn offer(&mut self, msg: SessionMessage) -> Offer {
        match &msg.event {
            // State, full copies, and other nodes' requests: answered or applied at once
            // (full copies only ever replace older ones).
            SessionEvent::AllSessionData { .. }
            | SessionEvent::GetAllSessions
            | SessionEvent::GetSession { .. }
            | SessionEvent::SessionData { .. } => return Offer::Apply(msg),
            SessionEvent::TransferComplete { .. } | SessionEvent::NoContextManager => {
                self.complete = true;
                return Offer::Apply(msg);
            }
            SessionEvent::StateNotReady => {
                self.not_ready = true;
                return Offer::Apply(msg);
            }
            _ => {}
        }
        if self.queue.len() >= self.max_queue {
            self.dropped += 1;
            warn!(target: "ha::transfer", "state-transfer queue full ({}); dropping {} message", self.max_queue, msg.event.code());
            return Offer::Dropped;
        }
        self.queue.push_back(msg);
        Offer::Queued
    }

    /// True once the donor said the transfer is complete (or has no such context).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// True (once) when the member asked answered that it is itself still receiving its
    /// state: the caller asks the next one. Queued messages stay queued.
    pub fn take_not_ready(&mut self) -> bool {
        std::mem::take(&mut self.not_ready)
    }

    /// True when `now_ms` is past the deadline without completion.
    pub fn timed_out(&self, now_ms: i64) -> bool {
        !self.complete && now_ms >= self.deadline_ms
    }

    /// Messages dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Ends the transfer and returns every queued message, in arrival order, to apply over
    /// the state (see the module docs for why none is dropped by its time).
    pub fn finish(&mut self) -> Vec<SessionMessage> {
        self.queue.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Session, SessionId};
    use crate::store::SessionStore;

    fn msg(ts: i64, event: SessionEvent) -> SessionMessage {
        SessionMessage {
            context: "/app".into(),
            timestamp_ms: ts,
            event,
        }
    }

    fn expired(ts: i64, id: &str) -> SessionMessage {
        msg(
            ts,
            SessionEvent::Expired {
                id: SessionId::new(id),
            },
        )
    }

    /// Runs a transfer the way `DeltaManager::start` and `handle` do, into `store`.
    fn join(store: &mut SessionStore, offers: Vec<SessionMessage>) {
        let mut t = StateTransfer::new(1_000, 60_000, 16);
        for m in offers {
            if let Offer::Apply(m) = t.offer(m) {
                store.apply(&m.event, m.timestamp_ms);
            }
        }
        assert!(t.is_complete());
        for m in t.finish() {
            store.apply(&m.event, m.timestamp_ms);
        }
    }

    #[test]
    fn events_wait_for_the_state_and_are_all_replayed_in_order() {
        let mut t = StateTransfer::new(1_000, 60_000, 16);
        assert_eq!(t.offer(expired(900, "old")), Offer::Queued);
        assert_eq!(t.offer(expired(1_500, "mid")), Offer::Queued);
        assert!(matches!(
            t.offer(msg(
                1_600,
                SessionEvent::AllSessionData {
                    sessions: vec![],
                    held_back: vec![],
                    buried: vec![]
                }
            )),
            Offer::Apply(_)
        ));
        assert!(!t.is_complete());
        assert_eq!(t.offer(expired(2_500, "new")), Offer::Queued);
        assert!(matches!(
            t.offer(msg(
                3_000,
                SessionEvent::TransferComplete { snapshot_ms: 2_000 }
            )),
            Offer::Apply(_)
        ));
        assert_eq!(
            t.finish(),
            vec![
                expired(900, "old"),
                expired(1_500, "mid"),
                expired(2_500, "new")
            ]
        );
    }

    #[test]
    fn an_invalidation_the_donor_had_not_seen_holds_on_the_joiner() {
        let id = SessionId::new("s");
        let mut joiner = SessionStore::default();
        join(
            &mut joiner,
            vec![
                // B invalidates s at 1_001 (logout) and tells everyone; the joiner queues it.
                expired(1_001, "s"),
                // The donor snapshots at 1_002, before B's EXPIRED reached it: s is in it.
                msg(
                    1_003,
                    SessionEvent::AllSessionData {
                        sessions: vec![Session::new(id.clone(), 0, 60)],
                        held_back: vec![],
                        buried: vec![],
                    },
                ),
                msg(1_004, SessionEvent::TransferComplete { snapshot_ms: 1_002 }),
            ],
        );
        assert!(joiner.get(&id).is_none(), "a logged-out session is back");
    }

    #[test]
    fn a_change_the_donor_had_not_seen_is_applied_on_the_joiner() {
        let id = SessionId::new("s");
        let mut primary = Session::new(id.clone(), 0, 60);
        let mut d = Vec::new();
        for n in 1..=3u32 {
            primary.insert(&format!("a{n}"), &n).unwrap();
            d.push(primary.take_delta().unwrap());
        }
        let mut at_v1 = Session::new(id.clone(), 0, 60);
        at_v1.apply(&d[0]);
        let mut joiner = SessionStore::default();
        join(
            &mut joiner,
            vec![
                // v2 sent at 1_001; the donor's snapshot (1_002) does not have it yet.
                msg(1_001, SessionEvent::Delta(d[1].clone())),
                // A duplicate of what the snapshot holds: dropped by its version.
                msg(999, SessionEvent::Delta(d[0].clone())),
                msg(
                    1_003,
                    SessionEvent::AllSessionData {
                        sessions: vec![at_v1],
                        held_back: vec![],
                        buried: vec![],
                    },
                ),
                msg(1_004, SessionEvent::TransferComplete { snapshot_ms: 1_002 }),
            ],
        );
        // v3 arrives after the transfer: it follows v2 at once.
        joiner.apply(&SessionEvent::Delta(d[2].clone()), 1_005);
        assert_eq!(joiner.held_back(&id), None);
        let held = joiner.get(&id).unwrap();
        assert_eq!(held.version(), 3);
        assert_eq!(held.get::<u32>("a2").unwrap(), Some(2));
        assert_eq!(joiner.stats().stale, 1);
    }

    #[test]
    fn a_peer_still_starting_says_so_and_the_transfer_goes_on() {
        // Reference: Tomcat queues then drops a peer's request ("Drop message
        // SESSION-GET-ALL inside GET_ALL_SESSIONS sync phase"), which stalls two nodes
        // starting together. Here it is answered at once (by the manager), and an answer
        // "not ready" lets the asker ask the next member, keeping what it queued.
        let mut t = StateTransfer::new(1_000, 60_000, 16);
        assert!(matches!(
            t.offer(msg(500, SessionEvent::GetAllSessions)),
            Offer::Apply(_)
        ));
        assert_eq!(t.offer(expired(1_050, "a")), Offer::Queued);
        assert!(matches!(
            t.offer(msg(1_100, SessionEvent::StateNotReady)),
            Offer::Apply(_)
        ));
        assert!(!t.is_complete());
        assert!(t.take_not_ready());
        assert!(!t.take_not_ready(), "told once");
        t.offer(msg(1_200, SessionEvent::NoContextManager));
        assert!(t.is_complete());
        assert_eq!(t.finish(), vec![expired(1_050, "a")]);
    }

    #[test]
    fn timeout_and_bounded_queue() {
        let mut t = StateTransfer::new(1_000, 60_000, 2);
        assert!(!t.timed_out(60_999));
        assert!(t.timed_out(61_000));
        t.offer(expired(1_001, "a"));
        t.offer(expired(1_002, "b"));
        assert_eq!(t.offer(expired(1_003, "c")), Offer::Dropped);
        assert_eq!(t.dropped(), 1);
        assert_eq!(t.finish(), vec![expired(1_001, "a"), expired(1_002, "b")]);
    }
}
