//! The pooled sender: per destination a pool of keep-alive connections, several messages in
//! flight per connection with ACKs matched in order, and write batching.
//!
//! A send writes the frame to every destination first and then collects the ACKs, so the
//! destinations work in parallel while one thread drives them (Tribes `ParallelNioSender`).
//! The thread waiting for the oldest outstanding ACK on a connection reads the socket for
//! everybody ("leader reads"), so a lone sender pays one wake-up per round trip, like a raw
//! request/ACK loop.
//!
//! A [`Batch`] collects the frames one thread sends to the same members and writes them with
//! one syscall per connection: the async dispatcher uses it, so small asynchronous messages
//! are not capped at one syscall each.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{debug, warn};
use parking_lot::{Condvar, Mutex};

use super::config::SenderConfig;
use crate::error::{Failure, FaultyMember, SendError};
use crate::member::{Member, MemberKey};
use crate::wire::{AckCommand, ChannelMessage, FrameDecoder, END_MARKER};

/// One framed message, ready to write: a head and, for large payloads, the payload as its
/// own buffer, so it is written straight from the application's bytes (no copy).
#[derive(Clone, Debug)]
pub struct Frame {
    head: Bytes,
    body: Bytes,
    tail: &'static [u8],
}

impl Frame {
    /// Payloads from this size on are written from their own buffer instead of being copied
    /// into the frame; below it one contiguous buffer is cheaper.
    pub const SPLIT_AT: usize = 8 * 1024;

    /// A frame already encoded into one buffer (e.g. by [`crate::wire::encode_frame`]).
    pub fn contiguous(frame: Bytes) -> Self {
        Self {
            head: frame,
            body: Bytes::new(),
            tail: &[],
        }
    }

    /// Frames an envelope.
    pub fn message(msg: &ChannelMessage) -> Self {
        if msg.payload.len() < Self::SPLIT_AT {
            Self::contiguous(msg.encode_frame())
        } else {
            Self {
                head: msg.encode_frame_head(),
                body: msg.payload.clone(),
                tail: END_MARKER,
            }
        }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len() + self.tail.len()
    }

    /// True for an empty frame (never produced by the constructors above with real data).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of a sender.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Connections opened.
    pub connects: AtomicU64,
    /// Frames written (one per destination).
    pub frames: AtomicU64,
    /// Write syscalls issued for frames.
    pub writes: AtomicU64,
    /// Destinations that failed.
    pub failures: AtomicU64,
}

/// The sending side of the transport.
pub struct Sender {
    cfg: SenderConfig,
    peers: Mutex<HashMap<MemberKey, Arc<Peer>>>,
    stopped: AtomicBool,
    stats: SenderStats,
}

impl Sender {
    /// A sender with the given settings, refusing sends ([`SendError::NotStarted`]) until
    /// [`Sender::start`]; connections are opened on demand.
    pub fn new(cfg: SenderConfig) -> Self {
        Self {
            cfg,
            peers: Mutex::new(HashMap::new()),
            // A channel built but not started must not send (as its asynchronous sends
            // already could not): its advertised address is not even bound yet.
            stopped: AtomicBool::new(true),
            stats: SenderStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// The settings.
    pub fn config(&self) -> &SenderConfig {
        &self.cfg
    }

    /// Sends one framed message to every member; waits for ACKs when `ack` is true.
    ///
    /// Inside [`Batch::run`] on this thread the frame is only queued and `Ok` is returned;
    /// the batch reports failures when it ends.
    pub fn send(&self, frame: &Frame, members: &[Member], ack: bool) -> Result<(), SendError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(SendError::NotStarted);
        }
        if members.is_empty() {
            return Err(SendError::NoDestinations);
        }
        if Batch::enqueue(self, frame, members, ack) {
            return Ok(());
        }
        let deadline = crate::deadline::from_now(self.cfg.timeout);
        let mut faulty = Vec::new();
        let mut tickets = Vec::with_capacity(members.len());
        for m in members {
            match self.write_with_retry(m, std::slice::from_ref(frame), ack, deadline) {
                Ok(t) => tickets.push(t),
                Err(f) => faulty.push(FaultyMember {
                    member: m.clone(),
                    failure: f,
                }),
            }
        }
        for mut t in tickets {
            if let Err(f) = self.finish(&mut t, std::slice::from_ref(frame)) {
                faulty.push(FaultyMember {
                    member: t.member.clone(),
                    failure: f,
                });
            }
        }
        self.result(faulty)
    }

    /// Closes connections that exceeded their keep-alive count or age, or whose peer closed.
    /// Called from the channel heartbeat.
    pub fn keep_alive_check(&self) {
        let peers: Vec<_> = self.peers.lock().values().cloned().collect();
        for p in peers {
            p.conns.lock().retain(|c| {
                let keep =
                    c.users.load(Ordering::Acquire) > 0 || !self.expired(c) && c.peer_alive();
                if !keep {
                    c.close();
                }
                keep
            });
        }
    }

    /// Drops every connection to `member` (e.g. when it left the group).
    pub fn remove(&self, member: &Member) {
        if let Some(p) = self.peers.lock().remove(&member.key()) {
            for c in p.conns.lock().drain(..) {
                c.close();
            }
        }
    }

    /// Closes every connection and refuses further sends.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        for (_, p) in self.peers.lock().drain() {
            for c in p.conns.lock().drain(..) {
                c.close();
            }
        }
    }

    /// Enables sending (again, after [`Sender::stop`]).
    pub fn start(&self) {
        self.stopped.store(false, Ordering::Release);
    }

    fn result(&self, faulty: Vec<FaultyMember>) -> Result<(), SendError> {
        if faulty.is_empty() {
            Ok(())
        } else {
            self.stats
                .failures
                .fetch_add(faulty.len() as u64, Ordering::Relaxed);
            Err(SendError::Faulty(faulty))
        }
    }

    fn peer(&self, m: &Member) -> Arc<Peer> {
        let mut peers = self.peers.lock();
        Arc::clone(peers.entry(m.key()).or_insert_with(|| {
            Arc::new(Peer {
                addr: m.addr(),
                conns: Mutex::new(Vec::new()),
            })
        }))
    }

    /// Picks a connection. A thread keeps using the connection it used last for a member, so
    /// the messages one thread sends to one member arrive in the order they were sent. A
    /// thread without one takes an idle connection, else a new one while the pool has room,
    /// else the one with the fewest users (its messages are then pipelined).
    fn acquire(&self, m: &Member) -> Result<(Arc<Peer>, Arc<Conn>), Failure> {
        let peer = self.peer(m);
        let key = (self as *const Self as usize, m.key());
        loop {
            let sticky = AFFINITY.with(|a| a.borrow().get(&key).and_then(std::sync::Weak::upgrade));
            let candidate = {
                let mut conns = peer.conns.lock();
                conns.retain(|c| !c.is_broken());
                if let Some(c) = sticky.filter(|c| conns.iter().any(|x| Arc::ptr_eq(x, c))) {
                    c.users.fetch_add(1, Ordering::AcqRel);
                    Some(c)
                } else if let Some(c) = conns.iter().find(|c| c.users.load(Ordering::Acquire) == 0)
                {
                    c.users.fetch_add(1, Ordering::AcqRel);
                    Some(Arc::clone(c))
                } else if conns.len() >= self.cfg.pool_size {
                    let c = conns
                        .iter()
                        .min_by_key(|c| c.users.load(Ordering::Acquire))
                        .map(Arc::clone);
                    if let Some(c) = &c {
                        c.users.fetch_add(1, Ordering::AcqRel);
                    }
                    c
                } else {
                    None
                }
            };
            match candidate {
                Some(c) => {
                    // A connection idle for a while may have been closed by a restarted peer;
                    // check before trusting it with a message that gets no ACK.
                    if c.idle_for() >= self.cfg.idle_check_after && !c.peer_alive() {
                        debug!(target: "tribes::transport", "connection to {} closed by peer; reconnecting", peer.addr);
                        c.close();
                        c.users.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    AFFINITY.with(|a| a.borrow_mut().insert(key, Arc::downgrade(&c)));
                    return Ok((peer, c));
                }
                None => {
                    let c = Arc::new(Conn::connect(peer.addr, &self.cfg).map_err(|e| {
                        debug!(target: "tribes::transport", "connect to {} failed: {e}", peer.addr);
                        Failure::connect(&e)
                    })?);
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    c.users.store(1, Ordering::Release);
                    peer.conns.lock().push(Arc::clone(&c));
                    AFFINITY.with(|a| a.borrow_mut().insert(key, Arc::downgrade(&c)));
                    return Ok((peer, c));
                }
            }
        }
    }

    fn release(&self, peer: &Peer, conn: &Arc<Conn>) {
        let left = conn.users.fetch_sub(1, Ordering::AcqRel) - 1;
        if conn.is_broken() || (left == 0 && self.expired(conn)) {
            conn.close();
            peer.conns.lock().retain(|c| !Arc::ptr_eq(c, conn));
        }
    }

    fn expired(&self, c: &Conn) -> bool {
        self.cfg
            .keep_alive_count
            .is_some_and(|n| c.requests.load(Ordering::Relaxed) >= n)
            || self
                .cfg
                .keep_alive_time
                .is_some_and(|t| c.created.elapsed() >= t)
    }

    /// Writes `frames` to `m`, reconnecting and rewriting after an I/O failure while retries
    /// are left.
    fn write_with_retry(
        &self,
        m: &Member,
        frames: &[Frame],
        ack: bool,
        deadline: Instant,
    ) -> Result<Ticket, Failure> {
        let mut attempt = 0;
        loop {
            let res = self.acquire(m).and_then(|(peer, conn)| {
                match conn.write(frames, ack, &self.stats) {
                    Ok(seqs) => Ok(Ticket {
                        member: m.clone(),
                        peer,
                        conn,
                        seqs,
                        ack,
                        attempt,
                        written: Instant::now(),
                    }),
                    Err(f) => {
                        self.release(&peer, &conn);
                        Err(f)
                    }
                }
            });
            match res {
                Err(f @ Failure::Io { .. })
                    if attempt < self.cfg.max_retry_attempts && Instant::now() < deadline =>
                {
                    debug!(target: "tribes::transport", "resending to {m} after {f}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Waits for the ticket's ACKs (if any) and releases its connection; on an I/O failure
    /// while waiting, resends once more if retries are left (as Tribes does).
    ///
    /// Each member has the whole timeout from when its frames were written to answer: with
    /// one deadline for the send, a member whose connect hung would have used it up, and
    /// the healthy members written to after it would have been reported as timed out
    /// although they got the message (Tribes connects to all members in parallel, so one
    /// hanging connect does not delay the others there either).
    fn finish(&self, t: &mut Ticket, frames: &[Frame]) -> Result<(), Failure> {
        loop {
            // This member's own deadline, for the ACK wait and for a resend alike.
            let own = crate::deadline::after(t.written, self.cfg.timeout);
            let res = if t.ack {
                t.conn.wait_acks(&t.seqs, own)
            } else {
                Ok(())
            };
            self.release(&t.peer, &t.conn);
            match res {
                Err(Failure::Io { .. })
                    if t.attempt < self.cfg.max_retry_attempts && Instant::now() < own =>
                {
                    let mut next = self.write_with_retry(&t.member, frames, t.ack, own)?;
                    next.attempt = next.attempt.max(t.attempt + 1);
                    *t = next;
                }
                other => return other,
            }
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Peer {
    addr: SocketAddr,
    conns: Mutex<Vec<Arc<Conn>>>,
}

struct Ticket {
    member: Member,
    peer: Arc<Peer>,
    conn: Arc<Conn>,
    seqs: Vec<u64>,
    ack: bool,
    attempt: u32,
    /// When the frames were written: the member has the send timeout from then to answer.
    written: Instant,
}

/// One TCP connection to a peer's receiver.
struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    created: Instant,
    /// Threads currently using the connection.
    users: AtomicUsize,
    requests: AtomicU64,
    /// Serialises writes; holds the next ACK sequence number so sequence order = byte order.
    write: Mutex<WriteState>,
    acks: Mutex<AckState>,
    acked_cv: Condvar,
    /// Only the thread that is the current ACK reader touches it.
    /// Decodes the peer's replies; with the socket's read timeout as last set (read under
    /// the same lock, so it is only set when it changes).
    reply_decoder: Mutex<(FrameDecoder, Duration)>,
    last_used: Mutex<Instant>,
}

struct WriteState {
    next_seq: u64,
}

struct AckState {
    /// Every sequence number below this has been answered.
    acked: u64,
    /// Answered with FAIL_ACK and not yet collected.
    failed: HashSet<u64>,
    /// A thread is reading the socket for ACKs.
    reader: bool,
    broken: Option<Failure>,
}

impl Conn {
    fn connect(addr: SocketAddr, cfg: &SenderConfig) -> io::Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_send_buffer_size(cfg.tx_buf_size)?;
        socket.set_recv_buffer_size(cfg.rx_buf_size)?;
        socket.set_nodelay(cfg.tcp_no_delay)?;
        socket.connect_timeout(&addr.into(), cfg.timeout)?;
        let stream: TcpStream = socket.into();
        stream.set_write_timeout(Some(cfg.timeout))?;
        stream.set_read_timeout(Some(cfg.timeout))?;
        Ok(Self {
            stream,
            addr,
            created: Instant::now(),
            users: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            write: Mutex::new(WriteState { next_seq: 0 }),
            acks: Mutex::new(AckState {
                acked: 0,
                failed: HashSet::new(),
                reader: false,
                broken: None,
            }),
            acked_cv: Condvar::new(),
            reply_decoder: Mutex::new((FrameDecoder::new(1024), cfg.timeout)),
            last_used: Mutex::new(Instant::now()),
        })
    }

    fn is_broken(&self) -> bool {
        self.acks.lock().broken.is_some()
    }

    fn idle_for(&self) -> Duration {
        self.last_used.lock().elapsed()
    }

    /// Non-blocking check that the peer has not closed the connection. Only safe to call when
    /// no ACK is outstanding (it may consume nothing, but a reader might be blocked).
    fn peer_alive(&self) -> bool {
        if self.acks.lock().reader {
            return true;
        }
        // MSG_PEEK | MSG_DONTWAIT: a one-off non-blocking peek that leaves the socket's
        // blocking mode alone (toggling O_NONBLOCK would break a concurrent blocking write).
        const MSG_PEEK: i32 = 0x02;
        const MSG_DONTWAIT: i32 = 0x40;
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(&self.stream).recv_with_flags(&mut b, MSG_PEEK | MSG_DONTWAIT)
        {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        }
    }

    fn break_with(&self, f: Failure) {
        let mut st = self.acks.lock();
        if st.broken.is_none() {
            st.broken = Some(f);
        }
        drop(st);
        self.acked_cv.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn close(&self) {
        self.break_with(Failure::Stopped);
    }

    /// Writes the frames in one go; returns the ACK sequence numbers they were given.
    fn write(&self, frames: &[Frame], ack: bool, stats: &SenderStats) -> Result<Vec<u64>, Failure> {
        let mut w = self.write.lock();
        if let Some(f) = self.acks.lock().broken.clone() {
            return Err(f);
        }
        let seqs: Vec<u64> = if ack {
            let first = w.next_seq;
            w.next_seq += frames.len() as u64;
            (first..w.next_seq).collect()
        } else {
            Vec::new()
        };
        let res = match frames {
            [f] if f.body.is_empty() => (&self.stream).write_all(&f.head),
            _ => write_all_vectored(&self.stream, frames),
        };
        drop(w);
        stats.writes.fetch_add(1, Ordering::Relaxed);
        stats
            .frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.requests
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        *self.last_used.lock() = Instant::now();
        match res {
            Ok(()) => Ok(seqs),
            Err(e) => {
                let f = if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    Failure::Timeout
                } else {
                    Failure::io(&e)
                };
                self.break_with(f.clone());
                Err(f)
            }
        }
    }

    /// Waits until every sequence number in `seqs` is answered; the first FAIL_ACK wins.
    fn wait_acks(&self, seqs: &[u64], deadline: Instant) -> Result<(), Failure> {
        let Some(&last) = seqs.last() else {
            return Ok(());
        };
        let mut looked = false;
        let mut st = self.acks.lock();
        loop {
            if st.acked > last {
                let mut result = Ok(());
                for s in seqs {
                    if st.failed.remove(s) {
                        result = Err(Failure::RemoteProcess);
                    }
                }
                return result;
            }
            if let Some(f) = &st.broken {
                return Err(f.clone());
            }
            let now = Instant::now();
            // Past the deadline, what has already arrived is still read once (this thread
            // may have been kept off the core until after its deadline while the ACK sat in
            // the socket); only then is the connection given up.
            let last_look = now >= deadline;
            if last_look && (looked || st.reader) {
                // A late ACK would be matched to the wrong message: the connection is done.
                drop(st);
                warn!(target: "tribes::transport", "no ACK from {} within the send timeout", self.addr);
                self.break_with(Failure::Timeout);
                return Err(Failure::Timeout);
            }
            if st.reader {
                self.acked_cv.wait_until(&mut st, deadline);
                continue;
            }
            looked = last_look;
            st.reader = true;
            drop(st);
            let read = self.read_replies(deadline.saturating_duration_since(now));
            st = self.acks.lock();
            st.reader = false;
            match read {
                Ok(replies) => {
                    for r in replies {
                        if r == AckCommand::FailAck {
                            let seq = st.acked;
                            st.failed.insert(seq);
                        }
                        st.acked += 1;
                    }
                }
                Err(f) => {
                    if st.broken.is_none() {
                        st.broken = Some(f);
                    }
                    let _ = self.stream.shutdown(Shutdown::Both);
                }
            }
            self.acked_cv.notify_all();
        }
    }

    /// One blocking read (bounded by `wait`); returns the replies it completed.
    fn read_replies(&self, wait: Duration) -> Result<Vec<AckCommand>, Failure> {
        let mut reader = self.reply_decoder.lock();
        let (decoder, timeout) = &mut *reader;
        let mut buf = [0u8; 512];
        // The timeout set is changed only when it would overshoot the deadline by more
        // than a little, or is short enough to make the caller's wait a spin of short
        // reads: the common ACK read then costs no extra system call. Zero would mean
        // "no timeout".
        let want = wait.max(Duration::from_millis(1));
        let overshoots = *timeout > want + Duration::from_millis(50);
        let spins = *timeout < want && *timeout < Duration::from_millis(500);
        if (overshoots || spins) && self.stream.set_read_timeout(Some(want)).is_ok() {
            *timeout = want;
        }
        let n = loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    return Err(Failure::Io {
                        kind: io::ErrorKind::UnexpectedEof,
                        detail: "connection closed before the ACK".into(),
                    })
                }
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(Failure::io(&e)),
            }
        };
        decoder.push(&buf[..n]);
        let mut out = Vec::new();
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => match AckCommand::decode(&body) {
                    Ok(cmd) => out.push(cmd),
                    // Tribes consumes and ignores other reply bodies.
                    Err(_) => {
                        debug!(target: "tribes::transport", "ignoring unknown reply from {}", self.addr)
                    }
                },
                Ok(None) => break,
                Err(e) => return Err(Failure::Protocol(e.to_string())),
            }
        }
        Ok(out)
    }
}

/// Per thread: the connection last used for (sender, member), for per-thread ordering.
type AffinityMap = HashMap<(usize, MemberKey), std::sync::Weak<Conn>>;

/// Writes every frame with as few `writev` calls as the kernel allows, without copying them
/// into one buffer first.
fn write_all_vectored(mut stream: &TcpStream, frames: &[Frame]) -> io::Result<()> {
    /// Stay well under the kernel's IOV_MAX (1024 on Linux).
    const MAX_SLICES: usize = 512;
    let mut slices: Vec<IoSlice<'_>> = frames
        .iter()
        .flat_map(|f| [&f.head[..], &f.body[..], f.tail])
        .filter(|s| !s.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(MAX_SLICES);
        match stream.write_vectored(&rest[..take]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

thread_local! {
    static AFFINITY: RefCell<AffinityMap> = RefCell::new(HashMap::new());
}

thread_local! {
    /// The batch open on this thread: the address of the sender it belongs to (compared,
    /// never dereferenced), the current tag and the queued frames.
    static BATCH: RefCell<Option<BatchState>> = const { RefCell::new(None) };
}

struct BatchState {
    sender: usize,
    tag: usize,
    entries: Vec<BatchEntry>,
}

struct BatchEntry {
    member: Member,
    frames: Vec<Frame>,
    tags: Vec<usize>,
    ack: bool,
}

/// Write batching for one thread: frames sent through `sender` inside [`Batch::run`] are
/// collected per destination and written with one syscall per connection when the closure
/// returns; ACKs are then collected for all of them (pipelined).
///
/// ```no_run
/// # use tribes::transport::{Batch, Sender};
/// # fn demo(sender: &Sender, frames: &[tribes::transport::Frame], to: &[tribes::Member]) {
/// let ((), failures) = Batch::run(sender, |batch| {
///     for (i, f) in frames.iter().enumerate() {
///         batch.tag(i);
///         let _ = sender.send(f, to, false);
///     }
/// });
/// for (tag, faulty) in failures {
///     eprintln!("message {tag} failed for {faulty}");
/// }
/// # }
/// ```
pub struct Batch {
    _private: (),
}

impl Batch {
    /// Runs `f` with batching on for `sender`, then writes everything and waits for ACKs.
    /// Returns the failures as (tag, member) pairs; tags are set with [`Batch::tag`].
    pub fn run<R>(
        sender: &Sender,
        f: impl FnOnce(&mut Self) -> R,
    ) -> (R, Vec<(usize, FaultyMember)>) {
        let outer = BATCH.with(|b| {
            b.borrow_mut().replace(BatchState {
                sender: sender as *const Sender as usize,
                tag: 0,
                entries: Vec::new(),
            })
        });
        let out = f(&mut Self { _private: () });
        let state = BATCH.with(|b| std::mem::replace(&mut *b.borrow_mut(), outer));
        let mut failures = Vec::new();
        if let Some(state) = state {
            Self::flush(sender, state.entries, &mut failures);
        }
        (out, failures)
    }

    /// Sets the tag that failures of the following sends are reported with.
    pub fn tag(&mut self, tag: usize) {
        BATCH.with(|b| {
            if let Some(state) = b.borrow_mut().as_mut() {
                state.tag = tag;
            }
        });
    }

    fn enqueue(sender: &Sender, frame: &Frame, members: &[Member], ack: bool) -> bool {
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let Some(state) = b.as_mut() else {
                return false;
            };
            if state.sender != sender as *const Sender as usize {
                return false;
            }
            let tag = state.tag;
            for m in members {
                let pos = state
                    .entries
                    .iter()
                    .position(|e| e.ack == ack && e.member == *m);
                let idx = pos.unwrap_or_else(|| {
                    state.entries.push(BatchEntry {
                        member: m.clone(),
                        frames: Vec::new(),
                        tags: Vec::new(),
                        ack,
                    });
                    state.entries.len() - 1
                });
                let entry = &mut state.entries[idx];
                entry.frames.push(frame.clone());
                entry.tags.push(tag);
            }
            true
        })
    }

    fn flush(sender: &Sender, entries: Vec<BatchEntry>, failures: &mut Vec<(usize, FaultyMember)>) {
        let deadline = crate::deadline::from_now(sender.cfg.timeout);
        let mut pending = Vec::new();
        for e in entries {
            match sender.write_with_retry(&e.member, &e.frames, e.ack, deadline) {
                Ok(t) => pending.push((t, e)),
                Err(f) => fail_all(sender, &e, f, failures),
            }
        }
        for (mut t, e) in pending {
            if let Err(f) = sender.finish(&mut t, &e.frames) {
                fail_all(sender, &e, f, failures);
            }
        }
    }
}

fn fail_all(sender: &Sender, e: &BatchEntry, f: Failure, out: &mut Vec<(usize, FaultyMember)>) {
    sender.stats.failures.fetch_add(1, Ordering::Relaxed);
    let mut seen = HashSet::new();
    for tag in &e.tags {
        if seen.insert(*tag) {
            out.push((
                *tag,
                FaultyMember {
                    member: e.member.clone(),
                    failure: f.clone(),
                },
            ));
        }
    }
}
