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
    keyed.into_iter().map(|(_, _, i)| items[i].clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The message codec
// ---------------------------------------------------------------------------------------------

fn session_id() -> impl Strategy<Value = SessionId> {
    prop_oneof![
        "[a-f0-9]{1,8}(\\.[a-z0-9-]{1,6})?",
        "\\PC{0,10}",
    ]
    .prop_map(SessionId::new)
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
            .prop_map(|(sessions, held_back, buried)| SessionEvent::AllSessionData {
                sessions,
                held_back,
                buried
            }),
        delta().prop_map(SessionEvent::Delta),
        any::<i64>().prop_map(|snapshot_ms| SessionEvent::TransferComplete { snapshot_ms }),
        (session_id(), session_id()).prop_map(|(old, new)| SessionEvent::ChangeSessionId {
            old,
            new
        }),
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
    fn arbitrary_bytes_decode_to_an_error_not_a_panic(
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
        let mut bytes = m.encode().unwrap();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let _ = SessionMessage::decode(&bytes);
        bytes.truncate(cut.index(bytes.len()));
        prop_assert!(SessionMessage::decode(&bytes).is_err() || bytes.is_empty());
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
    let commit = |st: &mut SessionStore, n: usize, messages: &mut Vec<_>, deltas: &mut Vec<_>| {
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
