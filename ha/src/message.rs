//! DeltaManager messages (the `EVT_*` vocabulary of Tomcat's `SessionMessage`, §10.2), as a
//! serde enum encoded with rmp-serde inside a tribes byte message.

use serde::{Deserialize, Serialize};

use crate::delta::Delta;
use crate::error::SessionError;
use crate::session::{Session, SessionId};

/// What happened to which session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SessionEvent {
    /// `EVT_SESSION_CREATED` (1): a session was created on the sender.
    Created {
        /// The new session.
        id: SessionId,
        /// Its max inactive interval, seconds.
        max_inactive_secs: i64,
    },
    /// `EVT_SESSION_EXPIRED` (2): expired or invalidated on the sender.
    Expired {
        /// The session.
        id: SessionId,
    },
    /// `EVT_SESSION_ACCESSED` (3): touched on the sender (keeps copies alive).
    Accessed {
        /// The session.
        id: SessionId,
        /// When, ms since the Unix epoch.
        at_ms: i64,
        /// The sender's version of the session (not in Tomcat): a copy that is older asks
        /// the sender for the session.
        version: u64,
        /// The node that made that version (not in Tomcat; 0: not known): a copy that has
        /// another node's change of the same version asks too.
        #[serde(default)]
        origin: u64,
    },
    /// `EVT_GET_ALL_SESSIONS` (4): a joining node asks for the state.
    GetAllSessions,
    /// `EVT_ALL_SESSION_DATA` (12): one bounded batch of the state: full sessions, and
    /// (not in Tomcat) what the sender knows about them beyond their copies.
    AllSessionData {
        /// The sessions of this batch.
        sessions: Vec<Session>,
        /// Changes the sender holds back until a version before them arrives (they wait
        /// here too, rather than be lost to a node that joined meanwhile).
        #[serde(default)]
        held_back: Vec<Delta>,
        /// Ids the sender invalidated or renamed away recently, with where a renamed one
        /// went: refused here too, as there.
        #[serde(default)]
        buried: Vec<(SessionId, Option<SessionId>)>,
    },
    /// `EVT_SESSION_DELTA` (13): the changes of one request.
    Delta(Delta),
    /// `EVT_ALL_SESSION_TRANSFERCOMPLETE` (14): the state transfer is complete; the sender
    /// took its snapshot at `snapshot_ms`.
    TransferComplete {
        /// Snapshot time, ms since the Unix epoch.
        snapshot_ms: i64,
    },
    /// `EVT_CHANGE_SESSION_ID` (15): the session was renamed.
    ChangeSessionId {
        /// The old id.
        old: SessionId,
        /// The new id.
        new: SessionId,
    },
    /// `EVT_ALL_SESSION_NOCONTEXTMANAGER` (16): the asked node has no such context.
    NoContextManager,
    /// Not in Tomcat (Resin's idea): a request came with a session id this node does not
    /// know; members that hold it answer with [`SessionEvent::SessionData`].
    GetSession {
        /// The id from the request (its route may differ from the holder's).
        id: SessionId,
    },
    /// Not in Tomcat: one full session, the answer to [`SessionEvent::GetSession`]. Applied
    /// like state-transfer data: it replaces a copy only if it is at least as new.
    SessionData {
        /// The session.
        session: Box<Session>,
    },
    /// Not in Tomcat: the answer to [`SessionEvent::GetAllSessions`] from a node that is
    /// itself still receiving its state (it started at the same time): ask another member.
    StateNotReady,
}

impl SessionEvent {
    /// Tomcat's event number, for logs.
    pub fn code(&self) -> i32 {
        match self {
            Self::Created { .. } => 1,
            Self::Expired { .. } => 2,
            Self::Accessed { .. } => 3,
            Self::GetAllSessions => 4,
            Self::AllSessionData { .. } => 12,
            Self::Delta(_) => 13,
            Self::TransferComplete { .. } => 14,
            Self::ChangeSessionId { .. } => 15,
            Self::NoContextManager => 16,
            // Outside Tomcat's numbering.
            Self::GetSession { .. } => 101,
            Self::SessionData { .. } => 102,
            Self::StateNotReady => 103,
        }
    }
}

/// A message for the session manager of one context.
///
/// ```
/// use ha::{SessionEvent, SessionId, SessionMessage};
/// let m = SessionMessage {
///     context: "/shop".into(),
///     timestamp_ms: 1,
///     event: SessionEvent::Expired { id: SessionId::new("a") },
/// };
/// assert_eq!(SessionMessage::decode(&m.encode().unwrap()).unwrap(), m);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMessage {
    /// The manager's name (context path, e.g. `/shop`).
    pub context: String,
    /// Sender wall clock, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// The event.
    pub event: SessionEvent,
}

impl SessionMessage {
    /// Encodes with rmp-serde.
    pub fn encode(&self) -> Result<Vec<u8>, SessionError> {
        rmp_serde::to_vec_named(self).map_err(|e| SessionError::Codec(e.to_string()))
    }

    /// Decodes; bad bytes are an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, SessionError> {
        rmp_serde::from_slice(bytes).map_err(|e| SessionError::Codec(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::Action;

    #[test]
    fn every_event_round_trips() {
        let mut s = Session::new(SessionId::new("s"), 5, 60);
        s.insert("k", &"v").unwrap();
        // The pending delta log is local to a node and never travels.
        let _ = s.take_delta();
        let events = vec![
            SessionEvent::Created {
                id: SessionId::new("a"),
                max_inactive_secs: 60,
            },
            SessionEvent::Expired {
                id: SessionId::new("a"),
            },
            SessionEvent::Accessed {
                id: SessionId::new("a"),
                at_ms: 9,
                version: 4,
                origin: 0,
            },
            SessionEvent::GetAllSessions,
            SessionEvent::AllSessionData {
                sessions: vec![s],
                held_back: Vec::new(),
                buried: vec![(SessionId::new("gone"), Some(SessionId::new("there")))],
            },
            SessionEvent::Delta(Delta {
                session_id: SessionId::new("a"),
                version: 3,
                last_access_ms: 7,
                actions: vec![Action::SetNew(false)],
                origin: 0,
            }),
            SessionEvent::TransferComplete { snapshot_ms: 11 },
            SessionEvent::ChangeSessionId {
                old: SessionId::new("a.n1"),
                new: SessionId::new("a.n2"),
            },
            SessionEvent::NoContextManager,
            SessionEvent::GetSession {
                id: SessionId::new("a.n1"),
            },
            SessionEvent::SessionData {
                session: Box::new(Session::new(SessionId::new("b"), 5, 60)),
            },
            SessionEvent::StateNotReady,
        ];
        for event in events {
            let m = SessionMessage {
                context: "/c".into(),
                timestamp_ms: 42,
                event,
            };
            let back = SessionMessage::decode(&m.encode().unwrap()).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(SessionMessage::decode(b"\xff\x00junk").is_err());
        assert!(SessionMessage::decode(b"").is_err());
    }
}
