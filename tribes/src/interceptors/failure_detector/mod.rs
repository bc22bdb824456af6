//! `TcpFailureDetector`: verify membership changes over TCP before reporting them (§8.1).
//!
//! A member reported gone by the layer below is probed first: if its receiver still accepts a
//! connection (and the probe message), it stays, as a "remove suspect" re-checked on every
//! heartbeat. A new member is reported only once a probe reached it. Send failures (other than
//! FAIL_ACK) trigger a check of the member. A member carrying the shutdown command is gone at
//! once.
//!
//! A probe connects and writes Tribes' probe message; with the read test it also waits for
//! the ACK, which tells a frozen process from a live one. A member reported gone here after
//! a failed send or a forced check, while the membership below still lists it (static and
//! DNS membership do not notice a silent member), is probed again on every heartbeat and
//! reported added when it answers, so a member that was paused or cut off comes back
//! without a restart. Tribes forgets such a member until membership reports it afresh.
//!
//! Unlike Tribes, probes never run on the thread that delivered the event (membership
//! receiver, heartbeat, sender): they run in parallel on a small pool of named threads
//! (`tribes-fd-<channel>-<n>`), so one unreachable host cannot stall membership for `connect_timeout`
//! per member. Members reported while the channel starts (static and DNS membership) are
//! checked before `start` returns, on those threads, so the channel comes up with those
//! that answer (a member that does not answer holds `start` for its probe's timeouts, on
//! one of the threads).

mod verdicts;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, info, warn};
use parking_lot::Mutex;

use super::{Down, Interceptor, Outgoing, StackHandle, Up};
use crate::channel::Levels;
use crate::error::{ChannelError, Failure, FaultyMember, ProcessError, SendError};
use crate::member::Member;
use crate::options::SendOptions;
use crate::wire::ChannelMessage;
use verdicts::{Check, Next, Report, Verdicts};

/// The 64-byte probe Tribes' failure detector writes (byte-exact, so Java nodes swallow ours
/// and we swallow theirs).
pub const PROBE_PAYLOAD: [u8; 64] = [
    0x4f, 0xa7, 0x73, 0x48, 0x79, 0x82, 0x43, 0xc9, 0x9f, 0x6f, 0x89, 0x80, 0xa1, 0x5b, 0x07, 0x14,
    0x7d, 0xd9, 0x52, 0x5b, 0xeb, 0xf1, 0x43, 0x9a, 0xb7, 0x7e, 0xbe, 0x8f, 0x81, 0x67, 0x1e, 0xb6,
    0x37, 0x15, 0xbe, 0x87, 0x45, 0x7e, 0x4c, 0xa8, 0xbf, 0x0a, 0x4d, 0x13, 0x53, 0x38, 0x15, 0x32,
    0x55, 0xf6, 0x94, 0xb7, 0x3a, 0xfa, 0x40, 0x78, 0x91, 0x04, 0x7d, 0xd7, 0x72, 0x84, 0xc0, 0xd5,
];

/// Settings of [`TcpFailureDetector`].
#[derive(Debug, Clone)]
pub struct FailureDetectorConfig {
    /// Timeout of the probe's TCP connect. Default 1000 ms (Tribes `connectTimeout`).
    pub connect_timeout: Duration,
    /// Write the probe message after connecting. Default true (Tribes `performSendTest`).
    pub perform_send_test: bool,
    /// Ask for an ACK of the probe message and wait up to [`read_test_timeout`] for it:
    /// the only check that tells a frozen process (stopped, swapping, stuck in a long
    /// pause) from a live one, since the kernel accepts a frozen process's connections
    /// and buffers what is written to them. Our receiver ACKs the probe from its selector
    /// thread as soon as it reads it, whatever its workers are doing; a Java Tribes
    /// receiver reads only when one of its worker threads is free, so with Java members
    /// make `read_test_timeout` longer than their longest busy spell. A receiver at its
    /// connection limit closes the probe's connection, which the read test takes for no
    /// answer. Needs `perform_send_test`. Default false (Tribes `performReadTest`); `ha`'s
    /// cluster defaults turn it on.
    ///
    /// [`read_test_timeout`]: Self::read_test_timeout
    pub perform_read_test: bool,
    /// How long the read test waits for the ACK. Default 5000 ms (Tribes
    /// `readTestTimeout`).
    pub read_test_timeout: Duration,
    /// How long a member that was reported gone but answered stays a suspect that is
    /// re-checked on every heartbeat; `None` = forever. Default 300 s (Tribes).
    pub remove_suspects_timeout: Option<Duration>,
    /// Probe threads. Default 4.
    pub threads: usize,
    /// Probes waiting for a thread; more are dropped and retried on the next heartbeat.
    /// Default 1024.
    pub max_pending: usize,
}

impl Default for FailureDetectorConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(1000),
            perform_send_test: true,
            perform_read_test: false,
            read_test_timeout: Duration::from_millis(5000),
            remove_suspects_timeout: Some(Duration::from_secs(300)),
            threads: 4,
            max_pending: 1024,
        }
    }
}

/// Verifies membership changes by TCP before passing them up (Tribes `TcpFailureDetector`).
///
/// ```
/// use tribes::interceptors::TcpFailureDetector;
/// let fd = TcpFailureDetector::default();
/// assert!(fd.members().is_empty());
/// ```
pub struct TcpFailureDetector {
    cfg: FailureDetectorConfig,
    state: Arc<Mutex<Verdicts>>,
    pool: Mutex<Option<Pool>>,
}

struct Job {
    member: Member,
    check: Check,
    /// Told once the check is settled and reported (the checks `start` waits for).
    done: Option<Sender<()>>,
}

struct Pool {
    queue: Sender<Job>,
    /// The probe threads' own way into the queue (a probe to run again goes to its back),
    /// taken away at stop so that the queue can close.
    requeue: Requeue,
    threads: Vec<JoinHandle<()>>,
}

/// A sender into the probe queue that `stop` can take back from the probe threads.
type Requeue = Arc<Mutex<Option<Sender<Job>>>>;

impl Default for TcpFailureDetector {
    fn default() -> Self {
        Self::new(FailureDetectorConfig::default())
    }
}

impl TcpFailureDetector {
    /// A detector with the given settings.
    pub fn new(cfg: FailureDetectorConfig) -> Self {
        Self {
            cfg,
            state: Arc::new(Mutex::new(Verdicts::default())),
            pool: Mutex::new(None),
        }
    }

    /// Members this detector has reported up.
    pub fn members(&self) -> Vec<Member> {
        self.state.lock().members().cloned().collect()
    }

    /// Members reported gone below, or whose send failed, that still answer (re-checked on
    /// every heartbeat, for `remove_suspects_timeout`).
    pub fn remove_suspects(&self) -> Vec<Member> {
        self.state.lock().remove_suspects().cloned().collect()
    }

    /// Probes every member now (Tribes' forced check, used by [`super::TcpPingInterceptor`]):
    /// a member whose receiver does not answer is removed and reported gone.
    pub fn check_all(&self) {
        let members: Vec<Member> = self.state.lock().members().cloned().collect();
        for m in members {
            self.enqueue(m, Check::Verify);
        }
    }

    fn enqueue(&self, member: Member, check: Check) {
        self.enqueue_with(member, check, None);
    }

    /// As `enqueue`; `done` hears when the check is settled and reported (it is dropped
    /// unheard when the check is not queued).
    fn enqueue_with(&self, member: Member, check: Check, done: Option<Sender<()>>) {
        let key = member.key();
        if !self.state.lock().begin_probe(key, check) {
            return;
        }
        let pool = self.pool.lock();
        let Some(pool) = pool.as_ref() else {
            let mut st = self.state.lock();
            if !st.defer(&member, check, self.cfg.max_pending) {
                warn!(target: "tribes::failure_detector", "too many events before start; {member} will be checked on a heartbeat");
                st.probe_not_queued(member, check);
            }
            return;
        };
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            pool.queue.try_send(Job {
                member,
                check,
                done,
            })
        {
            warn!(target: "tribes::failure_detector", "probe queue full; {} will be checked on the next heartbeat", job.member);
            self.state.lock().probe_not_queued(job.member, job.check);
        }
    }
}

impl Interceptor for TcpFailureDetector {
    fn name(&self) -> &'static str {
        "TcpFailureDetector"
    }

    fn send(&self, out: Outgoing, next: Down<'_>) -> Result<(), SendError> {
        let result = next.send(out);
        if let Err(SendError::Faulty(faulty)) = &result {
            self.sends_failed(faulty);
        }
        result
    }

    /// Failed sends, on the sender's thread or (asynchronous sends) reported by the
    /// dispatch thread after its batch: each member is checked.
    fn sends_failed(&self, failed: &[FaultyMember]) {
        for f in failed {
            // A FAIL_ACK means the member is alive and answered; one that left was not
            // even tried (the dispatch interceptor adds those after the batch, so they do
            // not come here today; kept in case another sender reports them).
            if !matches!(f.failure, Failure::RemoteProcess | Failure::Left) {
                debug!(target: "tribes::failure_detector", "send to {} failed ({}); verifying", f.member, f.failure);
                self.enqueue(f.member.clone(), Check::Remove);
            }
        }
    }

    fn received(&self, msg: ChannelMessage, next: Up<'_>) -> Result<(), ProcessError> {
        if msg.payload[..] == PROBE_PAYLOAD[..] {
            return Ok(());
        }
        next.received(msg)
    }

    /// A new member is reported up only once a probe reached it (on a probe thread, which
    /// then passes it on through the stack handle).
    fn member_added(&self, member: Member, _next: Up<'_>) {
        // Bound first: a `match` on the locked call would hold the lock through `enqueue`.
        let next = self.state.lock().member_added(member.clone());
        if let Next::Probe(check) = next {
            self.enqueue(member, check);
        }
    }

    fn member_disappeared(&self, member: Member, next: Up<'_>) {
        let verdict = self.state.lock().member_disappeared(&member);
        match verdict {
            Next::ReportGone => next.member_disappeared(member),
            Next::Probe(check) => self.enqueue(member, check),
            Next::Done => {}
        }
    }

    fn heartbeat(&self, next: Down<'_>) {
        let recheck = self
            .state
            .lock()
            .heartbeat(Instant::now(), self.cfg.remove_suspects_timeout);
        for (m, check) in recheck {
            self.enqueue(m, check);
        }
        next.heartbeat();
    }

    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        if !levels.contains(Levels::SND_TX) {
            return Ok(());
        }
        let mut pool = self.pool.lock();
        if pool.is_some() {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded(self.cfg.max_pending.max(1));
        let requeue: Requeue = Arc::new(Mutex::new(Some(tx.clone())));
        let mut threads = Vec::new();
        for n in 0..self.cfg.threads.max(1) {
            let prober = Prober {
                jobs: rx.clone(),
                requeue: Arc::clone(&requeue),
                handle: handle.clone(),
                state: Arc::clone(&self.state),
                cfg: self.cfg.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tribes-fd-{}-{n}", handle.channel_name()))
                    .spawn(move || prober.run())?,
            );
        }
        *pool = Some(Pool {
            queue: tx,
            requeue,
            threads,
        });
        drop(pool);
        // Members reported before the probe threads ran (static and DNS membership report
        // theirs as the levels below start) are checked now, and `start` returns once they
        // are settled: a node that asks its members for state right after start (a
        // session manager) finds those that answer. The probe threads share them out, and
        // a probe takes at most a connect, a write and (read test) a read timeout, so the
        // wait is bounded by that per round of probes.
        let deferred = self.state.lock().take_deferred();
        let count = deferred.len();
        // One place per check: no send ever waits.
        let (done_tx, done_rx) = crossbeam_channel::bounded(count.max(1));
        for (m, check) in deferred {
            self.enqueue_with(m, check, Some(done_tx.clone()));
        }
        drop(done_tx);
        let rounds = count.div_ceil(self.cfg.threads.max(1)) as u32;
        let deadline = crate::deadline::from_now(
            (Prober::longest(&self.cfg).saturating_mul(rounds))
                .saturating_add(Duration::from_millis(100)),
        );
        for _ in 0..count {
            // Ends early when every queued check reported (a check not queued dropped its
            // sender), or at the deadline.
            if done_rx.recv_deadline(deadline).is_err() {
                break;
            }
        }
        Ok(())
    }

    fn stop(&self, levels: Levels, _handle: &StackHandle) {
        if !levels.contains(Levels::SND_TX) {
            return;
        }
        let pool = self.pool.lock().take();
        if let Some(p) = pool {
            // Every sender gone: the threads finish what is queued and end.
            p.requeue.lock().take();
            drop(p.queue);
            for t in p.threads {
                let _ = t.join();
            }
        }
        // Forgotten with the sending level: after a restart, members are reported (and
        // verified) afresh instead of being taken for known and never reported up.
        *self.state.lock() = Verdicts::default();
    }
}

struct Prober {
    jobs: Receiver<Job>,
    requeue: Requeue,
    handle: StackHandle,
    state: Arc<Mutex<Verdicts>>,
    cfg: FailureDetectorConfig,
}

impl Prober {
    fn run(self) {
        while let Ok(mut job) = self.jobs.recv() {
            let done = job.done.take();
            // Stopping: what is still queued is dropped unprobed (the book is reset).
            if self.requeue.lock().is_none() {
                if let Some(done) = done {
                    let _ = done.send(());
                }
                continue;
            }
            let alive = self.probe(&job.member);
            // Wanted again meanwhile and still silent: once more, behind the probes already
            // queued (this thread is not pinned to a member that stays frozen), or on the
            // next heartbeat if the queue is full or closing.
            if let Some(member) = self.settle(&job, alive) {
                let check = job.check;
                let again = Job {
                    member,
                    check,
                    done: None,
                };
                let queued = match self.requeue.lock().as_ref() {
                    Some(tx) => tx.try_send(again).map_err(|e| e.into_inner()),
                    None => Err(again),
                };
                if let Err(again) = queued {
                    self.state.lock().probe_not_queued(again.member, check);
                }
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }

    /// Connects to the member's receiver and, with the send test, writes the probe message.
    fn probe(&self, m: &Member) -> bool {
        let stream = match TcpStream::connect_timeout(&m.addr(), self.cfg.connect_timeout) {
            Ok(s) => s,
            Err(e) => {
                debug!(target: "tribes::failure_detector", "{m} does not accept connections: {e}");
                return false;
            }
        };
        if !self.cfg.perform_send_test {
            return true;
        }
        let Some(local) = self.handle.local_member() else {
            return false;
        };
        // Tribes sends the probe as a byte message, with an ACK asked only for the read test
        // (reference §12.6).
        let options = if self.cfg.perform_read_test {
            SendOptions::BYTE_MESSAGE | SendOptions::USE_ACK
        } else {
            SendOptions::BYTE_MESSAGE
        };
        let msg = ChannelMessage::control(local, &PROBE_PAYLOAD, options);
        let _ = stream.set_write_timeout(Some(self.cfg.connect_timeout));
        if let Err(e) = (&stream).write_all(&msg.encode_frame()) {
            debug!(target: "tribes::failure_detector", "{m} accepted a connection but not the probe: {e}");
            return false;
        }
        if !self.cfg.perform_read_test {
            return true;
        }
        // Any byte back will do, as in Tribes: an ACK, or a FAIL_ACK from a member that is
        // alive but refused the probe.
        let mut reply = [0u8; 1];
        let _ = stream.set_read_timeout(Some(self.cfg.read_test_timeout));
        match (&stream).read(&mut reply) {
            Ok(1..) => true,
            Ok(0) => {
                debug!(target: "tribes::failure_detector", "{m} closed the connection instead of answering the probe");
                false
            }
            Err(e) => {
                debug!(target: "tribes::failure_detector", "{m} did not answer the probe within {:?}: {e}", self.cfg.read_test_timeout);
                false
            }
        }
    }

    /// The longest one probe can take: connect, write and (with the read test) the wait
    /// for the ACK.
    fn longest(cfg: &FailureDetectorConfig) -> Duration {
        let read = if cfg.perform_read_test {
            cfg.read_test_timeout
        } else {
            Duration::ZERO
        };
        cfg.connect_timeout.saturating_mul(2).saturating_add(read)
    }

    /// Settles the probe and reports the outcome; returns the member to probe again at
    /// once, if it was wanted while this probe ran.
    fn settle(&self, job: &Job, alive: bool) -> Option<Member> {
        let report =
            (self.state.lock()).settle(job.member.clone(), job.check, alive, Instant::now());
        match report {
            Some(Report::Added(m)) => {
                info!(target: "tribes::failure_detector", "verified new member {m}");
                self.handle.member_added(m);
            }
            Some(Report::Gone(m)) => {
                info!(target: "tribes::failure_detector", "verified {m} is gone");
                self.handle.member_disappeared(m);
            }
            Some(Report::Again(m)) => {
                debug!(target: "tribes::failure_detector", "{m} wanted again while its probe ran; probing again");
                return Some(m);
            }
            None => {}
        }
        None
    }
}
