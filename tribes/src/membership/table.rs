//! The membership table: beacons in, member events out. Pure: no sockets, no clock (time is
//! a parameter), so join, refresh, expiry, shutdown and restart are tested without a network.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::member::{Member, MemberKey};
use crate::wire::{decode_member, WireError, MEMBER_BEGIN};

/// What a beacon or an expiry pass changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemberEvent {
    /// A member was heard from for the first time.
    Added(Member),
    /// A member left: its shutdown beacon, a restart under a new unique id at the same
    /// address, or silence longer than the drop time (`expired` is then true).
    Disappeared {
        /// The member as last heard.
        member: Member,
        /// True when it was dropped for silence rather than announced.
        expired: bool,
    },
}

struct Entry {
    member: Member,
    last_heard: Instant,
}

/// Members heard through beacons, ordered oldest first (largest alive time), as Tribes
/// `Membership` orders them.
///
/// ```
/// use std::time::{Duration, Instant};
/// use tribes::membership::{MemberEvent, MembershipTable};
/// use tribes::{wire, Member};
///
/// let me = Member::new("127.0.0.1:4000".parse().unwrap());
/// let peer = Member::new("127.0.0.1:4001".parse().unwrap());
/// let mut table = MembershipTable::new(me.key(), Duration::from_secs(3));
/// let t0 = Instant::now();
/// let events = table.handle_beacon(&wire::encode_member(&peer), t0).unwrap();
/// assert_eq!(events, vec![MemberEvent::Added(peer.clone())]);
/// assert!(table.expire(t0 + Duration::from_secs(4)).len() == 1);
/// ```
pub struct MembershipTable {
    local: MemberKey,
    drop_time: Duration,
    entries: Vec<Entry>,
    malformed: u64,
    max_members: usize,
    refused: u64,
}

impl MembershipTable {
    /// A table that ignores beacons from `local` and drops members silent for `drop_time`.
    pub fn new(local: MemberKey, drop_time: Duration) -> Self {
        Self {
            local,
            drop_time,
            entries: Vec::new(),
            malformed: 0,
            max_members: usize::MAX,
            refused: 0,
        }
    }

    /// Holds at most `max` members: beacons of further new members are refused (and
    /// counted, [`Self::refused`]) until one leaves, so a flood of forged beacons cannot grow
    /// the table without bound. Members already in it are still refreshed, and a member
    /// restarting at its address still replaces itself. Default: no bound (Tribes).
    pub fn with_max_members(mut self, max: usize) -> Self {
        self.max_members = max;
        self
    }

    /// Changes the local identity (after the receiver bound its port).
    pub fn set_local(&mut self, local: MemberKey) {
        self.local = local;
    }

    /// True when the datagram looks like a member beacon (starts with `TRIBES-B`).
    pub fn is_beacon(datagram: &[u8]) -> bool {
        datagram.starts_with(&MEMBER_BEGIN[..8])
    }

    /// Applies one beacon received at `now`. A malformed beacon is counted and returned as an
    /// error; the table is unchanged.
    ///
    /// Reference: `McastServiceImpl.receive` / `Membership.memberAlive`.
    pub fn handle_beacon(
        &mut self,
        datagram: &Bytes,
        now: Instant,
    ) -> Result<Vec<MemberEvent>, WireError> {
        let (member, _) = decode_member(datagram).inspect_err(|_| self.malformed += 1)?;
        let key = member.key();
        if key == self.local {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        if member.is_shutting_down() {
            if let Some(i) = self.position(&key) {
                let mut gone = self.entries.remove(i).member;
                gone.command = member.command;
                events.push(MemberEvent::Disappeared {
                    member: gone,
                    expired: false,
                });
            }
            return Ok(events);
        }
        if let Some(i) = self.position(&key) {
            let e = &mut self.entries[i];
            e.last_heard = now;
            if e.member.alive_time != member.alive_time
                || e.member.payload != member.payload
                || e.member.domain != member.domain
            {
                e.member = member;
                self.sort();
            }
            return Ok(events);
        }
        // A new unique id at an address we know: the old process is gone (restarted). Tribes
        // waits for it to expire; there cannot be two live receivers on one address.
        let addr = member.addr();
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].member.addr() == addr {
                events.push(MemberEvent::Disappeared {
                    member: self.entries.remove(i).member,
                    expired: false,
                });
            } else {
                i += 1;
            }
        }
        if self.entries.len() >= self.max_members {
            self.refused += 1;
            return Ok(events);
        }
        self.entries.push(Entry {
            member: member.clone(),
            last_heard: now,
        });
        self.sort();
        events.push(MemberEvent::Added(member));
        Ok(events)
    }

    /// Drops members not heard from for longer than the drop time.
    ///
    /// Reference: `Membership.expire`.
    pub fn expire(&mut self, now: Instant) -> Vec<MemberEvent> {
        let mut events = Vec::new();
        let drop_time = self.drop_time;
        self.entries.retain(|e| {
            let keep = now.saturating_duration_since(e.last_heard) <= drop_time;
            if !keep {
                events.push(MemberEvent::Disappeared {
                    member: e.member.clone(),
                    expired: true,
                });
            }
            keep
        });
        events
    }

    /// Removes every member (e.g. when the service stops), reporting none.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The members, oldest first.
    pub fn members(&self) -> Vec<Member> {
        self.entries.iter().map(|e| e.member.clone()).collect()
    }

    /// Whether `key` is a current member.
    pub fn contains(&self, key: &MemberKey) -> bool {
        self.position(key).is_some()
    }

    /// Malformed beacons seen so far.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Beacons of new members refused because the table was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The earliest time at which a member could expire, for the caller's timer.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries
            .iter()
            .map(|e| e.last_heard + self.drop_time)
            .min()
    }

    fn position(&self, key: &MemberKey) -> Option<usize> {
        self.entries.iter().position(|e| e.member.key() == *key)
    }

    fn sort(&mut self) {
        // Oldest (largest alive time) first; stable for equal times.
        self.entries
            .sort_by_key(|e| std::cmp::Reverse(e.member.alive_time));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::member::SHUTDOWN_COMMAND;
    use crate::wire::encode_member;
    use crate::UniqueId;

    fn member(port: u16, alive: i64) -> Member {
        let mut m = Member::with_id(([127, 0, 0, 1], port).into(), UniqueId::random());
        m.alive_time = alive;
        m
    }

    fn table() -> (MembershipTable, Instant) {
        let local = member(4000, 0);
        (
            MembershipTable::new(local.key(), Duration::from_millis(3000)),
            Instant::now(),
        )
    }

    #[test]
    fn join_is_reported_once_and_refresh_keeps_the_member() {
        let (mut t, t0) = table();
        let a = member(4001, 10);
        let b = encode_member(&a);
        assert_eq!(
            t.handle_beacon(&b, t0).unwrap(),
            vec![MemberEvent::Added(a.clone())]
        );
        for i in 1..10 {
            assert!(t
                .handle_beacon(&b, t0 + Duration::from_millis(500 * i))
                .unwrap()
                .is_empty());
        }
        assert!(t.expire(t0 + Duration::from_millis(7000)).is_empty());
        assert_eq!(t.members(), vec![a]);
    }

    #[test]
    fn silent_member_expires_after_drop_time_exactly_once() {
        let (mut t, t0) = table();
        let a = member(4001, 10);
        t.handle_beacon(&encode_member(&a), t0).unwrap();
        assert!(t.expire(t0 + Duration::from_millis(3000)).is_empty());
        let ev = t.expire(t0 + Duration::from_millis(3001));
        assert_eq!(
            ev,
            vec![MemberEvent::Disappeared {
                member: a,
                expired: true
            }]
        );
        assert!(t.expire(t0 + Duration::from_millis(9000)).is_empty());
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn shutdown_beacon_removes_at_once() {
        let (mut t, t0) = table();
        let a = member(4001, 10);
        t.handle_beacon(&encode_member(&a), t0).unwrap();
        let mut bye = a.clone();
        bye.command = Bytes::from_static(SHUTDOWN_COMMAND);
        let ev = t.handle_beacon(&encode_member(&bye), t0).unwrap();
        assert!(
            matches!(&ev[..], [MemberEvent::Disappeared { member, expired: false }] if member.is_shutting_down())
        );
        assert!(t.members().is_empty());
        // A shutdown beacon from a stranger changes nothing.
        assert!(t
            .handle_beacon(&encode_member(&bye), t0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn restart_with_new_id_replaces_the_old_member() {
        let (mut t, t0) = table();
        let old = member(4001, 5000);
        t.handle_beacon(&encode_member(&old), t0).unwrap();
        let new = member(4001, 10);
        let ev = t.handle_beacon(&encode_member(&new), t0).unwrap();
        assert_eq!(
            ev,
            vec![
                MemberEvent::Disappeared {
                    member: old,
                    expired: false
                },
                MemberEvent::Added(new.clone())
            ]
        );
        assert_eq!(t.members(), vec![new]);
    }

    #[test]
    fn members_are_ordered_oldest_first_and_reordered_on_refresh() {
        let (mut t, t0) = table();
        let a = member(4001, 100);
        let b = member(4002, 900);
        let c = member(4003, 500);
        for m in [&a, &b, &c] {
            t.handle_beacon(&encode_member(m), t0).unwrap();
        }
        let ports = |t: &MembershipTable| t.members().iter().map(|m| m.port).collect::<Vec<_>>();
        assert_eq!(ports(&t), vec![4002, 4003, 4001]);
        let mut a2 = a.clone();
        a2.alive_time = 10_000;
        t.handle_beacon(&encode_member(&a2), t0).unwrap();
        assert_eq!(ports(&t), vec![4001, 4002, 4003]);
    }

    #[test]
    fn own_beacons_are_ignored_and_malformed_ones_counted() {
        let local = member(4000, 0);
        let mut t = MembershipTable::new(local.key(), Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(t
            .handle_beacon(&encode_member(&local), t0)
            .unwrap()
            .is_empty());
        let mut bad = encode_member(&member(4001, 1)).to_vec();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        assert!(t.handle_beacon(&Bytes::from(bad), t0).is_err());
        assert!(t
            .handle_beacon(&Bytes::from_static(b"TRIBES-B"), t0)
            .is_err());
        assert_eq!(t.malformed(), 2);
        assert!(t.members().is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_members_but_keeps_serving_known_ones() {
        let local = member(4000, 0);
        let mut t = MembershipTable::new(local.key(), Duration::from_secs(3)).with_max_members(2);
        let t0 = Instant::now();
        let (a, b, c) = (member(4001, 10), member(4002, 20), member(4003, 30));
        for m in [&a, &b] {
            assert_eq!(t.handle_beacon(&encode_member(m), t0).unwrap().len(), 1);
        }
        // A third address (a flood of forged beacons looks like this): refused, counted.
        assert!(t.handle_beacon(&encode_member(&c), t0).unwrap().is_empty());
        assert_eq!((t.members().len(), t.refused()), (2, 1));
        // Known members are still refreshed: not expired at t0 + 4 s.
        let t1 = t0 + Duration::from_secs(2);
        for m in [&a, &b] {
            assert!(t.handle_beacon(&encode_member(m), t1).unwrap().is_empty());
        }
        assert!(t.expire(t0 + Duration::from_secs(4)).is_empty());
        // A member restarting at its address replaces itself even when full.
        let a2 = member(4001, 1);
        let events = t.handle_beacon(&encode_member(&a2), t1).unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(t.contains(&a2.key()) && !t.contains(&a.key()));
        // Once a member leaves, a new one gets its place.
        assert_eq!(t.expire(t1 + Duration::from_secs(4)).len(), 2);
        assert_eq!(
            t.handle_beacon(&encode_member(&c), t1 + Duration::from_secs(4))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(t.refused(), 1);
    }
}
