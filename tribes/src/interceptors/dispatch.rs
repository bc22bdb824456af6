//! `MessageDispatchInterceptor`: ASYNCHRONOUS sends return at once and go out on a pool of
//! dispatch threads.
//!
//! Bounded twice: by a byte budget over all queued payloads (Tribes `maxQueueSize`, 64 MiB)
//! and by a message count per thread. A message that does not fit is refused with
//! [`SendError::QueueFull`]; the caller decides (Tribes' default `alwaysSend` sends
//! synchronously instead, which silently turns back-pressure into latency; opt in with
//! [`DispatchConfig::always_send`]).
//!
//! Beyond Tribes: a message goes to the thread chosen by its destination set, so asynchronous
//! messages to the same members keep their order; and each thread writes what it has queued
//! in one batch (one syscall per connection), so small messages are not capped at one
//! syscall each; a batch of messages their senders marked [`SendOptions::LAZY`] lingers a
//! few yields for messages about to be queued ([`DispatchConfig::gather_yields`]).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use parking_lot::Mutex;

use super::{Down, Interceptor, Outgoing, StackHandle, Up};
use crate::channel::Levels;
use crate::error::{ChannelError, Failure, FaultyMember, SendError};
use crate::idle::IdleWait;
use crate::member::{Member, MemberKey};
use crate::options::SendOptions;

/// Settings of [`MessageDispatchInterceptor`].
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Budget of queued payload bytes. Default 64 MiB (Tribes `maxQueueSize`).
    pub max_queue_bytes: usize,
    /// Dispatch threads. Default 10 (Tribes `maxThreads`).
    pub threads: usize,
    /// Messages queued per thread (not counting those its thread is sending). Default
    /// 65536. Memory is taken as messages are queued, not reserved for the whole bound.
    pub max_queue_messages: usize,
    /// Messages a thread takes from its queue for one batched write. Default 256.
    pub batch: usize,
    /// Payload bytes a thread takes for one batched write (at least one message). Default
    /// 256 KiB: enough to fill a socket buffer, small enough that the encoded frames stay in
    /// reused memory instead of fresh pages for every batch.
    pub batch_bytes: usize,
    /// Send on the caller's thread instead of refusing when the queue is full. Default false
    /// (Tribes `alwaysSend` is true; see the module docs). Such a message can overtake
    /// messages to the same members that are still queued, as in Tribes.
    pub always_send: bool,
    /// Times a thread that ran out of messages looks again, yielding the core before each
    /// look, before it goes to sleep; one idle thread looks at a time. Default 100 (not a
    /// Tribes setting; see
    /// [`ReceiverConfig::idle_yields`](crate::transport::ReceiverConfig::idle_yields)).
    pub idle_yields: u32,
    /// Times a thread whose queue ran empty while it gathers a batch of
    /// [`SendOptions::LAZY`] messages yields and looks for more before writing. Default 5
    /// (not a Tribes setting; only messages their sender marked `LAZY` ever wait). Messages
    /// that concurrent senders queue microseconds apart then share one write per member,
    /// and one read and hand-off on the receiver. Measured with asynchronous session
    /// replication, whose deltas are `LAZY` unless a reader may be waiting for them (three
    /// nodes, 2 cores, alternating pairs): behind a sticky balancer 5 gave 0.89× instead of
    /// 0.77× of one local-only node on average (node CPU per request +5.7 µs instead of
    /// +9.6 µs over no replication); 20 gave 0.86–0.98×, but a yield on a loaded machine can
    /// last another thread's time slice, which a waiting reader would feel (read-your-writes
    /// behind round robin fell from 0.44× to 0.40× with 5 and to 0.31× with 20 when its
    /// deltas gathered too). 0 writes what is queued at once.
    pub gather_yields: u32,
    /// How long `stop` goes on sending what is queued. Default 10 s (not a Tribes setting;
    /// Tribes drops the queue). Messages still queued after that fail with
    /// [`SendError::NotStarted`] (their handlers hear it) instead of each batch waiting for
    /// connects to a member that went away: with a dead host that could hold `stop` for
    /// minutes.
    pub stop_drain: std::time::Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_queue_bytes: 64 * 1024 * 1024,
            threads: 10,
            max_queue_messages: 65536,
            batch: 256,
            batch_bytes: 256 * 1024,
            always_send: false,
            idle_yields: 100,
            gather_yields: 5,
            stop_drain: std::time::Duration::from_secs(10),
        }
    }
}

impl DispatchConfig {
    /// Checks that the values can work (called by `start`): at most 1024 threads and a
    /// batch of at most 65,536 messages, which are allocated up front. Zeros are taken as 1.
    ///
    /// ```
    /// use tribes::interceptors::DispatchConfig;
    /// assert!(DispatchConfig::default().validate().is_ok());
    /// assert!(DispatchConfig { threads: usize::MAX, ..Default::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        let invalid = |field, reason: &str| {
            Err(crate::error::ConfigError {
                field,
                reason: reason.into(),
            })
        };
        if self.threads > 1024 {
            return invalid("threads", "at most 1024");
        }
        if self.batch > 65536 {
            return invalid("batch", "at most 65536 messages");
        }
        Ok(())
    }
}

/// Sends ASYNCHRONOUS messages from a bounded queue on named dispatch threads
/// (`tribes-dispatch-<channel>-<n>`).
///
/// ```
/// use tribes::interceptors::{DispatchConfig, MessageDispatchInterceptor};
/// let d = MessageDispatchInterceptor::new(DispatchConfig { threads: 2, ..Default::default() });
/// assert_eq!(d.queued_bytes(), 0);
/// assert_eq!(d.queued_messages(), 0);
/// ```
pub struct MessageDispatchInterceptor {
    cfg: DispatchConfig,
    queued: Arc<AtomicUsize>,
    running: Mutex<Option<Running>>,
    failures: Arc<AtomicU64>,
    /// Messages refused for a full queue.
    refused: AtomicU64,
    departures: Arc<Departures>,
}

/// One dispatch thread's queue, and how many messages wait in it: the channel is
/// unbounded, the count bounds it. Shared by `Arc`, so a send clones one pointer.
struct Queue {
    tx: Sender<Queued>,
    len: Arc<AtomicUsize>,
}

/// A message in a queue, with the departure count when it was queued.
struct Queued {
    out: Outgoing,
    departures: u64,
}

/// Members that left the group (reported gone up the stack), so that messages queued
/// before they left are not sent to them: a member found frozen would otherwise hold its
/// dispatch thread for the send timeout once more for every batch queued to it.
#[derive(Default)]
struct Departures {
    /// Departures so far: a message queued at count `n` skips the members that left at a
    /// later count. One load per message while nobody leaves.
    count: AtomicU64,
    /// When each member that is still away left (cleared when it is added again; at most
    /// [`MAX_DEPARTED`] remembered).
    left: Mutex<std::collections::HashMap<MemberKey, u64>>,
}

/// Departed members remembered; past it the oldest are forgotten (a message queued before
/// such a member left is then still sent to it, as before this bookkeeping).
const MAX_DEPARTED: usize = 4096;

impl Departures {
    fn left(&self, member: &Member) {
        let mut left = self.left.lock();
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if left.len() >= MAX_DEPARTED {
            if let Some(oldest) = left.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                left.remove(&oldest);
            }
        }
        left.insert(member.key(), n);
    }

    fn returned(&self, member: &Member) {
        if self.count.load(Ordering::Acquire) > 0 {
            self.left.lock().remove(&member.key());
        }
    }

    /// Takes out of `out`'s destinations the members that left since count `since`, and
    /// returns them.
    fn skip_departed(&self, out: &mut Outgoing, since: u64) -> Vec<FaultyMember> {
        if self.count.load(Ordering::Acquire) <= since {
            return Vec::new();
        }
        let left = self.left.lock();
        let mut skipped = Vec::new();
        out.destinations.retain(|m| {
            let gone = left.get(&m.key()).is_some_and(|at| *at > since);
            if gone {
                skipped.push(FaultyMember {
                    member: m.clone(),
                    failure: Failure::Left,
                });
            }
            !gone
        });
        skipped
    }
}

struct Running {
    queues: Vec<Arc<Queue>>,
    threads: Vec<JoinHandle<()>>,
    /// Set by `stop`: past it, the threads fail what is left instead of sending it.
    drain_until: Arc<std::sync::OnceLock<std::time::Instant>>,
}

impl Default for MessageDispatchInterceptor {
    fn default() -> Self {
        Self::new(DispatchConfig::default())
    }
}

impl MessageDispatchInterceptor {
    /// A dispatcher with the given settings.
    pub fn new(cfg: DispatchConfig) -> Self {
        Self {
            cfg,
            queued: Arc::new(AtomicUsize::new(0)),
            running: Mutex::new(None),
            failures: Arc::new(AtomicU64::new(0)),
            refused: AtomicU64::new(0),
            departures: Arc::new(Departures::default()),
        }
    }

    /// Payload bytes waiting to be sent.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Messages waiting in the queues (not counting those a thread is sending).
    pub fn queued_messages(&self) -> usize {
        let running = self.running.lock();
        (running.as_ref()).map_or(0, |r| {
            r.queues.iter().map(|q| q.len.load(Ordering::Acquire)).sum()
        })
    }

    /// Messages refused because the queue was full ([`SendError::QueueFull`]).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Asynchronous sends that failed for at least one member.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn shard(&self, out: &Outgoing, n: usize) -> usize {
        let mut h = DefaultHasher::new();
        for m in &out.destinations {
            m.key().hash(&mut h);
        }
        (h.finish() % n as u64) as usize
    }
}

impl Interceptor for MessageDispatchInterceptor {
    fn name(&self) -> &'static str {
        "MessageDispatchInterceptor"
    }

    fn option_flag(&self) -> SendOptions {
        SendOptions::ASYNCHRONOUS
    }

    fn member_added(&self, member: Member, next: Up<'_>) {
        self.departures.returned(&member);
        next.member_added(member);
    }

    fn member_disappeared(&self, member: Member, next: Up<'_>) {
        self.departures.left(&member);
        next.member_disappeared(member);
    }

    fn send(&self, out: Outgoing, next: Down<'_>) -> Result<(), SendError> {
        let size = out.message.payload.len();
        let max = self.cfg.max_queue_bytes;
        let queue = {
            let running = self.running.lock();
            let Some(r) = running.as_ref() else {
                return Err(SendError::NotStarted);
            };
            r.queues[self.shard(&out, r.queues.len())].clone()
        };
        // The message's bytes and its place in the queue are taken before the send, and
        // both given back if either does not fit.
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        let waiting = queue.len.fetch_add(1, Ordering::AcqRel);
        let bytes_full = before + size > max && before > 0;
        if bytes_full || waiting >= self.cfg.max_queue_messages.max(1) {
            queue.len.fetch_sub(1, Ordering::AcqRel);
            self.queued.fetch_sub(size, Ordering::AcqRel);
            if self.cfg.always_send {
                return next.send(out);
            }
            // Sparse: while the queue is full every send is refused alike (and a caller
            // may try again every few milliseconds).
            let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if crate::sparse(n) {
                if bytes_full {
                    warn!(target: "tribes::dispatch", "async queue full ({before} of {max} bytes); refusing message ({n} refused so far)");
                } else {
                    warn!(target: "tribes::dispatch", "async queue full ({waiting} messages); refusing message ({n} refused so far)");
                }
            } else {
                debug!(target: "tribes::dispatch", "async queue full; refusing message");
            }
            return Err(SendError::QueueFull {
                queued: before,
                max,
            });
        }
        let departures = self.departures.count.load(Ordering::Acquire);
        match queue.tx.send(Queued { out, departures }) {
            Ok(()) => Ok(()),
            Err(_) => {
                queue.len.fetch_sub(1, Ordering::AcqRel);
                self.queued.fetch_sub(size, Ordering::AcqRel);
                Err(SendError::NotStarted)
            }
        }
    }

    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        if !levels.contains(Levels::SND_TX) {
            return Ok(());
        }
        self.cfg.validate()?;
        let mut running = self.running.lock();
        if running.is_some() {
            return Ok(());
        }
        let threads = self.cfg.threads.max(1);
        let mut queues = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        let idle = Arc::new(IdleWait::new(self.cfg.idle_yields));
        let drain_until = Arc::new(std::sync::OnceLock::new());
        for n in 0..threads {
            // Bounded by `max_queue_messages` in `send`, not by the channel: a bounded
            // channel allocates and touches every slot up front (10 threads × 65536 slots
            // were 160 MB per node before a single message), where this one grows in
            // small blocks with what is queued.
            let (tx, rx) = crossbeam_channel::unbounded();
            let len = Arc::new(AtomicUsize::new(0));
            let worker = DispatchWorker {
                rx,
                departures: Arc::clone(&self.departures),
                len: Arc::clone(&len),
                handle: handle.clone(),
                queued: Arc::clone(&self.queued),
                failures: Arc::clone(&self.failures),
                batch: self.cfg.batch.max(1),
                batch_bytes: self.cfg.batch_bytes,
                idle: Arc::clone(&idle),
                gather_yields: self.cfg.gather_yields,
                drain_until: Arc::clone(&drain_until),
            };
            let h = std::thread::Builder::new()
                .name(format!("tribes-dispatch-{}-{n}", handle.channel_name()))
                .spawn(move || worker.run())
                .map_err(ChannelError::Io)?;
            queues.push(Arc::new(Queue { tx, len }));
            handles.push(h);
        }
        *running = Some(Running {
            queues,
            threads: handles,
            drain_until,
        });
        Ok(())
    }

    /// Stops taking messages, sends what is queued (for at most
    /// [`DispatchConfig::stop_drain`]; the rest fails), and joins the threads.
    fn stop(&self, levels: Levels, _handle: &StackHandle) {
        if !levels.contains(Levels::SND_TX) {
            return;
        }
        let running = self.running.lock().take();
        if let Some(r) = running {
            let _ = r
                .drain_until
                .set(crate::deadline::from_now(self.cfg.stop_drain));
            drop(r.queues);
            for t in r.threads {
                let _ = t.join();
            }
        }
    }
}

struct DispatchWorker {
    rx: Receiver<Queued>,
    departures: Arc<Departures>,
    /// Messages in `rx` (see `Queue`).
    len: Arc<AtomicUsize>,
    handle: StackHandle,
    queued: Arc<AtomicUsize>,
    failures: Arc<AtomicU64>,
    batch: usize,
    batch_bytes: usize,
    idle: Arc<IdleWait>,
    gather_yields: u32,
    drain_until: Arc<std::sync::OnceLock<std::time::Instant>>,
}

impl DispatchWorker {
    fn run(self) {
        let mut jobs = Vec::with_capacity(self.batch);
        // Per job, the destinations left out because they left after it was queued.
        let mut departed: Vec<Vec<FaultyMember>> = Vec::with_capacity(self.batch);
        // A batch of messages nobody waits on (all `LAZY`) may wait a few yields for messages
        // that concurrent senders are about to queue: one write then carries several.
        let lazy = |j: &Outgoing| j.message.options.contains(SendOptions::LAZY);
        let take = |q: Queued, jobs: &mut Vec<Outgoing>, departed: &mut Vec<Vec<FaultyMember>>| {
            let Queued {
                mut out,
                departures,
            } = q;
            departed.push(self.departures.skip_departed(&mut out, departures));
            jobs.push(out);
        };
        while let Ok(first) = self.idle.recv(&self.rx) {
            let mut bytes = first.out.message.payload.len();
            let mut gather = if lazy(&first.out) {
                self.gather_yields
            } else {
                0
            };
            take(first, &mut jobs, &mut departed);
            while jobs.len() < self.batch && bytes < self.batch_bytes {
                match self.rx.try_recv() {
                    Ok(j) => {
                        if !lazy(&j.out) {
                            gather = 0;
                        }
                        bytes += j.out.message.payload.len();
                        take(j, &mut jobs, &mut departed);
                    }
                    Err(_) if gather == 0 => break,
                    Err(_) => {
                        gather -= 1;
                        std::thread::yield_now();
                    }
                }
            }
            // Taken out of the queue: their places are free for new messages.
            self.len.fetch_sub(jobs.len(), Ordering::AcqRel);
            let too_late =
                (self.drain_until.get()).is_some_and(|t| std::time::Instant::now() >= *t);
            if too_late {
                self.fail_batch(&mut jobs);
            } else {
                self.send_batch(&mut jobs, &mut departed);
            }
            departed.clear();
        }
    }

    /// Stopping and past the drain time: the batch fails unsent.
    fn fail_batch(&self, jobs: &mut Vec<Outgoing>) {
        warn!(target: "tribes::dispatch", "stopping: {} queued message(s) not sent (the stop's drain time ran out)", jobs.len());
        for job in jobs.drain(..) {
            self.queued
                .fetch_sub(job.message.payload.len(), Ordering::AcqRel);
            self.failures.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = &job.handler {
                h.handle_error(SendError::NotStarted, job.message.unique_id);
            }
        }
    }

    fn send_batch(&self, jobs: &mut Vec<Outgoing>, departed: &mut [Vec<FaultyMember>]) {
        let mut immediate: Vec<(usize, SendError)> = Vec::new();
        let mut next = 0;
        let failures = self.handle.batch(&mut |b| {
            for (i, job) in jobs.iter().enumerate().skip(next) {
                next = i + 1;
                // Every destination left: nothing to send.
                if job.destinations.is_empty() && !departed[i].is_empty() {
                    continue;
                }
                b.tag(i);
                // This thread tells the handler how the batch went; below, nobody else may.
                let down = Outgoing {
                    handler: None,
                    ..job.clone()
                };
                if let Err(e) = self.handle.send(down) {
                    immediate.push((i, e));
                }
            }
        });
        let mut by_job: Vec<Vec<FaultyMember>> = vec![Vec::new(); jobs.len()];
        for (tag, f) in failures {
            if let Some(v) = by_job.get_mut(tag) {
                v.push(f);
            }
        }
        let mut errors: Vec<Option<SendError>> = vec![None; jobs.len()];
        for (i, e) in immediate {
            errors[i] = Some(e);
        }
        for (i, job) in jobs.drain(..).enumerate() {
            self.queued
                .fetch_sub(job.message.payload.len(), Ordering::AcqRel);
            let mut faulty = std::mem::take(&mut by_job[i]);
            faulty.append(&mut departed[i]);
            let err = match errors[i].take() {
                Some(SendError::Faulty(mut v)) => {
                    v.extend(faulty);
                    Some(SendError::Faulty(v))
                }
                Some(e) => Some(e),
                None if !faulty.is_empty() => Some(SendError::Faulty(faulty)),
                None => None,
            };
            let id = job.message.unique_id;
            match (err, &job.handler) {
                (None, Some(h)) => h.handle_completion(id),
                (None, None) => {}
                (Some(e), Some(h)) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    h.handle_error(e, id);
                }
                // Missed only members that left since it was queued: nobody to tell.
                (Some(e), None) if e.missed_only_departed() => {
                    debug!(target: "tribes::dispatch", "async message {id} not sent to {} member(s) that left", e.faulty_members().len());
                }
                (Some(e), None) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    warn!(target: "tribes::dispatch", "async message {id} failed: {e}");
                }
            }
        }
        debug!(target: "tribes::dispatch", "batch sent");
    }
}
