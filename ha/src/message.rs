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

/// The highest session version a received message may carry. No session gets there (a
/// change every nanosecond would take 292 years); a message beyond it is forged or corrupt,
/// and applying it would pin the session's copies at a version nothing can follow.
pub const MAX_VERSION: u64 = i64::MAX as u64;

impl SessionEvent {
    /// Checks what a member sent before anything of it is applied: every session id in it
    /// [well formed](SessionId::is_well_formed) (as a cookie could name it), and every
    /// version at most [`MAX_VERSION`]. The receiving listener refuses (FAIL_ACK, logged)
    /// a message that fails.
    ///
    /// ```
    /// use ha::{SessionEvent, SessionId};
    /// let rename = |new: &str| SessionEvent::ChangeSessionId {
    ///     old: SessionId::new("a1"),
    ///     new: SessionId::new(new),
    /// };
    /// assert!(rename("b2.node1").check().is_ok());
    /// assert!(rename("b2; Domain=evil.example").check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), SessionError> {
        let id = |id: &SessionId| {
            if SessionId::is_well_formed(id.as_str()) {
                Ok(())
            } else {
                let shown: String = id.as_str().chars().take(40).collect();
                Err(SessionError::Codec(format!(
                    "{} carries a malformed session id {shown:?}",
                    self.name()
                )))
            }
        };
        let version = |v: u64| {
            if v <= MAX_VERSION {
                Ok(())
            } else {
                Err(SessionError::Codec(format!(
                    "{} carries version {v}, beyond {MAX_VERSION}",
                    self.name()
                )))
            }
        };
        let delta = |d: &Delta| id(&d.session_id).and_then(|()| version(d.version));
        let session = |s: &Session| id(s.id()).and_then(|()| version(s.version()));
        match self {
            Self::Created { id: i, .. } | Self::Expired { id: i } | Self::GetSession { id: i } => {
                id(i)
            }
            Self::Accessed {
                id: i, version: v, ..
            } => id(i).and_then(|()| version(*v)),
            Self::Delta(d) => delta(d),
            Self::ChangeSessionId { old, new } => id(old).and_then(|()| id(new)),
            Self::SessionData { session: s } => session(s),
            Self::AllSessionData {
                sessions,
                held_back,
                buried,
            } => {
                sessions.iter().try_for_each(session)?;
                held_back.iter().try_for_each(delta)?;
                buried.iter().try_for_each(|(old, to)| {
                    id(old)?;
                    to.as_ref().map_or(Ok(()), id)
                })
            }
            Self::GetAllSessions
            | Self::TransferComplete { .. }
            | Self::NoContextManager
            | Self::StateNotReady => Ok(()),
        }
    }

    /// The event's name in logs.
    fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "CREATED",
            Self::Expired { .. } => "EXPIRED",
            Self::Accessed { .. } => "ACCESSED",
            Self::GetAllSessions => "GET_ALL_SESSIONS",
            Self::AllSessionData { .. } => "ALL_SESSION_DATA",
            Self::Delta(_) => "DELTA",
            Self::TransferComplete { .. } => "TRANSFERCOMPLETE",
            Self::ChangeSessionId { .. } => "CHANGE_SESSION_ID",
            Self::NoContextManager => "NOCONTEXTMANAGER",
            Self::GetSession { .. } => "GET_SESSION",
            Self::SessionData { .. } => "SESSION_DATA",
            Self::StateNotReady => "STATE_NOT_READY",
        }
    }
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
