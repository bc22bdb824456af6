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
    /// Reported gone below, or a send to it failed: keep as a suspect while reachable.
    Remove,
    /// Forced check of a current member: only a dead one changes anything.
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
    /// The add probe failed, but the member was heard of again while it ran (a hello, a
    /// heartbeat that wanted to probe it): probe it again now (the probe is claimed).
    Again(Member),
}

/// The detector's book of members: reported up, suspected gone, suspected added, probing.
#[derive(Default)]
pub(crate) struct Verdicts {
    /// Members reported up.
    members: HashMap<MemberKey, Member>,
    /// Reported gone below (or a send failed), but answered (since when): kept, re-checked
    /// on heartbeat.
    remove_suspects: HashMap<MemberKey, (Member, Instant)>,
    /// The members the layer below lists (reported added and not gone since), as it last
    /// reported them: only those are reported added. One that is not a member (its probe
    /// failed, or it was reported gone here after a failed send or a forced check) is
    /// probed on every heartbeat and reported added once it answers: static and DNS
    /// membership do not notice a silent member, and would never report it again when it
    /// comes back. Bounded by what that layer lists.
    below: HashMap<MemberKey, Member>,
    /// Probes queued or running, so one member is not probed twice at once.
    probing: HashMap<MemberKey, Check>,
    /// Events that arrived before the probe threads started (an interceptor below may raise
    /// members during its own start): probed once they run.
    deferred: Vec<(Member, Check)>,
    /// Probes that found no place in the queue: run again on the next heartbeat (at most
    /// one per member, so bounded by the members the layer below reports).
    retry: HashMap<MemberKey, (Member, Check)>,
    /// Members whose add probe was wanted again while one ran: if it fails, it runs again
    /// at once. A probe with the read test waits seconds for a frozen member; without
    /// this, a heartbeat coming due meanwhile was lost, and the member came back a whole
    /// probe after it thawed.
    again: std::collections::HashSet<MemberKey>,
}

impl Verdicts {
    pub(crate) fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub(crate) fn remove_suspects(&self) -> impl Iterator<Item = &Member> {
        self.remove_suspects.values().map(|(m, _)| m)
    }

    /// The layer below reports `member` added.
    pub(crate) fn member_added(&mut self, member: Member) -> Next {
        let key = member.key();
        self.below.insert(key, member.clone());
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
        self.below.remove(&key);
        self.again.remove(&key);
        if member.is_shutting_down() {
            self.remove_suspects.remove(&key);
            self.retry.remove(&key);
            return match self.members.remove(&key) {
                Some(_) => Next::ReportGone,
                None => Next::Done,
            };
        }
        // Never reported up (its add probe failed, runs, or is still to be retried):
        // nothing to verify or report, and no longer looked for.
        if !self.members.contains_key(&key) {
            self.retry.remove(&key);
            return Next::Done;
        }
        Next::Probe(Check::Remove)
    }

    /// Claims the probe of `key` for `check`: false when that same check is already queued
    /// or running.
    pub(crate) fn begin_probe(&mut self, key: MemberKey, check: Check) -> bool {
        if self.probing.get(&key) == Some(&check) {
            if check == Check::Add {
                self.again.insert(key);
            }
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
        let again = self.again.remove(&key);
        match (check, alive) {
            (Check::Add, true) => {
                // Gone below (or shut down) while the probe ran: not reported.
                if !self.below.contains_key(&key) {
                    return None;
                }
                match self.members.insert(key, member.clone()) {
                    None => Some(Report::Added(member)),
                    Some(_) => None,
                }
            }
            // Looked for again at once if wanted meanwhile, else on the next heartbeat, if
            // still listed below.
            (Check::Add, false) => {
                let due = again && self.below.contains_key(&key);
                if due && !self.members.contains_key(&key) {
                    self.probing.insert(key, Check::Add);
                    // As the layer below last reported it.
                    let latest = self.below.get(&key).cloned().unwrap_or(member);
                    return Some(Report::Again(latest));
                }
                None
            }
            (Check::Remove, true) => {
                if self.members.contains_key(&key) {
                    self.remove_suspects.entry(key).or_insert((member, now));
                }
                None
            }
            (Check::Verify, true) => None,
            (Check::Remove | Check::Verify, false) => {
                self.remove_suspects.remove(&key);
                self.members.remove(&key).map(Report::Gone)
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
                .retain(|_, (_, since)| now.saturating_duration_since(*since) < timeout);
        }
        let suspects = self
            .remove_suspects
            .values()
            .map(|(m, _)| (m.clone(), Check::Remove));
        // Listed below and not a member: look for it (if its add probe is under way, once
        // more when that one fails).
        let mut adds = Vec::new();
        for (k, m) in &self.below {
            if self.members.contains_key(k) {
                continue;
            }
            if self.probing.get(k) == Some(&Check::Add) {
                self.again.insert(*k);
            } else {
                adds.push((m.clone(), Check::Add));
            }
        }
        let mut out: Vec<(Member, Check)> = suspects.chain(adds).collect();
        // Add probes that found no place are among those just listed (or no longer due).
        let retries = self.retry.drain().map(|(_, v)| v);
        out.extend(retries.filter(|(_, check)| *check != Check::Add));
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

    /// `m` reported added below and verified: a member.
    fn joined(v: &mut Verdicts, m: &Member, t0: Instant) {
        let next = v.member_added(m.clone());
        assert_eq!(probe(v, m, next, true, t0), Some(Report::Added(m.clone())));
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
        joined(&mut v, &a, t0);
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
        joined(&mut v, &a, t0);
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
        joined(&mut v, &a, t0);
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
        joined(&mut v, &a, t0);
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
        joined(&mut v, &a, t0);
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
        joined(&mut v, &a, t0);
        // A send failed; the layer below still lists it (static membership), and would
        // never report it again.
        assert!(v.begin_probe(a.key(), Check::Remove));
        assert_eq!(
            v.settle(a.clone(), Check::Remove, false, t0),
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
        joined(&mut v, &a, t0);
        let next = v.member_disappeared(&a);
        assert_eq!(probe(&mut v, &a, next, false, t0), Some(Report::Gone(a)));
        assert!(v.heartbeat(t0, None).is_empty());
    }

    /// Gone below (multicast's drop time) while the probe of a failed send runs.
    #[test]
    fn a_member_gone_below_during_a_failed_send_s_probe_is_not_looked_for() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        joined(&mut v, &a, t0);
        assert!(v.begin_probe(a.key(), Check::Remove));
        let _ = v.member_disappeared(&a);
        assert_eq!(
            v.settle(a.clone(), Check::Remove, false, t0),
            Some(Report::Gone(a.clone()))
        );
        assert!(
            v.heartbeat(t0, None).is_empty(),
            "looked for after leaving below"
        );
    }

    /// A goodbye while a heartbeat's add probe runs.
    #[test]
    fn a_goodbye_during_a_heartbeat_s_add_probe_is_not_undone() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        joined(&mut v, &a, t0);
        assert!(v.begin_probe(a.key(), Check::Remove));
        assert_eq!(
            v.settle(a.clone(), Check::Remove, false, t0),
            Some(Report::Gone(a.clone()))
        );
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        assert!(v.begin_probe(a.key(), Check::Add));
        assert_eq!(v.member_disappeared(&shutting_down(&a)), Next::Done);
        assert_eq!(v.settle(a.clone(), Check::Add, true, t0), None);
    }

    /// A remove suspect that aged out (still a member), then a failed send: the layer
    /// below reported it gone, so it is not looked for.
    #[test]
    fn an_aged_out_suspect_that_fails_is_not_looked_for() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        joined(&mut v, &a, t0);
        let next = v.member_disappeared(&a);
        assert_eq!(probe(&mut v, &a, next, true, t0), None);
        let later = t0 + Duration::from_secs(301);
        assert!(v
            .heartbeat(later, Some(Duration::from_secs(300)))
            .is_empty());
        assert!(v.begin_probe(a.key(), Check::Remove));
        assert_eq!(
            v.settle(a.clone(), Check::Remove, false, later),
            Some(Report::Gone(a.clone()))
        );
        assert!(v.heartbeat(later, None).is_empty());
    }

    #[test]
    fn a_member_back_below_while_its_gone_probe_ran_is_looked_for() {
        // Gone below, back below (its beacons returned) before the probe of the first
        // report failed: the layer below lists it, and will not report it again.
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        joined(&mut v, &a, t0);
        assert_eq!(v.member_disappeared(&a), Next::Probe(Check::Remove));
        assert!(v.begin_probe(a.key(), Check::Remove));
        assert_eq!(v.member_added(a.clone()), Next::Done);
        assert_eq!(
            v.settle(a.clone(), Check::Remove, false, t0),
            Some(Report::Gone(a.clone()))
        );
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        assert_eq!(
            v.settle(a.clone(), Check::Add, true, t0),
            Some(Report::Added(a))
        );
    }

    #[test]
    fn an_add_probe_that_answers_after_the_member_left_below_reports_nothing() {
        // It said hello, then goodbye, while its first probe ran (its port still open).
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        let next = v.member_added(a.clone());
        assert_eq!(next, Next::Probe(Check::Add));
        assert!(v.begin_probe(a.key(), Check::Add));
        assert_eq!(v.member_disappeared(&shutting_down(&a)), Next::Done);
        assert_eq!(v.settle(a.clone(), Check::Add, true, t0), None);
        assert_eq!(v.members().count(), 0);
        // Nor is it looked for.
        let b = member(4002);
        let next = v.member_added(b.clone());
        assert!(v.begin_probe(b.key(), Check::Add));
        let _ = next;
        assert_eq!(v.member_disappeared(&b), Next::Done);
        assert_eq!(v.settle(b.clone(), Check::Add, false, t0), None);
        assert!(v.heartbeat(t0, None).is_empty());
    }

    #[test]
    fn a_new_member_is_looked_for_whatever_became_of_its_probes() {
        // Its add probe found no queue place, then a failed send's probe found none either:
        // the second retry used to replace the first, and nothing probed it again.
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        assert_eq!(v.member_added(a.clone()), Next::Probe(Check::Add));
        assert!(v.begin_probe(a.key(), Check::Add));
        v.probe_not_queued(a.clone(), Check::Add);
        assert!(v.begin_probe(a.key(), Check::Remove));
        v.probe_not_queued(a.clone(), Check::Remove);
        let due = v.heartbeat(t0, None);
        assert!(due.contains(&(a.clone(), Check::Add)), "{due:?}");
        assert!(v.begin_probe(a.key(), Check::Add));
        assert_eq!(
            v.settle(a.clone(), Check::Add, true, t0),
            Some(Report::Added(a))
        );
    }

    #[test]
    fn a_member_wanted_while_its_add_probe_runs_is_probed_again_when_it_fails() {
        // The read test waits seconds for a frozen member: a heartbeat (or a hello) that
        // comes meanwhile must not be lost, or the member comes back a probe late.
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        assert_eq!(v.member_added(a.clone()), Next::Probe(Check::Add));
        assert!(v.begin_probe(a.key(), Check::Add));
        // A heartbeat while it runs hands out nothing for it...
        assert!(v.heartbeat(t0, None).is_empty());
        // ...and when it fails, it runs again at once (claimed), until a round passes
        // without anyone wanting it.
        assert_eq!(
            v.settle(a.clone(), Check::Add, false, t0),
            Some(Report::Again(a.clone()))
        );
        assert!(
            !v.begin_probe(a.key(), Check::Add),
            "claimed for the prober"
        );
        // That begin_probe was a hello: once more.
        assert_eq!(
            v.settle(a.clone(), Check::Add, false, t0),
            Some(Report::Again(a.clone()))
        );
        assert_eq!(v.settle(a.clone(), Check::Add, false, t0), None);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Add)]);
        // Gone below meanwhile: not again.
        assert!(v.begin_probe(a.key(), Check::Add));
        assert!(!v.begin_probe(a.key(), Check::Add));
        assert_eq!(v.member_disappeared(&a), Next::Done);
        assert_eq!(v.settle(a.clone(), Check::Add, false, t0), None);
    }

    #[test]
    fn a_failed_send_to_a_stranger_reports_nothing_and_looks_for_nobody() {
        let (mut v, t0, a) = (Verdicts::default(), Instant::now(), member(4001));
        assert!(v.begin_probe(a.key(), Check::Remove));
        assert_eq!(v.settle(a.clone(), Check::Remove, false, t0), None);
        assert_eq!(v.settle(a, Check::Remove, true, t0), None);
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
        // Queued again (as the detector does with what a heartbeat hands out): not handed
        // out twice while it runs.
        assert!(v.begin_probe(a.key(), Check::Add));
        assert!(v.heartbeat(t0, None).is_empty());
        // A remove probe that found no place comes back too.
        assert_eq!(
            v.settle(a.clone(), Check::Add, true, t0),
            Some(Report::Added(a.clone()))
        );
        assert!(v.begin_probe(a.key(), Check::Remove));
        v.probe_not_queued(a.clone(), Check::Remove);
        assert_eq!(v.heartbeat(t0, None), vec![(a.clone(), Check::Remove)]);
        // Reported gone below before the retry ran: never reported up, nothing to do.
        v.member_added(b.clone());
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

    mod properties {
        //! Random event sequences against the book, driven as the detector drives it
        //! (claimed probes run in any order, some find no queue place), checking what it
        //! reports up against a model of the layer below.
        use super::super::*;
        use super::{member, shutting_down};
        use proptest::prelude::*;
        use std::collections::HashSet;

        #[derive(Debug, Clone)]
        enum Op {
            Added(u8),
            Gone(u8),
            Shutdown(u8),
            SendFailed(u8),
            Verify(u8),
            Heartbeat(u16),
            Settle(u8, bool),
            NotQueued(u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            let m = 0u8..3;
            prop_oneof![
                m.clone().prop_map(Op::Added),
                m.clone().prop_map(Op::Gone),
                m.clone().prop_map(Op::Shutdown),
                m.clone().prop_map(Op::SendFailed),
                m.prop_map(Op::Verify),
                (0u16..400).prop_map(Op::Heartbeat),
                (any::<u8>(), any::<bool>()).prop_map(|(i, a)| Op::Settle(i, a)),
                (any::<u8>()).prop_map(Op::NotQueued),
            ]
        }

        struct Driver {
            v: Verdicts,
            pending: Vec<(Member, Check)>,
            /// What the detector reported up.
            up: HashSet<MemberKey>,
            /// What the layer below lists.
            below: HashSet<MemberKey>,
            now: Instant,
        }

        impl Driver {
            fn enqueue(&mut self, m: Member, check: Check) {
                if self.v.begin_probe(m.key(), check) {
                    self.pending.push((m, check));
                }
            }

            fn next(&mut self, m: Member, next: Next) {
                match next {
                    Next::Done => {}
                    Next::Probe(c) => self.enqueue(m, c),
                    Next::ReportGone => assert!(self.up.remove(&m.key()), "{m:?} gone twice"),
                }
            }

            fn settle(&mut self, i: usize, alive: bool) {
                if self.pending.is_empty() {
                    return;
                }
                let (m, c) = self.pending.remove(i % self.pending.len());
                match self.v.settle(m, c, alive, self.now) {
                    Some(Report::Added(m)) => {
                        assert!(
                            self.below.contains(&m.key()),
                            "{m:?} added, not listed below"
                        );
                        assert!(self.up.insert(m.key()), "{m:?} added twice");
                    }
                    Some(Report::Gone(m)) => {
                        assert!(self.up.remove(&m.key()), "{m:?} gone, never added")
                    }
                    Some(Report::Again(m)) => {
                        assert!(self.below.contains(&m.key()), "{m:?} again, not listed");
                        assert!(!self.up.contains(&m.key()), "{m:?} again, a member");
                        // Claimed by the book: the prober runs it at once.
                        self.pending.push((m, Check::Add));
                    }
                    None => {}
                }
            }

            fn apply(&mut self, op: &Op) {
                let m = |i: &u8| member(4000 + u16::from(*i));
                match op {
                    Op::Added(i) => {
                        self.below.insert(m(i).key());
                        let next = self.v.member_added(m(i));
                        self.next(m(i), next);
                    }
                    Op::Gone(i) => {
                        self.below.remove(&m(i).key());
                        let next = self.v.member_disappeared(&m(i));
                        self.next(m(i), next);
                    }
                    Op::Shutdown(i) => {
                        self.below.remove(&m(i).key());
                        let next = self.v.member_disappeared(&shutting_down(&m(i)));
                        assert!(!matches!(next, Next::Probe(_)), "a goodbye is not probed");
                        self.next(m(i), next);
                    }
                    Op::SendFailed(i) => self.enqueue(m(i), Check::Remove),
                    Op::Verify(i) if self.up.contains(&m(i).key()) => {
                        self.enqueue(m(i), Check::Verify)
                    }
                    Op::Verify(_) => {}
                    Op::Heartbeat(ms) => {
                        self.now += Duration::from_millis(u64::from(*ms));
                        let timeout = Some(Duration::from_secs(1));
                        for (m, c) in self.v.heartbeat(self.now, timeout) {
                            self.enqueue(m, c);
                        }
                    }
                    Op::Settle(i, alive) => self.settle(usize::from(*i), *alive),
                    Op::NotQueued(i) if !self.pending.is_empty() => {
                        let at = usize::from(*i) % self.pending.len();
                        let (m, c) = self.pending.remove(at);
                        self.v.probe_not_queued(m, c);
                    }
                    Op::NotQueued(_) => {}
                }
            }

            fn check(&self) {
                let members: HashSet<MemberKey> = self.v.members.keys().copied().collect();
                assert_eq!(members, self.up, "the book and what it reported differ");
                let below: HashSet<MemberKey> = self.v.below.keys().copied().collect();
                assert_eq!(below, self.below);
                for k in self.v.remove_suspects.keys() {
                    assert!(members.contains(k), "a remove suspect that is no member");
                }
            }
        }

        proptest! {
            #[test]
            fn reports_follow_the_layer_below_and_every_listed_member_comes_back(
                ops in proptest::collection::vec(op(), 0..60)
            ) {
                let mut d = Driver {
                    v: Verdicts::default(),
                    pending: Vec::new(),
                    up: HashSet::new(),
                    below: HashSet::new(),
                    now: Instant::now(),
                };
                for op in &ops {
                    d.apply(op);
                    d.check();
                }
                // From now on every member answers: a few heartbeats later, every member
                // the layer below lists is a member.
                for _ in 0..4 {
                    while !d.pending.is_empty() {
                        d.settle(0, true);
                        d.check();
                    }
                    d.apply(&Op::Heartbeat(100));
                }
                for k in &d.below {
                    prop_assert!(d.up.contains(k), "{k:?} listed below but never back");
                }
            }
        }
    }
}
