//! The session model: typed attributes stored serialized, every change recorded.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::delta::{Action, Delta, DeltaLog};
use crate::error::SessionError;

/// A session id, optionally carrying a route suffix (`<id>.<route>`, as Tomcat's jvmRoute).
///
/// ```
/// use ha::SessionId;
/// let id = SessionId::new("abc.node1");
/// assert_eq!(id.route(), Some("node1"));
/// assert_eq!(id.with_route("node2").as_str(), "abc.node2");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(String);

impl SessionId {
    /// Wraps an id string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the route suffix.
    pub fn base(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(b, _)| b)
    }

    /// The route suffix, if any.
    pub fn route(&self) -> Option<&str> {
        self.0.split_once('.').map(|(_, r)| r)
    }

    /// The same id with `route` as its suffix.
    pub fn with_route(&self, route: &str) -> Self {
        Self(format!("{}.{route}", self.base()))
    }

    /// The longest id a manager makes or takes: 32 hex digits, a dot and a route of at
    /// most 64 characters fit.
    pub const MAX_LEN: usize = 128;

    /// Whether `value` could be a session id: 1 to [`SessionId::MAX_LEN`] letters, digits,
    /// `.`, `-` or `_` (what ids and routes are made of). A cookie that is not is no
    /// session, and a rename to such an id is refused.
    ///
    /// ```
    /// use ha::SessionId;
    /// assert!(SessionId::is_well_formed("0f3a9c.node-1"));
    /// assert!(!SessionId::is_well_formed("../etc/passwd"));
    /// assert!(!SessionId::is_well_formed(&"a".repeat(129)));
    /// ```
    pub fn is_well_formed(value: &str) -> bool {
        !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A web session. Attributes are stored serialized (rmp-serde), so a value that cannot be
/// serialized is refused at `insert`, and nothing can be mutated in place behind the
/// session's back: every change goes through `insert`/`remove` and lands in the delta log.
///
/// ```
/// use ha::{Session, SessionId};
/// let mut s = Session::new(SessionId::new("s1"), 1_000, 1800);
/// s.insert("count", &3u32).unwrap();
/// assert_eq!(s.get::<u32>("count").unwrap(), Some(3));
/// let delta = s.take_delta().unwrap();
/// assert_eq!(delta.actions.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    id: SessionId,
    created_ms: i64,
    last_access_ms: i64,
    /// Seconds; zero or negative = never expires (servlet convention).
    max_inactive_secs: i64,
    is_new: bool,
    attributes: BTreeMap<String, Bytes>,
    version: u64,
    /// This node serves the session (false for a replicated copy).
    primary: bool,
    #[serde(skip)]
    delta: DeltaLog,
    /// A copy made from a first delta that overtook its CREATED: the interval is a
    /// placeholder until CREATED brings the real one. Sent with the copy (state transfer,
    /// fetch answers), so the receiver's copy takes the late CREATED too; absent (false)
    /// from older senders.
    #[serde(default)]
    interval_pending: bool,
    /// When this node last told the members about the session (ms; 0: never). Local only.
    #[serde(skip)]
    replicated_ms: i64,
    /// Per name (an attribute, or the reserved names of the interval and the is-new flag):
    /// the version and origin of its last change, removals included. A change applies
    /// only over an older stamp, so copies that get two changes made at once on two nodes
    /// end up the same whatever order those arrive in (last writer wins, per name).
    #[serde(default)]
    stamps: BTreeMap<String, Stamp>,
    /// For each name with a pending change: its committed state before that change, which
    /// [`Session::committed`] puts back (a full copy for another node carries only what
    /// was replicated, never what a running request has not finished).
    #[serde(skip)]
    before: BTreeMap<String, Before>,
    /// The last [`RECENT_CHANGES`] changes this copy has (their version and origin, in
    /// order): with two nodes writing at once, a version number alone no longer says which
    /// changes a copy holds (see [`Session::holds`]).
    #[serde(default)]
    recent: Vec<Stamp>,
    /// The highest version of a change dropped from `recent` to keep it bounded: changes of
    /// that version or older count as held.
    #[serde(default)]
    recent_floor: u64,
}

/// How many changes a session remembers by (version, origin).
const RECENT_CHANGES: usize = 16;

/// When a name last changed: (session version, origin node); compared in that order.
type Stamp = (u64, u64);

/// Removal stamps older than this many versions are forgotten (a delta that much older
/// than the session could then bring a removed attribute back; none is that late).
const REMOVAL_STAMP_VERSIONS: u64 = 64;

/// A name's committed state before a pending change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Before {
    Attribute(Option<Bytes>),
    Interval(i64),
    New(bool),
}

impl Session {
    /// A new primary session.
    pub fn new(id: SessionId, now_ms: i64, max_inactive_secs: i64) -> Self {
        Self {
            id,
            created_ms: now_ms,
            last_access_ms: now_ms,
            max_inactive_secs,
            is_new: true,
            attributes: BTreeMap::new(),
            version: 0,
            primary: true,
            delta: DeltaLog::default(),
            interval_pending: false,
            replicated_ms: 0,
            stamps: BTreeMap::new(),
            before: BTreeMap::new(),
            recent: Vec::new(),
            recent_floor: 0,
        }
    }

    /// A replicated copy created from a CREATED message (no attributes yet).
    pub fn replica(id: SessionId, created_ms: i64, max_inactive_secs: i64) -> Self {
        Self {
            primary: false,
            ..Self::new(id, created_ms, max_inactive_secs)
        }
    }

    /// The id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Creation time, ms since the Unix epoch.
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// Last access time, ms since the Unix epoch.
    pub fn last_access_ms(&self) -> i64 {
        self.last_access_ms
    }

    /// Max inactive interval in seconds (zero or negative = never).
    pub fn max_inactive_secs(&self) -> i64 {
        self.max_inactive_secs
    }

    /// Whether the client has not yet joined the session.
    pub fn is_new(&self) -> bool {
        self.is_new
    }

    /// The version: increases with every replicated change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether this node holds the primary copy.
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// Marks this copy primary or not.
    pub fn set_primary(&mut self, primary: bool) {
        self.primary = primary;
    }

    /// Attribute names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.attributes.keys().map(String::as_str)
    }

    /// Reads an attribute as `T`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, SessionError> {
        self.attributes
            .get(name)
            .map(|b| {
                rmp_serde::from_slice(b).map_err(|e| SessionError::Deserialize {
                    name: name.into(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// Sets an attribute; fails (changing nothing) if the value cannot be serialized.
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), SessionError> {
        let bytes =
            Bytes::from(
                rmp_serde::to_vec_named(value).map_err(|e| SessionError::Serialize {
                    name: name.into(),
                    reason: e.to_string(),
                })?,
            );
        self.remember(name);
        self.attributes.insert(name.to_string(), bytes.clone());
        self.delta.record(Action::SetAttribute {
            name: name.to_string(),
            value: bytes,
        });
        Ok(())
    }

    /// Removes an attribute; returns whether it existed.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.attributes.contains_key(name) {
            self.remember(name);
        }
        let existed = self.attributes.remove(name).is_some();
        if existed {
            self.delta
                .record(Action::RemoveAttribute { name: name.into() });
        }
        existed
    }

    /// Changes the max inactive interval.
    pub fn set_max_inactive_secs(&mut self, secs: i64) {
        self.remember(crate::delta::MAX_INTERVAL_KEY);
        self.max_inactive_secs = secs;
        // Chosen here: a late CREATED must not put its own back.
        self.interval_pending = false;
        self.delta.record(Action::SetMaxInactive(secs));
    }

    /// Records an access at `now_ms` (the client joined: no longer new).
    pub fn access(&mut self, now_ms: i64) {
        self.last_access_ms = now_ms;
        if self.is_new {
            self.remember(crate::delta::IS_NEW_KEY);
            self.is_new = false;
            self.delta.record(Action::SetNew(false));
        }
    }

    /// The committed state of `key` now.
    fn state_of(&self, key: &str) -> Before {
        match key {
            crate::delta::MAX_INTERVAL_KEY => Before::Interval(self.max_inactive_secs),
            crate::delta::IS_NEW_KEY => Before::New(self.is_new),
            name => Before::Attribute(self.attributes.get(name).cloned()),
        }
    }

    /// Keeps `key`'s committed state before its first pending change.
    fn remember(&mut self, key: &str) {
        if !self.before.contains_key(key) {
            let state = self.state_of(key);
            self.before.insert(key.to_owned(), state);
        }
    }

    /// A name's committed state changed under a pending change (another node's change
    /// landed): that is the state to put back now.
    fn rebase(&mut self, key: &str) {
        if self.before.contains_key(key) {
            let state = self.state_of(key);
            self.before.insert(key.to_owned(), state);
        }
    }

    /// Sets `key` to `state` (the inverse of [`Session::state_of`]).
    fn put_state(&mut self, key: &str, state: Before) {
        match state {
            Before::Interval(s) => self.max_inactive_secs = s,
            Before::New(n) => self.is_new = n,
            Before::Attribute(Some(v)) => {
                self.attributes.insert(key.to_owned(), v);
            }
            Before::Attribute(None) => {
                self.attributes.remove(key);
            }
        }
    }

    /// The session as replicated: without the changes a running request has made and not
    /// yet sent. Full copies for other nodes are made from it.
    pub fn committed(&self) -> Self {
        let mut c = self.clone();
        for (key, state) in std::mem::take(&mut c.before) {
            c.put_state(&key, state);
        }
        c.delta = DeltaLog::default();
        c
    }

    /// Gives every attribute held without a stamp the session's version (a copy from
    /// elsewhere), so that stamp does not move when the version does.
    pub(crate) fn freeze_stamps(&mut self) {
        for name in self.attributes.keys() {
            if !self.stamps.contains_key(name) {
                self.stamps.insert(name.clone(), (self.version, 0));
            }
        }
    }

    /// Forgets removal stamps [`REMOVAL_STAMP_VERSIONS`] behind the session's version, so
    /// sessions that use many short-lived names do not grow for ever.
    fn prune_removals(&mut self) {
        if self.stamps.len() <= self.attributes.len() + 2 + REMOVAL_STAMP_VERSIONS as usize {
            return;
        }
        let floor = self.version.saturating_sub(REMOVAL_STAMP_VERSIONS);
        let (attributes, before) = (&self.attributes, &self.before);
        self.stamps.retain(|name, (v, _)| {
            *v >= floor
                || attributes.contains_key(name)
                || before.contains_key(name)
                || name == crate::delta::MAX_INTERVAL_KEY
                || name == crate::delta::IS_NEW_KEY
        });
    }

    /// True when changes wait to be replicated.
    pub fn is_dirty(&self) -> bool {
        !self.delta.is_empty()
    }

    /// Takes the pending changes as a delta with the next version (None if nothing changed).
    pub fn take_delta(&mut self) -> Option<Delta> {
        self.take_delta_from(0)
    }

    /// [`Session::take_delta`] made on node `origin` (see [`Delta::origin`]).
    pub fn take_delta_from(&mut self, origin: u64) -> Option<Delta> {
        if self.delta.is_empty() {
            return None;
        }
        self.version = self.version.saturating_add(1);
        let actions = self.delta.take();
        self.before.clear();
        let _ = self.note_change((self.version, origin));
        for a in &actions {
            self.stamp(a.key(), (self.version, origin));
        }
        self.prune_removals();
        Some(Delta {
            session_id: self.id.clone(),
            version: self.version,
            last_access_ms: self.last_access_ms,
            actions,
            origin,
        })
    }

    /// Records when `key` changed (without a new `String` when it changed before).
    fn stamp(&mut self, key: &str, stamp: Stamp) {
        match self.stamps.get_mut(key) {
            Some(s) => *s = stamp,
            None => {
                self.stamps.insert(key.to_owned(), stamp);
            }
        }
    }

    /// Remembers that this copy has the change `stamp`; returns whether that is news.
    fn note_change(&mut self, stamp: Stamp) -> bool {
        if stamp.0 <= self.recent_floor {
            return false;
        }
        let Err(at) = self.recent.binary_search(&stamp) else {
            return false;
        };
        self.recent.insert(at, stamp);
        if self.recent.len() > RECENT_CHANGES {
            let dropped = self.recent.remove(0);
            self.recent_floor = self.recent_floor.max(dropped.0);
        }
        true
    }

    /// The newest change this copy has: (version, origin); origin 0 when not known.
    pub fn last_change(&self) -> (u64, u64) {
        match self.recent.last() {
            Some(&(version, origin)) if version == self.version => (version, origin),
            _ => (self.version, 0),
        }
    }

    /// Whether this copy has the change made as `version` on node `origin` (0: any node).
    /// A copy at a version has every change before it, except when two nodes made the same
    /// version at once: then only the ones it has merged. Changes older than what it
    /// remembers count as held.
    pub fn holds(&self, version: u64, origin: u64) -> bool {
        if version > self.version {
            return false;
        }
        origin == 0
            || version <= self.recent_floor
            || self.recent.contains(&(version, origin))
            || self.recent.first().is_none_or(|oldest| oldest.0 > version)
    }

    /// When `key` last changed here: its stamp, or for an attribute held without one (set
    /// before stamps, or on a copy made by hand) the session's version; (0, 0) if never.
    fn stamp_of(&self, key: &str) -> Stamp {
        match self.stamps.get(key) {
            Some(s) => *s,
            None if self.attributes.contains_key(key) => (self.version, 0),
            None => (0, 0),
        }
    }

    /// Applies a replicated delta (without recording it again): each change whose name
    /// last changed before it (see [`Session::stamps`]), and its version if newer. Returns
    /// whether anything changed. Changes a request here made and has not replicated yet
    /// stay on top: they are what that request answers, and they go out next, after this
    /// version (Tribes lets the remote value win here while the local one goes out, so the
    /// nodes disagree).
    pub(crate) fn apply(&mut self, delta: &Delta) -> bool {
        let stamp = (delta.version, delta.origin);
        let mut changed = false;
        for a in &delta.actions {
            if self.stamp_of(a.key()) >= stamp {
                continue;
            }
            self.apply_actions(std::slice::from_ref(a));
            self.stamp(a.key(), stamp);
            self.rebase(a.key());
            changed = true;
        }
        if delta.version > self.version {
            self.version = delta.version;
            changed = true;
        }
        // A change every name of which lost to later ones is still news for whoever waits
        // for it (read-your-writes).
        changed |= self.note_change((delta.version, delta.origin));
        self.last_access_ms = self.last_access_ms.max(delta.last_access_ms);
        self.reapply_pending();
        self.prune_removals();
        changed
    }

    /// Merges a full copy from another node into this one: per name, the newer stamp wins
    /// (so a copy that missed a change made here, or made at once elsewhere, takes nothing
    /// back). Returns whether anything changed. Pending changes stay on top, as in
    /// [`Session::apply`].
    pub(crate) fn merge(&mut self, other: &Self) -> bool {
        let mut changed = false;
        let names: std::collections::BTreeSet<&str> = (other.stamps.keys())
            .chain(other.attributes.keys())
            .map(String::as_str)
            .collect();
        for key in names {
            let theirs = other.stamp_of(key);
            if theirs <= self.stamp_of(key) {
                continue;
            }
            self.put_state(key, other.state_of(key));
            if key == crate::delta::MAX_INTERVAL_KEY {
                self.interval_pending = false;
            }
            self.stamp(key, theirs);
            self.rebase(key);
            changed = true;
        }
        if other.version > self.version {
            self.version = other.version;
            changed = true;
        }
        if other.recent_floor > self.recent_floor {
            self.recent_floor = other.recent_floor;
            self.recent.retain(|s| s.0 > other.recent_floor);
            changed = true;
        }
        for stamp in &other.recent {
            changed |= self.note_change(*stamp);
        }
        if self.interval_pending && !other.interval_pending {
            // A copy made from a first delta takes the interval the other one knows.
            self.max_inactive_secs = other.max_inactive_secs;
            self.interval_pending = false;
        }
        self.last_access_ms = self.last_access_ms.max(other.last_access_ms);
        self.reapply_pending();
        self.prune_removals();
        changed
    }

    /// Takes over `other`'s pending changes: the same session, held here under another id
    /// (a request was changing it under its old one).
    pub(crate) fn adopt_pending(&mut self, other: &Self) {
        for a in other.delta.actions() {
            self.remember(a.key());
            self.apply_actions(std::slice::from_ref(a));
            self.delta.record(a.clone());
        }
    }

    /// Applies the pending changes again over state that came from elsewhere.
    fn reapply_pending(&mut self) {
        let pending = std::mem::take(&mut self.delta);
        self.apply_actions(pending.actions());
        self.delta = pending;
    }

    /// Applies actions to the state without recording them.
    fn apply_actions(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::SetAttribute { name, value } => {
                    self.attributes.insert(name.clone(), value.clone());
                }
                Action::RemoveAttribute { name } => {
                    self.attributes.remove(name);
                }
                Action::SetMaxInactive(s) => {
                    self.max_inactive_secs = *s;
                    self.interval_pending = false;
                }
                Action::SetNew(n) => self.is_new = *n,
            }
        }
    }

    /// A copy made from a first delta, before its CREATED arrived: uses `placeholder_secs`
    /// until the CREATED brings the session's own interval.
    pub(crate) fn replica_awaiting_created(
        id: SessionId,
        created_ms: i64,
        placeholder_secs: i64,
    ) -> Self {
        Self {
            interval_pending: true,
            ..Self::replica(id, created_ms, placeholder_secs)
        }
    }

    /// A late CREATED: takes its interval if this copy is still waiting for one.
    pub(crate) fn created_arrived(&mut self, max_inactive_secs: i64) {
        if std::mem::take(&mut self.interval_pending) {
            self.max_inactive_secs = max_inactive_secs;
        }
    }

    /// Renames the session (id rotation or route rebinding).
    pub(crate) fn rename(&mut self, id: SessionId) {
        self.id = id;
    }

    /// Refreshes the last access time from a replicated ACCESSED.
    pub(crate) fn touch(&mut self, at_ms: i64) {
        self.last_access_ms = self.last_access_ms.max(at_ms);
    }

    /// Records that the members were told about the session at `now_ms`.
    pub(crate) fn mark_replicated(&mut self, now_ms: i64) {
        self.replicated_ms = now_ms;
    }

    /// Whether a primary that was only read should tell the members it is in use: nothing
    /// went out for half its interval, so their copies (which expire after twice the
    /// interval without news) would otherwise drop a session in use here. Tomcat's
    /// `DeltaSession.isAccessReplicate` does this after a whole interval.
    pub(crate) fn access_due(&self, now_ms: i64) -> bool {
        self.max_inactive_secs > 0
            && now_ms.saturating_sub(self.replicated_ms)
                >= self.max_inactive_secs.saturating_mul(500)
    }

    /// Whether the session has expired at `now_ms`: a primary after its max inactive
    /// interval, a copy after twice that (grace for lost access messages, as Tribes).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        // Zero or less: never (the servlet spec's `setMaxInactiveInterval`, Tomcat's
        // `isValid`).
        if self.max_inactive_secs <= 0 {
            return false;
        }
        let factor = if self.primary { 1 } else { 2 };
        // Saturating: the interval and the access time may come from another node, and a
        // huge interval ("never", in effect) must not wrap into an instant expiry.
        now_ms.saturating_sub(self.last_access_ms)
            > self.max_inactive_secs.saturating_mul(1000 * factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::ser::Error as _;

    #[test]
    fn a_copy_still_waiting_for_its_created_stays_waiting_when_sent_or_merged() {
        let id = SessionId::new("s1");
        let waiting = Session::replica_awaiting_created(id.clone(), 0, 1800);
        // Sent whole (state transfer, fetch answer): the receiver's copy still waits.
        let bytes = rmp_serde::to_vec_named(&waiting).unwrap();
        let mut received: Session = rmp_serde::from_slice(&bytes).unwrap();
        received.created_arrived(60);
        assert_eq!(received.max_inactive_secs(), 60);
        // Merged into another waiting copy: the sender's placeholder is not taken for the
        // real interval.
        let mut here = Session::replica_awaiting_created(id, 0, 900);
        here.merge(&waiting);
        here.created_arrived(60);
        assert_eq!(here.max_inactive_secs(), 60);
    }

    #[test]
    fn an_interval_of_zero_or_less_never_expires() {
        for secs in [0, -1] {
            let mut s = Session::new(SessionId::new("s"), 0, secs);
            assert!(!s.is_expired(i64::MAX / 2));
            s.primary = false;
            assert!(!s.is_expired(i64::MAX / 2));
        }
        assert!(Session::new(SessionId::new("s"), 0, 1).is_expired(1001));
    }

    #[test]
    fn extreme_intervals_and_access_times_neither_wrap_nor_panic() {
        let mut s = Session::new(SessionId::new("s"), 0, i64::MAX);
        assert!(!s.is_expired(i64::MAX), "a huge interval is never reached");
        s.primary = false;
        assert!(!s.is_expired(i64::MAX));
        let mut old = Session::new(SessionId::new("o"), i64::MIN, 60);
        assert!(
            old.is_expired(0),
            "an access time from the far past has expired"
        );
        old.primary = false;
        assert!(old.is_expired(0));
        assert!(old.access_due(i64::MAX));
    }

    struct Unserializable;
    impl Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(S::Error::custom("not today"))
        }
    }

    #[test]
    fn the_committed_session_leaves_out_pending_changes_and_removal_stamps_are_bounded() {
        let mut s = Session::new(SessionId::new("s"), 0, 60);
        s.insert("kept", &1u32).unwrap();
        s.insert("gone", &1u32).unwrap();
        s.take_delta_from(1).unwrap();
        s.insert("kept", &2u32).unwrap();
        s.insert("new", &2u32).unwrap();
        s.remove("gone");
        s.set_max_inactive_secs(5);
        s.access(9);
        let c = s.committed();
        assert!(!c.is_dirty());
        assert_eq!(c.get::<u32>("kept").unwrap(), Some(1));
        assert_eq!(c.get::<u32>("gone").unwrap(), Some(1));
        assert_eq!(c.get::<u32>("new").unwrap(), None);
        assert_eq!((c.max_inactive_secs(), c.is_new()), (60, true));
        // Sent, the changes are committed.
        s.take_delta_from(1).unwrap();
        assert_eq!(s.committed(), s);
        // Names set and removed once each, many times over: their removal stamps go.
        for n in 0..500 {
            let name = format!("flash{n}");
            s.insert(&name, &1u32).unwrap();
            s.take_delta_from(1).unwrap();
            s.remove(&name);
            s.take_delta_from(1).unwrap();
        }
        assert!(
            s.stamps.len() < 3 * REMOVAL_STAMP_VERSIONS as usize,
            "{}",
            s.stamps.len()
        );
    }

    #[test]
    fn copies_forget_old_removal_stamps_too() {
        let mut p = Session::new(SessionId::new("s"), 0, 60);
        let mut c = Session::replica(SessionId::new("s"), 0, 60);
        for n in 0..500 {
            let name = format!("flash{n}");
            p.insert(&name, &1u32).unwrap();
            c.apply(&p.take_delta_from(1).unwrap());
            p.remove(&name);
            c.apply(&p.take_delta_from(1).unwrap());
        }
        assert!(p.stamps.len() < 3 * REMOVAL_STAMP_VERSIONS as usize);
        assert!(
            c.stamps.len() < 3 * REMOVAL_STAMP_VERSIONS as usize,
            "copy holds {} stamps",
            c.stamps.len()
        );
    }

    #[test]
    fn a_late_created_does_not_undo_a_local_interval_change() {
        let mut c = Session::replica_awaiting_created(SessionId::new("s"), 0, 1800);
        c.set_max_inactive_secs(120);
        c.take_delta_from(1).unwrap(); // sent: every other node now has 120
        c.created_arrived(60);
        assert_eq!(c.max_inactive_secs(), 120);
    }

    #[test]
    fn changes_dropped_from_the_recent_list_still_count_as_held() {
        let mut base = Session::new(SessionId::new("s"), 0, 60);
        base.insert("a", &0u32).unwrap();
        base.take_delta_from(9).unwrap();
        let mut copy = base.clone();
        for origin in [1u64, 2] {
            let mut s = base.clone();
            s.insert(&format!("n{origin}"), &1u32).unwrap();
            copy.apply(&s.take_delta_from(origin).unwrap());
        }
        for i in 0..RECENT_CHANGES as u32 {
            copy.insert("c", &i).unwrap();
            copy.take_delta_from(3).unwrap();
        }
        assert!(copy.holds(2, 1) && copy.holds(2, 2));
        assert!(copy.recent.len() <= RECENT_CHANGES);
        // Through a full copy too.
        let mut other = base.clone();
        assert!(!other.holds(2, 1));
        other.merge(&copy.committed());
        assert!(other.holds(2, 1));
    }

    #[test]
    fn unserializable_value_is_refused_at_insert_and_changes_nothing() {
        let mut s = Session::new(SessionId::new("x"), 0, 60);
        let err = s.insert("bad", &Unserializable).unwrap_err();
        assert!(matches!(err, SessionError::Serialize { ref name, .. } if name == "bad"));
        assert_eq!(s.names().count(), 0);
        assert!(!s.is_dirty());
    }

    #[test]
    fn typed_get_reports_a_wrong_type() {
        let mut s = Session::new(SessionId::new("x"), 0, 60);
        s.insert("n", &"text").unwrap();
        assert!(s.get::<u64>("n").is_err());
        assert_eq!(s.get::<String>("n").unwrap().as_deref(), Some("text"));
        assert_eq!(s.get::<String>("missing").unwrap(), None);
    }

    #[test]
    fn deltas_replay_to_the_same_state_with_increasing_versions() {
        let mut a = Session::new(SessionId::new("x"), 0, 60);
        let mut b = Session::replica(SessionId::new("x"), 0, 60);
        a.insert("n", &1u32).unwrap();
        a.access(10);
        let d1 = a.take_delta().unwrap();
        a.insert("n", &2u32).unwrap();
        a.insert("m", &vec![1, 2, 3]).unwrap();
        assert!(a.remove("m"));
        a.set_max_inactive_secs(120);
        let d2 = a.take_delta().unwrap();
        assert!(d2.version > d1.version);
        b.apply(&d1);
        b.apply(&d2);
        assert_eq!(b.get::<u32>("n").unwrap(), Some(2));
        assert_eq!(b.get::<Vec<u8>>("m").unwrap(), None);
        assert_eq!(b.max_inactive_secs(), 120);
        assert!(!b.is_new());
        assert_eq!(b.version(), a.version());
        assert!(a.take_delta().is_none(), "nothing new");
    }

    #[test]
    fn copies_expire_after_twice_the_interval() {
        let mut p = Session::new(SessionId::new("x"), 0, 10);
        assert!(!p.is_expired(10_000));
        assert!(p.is_expired(10_001));
        p.set_primary(false);
        assert!(!p.is_expired(20_000));
        assert!(p.is_expired(20_001));
        p.set_max_inactive_secs(-1);
        assert!(!p.is_expired(i64::MAX / 2));
    }
}
