//! Shared helpers for the workspace's examples, integration tests and benchmarks.
//!
//! Everything here stays on loopback: channels bind 127.0.0.1 with OS-chosen ports.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tribes::interceptors::{
    DispatchConfig, Interceptor, MessageDispatchInterceptor, StaticMembershipInterceptor,
};
use tribes::transport::{ReceiverConfig, SenderConfig};
use tribes::{ChannelError, GroupChannel, Levels};

/// Options for [`static_group`].
#[derive(Clone)]
pub struct GroupOptions {
    /// Name prefix; channel `i` is named `<prefix><i>`.
    pub name: String,
    /// Receiver settings (address and port are forced to 127.0.0.1:0).
    pub receiver: ReceiverConfig,
    /// Sender settings.
    pub sender: SenderConfig,
    /// Dispatch settings for asynchronous sends.
    pub dispatch: DispatchConfig,
    /// Heartbeat period (None = no heartbeat thread).
    pub heartbeat: Option<Duration>,
    /// Extra interceptors for channel `i`, placed between the dispatch interceptor and the
    /// static membership one.
    pub extra: Option<ExtraInterceptors>,
}

/// Builds the extra interceptors of channel `i` (see [`GroupOptions::extra`]).
pub type ExtraInterceptors = Arc<dyn Fn(usize) -> Vec<Arc<dyn Interceptor>> + Send + Sync>;

impl std::fmt::Debug for GroupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupOptions")
            .field("name", &self.name)
            .field("receiver", &self.receiver)
            .field("sender", &self.sender)
            .field("dispatch", &self.dispatch)
            .field("heartbeat", &self.heartbeat)
            .field("extra", &self.extra.is_some())
            .finish()
    }
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            name: "node".into(),
            receiver: ReceiverConfig::default(),
            sender: SenderConfig::default(),
            dispatch: DispatchConfig::default(),
            heartbeat: Some(Duration::from_secs(5)),
            extra: None,
        }
    }
}

impl GroupOptions {
    /// Defaults with a short send timeout (800 ms) and no heartbeat, for failure tests that
    /// wait for timeouts.
    pub fn fast_failing() -> Self {
        Self {
            sender: SenderConfig {
                timeout: Duration::from_millis(800),
                ..SenderConfig::default()
            },
            heartbeat: None,
            ..Self::default()
        }
    }
}

/// Starts `n` channels on 127.0.0.1 (OS-chosen ports) that know each other through static
/// membership, each with a dispatch interceptor for asynchronous sends.
///
/// The receivers start first (`Levels::SND_RX`), so the bound ports are known before the
/// static member lists are set and the remaining levels start.
pub fn static_group(n: usize, opts: &GroupOptions) -> Result<Vec<GroupChannel>, ChannelError> {
    let mut channels = Vec::with_capacity(n);
    let mut statics = Vec::with_capacity(n);
    for i in 0..n {
        let st = Arc::new(StaticMembershipInterceptor::new(Vec::new()));
        let receiver = ReceiverConfig {
            address: [127, 0, 0, 1].into(),
            port: 0,
            ..opts.receiver.clone()
        };
        let mut builder = GroupChannel::builder()
            .name(format!("{}{i}", opts.name))
            .receiver(receiver)
            .sender(opts.sender.clone())
            .heartbeat_interval(opts.heartbeat)
            .interceptor(MessageDispatchInterceptor::new(opts.dispatch.clone()));
        if let Some(extra) = &opts.extra {
            for x in extra(i) {
                builder = builder.interceptor_arc(x);
            }
        }
        let ch = builder.interceptor_arc(st.clone()).build()?;
        ch.start(Levels::SND_RX)?;
        channels.push(ch);
        statics.push(st);
    }
    let members: Vec<_> = channels.iter().map(GroupChannel::local_member).collect();
    for st in &statics {
        st.set_members(members.clone());
    }
    for ch in &channels {
        ch.start(Levels::SND_TX.union(Levels::MBR_RX).union(Levels::MBR_TX))?;
    }
    Ok(channels)
}

/// Polls `cond` every millisecond until it holds or `timeout` passes; returns the last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Names of this process's live threads (Linux: `/proc/self/task/*/comm`).
pub fn thread_names() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// A tiny DNS responder on 127.0.0.1 for tests and the demo: answers every A query with the
/// current address list (a name-compression pointer to the question), until dropped.
pub struct DnsResponder {
    /// Where it listens (127.0.0.1, an OS-chosen port).
    pub addr: SocketAddr,
    /// The addresses every answer lists; change them at will.
    pub answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsResponder {
    /// Starts answering on 127.0.0.1 with `answers`.
    pub fn start(answers: Vec<Ipv4Addr>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let answers = Arc::new(Mutex::new(answers));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (Arc::clone(&answers), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("test-dns-responder".into())
            .spawn(move || {
                let mut buf = [0u8; 512];
                while !s.load(Ordering::SeqCst) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let q = &buf[..n];
                    // The question ends at the root label plus type and class; anything shorter
                    // than a header and a whole question is not answered.
                    let end = q
                        .get(12..)
                        .and_then(|name| name.iter().position(|&b| b == 0));
                    let Some(end) = end.map(|p| 12 + p + 5).filter(|&e| e <= n) else {
                        continue;
                    };
                    let ips = a.lock().clone();
                    let mut r = q[..end].to_vec();
                    r[2] = 0x81; // response, recursion desired
                    r[3] = 0x80; // recursion available, no error
                    r[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
                    for ip in ips {
                        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
                        r.extend_from_slice(&ip.octets());
                    }
                    let _ = socket.send_to(&r, from);
                }
            })
            .unwrap();
        Self {
            addr,
            answers,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A session-replication node on 127.0.0.1:`port` that knows `peers` statically, with
/// Tribes' cluster defaults (dispatch + TCP failure detector), one `DeltaManager` for
/// context `/app` (synchronous replication, `route` as its jvmRoute), already started.
pub fn ha_node(
    port: u16,
    peers: &[u16],
    route: Option<&str>,
) -> Result<(ha::Cluster, Arc<ha::DeltaManager>), ChannelError> {
    ha_node_with(
        port,
        peers,
        ha::ManagerConfig {
            route: route.map(str::to_string),
            sync: true,
            ..ha::ManagerConfig::default()
        },
    )
}

/// Like [`ha_node`] with a manager configuration of the caller's (the default 60 s
/// state-transfer timeout becomes 10 s).
pub fn ha_node_with(
    port: u16,
    peers: &[u16],
    cfg: ha::ManagerConfig,
) -> Result<(ha::Cluster, Arc<ha::DeltaManager>), ChannelError> {
    ha_node_with_extra(port, peers, cfg, Vec::new())
}

/// Like [`ha_node_with`], with `extra` interceptors right below the dispatch interceptor
/// (e.g. one that records what goes down).
pub fn ha_node_with_extra(
    port: u16,
    peers: &[u16],
    cfg: ha::ManagerConfig,
    extra: Vec<Arc<dyn Interceptor>>,
) -> Result<(ha::Cluster, Arc<ha::DeltaManager>), ChannelError> {
    let dispatch = Arc::new(MessageDispatchInterceptor::default());
    ha_node_custom(port, peers, cfg, extra, dispatch)
}

/// Like [`ha_node_with_extra`], with the caller's dispatch interceptor (which it can keep
/// to look at its queue).
pub fn ha_node_custom(
    port: u16,
    peers: &[u16],
    cfg: ha::ManagerConfig,
    extra: Vec<Arc<dyn Interceptor>>,
    dispatch: Arc<MessageDispatchInterceptor>,
) -> Result<(ha::Cluster, Arc<ha::DeltaManager>), ChannelError> {
    let members: Vec<tribes::Member> = peers
        .iter()
        .map(|p| {
            tribes::Member::with_id(
                SocketAddr::from(([127, 0, 0, 1], *p)),
                tribes::UniqueId::random(),
            )
        })
        .collect();
    let mut builder = GroupChannel::builder()
        .name(format!("ha{port}"))
        .receiver(ReceiverConfig {
            port,
            auto_bind: 1,
            ..ReceiverConfig::default()
        })
        .heartbeat_interval(None)
        .interceptor_arc(dispatch);
    for x in extra {
        builder = builder.interceptor_arc(x);
    }
    let channel = ha::Cluster::failure_detection(builder)
        .interceptor(StaticMembershipInterceptor::new(members))
        .build()?;
    let cluster = ha::Cluster::new(channel);
    // Tests do not wait a minute for a transfer that will not come, unless they ask.
    let state_transfer_timeout =
        if cfg.state_transfer_timeout == ha::ManagerConfig::default().state_transfer_timeout {
            Duration::from_secs(10)
        } else {
            cfg.state_transfer_timeout
        };
    let manager = ha::DeltaManager::new(
        "/app",
        ha::ManagerConfig {
            state_transfer_timeout,
            ..cfg
        },
    );
    cluster
        .register(&manager)
        .map_err(|e| ChannelError::Io(std::io::Error::other(e)))?;
    cluster.start()?;
    Ok((cluster, manager))
}

/// Two session-replication nodes on fresh loopback ports that list each other, node `i`
/// with `cfgs[i]` (see [`ha_node_with`]); returns once both see the other as a member and
/// both managers have started.
#[allow(clippy::type_complexity)]
pub fn started_ha_pair(
    cfgs: [ha::ManagerConfig; 2],
) -> Result<[(ha::Cluster, Arc<ha::DeltaManager>); 2], ChannelError> {
    started_ha_pair_with_extra(cfgs, Vec::new())
}

/// Like [`started_ha_pair`], with `extra` interceptors in the first node (see
/// [`ha_node_with_extra`]).
#[allow(clippy::type_complexity)]
pub fn started_ha_pair_with_extra(
    cfgs: [ha::ManagerConfig; 2],
    extra: Vec<Arc<dyn Interceptor>>,
) -> Result<[(ha::Cluster, Arc<ha::DeltaManager>); 2], ChannelError> {
    let dispatch = Arc::new(MessageDispatchInterceptor::default());
    started_ha_pair_custom(cfgs, extra, dispatch)
}

/// Like [`started_ha_pair_with_extra`], with the caller's dispatch interceptor in the first
/// node.
#[allow(clippy::type_complexity)]
pub fn started_ha_pair_custom(
    cfgs: [ha::ManagerConfig; 2],
    extra: Vec<Arc<dyn Interceptor>>,
    dispatch: Arc<MessageDispatchInterceptor>,
) -> Result<[(ha::Cluster, Arc<ha::DeltaManager>); 2], ChannelError> {
    let ports = [free_port(), free_port()];
    let [a, b] = cfgs;
    let nodes = [
        ha_node_custom(ports[0], &[ports[1]], a, extra, dispatch)?,
        ha_node_with(ports[1], &[ports[0]], b)?,
    ];
    for (cluster, _) in &nodes {
        if !cluster
            .channel()
            .wait_for_members(1, Duration::from_secs(5))
        {
            return Err(ChannelError::Io(std::io::Error::other(
                "the other node did not appear as a member within 5 s",
            )));
        }
    }
    for (cluster, manager) in &nodes {
        manager.start(cluster);
    }
    Ok(nodes)
}

/// A port that was free on 127.0.0.1 a moment ago. Taken below Linux's ephemeral range
/// (32768–60999) so that the outgoing connections of other tests, which get ephemeral ports,
/// cannot take it between this call and the bind; successive calls in one process never
/// repeat a port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Start at a per-process offset so test binaries run one after another do not reuse the
    // ports the previous one left in TIME_WAIT.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 20000;
    const SPAN: u16 = 12000;
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % u32::from(SPAN)) as u16 + 1,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    for _ in 0..SPAN {
        let port = LOW + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A TCP address on 127.0.0.1 where nothing listens, held for as long as the value lives.
///
/// The port is bound but never put into the listening state, so a connection to it is
/// refused at once, and no other socket in the machine can take the port meanwhile. (A port
/// merely "free a moment ago" can be reused by a parallel test's listener, after which the
/// "dead" member answers: that made a failure-detector test flaky.)
pub struct ClosedPort {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

impl ClosedPort {
    /// Binds a fresh port on 127.0.0.1 without listening on it.
    pub fn new() -> std::io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("bound socket has no inet address"))?;
        Ok(Self {
            _socket: socket,
            addr,
        })
    }

    /// Holds `addr` (whose listener just closed) the same way, so nothing else can start
    /// answering there. Fails if another socket took the port first.
    pub fn at(addr: SocketAddr) -> std::io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // The closed listener's connections may linger in TIME_WAIT on the port.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        Ok(Self {
            _socket: socket,
            addr,
        })
    }

    /// The refused address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A TCP address on 127.0.0.1 where a connect hangs until its timeout, as to a host that is
/// down behind a firewall that drops packets.
///
/// The listener has a backlog of 0 and its queue is filled by connections this value holds
/// and never accepts, so Linux drops every further SYN instead of refusing it. How many
/// connections fill it depends on the kernel (one since Linux 6.12, none before), so they
/// are opened until one hangs.
pub struct HangingPort {
    _listener: socket2::Socket,
    _fill: Vec<socket2::Socket>,
    addr: SocketAddr,
}

impl HangingPort {
    /// Binds, listens with a full accept queue, and returns the address.
    pub fn new() -> std::io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        listener.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        listener.listen(0)?;
        let addr = listener
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("bound socket has no inet address"))?;
        let mut fill = Vec::new();
        for _ in 0..4 {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            match socket.connect_timeout(&addr.into(), Duration::from_millis(200)) {
                Ok(()) => fill.push(socket),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Ok(Self {
                        _listener: listener,
                        _fill: fill,
                        addr,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(
            "the listener's queue took 4 connections and still accepts",
        ))
    }

    /// The address whose connects hang.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The README's code, compiled as doctests so it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// A TCP relay on 127.0.0.1 to `target` that can be frozen, to play a member whose process
/// stopped (SIGSTOP, a long pause): while frozen it neither accepts nor relays, but the
/// kernel still completes connections to it and buffers what is written, so a connect
/// succeeds and only a missing answer (an ACK) gives the member away. Thawed, it relays
/// what waited. Its threads end when the value drops.
pub struct FreezableRelay {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl FreezableRelay {
    /// Listens on a fresh loopback port and relays every connection to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (Arc::clone(&frozen), Arc::clone(&stop));
        let acceptor = std::thread::Builder::new()
            .name("test-relay".into())
            .spawn(move || Self::accept_loop(listener, target, f, s))?;
        Ok(Self {
            addr,
            frozen,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// Where to connect to reach `target` through the relay.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops (or resumes) accepting and relaying.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    fn accept_loop(
        listener: std::net::TcpListener,
        target: SocketAddr,
        frozen: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
    ) {
        let mut pumps = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if frozen.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let Ok((inbound, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let Ok(outbound) = std::net::TcpStream::connect(target) else {
                continue; // the target is down: the inbound connection closes
            };
            for (from, to) in [(&inbound, &outbound), (&outbound, &inbound)] {
                let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                    continue;
                };
                let (f, s) = (Arc::clone(&frozen), Arc::clone(&stop));
                let pump = std::thread::Builder::new()
                    .name("test-relay-pump".into())
                    .spawn(move || Self::pump(from, to, &f, &s));
                pumps.extend(pump.ok());
            }
        }
        for p in pumps {
            let _ = p.join();
        }
    }

    fn pump(
        mut from: std::net::TcpStream,
        mut to: std::net::TcpStream,
        frozen: &AtomicBool,
        stop: &AtomicBool,
    ) {
        use std::io::{ErrorKind, Read, Write};
        // Reads wake up now and then to see the flags.
        // Writes give up after a while, so a target that stopped reading cannot hold the
        // relay's drop.
        if from.set_nonblocking(false).is_err()
            || from
                .set_read_timeout(Some(Duration::from_millis(20)))
                .is_err()
            || to.set_write_timeout(Some(Duration::from_secs(2))).is_err()
        {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::SeqCst) {
            if frozen.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // Read just before a freeze: held until the thaw, as a process that
                    // stopped right after its read would.
                    while frozen.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}
