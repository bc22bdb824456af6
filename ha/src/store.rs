//! The sessions of one context on one node, and how replicated events change them. Pure:
//! time is a parameter.

use std::collections::{BTreeMap, HashMap, VecDeque};

use log::{debug, warn};

use crate::delta::Delta;
use crate::message::SessionEvent;
use crate::session::{Session, SessionId};

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// The store changed.
    Changed,
    /// A delta older than (or as old as) the copy's version was dropped.
    Stale,
    /// The event names a session this node does not have; nothing changed.
    Unknown,
    /// Applied, but the copy is behind the sender's: an access notice named a newer
    /// version, or held-back deltas had to be applied without the versions before them.
    /// The caller should fetch the whole session from the sender.
    Behind,
    /// A delta arrived ahead of a version this copy has not seen (it travelled on another
    /// connection, or its sender died part-way through replicating it): held back, not
    /// applied, until that version or a whole copy arrives (see
    /// [`SessionStore::held_back`]). The caller should fetch the whole session from the
    /// sender, in case the missing version never comes.
    Early,
    /// Not a store event (state-transfer control); nothing changed.
    Ignored,
}

/// Counters of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Events that changed the store.
    pub applied: u64,
    /// Deltas dropped because a newer version was already applied.
    pub stale: u64,
    /// Deltas that arrived ahead of a version not seen yet, and were held back.
    pub gaps: u64,
    /// Held-back deltas applied without the versions before them, because those never
    /// came ([`SessionStore::settle`], or more than [`MAX_EARLY_DELTAS`] waiting).
    pub forced: u64,
    /// Events for unknown sessions.
    pub unknown: u64,
    /// Sessions expired by [`SessionStore::expire`].
    pub expired: u64,
}

/// Session copies keyed by id, with per-session versions: a copy never goes back to an older
/// state, whatever order deltas arrive in.
///
/// ```
/// use ha::{Applied, SessionEvent, SessionId, SessionStore};
/// let mut store = SessionStore::default();
/// let ev = SessionEvent::Created { id: SessionId::new("a"), max_inactive_secs: 60 };
/// assert_eq!(store.apply(&ev, 1_000), Applied::Changed);
/// assert!(store.get(&SessionId::new("a")).is_some());
/// ```
#[derive(Debug)]
pub struct SessionStore {
    /// Keyed by base id (the id without its route suffix): base ids are random 128-bit
    /// values, so a session is one entry whatever route it carries, and a copy held under
    /// an old route is found in one lookup, not a scan.
    sessions: HashMap<String, Session>,
    stats: StoreStats,
    /// Interval of a copy made from a first delta whose CREATED has not arrived.
    placeholder_secs: i64,
    /// Base ids of sessions invalidated or renamed away recently, with when (ms): a full
    /// copy, a first delta or a fetch answer for one is refused, so a message still in
    /// flight (or a member that has not heard yet) cannot bring the session back. Bounded:
    /// pruned after [`TOMBSTONE_MS`], at most [`MAX_TOMBSTONES`] (oldest dropped first).
    buried: HashMap<String, Burial>,
    burial_order: VecDeque<(String, i64)>,
    /// Deltas that arrived ahead of a version their copy has not seen, by base id and
    /// version, applied in order once it comes (or a whole copy does). Bounded per session
    /// by [`MAX_EARLY_DELTAS`]; dropped with their session.
    early: HashMap<String, BTreeMap<(u64, u64), Delta>>,
}

/// At most this many deltas wait per session for a version before them; one more and
/// they are applied without it (the version is not coming).
pub const MAX_EARLY_DELTAS: usize = 16;

/// How long an invalidated or renamed-away session id stays refused: well past the 3 s
/// send timeout within which any message about it is delivered or given up.
pub const TOMBSTONE_MS: i64 = 30_000;
/// A recently invalidated or renamed-away session id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Burial {
    at_ms: i64,
    /// Renamed away: the id it went to (a request that still names the old one follows).
    to: Option<SessionId>,
}

/// At most this many recently buried ids are remembered.
pub const MAX_TOMBSTONES: usize = 10_000;

impl Default for SessionStore {
    /// A store whose early copies expire after Tomcat's default interval (1800 s) until
    /// their CREATED brings the real one.
    fn default() -> Self {
        Self::new(1800)
    }
}

impl SessionStore {
    /// An empty store. A copy made from a session's first delta before its CREATED arrived
    /// expires as if its interval were `placeholder_secs` (the local manager's
    /// `max_inactive_secs`, since members normally share it) until the CREATED brings the
    /// session's own, so a CREATED that never comes does not leave a copy behind forever
    /// (unless `placeholder_secs` is zero or less: sessions that never expire).
    ///
    /// ```
    /// use ha::SessionStore;
    /// let store = SessionStore::new(600);
    /// assert!(store.is_empty());
    /// ```
    pub fn new(placeholder_secs: i64) -> Self {
        Self {
            sessions: HashMap::new(),
            stats: StoreStats::default(),
            placeholder_secs,
            buried: HashMap::new(),
            burial_order: VecDeque::new(),
            early: HashMap::new(),
        }
    }

    /// Remembers that `id`'s session was invalidated or renamed away at `now_ms` (see
    /// [`SessionStore::is_buried`]); forgets burials older than [`TOMBSTONE_MS`].
    pub fn bury(&mut self, id: &SessionId, now_ms: i64) {
        self.bury_as(id, None, now_ms);
    }

    /// [`SessionStore::bury`], remembering where a renamed session went.
    fn bury_as(&mut self, id: &SessionId, to: Option<SessionId>, now_ms: i64) {
        while let Some((base, at)) = self.burial_order.front() {
            if now_ms - at < TOMBSTONE_MS && self.burial_order.len() < MAX_TOMBSTONES {
                break;
            }
            if self.buried.get(base).map(|b| b.at_ms) == Some(*at) {
                self.buried.remove(base);
            }
            self.burial_order.pop_front();
        }
        let base = id.base().to_owned();
        let burial = Burial { at_ms: now_ms, to };
        self.buried.insert(base.clone(), burial);
        self.burial_order.push_back((base, now_ms));
    }

    /// Whether `id`'s session was invalidated or renamed away here recently: copies of it
    /// are refused and it is not fetched.
    pub fn is_buried(&self, id: &SessionId) -> bool {
        self.buried.contains_key(id.base())
    }

    /// The session, if present under exactly this id.
    pub fn get(&self, id: &SessionId) -> Option<&Session> {
        self.sessions.get(id.base()).filter(|s| s.id() == id)
    }

    /// The session, mutably (for request handling on this node).
    pub fn get_mut(&mut self, id: &SessionId) -> Option<&mut Session> {
        self.sessions.get_mut(id.base()).filter(|s| s.id() == id)
    }

    /// The session with this base id (the id without its route suffix), whatever its route.
    pub fn get_by_base(&self, base: &str) -> Option<&Session> {
        self.sessions.get(base)
    }

    /// The id under which a session with the same base id (ignoring the route suffix) is
    /// held, if any.
    pub fn find_by_base(&self, base: &str) -> Option<SessionId> {
        self.sessions.get(base).map(|s| s.id().clone())
    }

    /// Finds the session `id` names: under that id, or under the same base id with another
    /// route (a rename this node missed, e.g. from a node that died while replicating it),
    /// which is then renamed to `id`; unless a request here is changing it, which keeps the
    /// name it runs under (its changes go out under that name, and the others follow).
    fn resolve(&mut self, id: &SessionId) -> Option<&mut Session> {
        let s = self.sessions.get_mut(id.base())?;
        if s.id() != id && !s.is_dirty() {
            debug!(target: "ha::store", "{} is {id} elsewhere: renaming the copy", s.id());
            s.rename(id.clone());
        }
        Some(s)
    }

    /// Renames `old`'s session to `new` (a route change or a new id; then `old` is buried,
    /// remembering `new`). Returns whether the session is held under `new` now.
    pub fn rename(&mut self, old: &SessionId, new: &SessionId, now_ms: i64) -> bool {
        let moved = old.base() != new.base();
        if self.get(new).is_some() {
            // Fetched under its new id before the rename arrived: the old id goes, and what
            // a request here was changing under it goes along.
            if let Some(gone) = moved.then(|| self.sessions.remove(old.base())).flatten() {
                if gone.is_dirty() {
                    if let Some(s) = self.sessions.get_mut(new.base()) {
                        s.adopt_pending(&gone);
                    }
                }
                self.early.remove(old.base());
                self.bury_as(old, Some(new.clone()), now_ms);
            }
            return true;
        }
        let Some(mut s) = self.sessions.remove(old.base()) else {
            if moved {
                // Not held here (yet): its late creation or first change is refused.
                self.bury_as(old, Some(new.clone()), now_ms);
            }
            return false;
        };
        s.rename(new.clone());
        self.insert(s);
        if moved {
            self.bury_as(old, Some(new.clone()), now_ms);
            if let Some(early) = self.early.remove(old.base()) {
                self.early.insert(new.base().to_owned(), early);
            }
        }
        true
    }

    /// The id the session `id` names is held under now: `id` itself, the same base id under
    /// another route, or where a recent rename took it (followed for a few hops).
    pub fn follow(&self, id: &SessionId) -> Option<SessionId> {
        let mut base = id.base();
        for _ in 0..4 {
            if let Some(s) = self.sessions.get(base) {
                return Some(s.id().clone());
            }
            base = self.buried.get(base)?.to.as_ref()?.base();
        }
        None
    }

    /// Adds or replaces a local session.
    pub fn insert(&mut self, session: Session) {
        self.sessions
            .insert(session.id().base().to_owned(), session);
    }

    /// Removes a session.
    pub fn remove(&mut self, id: &SessionId) -> Option<Session> {
        self.get(id)?;
        self.early.remove(id.base());
        self.sessions.remove(id.base())
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The sessions held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// All sessions (for state transfer) as replicated: without what running requests
    /// changed and have not sent yet ([`Session::committed`]).
    pub fn snapshot(&self) -> Vec<Session> {
        self.sessions.values().map(Session::committed).collect()
    }

    /// The state for a joining node, as [`SessionEvent::AllSessionData`] batches of at most
    /// `batch` items each (never one unbounded message): the sessions as replicated, then
    /// the changes held back here, then the recent burials.
    pub fn state_batches(&self, batch: usize) -> Vec<SessionEvent> {
        let batch = batch.max(1);
        let data = |sessions, held_back, buried| SessionEvent::AllSessionData {
            sessions,
            held_back,
            buried,
        };
        let sessions = self.snapshot();
        let held_back: Vec<Delta> = self
            .early
            .values()
            .flat_map(|e| e.values().cloned())
            .collect();
        let buried: Vec<(SessionId, Option<SessionId>)> = (self.buried.iter())
            .map(|(base, b)| (SessionId::new(base.clone()), b.to.clone()))
            .collect();
        // Moved into the batches, not copied again: the caller holds the store's lock.
        let mut out: Vec<SessionEvent> = (in_batches(sessions, batch).into_iter())
            .map(|c| data(c, Vec::new(), Vec::new()))
            .collect();
        out.extend(
            (in_batches(held_back, batch).into_iter()).map(|c| data(Vec::new(), c, Vec::new())),
        );
        out.extend(
            (in_batches(buried, batch).into_iter()).map(|c| data(Vec::new(), Vec::new(), c)),
        );
        out
    }

    /// Counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Applies an event from another node, received at `now_ms` by this node's clock (what
    /// it is used for, burials and a new copy's times, is local bookkeeping: a sender's
    /// clock can be off).
    ///
    /// Reference: `DeltaManager.messageReceived` and its `handle*` methods.
    pub fn apply(&mut self, event: &SessionEvent, now_ms: i64) -> Applied {
        let result = match event {
            SessionEvent::Created {
                id,
                max_inactive_secs,
            } if self.is_buried(id) => {
                // Overtaken by its invalidation (another connection): no ghost.
                debug!(target: "ha::store", "refusing the creation of {id}: invalidated or renamed here");
                Applied::Stale
            }
            SessionEvent::Created {
                id,
                max_inactive_secs,
            } => {
                self.sessions
                    .entry(id.base().to_owned())
                    .and_modify(|s| s.created_arrived(*max_inactive_secs))
                    .or_insert_with(|| Session::replica(id.clone(), now_ms, *max_inactive_secs));
                Applied::Changed
            }
            SessionEvent::Expired { id } => {
                self.bury(id, now_ms);
                self.early.remove(id.base());
                match self.sessions.remove(id.base()) {
                    Some(_) => Applied::Changed,
                    None => Applied::Unknown,
                }
            }
            SessionEvent::Accessed {
                id,
                at_ms,
                version,
                origin,
            } => {
                let buried = self.is_buried(id);
                match self.resolve(id) {
                    Some(s) => {
                        s.touch(*at_ms);
                        s.set_primary(false);
                        if !s.holds(*version, *origin) {
                            debug!(target: "ha::store", "{id} is at v{}, the sender at v{version}", s.version());
                            Applied::Behind
                        } else {
                            Applied::Changed
                        }
                    }
                    // Invalidated here: nothing to repair.
                    None if buried => Applied::Stale,
                    None => Applied::Unknown,
                }
            }
            SessionEvent::Delta(delta) => self.apply_delta(delta, now_ms),
            SessionEvent::ChangeSessionId { old, new } => {
                let serving = (self.sessions.get(old.base()))
                    .is_some_and(|s| s.is_dirty() && old.base() == new.base());
                if serving && self.get(new).is_none() {
                    // Another node moved it to its route while a request here is changing
                    // it: it keeps this node's name, which its changes go out under next.
                    Applied::Stale
                } else if self.rename(old, new, now_ms) {
                    Applied::Changed
                } else {
                    Applied::Unknown
                }
            }
            SessionEvent::AllSessionData {
                sessions,
                held_back,
                buried,
            } => {
                for incoming in sessions {
                    self.insert_copy(incoming);
                }
                for delta in held_back {
                    self.apply_delta(delta, now_ms);
                }
                for (id, to) in buried {
                    if !self.sessions.contains_key(id.base()) {
                        self.bury_as(id, to.clone(), now_ms);
                    }
                }
                Applied::Changed
            }
            SessionEvent::SessionData { session } => {
                if self.insert_copy(session) {
                    Applied::Changed
                } else {
                    Applied::Stale
                }
            }
            SessionEvent::GetSession { .. }
            | SessionEvent::GetAllSessions
            | SessionEvent::TransferComplete { .. }
            | SessionEvent::NoContextManager
            | SessionEvent::StateNotReady => Applied::Ignored,
        };
        match result {
            Applied::Changed | Applied::Behind => self.stats.applied += 1,
            Applied::Early => {}
            Applied::Stale => self.stats.stale += 1,
            Applied::Unknown => self.stats.unknown += 1,
            Applied::Ignored => {}
        }
        result
    }

    /// Takes a full copy from another node: as is when none is held, else merged into the
    /// one held, name by name, the newer change winning (see [`Session::merge`]; it is how
    /// a copy that missed a delta gets it back). A request here changing the session keeps
    /// its changes on top, still pending (its client is about to see them, and they go
    /// out after the copy's version), and the name it runs under. Returns whether anything
    /// changed.
    fn insert_copy(&mut self, incoming: &Session) -> bool {
        if self.is_buried(incoming.id()) {
            debug!(target: "ha::store", "refusing a copy of {}: invalidated or renamed here", incoming.id());
            return false;
        }
        let base = incoming.id().base().to_owned();
        let changed = match self.sessions.get_mut(&base) {
            None => {
                let mut copy = incoming.clone();
                copy.set_primary(false);
                copy.freeze_stamps();
                self.insert(copy);
                true
            }
            Some(held) => {
                let mut changed = held.merge(incoming);
                if changed {
                    held.set_primary(false);
                }
                if !held.is_dirty() && held.id() != incoming.id() {
                    // A rename this node missed (the copy may bring nothing else).
                    held.rename(incoming.id().clone());
                    changed = true;
                }
                changed
            }
        };
        if changed {
            self.apply_early(&base);
        }
        changed
    }

    /// The newest version of `id`'s session known to exist because a delta for it is held
    /// back here ([`Applied::Early`]), if any: this copy is behind it, and a reader should
    /// fetch a whole copy (or [`SessionStore::settle`]) first.
    pub fn held_back(&self, id: &SessionId) -> Option<u64> {
        let early = self.early.get(id.base())?;
        early.keys().map(|(v, _)| *v).max()
    }

    /// Applies the deltas held back for `id`'s session without the versions missing before
    /// them: the last resort when those do not come (their sender died part-way, and no
    /// member had a whole copy to give). Returns how many were applied.
    pub fn settle(&mut self, id: &SessionId) -> usize {
        let Some(early) = self.early.remove(id.base()) else {
            return 0;
        };
        let Some(session) = self.sessions.get_mut(id.base()) else {
            return 0;
        };
        let mut applied = 0;
        for ((version, _), delta) in early {
            if version > session.version().saturating_add(1) {
                warn!(target: "ha::store", "applying v{version} of {} without v{}", session.id(), session.version().saturating_add(1));
            }
            if session.apply(&delta) {
                session.set_primary(false);
                applied += 1;
            }
        }
        self.stats.forced += applied as u64;
        applied
    }

    /// Applies the held-back deltas that now follow the copy's version, in order; those it
    /// has reached are merged (one may be a change made at the same time elsewhere).
    fn apply_early(&mut self, base: &str) {
        let Some(early) = self.early.get_mut(base) else {
            return;
        };
        if let Some(session) = self.sessions.get_mut(base) {
            while let Some(next) = early.first_entry() {
                let (version, _) = *next.key();
                if version > session.version().saturating_add(1) {
                    break;
                }
                if session.apply(&next.remove()) {
                    session.set_primary(false);
                }
            }
        } else {
            early.clear();
        }
        if early.is_empty() {
            self.early.remove(base);
        }
    }

    fn apply_delta(&mut self, delta: &Delta, now_ms: i64) -> Applied {
        let id = &delta.session_id;
        if self.resolve(id).is_none() {
            if self.is_buried(id) {
                // Sent under the old id before a new one was given (login elsewhere): it
                // belongs to the session under its new id.
                if let Some(now) = self.follow(id).filter(|now| now.base() != id.base()) {
                    let moved = Delta {
                        session_id: now,
                        ..delta.clone()
                    };
                    return self.apply_delta(&moved, now_ms);
                }
                debug!(target: "ha::store", "dropping a delta of {id}: invalidated or renamed here");
                return Applied::Stale;
            }
            // The first delta of a session can stand in for a CREATED that has not arrived
            // (they may travel on different connections).
            if delta.version != 1 {
                debug!(target: "ha::store", "delta for unknown session {id}");
                return Applied::Unknown;
            }
            let copy = Session::replica_awaiting_created(id.clone(), now_ms, self.placeholder_secs);
            self.insert(copy);
        }
        let Some(session) = self.sessions.get_mut(id.base()) else {
            return Applied::Unknown;
        };
        if delta.version <= session.version() {
            // A version this copy has: a duplicate or an older change (nothing to do), or
            // one made at the same time as another on another node (its names that changed
            // later here stay as they are; the others take it).
            if session.apply(delta) {
                session.set_primary(false);
                return Applied::Changed;
            }
            debug!(target: "ha::store", "dropping stale delta v{} for {} (at v{})", delta.version, delta.session_id, session.version());
            return Applied::Stale;
        }
        if delta.version > session.version().saturating_add(1) {
            let held = session.version();
            let key = (delta.version, delta.origin);
            let early = self.early.entry(id.base().to_owned()).or_default();
            if early.contains_key(&key) {
                return Applied::Stale;
            }
            if early.len() < MAX_EARLY_DELTAS {
                debug!(target: "ha::store", "holding back delta v{} for {id}: at v{held}", delta.version);
                early.insert(key, delta.clone());
                self.stats.gaps += 1;
                return Applied::Early;
            }
            // The versions before them are not coming: apply what is here, in order.
            early.insert(key, delta.clone());
            self.settle(id);
            return Applied::Behind;
        }
        session.apply(delta);
        session.set_primary(false);
        self.apply_early(id.base());
        Applied::Changed
    }

    /// Removes sessions expired at `now_ms` (primaries after their interval, copies after
    /// twice that) and returns their ids.
    pub fn expire(&mut self, now_ms: i64) -> Vec<SessionId> {
        let mut gone = Vec::new();
        self.sessions.retain(|_, s| {
            let expired = s.is_expired(now_ms);
            if expired {
                gone.push(s.id().clone());
            }
            !expired
        });
        for id in &gone {
            self.bury(id, now_ms);
            self.early.remove(id.base());
        }
        self.stats.expired += gone.len() as u64;
        gone
    }
}

/// `items` split into batches of at most `batch`, in order, without copying them.
fn in_batches<T>(items: Vec<T>, batch: usize) -> Vec<Vec<T>> {
    debug_assert!(batch > 0, "a batch of nothing would never end");
    let batch = batch.max(1);
    let mut items = items.into_iter().peekable();
    let mut out = Vec::new();
    while items.peek().is_some() {
        out.push(items.by_ref().take(batch).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::Action;
    use crate::testing::deltas_setting;

    fn primary_with_deltas(n: u32) -> (Session, Vec<Delta>) {
        let mut s = Session::new(SessionId::new("s"), 0, 60);
        let mut deltas = Vec::new();
        for i in 1..=n {
            s.insert("count", &i).unwrap();
            s.access(i64::from(i));
            deltas.push(s.take_delta().unwrap());
        }
        (s, deltas)
    }

    #[test]
    fn a_full_copy_of_the_same_version_does_not_drop_a_request_s_changes() {
        let (primary, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        let id = SessionId::new("s");
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        store.apply(&SessionEvent::Delta(d[1].clone()), 2);
        // A request on this node is changing the session (v2) ...
        store.get_mut(&id).unwrap().insert("count", &3u32).unwrap();
        // ... when a repair's copy of v2 arrives: it adds nothing, and the request's change
        // stays.
        let data = SessionEvent::SessionData {
            session: Box::new(primary.clone()),
        };
        assert_eq!(store.apply(&data, 3), Applied::Stale);
        let held = store.get_mut(&id).unwrap();
        assert_eq!(held.get::<u32>("count").unwrap(), Some(3));
        assert_eq!(held.take_delta().unwrap().version, 3);
        assert_eq!(store.apply(&data, 4), Applied::Stale, "v3 is held now");
        assert_eq!(
            store.get(&id).unwrap().get::<u32>("count").unwrap(),
            Some(3)
        );
    }

    #[test]
    fn a_newer_copy_keeps_the_changes_of_a_request_in_progress() {
        let (primary, d) = primary_with_deltas(3);
        let mut store = SessionStore::default();
        let id = SessionId::new("s");
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // A request here changes the session it holds at v1 ...
        let held = store.get_mut(&id).unwrap();
        held.insert("count", &7u32).unwrap();
        held.insert("mine", "kept").unwrap();
        // ... when a repair's copy of v3 arrives (changed elsewhere meanwhile).
        let mut newer = primary.clone();
        newer.insert("theirs", "also kept").unwrap();
        let data = SessionEvent::SessionData {
            session: Box::new(newer),
        };
        assert_eq!(store.apply(&data, 2), Applied::Changed);
        let held = store.get_mut(&id).unwrap();
        assert_eq!(held.version(), 3, "the newer copy is taken");
        assert_eq!(
            held.get::<String>("theirs").unwrap().as_deref(),
            Some("also kept")
        );
        // The request's writes are neither undone here nor forgotten: they go out after v3.
        assert_eq!(held.get::<u32>("count").unwrap(), Some(7));
        assert_eq!(held.get::<String>("mine").unwrap().as_deref(), Some("kept"));
        let delta = held
            .take_delta()
            .expect("the request's changes are still pending");
        assert_eq!(delta.version, 4);
        let names: Vec<&str> = (delta.actions.iter())
            .filter_map(|a| match a {
                Action::SetAttribute { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["count", "mine"]);
    }

    #[test]
    fn a_repair_copy_is_taken_while_a_request_runs() {
        // v2 sets an attribute that v3 does not touch; this node misses v2.
        let id = SessionId::new("s");
        let mut primary = Session::new(id.clone(), 0, 60);
        let mut d = Vec::new();
        for name in ["a1", "a2", "a3"] {
            primary.insert(name, &1u32).unwrap();
            d.push(primary.take_delta().unwrap());
        }
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[2].clone()), 2),
            Applied::Early
        );
        // A request here changes it before the repair's copy of v3 lands.
        store.get_mut(&id).unwrap().insert("mine", &1u32).unwrap();
        let copy = SessionEvent::SessionData {
            session: Box::new(primary),
        };
        assert_eq!(store.apply(&copy, 3), Applied::Changed);
        let held = store.get_mut(&id).unwrap();
        assert_eq!(held.get::<u32>("a2").unwrap(), Some(1), "repaired");
        assert_eq!(held.get::<u32>("mine").unwrap(), Some(1), "kept");
        assert_eq!(held.take_delta().unwrap().version, 4);
    }

    #[test]
    fn a_request_keeps_its_session_s_name_against_late_messages_under_another_route() {
        let (primary, d) = primary_with_deltas(3);
        let old = SessionId::new("s.n1");
        let mine = SessionId::new("s.n2");
        let rename = |s: &Session| {
            let mut s = s.clone();
            s.rename(old.clone());
            s
        };
        let named = |delta: &Delta| {
            SessionEvent::Delta(Delta {
                session_id: old.clone(),
                ..delta.clone()
            })
        };
        let mut store = SessionStore::default();
        store.apply(&named(&d[0]), 1);
        // This node took the session over (its route) and a request is changing it ...
        store.apply(
            &SessionEvent::ChangeSessionId {
                old: old.clone(),
                new: mine.clone(),
            },
            2,
        );
        store.get_mut(&mine).unwrap().insert("mine", &1u32).unwrap();
        // ... when a late delta, a copy and another node's takeover under the old route
        // arrive: their content is taken, the name stays.
        assert_eq!(store.apply(&named(&d[1]), 3), Applied::Changed);
        assert!(store.get(&mine).is_some());
        let copy = SessionEvent::SessionData {
            session: Box::new(rename(&primary)),
        };
        assert_eq!(store.apply(&copy, 4), Applied::Changed);
        let takeover = SessionEvent::ChangeSessionId {
            old: old.clone(),
            new: SessionId::new("s.n3"),
        };
        assert_eq!(store.apply(&takeover, 5), Applied::Stale);
        let held = store
            .get_mut(&mine)
            .expect("still under the request's name");
        assert_eq!(held.get::<u32>("count").unwrap(), Some(3));
        assert_eq!(held.take_delta().unwrap().version, 4);
        // Not being changed, a copy follows a rename it missed, as before.
        let later = SessionEvent::Delta(Delta {
            session_id: old.clone(),
            version: 5,
            last_access_ms: 9,
            actions: Vec::new(),
            origin: 0,
        });
        assert_eq!(store.apply(&later, 6), Applied::Changed);
        assert!(store.get(&old).is_some() && store.get(&mine).is_none());
    }

    #[test]
    fn a_remote_delta_does_not_undo_a_request_in_progress() {
        let (_, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        let id = SessionId::new("s");
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        store.get_mut(&id).unwrap().insert("count", &9u32).unwrap();
        // Another node's change (count = 2) lands while the request runs: the request's
        // write (count = 9) is what it answers and what goes out next, so the copy here
        // must hold it too, not the value every other node is about to overwrite.
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[1].clone()), 2),
            Applied::Changed
        );
        let held = store.get_mut(&id).unwrap();
        assert_eq!(held.get::<u32>("count").unwrap(), Some(9));
        let delta = held.take_delta().unwrap();
        assert_eq!(delta.version, 3);
        assert_eq!(delta.actions.len(), 1);
    }

    #[test]
    fn a_buried_session_is_not_brought_back_by_late_messages() {
        let (primary, d) = primary_with_deltas(2);
        let id = SessionId::new("s");
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        assert!(store.remove(&id).is_some());
        store.bury(&id, 1_000);
        // A fetch answer, a first delta and an access notice still on their way: none
        // brings it back, and none asks for a repair.
        let copy = SessionEvent::SessionData {
            session: Box::new(primary.clone()),
        };
        assert_eq!(store.apply(&copy, 2), Applied::Stale);
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[0].clone()), 2),
            Applied::Stale
        );
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[1].clone()), 2),
            Applied::Stale
        );
        let notice = SessionEvent::Accessed {
            id: id.clone(),
            at_ms: 2,
            version: 2,
            origin: 0,
        };
        assert_eq!(store.apply(&notice, 2), Applied::Stale);
        assert!(store.get(&id).is_none());
        // Forgotten once another burial comes after the tombstone time.
        store.bury(&SessionId::new("other"), 1_000 + TOMBSTONE_MS);
        assert!(!store.is_buried(&id));
        assert_eq!(store.apply(&copy, 3), Applied::Changed);
    }

    #[test]
    fn expiry_and_a_remote_invalidation_bury_too_and_burials_are_bounded() {
        let (_, d) = primary_with_deltas(1);
        let mut store = SessionStore::new(10);
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        let id = SessionId::new("s");
        assert_eq!(store.expire(1_000_000), vec![id.clone()]);
        assert!(store.is_buried(&id));
        let other = SessionId::new("t");
        store.apply(&SessionEvent::Expired { id: other.clone() }, 5);
        assert!(store.is_buried(&other));
        for i in 0..MAX_TOMBSTONES + 10 {
            store.bury(&SessionId::new(format!("x{i}")), 10);
        }
        assert!(store.buried.len() <= MAX_TOMBSTONES);
        assert!(!store.is_buried(&id), "the oldest burials went first");
    }

    #[test]
    fn a_copy_whose_created_never_comes_expires_with_the_placeholder_interval() {
        let (_, d) = primary_with_deltas(1);
        let mut store = SessionStore::new(10);
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        let id = SessionId::new("s");
        // A copy lives twice the interval after its last access (1 ms here).
        assert!(store.expire(20_001).is_empty());
        assert_eq!(store.expire(20_002), vec![id.clone()]);
        assert!(store.get(&id).is_none());
    }

    #[test]
    fn an_access_notice_for_a_newer_version_reports_the_copy_behind() {
        let (_, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        let id = SessionId::new("s");
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        let notice = |version| SessionEvent::Accessed {
            id: id.clone(),
            at_ms: 9,
            version,
            origin: 0,
        };
        assert_eq!(store.apply(&notice(1), 9), Applied::Changed);
        // The sender has v2, which never reached this node (it died part-way through).
        assert_eq!(store.apply(&notice(2), 9), Applied::Behind);
        assert_eq!(
            store.get(&id).unwrap().last_access_ms(),
            9,
            "touched anyway"
        );
        assert_eq!(
            store.apply(
                &SessionEvent::Accessed {
                    id: SessionId::new("other"),
                    at_ms: 9,
                    version: 1,
                    origin: 0,
                },
                9
            ),
            Applied::Unknown
        );
    }

    #[test]
    fn out_of_order_and_duplicate_deltas_never_go_backwards() {
        let (_, d) = primary_with_deltas(4);
        let mut store = SessionStore::default();
        let id = SessionId::new("s");
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[0].clone()), 1),
            Applied::Changed
        );
        // v3 before v2: held back (v2's changes are missing), the copy stays at v1.
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[2].clone()), 3),
            Applied::Early
        );
        assert_eq!(store.get(&id).unwrap().version(), 1);
        assert_eq!(store.held_back(&id), Some(3));
        // The late v2 brings v3 along; a duplicate v3 must not apply twice.
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[1].clone()), 2),
            Applied::Changed
        );
        assert_eq!(store.get(&id).unwrap().version(), 3);
        assert_eq!(store.held_back(&id), None);
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[2].clone()), 3),
            Applied::Stale
        );
        assert_eq!(
            store.get(&id).unwrap().get::<u32>("count").unwrap(),
            Some(3)
        );
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[3].clone()), 4),
            Applied::Changed
        );
        assert_eq!(
            store.get(&id).unwrap().get::<u32>("count").unwrap(),
            Some(4)
        );
        let st = store.stats();
        assert_eq!((st.stale, st.gaps, st.applied, st.forced), (1, 1, 3, 0));
    }

    #[test]
    fn held_back_deltas_wait_for_a_whole_copy_or_are_settled() {
        let (primary, d) = primary_with_deltas(5);
        let id = SessionId::new("s");
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // v2 never comes; v3 and v5 wait.
        for k in [2, 4] {
            assert_eq!(
                store.apply(&SessionEvent::Delta(d[k].clone()), 2),
                Applied::Early
            );
        }
        assert_eq!(store.held_back(&id), Some(5));
        // A whole copy of v3 (the sender's answer to the repair) takes v1's place; v3 is
        // passed, v5 still waits for v4.
        let mut at_v3 = Session::new(id.clone(), 0, 60);
        for delta in &d[..3] {
            at_v3.apply(delta);
        }
        let copy = SessionEvent::SessionData {
            session: Box::new(at_v3),
        };
        assert_eq!(store.apply(&copy, 3), Applied::Changed);
        assert_eq!(store.get(&id).unwrap().version(), 3);
        assert_eq!(store.held_back(&id), Some(5));
        // v4 never comes either: the last resort applies v5 over the gap.
        assert_eq!(store.settle(&id), 1);
        assert_eq!(store.get(&id).unwrap().version(), 5);
        assert_eq!(
            store.get(&id).unwrap().get::<u32>("count").unwrap(),
            Some(5)
        );
        assert_eq!(store.held_back(&id), None);
        assert_eq!((store.stats().gaps, store.stats().forced), (2, 1));
        // A later whole copy of v5 changes no attribute (v4's only change was overwritten
        // by v5), but tells this copy that it holds v4 now (a reader waiting for v4 goes on).
        let copy = SessionEvent::SessionData {
            session: Box::new(primary),
        };
        assert_eq!(store.apply(&copy, 4), Applied::Changed);
        assert_eq!(
            store.apply(&copy, 5),
            Applied::Stale,
            "nothing new the second time"
        );
    }

    #[test]
    fn held_back_deltas_are_bounded_and_go_with_their_session() {
        let id = SessionId::new("s");
        let mut primary = Session::new(id.clone(), 0, 60);
        let mut d = Vec::new();
        for n in 0..MAX_EARLY_DELTAS as u32 + 3 {
            primary.insert("count", &n).unwrap();
            d.push(primary.take_delta().unwrap());
        }
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // v2 is missing; the next MAX_EARLY_DELTAS wait ...
        for delta in &d[2..2 + MAX_EARLY_DELTAS] {
            assert_eq!(
                store.apply(&SessionEvent::Delta(delta.clone()), 2),
                Applied::Early
            );
        }
        assert_eq!(store.get(&id).unwrap().version(), 1);
        // ... and one more applies them all: v2 is not coming.
        let last = &d[2 + MAX_EARLY_DELTAS];
        assert_eq!(
            store.apply(&SessionEvent::Delta(last.clone()), 3),
            Applied::Behind
        );
        assert_eq!(store.get(&id).unwrap().version(), last.version);
        assert_eq!(store.held_back(&id), None);
        assert_eq!(store.stats().forced, MAX_EARLY_DELTAS as u64 + 1);
        // Invalidated with deltas waiting: they go too.
        let mut later = last.clone();
        later.version += 2;
        assert_eq!(store.apply(&SessionEvent::Delta(later), 4), Applied::Early);
        store.apply(&SessionEvent::Expired { id: id.clone() }, 5);
        assert_eq!(store.held_back(&id), None);
        assert!(store.get(&id).is_none());
    }

    #[test]
    fn an_overflowing_delta_older_than_the_held_back_ones_is_applied_in_order() {
        let id = SessionId::new("s");
        let mut primary = Session::new(id.clone(), 0, 60);
        let mut d = Vec::new();
        for n in 0..MAX_EARLY_DELTAS as u32 + 3 {
            // v3 is the only change to "x"
            let name = if n == 2 {
                "x".to_string()
            } else {
                format!("a{n}")
            };
            primary.insert(&name, &n).unwrap();
            d.push(primary.take_delta().unwrap());
        }
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // v2 missing; v4..v19 wait (16) ...
        for delta in &d[3..] {
            assert_eq!(
                store.apply(&SessionEvent::Delta(delta.clone()), 2),
                Applied::Early
            );
        }
        // ... then v3 arrives: it overflows the bound, but is older than all of them.
        store.apply(&SessionEvent::Delta(d[2].clone()), 3);
        let held = store.get(&id).unwrap();
        assert_eq!(held.version(), d.last().unwrap().version);
        assert_eq!(held.get::<u32>("x").unwrap(), Some(2), "v3 was dropped");
    }

    #[test]
    fn a_rename_onto_a_fetched_copy_does_not_leave_the_old_id_alive() {
        let (_, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        let old = SessionId::new("s");
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // The renamed session was fetched under its new id before the rename arrived.
        let mut fetched = Session::new(SessionId::new("t"), 0, 60);
        fetched.set_primary(false);
        store.apply(
            &SessionEvent::SessionData {
                session: Box::new(fetched),
            },
            2,
        );
        let ev = SessionEvent::ChangeSessionId {
            old: old.clone(),
            new: SessionId::new("t"),
        };
        store.apply(&ev, 3);
        assert!(
            store.get(&old).is_none(),
            "the pre-rename id still serves a session"
        );
        assert!(store.is_buried(&old));
        assert_eq!(store.len(), 1);
        // A request still naming the old id finds where it went.
        assert_eq!(store.follow(&old), Some(SessionId::new("t")));
    }

    #[test]
    fn a_creation_overtaken_by_its_invalidation_does_not_bring_a_ghost_back() {
        let id = SessionId::new("s");
        let mut store = SessionStore::default();
        // CREATED and EXPIRED travel on different connections; EXPIRED lands first.
        store.apply(&SessionEvent::Expired { id: id.clone() }, 2);
        let created = SessionEvent::Created {
            id: id.clone(),
            max_inactive_secs: 60,
        };
        assert_eq!(store.apply(&created, 1), Applied::Stale);
        assert!(store.get(&id).is_none());
    }

    #[test]
    fn a_delta_sent_under_the_old_id_before_a_new_one_was_given_is_kept() {
        let (_, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // A node logs the user in (s -> t) while another node's v2 under s is in flight.
        let t = SessionId::new("t");
        let login = SessionEvent::ChangeSessionId {
            old: SessionId::new("s"),
            new: t.clone(),
        };
        store.apply(&login, 2);
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[1].clone()), 3),
            Applied::Changed
        );
        let held = store.get(&t).unwrap();
        assert_eq!(
            (held.version(), held.get::<u32>("count").unwrap()),
            (2, Some(2))
        );
        // Told of the rename before holding the session: its late first change is refused.
        let mut other = SessionStore::default();
        assert_eq!(other.apply(&login, 2), Applied::Unknown);
        assert_eq!(
            other.apply(&SessionEvent::Delta(d[0].clone()), 3),
            Applied::Stale
        );
        assert!(other.is_empty());
    }

    /// Everything a store holds of session `id`, to compare copies.
    fn contents(store: &SessionStore, id: &SessionId) -> Vec<(String, Option<u32>)> {
        let s = store.get(id).unwrap();
        s.names()
            .map(|n| (n.to_string(), s.get::<u32>(n).unwrap()))
            .collect()
    }

    #[test]
    fn changes_made_at_once_on_two_nodes_end_the_same_everywhere() {
        let id = SessionId::new("s");
        let (_, base) = primary_with_deltas(1);
        let (mut a, mut b) = (SessionStore::default(), SessionStore::default());
        for st in [&mut a, &mut b] {
            st.apply(&SessionEvent::Delta(base[0].clone()), 1);
        }
        // Two parallel requests of one client, round robin: one on each node, both making
        // v2; both write "x", each also its own name.
        let write = |st: &mut SessionStore, mine: &str, x: u32, origin: u64| {
            let s = st.get_mut(&id).unwrap();
            s.insert("x", &x).unwrap();
            s.insert(mine, &1u32).unwrap();
            s.take_delta_from(origin).unwrap()
        };
        let da = write(&mut a, "from_a", 10, 1);
        let db = write(&mut b, "from_b", 20, 2);
        assert_eq!(da.version, db.version);
        assert_eq!(b.apply(&SessionEvent::Delta(da), 2), Applied::Changed);
        assert_eq!(a.apply(&SessionEvent::Delta(db), 2), Applied::Changed);
        assert_eq!(contents(&a, &id), contents(&b, &id));
        let held = a.get(&id).unwrap();
        assert_eq!(
            held.get::<u32>("x").unwrap(),
            Some(20),
            "the higher origin wins"
        );
        assert_eq!(held.get::<u32>("from_a").unwrap(), Some(1));
        assert_eq!(held.get::<u32>("from_b").unwrap(), Some(1));
    }

    #[test]
    fn concurrent_and_later_changes_arriving_in_any_order_end_the_same() {
        let id = SessionId::new("s");
        let (at_v1, base) = primary_with_deltas(1);
        // v2 made at once on nodes 1 and 2; v3 made on node 1 after its own v2 (removing
        // what node 2's v2 set, and setting "x" again).
        let mut on1 = at_v1.clone();
        on1.insert("x", &1u32).unwrap();
        on1.insert("one", &1u32).unwrap();
        let v2_1 = on1.take_delta_from(1).unwrap();
        let mut on2 = at_v1.clone();
        on2.insert("x", &2u32).unwrap();
        on2.insert("two", &2u32).unwrap();
        on2.remove("count");
        let v2_2 = on2.take_delta_from(2).unwrap();
        on1.insert("x", &3u32).unwrap();
        on1.insert("three", &3u32).unwrap();
        let v3_1 = on1.take_delta_from(1).unwrap();
        let deltas = [v2_1, v2_2, v3_1];
        let orders = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let mut results = Vec::new();
        for order in orders {
            let mut st = SessionStore::default();
            st.apply(&SessionEvent::Delta(base[0].clone()), 1);
            for k in order {
                st.apply(&SessionEvent::Delta(deltas[k].clone()), 2);
            }
            assert_eq!(st.held_back(&id), None, "{order:?}");
            assert_eq!(st.get(&id).unwrap().version(), 3, "{order:?}");
            results.push(contents(&st, &id));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:#?}");
        let expected: Vec<(String, Option<u32>)> = [("one", 1), ("three", 3), ("two", 2), ("x", 3)]
            .iter()
            .map(|(n, v)| (n.to_string(), Some(*v)))
            .collect();
        assert_eq!(
            results[0], expected,
            "node 2's removal of count (v2, origin 2) wins too"
        );
        // A whole copy from node 1 (which never saw node 2's v2) merged into any of them
        // changes nothing: it only has older or equal stamps.
        let mut st = SessionStore::default();
        st.apply(&SessionEvent::Delta(base[0].clone()), 1);
        for d in &deltas {
            st.apply(&SessionEvent::Delta(d.clone()), 2);
        }
        let copy = SessionEvent::SessionData {
            session: Box::new(on1),
        };
        assert_eq!(st.apply(&copy, 3), Applied::Stale);
        assert_eq!(contents(&st, &id), expected);
    }

    /// A full copy as it travels (the delta log of a running request is not sent).
    fn wire(s: &Session) -> Box<Session> {
        let bytes = rmp_serde::to_vec_named(&s.committed()).unwrap();
        Box::new(rmp_serde::from_slice(&bytes).unwrap())
    }

    /// Session `s` at v1 (`count` = 1, made on node 9).
    fn at_v1() -> (Session, Delta) {
        let mut s = Session::new(SessionId::new("s"), 0, 60);
        s.insert("count", &1u32).unwrap();
        let d = s.take_delta_from(9).unwrap();
        (s, d)
    }

    #[test]
    fn a_full_copy_carries_only_what_was_replicated() {
        let id = SessionId::new("s");
        let (v1, d1) = at_v1();
        // A request on A sets x = 1 and count = 99; C fetches the session meanwhile.
        let mut a = v1.clone();
        a.insert("x", &1u32).unwrap();
        a.insert("count", &99u32).unwrap();
        let mut c = SessionStore::default();
        c.apply(&SessionEvent::SessionData { session: wire(&a) }, 1);
        let held = c.get(&id).unwrap();
        assert_eq!(held.get::<u32>("x").unwrap(), None);
        assert_eq!(held.get::<u32>("count").unwrap(), Some(1));
        // A's request then sets x = 2 and finishes; B made v2 and v3 meanwhile.
        a.insert("x", &2u32).unwrap();
        let mut b = v1.clone();
        b.insert("y", &1u32).unwrap();
        let b2 = b.take_delta_from(2).unwrap();
        b.insert("y", &2u32).unwrap();
        let b3 = b.take_delta_from(2).unwrap();
        let a2 = a.take_delta_from(1).unwrap();
        let mut d = SessionStore::default();
        d.apply(&SessionEvent::Delta(d1), 1);
        for st in [&mut c, &mut d] {
            for x in [&b2, &b3, &a2] {
                st.apply(&SessionEvent::Delta(x.clone()), 2);
            }
        }
        assert_eq!(contents(&c, &id), contents(&d, &id));
        assert_eq!(c.get(&id).unwrap().get::<u32>("x").unwrap(), Some(2));
    }

    #[test]
    fn a_rename_an_identical_full_copy_brings_is_taken() {
        let (mut p, d1) = at_v1();
        let mut c = SessionStore::default();
        c.apply(&SessionEvent::Delta(d1), 1);
        p.rename(SessionId::new("s.n2"));
        let copy = SessionEvent::SessionData { session: wire(&p) };
        assert_eq!(c.apply(&copy, 2), Applied::Changed);
        assert!(c.get(&SessionId::new("s.n2")).is_some());
    }

    #[test]
    fn a_rename_onto_a_fetched_copy_keeps_a_running_request_s_changes() {
        let (s, t) = (SessionId::new("s"), SessionId::new("t"));
        let mut p = Session::new(s.clone(), 0, 60);
        p.insert("user", &1u32).unwrap();
        let d1 = p.take_delta_from(9).unwrap();
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(d1), 1);
        // A request here is changing s ...
        store.get_mut(&s).unwrap().insert("cart", &2u32).unwrap();
        // ... the user logged in elsewhere (s -> t); a parallel request with the new cookie
        // fetched t here before the rename arrived.
        let mut fetched = p.committed();
        fetched.rename(t.clone());
        store.apply(
            &SessionEvent::SessionData {
                session: Box::new(fetched),
            },
            2,
        );
        store.apply(
            &SessionEvent::ChangeSessionId {
                old: s.clone(),
                new: t.clone(),
            },
            3,
        );
        // The running request follows s to t; its write must still be there and go out.
        assert_eq!(store.follow(&s), Some(t.clone()));
        let held = store.get_mut(&t).unwrap();
        assert_eq!(
            held.get::<u32>("cart").unwrap(),
            Some(2),
            "the request's write is lost"
        );
    }

    #[test]
    fn the_state_for_a_joiner_carries_held_back_changes_and_burials() {
        let id = SessionId::new("s");
        let (_, d) = deltas_setting(&id, &["a", "b", "c"]);
        let mut donor = SessionStore::default();
        donor.apply(&SessionEvent::Delta(d[0].clone()), 1);
        // v3 waits for v2 on the donor; "gone" was invalidated there, "old" renamed.
        assert_eq!(
            donor.apply(&SessionEvent::Delta(d[2].clone()), 1),
            Applied::Early
        );
        donor.apply(
            &SessionEvent::Expired {
                id: SessionId::new("gone"),
            },
            1,
        );
        for n in 0..3 {
            let other = SessionId::new(format!("x{n}"));
            donor.apply(
                &SessionEvent::Delta(deltas_setting(&other, &["a"]).1[0].clone()),
                1,
            );
        }
        donor.rename(&SessionId::new("x0"), &SessionId::new("y0"), 1);
        // Batches of two: 4 sessions, 1 held-back change, 2 burials.
        let batches = donor.state_batches(2);
        assert_eq!(batches.len(), 2 + 1 + 1);
        let mut joiner = SessionStore::default();
        for b in &batches {
            joiner.apply(b, 2);
        }
        assert_eq!(joiner.held_back(&id), Some(3));
        assert!(joiner.is_buried(&SessionId::new("gone")));
        assert_eq!(
            joiner.follow(&SessionId::new("x0")),
            Some(SessionId::new("y0"))
        );
        // The late v2 reaches both (the joiner is a member now): both end at v3.
        for st in [&mut donor, &mut joiner] {
            st.apply(&SessionEvent::Delta(d[1].clone()), 3);
        }
        assert_eq!(contents(&donor, &id), contents(&joiner, &id));
        assert_eq!(joiner.get(&id).unwrap().version(), 3);
    }

    #[test]
    fn an_access_notice_for_another_node_s_change_of_the_same_version_reports_behind() {
        let id = SessionId::new("s");
        let (at_v1, base) = at_v1();
        let mut store = SessionStore::default();
        store.apply(&SessionEvent::Delta(base), 1);
        let mut on2 = at_v1.clone();
        on2.insert("two", &1u32).unwrap();
        store.apply(&SessionEvent::Delta(on2.take_delta_from(2).unwrap()), 2);
        let notice = |origin| SessionEvent::Accessed {
            id: id.clone(),
            at_ms: 3,
            version: 2,
            origin,
        };
        assert_eq!(store.apply(&notice(2), 3), Applied::Changed);
        // Node 1 made a v2 too, which this copy has not seen: ask for the session.
        assert_eq!(store.apply(&notice(1), 3), Applied::Behind);
    }

    #[test]
    fn first_delta_creates_the_copy_but_later_ones_for_unknown_sessions_do_not() {
        let (_, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[1].clone()), 2),
            Applied::Unknown
        );
        assert!(store.is_empty());
        assert_eq!(
            store.apply(&SessionEvent::Delta(d[0].clone()), 1),
            Applied::Changed
        );
        let id = SessionId::new("s");
        assert!(!store.get(&id).unwrap().is_primary());
        assert_eq!(
            store.get(&id).unwrap().max_inactive_secs(),
            1800,
            "the store's placeholder until CREATED comes"
        );
        // The CREATED that was overtaken brings the interval; the delta's data stays.
        let created = SessionEvent::Created {
            id: id.clone(),
            max_inactive_secs: 60,
        };
        assert_eq!(store.apply(&created, 0), Applied::Changed);
        let copy = store.get(&id).unwrap();
        assert_eq!(copy.max_inactive_secs(), 60);
        assert_eq!(copy.get::<u32>("count").unwrap(), Some(1));
        assert_eq!(copy.version(), 1);
        // A repeated CREATED changes nothing any more.
        store.apply(
            &SessionEvent::Created {
                id: id.clone(),
                max_inactive_secs: 5,
            },
            0,
        );
        assert_eq!(store.get(&id).unwrap().max_inactive_secs(), 60);
    }

    #[test]
    fn created_expired_accessed_and_renamed() {
        let mut store = SessionStore::default();
        let a = SessionId::new("a.n1");
        store.apply(
            &SessionEvent::Created {
                id: a.clone(),
                max_inactive_secs: 10,
            },
            1_000,
        );
        store.apply(
            &SessionEvent::Accessed {
                id: a.clone(),
                at_ms: 5_000,
                version: 0,
                origin: 0,
            },
            5_000,
        );
        assert_eq!(store.get(&a).unwrap().last_access_ms(), 5_000);
        let b = a.with_route("n2");
        store.apply(
            &SessionEvent::ChangeSessionId {
                old: a.clone(),
                new: b.clone(),
            },
            6_000,
        );
        assert!(store.get(&a).is_none());
        assert_eq!(store.get(&b).unwrap().id(), &b);
        // A copy expires after twice the interval since the last access.
        assert!(store.expire(24_000).is_empty());
        assert_eq!(store.expire(25_001), vec![b.clone()]);
        assert_eq!(
            store.apply(&SessionEvent::Expired { id: b }, 26_000),
            Applied::Unknown
        );
    }

    #[test]
    fn a_missed_rename_does_not_strand_the_copy() {
        // A node renamed s.n0 -> s.n1, told another node, and died before telling us; then
        // the survivor renamed it to s.n2 and sent a delta under that id.
        let (_, d) = primary_with_deltas(2);
        let mut store = SessionStore::default();
        let mut first = d[0].clone();
        first.session_id = SessionId::new("s.n0");
        store.apply(&SessionEvent::Delta(first), 1);
        let ev = SessionEvent::ChangeSessionId {
            old: SessionId::new("s.n1"),
            new: SessionId::new("s.n2"),
        };
        assert_eq!(store.apply(&ev, 2), Applied::Changed);
        let mut second = d[1].clone();
        second.session_id = SessionId::new("s.n2");
        assert_eq!(
            store.apply(&SessionEvent::Delta(second), 3),
            Applied::Changed
        );
        let s = store.get(&SessionId::new("s.n2")).unwrap();
        assert_eq!(s.get::<u32>("count").unwrap(), Some(2));
        assert_eq!(store.len(), 1);
        // An expiry under yet another route finds it too.
        assert_eq!(
            store.apply(
                &SessionEvent::Expired {
                    id: SessionId::new("s.n0")
                },
                4
            ),
            Applied::Changed
        );
        assert!(store.is_empty());
    }

    #[test]
    fn state_data_keeps_the_newer_copy() {
        let (mut newer, _) = primary_with_deltas(3);
        let mut store = SessionStore::default();
        store.insert(newer.clone());
        let (older, _) = primary_with_deltas(1);
        store.apply(
            &SessionEvent::AllSessionData {
                sessions: vec![older],
                held_back: vec![],
                buried: vec![],
            },
            0,
        );
        assert_eq!(store.get(newer.id()).unwrap().version(), 3);
        newer.insert("count", &9u32).unwrap();
        let _ = newer.take_delta();
        store.apply(
            &SessionEvent::AllSessionData {
                sessions: vec![newer.clone()],
                held_back: vec![],
                buried: vec![],
            },
            0,
        );
        assert_eq!(
            store.get(newer.id()).unwrap().get::<u32>("count").unwrap(),
            Some(9)
        );
        assert!(!store.get(newer.id()).unwrap().is_primary());
    }
}
