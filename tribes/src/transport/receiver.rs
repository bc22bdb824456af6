//! The receiver: one mio selector thread that accepts, reads and frames, plus a bounded pool
//! of worker threads that decode envelopes, write ACKs and deliver messages up the stack.
//!
//! Ordering and back-pressure: a connection has at most one batch of frames at the workers at
//! a time, so its messages are processed in arrival order and its ACKs go out in that order.
//! While a batch is out, the selector keeps reading that connection only until `read_ahead`
//! bytes are waiting; then it stops reading it (TCP flow control pushes back on the sender)
//! and resumes when the worker hands the connection back. When every worker is busy the
//! connection waits in a list; the selector thread itself never blocks on a worker.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_channel::{Receiver as ChanRx, Sender as ChanTx, TrySendError};
use log::{debug, info, trace, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use super::config::ReceiverConfig;
use crate::error::{ChannelError, ProcessError};
use crate::wire::{AckCommand, ChannelMessage, FrameDecoder};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
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
}

/// A running receiver. [`Receiver::stop`] joins every thread it started.
pub struct Receiver {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    waker: Arc<Waker>,
    selector: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
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
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(cfg.max_threads);
        // Unbounded on purpose: it holds at most one completion per connection with a batch
        // out, so its length is bounded by `max_connections`.
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();

        let mut workers = Vec::with_capacity(cfg.max_threads);
        for n in 0..cfg.max_threads {
            let worker = Worker {
                jobs: job_rx.clone(),
                done: done_tx.clone(),
                waker: Arc::clone(&waker),
                handler: Arc::clone(&handler),
                stats: Arc::clone(&stats),
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
            shutdown: Arc::clone(&shutdown),
            cfg: cfg.clone(),
            stats: Arc::clone(&stats),
            scratch: vec![0u8; 64 * 1024],
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
        // The selector dropped the job sender; workers see the channel close and exit.
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
            Ok(l) => return Ok(l),
            Err(e) => last = e,
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

/// The part of a connection that workers share: the socket (for ACK writes) and the ACK bytes
/// that could not be written yet.
struct ConnShared {
    stream: TcpStream,
    peer: SocketAddr,
    pending_out: Mutex<BytesMut>,
    broken: AtomicBool,
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
        if out.len() > MAX_PENDING_ACK_BYTES {
            warn!(target: "tribes::transport", "peer {} does not read its ACKs; closing", self.peer);
            self.broken.store(true, Ordering::Relaxed);
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
    ready: Vec<Incoming>,
    ready_bytes: usize,
    in_flight: bool,
    /// Reading stopped for back-pressure; resume when the batch comes back.
    paused: bool,
    /// EOF seen or a decode error: no more reading; close once the last batch is processed.
    finished: bool,
}

/// A decoded message waiting for a worker.
struct Incoming {
    msg: ChannelMessage,
    /// Its ACK-on-receipt was already written by the selector.
    acked: bool,
    frame_len: usize,
}

struct Job {
    token: usize,
    conn: Arc<ConnShared>,
    frames: Vec<Incoming>,
}

/// A worker finished a connection's batch.
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
    starved: VecDeque<usize>,
    shutdown: Arc<AtomicBool>,
    cfg: ReceiverConfig,
    stats: Arc<ReceiverStats>,
    scratch: Vec<u8>,
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
                            self.read(t);
                        }
                        self.dispatch(t);
                        self.maybe_close(t);
                    }
                }
            }
            self.handle_done();
            self.retry_starved();
        }
        // Shutdown: drop the job sender so workers exit after their current batch.
        self.jobs = None;
        for (_, conn) in self.conns.drain() {
            let _ = conn.shared.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= self.cfg.max_connections {
                        warn!(target: "tribes::transport", "refusing {peer}: {} connections open", self.conns.len());
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
                                stream,
                                peer,
                                pending_out: Mutex::new(BytesMut::new()),
                                broken: AtomicBool::new(false),
                            }),
                            decoder: FrameDecoder::new(self.cfg.max_body_size),
                            ready: Vec::new(),
                            ready_bytes: 0,
                            in_flight: false,
                            paused: false,
                            finished: false,
                        },
                    );
                    // Data may already be waiting; edge-triggered readiness would not report it.
                    self.read(token);
                    self.dispatch(token);
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

    fn read(&mut self, token: usize) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut reads = 0;
        while !conn.finished {
            if !conn.ready.is_empty()
                && conn.ready_bytes + conn.decoder.buffered() >= self.cfg.read_ahead
            {
                conn.paused = true;
                return;
            }
            if reads == READS_PER_EVENT {
                // Come back later without waiting for a new edge.
                conn.paused = true;
                let _ = self.poll.registry().reregister(
                    &mut ShareSource(&conn.shared),
                    Token(token),
                    Interest::READABLE | Interest::WRITABLE,
                );
                return;
            }
            reads += 1;
            match (&conn.shared.stream).read(&mut self.scratch) {
                Ok(0) => {
                    trace!(target: "tribes::transport", "eof from {}", conn.shared.peer);
                    conn.finished = true;
                }
                Ok(n) => {
                    conn.decoder.push(&self.scratch[..n]);
                    loop {
                        match conn.decoder.next_frame() {
                            Ok(Some(frame)) => {
                                // Envelopes are decoded here (cheap, no copy) so that a bad one
                                // stops reading at once and an ACK on receipt can go out
                                // without waiting for a worker.
                                let msg = match ChannelMessage::decode(&frame) {
                                    Ok(m) => m,
                                    Err(e) => {
                                        // Like Tribes: no ACK for an invalid package; what came
                                        // before it is still delivered, then the connection closes.
                                        warn!(target: "tribes::transport", "invalid message from {}: {e}; closing connection", conn.shared.peer);
                                        self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                                        conn.finished = true;
                                        break;
                                    }
                                };
                                let opts = msg.options;
                                // ACK on receipt straight away when nothing earlier on this
                                // connection still waits for its ACK (ACKs must stay in order).
                                let acked = opts.wants_ack()
                                    && !opts.wants_ack_after_processing()
                                    && !conn.in_flight
                                    && conn.ready.is_empty();
                                if acked {
                                    conn.shared.write_reply(&AckCommand::Ack.frame());
                                }
                                conn.ready_bytes += frame.len();
                                conn.ready.push(Incoming {
                                    msg,
                                    acked,
                                    frame_len: frame.len(),
                                });
                            }
                            Ok(None) => break,
                            Err(e) => {
                                warn!(target: "tribes::transport", "closing connection from {}: {e}", conn.shared.peer);
                                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                                conn.finished = true;
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.paused = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(target: "tribes::transport", "read from {} failed: {e}", conn.shared.peer);
                    conn.finished = true;
                }
            }
        }
    }

    /// Hands the connection's ready frames to a worker if none is working on it.
    fn dispatch(&mut self, token: usize) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.in_flight || conn.ready.is_empty() {
            return;
        }
        let Some(jobs) = &self.jobs else {
            return;
        };
        let job = Job {
            token,
            conn: Arc::clone(&conn.shared),
            frames: std::mem::take(&mut conn.ready),
        };
        match jobs.try_send(job) {
            Ok(()) => {
                conn.in_flight = true;
                conn.ready_bytes = 0;
            }
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                conn.ready = job.frames;
                if !self.starved.contains(&token) {
                    self.starved.push_back(token);
                }
            }
        }
    }

    fn handle_done(&mut self) {
        while let Ok(done) = self.done.try_recv() {
            let Some(conn) = self.conns.get_mut(&done.token) else {
                continue;
            };
            conn.in_flight = false;
            if conn.paused {
                self.read(done.token);
            }
            self.dispatch(done.token);
            self.maybe_close(done.token);
        }
    }

    fn retry_starved(&mut self) {
        for _ in 0..self.starved.len() {
            let Some(token) = self.starved.pop_front() else {
                break;
            };
            self.dispatch(token);
            if let Some(conn) = self.conns.get_mut(&token) {
                if conn.paused && !conn.in_flight && conn.ready.is_empty() {
                    self.read(token);
                    self.dispatch(token);
                }
            }
            self.maybe_close(token);
        }
    }

    fn maybe_close(&mut self, token: usize) {
        let Some(conn) = self.conns.get(&token) else {
            return;
        };
        let broken = conn.shared.broken.load(Ordering::Relaxed);
        if broken || (conn.finished && !conn.in_flight && conn.ready.is_empty()) {
            if conn.in_flight {
                // A worker still holds the socket; close when it reports back.
                return;
            }
            let conn = self.conns.remove(&token).map(|c| c.shared);
            if let Some(shared) = conn {
                let _ = self.poll.registry().deregister(&mut ShareSource(&shared));
                let _ = shared.stream.shutdown(std::net::Shutdown::Both);
                debug!(target: "tribes::transport", "closed connection from {}", shared.peer);
            }
            self.starved.retain(|t| *t != token);
        }
    }
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
    done: ChanTx<Done>,
    waker: Arc<Waker>,
    handler: Arc<dyn MessageHandler>,
    stats: Arc<ReceiverStats>,
}

impl Worker {
    fn run(self) {
        while let Ok(mut job) = self.jobs.recv() {
            self.process(&mut job);
            let _ = self.done.send(Done { token: job.token });
            let _ = self.waker.wake();
        }
    }

    /// Processes a batch in order, writing the ACKs the selector did not write.
    fn process(&self, job: &mut Job) {
        for Incoming {
            msg,
            acked,
            frame_len,
        } in job.frames.drain(..)
        {
            self.stats.messages.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes
                .fetch_add(frame_len as u64 + 18, Ordering::Relaxed);
            let opts = msg.options;
            if opts.wants_ack_after_processing() {
                let reply = match self.handler.message_received(msg) {
                    Ok(()) => AckCommand::Ack,
                    Err(e) => {
                        debug!(target: "tribes::transport", "{e}; FAIL_ACK to {}", job.conn.peer);
                        self.stats.fail_acks.fetch_add(1, Ordering::Relaxed);
                        AckCommand::FailAck
                    }
                };
                job.conn.write_reply(&reply.frame());
            } else {
                if opts.wants_ack() && !acked {
                    job.conn.write_reply(&AckCommand::Ack.frame());
                }
                if let Err(e) = self.handler.message_received(msg) {
                    debug!(target: "tribes::transport", "{e} (no ACK after processing was asked; nothing sent back)");
                }
            }
        }
    }
}
