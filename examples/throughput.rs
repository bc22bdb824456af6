//! Throughput harness for `tribes`: node 0 sends to the N-1 other nodes, every node in its own
//! OS process on 127.0.0.1, joined by static membership.
//!
//! ```text
//! cargo run --release --example throughput                                  # the matrix
//! cargo run --release --example throughput -- --baseline                    # plus raw TCP
//! cargo run --release --example throughput -- --nodes 2 --size 1024 --opts ack --secs 3
//! ```
//!
//! How it works: the parent re-executes this binary (`std::env::current_exe()`) with the hidden
//! subcommand `node`, once per node. Each node binds 127.0.0.1:0, prints `READY <addr> <id>`
//! on stdout and then obeys one-line commands on stdin (`MEMBERS`, `CASE`, `SEND`, `STATS`).
//! A node stops and exits when its stdin closes (the parent is gone), and in any case after a
//! hard lifetime handed to it by the parent. Processes are reused for all cases with the same
//! number of nodes.
//!
//! Measurements: msg/s is counted at each receiver between its first and last measured
//! arrival (mean over receivers; `agg` is the sum); MiB/s counts payload bytes only; p50/p99 is
//! the duration of each `send` call at the sender (for `async`, the time to enqueue). Warm-up
//! messages carry a different first payload byte and are not counted.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use tribes::interceptors::{
    DispatchConfig, MessageDispatchInterceptor, StaticMembershipInterceptor,
};
use tribes::transport::ReceiverConfig;
use tribes::{
    ChannelMessage, GroupChannel, Levels, Member, ProcessError, SendError, SendOptions, UniqueId,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "\
throughput: tribes send throughput, one OS process per node on 127.0.0.1

USAGE:
    cargo run --release --example throughput -- [OPTIONS]

OPTIONS:
    --nodes N[,N..]         nodes per group, node 0 sends to the others (2..=16)
                            [default: matrix 2,3]
    --size BYTES[,BYTES..]  payload size (5..=16777216) [default: matrix 64,1024,65536]
    --opts MODE[,MODE..]    async | noack | ack | syncack [default: all four]
                              async    SendOptions::ASYNCHRONOUS (dispatch queue, no ACK)
                              noack    SendOptions::empty() (synchronous write, no ACK)
                              ack      SendOptions::USE_ACK
                              syncack  SendOptions::USE_ACK | SYNCHRONIZED_ACK
    --secs S                measured seconds per case [default: 3 for one case, else 2]
    --baseline              also measure raw TCP (std::net, one loopback connection) per
                            size and print ratios
    --threads-dispatch K    dispatch threads of MessageDispatchInterceptor [default: library]
    -h, --help              this text

Without --nodes/--size/--opts the whole matrix runs (2 x 3 x 4 cases).";

/// Payload byte 0 of warm-up messages.
const KIND_WARMUP: u8 = 0xA0;
/// Payload byte 0 of measured messages.
const KIND_MEASURED: u8 = 0xA1;
/// Kind byte + little-endian case id.
const HEADER_LEN: usize = 5;

/// Warm-up before each case: bounded by time and by count.
const WARMUP_TIME: Duration = Duration::from_millis(300);
const WARMUP_MAX_MSGS: u64 = 200_000;
/// Upper bound on measured messages per case, whatever `--secs` says.
const MAX_MSGS: u64 = 10_000_000;
/// Pause after the dispatch queue refused a message (async mode).
const QUEUE_FULL_BACKOFF: Duration = Duration::from_micros(20);
/// How long the sender keeps retrying one refused message after the case deadline.
const QUEUE_FULL_GIVE_UP: Duration = Duration::from_secs(10);
/// How long the sender waits for its dispatch queue to empty.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);
/// How long the parent waits for the receivers to report every message.
const COLLECT_LIMIT: Duration = Duration::from_secs(10);
/// How long the parent waits for an answer to a quick command.
const ANSWER_LIMIT: Duration = Duration::from_secs(15);
/// How long a node may take to stop its channel before it exits anyway.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// How long the parent waits for its children to exit before killing them.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// Raw-TCP baseline: frame overhead of the Tribes data package (`FLT2002` + len + `TLF2003`).
const FRAME_OVERHEAD: usize = 18;
const RAW_MAX_FRAMES: u64 = 200_000_000;
const RAW_MAX_REQS: u64 = 10_000_000;
const RAW_IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("node") {
        if let Err(e) = node_main(&argv[1..]) {
            eprintln!("throughput node: {e}");
            std::process::exit(2);
        }
        return;
    }
    let args = match parse_args(&argv) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("throughput: {e} (see --help)");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("throughput: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments

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
    secs: Option<f64>,
    baseline: bool,
    threads_dispatch: Option<usize>,
}

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let mut args = Args {
        nodes: vec![2, 3],
        sizes: vec![64, 1024, 65536],
        modes: Mode::ALL.to_vec(),
        secs: None,
        baseline: false,
        threads_dispatch: None,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v)),
            _ => (arg.as_str(), None),
        };
        match key {
            "-h" | "--help" => return Ok(None),
            "--baseline" => args.baseline = true,
            "--nodes" => {
                args.nodes = parse_list(&value(key, inline, &mut it)?, key, |s| {
                    s.parse::<usize>().ok().filter(|n| (2..=16).contains(n))
                })?;
            }
            "--size" => {
                args.sizes = parse_list(&value(key, inline, &mut it)?, key, |s| {
                    s.parse::<usize>()
                        .ok()
                        .filter(|n| (HEADER_LEN..=16 * 1024 * 1024).contains(n))
                })?;
            }
            "--opts" => {
                args.modes = parse_list(&value(key, inline, &mut it)?, key, Mode::parse)?;
            }
            "--secs" => {
                let v = value(key, inline, &mut it)?;
                let s = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| (0.05..=600.0).contains(s))
                    .ok_or_else(|| format!("--secs: {v:?} is not a number in 0.05..=600"))?;
                args.secs = Some(s);
            }
            "--threads-dispatch" => {
                let v = value(key, inline, &mut it)?;
                let k = v
                    .parse::<usize>()
                    .ok()
                    .filter(|k| (1..=256).contains(k))
                    .ok_or_else(|| format!("--threads-dispatch: {v:?} is not in 1..=256"))?;
                args.threads_dispatch = Some(k);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(args))
}

fn value(
    key: &str,
    inline: Option<&str>,
    it: &mut std::slice::Iter<'_, String>,
) -> Result<String, String> {
    match inline {
        Some(v) => Ok(v.to_string()),
        None => it
            .next()
            .cloned()
            .ok_or_else(|| format!("{key} needs a value")),
    }
}

fn parse_list<T>(v: &str, key: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    let out: Vec<T> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| f(s).ok_or_else(|| format!("{key}: invalid value {s:?}")))
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err(format!("{key}: no value"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Parent: runs the cases

/// Runs everything; returns false when a case failed or lost messages.
fn run(args: &Args) -> Res<bool> {
    let cases_per_group = args.sizes.len() * args.modes.len();
    let single = args.nodes.len() * cases_per_group == 1;
    let secs = args.secs.unwrap_or(if single { 3.0 } else { 2.0 });
    let mut all_ok = true;

    let mut baselines: HashMap<usize, Baseline> = HashMap::new();
    if args.baseline {
        let raw_secs = Duration::from_secs_f64(secs.min(2.0));
        for &size in &args.sizes {
            match measure_baseline(size, raw_secs) {
                Ok(b) => {
                    b.print(size);
                    baselines.insert(size, b);
                }
                Err(e) => {
                    println!("raw-tcp size={size} FAILED: {e}");
                    all_ok = false;
                }
            }
        }
    }

    let mut case_id: u32 = 0;
    for &nodes in &args.nodes {
        // A safety net only: children exit on stdin EOF long before this.
        let lifetime = Duration::from_secs_f64(
            cases_per_group as f64 * (secs + WARMUP_TIME.as_secs_f64() + 45.0) + 60.0,
        );
        let mut group: Option<Group> = None;
        for &size in &args.sizes {
            for &mode in &args.modes {
                case_id += 1;
                let label = format!("nodes={nodes} size={size} opts={}", mode.name());
                let result = (|| -> Res<CaseResult> {
                    if group.is_none() {
                        group = Some(Group::start(nodes, args.threads_dispatch, lifetime)?);
                    }
                    let g = group.as_mut().ok_or("no group")?;
                    g.run_case(case_id, size, mode, secs)
                })();
                match result {
                    Ok(r) => {
                        println!("{}", r.line());
                        if r.mode == Mode::Async {
                            // Refused by the bounded async queue and sent again; kept off the
                            // result line so its shape matches the Java measurements.
                            println!(
                                "note nodes={} size={} opts=async queue-full-retries={}",
                                r.nodes, r.size, r.retries
                            );
                        }
                        if !r.complete() || r.errs > 0 {
                            all_ok = false;
                        }
                        if let Some(b) = baselines.get(&size) {
                            for line in r.ratio_lines(b) {
                                println!("{line}");
                            }
                        }
                    }
                    Err(e) => {
                        println!("tribes-rs {label} FAILED: {e}");
                        all_ok = false;
                        // Start over with fresh processes for the next case.
                        group = None;
                    }
                }
            }
        }
        drop(group);
    }
    Ok(all_ok)
}

/// One child process, talked to through its stdin and stdout.
struct Node {
    index: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Node {
    fn spawn(index: usize, threads_dispatch: Option<usize>, lifetime: Duration) -> Res<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("node")
            .arg("--index")
            .arg(index.to_string())
            .arg("--lifetime")
            .arg(lifetime.as_secs().max(1).to_string());
        if let Some(k) = threads_dispatch {
            cmd.arg("--threads-dispatch").arg(k.to_string());
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("child has no stdout".into());
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let reader = thread::Builder::new()
            .name(format!("node{index}-out"))
            .spawn(move || {
                // Ends when the child closes its stdout, i.e. when it exits.
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = reader {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
        Ok(Self {
            index,
            child,
            stdin,
            lines: rx,
        })
    }

    fn tell(&mut self, line: &str) -> Res<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("node {}: stdin closed", self.index))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("node {}: cannot write command: {e}", self.index))?;
        Ok(())
    }

    /// The next line from the child, which must start with `word`.
    fn answer(&self, word: &str, limit: Duration) -> Res<String> {
        match self.lines.recv_timeout(limit) {
            Ok(line) if line.split_whitespace().next() == Some(word) => Ok(line),
            Ok(line) => Err(format!("node {}: expected {word}, got {line:?}", self.index).into()),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "node {}: no {word} within {:.1}s",
                self.index,
                limit.as_secs_f64()
            )
            .into()),
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("node {}: exited while we waited for {word}", self.index).into())
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stdin.take();
        // Group::drop already waited for a clean exit; whatever still runs is killed.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// All processes of one group; node 0 sends.
struct Group {
    nodes: Vec<Node>,
}

impl Drop for Group {
    fn drop(&mut self) {
        // Closing stdin tells every node to stop its channel and exit.
        for n in &mut self.nodes {
            n.stdin.take();
        }
        let deadline = Instant::now() + EXIT_LIMIT;
        for n in &mut self.nodes {
            loop {
                match n.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        eprintln!(
                            "throughput: node {} did not exit in time; killing it",
                            n.index
                        );
                        let _ = n.child.kill();
                        let _ = n.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Group {
    fn start(n: usize, threads_dispatch: Option<usize>, lifetime: Duration) -> Res<Self> {
        let mut group = Self {
            nodes: Vec::with_capacity(n),
        };
        for i in 0..n {
            group
                .nodes
                .push(Node::spawn(i, threads_dispatch, lifetime)?);
        }
        let mut members = Vec::with_capacity(n);
        for node in &group.nodes {
            let line = node.answer("READY", ANSWER_LIMIT)?;
            let mut parts = line.split_whitespace().skip(1);
            let (Some(addr), Some(id)) = (parts.next(), parts.next()) else {
                return Err(format!("node {}: bad READY line {line:?}", node.index).into());
            };
            members.push(format!("{addr}={id}"));
        }
        let cmd = format!("MEMBERS {}", members.join(" "));
        // Receivers first, so they know the sender when its hello arrives.
        for node in group.nodes.iter_mut().rev() {
            node.tell(&cmd)?;
        }
        for node in group.nodes.iter().rev() {
            node.answer("STARTED", ANSWER_LIMIT)?;
        }
        Ok(group)
    }

    fn run_case(&mut self, case: u32, size: usize, mode: Mode, secs: f64) -> Res<CaseResult> {
        let nodes = self.nodes.len();
        let (sender, receivers) = self.nodes.split_at_mut(1);
        let sender = &mut sender[0];
        for r in receivers.iter_mut() {
            r.tell(&format!("CASE {case}"))?;
        }
        for r in receivers.iter() {
            r.answer("OK", ANSWER_LIMIT)?;
        }
        sender.tell(&format!(
            "SEND {case} {size} {} {secs} {MAX_MSGS}",
            mode.name()
        ))?;
        let limit =
            Duration::from_secs_f64(secs) + WARMUP_TIME + DRAIN_LIMIT + Duration::from_secs(30);
        let line = sender.answer("SENT", limit)?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("bad SENT line {line:?}: {e}"))?;
        let [msgs, errs, retries, send_ns, p50_ns, p99_ns] = f[..] else {
            return Err(format!("bad SENT line {line:?}").into());
        };

        // Collect: poll the receivers until each has every message, bounded in time.
        let deadline = Instant::now() + COLLECT_LIMIT;
        let per_rx = loop {
            let mut stats = Vec::with_capacity(receivers.len());
            for r in receivers.iter_mut() {
                r.tell("STATS")?;
            }
            for r in receivers.iter() {
                let line = r.answer("STATS", ANSWER_LIMIT)?;
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("bad STATS line {line:?}: {e}"))?;
                let [c, count, first, last] = v[..] else {
                    return Err(format!("bad STATS line {line:?}").into());
                };
                if c != u64::from(case) {
                    return Err(format!("node {}: STATS for case {c}, not {case}", r.index).into());
                }
                stats.push(RxStats { count, first, last });
            }
            if stats.iter().all(|s| s.count >= msgs) || Instant::now() >= deadline {
                break stats;
            }
            thread::sleep(Duration::from_millis(10));
        };
        Ok(CaseResult {
            nodes,
            size,
            mode,
            msgs,
            errs,
            retries,
            send_ns,
            p50_ns,
            p99_ns,
            per_rx,
        })
    }
}

struct RxStats {
    count: u64,
    /// Receiver clock, ns; only `last - first` means something.
    first: u64,
    last: u64,
}

impl RxStats {
    fn rate(&self) -> f64 {
        if self.count < 2 || self.last <= self.first {
            return 0.0;
        }
        (self.count - 1) as f64 / ((self.last - self.first) as f64 / 1e9)
    }
}

struct CaseResult {
    nodes: usize,
    size: usize,
    mode: Mode,
    msgs: u64,
    errs: u64,
    retries: u64,
    send_ns: u64,
    p50_ns: u64,
    p99_ns: u64,
    per_rx: Vec<RxStats>,
}

impl CaseResult {
    fn mean_rate(&self) -> f64 {
        if self.per_rx.is_empty() {
            return 0.0;
        }
        self.agg_rate() / self.per_rx.len() as f64
    }

    fn agg_rate(&self) -> f64 {
        self.per_rx.iter().map(RxStats::rate).sum()
    }

    fn mib(&self) -> f64 {
        self.mean_rate() * self.size as f64 / (1024.0 * 1024.0)
    }

    fn received(&self) -> u64 {
        self.per_rx.iter().map(|s| s.count).sum()
    }

    fn expected(&self) -> u64 {
        self.msgs * (self.nodes as u64 - 1)
    }

    fn complete(&self) -> bool {
        self.received() == self.expected()
    }

    /// The result in the exact shape of our Java Tribes measurements (nothing added, so the
    /// lines can be compared and parsed alike).
    fn line(&self) -> String {
        format!(
            "tribes-rs nodes={} size={} opts={} msgs={} -> {:.0} msg/s {:.1} MiB/s p50={:.1}us p99={:.1}us [per-receiver; agg={:.0} msg/s; rx={}/{} send={:.2}s err={}]",
            self.nodes,
            self.size,
            self.mode.name(),
            self.msgs,
            self.mean_rate(),
            self.mib(),
            self.p50_ns as f64 / 1e3,
            self.p99_ns as f64 / 1e3,
            self.agg_rate(),
            self.received(),
            self.expected(),
            self.send_ns as f64 / 1e9,
            self.errs,
        )
    }

    fn ratio_lines(&self, b: &Baseline) -> Vec<String> {
        let head = format!(
            "ratio nodes={} size={} opts={}",
            self.nodes,
            self.size,
            self.mode.name()
        );
        let mut out = Vec::new();
        match self.mode {
            Mode::Async | Mode::NoAck => {
                out.push(format!(
                    "{head} vs raw-tcp blast-perframe: {:.2}x msg/s",
                    ratio(self.mean_rate(), b.perframe.rate)
                ));
                if self.mode == Mode::Async && self.size >= 65536 {
                    out.push(format!(
                        "{head} vs raw-tcp blast-buffered: {:.2}x MiB/s",
                        ratio(self.mib(), b.buffered.mib(self.size))
                    ));
                }
            }
            Mode::Ack | Mode::SyncAck => {
                out.push(format!(
                    "{head} p50 vs raw-tcp req-ack p50: {:.2}x",
                    ratio(self.p50_ns as f64, b.req_ack.p50_ns as f64)
                ));
            }
        }
        out
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// Child: one node

struct NodeArgs {
    index: usize,
    lifetime: Duration,
    threads_dispatch: Option<usize>,
}

fn parse_node_args(argv: &[String]) -> Result<NodeArgs, String> {
    let mut a = NodeArgs {
        index: 0,
        lifetime: Duration::from_secs(600),
        threads_dispatch: None,
    };
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let n: u64 = v.parse().map_err(|_| format!("{k}: bad value {v:?}"))?;
        match k.as_str() {
            "--index" => a.index = n as usize,
            "--lifetime" => a.lifetime = Duration::from_secs(n.clamp(1, 3600)),
            "--threads-dispatch" => a.threads_dispatch = Some((n as usize).max(1)),
            _ => return Err(format!("unknown node argument {k:?}")),
        }
    }
    Ok(a)
}

/// Counts measured messages of the current case, from any receiver worker thread.
struct RxCounters {
    base: Instant,
    case: AtomicU32,
    count: AtomicU64,
    /// ns since `base` + 1; u64::MAX = none yet.
    first: AtomicU64,
    last: AtomicU64,
}

impl RxCounters {
    fn reset(&self, case: u32) {
        self.case.store(u32::MAX, Ordering::SeqCst);
        self.count.store(0, Ordering::SeqCst);
        self.first.store(u64::MAX, Ordering::SeqCst);
        self.last.store(0, Ordering::SeqCst);
        self.case.store(case, Ordering::SeqCst);
    }

    fn on_message(&self, payload: &[u8]) {
        if payload.len() < HEADER_LEN || payload[0] != KIND_MEASURED {
            return;
        }
        let case = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
        if case != self.case.load(Ordering::Acquire) {
            return;
        }
        let t = self.base.elapsed().as_nanos() as u64 + 1;
        self.count.fetch_add(1, Ordering::AcqRel);
        self.first.fetch_min(t, Ordering::AcqRel);
        self.last.fetch_max(t, Ordering::AcqRel);
    }

    fn report(&self) -> String {
        let first = self.first.load(Ordering::Acquire);
        format!(
            "STATS {} {} {} {}",
            self.case.load(Ordering::Acquire),
            self.count.load(Ordering::Acquire),
            if first == u64::MAX { 0 } else { first },
            self.last.load(Ordering::Acquire),
        )
    }
}

/// Writes one line to the parent; a parent that is gone ends this process.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn node_main(argv: &[String]) -> Res<()> {
    let a = parse_node_args(argv)?;
    let lifetime = a.lifetime;
    thread::Builder::new()
        .name("lifetime".into())
        .spawn(move || {
            thread::sleep(lifetime);
            eprintln!(
                "throughput node: lifetime of {}s is over; exiting",
                lifetime.as_secs()
            );
            std::process::exit(3);
        })?;
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error"))
        .try_init();

    let mut dcfg = DispatchConfig::default();
    if let Some(k) = a.threads_dispatch {
        dcfg.threads = k;
    }
    let dispatch = Arc::new(MessageDispatchInterceptor::new(dcfg));
    let statics = Arc::new(StaticMembershipInterceptor::new(Vec::new()));
    let receiver = ReceiverConfig {
        address: [127, 0, 0, 1].into(),
        port: 0,
        ..ReceiverConfig::default()
    };
    let ch = GroupChannel::builder()
        .name(format!("node{}", a.index))
        .receiver(receiver)
        .heartbeat_interval(None)
        .interceptor_arc(dispatch.clone())
        .interceptor_arc(statics.clone())
        .build()?;
    let counters = Arc::new(RxCounters {
        base: Instant::now(),
        case: AtomicU32::new(u32::MAX),
        count: AtomicU64::new(0),
        first: AtomicU64::new(u64::MAX),
        last: AtomicU64::new(0),
    });
    let c = Arc::clone(&counters);
    ch.add_channel_listener(move |m: &ChannelMessage| -> Result<(), ProcessError> {
        c.on_message(&m.payload);
        Ok(())
    });
    ch.start(Levels::SND_RX)?;
    let local = ch.local_member();
    say(&format!(
        "READY {} {}",
        local.addr(),
        hex(&local.unique_id.0)
    ));

    let mut dests: Vec<Member> = Vec::new();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match words.next() {
            Some("MEMBERS") => {
                let mut all = Vec::new();
                for w in words {
                    let Some(m) = parse_member(w) else {
                        say(&format!("ERR bad member {w:?}"));
                        continue;
                    };
                    all.push(m);
                }
                dests = all
                    .iter()
                    .filter(|m| m.addr() != local.addr())
                    .cloned()
                    .collect();
                statics.set_members(all);
                match ch.start(Levels::SND_TX.union(Levels::MBR_RX).union(Levels::MBR_TX)) {
                    Ok(()) => say("STARTED"),
                    Err(e) => say(&format!("ERR start: {e}")),
                }
            }
            Some("CASE") => match words.next().and_then(|w| w.parse::<u32>().ok()) {
                Some(case) => {
                    counters.reset(case);
                    say("OK");
                }
                None => say("ERR bad CASE"),
            },
            Some("STATS") => say(&counters.report()),
            Some("SEND") => match parse_send(words) {
                Some(cmd) if !dests.is_empty() => say(&send_case(&ch, &dispatch, &dests, &cmd)),
                Some(_) => say("ERR no destinations"),
                None => say("ERR bad SEND"),
            },
            Some(other) => say(&format!("ERR unknown command {other:?}")),
            None => {}
        }
    }

    // stdin closed: stop the channel, but never hang on it.
    thread::Builder::new().name("stop-limit".into()).spawn(|| {
        thread::sleep(STOP_LIMIT);
        eprintln!("throughput node: channel stop takes too long; exiting");
        std::process::exit(4);
    })?;
    let _ = ch.stop(Levels::ALL);
    Ok(())
}

fn parse_member(w: &str) -> Option<Member> {
    let (addr, id) = w.split_once('=')?;
    let addr: SocketAddr = addr.parse().ok()?;
    if !addr.ip().is_loopback() {
        return None;
    }
    Some(Member::with_id(addr, UniqueId(unhex16(id)?)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

struct SendCmd {
    case: u32,
    size: usize,
    mode: Mode,
    secs: f64,
    max_msgs: u64,
}

fn parse_send<'a>(mut w: impl Iterator<Item = &'a str>) -> Option<SendCmd> {
    Some(SendCmd {
        case: w.next()?.parse().ok()?,
        size: w.next()?.parse().ok().filter(|s| *s >= HEADER_LEN)?,
        mode: Mode::parse(w.next()?)?,
        secs: w
            .next()?
            .parse()
            .ok()
            .filter(|s: &f64| *s > 0.0 && *s <= 600.0)?,
        max_msgs: w.next()?.parse().ok()?,
    })
}

fn payload(size: usize, kind: u8, case: u32) -> Bytes {
    let mut p = vec![0u8; size];
    p[0] = kind;
    p[1..HEADER_LEN].copy_from_slice(&case.to_le_bytes());
    Bytes::from(p)
}

/// Waits (bounded) until the dispatch queue is empty.
fn drain(dispatch: &MessageDispatchInterceptor) {
    let t = Instant::now();
    while dispatch.queued_bytes() > 0 && t.elapsed() < DRAIN_LIMIT {
        thread::sleep(Duration::from_millis(1));
    }
    if dispatch.queued_bytes() > 0 {
        eprintln!(
            "throughput node: dispatch queue still holds {} bytes after {:.0}s",
            dispatch.queued_bytes(),
            DRAIN_LIMIT.as_secs_f64()
        );
    }
}

/// Runs one case on the sender: warm-up, then the measured sends. Returns the SENT line.
fn send_case(
    ch: &GroupChannel,
    dispatch: &MessageDispatchInterceptor,
    dests: &[Member],
    cmd: &SendCmd,
) -> String {
    let opts = cmd.mode.options();

    // Warm-up: connections, pools, caches. Not counted by the receivers.
    let warm = payload(cmd.size, KIND_WARMUP, cmd.case);
    let t0 = Instant::now();
    let (mut warm_sent, mut warm_errs) = (0u64, 0u64);
    while warm_sent < WARMUP_MAX_MSGS && t0.elapsed() < WARMUP_TIME {
        match ch.send(dests, warm.clone(), opts) {
            Ok(_) => warm_sent += 1,
            Err(SendError::QueueFull { .. }) => thread::sleep(QUEUE_FULL_BACKOFF),
            Err(e) => {
                warm_sent += 1;
                warm_errs += 1;
                if warm_errs == 1 {
                    eprintln!("throughput node: warm-up send failed: {e}");
                }
            }
        }
    }
    drain(dispatch);
    let failures_before = dispatch.failures();

    let measured = payload(cmd.size, KIND_MEASURED, cmd.case);
    let max = cmd.max_msgs.min(MAX_MSGS);
    let mut lat: Vec<u32> = Vec::with_capacity(max.min(1 << 20) as usize);
    let (mut sent, mut errs, mut retries) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(cmd.secs);
    let give_up = deadline + QUEUE_FULL_GIVE_UP;
    let mut now = start;
    'cases: while sent < max && now < deadline {
        loop {
            let t = Instant::now();
            let r = ch.send(dests, measured.clone(), opts);
            now = Instant::now();
            match r {
                Ok(_) => {}
                Err(SendError::QueueFull { .. }) => {
                    retries += 1;
                    if now >= give_up {
                        eprintln!("throughput node: dispatch queue stayed full; giving up");
                        errs += 1;
                        break 'cases;
                    }
                    thread::sleep(QUEUE_FULL_BACKOFF);
                    continue;
                }
                Err(e) => {
                    errs += 1;
                    if errs == 1 {
                        eprintln!("throughput node: send failed: {e}");
                    }
                }
            }
            lat.push((now - t).as_nanos().min(u128::from(u32::MAX)) as u32);
            sent += 1;
            break;
        }
    }
    let send_time = start.elapsed();
    drain(dispatch);
    // The dispatch thread counts a failure just after it releases the queued bytes.
    thread::sleep(Duration::from_millis(20));
    errs += dispatch.failures().saturating_sub(failures_before);

    let p50 = percentile(&mut lat, 0.50);
    let p99 = percentile(&mut lat, 0.99);
    format!(
        "SENT {sent} {errs} {retries} {} {p50} {p99}",
        send_time.as_nanos()
    )
}

/// Nearest-rank percentile of `v` (reorders it).
fn percentile(v: &mut [u32], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let idx = (((v.len() - 1) as f64) * p).round() as usize;
    let (_, x, _) = v.select_nth_unstable(idx.min(v.len() - 1));
    u64::from(*x)
}

// ---------------------------------------------------------------------------------------------
// Raw-TCP baseline (std::net only, one loopback connection)

struct RawResult {
    msgs: u64,
    rate: f64,
    p50_ns: u64,
    p99_ns: u64,
}

impl RawResult {
    fn mib(&self, size: usize) -> f64 {
        self.rate * size as f64 / (1024.0 * 1024.0)
    }
}

struct Baseline {
    perframe: RawResult,
    buffered: RawResult,
    req_ack: RawResult,
}

impl Baseline {
    fn print(&self, size: usize) {
        for (name, r) in [
            ("blast-perframe", &self.perframe),
            ("blast-buffered", &self.buffered),
        ] {
            println!(
                "raw-tcp mode={name} size={size} msgs={} -> {:.0} msg/s {:.1} MiB/s",
                r.msgs,
                r.rate,
                r.mib(size)
            );
        }
        let r = &self.req_ack;
        println!(
            "raw-tcp mode=req-ack size={size} msgs={} -> {:.0} msg/s {:.1} MiB/s p50={:.1}us p99={:.1}us",
            r.msgs,
            r.rate,
            r.mib(size),
            r.p50_ns as f64 / 1e3,
            r.p99_ns as f64 / 1e3
        );
    }
}

fn measure_baseline(size: usize, secs: Duration) -> Res<Baseline> {
    Ok(Baseline {
        perframe: raw_blast(size, false, secs)?,
        buffered: raw_blast(size, true, secs)?,
        req_ack: raw_req_ack(size, secs)?,
    })
}

/// A frame shaped like a Tribes data package around `size` payload bytes.
fn raw_frame(size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size + FRAME_OVERHEAD);
    f.extend_from_slice(b"FLT2002");
    f.extend_from_slice(&(size as i32).to_be_bytes());
    f.resize(f.len() + size, 0x5a);
    f.extend_from_slice(b"TLF2003");
    f
}

/// A listener on 127.0.0.1 whose single connection is served by `serve` on its own thread.
/// The accept waits at most `RAW_IO_TIMEOUT`.
fn raw_server<T: Send + 'static>(
    serve: impl FnOnce(TcpStream) -> std::io::Result<T> + Send + 'static,
) -> Res<(SocketAddr, thread::JoinHandle<std::io::Result<T>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let h = thread::Builder::new()
        .name("raw-rx".into())
        .spawn(move || {
            let deadline = Instant::now() + RAW_IO_TIMEOUT;
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(RAW_IO_TIMEOUT))?;
            stream.set_write_timeout(Some(RAW_IO_TIMEOUT))?;
            serve(stream)
        })?;
    Ok((addr, h))
}

fn raw_connect(addr: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, RAW_IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(RAW_IO_TIMEOUT))?;
    s.set_write_timeout(Some(RAW_IO_TIMEOUT))?;
    Ok(s)
}

/// One-way stream of frames; the receiver reads and counts. `buffered`: through a 64 KiB
/// BufWriter, else one write call per frame.
fn raw_blast(size: usize, buffered: bool, secs: Duration) -> Res<RawResult> {
    let (addr, rx) = raw_server(|mut s| {
        let mut buf = vec![0u8; 256 * 1024];
        let (mut total, mut first, mut last) = (0u64, None::<Instant>, None::<Instant>);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            total += n as u64;
        }
        Ok((total, first, last))
    })?;
    let stream = raw_connect(addr)?;
    let frame = raw_frame(size);
    let start = Instant::now();
    let deadline = start + secs;
    let mut sent = 0u64;
    if buffered {
        let mut w = BufWriter::with_capacity(64 * 1024, &stream);
        while sent < RAW_MAX_FRAMES && Instant::now() < deadline {
            w.write_all(&frame)?;
            sent += 1;
        }
        w.flush()?;
    } else {
        let mut w = &stream;
        while sent < RAW_MAX_FRAMES && Instant::now() < deadline {
            w.write_all(&frame)?;
            sent += 1;
        }
    }
    stream.shutdown(Shutdown::Write)?;
    let (total, first, last) = rx.join().map_err(|_| "raw receiver panicked")??;
    let frames = total / frame.len() as u64;
    if total != sent * frame.len() as u64 {
        return Err(format!(
            "raw receiver got {total} bytes, expected {}",
            sent * frame.len() as u64
        )
        .into());
    }
    let rate = match (first, last) {
        (Some(f), Some(l)) if l > f && frames > 1 => (frames - 1) as f64 / (l - f).as_secs_f64(),
        _ => 0.0,
    };
    Ok(RawResult {
        msgs: sent,
        rate,
        p50_ns: 0,
        p99_ns: 0,
    })
}

/// Request/ack: write one frame, wait for a 4-byte ack, repeat.
fn raw_req_ack(size: usize, secs: Duration) -> Res<RawResult> {
    let frame_len = size + FRAME_OVERHEAD;
    let (addr, rx) = raw_server(move |mut s| {
        let mut buf = vec![0u8; frame_len];
        let mut n = 0u64;
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            s.write_all(&[0, 0, 0, 1])?;
            n += 1;
        }
        Ok(n)
    })?;
    let mut stream = raw_connect(addr)?;
    let frame = raw_frame(size);
    let mut ack = [0u8; 4];
    for _ in 0..200 {
        stream.write_all(&frame)?;
        stream.read_exact(&mut ack)?;
    }
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let deadline = start + secs;
    let mut now = start;
    while (lat.len() as u64) < RAW_MAX_REQS && now < deadline {
        let t = Instant::now();
        stream.write_all(&frame)?;
        stream.read_exact(&mut ack)?;
        now = Instant::now();
        lat.push((now - t).as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    let elapsed = start.elapsed();
    stream.shutdown(Shutdown::Write)?;
    let served = rx.join().map_err(|_| "raw receiver panicked")??;
    let msgs = lat.len() as u64;
    if served != msgs + 200 {
        return Err(format!(
            "raw receiver answered {served} requests, expected {}",
            msgs + 200
        )
        .into());
    }
    Ok(RawResult {
        msgs,
        rate: msgs as f64 / elapsed.as_secs_f64(),
        p50_ns: percentile(&mut lat, 0.50),
        p99_ns: percentile(&mut lat, 0.99),
    })
}
