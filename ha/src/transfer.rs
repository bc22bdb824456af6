//! State transfer on join, the requester's side: which messages are applied at once, which
//! wait until the state has arrived, and which of those are replayed. Pure: time is a
//! parameter.
//!
//! Tribes queues a GET_ALL_SESSIONS that arrives while its own transfer is running and then
//! drops it, so two nodes starting together wait for each other until the timeout (pain
//! point 3). Here such a request is answered at once with whatever state the node has: a
//! node still in its own transfer has no sessions of its own yet, so nothing is lost.

use std::collections::VecDeque;

use log::{info, warn};

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
/// let delta_like = SessionMessage {
///     context: "/".into(),
///     timestamp_ms: 1_500,
///     event: SessionEvent::Expired { id: SessionId::new("a") },
/// };
/// assert_eq!(t.offer(delta_like), Offer::Queued);
/// let done = SessionMessage {
///     context: "/".into(),
///     timestamp_ms: 2_000,
///     event: SessionEvent::TransferComplete { snapshot_ms: 1_200 },
/// };
/// assert!(matches!(t.offer(done), Offer::Apply(_)));
/// assert!(t.is_complete());
/// assert_eq!(t.finish().len(), 1); // sent after the snapshot: replayed
/// ```
#[derive(Debug)]
pub struct StateTransfer {
    requested_ms: i64,
    deadline_ms: i64,
    queue: VecDeque<SessionMessage>,
    max_queue: usize,
    snapshot_ms: Option<i64>,
    complete: bool,
    dropped: u64,
    stale: u64,
}

impl StateTransfer {
    /// A transfer requested at `requested_ms` that gives up at `requested_ms + timeout_ms`,
    /// holding at most `max_queue` messages meanwhile.
    pub fn new(requested_ms: i64, timeout_ms: i64, max_queue: usize) -> Self {
        Self {
            requested_ms,
            deadline_ms: requested_ms.saturating_add(timeout_ms),
            queue: VecDeque::new(),
            max_queue,
            snapshot_ms: None,
            complete: false,
            dropped: 0,
            stale: 0,
        }
    }

    /// Offers a received message. State data, the end markers and other nodes' state requests
    /// are handled at once; session events wait for [`StateTransfer::finish`].
    pub fn offer(&mut self, msg: SessionMessage) -> Offer {
        match &msg.event {
            // State, full copies, and other nodes' requests: answered or applied at once
            // (full copies only ever replace older ones).
            SessionEvent::AllSessionData { .. }
            | SessionEvent::GetAllSessions
            | SessionEvent::GetSession { .. }
            | SessionEvent::SessionData { .. } => return Offer::Apply(msg),
            SessionEvent::TransferComplete { snapshot_ms } => {
                self.snapshot_ms = Some(*snapshot_ms);
                self.complete = true;
                return Offer::Apply(msg);
            }
            SessionEvent::NoContextManager => {
                self.complete = true;
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

    /// True when `now_ms` is past the deadline without completion.
    pub fn timed_out(&self, now_ms: i64) -> bool {
        !self.complete && now_ms >= self.deadline_ms
    }

    /// Messages dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Ends the transfer and returns the queued messages to replay, in arrival order:
    /// session events sent before the snapshot (or before the request, without one) are
    /// dropped as stale, as Tribes does.
    pub fn finish(&mut self) -> Vec<SessionMessage> {
        let cutoff = self.snapshot_ms.unwrap_or(self.requested_ms);
        let mut stale = 0;
        let replay: Vec<SessionMessage> = self
            .queue
            .drain(..)
            .filter(|m| {
                let keep =
                    matches!(m.event, SessionEvent::GetAllSessions) || m.timestamp_ms >= cutoff;
                if !keep {
                    stale += 1;
                }
                keep
            })
            .collect();
        if stale > 0 {
            info!(target: "ha::transfer", "dropped {stale} queued message(s) older than the state snapshot");
        }
        self.stale += stale;
        replay
    }

    /// Queued messages [`StateTransfer::finish`] dropped as older than the snapshot.
    pub fn stale(&self) -> u64 {
        self.stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionId;

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

    #[test]
    fn events_wait_and_stale_ones_are_dropped_at_the_snapshot() {
        let mut t = StateTransfer::new(1_000, 60_000, 16);
        assert_eq!(t.offer(expired(900, "old")), Offer::Queued);
        assert_eq!(t.offer(expired(1_500, "mid")), Offer::Queued);
        assert!(matches!(
            t.offer(msg(
                1_600,
                SessionEvent::AllSessionData { sessions: vec![] }
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
        let replay = t.finish();
        assert_eq!(replay, vec![expired(2_500, "new")]);
        assert_eq!(t.stale(), 2);
    }

    #[test]
    fn a_peers_state_request_is_answered_at_once_so_simultaneous_starts_do_not_stall() {
        // Reference: Tomcat queues then drops it ("Drop message SESSION-GET-ALL inside
        // GET_ALL_SESSIONS sync phase"), which stalls two nodes starting together.
        let mut t = StateTransfer::new(1_000, 60_000, 16);
        assert!(matches!(
            t.offer(msg(500, SessionEvent::GetAllSessions)),
            Offer::Apply(_)
        ));
        t.offer(msg(1_100, SessionEvent::NoContextManager));
        assert!(t.is_complete());
        assert!(t.finish().is_empty());
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
        // Without a snapshot, messages from before the request are stale.
        let mut t = StateTransfer::new(1_000, 10, 8);
        t.offer(expired(999, "x"));
        t.offer(expired(1_000, "y"));
        assert_eq!(t.finish(), vec![expired(1_000, "y")]);
    }
}
