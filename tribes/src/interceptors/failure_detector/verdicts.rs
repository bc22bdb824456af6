//! What the failure detector believes about each member, and what a probe's answer changes.
//! Pure: no sockets, no threads, no clock (time is a parameter), so every rule (a suspect
//! that answers stays, a silent one goes, suspects age out) is tested without a network or
//! a five-minute wait.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::member::{Member, MemberKey};

/// Why a member is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Reported added below: report up once reachable.
    Add,
    /// Reported gone below: keep as a suspect while reachable.
    Remove,
    /// A send to it failed while the layer below still lists it: keep as a suspect while
    /// reachable; once it does not answer, report it gone but look for it again on every
    /// heartbeat, since the layer below (static or DNS membership, which list it still)
    /// will not report it added again when it comes back.
    SendFailed,
    /// Forced check of a current member: only a dead one changes anything (and, as after
    /// a failed send, it is looked for again on every heartbeat).
    Verify,
}

/// What to do with an event from the layer below.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing more: the event changed (or confirmed) what is known.
    Done,
    /// Probe the member for this check.
    Probe(Check),
    /// Report the member gone up the stack now (it announced its shutdown).
    ReportGone,
}

/// What settling a probe reports up the stack.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report {
    Added(Member),
    Gone(Member),
}

/// The detector's book of members: reported up, suspected gone, suspected added, probing.
#[derive(Default)]
pub(crate) struct Verdicts {
    /// Members reported up.
    members: HashMap<MemberKey, Member>,
    /// Reported gone below (or a send failed), but answered: kept, re-checked on heartbeat.
    remove_suspects: HashMap<MemberKey, Suspect>,
    /// Reported added below (or reported gone up after a failed send or forced check, while
    /// the layer below still lists it), but did not answer: not a member, re-checked on
    /// heartbeat and reported added once it answers.
    add_suspects: HashMap<MemberKey, Member>,
    /// Probes queued or running, so one member is not probed twice at once.
    probing: HashMap<MemberKey, Check>,
    /// Events that arrived before the probe threads started (an interceptor below may raise
    /// members during its own start): probed once they run.
    deferred: Vec<(Member, Check)>,
    /// Probes that found no place in the queue: run again on the next heartbeat (at most
    /// one per member, so bounded by the members the layer below reports).
    retry: HashMap<MemberKey, (Member, Check)>,
}

/// A member that was reported gone, or failed a send, but answered its probe.
struct Suspect {
    member: Member,
    since: Instant,
    /// The layer below still lists it (only a send failed): if it falls silent, it is
    /// looked for again after being reported gone.
    listed: bool,
}

impl Verdicts {
    pub(crate) fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub(crate) fn remove_suspects(&self) -> impl Iterator<Item = &Member> {
        self.remove_suspects.values().map(|s| &s.member)
    }

    /// The layer below reports `member` added.
    pub(crate) fn member_added(&mut self, member: Member) -> Next {
        let key = member.key();
        if self.remove_suspects.remove(&key).is_some() {
            self.members.insert(key, member);
            return Next::Done;
        }
        if let Some(known) = self.members.get_mut(&key) {
            *known = member;
            return Next::Done;
        }
        Next::Probe(Check::Add)
    }

    /// The layer below reports `member` gone.
    pub(crate) fn member_disappeared(&mut self, member: &Member) -> Next {
        let key = member.key();
        if member.is_shutting_down() {
            self.remove_suspects.remove(&key);
            self.add_suspects.remove(&key);
            self.retry.remove(&key);
            return match self.members.remove(&key) {
                Some(_) => Next::ReportGone,
                None => Next::Done,
            };
        }
        // Never reported up (its add probe failed, or is still to be retried): nothing to
        // verify or report.
        let unreported_add = matches!(self.retry.get(&key), Some((_, Check::Add)));
        if self.add_suspects.remove(&key).is_some() || unreported_add {
            self.retry.remove(&key);
            return Next::Done;
        }
        Next::Probe(Check::Remove)
    }

    /// Claims the probe of `key` for `check`: false when that same check is already queued
    /// or running.
    pub(crate) fn begin_probe(&mut self, key: MemberKey, check: Check) -> bool {
        if self.probing.get(&key) == Some(&check) {
            return false;
        }
        self.probing.insert(key, check);
        true
    }

    /// A claimed probe found no place in the queue: it runs on the next heartbeat instead.
    pub(crate) fn probe_not_queued(&mut self, member: Member, check: Check) {
        let key = member.key();
        self.probing.remove(&key);
        self.retry.insert(key, (member, check));
    }

    /// Keeps a claimed probe for when the probe threads run; false (nothing kept) when `max`
    /// are already kept.
    pub(crate) fn defer(&mut self, member: &Member, check: Check, max: usize) -> bool {
        self.probing.remove(&member.key());
        if self.deferred.len() >= max {
            return false;
        }
        self.deferred.push((member.clone(), check));
        true
    }

    pub(crate) fn take_deferred(&mut self) -> Vec<(Member, Check)> {
        std::mem::take(&mut self.deferred)
    }

    /// The probe of `member` for `check` answered (`alive`) or not, at `now`.
    pub(crate) fn settle(
        &mut self,
        member: Member,
        check: Check,
        alive: bool,
        now: Instant,
    ) -> Option<Report> {
        let key = member.key();
        self.probing.remove(&key);
        match (check, alive) {
            (Check::Add, true) => {
                self.add_suspects.remove(&key);
                match self.members.insert(key, member.clone()) {
                    None => Some(Report::Added(member)),
                    Some(_) => None,
                }
            }
            (Check::Add, false) => {
                if !self.members.contains_key(&key) {
                    self.add_suspects.insert(key, member);
                }
                None
            }
            (Check::Remove | Check::SendFailed, true) => {
                if self.members.contains_key(&key) {
                    let listed = check == Check::SendFailed;
                    let suspect = self.remove_suspects.entry(key).or_insert(Suspect {
                        member,
                        since: now,
                        listed,
                    });
                    // Reported gone below: no longer listed there, whatever failed before.
                    suspect.listed &= listed;
                }
                None
            }
            (Check::Verify, true) => None,
            (Check::Remove | Check::SendFailed | Check::Verify, false) => {
                let suspect = self.remove_suspects.remove(&key);
                let gone = self.members.remove(&key)?;
                let listed = check != Check::Remove && suspect.is_none_or(|s| s.listed);
                if listed {
                    self.add_suspects.insert(key, member);
                }
                Some(Report::Gone(gone))
            }
        }
    }

    /// A heartbeat at `now`: forgets remove suspects older than `suspect_timeout` (they stay
    /// members: they answered, Tribes keeps them too) and returns the probes to run again.
    pub(crate) fn heartbeat(
        &mut self,
        now: Instant,
        suspect_timeout: Option<Duration>,
    ) -> Vec<(Member, Check)> {
        if let Some(timeout) = suspect_timeout {
            self.remove_suspects
                .retain(|_, s| now.saturating_duration_since(s.since) < timeout);
        }
        let suspects = self.remove_suspects.values().map(|s| {
            let check = if s.listed {
                Check::SendFailed
            } else {
                Check::Remove
            };
            (s.member.clone(), check)
        });
        let adds = self.add_suspects.values().map(|m| (m.clone(), Check::Add));
        let mut out: Vec<(Member, Check)> = suspects.chain(adds).collect();
        out.extend(self.retry.drain().map(|(_, v)| v));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::UniqueId;

    fn member(port: u16) -> Member {
        Member::with_id(([127, 0, 0, 1], port).into(), UniqueId([port as u8; 16]))
    }

    fn shutting_down(m: &Member) -> Member {
        let mut m = m.clone();
        m.command = bytes::Bytes::from_static(crate::member::SHUTDOWN_COMMAND);
        m
    }

    /// Runs the probe the book asked for, with the given answer.
    fn probe(
        v: &mut Verdicts,
        m: &Member,
        next: Next,
        alive: bool,
        now: Instant,
    ) -> Option<Report> {
        let Next::Probe(check) = next else {
            panic!("expected a probe, got {next:?}");
        };
        assert!(v.begin_probe(m.key(), check));
        v.settle(m.clone(), check, alive, now)
    }

    #[test]
    fn a_new_member_is_reported_only_once_it_answers() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        assert_eq!(probe(&mut v, &a, next, false, t0), None);
        assert_eq!(v.members().count(), 0);
        // Not reachable yet: probed again on every heartbeat until it answers.
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        assert_eq!(
            v.settle(a.clone(), Check::Add, true, t0),
            Some(Report::Added(a.clone()))
        );
        assert_eq!(v.members().cloned().collect::<Vec<_>>(), vec![a.clone()]);
        assert!(v.heartbeat(t0, None).is_empty());
        // Heard again: known, no second report.
        assert_eq!(v.member_added(a), Next::Done);
    }

    #[test]
    fn a_member_reported_gone_that_answers_stays_until_it_falls_silent() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        let next = v.member_disappeared(&a);
        assert_eq!(probe(&mut v, &a, next, true, t0), None);
        assert_eq!(v.members().count(), 1);
        assert_eq!(v.remove_suspects().count(), 1);
        // Re-checked on the heartbeat; silent this time: gone.
        let recheck = v.heartbeat(t0 + Duration::from_secs(1), None);
        assert_eq!(recheck, vec![(a.clone(), Check::Remove)]);
        let gone = v.settle(a.clone(), Check::Remove, false, t0 + Duration::from_secs(1));
        assert_eq!(gone, Some(Report::Gone(a)));
        assert_eq!((v.members().count(), v.remove_suspects().count()), (0, 0));
    }

    #[test]
    fn a_suspect_is_forgotten_after_the_timeout_but_stays_a_member() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let timeout = Some(Duration::from_secs(300));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        let next = v.member_disappeared(&a);
        probe(&mut v, &a, next, true, t0);
        assert_eq!(v.heartbeat(t0 + Duration::from_secs(299), timeout).len(), 1);
        assert!(v
            .heartbeat(t0 + Duration::from_secs(300), timeout)
            .is_empty());
        assert_eq!((v.members().count(), v.remove_suspects().count()), (1, 0));
        // No timeout: kept (and re-checked) for good.
        let (mut v, b) = (Verdicts::default(), member(4002));
        let next = v.member_added(b.clone());
        probe(&mut v, &b, next, true, t0);
        let next = v.member_disappeared(&b);
        probe(&mut v, &b, next, true, t0);
        assert_eq!(
            v.heartbeat(t0 + Duration::from_secs(100_000), None).len(),
            1
        );
        // A clock that went backwards (time is a parameter) does not expire anything.
        let mut v2 = Verdicts::default();
        let next = v2.member_added(b.clone());
        probe(&mut v2, &b, next, true, t0 + Duration::from_secs(10));
        let next = v2.member_disappeared(&b);
        probe(&mut v2, &b, next, true, t0 + Duration::from_secs(10));
        assert_eq!(v2.heartbeat(t0, timeout).len(), 1);
    }

    #[test]
    fn a_suspect_heard_again_is_a_member_without_a_new_report() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        let next = v.member_disappeared(&a);
        probe(&mut v, &a, next, true, t0);
        assert_eq!(v.member_added(a.clone()), Next::Done);
        assert_eq!((v.members().count(), v.remove_suspects().count()), (1, 0));
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn shutdown_is_reported_at_once_for_members_only() {
        let (mut v, t0, a, b) = (
            Verdicts::default(),
            Instant::now(),
            member(4001),
            member(4002),
        );
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        assert_eq!(v.member_disappeared(&shutting_down(&a)), Next::ReportGone);
        assert_eq!(v.members().count(), 0);
        // Never reported up (its add probe failed): its shutdown is not reported either, and
        // it is no longer probed.
        let next = v.member_added(b.clone());
        probe(&mut v, &b, next, false, t0);
        assert_eq!(v.member_disappeared(&shutting_down(&b)), Next::Done);
        assert!(v.heartbeat(t0, None).is_empty());
        // Nor is one whose add probe waits for a retry.
        let c = member(4003);
        assert_eq!(v.member_added(c.clone()), Next::Probe(Check::Add));
        assert!(v.begin_probe(c.key(), Check::Add));
        v.probe_not_queued(c.clone(), Check::Add);
        assert_eq!(v.member_disappeared(&shutting_down(&c)), Next::Done);
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn verify_removes_only_a_dead_member() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        assert_eq!(v.settle(a.clone(), Check::Verify, true, t0), None);
        assert_eq!(v.members().count(), 1);
        assert_eq!(
            v.settle(a.clone(), Check::Verify, false, t0),
            Some(Report::Gone(a.clone()))
        );
        // A late answer for a member already gone changes nothing.
        assert_eq!(v.settle(a, Check::Remove, true, t0), None);
        assert_eq!((v.members().count(), v.remove_suspects().count()), (0, 0));
    }

    #[test]
    fn a_member_that_fails_a_send_and_then_its_probe_is_gone_until_it_answers_again() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        // The layer below still lists it (static membership): nobody would report it again.
        assert_eq!(
            v.settle(a.clone(), Check::SendFailed, false, t0),
            Some(Report::Gone(a.clone()))
        );
        assert_eq!(v.members().count(), 0);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        assert_eq!(v.settle(a.clone(), Check::Add, false, t0), None);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        assert_eq!(
            v.settle(a.clone(), Check::Add, true, t0),
            Some(Report::Added(a.clone()))
        );
        assert!(v.heartbeat(t0, None).is_empty());
        // A forced check that finds it dead does the same.
        assert_eq!(
            v.settle(a.clone(), Check::Verify, false, t0),
            Some(Report::Gone(a.clone()))
        );
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        // Until the layer below drops it too: then it is that layer's to report again.
        assert_eq!(v.member_disappeared(&a), Next::Done);
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn a_member_reported_gone_below_is_not_looked_for_after_its_probe_fails() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        let next = v.member_disappeared(&a);
        assert_eq!(probe(&mut v, &a, next, false, t0), Some(Report::Gone(a)));
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn a_suspect_remembers_whether_the_layer_below_still_lists_it() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        probe(&mut v, &a, next, true, t0);
        // A send failed but it answers: a suspect, re-checked as a failed send.
        assert_eq!(v.settle(a.clone(), Check::SendFailed, true, t0), None);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::SendFailed)]);
        // Then the layer below reports it gone, and it still answers: re-checked as gone.
        let next = v.member_disappeared(&a);
        assert_eq!(probe(&mut v, &a, next, true, t0), None);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Remove)]);
        // A later failed send does not make it listed again; silent: gone for good.
        assert_eq!(v.settle(a.clone(), Check::SendFailed, true, t0), None);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Remove)]);
        assert_eq!(
            v.settle(a.clone(), Check::SendFailed, false, t0),
            Some(Report::Gone(a))
        );
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn a_failed_send_to_a_stranger_reports_nothing_and_looks_for_nobody() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        assert!(v.begin_probe(a.key(), Check::SendFailed));
        assert_eq!(v.settle(a.clone(), Check::SendFailed, false, t0), None);
        assert_eq!(v.settle(a, Check::SendFailed, true, t0), None);
        assert!(v.heartbeat(t0, None).is_empty());
        assert_eq!((v.members().count(), v.remove_suspects().count()), (0, 0));
    }

    #[test]
    fn one_probe_per_member_and_check_at_a_time() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        assert!(v.begin_probe(a.key(), Check::Add));
        assert!(!v.begin_probe(a.key(), Check::Add));
        // Settled: the next one may run.
        v.settle(a.clone(), Check::Add, true, t0);
        assert!(v.begin_probe(a.key(), Check::Verify));
    }

    #[test]
    fn a_probe_that_found_no_place_runs_on_the_next_heartbeat() {
        let (mut v, t0, a, b) = (
            Verdicts::default(),
            Instant::now(),
            member(4001),
            member(4002),
        );
        // A new member whose add probe did not fit in the queue is not lost.
        assert_eq!(v.member_added(a.clone()), Next::Probe(Check::Add));
        assert!(v.begin_probe(a.key(), Check::Add));
        v.probe_not_queued(a.clone(), Check::Add);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        assert!(
            v.heartbeat(t0, None).is_empty(),
            "queued again by the heartbeat"
        );
        // Reported gone below before the retry ran: never reported up, nothing to do.
        assert!(v.begin_probe(b.key(), Check::Add));
        v.probe_not_queued(b.clone(), Check::Add);
        assert_eq!(v.member_disappeared(&b), Next::Done);
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn deferred_events_are_kept_up_to_the_bound_and_handed_out_once() {
        let (mut v, a, b) = (Verdicts::default(), member(4001), member(4002));
        assert!(v.begin_probe(a.key(), Check::Add));
        assert!(v.defer(&a, Check::Add, 1));
        assert!(v.begin_probe(b.key(), Check::Add));
        assert!(!v.defer(&b, Check::Add, 1));
        assert_eq!(v.take_deferred(), vec![(a.clone(), Check::Add)]);
        assert!(v.take_deferred().is_empty());
        // Deferring gave up the claim: the probe can be claimed when the threads run.
        assert!(v.begin_probe(a.key(), Check::Add));
    }
}
