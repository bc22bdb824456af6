//! Sessions that survive a node loss: three axum app nodes (each its own process) replicate
//! their sessions with `ha`, behind a dumb round-robin, non-sticky load balancer; a bounded
//! client load increments a counter in each session while one node is killed (SIGKILL)
//! half-way. Everything runs on 127.0.0.1 and ends by itself.
//!
//! ```text
//! cargo run --release --example cluster_demo                 # sync replication (default)
//! cargo run --release --example cluster_demo -- --async      # Tribes' default: async
//! cargo run --release --example cluster_demo -- --read-your-writes   # async, and a node
//!                                  # waits for the change its client already saw
//! cargo run --release --example cluster_demo -- --sticky     # sticky balancer, route rebinding
//! cargo run --release --example cluster_demo -- --bench      # local-only vs async vs sync
//!                    # (and references: "unshared", three nodes without replication; and
//!                    # what users pick instead, measured alike: "tower-memory", axum +
//!                    # tower-sessions in memory on one node, and "redis", three axum +
//!                    # tower-sessions nodes sharing a Redis that the benchmark runs itself)
//! cargo run --release --example cluster_demo -- --bench --sticky   # each session on one node
//! cargo run --release --example cluster_demo -- --bench --mode async --rounds 20
//!                                     # one mode (with local-only, unshared and redis)
//! cargo run --release --example cluster_demo -- --bench --short --rounds 1   # a smoke run
//! cargo run --release --example cluster_demo -- node --id 0 --http 127.0.0.1:8080 \
//!     --port 4000 --peers 4001,4002 [--async [--read-your-writes]] [--route]  # one node
//!     [--store memory|redis://127.0.0.1:6379]   # a baseline node on tower-sessions instead
//!     [--lifetime SECS]                         # exits after that long (default 300)
//!                                   # logs warnings to stderr; RUST_LOG=info for more
//! cargo run --release --example cluster_demo -- redis --port 6379 [--lifetime SECS]
//!                          # the baseline's Redis, until stdin closes (needs redis-server)
//! ```
//!
//! Each node serves `GET /counter`: it increments the integer in the session and answers with
//! the new number as `text/plain`. The demo's client adds `?seq=K`, its request number within
//! the session, so a request the balancer retries after a node died is not counted twice.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::Uri;
use axum::routing::get;
use axum::Router;
use ha::layer::{ReplicationLayer, Session};
use ha::{Cluster, DeltaManager, ManagerConfig};
use tribes::interceptors::{MessageDispatchInterceptor, StaticMembershipInterceptor};
use tribes::transport::ReceiverConfig;
use tribes::{GroupChannel, Member, UniqueId};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const NODES: usize = 3;
/// How the nodes share sessions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replication {
    /// Every change reaches the other nodes before the response is sent.
    Sync,
    /// Changes are sent after the response (Tribes' default).
    Async,
    /// Async, and a request whose node has not yet received the change its client already
    /// saw waits for it (read-your-writes; a version cookie).
    AsyncReadYourWrites,
    /// No replication: each node keeps its sessions to itself (one node: local-only
    /// sessions; three nodes: the benchmark's reference for what spreading the load costs).
    Off,
    /// Not `ha`: axum + tower-sessions' memory store (the benchmark's baseline for what a
    /// one-node app uses instead; its sessions are not shared).
    TowerMemory,
    /// Not `ha`: axum + tower-sessions with one Redis server that every node shares (the
    /// benchmark's baseline for what a cluster uses instead; Redis is a single point of
    /// failure).
    Redis,
}

impl Replication {
    fn label(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
            Self::AsyncReadYourWrites => "async read-your-writes",
            Self::Off => "no",
            Self::TowerMemory => "tower-sessions memory store, no",
            Self::Redis => "tower-sessions + shared Redis, no ha",
        }
    }

    /// Sessions reach other nodes (through `ha` or Redis), so a hop keeps the session.
    fn shares(self) -> bool {
        !matches!(self, Self::Off | Self::TowerMemory)
    }

    /// Sessions live in `ha`'s DeltaManager.
    fn is_ha(self) -> bool {
        !matches!(self, Self::TowerMemory | Self::Redis)
    }
}
/// Node count of the cluster configurations (the benchmark's local-only case uses one).
type NodeCount = usize;
/// The load: sessions × requests per session (`--short`: 40 × 10, for the test suite).
#[derive(Clone, Copy)]
struct Load {
    sessions: usize,
    requests: usize,
}

const FULL: Load = Load {
    sessions: 200,
    requests: 20,
};
const SHORT: Load = Load {
    sessions: 40,
    requests: 10,
};
const CONCURRENCY: usize = 8;
/// Connections from each baseline node to Redis (fred pipelines requests on each; of 1, 2
/// and 6, 2 gave the baseline its best figures here).
const REDIS_POOL: usize = 2;
/// Loads per benchmark case (`--bench`; `--rounds N` changes it).
const BENCH_ROUNDS: usize = 7;
/// With `--read-your-writes`: how long a request waits for its session's change in flight
/// before the node asks the other members.
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_millis(20);
/// A node process never outlives this, even if the demo's parent died (the benchmark gives
/// its nodes more: [`bench_lifetime`]).
const NODE_LIFETIME: Duration = Duration::from_secs(300);

/// How long the benchmark's processes may live: [`NODE_LIFETIME`] and 20 s per round, far
/// more than a round takes, so a long `--rounds` run is not cut short.
fn bench_lifetime(rounds: usize) -> Duration {
    NODE_LIFETIME + Duration::from_secs(20).saturating_mul(rounds as u32)
}
/// The whole load never runs longer than this.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("node") => return node_main(&args[1..]),
        Some("redis") => return redis_main(&args[1..]),
        _ => {}
    }
    let mut only = None;
    let mut rounds = BENCH_ROUNDS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--async" | "--read-your-writes" | "--sticky" | "--bench" | "--short" => {}
            "--mode" => only = Some(it.next().ok_or("--mode needs a value")?.clone()),
            "--rounds" => rounds = it.next().ok_or("--rounds needs a value")?.parse()?,
            bad => {
                return Err(
                    format!("unknown argument {bad}; see the file's header for usage").into(),
                )
            }
        }
    }
    let load = if args.iter().any(|a| a == "--short") {
        SHORT
    } else {
        FULL
    };
    if args.iter().any(|a| a == "--bench") {
        let sticky = args.iter().any(|a| a == "--sticky");
        return run_bench(only.as_deref(), rounds.max(1), sticky, load);
    }
    let replication = if args.iter().any(|a| a == "--read-your-writes") {
        Replication::AsyncReadYourWrites
    } else if args.iter().any(|a| a == "--async") {
        Replication::Async
    } else {
        Replication::Sync
    };
    let sticky = args.iter().any(|a| a == "--sticky");
    run_demo(replication, sticky, load)
}

// ------------------------------------------------------------------- one app node

/// `GET /counter[?seq=K]`: increments the session's counter and answers the new value. With
/// `seq` (the client's request number within the session) a repeated request, such as a
/// balancer's retry of one whose node died after replicating it but before answering, gets
/// the value it already produced instead of a second increment: the usual way to make a
/// non-idempotent request safe to retry. The number and the counter change in one delta, so
/// they replicate together.
async fn counter(session: Session, uri: Uri) -> String {
    let n = session.get::<u64>("counter").ok().flatten().unwrap_or(0);
    let seq = seq_of(&uri);
    if seq.is_some() && session.get::<u64>("seq").ok().flatten() == seq {
        return n.to_string();
    }
    let n = n + 1;
    let stored = session
        .insert("counter", &n)
        .and_then(|()| seq.map_or(Ok(()), |k| session.insert("seq", &k)));
    if let Err(e) = stored {
        return format!("error: {e}");
    }
    n.to_string()
}

/// The client's `seq=K` query parameter.
fn seq_of(uri: &Uri) -> Option<u64> {
    uri.query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("seq=")))
        .and_then(|v| v.parse().ok())
}

/// [`counter`] for the baselines, on tower-sessions (whose session calls are async because
/// its store may be remote).
async fn tower_counter(session: tower_sessions::Session, uri: Uri) -> String {
    let answer = async {
        let n = session.get::<u64>("counter").await?.unwrap_or(0);
        let seq = seq_of(&uri);
        if seq.is_some() && session.get::<u64>("seq").await? == seq {
            return Ok(n);
        }
        session.insert("counter", n + 1).await?;
        if let Some(k) = seq {
            session.insert("seq", k).await?;
        }
        Ok::<_, tower_sessions::session::Error>(n + 1)
    };
    match answer.await {
        Ok(n) => n.to_string(),
        Err(e) => format!("error: {e}"),
    }
}

/// Serves `app` on `http` until the process ends, after `first` (which runs on the serving
/// runtime) is done.
fn serve(http: SocketAddr, app: Router, first: impl Future<Output = Res<()>>) -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        first.await?;
        let listener = tokio::net::TcpListener::bind(http).await?;
        println!("ready {http}");
        axum::serve(listener, app).await?;
        Ok(())
    })
}

/// A baseline node (`--store memory` or `--store redis://HOST:PORT`): the same app on
/// axum + tower-sessions instead of `ha`.
fn tower_node_main(http: SocketAddr, store: &str) -> Res<()> {
    use tower_sessions::{MemoryStore, SessionManagerLayer};
    use tower_sessions_redis_store::fred::prelude::{ClientLike, Config, Pool};
    use tower_sessions_redis_store::RedisStore;

    let app = Router::new().route("/counter", get(tower_counter));
    // Plain HTTP on loopback: no `Secure` attribute, and the cookie name `ha` uses.
    if store == "memory" {
        let layer = SessionManagerLayer::new(MemoryStore::default())
            .with_name("JSESSIONID")
            .with_secure(false);
        return serve(http, app.layer(layer), async { Ok(()) });
    }
    let pool = Pool::new(Config::from_url(store)?, None, None, None, REDIS_POOL)?;
    let layer = SessionManagerLayer::new(RedisStore::new(pool.clone()))
        .with_name("JSESSIONID")
        .with_secure(false);
    // The pool's connections are tasks of the runtime that connects them: the serving one.
    serve(http, app.layer(layer), async move {
        pool.init().await?;
        Ok(())
    })
}

fn node_main(args: &[String]) -> Res<()> {
    let mut id = 0usize;
    let mut http: Option<SocketAddr> = None;
    let mut port = 4000u16;
    let mut peers = Vec::new();
    let mut sync = true;
    let mut route = false;
    let mut read_your_writes = false;
    let mut store = None;
    let mut lifetime = NODE_LIFETIME;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--id" => id = value()?.parse()?,
            "--http" => http = Some(value()?.parse()?),
            "--port" => port = value()?.parse()?,
            "--peers" => {
                peers = value()?
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::parse)
                    .collect::<Result<Vec<u16>, _>>()?
            }
            "--async" => sync = false,
            "--read-your-writes" => read_your_writes = true,
            "--route" => route = true,
            "--store" => store = Some(value()?.clone()),
            "--lifetime" => lifetime = Duration::from_secs(value()?.parse()?),
            other => return Err(format!("unknown node argument {other}").into()),
        }
    }
    let http = http.ok_or("--http is required")?;
    // Warnings by default, `RUST_LOG` for more (the demo's own nodes write their logs
    // nowhere; run one by hand to see them).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Ends the process whatever happens, so nothing is left running.
    std::thread::Builder::new()
        .name("demo-lifetime".into())
        .spawn(move || {
            std::thread::sleep(lifetime);
            std::process::exit(3);
        })?;
    if let Some(store) = store {
        return tower_node_main(http, &store);
    }
    let members: Vec<Member> = peers
        .iter()
        .map(|p| Member::with_id(SocketAddr::from(([127, 0, 0, 1], *p)), UniqueId::random()))
        .collect();
    let builder = GroupChannel::builder()
        .name(format!("node{id}"))
        .receiver(ReceiverConfig {
            port,
            auto_bind: 1,
            ..ReceiverConfig::default()
        })
        .interceptor(MessageDispatchInterceptor::default());
    // Joins, leaves and frozen members checked over TCP (every member on each heartbeat).
    let channel = Cluster::failure_detection(builder)
        .interceptor(StaticMembershipInterceptor::new(members))
        .build()?;
    let cluster = Cluster::new(channel);
    let manager = DeltaManager::new(
        "/",
        ManagerConfig {
            sync,
            // Route suffixes only help a sticky balancer; with round robin every hop would
            // rename the session (one more replicated message per request).
            route: route.then(|| format!("n{id}")),
            state_transfer_timeout: Duration::from_secs(10),
            ..ManagerConfig::default()
        },
    );
    cluster.register(&manager)?;
    cluster.start()?;
    manager.start(&cluster);
    let stats_of = Arc::clone(&manager);
    let mut layer = ReplicationLayer::new(manager).filter(r"/static/.*")?;
    if read_your_writes {
        layer = layer.read_your_writes(READ_YOUR_WRITES_WAIT);
    } else if peers.is_empty() {
        // No replication (the local-only and unshared references): no version cookie to
        // set or check, so they measure the app alone.
        layer = layer.without_read_your_writes();
    }
    let app = Router::new()
        .route("/counter", get(counter))
        .route("/stats", get(move || async move { stats_line(&stats_of) }))
        .layer(layer);
    serve(http, app, async { Ok(()) })?;
    cluster.stop()?;
    Ok(())
}

/// `GET /stats`: the node's replication counters as `name=value` pairs on one line.
fn stats_line(manager: &DeltaManager) -> String {
    let st = manager.stats();
    format!(
        "sessions={} deltas_sent={} deltas_received={} stale_dropped={} held_back={} forced={} repaired={} fetched={} fetch_misses={} version_waits={} version_fetches={} send_errors={}",
        st.active,
        st.sent.delta,
        st.received.delta,
        st.store.stale,
        st.store.gaps,
        st.store.forced,
        st.copies_repaired,
        st.sessions_fetched,
        st.fetch_misses,
        st.version_waits,
        st.version_fetches,
        st.send_errors,
    )
}

/// Sums the `name=value` pairs of every node's `/stats`.
fn cluster_stats(nodes: &[SocketAddr]) -> String {
    let mut sums: Vec<(String, u64)> = Vec::new();
    for node in nodes {
        let Ok(mut s) = TcpStream::connect(node) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut resp = String::new();
        if write!(
            s,
            "GET /stats HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
        )
        .is_err()
            || s.read_to_string(&mut resp).is_err()
        {
            continue;
        }
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        for (k, v) in body.split_whitespace().filter_map(|kv| kv.split_once('=')) {
            let v: u64 = v.parse().unwrap_or(0);
            match sums.iter_mut().find(|(name, _)| name == k) {
                Some((_, sum)) => *sum += v,
                None => sums.push((k.to_string(), v)),
            }
        }
    }
    sums.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ------------------------------------------------------------------- the demo

fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct NodeProc {
    child: Child,
    http: SocketAddr,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nodes(
    count: NodeCount,
    replication: Replication,
    route: bool,
    redis: Option<SocketAddr>,
    lifetime: Duration,
) -> Res<Vec<NodeProc>> {
    let cluster_ports: Vec<u16> = (0..count).map(|_| free_port()).collect::<Res<_>>()?;
    let mut nodes = Vec::new();
    for i in 0..count {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let peers: Vec<String> = cluster_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i && replication.shares())
            .map(|(_, p)| p.to_string())
            .collect();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["node", "--id", &i.to_string(), "--http", &http.to_string()])
            .args([
                "--port",
                &cluster_ports[i].to_string(),
                "--peers",
                &peers.join(","),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        match replication {
            Replication::Async => {
                cmd.arg("--async");
            }
            Replication::AsyncReadYourWrites => {
                cmd.args(["--async", "--read-your-writes"]);
            }
            Replication::TowerMemory => {
                cmd.args(["--store", "memory"]);
            }
            Replication::Redis => {
                let addr = redis.ok_or("the Redis baseline needs a Redis server")?;
                cmd.args(["--store", &format!("redis://{addr}")]);
            }
            Replication::Sync | Replication::Off => {}
        }
        if route {
            cmd.arg("--route");
        }
        cmd.args(["--lifetime", &lifetime.as_secs().to_string()]);
        let mut child = cmd.spawn()?;
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let node = NodeProc { child, http };
        if !line.starts_with("ready") {
            return Err(format!("node {i} did not start").into());
        }
        nodes.push(node);
    }
    // Give the failure detectors a moment to verify each other.
    std::thread::sleep(Duration::from_millis(300));
    Ok(nodes)
}

/// `cluster_demo redis --port P [--lifetime SECS]`: runs `redis-server` on 127.0.0.1:P for
/// the benchmark's Redis baseline, prints `ready ADDR PID` once it accepts connections, and
/// stops it when the demo closes this process's stdin (also when the demo dies) or after
/// the lifetime (default [`NODE_LIFETIME`]), so the server never outlives the benchmark.
fn redis_main(args: &[String]) -> Res<()> {
    let usage = "usage: cluster_demo redis --port P [--lifetime SECS]";
    let (port, lifetime): (u16, Duration) = match args {
        [flag, p] if flag == "--port" => (p.parse()?, NODE_LIFETIME),
        [flag, p, l, secs] if flag == "--port" && l == "--lifetime" => {
            (p.parse()?, Duration::from_secs(secs.parse()?))
        }
        _ => return Err(usage.into()),
    };
    let mut server = Command::new("redis-server")
        // Memory only, loopback only: nothing to save, nobody else to serve.
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot run redis-server ({e}); on Debian: apt-get install redis-server")
        })?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Ready when the server on the port says it is ours: another process could have taken
    // the port between `free_port` and the server's bind (ours would then exit).
    while redis_pid(addr) != Some(server.id()) {
        if Instant::now() > deadline || server.try_wait()?.is_some() {
            let _ = server.kill();
            let _ = server.wait();
            return Err(format!("redis-server did not start on {addr}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ready {addr} {}", server.id());
    let (closed, stdin_closed) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("redis-stdin".into())
        .spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = closed.send(());
        })?;
    let _ = stdin_closed.recv_timeout(lifetime);
    // Our own child, by its handle.
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}

/// The process id of the Redis server answering on `addr` (its `INFO server`), if one does.
fn redis_pid(addr: SocketAddr) -> Option<u32> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    let mut info = Vec::new();
    let mut buf = [0u8; 4096];
    // The reply is one bulk string of a few KiB; `process_id` is in its first lines.
    while info.len() < 64 * 1024 {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        info.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&info);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some((pid, _)) = rest.split_once("\r\n") {
                return pid.trim().parse().ok();
            }
        }
    }
    None
}

/// Whether `redis-server` is on the `PATH` (the Redis baseline needs it).
fn redis_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
    })
}

/// A Redis server for the benchmark's baseline, stopped when dropped.
struct RedisServer {
    supervisor: Child,
    /// Closing it tells the supervisor to stop the server.
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    /// The server's own process, for its CPU time.
    pid: u32,
}

impl RedisServer {
    fn start(lifetime: Duration) -> Res<Self> {
        let mut supervisor = Command::new(std::env::current_exe()?)
            .args(["redis", "--port", &free_port()?.to_string()])
            .args(["--lifetime", &lifetime.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = supervisor.stdin.take();
        let mut line = String::new();
        BufReader::new(supervisor.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let mut words = line.split_whitespace().skip(1);
        let started = (words.next().and_then(|a| a.parse().ok()))
            .zip(words.next().and_then(|p| p.parse().ok()));
        let Some((addr, pid)) = started else {
            let mut why = String::new();
            if let Some(mut err) = supervisor.stderr.take() {
                let _ = err.read_to_string(&mut why);
            }
            let _ = supervisor.wait();
            // `main` printed its error as `Error: "..."`.
            let why = why.trim().trim_start_matches("Error: ").trim_matches('"');
            return Err(format!("the Redis baseline: {why}").into());
        };
        Ok(Self {
            supervisor,
            stdin,
            addr,
            pid,
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.supervisor.wait();
    }
}

/// A dumb TCP load balancer: each client connection goes to the next backend in turn
/// (round robin, non-sticky), or with `sticky` to the backend named by the session cookie's
/// route; a backend that refuses the connection is skipped. It runs until dropped.
struct Balancer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    fn start(backends: Vec<SocketAddr>, sticky: bool) -> Res<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::clone(&stop);
        // A blocking accept, not a polling one: the benchmark keeps one balancer per case
        // idle beside the nodes it measures, and a loop that woke every millisecond took a
        // few percent of the machine's two cores. Drop wakes it with a connection.
        let accept = std::thread::Builder::new()
            .name("demo-lb".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else {
                        // Out of descriptors, say: do not spin on it.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let backends = backends.clone();
                    let next = Arc::clone(&next);
                    // Ends by itself: every read and write has a timeout.
                    let _ = std::thread::Builder::new()
                        .name("demo-lb-conn".into())
                        .spawn(move || {
                            let _ = proxy(client, &backends, &next, sticky);
                        });
                }
            })?;
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept; if even that fails the thread is left to the process's end
        // rather than joined forever.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
            if let Some(t) = self.accept.take() {
                let _ = t.join();
            }
        }
    }
}

fn proxy(
    mut client: TcpStream,
    backends: &[SocketAddr],
    next: &AtomicUsize,
    sticky: bool,
) -> Res<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Read the request head (our client sends no body).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let preferred = if sticky {
        route_of(&head).and_then(|r| r.strip_prefix('n')?.parse::<usize>().ok())
    } else {
        None
    };
    let start = preferred.unwrap_or_else(|| next.fetch_add(1, Ordering::Relaxed));
    for k in 0..backends.len() {
        let b = backends[(start + k) % backends.len()];
        let Ok(mut server) = TcpStream::connect_timeout(&b, Duration::from_millis(500)) else {
            continue;
        };
        server.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut resp = Vec::new();
        if server.write_all(&head).is_err()
            || server.read_to_end(&mut resp).is_err()
            || resp.is_empty()
        {
            // The backend died before answering: try the next one, as a balancer with
            // retries does.
            continue;
        }
        client.write_all(&resp)?;
        return Ok(());
    }
    client.write_all(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )?;
    Ok(())
}

fn route_of(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let cookie = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("cookie:"))?;
    let value = cookie.split_once("JSESSIONID=")?.1;
    let id = value.split(';').next()?.trim();
    id.split_once('.').map(|(_, r)| r.to_string())
}

/// An answer to `GET /counter`: status, counter, the cookies set (`name=value` each).
type Answer = (u16, Option<u64>, Vec<String>);

/// The value of a `Set-Cookie` line (after the colon) without its attributes.
fn cookie_pair(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One `GET /counter?seq=K` through the balancer.
fn request(lb: SocketAddr, cookie: Option<&str>, seq: usize) -> Res<Answer> {
    let mut s = TcpStream::connect(lb)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let cookie_line = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    // One write for the whole request: `write!` on a socket would send each piece of the
    // format string as its own segment.
    let req = format!(
        "GET /counter?seq={seq} HTTP/1.1\r\nHost: demo\r\n{cookie_line}Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let set = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .filter_map(|l| l.split_once(':'))
        .map(|(_, v)| cookie_pair(v))
        .collect();
    Ok((status, body.trim().parse().ok(), set))
}

/// How the load reaches the nodes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clients {
    /// A new connection per request through the demo's balancer.
    ViaBalancer,
    /// Keep-alive connections straight to the nodes, requests in round robin.
    RoundRobin,
    /// Keep-alive connections straight to the nodes, each session's requests to one node
    /// (what a sticky balancer does).
    Pinned,
}

/// The benchmark's client: keep-alive connections straight to each node, so the figures
/// measure the nodes and replication rather than connection setup and the demo's balancer.
struct DirectClient {
    nodes: Vec<SocketAddr>,
    conns: Vec<Option<BufReader<TcpStream>>>,
    next: usize,
    pinned: bool,
}

impl DirectClient {
    fn new(nodes: Vec<SocketAddr>, start: usize, pinned: bool) -> Self {
        let n = nodes.len();
        Self {
            nodes,
            conns: (0..n).map(|_| None).collect(),
            next: start,
            pinned,
        }
    }

    /// A new session starts: pinned clients send all of it to one node.
    fn start_session(&mut self, index: usize) {
        if self.pinned {
            self.next = index;
        }
    }

    fn request(&mut self, cookie: Option<&str>, seq: usize) -> Res<Answer> {
        let i = self.next % self.nodes.len();
        if !self.pinned {
            self.next += 1;
        }
        let r = self.try_request(i, cookie, seq);
        if r.is_err() {
            self.conns[i] = None; // reconnect next time
        }
        r
    }

    fn try_request(&mut self, i: usize, cookie: Option<&str>, seq: usize) -> Res<Answer> {
        if self.conns[i].is_none() {
            let s = TcpStream::connect(self.nodes[i])?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            self.conns[i] = Some(BufReader::new(s));
        }
        let conn = self.conns[i].as_mut().ok_or("no connection")?;
        let cookie_line = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        // One write (one segment) per request, as a real client or balancer sends it.
        let req = format!("GET /counter?seq={seq} HTTP/1.1\r\nHost: demo\r\n{cookie_line}\r\n");
        conn.get_mut().write_all(req.as_bytes())?;
        let mut status = 0u16;
        let mut len = 0usize;
        let mut set = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err("connection closed".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if lower.starts_with("http/1.1 ") {
                status = l[9..12].parse().unwrap_or(0);
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            } else if lower.starts_with("set-cookie:") {
                set.extend(l.split_once(':').map(|(_, v)| cookie_pair(v)));
            }
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body)?;
        Ok((
            status,
            String::from_utf8_lossy(&body).trim().parse().ok(),
            set,
        ))
    }
}

#[derive(Default)]
struct Summary {
    sent: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    backward: AtomicU64,
    skipped: AtomicU64,
    /// Sessions whose cookie moved to another node's route (route rebinding).
    rebound: AtomicU64,
    /// Sessions now running whose cookie names the route of the node to be killed.
    on_victim: AtomicU64,
    latencies_us: parking_lot::Mutex<Vec<u64>>,
}

fn run_demo(replication: Replication, sticky: bool, load: Load) -> Res<()> {
    let r = Deployment::start(NODES, replication, sticky, NODE_LIFETIME)?.drive(
        load,
        Clients::ViaBalancer,
        true,
    )?;
    println!("{}", r.line());
    // With synchronous replication every answer a client got is on the other nodes before
    // it got it, and the balancer retries a request whose node died before answering (the
    // request's `seq` keeps a retry of an already replicated change from counting twice): a
    // failed request, a lost session or a counter that skips or goes backwards is a bug.
    // CI runs this demo.
    let broken = r.failed + r.lost + r.backward + r.skipped;
    if replication == Replication::Sync && broken > 0 {
        return Err(format!(
            "{broken} failed requests, lost sessions or counter anomalies with synchronous replication"
        )
        .into());
    }
    Ok(())
}

/// The replication benchmark: the same load against one node with local-only sessions and
/// against three nodes (round robin) with async and with sync replication, in one run, plus
/// a reference case: three nodes without replication, which shows what spreading the load
/// over three processes costs on this machine before any replication happens (its sessions
/// do not survive a hop, so its counters are not checked). Every case's nodes start first;
/// then the cases take turns, one load each, [`BENCH_ROUNDS`] times (fresh sessions each
/// time; one load takes well under a second, too short to measure alone on a shared
/// machine). Each line reports the median round and the median of its rounds' ratios to the
/// local-only round of the same turn (and, for a replicating mode, to the reference round of
/// the same turn, with the difference in node CPU per request: replication's own cost);
/// anomalies are summed over all rounds.
fn run_bench(only: Option<&str>, rounds: usize, sticky: bool, load: Load) -> Res<()> {
    let (clients, balance) = if sticky {
        (Clients::Pinned, "sticky")
    } else {
        (Clients::RoundRobin, "round-robin")
    };
    let cases = [
        ("local-only", 1, Replication::Off),
        ("tower-memory", 1, Replication::TowerMemory),
        ("unshared", NODES, Replication::Off),
        ("redis", NODES, Replication::Redis),
        ("async", NODES, Replication::Async),
        ("async-ryw", NODES, Replication::AsyncReadYourWrites),
        ("sync", NODES, Replication::Sync),
    ];
    if let Some(mode) = only {
        if !cases.iter().any(|c| c.0 == mode) {
            let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
            return Err(format!("--mode {mode}: expected one of {}", names.join(", ")).into());
        }
    }
    // The ratios need local-only, and a three-node mode's own cost needs the unshared and
    // Redis references, so those run too; `--mode` only skips the other modes.
    let many = |m: &str| cases.iter().any(|c| c.0 == m && c.1 > 1);
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|(label, _, _)| {
            only.is_none_or(|m| {
                m == *label
                    || *label == "local-only"
                    || (many(m) && matches!(*label, "unshared" | "redis"))
            })
        })
        .collect();
    // Every case's nodes run from the start, and the rounds take turns (local-only, then
    // each mode, round after round), so a slow spell of this shared machine hits every case
    // alike instead of whichever ran during it. Without `redis-server` on this machine the
    // Redis baseline is left out with a note, unless it was asked for by name.
    let mut deployments = Vec::with_capacity(cases.len());
    let mut ran = Vec::with_capacity(cases.len());
    for case @ (label, count, replication) in cases {
        if replication == Replication::Redis && !redis_installed() && only != Some(label) {
            println!(
                "replication-bench mode={label} skipped: redis-server is not installed (Debian: apt-get install redis-server)"
            );
            continue;
        }
        deployments.push(Deployment::start(
            count,
            replication,
            false,
            bench_lifetime(rounds),
        )?);
        ran.push(case);
    }
    let cases = ran;
    let mut reports: Vec<Vec<Report>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds.max(1) {
        for (d, r) in deployments.iter_mut().zip(&mut reports) {
            r.push(d.drive(load, clients, false)?);
        }
    }
    let base: Vec<f64> = reports[0].iter().map(|r| r.rate).collect();
    // The middle value (`None` when there is none).
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let median_cpu = |rounds: &[Report]| median(rounds.iter().filter_map(|r| r.cpu_us).collect());
    let base_cpu = median_cpu(&reports[0]);
    let rates_of = |i: usize| -> Vec<f64> { reports[i].iter().map(|r| r.rate).collect() };
    // The same three nodes without replication, when that case runs: against it a mode's
    // ratio shows what replication itself costs, apart from what the topology does.
    let reference = cases
        .iter()
        .position(|(_, count, replication)| *count > 1 && *replication == Replication::Off)
        .map(|i| (rates_of(i), median_cpu(&reports[i])));
    // The same three nodes sharing sessions through Redis instead: what users would pick.
    let redis = (cases.iter())
        .position(|c| c.2 == Replication::Redis)
        .map(rates_of);
    let mut wrong = Vec::new();
    for (((label, count, replication), d), mut rounds) in
        cases.into_iter().zip(&deployments).zip(reports)
    {
        let anomalies = |f: fn(&Report) -> u64| rounds.iter().map(f).sum::<u64>();
        let (failed, lost, backward, skipped) = (
            anomalies(|r| r.failed),
            anomalies(|r| r.lost),
            anomalies(|r| r.backward),
            anomalies(|r| r.skipped),
        );
        // The ratio is the median of each round's ratio to the local-only round just before.
        let ratio =
            median(rounds.iter().zip(&base).map(|(r, b)| r.rate / b).collect()).unwrap_or_default();
        let mut own_cost = match &reference {
            Some((rates, ref_cpu)) if count > 1 && replication.shares() => {
                let vs = median(rounds.iter().zip(rates).map(|(r, u)| r.rate / u).collect())
                    .unwrap_or_default();
                let cpu = match (median_cpu(&rounds), ref_cpu) {
                    (Some(c), Some(u)) => format!(" {:+.1}us cpu/req", c - u),
                    _ => String::new(),
                };
                format!(", {vs:.2}x unshared{cpu}")
            }
            _ => String::new(),
        };
        if let Some(redis) =
            (redis.as_ref()).filter(|_| replication.is_ha() && replication.shares())
        {
            let vs = median(rounds.iter().zip(redis).map(|(r, b)| r.rate / b).collect());
            own_cost += &format!(", {:.2}x redis", vs.unwrap_or_default());
        }
        rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let r = &rounds[rounds.len() / 2];
        let checks = if count > 1 && !replication.shares() && sticky {
            "reference: no replication".to_string()
        } else if count > 1 && !replication.shares() {
            "reference: no replication, a request on another node starts a new session".to_string()
        } else {
            format!("failed={failed} lost={lost} backward={backward} skipped={skipped}")
        };
        // CPU per request: the nodes' CPU time over a round, per request, as a median; far
        // steadier than req/s when other work shares the machine.
        let cpu = match (median_cpu(&rounds), base_cpu) {
            (Some(c), Some(b)) => format!(" cpu={c:.1}us/req ({:.2}x)", c / b),
            _ => String::new(),
        };
        // Memory: the largest peak resident size of one node process over all rounds.
        let rss = match d.peak_rss_kib() {
            Some(k) => format!(" rss={:.1}MiB/node", k as f64 / 1024.0),
            None => String::new(),
        };
        println!(
            "replication-bench mode={label} nodes={count} balance={balance} -> {:.0} req/s p50={}us p99={}us{cpu}{rss} [{ratio:.2}x local-only{own_cost}; {checks}; median of {} interleaved rounds of {} requests]",
            r.rate,
            r.p50,
            r.p99,
            rounds.len(),
            r.sent,
        );
        if let Some(stats) = d.stats() {
            println!("replication-stats mode={label} (all nodes, all rounds) {stats}");
        }
        // Every case but plain async (whose node may answer before the session's last
        // change arrived, as Tomcat's default does) and the unshared reference promises
        // right answers: an anomaly there is a bug, and fails the benchmark.
        let promised = replication != Replication::Async && (count == 1 || replication.shares());
        if promised && failed + lost + backward + skipped > 0 {
            wrong.push(label);
        }
    }
    if !wrong.is_empty() {
        return Err(format!("wrong answers in mode(s) {}", wrong.join(", ")).into());
    }
    Ok(())
}

struct Report {
    sent: u64,
    failed: u64,
    lost: u64,
    backward: u64,
    skipped: u64,
    rebound: u64,
    rate: f64,
    /// CPU time the nodes spent per request (all their threads, kernel included), when the
    /// platform tells (Linux `/proc`).
    cpu_us: Option<f64>,
    p50: u64,
    p99: u64,
    secs: f64,
}

impl Report {
    fn line(&self) -> String {
        format!(
            "requests={} failed={} sessions_lost={} backward={} skipped={} rebound={} -> {:.0} req/s p50={}us p99={}us ({:.2}s)",
            self.sent, self.failed, self.lost, self.backward, self.skipped, self.rebound, self.rate, self.p50, self.p99, self.secs
        )
    }
}

/// Nodes and their balancer, running until dropped.
struct Deployment {
    nodes: Vec<NodeProc>,
    /// Nodes have routes and the balancer follows them.
    sticky: bool,
    lb: Balancer,
    replication: Replication,
    /// The shared store of the Redis baseline (dropped after the nodes).
    redis: Option<RedisServer>,
}

impl Deployment {
    fn start(
        count: NodeCount,
        replication: Replication,
        sticky: bool,
        lifetime: Duration,
    ) -> Res<Self> {
        let redis = (replication == Replication::Redis)
            .then(|| RedisServer::start(lifetime))
            .transpose()?;
        let redis_addr = redis.as_ref().map(|r| r.addr);
        let nodes = start_nodes(count, replication, sticky, redis_addr, lifetime)?;
        let lb = Balancer::start(nodes.iter().map(|n| n.http).collect(), sticky)?;
        println!(
            "cluster demo: {count} node(s) ({} replication), {} balancer at {}",
            replication.label(),
            if sticky { "sticky" } else { "round-robin" },
            lb.addr
        );
        Ok(Self {
            nodes,
            sticky,
            lb,
            replication,
            redis,
        })
    }

    /// One load of fresh sessions; with `kill`, node 1 is killed half-way.
    fn drive(&mut self, load: Load, clients: Clients, kill: bool) -> Res<Report> {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.http).collect();
        let before = self.cpu_ns();
        let victim = (kill && self.nodes.len() > 1).then_some(&mut self.nodes);
        let mut report = drive(self.lb.addr, &addrs, load, clients, victim, self.sticky)?;
        if !kill {
            if let (Some(a), Some(b)) = (before, self.cpu_ns()) {
                report.cpu_us = Some(b.saturating_sub(a) as f64 / 1e3 / report.sent.max(1) as f64);
            }
        }
        Ok(report)
    }

    /// CPU time all node processes (and the Redis server, when there is one) have used so
    /// far, in nanoseconds: on a machine shared with other work, CPU per request moves far
    /// less than requests per second.
    fn cpu_ns(&self) -> Option<u64> {
        let nodes = self.nodes.iter().map(|n| n.child.id());
        nodes
            .chain(self.redis.as_ref().map(|r| r.pid))
            .map(process_cpu_ns)
            .sum()
    }

    /// The largest peak resident set (`VmHWM`) of one node process so far, in KiB; `None`
    /// where `/proc` does not tell. The Redis server of that baseline is not a node.
    fn peak_rss_kib(&self) -> Option<u64> {
        // A node that has exited (the demo kills one) no longer tells; the others do.
        self.nodes
            .iter()
            .filter_map(|n| process_peak_rss_kib(n.child.id()))
            .max()
    }

    /// The nodes' summed `/stats` when they replicate, once they stop changing: right after
    /// a load, asynchronous changes are still on their way (up to 2 s).
    fn stats(&self) -> Option<String> {
        (self.replication.is_ha() && self.replication.shares()).then(|| {
            let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.http).collect();
            let mut last = cluster_stats(&addrs);
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(50));
                let now = cluster_stats(&addrs);
                if now == last {
                    break;
                }
                last = now;
            }
            last
        })
    }
}

/// CPU time of every thread of process `pid` so far (Linux: the first field of each
/// thread's `schedstat`, in nanoseconds); `None` where `/proc` does not tell.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Peak resident set size of process `pid` (Linux: `VmHWM` in `/proc/PID/status`, KiB).
fn process_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The route of the node the demo kills (node 1).
const VICTIM_ROUTE: &str = "n1";

/// The session cookie's base id and route, if it has a route.
fn session_route(jar: &[String]) -> Option<(String, String)> {
    let value = jar.iter().find_map(|c| c.strip_prefix("JSESSIONID="))?;
    let (base, route) = value.rsplit_once('.')?;
    Some((base.to_string(), route.to_string()))
}

/// Counts a session arriving on (`+1`) or leaving (`-1`) the victim's route.
fn track_victim(summary: &Summary, held: Option<&(String, String)>, delta: i64) {
    if held.is_some_and(|(_, route)| route == VICTIM_ROUTE) {
        if delta > 0 {
            summary.on_victim.fetch_add(1, Ordering::Relaxed);
        } else {
            summary.on_victim.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One load of `load.sessions` fresh sessions; with `victim`, node 1 is killed half-way.
fn drive(
    lb: SocketAddr,
    node_addrs: &[SocketAddr],
    load: Load,
    clients: Clients,
    victim: Option<&mut Vec<NodeProc>>,
    wait_for_victim_session: bool,
) -> Res<Report> {
    let summary = Arc::new(Summary::default());
    let next_session = Arc::new(AtomicUsize::new(0));
    let done_requests = Arc::new(AtomicU64::new(0));
    let total = (load.sessions * load.requests) as u64;
    let started = Instant::now();
    let workers: Vec<std::thread::JoinHandle<()>> = (0..CONCURRENCY)
        .map(|w| {
            let (summary, next_session, done) = (
                Arc::clone(&summary),
                Arc::clone(&next_session),
                Arc::clone(&done_requests),
            );
            let mut client = (clients != Clients::ViaBalancer)
                .then(|| DirectClient::new(node_addrs.to_vec(), w, clients == Clients::Pinned));
            let spawned = std::thread::Builder::new()
                .name(format!("demo-client-{w}"))
                .spawn(move || loop {
                    let i = next_session.fetch_add(1, Ordering::Relaxed);
                    if i >= load.sessions || started.elapsed() > LOAD_LIMIT {
                        return;
                    }
                    if let Some(c) = client.as_mut() {
                        c.start_session(i);
                    }
                    // The client's cookie jar: the session cookie, and with read-your-writes the
                    // session version it last saw.
                    let mut jar: Vec<String> = Vec::new();
                    let mut last = 0u64;
                    // The session cookie's (base id, route), to see route rebinding.
                    let mut held: Option<(String, String)> = None;
                    for seq in 1..=load.requests {
                        let t0 = Instant::now();
                        summary.sent.fetch_add(1, Ordering::Relaxed);
                        done.fetch_add(1, Ordering::Relaxed);
                        let cookie = (!jar.is_empty()).then(|| jar.join("; "));
                        let result = match client.as_mut() {
                            Some(c) => c.request(cookie.as_deref(), seq),
                            None => request(lb, cookie.as_deref(), seq),
                        };
                        match result {
                            Ok((200, Some(n), set)) => {
                                summary
                                    .latencies_us
                                    .lock()
                                    .push(t0.elapsed().as_micros() as u64);
                                for pair in set {
                                    let name =
                                        pair.split('=').next().unwrap_or_default().to_string();
                                    jar.retain(|c| c.split('=').next() != Some(name.as_str()));
                                    jar.push(pair);
                                }
                                let now = session_route(&jar);
                                if now != held {
                                    if let (Some((was, _)), Some((is, _))) = (&held, &now) {
                                        if was == is {
                                            summary.rebound.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                    track_victim(&summary, held.as_ref(), -1);
                                    track_victim(&summary, now.as_ref(), 1);
                                    held = now;
                                }
                                if n == 1 && last > 0 {
                                    summary.lost.fetch_add(1, Ordering::Relaxed);
                                } else if n <= last {
                                    summary.backward.fetch_add(1, Ordering::Relaxed);
                                } else if n > last + 1 {
                                    summary.skipped.fetch_add(1, Ordering::Relaxed);
                                }
                                last = n;
                            }
                            _ => {
                                summary.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    track_victim(&summary, held.as_ref(), -1);
                });
            spawned
        })
        .collect::<Result<_, _>>()?;
    // Kill one node (SIGKILL) half-way through the load.
    if let Some(nodes) = victim {
        // With routes (sticky), also until a running session is on the victim, so the kill
        // always makes some session move (route rebinding is what `--sticky` shows).
        while (done_requests.load(Ordering::Relaxed) < total / 2
            || (wait_for_victim_session && summary.on_victim.load(Ordering::Relaxed) == 0))
            && started.elapsed() < LOAD_LIMIT
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let victim = nodes.remove(1);
        println!(
            "killing node 1 ({}) after {} requests",
            victim.http,
            done_requests.load(Ordering::Relaxed)
        );
        drop(victim);
    }
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed();
    let mut lat = summary.latencies_us.lock().clone();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let sent = summary.sent.load(Ordering::Relaxed);
    Ok(Report {
        sent,
        failed: summary.failed.load(Ordering::Relaxed),
        lost: summary.lost.load(Ordering::Relaxed),
        backward: summary.backward.load(Ordering::Relaxed),
        skipped: summary.skipped.load(Ordering::Relaxed),
        rebound: summary.rebound.load(Ordering::Relaxed),
        rate: sent as f64 / elapsed.as_secs_f64(),
        cpu_us: None,
        p50: pct(0.5),
        p99: pct(0.99),
        secs: elapsed.as_secs_f64(),
    })
}
