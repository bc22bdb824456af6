//! Throughput harness: node 0 sends to N-1 receivers, each node its own OS process on
//! 127.0.0.1 with static membership, and prints one line per case in the shape of our Java
//! Tribes measurements.
//!
//! ```text
//! cargo run --release --example throughput                      # the matrix
//! cargo run --release --example throughput -- --baseline        # plus raw TCP and ratios
//! cargo run --release --example throughput -- --nodes 2 --size 1024 --opts ack --secs 3
//! ```
//!
//! msg/s is measured at each receiver between its first and last measured arrival (mean over
//! receivers; `agg` is the sum), MiB/s counts payload bytes only, p50/p99 is the duration of
//! each `send` call at the sender (the full round trip in the ACK modes; for `async` the time
//! to queue). Every run is bounded by time and count and ends by itself; child processes exit
//! when their stdin closes.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tribes::interceptors::{
    DispatchConfig, MessageDispatchInterceptor, StaticMembershipInterceptor,
};
use tribes::{ChannelMessage, GroupChannel, Levels, Member, SendError, SendOptions, UniqueId};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Upper bound on measured messages per case, whatever `--secs` says.
const MAX_MSGS: usize = 5_000_000;
/// Warm-up before measuring (not counted).
const WARMUP: Duration = Duration::from_millis(300);
/// How long the parent waits for receivers to report every message.
const DRAIN_WAIT: Duration = Duration::from_secs(15);
/// A child never lives longer than this, even if its parent vanished without closing stdin.
const CHILD_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Async,
    NoAck,
    Ack,
    SyncAck,
}

impl Mode {
    const ALL: [Self; 4] = [Self::Async, Self::NoAck, Self::Ack, Self::SyncAck];

    fn name(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::NoAck => "noack",
            Self::Ack => "ack",
            Self::SyncAck => "syncack",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    fn options(self) -> SendOptions {
        match self {
            Self::Async => SendOptions::ASYNCHRONOUS,
            Self::NoAck => SendOptions::empty(),
            Self::Ack => SendOptions::USE_ACK,
            Self::SyncAck => SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        }
    }
}

struct Args {
    nodes: Vec<usize>,
    sizes: Vec<usize>,
    modes: Vec<Mode>,
    secs: f64,
    baseline: bool,
    dispatch_threads: Option<usize>,
}

fn usage() -> &'static str {
    "usage: throughput [--nodes N] [--size BYTES] [--opts async|noack|ack|syncack] [--secs S]\n\
     \x20                 [--baseline] [--threads-dispatch K]\n\
     Without --nodes/--size/--opts it runs the matrix nodes {2,3} x size {64,1024,65536} x all modes."
}

fn parse_args(argv: &[String]) -> Res<Args> {
    let mut a = Args {
        nodes: vec![2, 3],
        sizes: vec![64, 1024, 65536],
        modes: Mode::ALL.to_vec(),
        secs: 2.0,
        baseline: false,
        dispatch_threads: None,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                let n: usize = value()?.parse()?;
                if n < 2 {
                    return Err("--nodes must be at least 2".into());
                }
                a.nodes = vec![n];
            }
            "--size" => a.sizes = vec![value()?.parse()?],
            "--opts" => {
                let v = value()?;
                a.modes = vec![Mode::parse(v).ok_or_else(|| format!("unknown mode {v}"))?];
            }
            "--secs" => a.secs = value()?.parse::<f64>()?.clamp(0.1, 60.0),
            "--baseline" => a.baseline = true,
            "--threads-dispatch" => a.dispatch_threads = Some(value()?.parse()?),
            "--help" | "-h" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{}", usage()).into()),
        }
    }
    Ok(a)
}

fn main() -> Res<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("node-rx") => return node_rx(),
        Some("node-tx") => return node_tx(&argv[1..]),
        _ => {}
    }
    let args = parse_args(&argv)?;
    let mut baselines = Vec::new();
    if args.baseline {
        for &size in &args.sizes {
            baselines.push(Baseline::measure(size, args.secs.min(2.0))?);
        }
    }
    for &nodes in &args.nodes {
        for &size in &args.sizes {
            for &mode in &args.modes {
                let r = run_case(nodes, size, mode, args.secs, args.dispatch_threads)?;
                r.print();
                if let Some(b) = baselines.iter().find(|b| b.size == size) {
                    r.print_ratio(b);
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- parent side

struct CaseResult {
    nodes: usize,
    size: usize,
    mode: Mode,
    msgs: usize,
    p50_us: f64,
    p99_us: f64,
    errors: usize,
    send_secs: f64,
    received: Vec<(u64, f64)>,
}

impl CaseResult {
    fn per_receiver_rates(&self) -> Vec<f64> {
        self.received
            .iter()
            .map(|&(n, span)| if span > 0.0 { n as f64 / span } else { 0.0 })
            .collect()
    }

    fn mean_rate(&self) -> f64 {
        let r = self.per_receiver_rates();
        r.iter().sum::<f64>() / r.len().max(1) as f64
    }

    fn print(&self) {
        let mean = self.mean_rate();
        let agg: f64 = self.per_receiver_rates().iter().sum();
        let rx: u64 = self.received.iter().map(|r| r.0).sum();
        let expected = self.msgs as u64 * (self.nodes as u64 - 1);
        println!(
            "tribes-rs nodes={} size={} opts={} msgs={} -> {:.0} msg/s {:.1} MiB/s p50={:.1}us p99={:.1}us [per-receiver; agg={:.0} msg/s; rx={}/{} send={:.2}s err={}]",
            self.nodes,
            self.size,
            self.mode.name(),
            self.msgs,
            mean,
            mean * self.size as f64 / (1024.0 * 1024.0),
            self.p50_us,
            self.p99_us,
            agg,
            rx,
            expected,
            self.send_secs,
            self.errors
        );
    }

    fn print_ratio(&self, b: &Baseline) {
        let prefix = format!(
            "ratio nodes={} size={} opts={}",
            self.nodes,
            self.size,
            self.mode.name()
        );
        match self.mode {
            Mode::Async | Mode::NoAck => {
                println!(
                    "{prefix} vs raw-tcp blast-perframe: {:.2}x msg/s",
                    self.mean_rate() / b.perframe_rate
                );
                let mib = self.mean_rate() * self.size as f64;
                println!(
                    "{prefix} vs raw-tcp blast-buffered: {:.2}x MiB/s",
                    mib / (b.buffered_rate * self.size as f64)
                );
            }
            Mode::Ack | Mode::SyncAck => println!(
                "{prefix} p50 vs raw-tcp req-ack p50: {:.2}x",
                self.p50_us / b.req_ack_p50_us
            ),
        }
    }
}

/// A child process speaking a line protocol on stdin/stdout.
struct Node {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Node {
    fn spawn(args: &[String]) -> Res<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn line(&mut self) -> Res<String> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            return Err("node exited early".into());
        }
        Ok(s.trim().to_string())
    }

    fn say(&mut self, s: &str) -> Res<()> {
        writeln!(self.stdin, "{s}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Asks the child to exit and waits for it (it exits by itself on stdin EOF too).
    fn finish(mut self) {
        let _ = self.say("exit");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    // Our own child, by its handle.
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

fn run_case(
    nodes: usize,
    size: usize,
    mode: Mode,
    secs: f64,
    dispatch_threads: Option<usize>,
) -> Res<CaseResult> {
    let mut receivers = Vec::new();
    let mut members = Vec::new();
    for _ in 1..nodes {
        let mut rx = Node::spawn(&["node-rx".to_string()])?;
        let line = rx.line()?;
        let member = line.strip_prefix("member ").ok_or("bad rx hello")?;
        members.extend(member.split_whitespace().map(str::to_string));
        receivers.push(rx);
    }
    let mut tx_args = vec![
        "node-tx".to_string(),
        size.to_string(),
        mode.name().to_string(),
        secs.to_string(),
        dispatch_threads.unwrap_or(0).to_string(),
    ];
    tx_args.extend(members);
    let mut tx = Node::spawn(&tx_args)?;
    // "sent <msgs> <p50us> <p99us> <errors> <send secs>"
    let report = tx.line()?;
    let f: Vec<&str> = report.split_whitespace().collect();
    if f.len() != 6 || f[0] != "sent" {
        return Err(format!("bad tx report {report:?}").into());
    }
    let msgs: usize = f[1].parse()?;
    let p50_us: f64 = f[2].parse()?;
    let p99_us: f64 = f[3].parse()?;
    let errors: usize = f[4].parse()?;
    let send_secs: f64 = f[5].parse()?;
    // Wait until every receiver has every measured message (bounded).
    let deadline = Instant::now() + DRAIN_WAIT;
    let mut received = vec![(0u64, 0f64); receivers.len()];
    loop {
        for (i, rx) in receivers.iter_mut().enumerate() {
            rx.say("report")?;
            let line = rx.line()?;
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 3 || f[0] != "received" {
                return Err(format!("bad rx report {line:?}").into());
            }
            received[i] = (f[1].parse()?, f[2].parse()?);
        }
        let complete = received.iter().all(|r| r.0 >= msgs as u64);
        if complete || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tx.finish();
    for rx in receivers {
        rx.finish();
    }
    Ok(CaseResult {
        nodes,
        size,
        mode,
        msgs,
        p50_us,
        p99_us,
        errors,
        send_secs,
        received,
    })
}

// ---------------------------------------------------------------- child processes

fn hex(id: &UniqueId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Res<UniqueId> {
    if s.len() != 32 {
        return Err(format!("bad unique id {s}").into());
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(UniqueId(b))
}

/// Ends the process when stdin closes or the lifetime is over, whatever else happens.
fn watchdog(on_line: impl Fn(&str) + Send + 'static) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) if l.trim() == "exit" => break,
                Ok(l) => on_line(l.trim()),
                Err(_) => break,
            }
        }
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_LIFETIME);
        std::process::exit(3);
    });
}

fn node_rx() -> Res<()> {
    let channel = GroupChannel::builder()
        .name("rx")
        .port(0)
        .heartbeat_interval(None)
        .build()?;
    #[derive(Default)]
    struct Counts {
        measured: u64,
        first: Option<Instant>,
        last: Option<Instant>,
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let c = Arc::clone(&counts);
    channel.add_channel_listener(move |m: &ChannelMessage| {
        if m.payload.first() == Some(&1) {
            let now = Instant::now();
            let mut c = c.lock();
            c.measured += 1;
            c.first.get_or_insert(now);
            c.last = Some(now);
        }
        Ok(())
    });
    channel.start(Levels::DEFAULT)?;
    let me = channel.local_member();
    println!("member {} {}", me.addr(), hex(&me.unique_id));
    std::io::stdout().flush()?;
    let c = Arc::clone(&counts);
    watchdog(move |line| {
        if line == "report" {
            let c = c.lock();
            let span = match (c.first, c.last) {
                (Some(a), Some(b)) => (b - a).as_secs_f64(),
                _ => 0.0,
            };
            println!("received {} {span:.6}", c.measured);
            let _ = std::io::stdout().flush();
        }
    });
    loop {
        std::thread::park();
    }
}

fn node_tx(args: &[String]) -> Res<()> {
    let size: usize = args.first().ok_or("size")?.parse()?;
    let mode = Mode::parse(args.get(1).ok_or("mode")?).ok_or("mode")?;
    let secs: f64 = args.get(2).ok_or("secs")?.parse()?;
    let dispatch_threads: usize = args.get(3).ok_or("threads")?.parse()?;
    let mut members = Vec::new();
    for m in args[4..].chunks(2) {
        let addr: SocketAddr = m[0].parse()?;
        members.push(Member::with_id(addr, unhex(m.get(1).ok_or("member id")?)?));
    }
    watchdog(|_| {});
    let mut dispatch = DispatchConfig::default();
    if dispatch_threads > 0 {
        dispatch.threads = dispatch_threads;
    }
    let channel = GroupChannel::builder()
        .name("tx")
        .port(0)
        .heartbeat_interval(None)
        .interceptor(MessageDispatchInterceptor::new(dispatch))
        .interceptor(StaticMembershipInterceptor::new(members.clone()))
        .build()?;
    channel.start(Levels::DEFAULT)?;
    let opts = mode.options();
    // Built once and shared by reference count, as an application resending a buffer would;
    // the first byte marks measured messages.
    let mut payload = vec![0u8; size.max(1)];
    let warmup_payload = bytes::Bytes::from(payload.clone());
    payload[0] = 1;
    let measured_payload = bytes::Bytes::from(payload);
    let send = |p: &bytes::Bytes, retries: &AtomicU64| -> Result<(), SendError> {
        loop {
            match channel.send(&members, p.clone(), opts) {
                Err(SendError::QueueFull { .. }) => {
                    // Bounded queue: back off and retry; counted apart from errors.
                    retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(50));
                }
                other => return other.map(|_| ()),
            }
        }
    };
    let retries = AtomicU64::new(0);
    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        let _ = send(&warmup_payload, &retries);
    }
    let mut lat_ns: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut errors = 0usize;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while lat_ns.len() < MAX_MSGS && Instant::now() < end {
        let t0 = Instant::now();
        if send(&measured_payload, &retries).is_err() {
            errors += 1;
        }
        lat_ns.push(t0.elapsed().as_nanos() as u64);
    }
    let send_secs = start.elapsed().as_secs_f64();
    lat_ns.sort_unstable();
    let pct = |p: f64| {
        lat_ns
            .get(((lat_ns.len().max(1) - 1) as f64 * p) as usize)
            .map_or(0.0, |&v| v as f64 / 1000.0)
    };
    println!(
        "sent {} {:.1} {:.1} {errors} {send_secs:.3}",
        lat_ns.len(),
        pct(0.50),
        pct(0.99)
    );
    std::io::stdout().flush()?;
    // Stay up (the dispatch queue drains) until the parent says exit or stdin closes.
    loop {
        std::thread::park();
    }
}

// ---------------------------------------------------------------- raw TCP baseline

struct Baseline {
    size: usize,
    perframe_rate: f64,
    buffered_rate: f64,
    req_ack_p50_us: f64,
}

impl Baseline {
    fn measure(size: usize, secs: f64) -> Res<Self> {
        let (perframe_msgs, perframe_rate) = blast(size, secs, false)?;
        let (buffered_msgs, buffered_rate) = blast(size, secs, true)?;
        let (ra_msgs, ra_rate, p50, p99) = req_ack(size, secs)?;
        let mib = |r: f64| r * size as f64 / (1024.0 * 1024.0);
        println!(
            "raw-tcp mode=blast-perframe size={size} msgs={perframe_msgs} -> {perframe_rate:.0} msg/s {:.1} MiB/s",
            mib(perframe_rate)
        );
        println!(
            "raw-tcp mode=blast-buffered size={size} msgs={buffered_msgs} -> {buffered_rate:.0} msg/s {:.1} MiB/s",
            mib(buffered_rate)
        );
        println!(
            "raw-tcp mode=req-ack size={size} msgs={ra_msgs} -> {ra_rate:.0} msg/s {:.1} MiB/s p50={p50:.1}us p99={p99:.1}us",
            mib(ra_rate)
        );
        Ok(Self {
            size,
            perframe_rate,
            buffered_rate,
            req_ack_p50_us: p50,
        })
    }
}

/// Frames of `size + 18` bytes over one loopback connection for `secs`; returns (messages,
/// messages per second measured at the receiver).
fn blast(size: usize, secs: f64, buffered: bool) -> Res<(u64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let frame_len = size + 18;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, f64)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            total += n as u64;
        }
        let span = first.map_or(0.0, |f: Instant| (last - f).as_secs_f64());
        Ok((total / frame_len as u64, span))
    });
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let frame = vec![7u8; frame_len];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    if buffered {
        let mut w = BufWriter::with_capacity(64 * 1024, &stream);
        while Instant::now() < end && sent < MAX_MSGS as u64 {
            w.write_all(&frame)?;
            sent += 1;
        }
        w.flush()?;
    } else {
        let mut s = &stream;
        while Instant::now() < end && sent < MAX_MSGS as u64 {
            s.write_all(&frame)?;
            sent += 1;
        }
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let (msgs, span) = reader.join().map_err(|_| "reader panicked")??;
    Ok((msgs, if span > 0.0 { msgs as f64 / span } else { 0.0 }))
}

/// Write a frame, wait for a 4-byte ACK, for `secs`; returns (messages, msg/s, p50, p99).
fn req_ack(size: usize, secs: f64) -> Res<(u64, f64, f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let frame_len = size + 18;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; frame_len];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(b"ACK!")?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let frame = vec![7u8; frame_len];
    let mut ack = [0u8; 4];
    let mut lat = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end && lat.len() < MAX_MSGS {
        let t0 = Instant::now();
        c.write_all(&frame)?;
        c.read_exact(&mut ack)?;
        lat.push(t0.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(c);
    server.join().map_err(|_| "server panicked")??;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok((
        lat.len() as u64,
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
    ))
}
