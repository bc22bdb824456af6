//! The delta log: what a request changed in a session, last action per name (Tribes
//! `DeltaRequest` without `recordAllActions`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::session::SessionId;

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Action {
    /// An attribute was set; the value is already serialized (rmp-serde).
    SetAttribute {
        /// Attribute name.
        name: String,
        /// Serialized value.
        value: Bytes,
    },
    /// An attribute was removed.
    RemoveAttribute {
        /// Attribute name.
        name: String,
    },
    /// The max inactive interval changed (seconds; zero or negative = never expires).
    SetMaxInactive(i64),
    /// The is-new flag changed.
    SetNew(bool),
}

/// The name a change of the max inactive interval goes under (Tribes' reserved name).
pub(crate) const MAX_INTERVAL_KEY: &str = "__SET__MAXINTERVAL__";
/// The name a change of the is-new flag goes under (Tribes' reserved name).
pub(crate) const IS_NEW_KEY: &str = "__SET__ISNEW__";

impl Action {
    /// The name that "last action per name" compacts on, and that a change is stamped
    /// under (Tribes' reserved names for the non-attribute types).
    pub(crate) fn key(&self) -> &str {
        match self {
            Self::SetAttribute { name, .. } | Self::RemoveAttribute { name } => name,
            Self::SetMaxInactive(_) => MAX_INTERVAL_KEY,
            Self::SetNew(_) => IS_NEW_KEY,
        }
    }
}

/// Changes recorded since the last replication.
///
/// ```
/// use ha::{Action, DeltaLog};
/// let mut log = DeltaLog::default();
/// log.record(Action::SetAttribute { name: "n".into(), value: vec![1].into() });
/// log.record(Action::SetAttribute { name: "n".into(), value: vec![2].into() });
/// assert_eq!(log.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaLog {
    actions: Vec<Action>,
}

impl DeltaLog {
    /// Records an action, replacing an earlier one with the same name (the newest goes last).
    pub fn record(&mut self, action: Action) {
        let key = action.key().to_string();
        self.actions.retain(|a| a.key() != key);
        self.actions.push(action);
    }

    /// Number of recorded actions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The recorded actions, oldest first.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    /// Takes the recorded actions, leaving the log empty.
    pub fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }
}

/// A delta on the wire: the actions of one request for one session, with the session version
/// they produce, so receivers never apply an older state over a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The session.
    pub session_id: SessionId,
    /// The session version after these actions (strictly increasing per session).
    pub version: u64,
    /// Last access time at the sender, ms since the Unix epoch.
    pub last_access_ms: i64,
    /// The actions, in order.
    pub actions: Vec<Action>,
    /// The node that made the change (the first 8 bytes of its member id; 0: not known).
    /// With the version it orders two changes of the same name made at once on two nodes
    /// (both the next version of the session), so every copy keeps the same one whatever
    /// order they arrive in.
    #[serde(default)]
    pub origin: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, v: u8) -> Action {
        Action::SetAttribute {
            name: name.into(),
            value: Bytes::from(vec![v]),
        }
    }

    #[test]
    fn last_action_per_name_wins_and_goes_last() {
        let mut log = DeltaLog::default();
        log.record(set("a", 1));
        log.record(set("b", 1));
        log.record(Action::RemoveAttribute { name: "a".into() });
        log.record(Action::SetMaxInactive(60));
        log.record(Action::SetMaxInactive(120));
        log.record(set("b", 2));
        assert_eq!(
            log.take(),
            vec![
                Action::RemoveAttribute { name: "a".into() },
                Action::SetMaxInactive(120),
                set("b", 2)
            ]
        );
        assert!(log.is_empty());
    }
}
