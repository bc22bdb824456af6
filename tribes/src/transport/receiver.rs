//! The receiver: one mio selector thread that accepts, reads and frames, plus a bounded pool
//! of worker threads that decode envelopes, write ACKs and deliver messages up the stack.
//!
//! Each connection has an inbox. The selector reads, frames and decodes, and appends messages
//! to the inbox; the first message into an idle inbox schedules the connection on the worker
//! pool. A worker owns a scheduled connection until its inbox is empty, so a connection's
//! messages are processed one after another, in arrival order, and its ACKs go out in that
//! order. Workers wake the selector only in rare cases (a paused or finished connection, a
//! starved one), not per message.
//!
//! Back-pressure: when `read_ahead` bytes wait in an inbox the selector stops reading that
//! connection (TCP flow control pushes back on the sender) until a worker takes them. When
//! the pool's queue is full the connection waits in a list; the selector never blocks.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver as ChanRx, Sender as ChanTx, TrySendError};
use log::{debug, error, info, trace, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use super::config::ReceiverConfig;
use crate::error::{ChannelError, ProcessError};
use crate::idle::IdleWait;
use crate::wire::{AckCommand, ChannelMessage, FrameDecoder, WireError};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Batches a worker takes from one connection before giving other connections a turn.
const BATCHES_PER_TURN: usize = 8;
/// Reads per readiness event before the selector moves on to other connections, so one
/// chatty peer cannot starve the rest (quinn's `IO_LOOP_BOUND` idea).
const READS_PER_EVENT: usize = 16;
/// Pending ACK bytes tolerated for a peer that does not read its replies.
const MAX_PENDING_ACK_BYTES: usize = 1024 * 1024;

/// What the receiver delivers decoded messages to (the bottom of the channel stack).
pub trait MessageHandler: Send + Sync + 'static {
    /// Processes one message. An `Err` turns into FAIL_ACK when the message asked for an ACK
    /// after processing.
    fn message_received(&self, msg: ChannelMessage) -> Result<(), ProcessError>;
}

/// Counters of a running receiver.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed because of a framing or envelope error.
    pub protocol_errors: AtomicU64,
    /// Messages delivered to the handler.
    pub messages: AtomicU64,
    /// Payload-carrying bytes received (whole frames).
    pub bytes: AtomicU64,
    /// FAIL_ACKs written.
    pub fail_acks: AtomicU64,
    /// Messages whose listener panicked (caught, logged and answered as a failure).
    pub panics: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed for silence (`idle_timeout`, or to make room at
    /// `max_connections`).
    pub idle_closed: AtomicU64,
    /// Connections closed because incomplete frames over all connections passed
    /// `max_partial_bytes` (each was the one holding the most).
    pub partial_closed: AtomicU64,
}

/// A running receiver. [`Receiver::stop`] joins every thread it started.
pub struct Receiver {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    waker: Arc<Waker>,
    selector: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// Job queue handle used at stop to send one [`Job::Stop`] per worker.
    stop_workers: Option<ChanTx<Job>>,
    stats: Arc<ReceiverStats>,
}

impl Receiver {
    /// Binds (trying `auto_bind` ports from `cfg.port`) and starts the selector and workers.
    /// Threads are named `tribes-rx-<name>` and `tribes-rx-worker-<name>-<n>`.
    pub fn start(
        cfg: &ReceiverConfig,
        name: &str,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<Self, ChannelError> {
        cfg.validate()?;
        let std_listener = bind(cfg)?;
        let addr = std_listener.local_addr()?;
        std_listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let shutdown = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ReceiverStats::default());
        // One entry per scheduled connection; a connection is scheduled at most once.
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(cfg.max_threads);
        let stop_tx = job_tx.clone();
        // Unbounded on purpose: a worker sends at most one notice per connection that asked
        // for one (paused or finished), so its length is bounded by `max_connections`.
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let starved = Arc::new(AtomicUsize::new(0));

        let idle = Arc::new(IdleWait::new(cfg.idle_yields));
        let mut workers = Vec::with_capacity(cfg.max_threads);
        for n in 0..cfg.max_threads {
            let worker = Worker {
                jobs: job_rx.clone(),
                requeue: job_tx.clone(),
                starved: Arc::clone(&starved),
                done: done_tx.clone(),
                waker: Arc::clone(&waker),
                handler: Arc::clone(&handler),
                stats: Arc::clone(&stats),
                idle: Arc::clone(&idle),
            };
            workers.push(
                thread::Builder::new()
                    .name(format!("tribes-rx-worker-{name}-{n}"))
                    .spawn(move || worker.run())?,
            );
        }
        drop(done_tx);
        let selector = Selector {
            poll,
            listener,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            jobs: Some(job_tx),
            done: done_rx,
            starved: VecDeque::new(),
            starved_count: starved,
            shutdown: Arc::clone(&shutdown),
            cfg: cfg.clone(),
            stats: Arc::clone(&stats),
            // One read takes up to 256 KiB: fewer syscalls for large frames.
            scratch: vec![0u8; 256 * 1024],
            last_sweep: Instant::now(),
            partial_total: 0,
        };
        let selector = thread::Builder::new()
            .name(format!("tribes-rx-{name}"))
            .spawn(move || selector.run())?;
        info!(target: "tribes::transport", "receiver listening on {addr}");
        Ok(Self {
            addr,
            shutdown,
            waker,
            selector: Some(selector),
            workers,
            stop_workers: Some(stop_tx),
            stats,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// Counters, shared.
    pub fn stats_arc(&self) -> Arc<ReceiverStats> {
        Arc::clone(&self.stats)
    }

    /// Stops accepting and reading, lets workers finish their batch, joins every thread and
    /// closes every socket.
    pub fn stop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(h) = self.selector.take() {
            let _ = h.join();
        }
        // One stop per worker, queued behind what is already there: workers finish the queued
        // connections, then exit.
        if let Some(jobs) = self.stop_workers.take() {
            for _ in 0..self.workers.len() {
                let _ = jobs.send(Job::Stop);
            }
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        debug!(target: "tribes::transport", "receiver on {} stopped", self.addr);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind(cfg: &ReceiverConfig) -> Result<std::net::TcpListener, ChannelError> {
    let first = SocketAddr::new(cfg.address, cfg.port);
    let tries = if cfg.port == 0 { 1 } else { cfg.auto_bind };
    let mut last = io::Error::other("no port tried");
    for i in 0..tries {
        let Some(port) = cfg.port.checked_add(i) else {
            break;
        };
        let addr = SocketAddr::new(cfg.address, port);
        match bind_one(addr, cfg) {
            Ok(l) => {
                if i > 0 {
                    // Tribes' autoBind moves on quietly; peers that list this node by its
                    // configured port (static membership) will not reach it here.
                    warn!(target: "tribes::transport", "port {} is taken ({last}); the receiver bound {addr} instead (auto_bind)", cfg.port);
                }
                return Ok(l);
            }
            Err(e) => {
                // Only a taken port is worth trying the next one for: an address that is
                // not this host's, or a permission error, fails on every port alike.
                let taken = e.kind() == io::ErrorKind::AddrInUse;
                last = e;
                if !taken {
                    return Err(ChannelError::Bind {
                        first,
                        tried: i + 1,
                        source: last,
                    });
                }
            }
        }
    }
    Err(ChannelError::Bind {
        first,
        tried: tries,
        source: last,
    })
}

fn bind_one(addr: SocketAddr, cfg: &ReceiverConfig) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit the buffer sizes, which must be set before the handshake for
    // window scaling to take them into account.
    socket.set_recv_buffer_size(cfg.rx_buf_size)?;
    socket.set_send_buffer_size(cfg.tx_buf_size)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The part of a connection that workers share: the socket (for ACK writes), the ACK bytes
/// that could not be written yet, and the inbox.
struct ConnShared {
    token: usize,
    stream: TcpStream,
    peer: SocketAddr,
    pending_out: Mutex<BytesMut>,
    broken: AtomicBool,
    inbox: Mutex<Inbox>,
}

#[derive(Default)]
struct Inbox {
    msgs: VecDeque<Incoming>,
    bytes: usize,
    /// A worker owns the connection, or it waits in the pool queue / starved list.
    scheduled: bool,
    /// The selector wants a notice when the worker takes the messages or goes idle
    /// (reading paused for back-pressure, or the connection is finished).
    notify: bool,
    /// Messages taken in whose ACK is not written yet. While it is zero the selector may ACK
    /// a new message on receipt itself without breaking the order of ACKs.
    pending_acks: usize,
}

impl ConnShared {
    /// Writes now if nothing is pending, otherwise queues; the selector flushes on WRITABLE.
    fn write_reply(&self, bytes: &[u8]) {
        let mut out = self.pending_out.lock();
        if out.is_empty() {
            let mut written = 0;
            while written < bytes.len() {
                match (&self.stream).write(&bytes[written..]) {
                    Ok(0) => {
                        self.broken.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(target: "tribes::transport", "ack write to {} failed: {e}", self.peer);
                        self.broken.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
            out.extend_from_slice(&bytes[written..]);
        } else {
            out.extend_from_slice(bytes);
        }
        // Once per connection: it is closed, but ACKs may still come until it is.
        if out.len() > MAX_PENDING_ACK_BYTES && !self.broken.swap(true, Ordering::Relaxed) {
            warn!(target: "tribes::transport", "peer {} does not read its ACKs; closing", self.peer);
        }
    }

    /// Flushes queued ACK bytes; called by the selector on WRITABLE.
    fn flush(&self) -> io::Result<()> {
        let mut out = self.pending_out.lock();
        while !out.is_empty() {
            match (&self.stream).write(&out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = out.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Selector-owned connection state.
struct Conn {
    shared: Arc<ConnShared>,
    decoder: FrameDecoder,
    /// Reading stopped for back-pressure; resume when a worker takes the inbox.
    paused: bool,
    /// EOF seen or a decode error: no more reading; close once the inbox is processed.
    finished: bool,
    /// When bytes last came in (or the connection was accepted).
    last_active: Instant,
    /// A complete frame came in: a peer's working connection, not one opened and left.
    delivered: bool,
}

/// How long a connection must have been silent before a new one may take its place at
/// `max_connections`: long enough that a peer's pooled connection between two sends is not
/// mistaken for an abandoned one.
const EVICT_SILENT: Duration = Duration::from_secs(5);

/// Whether the connection has nothing waiting, being processed or being answered, so that
/// closing it loses nothing (a half-received frame is not a message yet).
fn quiet(shared: &ConnShared) -> bool {
    let inbox = shared.inbox.lock();
    inbox.msgs.is_empty() && !inbox.scheduled && shared.pending_out.lock().is_empty()
}

/// A decoded message waiting for a worker.
struct Incoming {
    msg: ChannelMessage,
    /// Its ACK on receipt was already written by the selector.
    acked: bool,
    frame_len: usize,
}

/// Work for the pool: a scheduled connection, or the end (one per worker, at stop).
enum Job {
    Serve(Arc<ConnShared>),
    Stop,
}

/// A worker's notice to the selector about a connection that asked for one.
struct Done {
    token: usize,
}

struct Selector {
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<usize, Conn>,
    next_token: usize,
    jobs: Option<ChanTx<Job>>,
    done: ChanRx<Done>,
    starved: VecDeque<Arc<ConnShared>>,
    starved_count: Arc<AtomicUsize>,
    shutdown: Arc<AtomicBool>,
    cfg: ReceiverConfig,
    stats: Arc<ReceiverStats>,
    scratch: Vec<u8>,
    /// When idle connections were last looked for.
    last_sweep: Instant,
    /// Bytes of incomplete frames held by all connections' decoders.
    partial_total: usize,
}

impl Selector {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while !self.shutdown.load(Ordering::SeqCst) {
            if let Err(e) = self.poll.poll(&mut events, Some(self.cfg.selector_timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(target: "tribes::transport", "selector poll failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        if event.is_writable() {
                            self.flush(t);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            // A peer's close must be read to the end: no later edge reports it.
                            let closing = event.is_read_closed() || event.is_error();
                            self.read(t, !closing);
                        }
                        self.maybe_close(t);
                    }
                }
            }
            self.handle_done();
            self.retry_starved();
            self.close_idle(Instant::now());
        }
        // Shutdown. Connections that wait for a worker (the queue was full) hold messages
        // that were read, and may have been acknowledged on receipt: they still go to the
        // workers, queued before the workers' stop, for 5 s in all. Workers that take no
        // more work in that time (a handler that is slow or never returns) cost those
        // messages, with a log line; a handler that never returns holds up the stop anyway,
        // which joins its worker.
        if let Some(jobs) = self.jobs.take() {
            let until = Instant::now() + Duration::from_secs(5);
            for conn in self.starved.drain(..) {
                if jobs.send_deadline(Job::Serve(conn), until).is_err() {
                    warn!(target: "tribes::transport", "receiver stopping: the workers took no more work for 5 s; messages read on a waiting connection are dropped");
                    break;
                }
            }
        }
        self.starved.clear();
        // A socket closes when the last worker holding it is done, so the ACKs of messages
        // still being processed go out.
        self.conns.clear();
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= self.cfg.max_connections
                        && !self.evict_silent(Instant::now())
                    {
                        let n = self.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
                        if crate::sparse(n) {
                            warn!(target: "tribes::transport", "refusing {peer}: {} connections open ({n} refused so far)", self.conns.len());
                        } else {
                            debug!(target: "tribes::transport", "refusing {peer}: {} connections open", self.conns.len());
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(self.cfg.tcp_no_delay);
                    let token = self.next_token;
                    self.next_token += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(token),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!(target: "tribes::transport", "cannot register {peer}: {e}");
                        continue;
                    }
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    debug!(target: "tribes::transport", "accepted {peer}");
                    self.conns.insert(
                        token,
                        Conn {
                            shared: Arc::new(ConnShared {
                                token,
                                stream,
                                peer,
                                pending_out: Mutex::new(BytesMut::new()),
                                broken: AtomicBool::new(false),
                                inbox: Mutex::new(Inbox::default()),
                            }),
                            decoder: FrameDecoder::new(self.cfg.max_body_size),
                            paused: false,
                            finished: false,
                            last_active: Instant::now(),
                            delivered: false,
                        },
                    );
                    // Data may already be waiting; edge-triggered readiness would not report it.
                    self.read(token, false);
                    self.maybe_close(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(target: "tribes::transport", "accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn flush(&mut self, token: usize) {
        if let Some(conn) = self.conns.get_mut(&token) {
            if let Err(e) = conn.shared.flush() {
                debug!(target: "tribes::transport", "ack flush to {} failed: {e}", conn.shared.peer);
                conn.shared.broken.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Reads until WouldBlock (bounded per call), frames, decodes, and hands messages to the
    /// connection's inbox. With `short_read_drains`, a read shorter than the buffer ends it.
    fn read(&mut self, token: usize, short_read_drains: bool) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut reads = 0;
        let mut schedule = false;
        let mut drained = false;
        let partial_before = conn.decoder.buffered();
        while !conn.finished && !drained {
            {
                let mut inbox = conn.shared.inbox.lock();
                if inbox.bytes + conn.decoder.buffered() >= self.cfg.read_ahead
                    && !inbox.msgs.is_empty()
                {
                    conn.paused = true;
                    inbox.notify = true;
                    break;
                }
            }
            if reads == READS_PER_EVENT {
                // Give the other connections a turn; re-arming reports it again if still ready.
                let _ = self.poll.registry().reregister(
                    &mut ShareSource(&conn.shared),
                    Token(token),
                    Interest::READABLE | Interest::WRITABLE,
                );
                break;
            }
            reads += 1;
            match (&conn.shared.stream).read(&mut self.scratch) {
                Ok(0) => {
                    trace!(target: "tribes::transport", "eof from {}", conn.shared.peer);
                    conn.finished = true;
                }
                Ok(n) => {
                    conn.paused = false;
                    conn.last_active = Instant::now();
                    // A short read drained the socket: on Linux every later arrival raises a
                    // new edge, so the read that would only return WouldBlock is skipped
                    // (one syscall less per message under request/ACK traffic).
                    drained =
                        short_read_drains && cfg!(target_os = "linux") && n < self.scratch.len();
                    conn.decoder.push(&self.scratch[..n]);
                    let mut inbox = conn.shared.inbox.lock();
                    loop {
                        let next = conn.decoder.next_frame().and_then(|frame| {
                            frame
                                .map(|f| enqueue_frame(&conn.shared, &mut inbox, &f))
                                .transpose()
                        });
                        match next {
                            Ok(Some(first)) => {
                                conn.delivered = true;
                                schedule |= first;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                // Like Tribes: no ACK for an invalid package; what came
                                // before it is still delivered, then the connection closes.
                                let n =
                                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed) + 1;
                                if crate::sparse(n) {
                                    warn!(target: "tribes::transport", "closing connection from {}: {e} ({n} closed for bad frames so far)", conn.shared.peer);
                                } else {
                                    debug!(target: "tribes::transport", "closing connection from {}: {e}", conn.shared.peer);
                                }
                                conn.finished = true;
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(target: "tribes::transport", "read from {} failed: {e}", conn.shared.peer);
                    conn.finished = true;
                }
            }
        }
        if conn.finished {
            conn.shared.inbox.lock().notify = true;
        }
        self.partial_total = self.partial_total - partial_before + conn.decoder.buffered();
        if schedule {
            let shared = Arc::clone(&conn.shared);
            self.schedule(shared);
        }
        while self.partial_total > self.cfg.max_partial_bytes && self.shed_partial() {}
    }

    /// Closes the connection holding the most bytes of an incomplete frame, dropping them
    /// (they are not a message yet; what it sent before is still delivered). Returns false
    /// when no connection holds any.
    fn shed_partial(&mut self) -> bool {
        let largest = (self.conns.iter_mut())
            .filter(|(_, c)| c.decoder.buffered() > 0)
            .max_by_key(|(_, c)| c.decoder.buffered());
        let Some((&token, conn)) = largest else {
            return false;
        };
        let held = conn.decoder.buffered();
        conn.decoder = FrameDecoder::new(self.cfg.max_body_size);
        conn.finished = true;
        conn.shared.inbox.lock().notify = true;
        self.partial_total -= held;
        let n = self.stats.partial_closed.fetch_add(1, Ordering::Relaxed) + 1;
        if crate::sparse(n) {
            warn!(target: "tribes::transport", "incomplete frames passed {} bytes: closing the connection from {}, which held {held} ({n} closed so far)", self.cfg.max_partial_bytes, conn.shared.peer);
        }
        self.maybe_close(token);
        true
    }

    /// Hands a connection whose inbox just became non-empty to the worker pool.
    fn schedule(&mut self, conn: Arc<ConnShared>) {
        let Some(jobs) = &self.jobs else {
            return;
        };
        match jobs.try_send(Job::Serve(conn)) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                if let Job::Serve(conn) = job {
                    self.starved_count.fetch_add(1, Ordering::AcqRel);
                    self.starved.push_back(conn);
                }
            }
        }
    }

    fn handle_done(&mut self) {
        while let Ok(done) = self.done.try_recv() {
            let Some(conn) = self.conns.get(&done.token) else {
                continue;
            };
            if conn.paused {
                self.read(done.token, false);
            }
            self.maybe_close(done.token);
        }
    }

    fn retry_starved(&mut self) {
        while let Some(conn) = self.starved.pop_front() {
            let Some(jobs) = &self.jobs else {
                return;
            };
            match jobs.try_send(Job::Serve(conn)) {
                Ok(()) => {
                    self.starved_count.fetch_sub(1, Ordering::AcqRel);
                }
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    if let Job::Serve(conn) = job {
                        self.starved.push_front(conn);
                    }
                    return;
                }
            }
        }
    }

    /// Closes connections silent for longer than `idle_timeout` with nothing in progress;
    /// looks at most once a second.
    fn close_idle(&mut self, now: Instant) {
        let Some(timeout) = self.cfg.idle_timeout else {
            return;
        };
        if now.saturating_duration_since(self.last_sweep) < timeout.min(Duration::from_secs(1)) {
            return;
        }
        self.last_sweep = now;
        // Only connections that never delivered a message, or stopped half-way through one:
        // a peer's working connection between two sends is left alone (a sender that does
        // not check its connection before writing, such as Tribes' for messages without
        // ACK, would lose the first message written into a closed one).
        let idle: Vec<usize> = (self.conns.iter())
            .filter(|(_, c)| {
                !c.finished
                    && !c.paused
                    && (!c.delivered || c.decoder.has_partial())
                    && now.saturating_duration_since(c.last_active) >= timeout
                    && quiet(&c.shared)
            })
            .map(|(t, _)| *t)
            .collect();
        for token in idle {
            if !self.still_silent(token, now) {
                self.maybe_close(token);
                continue;
            }
            if let Some(conn) = self.conns.get_mut(&token) {
                let n = self.stats.idle_closed.fetch_add(1, Ordering::Relaxed) + 1;
                debug!(target: "tribes::transport", "closing connection from {}: silent for {timeout:?} ({n} so far)", conn.shared.peer);
                conn.finished = true;
            }
            self.maybe_close(token);
        }
    }

    /// At `max_connections`: closes the connection silent longest, if it has been silent
    /// for [`EVICT_SILENT`] with nothing in progress, so a new peer is not locked out by
    /// connections that were opened and left. Returns whether one was closed.
    fn evict_silent(&mut self, now: Instant) -> bool {
        let mut candidates: Vec<(bool, Instant, usize)> = (self.conns.iter())
            .filter(|(_, c)| now.saturating_duration_since(c.last_active) >= EVICT_SILENT)
            .filter(|(_, c)| !c.paused && !c.finished && quiet(&c.shared))
            .map(|(t, c)| (c.delivered, c.last_active, *t))
            .collect();
        // Never-used ones first, then the silent longest.
        candidates.sort_unstable();
        let victim = (candidates.into_iter())
            .map(|(_, _, token)| token)
            .find(|token| self.still_silent(*token, now));
        let Some(token) = victim else {
            return false;
        };
        let peer = self.conns[&token].shared.peer;
        let n = self.stats.idle_closed.fetch_add(1, Ordering::Relaxed) + 1;
        debug!(target: "tribes::transport", "{} connections open: closing the one from {peer}, silent longest, to make room ({n} closed for silence so far)", self.conns.len());
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.finished = true;
        }
        self.maybe_close(token);
        !self.conns.contains_key(&token)
    }

    /// A last look before a connection is closed for silence: reads what came since `now`
    /// (which keeps it), and tells whether it may be closed: still silent (or closed by its
    /// peer meanwhile) with nothing in progress.
    fn still_silent(&mut self, token: usize, now: Instant) -> bool {
        self.read(token, false);
        (self.conns.get(&token))
            .is_some_and(|c| (c.finished || c.last_active < now) && quiet(&c.shared))
    }

    fn maybe_close(&mut self, token: usize) {
        let Some(conn) = self.conns.get(&token) else {
            return;
        };
        let broken = conn.shared.broken.load(Ordering::Relaxed);
        if !(broken || conn.finished) {
            return;
        }
        {
            let mut inbox = conn.shared.inbox.lock();
            if inbox.scheduled {
                // A worker still has messages of this connection; it will tell us when done.
                inbox.notify = true;
                return;
            }
        }
        let conn = self.conns.remove(&token).map(|c| {
            self.partial_total -= c.decoder.buffered();
            c.shared
        });
        if let Some(shared) = conn {
            let _ = self.poll.registry().deregister(&mut ShareSource(&shared));
            let _ = shared.stream.shutdown(std::net::Shutdown::Both);
            debug!(target: "tribes::transport", "closed connection from {}", shared.peer);
        }
    }
}

/// Decodes one frame into the connection's inbox. The envelope is decoded here (cheap, no
/// copy) so a bad one stops reading at once, and an ACK on receipt goes out without waiting
/// for a worker when no earlier ACK on this connection is outstanding (ACKs stay in order).
/// Returns true when the inbox was idle, so the connection must be scheduled.
fn enqueue_frame(shared: &ConnShared, inbox: &mut Inbox, frame: &Bytes) -> Result<bool, WireError> {
    let msg = ChannelMessage::decode(frame)?;
    let opts = msg.options;
    let acked = opts.wants_ack() && !opts.wants_ack_after_processing() && inbox.pending_acks == 0;
    if acked {
        shared.write_reply(&AckCommand::Ack.frame());
    } else if opts.wants_ack() {
        inbox.pending_acks += 1;
    }
    inbox.bytes += frame.len();
    inbox.msgs.push_back(Incoming {
        msg,
        acked,
        frame_len: frame.len(),
    });
    Ok(!std::mem::replace(&mut inbox.scheduled, true))
}

/// Lets the registry (de/re)register a stream held in an `Arc`.
struct ShareSource<'a>(&'a ConnShared);

impl mio::event::Source for ShareSource<'_> {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&self.0.stream))
            .register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&self.0.stream))
            .reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&self.0.stream)).deregister(registry)
    }
}

struct Worker {
    jobs: ChanRx<Job>,
    requeue: ChanTx<Job>,
    starved: Arc<AtomicUsize>,
    done: ChanTx<Done>,
    waker: Arc<Waker>,
    handler: Arc<dyn MessageHandler>,
    stats: Arc<ReceiverStats>,
    idle: Arc<IdleWait>,
}

impl Worker {
    fn run(self) {
        // One channel for work and stop (a `select!` over two channels costs a registration
        // on each for every wait, measurable at tens of thousands of messages per second).
        while let Ok(job) = self.idle.recv(&self.jobs) {
            match job {
                Job::Serve(conn) => self.serve(conn),
                Job::Stop => {
                    // Stopping: finish what is already queued, then exit.
                    while let Ok(job) = self.jobs.try_recv() {
                        match job {
                            Job::Serve(conn) => self.serve(conn),
                            Job::Stop => {
                                // Another worker's stop: hand it back (that worker drains
                                // whatever is left) and exit.
                                let _ = self.requeue.send(Job::Stop);
                                return;
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Processes the connection's inbox until it is empty; after `BATCHES_PER_TURN` batches
    /// it queues the connection again so others get a turn (or goes on if the queue is full).
    fn serve(&self, mut conn: Arc<ConnShared>) {
        loop {
            for _ in 0..BATCHES_PER_TURN {
                let (batch, notify) = {
                    let mut inbox = conn.inbox.lock();
                    if inbox.msgs.is_empty() {
                        inbox.scheduled = false;
                        let notify = std::mem::take(&mut inbox.notify);
                        drop(inbox);
                        if notify || self.starved.load(Ordering::Acquire) > 0 {
                            self.notify_selector(conn.token);
                        }
                        return;
                    }
                    inbox.bytes = 0;
                    (
                        std::mem::take(&mut inbox.msgs),
                        std::mem::take(&mut inbox.notify),
                    )
                };
                if notify {
                    // Reading was paused for back-pressure: the inbox has room again.
                    self.notify_selector(conn.token);
                }
                self.process(&conn, batch);
            }
            match self.requeue.try_send(Job::Serve(conn)) {
                Ok(()) => return,
                Err(
                    TrySendError::Full(Job::Serve(c)) | TrySendError::Disconnected(Job::Serve(c)),
                ) => {
                    conn = c;
                }
                Err(_) => return,
            }
        }
    }

    fn notify_selector(&self, token: usize) {
        let _ = self.done.send(Done { token });
        let _ = self.waker.wake();
    }

    /// Hands one message to the handler. A panic there is caught and answered as a
    /// failure: left to unwind, it would end this worker for good (the pool does not
    /// replace it) with its connection still marked scheduled, so that connection's next
    /// messages would be acknowledged on receipt and never delivered.
    fn deliver(&self, msg: ChannelMessage, peer: &SocketAddr) -> Result<(), ProcessError> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.message_received(msg))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                error!(target: "tribes::transport", "a listener panicked on a message from {peer}: {what}; answered as a failure");
                self.stats.panics.fetch_add(1, Ordering::Relaxed);
                Err(ProcessError::new(format!("listener panicked: {what}")))
            }
        }
    }

    /// Processes a batch in order, writing the ACKs the selector did not write.
    fn process(&self, conn: &ConnShared, batch: VecDeque<Incoming>) {
        for Incoming {
            msg,
            acked,
            frame_len,
        } in batch
        {
            self.stats.messages.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(frame_len as u64 + 18, Ordering::Relaxed);
            let opts = msg.options;
            if opts.wants_ack_after_processing() {
                let reply = match self.deliver(msg, &conn.peer) {
                    Ok(()) => AckCommand::Ack,
                    Err(e) => {
                        debug!(target: "tribes::transport", "{e}; FAIL_ACK to {}", conn.peer);
                        self.stats.fail_acks.fetch_add(1, Ordering::Relaxed);
                        AckCommand::FailAck
                    }
                };
                conn.write_reply(&reply.frame());
                conn.inbox.lock().pending_acks -= 1;
            } else {
                if opts.wants_ack() && !acked {
                    conn.write_reply(&AckCommand::Ack.frame());
                    conn.inbox.lock().pending_acks -= 1;
                }
                if let Err(e) = self.deliver(msg, &conn.peer) {
                    debug!(target: "tribes::transport", "{e} (no ACK after processing was asked; nothing sent back)");
                }
            }
        }
    }
}
