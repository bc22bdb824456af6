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
        let what = self.name();
        match self {
            Self::Created { id: i, .. } | Self::Expired { id: i } | Self::GetSession { id: i } => {
                check_id(i, what)
            }
            Self::Accessed {
                id: i, version: v, ..
            } => check_id(i, what).and_then(|()| check_version(*v, what)),
            Self::Delta(d) => check_delta(d, what),
            Self::ChangeSessionId { old, new } => {
                check_id(old, what).and_then(|()| check_id(new, what))
            }
            Self::SessionData { session: s } => check_session(s, what),
            Self::AllSessionData {
                sessions,
                held_back,
                buried,
            } => {
                sessions.iter().try_for_each(|s| check_session(s, what))?;
                held_back.iter().try_for_each(|d| check_delta(d, what))?;
                buried.iter().try_for_each(|b| check_buried(b, what))
            }
            Self::GetAllSessions
            | Self::TransferComplete { .. }
            | Self::NoContextManager
            | Self::StateNotReady => Ok(()),
        }
    }

    /// Drops the entries of a state batch ([`SessionEvent::AllSessionData`]) that fail
    /// [`check`](Self::check) and returns how many went and the first one's error; other
    /// events are left alone (`None`), as is a batch with nothing wrong. A member that
    /// joins keeps the rest of its donor's state instead of losing a whole batch (and with
    /// it the transfer) to one bad entry.
    ///
    /// ```
    /// use ha::{Session, SessionEvent, SessionId};
    /// let session = |id: &str| Session::new(SessionId::new(id), 0, 60);
    /// let mut batch = SessionEvent::AllSessionData {
    ///     sessions: vec![session("a1"), session("../etc"), session("b2")],
    ///     held_back: Vec::new(),
    ///     buried: Vec::new(),
    /// };
    /// let (dropped, _why) = batch.drop_malformed().unwrap();
    /// assert_eq!(dropped, 1);
    /// assert!(batch.check().is_ok());
    /// ```
    pub fn drop_malformed(&mut self) -> Option<(usize, SessionError)> {
        let what = self.name();
        let Self::AllSessionData {
            sessions,
            held_back,
            buried,
        } = self
        else {
            return None;
        };
        let mut first: Option<SessionError> = None;
        let mut dropped = 0usize;
        let mut keep = |checked: Result<(), SessionError>| match checked {
            Ok(()) => true,
            Err(e) => {
                dropped += 1;
                first.get_or_insert(e);
                false
            }
        };
        sessions.retain(|s| keep(check_session(s, what)));
        held_back.retain(|d| keep(check_delta(d, what)));
        buried.retain(|b| keep(check_buried(b, what)));
        first.map(|e| (dropped, e))
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

/// A session id a cookie could carry, in a message named `what`.
fn check_id(id: &SessionId, what: &str) -> Result<(), SessionError> {
    if SessionId::is_well_formed(id.as_str()) {
        Ok(())
    } else {
        let shown: String = id.as_str().chars().take(40).collect();
        Err(SessionError::Codec(format!(
            "{what} carries a malformed session id {shown:?}"
        )))
    }
}

fn check_version(v: u64, what: &str) -> Result<(), SessionError> {
    if v <= MAX_VERSION {
        Ok(())
    } else {
        Err(SessionError::Codec(format!(
            "{what} carries version {v}, beyond {MAX_VERSION}"
        )))
    }
}

fn check_delta(d: &Delta, what: &str) -> Result<(), SessionError> {
    check_id(&d.session_id, what).and_then(|()| check_version(d.version, what))
}

fn check_session(s: &Session, what: &str) -> Result<(), SessionError> {
    check_id(s.id(), what).and_then(|()| check_version(s.version(), what))
}

fn check_buried(
    (old, to): &(SessionId, Option<SessionId>),
    what: &str,
) -> Result<(), SessionError> {
    check_id(old, what)?;
    to.as_ref().map_or(Ok(()), |to| check_id(to, what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::Action;

    #[test]
    fn a_state_batch_drops_only_its_malformed_entries() {
        let id = |s: &str| SessionId::new(s);
        let delta = |sid: &str, version: u64| Delta {
            session_id: id(sid),
            version,
            last_access_ms: 0,
            actions: Vec::new(),
            origin: 1,
        };
        let mut batch = SessionEvent::AllSessionData {
            sessions: vec![
                Session::new(id("s1"), 0, 60),
                Session::new(id("a b"), 0, 60),
            ],
            held_back: vec![delta("s1", 3), delta("s1", u64::MAX), delta("<x>", 2)],
            buried: vec![
                (id("gone"), None),
                (id("old"), Some(id("new; Path=/"))),
                (id("old2"), Some(id("new2"))),
            ],
        };
        assert!(batch.check().is_err());
        let (dropped, first) = batch.drop_malformed().expect("bad entries");
        assert_eq!(dropped, 4);
        assert!(first.to_string().contains("\"a b\""), "{first}");
        batch.check().expect("what is left is well formed");
        let SessionEvent::AllSessionData {
            sessions,
            held_back,
            buried,
        } = &batch
        else {
            unreachable!()
        };
        assert_eq!(sessions.len(), 1);
        assert_eq!(held_back.iter().map(|d| d.version).collect::<Vec<_>>(), [3]);
        assert_eq!(buried.len(), 2);
        // Nothing to drop: nothing said; other events are left alone.
        assert!(batch.drop_malformed().is_none());
        let mut rename = SessionEvent::ChangeSessionId {
            old: id("a"),
            new: id("b c"),
        };
        assert!(rename.drop_malformed().is_none());
        assert!(rename.check().is_err());
    }

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
