//! Property tests for the pure, socket-free core of `ha`: the message codec, the session
//! store (copies converge whatever order changes arrive in, versions never go back), the
//! state a joining node is built from, the state-transfer queue and expiry.

use std::collections::BTreeMap;

use bytes::Bytes;
use ha::{
    Action, Applied, Delta, Offer, Session, SessionEvent, SessionId, SessionMessage, SessionStore,
    StateTransfer,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

/// Moderate case counts (overridable with `PROPTEST_CASES` for a longer soak), and no
/// regression files written into the source tree.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Shared model
// ---------------------------------------------------------------------------------------------

/// The attribute names the generated requests write.
const NAMES: [&str; 3] = ["a", "b", "c"];
/// The interval every generated session is created with (its CREATED carries it).
const CREATED_SECS: i64 = 60;
/// The interval a store gives a copy made from a first delta until CREATED comes.
const PLACEHOLDER_SECS: i64 = 1800;

/// What a copy holds, as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    version: u64,
    attributes: BTreeMap<String, u32>,
    max_inactive_secs: i64,
    is_new: bool,
}

fn content(s: &Session) -> Content {
    Content {
        version: s.version(),
        attributes: s
            .names()
            .map(|n| (n.to_owned(), s.get::<u32>(n).unwrap().unwrap()))
            .collect(),
        max_inactive_secs: s.max_inactive_secs(),
        is_new: s.is_new(),
    }
}

/// The name an action is stamped under (the crate's reserved names stand apart from
/// attribute names here by their prefix).
fn key(a: &Action) -> String {
    match a {
        Action::SetAttribute { name, .. } | Action::RemoveAttribute { name } => {
            format!("attr:{name}")
        }
        Action::SetMaxInactive(_) => "interval".into(),
        Action::SetNew(_) => "new".into(),
        other => panic!("an action this test does not know: {other:?}"),
    }
}

/// The documented rule (README, "Nothing wrong"; `Session::stamps`): per name, the change
/// with the highest (version, origin) wins; the version is the highest one made.
fn last_writer_wins<'a>(deltas: impl IntoIterator<Item = &'a Delta>) -> Content {
    let mut winners: BTreeMap<String, ((u64, u64), &Action)> = BTreeMap::new();
    let mut version = 0;
    for d in deltas {
        version = version.max(d.version);
        let stamp = (d.version, d.origin);
        for a in &d.actions {
            let w = winners.entry(key(a)).or_insert((stamp, a));
            if stamp > w.0 {
                *w = (stamp, a);
            }
        }
    }
    let mut c = Content {
        version,
        attributes: BTreeMap::new(),
        max_inactive_secs: CREATED_SECS,
        is_new: true,
    };
    for (_, a) in winners.values() {
        match a {
            Action::SetAttribute { name, value } => {
                c.attributes
                    .insert(name.clone(), rmp_serde::from_slice(value).unwrap());
            }
            Action::RemoveAttribute { .. } => {}
            Action::SetMaxInactive(s) => c.max_inactive_secs = *s,
            Action::SetNew(n) => c.is_new = *n,
            other => panic!("an action this test does not know: {other:?}"),
        }
    }
    c
}

/// `event` as another node receives it: through the codec.
fn wire(event: SessionEvent) -> SessionEvent {
    let m = SessionMessage {
        context: "/".into(),
        timestamp_ms: 0,
        event,
    };
    SessionMessage::decode(&m.encode().unwrap()).unwrap().event
}

/// What a request does to a session.
#[derive(Debug, Clone)]
enum Op {
    Set(usize),
    Remove(usize),
    Interval(i64),
    Access,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NAMES.len()).prop_map(Op::Set),
        2 => (0..NAMES.len()).prop_map(Op::Remove),
        1 => prop_oneof![Just(0i64), Just(-1), 1i64..=3600].prop_map(Op::Interval),
        1 => Just(Op::Access),
    ]
}

/// Applies `op` as a request would; `value` is what a set writes (unique per step, so the
/// winner of two writes is visible), and also the access time.
fn perform(s: &mut Session, op: &Op, value: u32) {
    match op {
        Op::Set(k) => s.insert(NAMES[*k], &value).unwrap(),
        Op::Remove(k) => {
            s.remove(NAMES[*k]);
        }
        Op::Interval(secs) => s.set_max_inactive_secs(*secs),
        Op::Access => s.access(i64::from(value)),
    }
}

/// Messages in the order `keys` sorts them (stable; missing keys are 0, so shrinking goes
/// towards the order they were sent in), with `dups` delivered a second time.
fn reorder<T: Clone>(items: &[T], keys: &[u16], dups: &[Index]) -> Vec<T> {
    let mut picks: Vec<usize> = (0..items.len()).collect();
    if !items.is_empty() {
        picks.extend(dups.iter().map(|d| d.index(items.len())));
    }
    let mut keyed: Vec<(u16, usize, usize)> = picks
        .into_iter()
        .enumerate()
        .map(|(seq, i)| (keys.get(seq).copied().unwrap_or(0), seq, i))
        .collect();
    keyed.sort();
    keyed
        .into_iter()
        .map(|(_, _, i)| items[i].clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The message codec
// ---------------------------------------------------------------------------------------------

fn session_id() -> impl Strategy<Value = SessionId> {
    prop_oneof!["[a-f0-9]{1,8}(\\.[a-z0-9-]{1,6})?", "\\PC{0,10}",].prop_map(SessionId::new)
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        ("\\PC{0,8}", prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(name, v)| {
            Action::SetAttribute {
                name,
                value: Bytes::from(v),
            }
        }),
        "\\PC{0,8}".prop_map(|name| Action::RemoveAttribute { name }),
        any::<i64>().prop_map(Action::SetMaxInactive),
        any::<bool>().prop_map(Action::SetNew),
    ]
}

fn delta() -> impl Strategy<Value = Delta> {
    (
        session_id(),
        any::<u64>(),
        any::<i64>(),
        prop::collection::vec(action(), 0..4),
        any::<u64>(),
    )
        .prop_map(
            |(session_id, version, last_access_ms, actions, origin)| Delta {
                session_id,
                version,
                last_access_ms,
                actions,
                origin,
            },
        )
}

/// A session as it travels: made through the public API, nothing pending.
fn session() -> impl Strategy<Value = Session> {
    (
        session_id(),
        any::<i64>(),
        any::<i64>(),
        prop::collection::vec((op(), 1u64..4, any::<bool>()), 0..6),
        any::<bool>(),
    )
        .prop_map(|(id, created, secs, ops, primary)| {
            let mut s = Session::new(id, created, secs);
            for (i, (op, origin, commit)) in ops.iter().enumerate() {
                perform(&mut s, op, i as u32);
                if *commit {
                    let _ = s.take_delta_from(*origin);
                }
            }
            let _ = s.take_delta_from(9);
            s.set_primary(primary);
            s
        })
}

fn event() -> impl Strategy<Value = SessionEvent> {
    prop_oneof![
        (session_id(), any::<i64>()).prop_map(|(id, max_inactive_secs)| {
            SessionEvent::Created {
                id,
                max_inactive_secs,
            }
        }),
        session_id().prop_map(|id| SessionEvent::Expired { id }),
        (session_id(), any::<i64>(), any::<u64>(), any::<u64>()).prop_map(
            |(id, at_ms, version, origin)| SessionEvent::Accessed {
                id,
                at_ms,
                version,
                origin
            }
        ),
        Just(SessionEvent::GetAllSessions),
        (
            prop::collection::vec(session(), 0..3),
            prop::collection::vec(delta(), 0..3),
            prop::collection::vec((session_id(), prop::option::of(session_id())), 0..3),
        )
            .prop_map(
                |(sessions, held_back, buried)| SessionEvent::AllSessionData {
                    sessions,
                    held_back,
                    buried
                }
            ),
        delta().prop_map(SessionEvent::Delta),
        any::<i64>().prop_map(|snapshot_ms| SessionEvent::TransferComplete { snapshot_ms }),
        (session_id(), session_id())
            .prop_map(|(old, new)| SessionEvent::ChangeSessionId { old, new }),
        Just(SessionEvent::NoContextManager),
        session_id().prop_map(|id| SessionEvent::GetSession { id }),
        session().prop_map(|s| SessionEvent::SessionData {
            session: Box::new(s)
        }),
        Just(SessionEvent::StateNotReady),
    ]
}

fn message() -> impl Strategy<Value = SessionMessage> {
    ("\\PC{0,12}", any::<i64>(), event()).prop_map(|(context, timestamp_ms, event)| {
        SessionMessage {
            context,
            timestamp_ms,
            event,
        }
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_message_round_trips_through_the_codec(m in message()) {
        let bytes = m.encode().unwrap();
        prop_assert_eq!(SessionMessage::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(m) = SessionMessage::decode(&bytes) {
            // Whatever decodes encodes again.
            m.encode().unwrap();
        }
    }

    /// Damaged real messages reach deeper into the decoder than random bytes do.
    #[test]
    fn damaged_messages_decode_to_an_error_not_a_panic(
        m in message(),
        cut in any::<Index>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
    ) {
        let bytes = m.encode().unwrap();
        // Cut short: always an error (the message's own lengths say more is to come).
        prop_assert!(SessionMessage::decode(&bytes[..cut.index(bytes.len())]).is_err());
        let mut bytes = bytes;
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let _ = SessionMessage::decode(&bytes);
        bytes.truncate(cut.index(bytes.len()));
        let _ = SessionMessage::decode(&bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// 2./3. Convergence: nodes writing at once, copies receiving in any order
// ---------------------------------------------------------------------------------------------

/// One step of a cluster's history for session `s`.
#[derive(Debug, Clone)]
enum Step {
    /// A request on a node changes its copy (pending until committed).
    Write(usize, Op),
    /// The node's request ends: its changes go out as a delta with the next version.
    Commit(usize),
    /// The node receives one of the messages sent so far (any order, duplicates).
    Deliver(usize, Index),
    /// The node sends a whole copy (a fetch answer or state transfer).
    Snapshot(usize),
}

fn step(nodes: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..nodes, op()).prop_map(|(n, o)| Step::Write(n, o)),
        3 => (0..nodes).prop_map(Step::Commit),
        4 => (0..nodes, any::<Index>()).prop_map(|(n, i)| Step::Deliver(n, i)),
        1 => (0..nodes).prop_map(Step::Snapshot),
    ]
}

fn sid() -> SessionId {
    SessionId::new("s")
}

fn created() -> SessionEvent {
    SessionEvent::Created {
        id: sid(),
        max_inactive_secs: CREATED_SECS,
    }
}

/// Node `n`'s id as a delta's origin (never 0, "not known").
fn origin(n: usize) -> u64 {
    n as u64 + 1
}

/// A cluster's history: every message sent (the first delta first), and the deltas alone.
struct History {
    messages: Vec<SessionEvent>,
    deltas: Vec<Delta>,
    nodes: Vec<SessionStore>,
}

fn simulate(nodes: usize, steps: &[Step]) -> History {
    let id = sid();
    let mut primary = Session::new(id.clone(), 0, CREATED_SECS);
    primary.insert("a", &0u32).unwrap();
    let base = primary.take_delta_from(origin(0)).unwrap();
    let mut stores: Vec<SessionStore> = (0..nodes)
        .map(|_| {
            let mut st = SessionStore::new(PLACEHOLDER_SECS);
            st.apply(&created(), 0);
            st.apply(&SessionEvent::Delta(base.clone()), 0);
            st
        })
        .collect();
    let mut messages = vec![SessionEvent::Delta(base.clone())];
    let mut deltas = vec![base];
    // As `DeltaManager::request_completed`: changes held back for a version that has not
    // come go in first, so the request's change goes out above every version known.
    let commit = |st: &mut SessionStore, n: usize, messages: &mut Vec<_>, deltas: &mut Vec<_>| {
        st.settle(&sid());
        if let Some(d) = st.get_mut(&sid()).unwrap().take_delta_from(origin(n)) {
            messages.push(SessionEvent::Delta(d.clone()));
            deltas.push(d);
        }
    };
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Write(n, op) => perform(stores[*n].get_mut(&id).unwrap(), op, i as u32 + 1),
            Step::Commit(n) => commit(&mut stores[*n], *n, &mut messages, &mut deltas),
            Step::Deliver(n, pick) => {
                let m = messages[pick.index(messages.len())].clone();
                stores[*n].apply(&m, 0);
            }
            Step::Snapshot(n) => {
                let copy = stores[*n].get(&id).unwrap().committed();
                messages.push(wire(SessionEvent::SessionData {
                    session: Box::new(copy),
                }));
            }
        }
    }
    for (n, st) in stores.iter_mut().enumerate() {
        commit(st, n, &mut messages, &mut deltas);
    }
    History {
        messages,
        deltas,
        nodes: stores,
    }
}

/// A fresh node receiving `messages` (the first delta first), with CREATED first or at
/// `created_at` after the first delta.
fn observe(
    messages: &[SessionEvent],
    created_first: bool,
    created_at: Index,
) -> (SessionStore, Vec<Applied>) {
    let mut ordered: Vec<SessionEvent> = messages.to_vec();
    let at = if created_first {
        0
    } else {
        1 + created_at.index(ordered.len())
    };
    ordered.insert(at, created());
    let mut st = SessionStore::new(PLACEHOLDER_SECS);
    let results = ordered.iter().map(|m| st.apply(m, 0)).collect();
    (st, results)
}

/// The messages in a delivery order: the first delta first (a later one for a session a
/// node does not hold is documented as unknown: the manager fetches the session), then the
/// others in the order `keys` gives, `dups` twice.
fn delivery(h: &History, keys: &[u16], dups: &[Index]) -> Vec<SessionEvent> {
    let mut out = vec![h.messages[0].clone()];
    out.extend(reorder(&h.messages[1..], keys, dups));
    out
}

fn history() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (2usize..=3).prop_flat_map(|n| (Just(n), prop::collection::vec(step(n), 0..40)))
}

proptest! {
    #![proptest_config(config(256))]

    /// Every copy that got every message holds the same thing, whatever the order: per name
    /// the change with the highest (version, origin), the highest version, nothing held back,
    /// and every change counted as held (what read-your-writes waits for).
    #[test]
    fn copies_converge_to_the_last_writer_per_name_whatever_the_order(
        (nodes, steps) in history(),
        keys_a in prop::collection::vec(any::<u16>(), 0..80),
        keys_b in prop::collection::vec(any::<u16>(), 0..80),
        dups in prop::collection::vec(any::<Index>(), 0..6),
        created_first in any::<bool>(),
        created_at in any::<Index>(),
    ) {
        let h = simulate(nodes, &steps);
        let expected = last_writer_wins(&h.deltas);
        let id = sid();
        let mut copies = Vec::new();
        for keys in [&keys_a, &keys_b] {
            let (st, _) = observe(&delivery(&h, keys, &dups), created_first, created_at);
            prop_assert_eq!(st.held_back(&id), None);
            let s = st.get(&id).unwrap();
            prop_assert_eq!(&content(s), &expected);
            for d in &h.deltas {
                prop_assert!(s.holds(d.version, d.origin), "v{} from {} not held", d.version, d.origin);
            }
            copies.push(s.last_access_ms());
        }
        prop_assert_eq!(copies[0], copies[1]);
        // The writers themselves, once they got everything, too.
        for mut node in h.nodes {
            for m in &h.messages {
                node.apply(m, 0);
            }
            prop_assert_eq!(node.held_back(&id), None);
            prop_assert_eq!(&content(node.get(&id).unwrap()), &expected);
        }
    }

    /// Deltas only, a subset of them, in any order, with duplicates: the version never goes
    /// back, a duplicate of a delta already applied is dropped as stale (and counted), the
    /// counters add up, and once held-back deltas are settled the copy holds exactly the
    /// last writer per name of what it got, and says it holds exactly those changes.
    #[test]
    fn versions_never_go_back_and_a_copy_holds_exactly_what_it_got(
        (nodes, steps) in history(),
        keep in prop::collection::vec(any::<bool>(), 0..40),
        keys in prop::collection::vec(any::<u16>(), 0..80),
        dups in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let h = simulate(nodes, &steps);
        let id = sid();
        let got: Vec<Delta> = std::iter::once(h.deltas[0].clone())
            .chain(h.deltas[1..].iter().enumerate()
                .filter(|(i, _)| keep.get(*i).copied().unwrap_or(true))
                .map(|(_, d)| d.clone()))
            .collect();
        let mut order = vec![got[0].clone()];
        order.extend(reorder(&got[1..], &keys, &dups));
        let mut st = SessionStore::new(PLACEHOLDER_SECS);
        st.apply(&created(), 0);
        let mut version = 0;
        let mut delivered: Vec<(u64, u64)> = Vec::new();
        let (mut stale, mut changed) = (0, 0);
        for d in &order {
            let before = content(st.get(&id).unwrap());
            let r = st.apply(&SessionEvent::Delta(d.clone()), 0);
            let after = st.get(&id).unwrap();
            prop_assert!(after.version() >= version, "v{} after v{version}", after.version());
            version = after.version();
            // Applied, or held back: either way a second copy changes nothing.
            if delivered.contains(&(d.version, d.origin)) {
                prop_assert_eq!(&r, &Applied::Stale, "a duplicate of v{} from {}", d.version, d.origin);
                prop_assert_eq!(&content(after), &before);
            }
            delivered.push((d.version, d.origin));
            match r {
                Applied::Stale => stale += 1,
                Applied::Changed | Applied::Behind => changed += 1,
                Applied::Early => {}
                other => prop_assert!(false, "{other:?} for a held session"),
            }
        }
        prop_assert_eq!(st.stats().stale, stale);
        prop_assert_eq!(st.stats().applied, changed + 1, "the CREATED counts too");
        st.settle(&id);
        prop_assert_eq!(st.held_back(&id), None);
        let s = st.get(&id).unwrap();
        prop_assert_eq!(content(s), last_writer_wins(&got));
        if h.deltas.len() <= 16 {
            for d in &h.deltas {
                let has = got.iter().any(|g| (g.version, g.origin) == (d.version, d.origin));
                prop_assert_eq!(s.holds(d.version, d.origin), has, "v{} from {}", d.version, d.origin);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4./5. The state for a joining node, and a join through the state-transfer queue
// ---------------------------------------------------------------------------------------------

/// Sessions of the join scenario.
const SESSIONS: usize = 3;

fn session_name(k: usize) -> SessionId {
    SessionId::new(format!("s{k}"))
}

/// What happens to one of the [`SESSIONS`] on its primary: a request (committed at once), or
/// an invalidation (`None`).
type Plan = Vec<(usize, Option<Op>)>;

fn plan() -> impl Strategy<Value = Plan> {
    prop::collection::vec(
        (
            0..SESSIONS,
            prop_oneof![8 => op().prop_map(Some), 1 => Just(None)],
        ),
        0..40,
    )
}

/// The messages the primaries send for `plan`, in order; each session's CREATED goes right
/// after its first delta when `late[k]` (it travelled on another connection and was
/// overtaken). Also returns, per message, its session and whether it creates the copy (the
/// CREATED or the first delta).
fn primaries(plan: &Plan, late: &[bool]) -> Vec<(SessionEvent, usize, bool)> {
    let mut out = Vec::new();
    let mut held: Vec<Option<Session>> = vec![None; SESSIONS];
    let mut started = [false; SESSIONS];
    let mut created_sent = [false; SESSIONS];
    for (i, (k, op)) in plan.iter().enumerate() {
        let k = *k;
        let id = session_name(k);
        match op {
            Some(op) => {
                if !started[k] {
                    started[k] = true;
                    held[k] = Some(Session::new(id.clone(), 0, CREATED_SECS));
                    if !late[k] {
                        out.push((created_of(&id), k, true));
                        created_sent[k] = true;
                    }
                }
                let Some(s) = held[k].as_mut() else { continue };
                perform(s, op, i as u32 + 1);
                if let Some(d) = s.take_delta_from(origin(k)) {
                    let first = d.version == 1;
                    out.push((SessionEvent::Delta(d), k, first));
                    if !created_sent[k] {
                        out.push((created_of(&id), k, true));
                        created_sent[k] = true;
                    }
                }
            }
            None => {
                if held[k].take().is_some() {
                    out.push((SessionEvent::Expired { id }, k, false));
                }
            }
        }
    }
    out
}

fn created_of(id: &SessionId) -> SessionEvent {
    SessionEvent::Created {
        id: id.clone(),
        max_inactive_secs: CREATED_SECS,
    }
}

/// The primaries' messages in a delivery order (`keys`, `dups` twice), except that what
/// creates a copy (CREATED, first delta) still comes before the rest of its session's
/// messages: a later delta for a session a node does not hold is documented as unknown
/// (the manager fetches the session instead).
fn arrival(
    sent: &[(SessionEvent, usize, bool)],
    keys: &[u16],
    dups: &[Index],
) -> Vec<SessionEvent> {
    let mut order = reorder(sent, keys, dups);
    for k in 0..SESSIONS {
        let Some(first) = order.iter().position(|(_, s, _)| *s == k) else {
            continue;
        };
        let creating: Vec<_> = sent
            .iter()
            .filter(|(_, s, c)| *s == k && *c)
            .cloned()
            .collect();
        let mut rest = Vec::new();
        let mut removed = 0;
        for (i, m) in order.into_iter().enumerate() {
            if m.1 == k && m.2 && removed < creating.len() && i >= first {
                removed += 1;
                continue;
            }
            rest.push(m);
        }
        order = rest;
        let at = first.min(order.len());
        order.splice(at..at, creating.iter().take(removed).cloned());
    }
    order.into_iter().map(|(e, _, _)| e).collect()
}

/// Everything the test can see of session `k` in a store.
fn seen(st: &SessionStore, k: usize) -> (Option<Content>, Option<u64>, bool) {
    let id = session_name(k);
    (
        st.get_by_base(id.base()).map(content),
        st.held_back(&id),
        st.is_buried(&id),
    )
}

proptest! {
    #![proptest_config(config(256))]

    /// A donor's state comes in batches of at most `batch` items each; a node built from
    /// them (applied to an empty store) holds the same sessions, held-back changes and
    /// burials.
    #[test]
    fn a_store_rebuilt_from_state_batches_holds_the_same(
        plan in plan(),
        late in prop::collection::vec(any::<bool>(), SESSIONS),
        keys in prop::collection::vec(any::<u16>(), 0..60),
        dups in prop::collection::vec(any::<Index>(), 0..4),
        batch in 0usize..5,
        through_wire in any::<bool>(),
    ) {
        let mut donor = SessionStore::new(PLACEHOLDER_SECS);
        for e in arrival(&primaries(&plan, &late), &keys, &dups) {
            donor.apply(&e, 0);
        }
        let batches = donor.state_batches(batch);
        let (mut sessions, mut burials) = (0, 0);
        let mut joiner = SessionStore::new(PLACEHOLDER_SECS);
        for b in batches {
            let SessionEvent::AllSessionData { sessions: s, held_back: h, buried: d } = &b else {
                panic!("not state data: {b:?}");
            };
            let sizes = [s.len(), h.len(), d.len()];
            prop_assert_eq!(sizes.iter().filter(|n| **n > 0).count(), 1, "{:?}", sizes);
            prop_assert!(sizes.iter().all(|n| *n <= batch.max(1)), "{:?} for {}", sizes, batch);
            sessions += s.len();
            burials += d.len();
            let b = if through_wire { wire(b) } else { b };
            prop_assert_eq!(joiner.apply(&b, 0), Applied::Changed);
        }
        prop_assert_eq!(sessions, donor.len());
        prop_assert_eq!(burials, (0..SESSIONS).filter(|k| donor.is_buried(&session_name(*k))).count());
        prop_assert_eq!(joiner.len(), donor.len());
        for k in 0..SESSIONS {
            prop_assert_eq!(seen(&joiner, k), seen(&donor, k), "session {}", k);
        }
    }

    /// A node joins while messages fly (see [`join`]); the state as the store hands it over.
    #[test]
    fn a_joiner_ends_with_what_its_donor_ends_with(j in joining(any::<bool>())) {
        join(&j, false)?;
    }

    /// [`join`] with the state through the codec, as it travels, each CREATED sent first.
    #[test]
    fn a_joiner_ends_with_what_its_donor_ends_with_over_the_wire(j in joining(Just(false))) {
        join(&j, true)?;
    }

    /// [`join`] with the state through the codec, a CREATED overtaken by its first delta.
    #[test]
    fn a_joiner_ends_with_what_its_donor_ends_with_over_the_wire_with_late_created(
        j in joining(any::<bool>()),
    ) {
        join(&j, true)?;
    }
}

/// The inputs of [`join`].
#[derive(Debug, Clone)]
struct Joining {
    plan: Plan,
    late: Vec<bool>,
    keys: Vec<u16>,
    dups: Vec<Index>,
    snapshot_at: Index,
    joined_at: Index,
    queued: Index,
    interleave: Vec<bool>,
    batch: usize,
}

fn joining(late: impl Strategy<Value = bool>) -> impl Strategy<Value = Joining> {
    (
        (
            plan(),
            prop::collection::vec(late, SESSIONS),
            prop::collection::vec(any::<u16>(), 0..60),
            prop::collection::vec(any::<Index>(), 0..4),
        ),
        (
            any::<Index>(),
            any::<Index>(),
            any::<Index>(),
            prop::collection::vec(any::<bool>(), 0..40),
            1usize..4,
        ),
    )
        .prop_map(
            |((plan, late, keys, dups), (snapshot_at, joined_at, queued, interleave, batch))| {
                Joining {
                    plan,
                    late,
                    keys,
                    dups,
                    snapshot_at,
                    joined_at,
                    queued,
                    interleave,
                    batch,
                }
            },
        )
}

/// A node joins while messages fly: those that reach it during the transfer wait in the
/// queue and are replayed after the state, as are the ones the donor's snapshot already
/// held (sent before it, delivered to the joiner too). It ends with what the donor ends
/// with once the donor got the rest too.
fn join(j: &Joining, through_wire: bool) -> Result<(), TestCaseError> {
    let Joining {
        plan,
        late,
        keys,
        dups,
        snapshot_at,
        joined_at,
        queued,
        interleave,
        batch,
    } = j;
    let batch = *batch;
    let order = arrival(&primaries(plan, late), keys, dups);
    // The donor snapshots after `p` messages; the joiner gets everything from `q <= p` on
    // (it joined before the donor snapshotted), the first `r` of those during the transfer.
    let p = snapshot_at.index(order.len() + 1);
    let q = joined_at.index(p + 1);
    let r = queued.index(order.len() - q + 1);
    let mut donor = SessionStore::new(PLACEHOLDER_SECS);
    for e in &order[..p] {
        donor.apply(e, 0);
    }
    let msg = |event: SessionEvent| SessionMessage {
        context: "/".into(),
        timestamp_ms: 0,
        event,
    };
    let mut batches: Vec<SessionMessage> = donor
        .state_batches(batch)
        .into_iter()
        .map(|b| msg(if through_wire { wire(b) } else { b }))
        .collect();
    batches.push(msg(SessionEvent::TransferComplete { snapshot_ms: 0 }));
    let mut during: Vec<SessionMessage> = order[q..q + r].iter().cloned().map(msg).collect();
    let mut joiner = SessionStore::new(PLACEHOLDER_SECS);
    let mut transfer = StateTransfer::new(0, 60_000, 1024);
    let mut i = 0;
    while !batches.is_empty() {
        let next = if during.is_empty() || interleave.get(i).copied().unwrap_or(true) {
            batches.remove(0)
        } else {
            during.remove(0)
        };
        i += 1;
        match transfer.offer(next) {
            Offer::Apply(m) => {
                joiner.apply(&m.event, 0);
            }
            Offer::Queued => {}
            other => prop_assert!(false, "{other:?}"),
        }
    }
    prop_assert!(transfer.is_complete());
    // Replay what was queued, then what came after the transfer.
    for m in transfer.finish().into_iter().chain(during) {
        joiner.apply(&m.event, 0);
    }
    for e in &order[q + r..] {
        joiner.apply(e, 0);
    }
    for e in &order[p..] {
        donor.apply(e, 0);
    }
    prop_assert_eq!(joiner.len(), donor.len());
    for k in 0..SESSIONS {
        prop_assert_eq!(seen(&joiner, k), seen(&donor, k), "session {}", k);
    }
    Ok(())
}

/// What [`StateTransfer::offer`] documents for an event: applied at once (and whether it
/// completes the transfer / says the asked member is not ready), or queued.
fn offered_at_once(e: &SessionEvent) -> Option<(bool, bool)> {
    match e {
        SessionEvent::AllSessionData { .. }
        | SessionEvent::GetAllSessions
        | SessionEvent::GetSession { .. }
        | SessionEvent::SessionData { .. } => Some((false, false)),
        SessionEvent::TransferComplete { .. } | SessionEvent::NoContextManager => {
            Some((true, false))
        }
        SessionEvent::StateNotReady => Some((false, true)),
        _ => None,
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// The queue against a model: state data, end markers and requests are applied at once;
    /// session events are queued up to `max_queue`, then dropped and counted; `finish`
    /// returns every queued one in arrival order, whatever its timestamp (the module docs:
    /// none is dropped by its time); "not ready" is told once; the deadline is
    /// `requested + timeout`.
    #[test]
    fn the_transfer_queue_follows_its_model(
        requested in any::<i64>(),
        timeout in any::<i64>(),
        max_queue in 0usize..5,
        offers in prop::collection::vec((any::<i64>(), event()), 0..12),
        now in any::<i64>(),
    ) {
        let mut t = StateTransfer::new(requested, timeout, max_queue);
        let (mut queued, mut dropped, mut complete, mut not_ready) = (Vec::new(), 0, false, false);
        for (ts, event) in offers {
            let m = SessionMessage { context: "/".into(), timestamp_ms: ts, event };
            let got = t.offer(m.clone());
            match offered_at_once(&m.event) {
                Some((completes, not)) => {
                    prop_assert_eq!(got, Offer::Apply(m));
                    complete |= completes;
                    not_ready |= not;
                }
                None if queued.len() < max_queue => {
                    prop_assert_eq!(got, Offer::Queued);
                    queued.push(m);
                }
                None => {
                    prop_assert_eq!(got, Offer::Dropped);
                    dropped += 1;
                }
            }
            prop_assert_eq!(t.is_complete(), complete);
        }
        prop_assert_eq!(t.dropped(), dropped);
        prop_assert_eq!(t.take_not_ready(), not_ready);
        prop_assert!(!t.take_not_ready(), "told once");
        let deadline = requested.saturating_add(timeout);
        prop_assert_eq!(t.timed_out(now), !complete && now >= deadline);
        prop_assert_eq!(t.finish(), queued);
        prop_assert_eq!(t.finish(), Vec::new());
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Expiry
// ---------------------------------------------------------------------------------------------

/// The documented rule: zero or less never; a primary after its interval since the last
/// access, a copy after twice that (exact arithmetic, for times that do not overflow).
fn expired_by_the_rule(secs: i64, last_access_ms: i64, primary: bool, now_ms: i64) -> bool {
    let factor = if primary { 1 } else { 2 };
    secs > 0 && i128::from(now_ms) - i128::from(last_access_ms) > i128::from(secs) * 1000 * factor
}

/// Times of a realistic range, and intervals about them (around the edges too).
fn moment() -> impl Strategy<Value = i64> {
    -1_000_000_000_000i64..4_000_000_000_000
}

fn interval() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        i64::MIN..0,
        1i64..100,
        1i64..1_000_000_000
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn a_session_expires_exactly_by_the_rule(
        created in moment(),
        accessed in prop::option::of(0i64..10_000_000_000),
        secs in interval(),
        primary in any::<bool>(),
        after in prop_oneof![-10i64..10, 0i64..3_000_000_000_000],
        edge in any::<bool>(),
    ) {
        let mut s = Session::new(SessionId::new("x"), created, secs);
        if let Some(a) = accessed {
            s.access(created + a);
        }
        s.set_primary(primary);
        let last = s.last_access_ms();
        // Right at the boundary half the time.
        let now = if edge && secs > 0 {
            last + secs * 1000 * if primary { 1 } else { 2 } + after.clamp(-2, 2)
        } else {
            last + after
        };
        prop_assert_eq!(s.is_expired(now), expired_by_the_rule(secs, last, primary, now));
    }

    /// Any times and intervals at all: no panic, no wrap into an instant expiry (once
    /// expired, a session stays expired later on), and zero or less never expires.
    #[test]
    fn expiry_is_monotone_and_never_panics(
        created in any::<i64>(),
        secs in any::<i64>(),
        primary in any::<bool>(),
        now in any::<i64>(),
        later in any::<u64>(),
    ) {
        let mut s = Session::new(SessionId::new("x"), created, secs);
        s.set_primary(primary);
        let then = now.saturating_add_unsigned(later);
        if s.is_expired(now) {
            prop_assert!(s.is_expired(then), "expired at {now}, not at {then}");
        }
        if secs <= 0 {
            prop_assert!(!s.is_expired(now));
        }
        let _ = s.clone().committed().is_expired(now);
    }

    /// `SessionStore::expire` removes exactly the sessions expired at that time, buries them
    /// and counts them. A copy made from a first delta uses the store's placeholder interval
    /// until its CREATED brings the session's own.
    #[test]
    fn the_store_expires_exactly_the_expired_sessions(
        locals in prop::collection::vec((interval(), moment(), any::<bool>()), 0..5),
        copies in prop::collection::vec(
            (1i64..5_000, moment(), moment(), prop::option::of(1i64..5_000)), 0..5),
        placeholder in prop_oneof![Just(0i64), 1i64..5_000],
        now in moment(),
    ) {
        let mut st = SessionStore::new(placeholder);
        let mut expected = Vec::new();
        for (i, (secs, at, primary)) in locals.iter().enumerate() {
            let mut s = Session::new(SessionId::new(format!("l{i}")), *at, *secs);
            s.set_primary(*primary);
            if expired_by_the_rule(*secs, *at, *primary, now) {
                expected.push(s.id().clone());
            }
            st.insert(s);
        }
        for (i, (secs, received, last_access, created)) in copies.iter().enumerate() {
            // A first delta (made at `last_access` on its primary) arrives at `received`,
            // and maybe its CREATED, with the session's interval.
            let id = SessionId::new(format!("c{i}"));
            let mut p = Session::new(id.clone(), *last_access, *secs);
            p.insert("a", &1u32).unwrap();
            let d = p.take_delta_from(1).unwrap();
            prop_assert_eq!(st.apply(&SessionEvent::Delta(d), *received), Applied::Changed);
            let interval = match created {
                Some(c) => {
                    st.apply(&SessionEvent::Created { id: id.clone(), max_inactive_secs: *c }, *received);
                    *c
                }
                None => placeholder,
            };
            let copy = st.get(&id).unwrap();
            prop_assert_eq!(copy.max_inactive_secs(), interval);
            prop_assert_eq!(copy.last_access_ms(), (*received).max(*last_access));
            if expired_by_the_rule(interval, (*received).max(*last_access), false, now) {
                expected.push(id);
            }
        }
        let before = st.len();
        let mut gone = st.expire(now);
        gone.sort();
        expected.sort();
        prop_assert_eq!(&gone, &expected);
        prop_assert_eq!(st.len(), before - gone.len());
        prop_assert_eq!(st.stats().expired, gone.len() as u64);
        for id in &gone {
            prop_assert!(st.get(id).is_none() && st.is_buried(id));
        }
        prop_assert!(st.iter().all(|s| !s.is_expired(now)));
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal reproductions of what the properties found
// ---------------------------------------------------------------------------------------------

/// Shrunk from `a_joiner_ends_with_what_its_donor_ends_with_over_the_wire_with_late_created`
/// (a regression test). The donor holds a copy made from the session's first delta, its
/// CREATED (interval 60) still on its way; a node joins and gets the donor's state; then the
/// CREATED reaches both, and both take the interval 60. The joiner used to keep the
/// placeholder (1800) for good, as the copy's "waiting for CREATED" flag did not travel.
#[test]
fn a_late_created_sets_the_interval_of_a_copy_that_came_by_state_transfer() {
    let id = SessionId::new("s");
    let mut primary = Session::new(id.clone(), 0, CREATED_SECS);
    primary.insert("a", &1u32).unwrap();
    let first = primary.take_delta_from(1).unwrap();
    let mut donor = SessionStore::new(PLACEHOLDER_SECS);
    donor.apply(&SessionEvent::Delta(first), 0);
    let mut joiner = SessionStore::new(PLACEHOLDER_SECS);
    for b in donor.state_batches(10) {
        joiner.apply(&wire(b), 0);
    }
    for st in [&mut donor, &mut joiner] {
        st.apply(&created_of(&id), 0);
    }
    assert_eq!(donor.get(&id).unwrap().max_inactive_secs(), CREATED_SECS);
    assert_eq!(
        joiner.get(&id).unwrap().max_inactive_secs(),
        CREATED_SECS,
        "the joiner's copy kept the placeholder interval"
    );
}
