//! Interoperability with a real Apache Tribes node (Java, Debian's `libtomcat10-java`), on
//! loopback with static membership (issue #4). The Java side is `tests/java/TribesNode.java`.
//!
//! If Java or the Tribes jar is missing the test fails loudly: `.ci/run` installs them, and a
//! wire-compatibility test that silently passes would prove nothing.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use tribes::interceptors::{MessageDispatchInterceptor, StaticMembershipInterceptor};
use tribes::{
    ChannelMessage, Failure, GroupChannel, Levels, Member, ProcessError, SendOptions, UniqueId,
};
use tribes_suite::wait_until;

const JARS: [&str; 2] = [
    "/usr/share/java/tomcat10-tribes.jar",
    "/usr/share/java/tomcat10-juli.jar",
];

const MODES: [(&str, u32); 4] = [("async", 8), ("noack", 0), ("ack", 2), ("syncack", 6)];
const PER_MODE: usize = 200;

fn hex(id: &UniqueId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> UniqueId {
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
    }
    UniqueId(b)
}

/// Compiles the Java node into the test's scratch directory; panics with a clear message if
/// the toolchain or the jar is missing.
fn compile_java() -> PathBuf {
    for jar in JARS {
        assert!(
            Path::new(jar).exists(),
            "JAVA INTEROP TEST CANNOT RUN: {jar} is missing. Install Debian's libtomcat10-java \
             (`apt-get install libtomcat10-java`); .ci/run does this."
        );
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("java-interop");
    std::fs::create_dir_all(&out).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java/TribesNode.java");
    let status = Command::new("javac")
        .args(["-cp", &JARS.join(":"), "-d"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("JAVA INTEROP TEST CANNOT RUN: javac not found ({e})"));
    assert!(status.success(), "javac failed on {}", src.display());
    out
}

/// Starts the Java node with `args`; its stdout lines arrive on the returned channel.
fn spawn_java(
    classes: &Path,
    jvm_args: &[&str],
    args: &[String],
) -> (Child, ChildStdin, Receiver<String>) {
    spawn_java_in(None, classes, jvm_args, args)
}

/// Like [`spawn_java`], inside network namespace `ns` when one is given.
fn spawn_java_in(
    ns: Option<&str>,
    classes: &Path,
    jvm_args: &[&str],
    args: &[String],
) -> (Child, ChildStdin, Receiver<String>) {
    let cp = format!("{}:{}", JARS.join(":"), classes.display());
    let mut child = command_in(ns, Path::new("java"))
        .args(jvm_args)
        .args(["-cp", &cp, "TribesNode"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("JAVA INTEROP TEST CANNOT RUN: java not found");
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    // Java logs to stderr; keep the last lines, to show them if the node dies.
    let tail = std::thread::spawn(move || {
        let mut last: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if last.len() == 20 {
                last.pop_front();
            }
            last.push_back(line);
        }
        Vec::from(last).join("\n")
    });
    let (tx, lines) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
        // The process closed its stdout (it exited): say why, as a last line.
        let why = tail.join().unwrap_or_default();
        let _ = tx.send(format!("exited; stderr ends with:\n{why}"));
    });
    (child, stdin, lines)
}

struct JavaNode {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    member: Member,
}

impl JavaNode {
    fn start(classes: &Path, rust: &Member) -> Self {
        let port = tribes_suite::free_port();
        let args = [
            port.to_string(),
            rust.host.to_string(),
            rust.port.to_string(),
            hex(&rust.unique_id),
        ];
        let (child, stdin, lines) = spawn_java(classes, &[], &args);
        let ready = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("java node did not start");
        let f: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(f[0], "ready", "unexpected first line {ready:?}");
        let addr = format!("127.0.0.1:{}", f[1]).parse().unwrap();
        let member = Member::with_id(addr, unhex(f[2]));
        Self {
            child,
            stdin,
            lines,
            member,
        }
    }

    fn say(&mut self, s: &str) {
        writeln!(self.stdin, "{s}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Collects `recv` lines until `n` arrived (or a deadline), returns them; waits for one
    /// `sent` line if `want_sent`.
    fn collect(&self, n: usize, want_sent: bool) -> (Vec<String>, Option<String>) {
        let mut recv = Vec::new();
        let mut sent = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while (recv.len() < n || (want_sent && sent.is_none()))
            && std::time::Instant::now() < deadline
        {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                if let Some(r) = line.strip_prefix("recv ") {
                    recv.push(r.to_string());
                } else if line.starts_with("sent ") {
                    sent = Some(line);
                }
            }
        }
        (recv, sent)
    }
}

impl Drop for JavaNode {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        if !wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            // Our own child, by its handle.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[test]
fn rust_and_java_exchange_byte_messages_in_every_mode() {
    let classes = compile_java();
    let statics = Arc::new(StaticMembershipInterceptor::new(Vec::new()));
    let rust = GroupChannel::builder()
        .name("interop")
        .port(0)
        .heartbeat_interval(None)
        .interceptor(MessageDispatchInterceptor::default())
        .interceptor_arc(statics.clone())
        .build()
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let r2 = Arc::clone(&received);
    rust.add_channel_listener(move |m: &ChannelMessage| {
        let text = String::from_utf8_lossy(&m.payload).to_string();
        if text.starts_with("fail") {
            return Err(ProcessError::new("asked to fail"));
        }
        r2.lock().push((text, m.options.bits()));
        Ok(())
    });
    rust.start(Levels::SND_RX).unwrap();
    let mut java = JavaNode::start(&classes, &rust.local_member());
    statics.set_members(vec![java.member.clone()]);
    rust.start(Levels::SND_TX).unwrap();
    let to = [java.member.clone()];

    // Rust -> Java, every mode; every ack honoured (no error), every message intact.
    let mut expected = HashSet::new();
    for (name, bits) in MODES {
        for i in 0..PER_MODE {
            let text = format!("rust-{name}-{i}");
            rust.send(&to, text.clone().into_bytes(), SendOptions::from_bits(bits))
                .unwrap_or_else(|e| panic!("rust -> java {name} {i}: {e}"));
            expected.insert(text);
        }
    }
    let (got, _) = java.collect(expected.len(), false);
    let got_set: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "java received duplicates or losses"
    );
    assert_eq!(got_set, expected, "java received other messages");

    // Java -> Rust, every mode.
    for (name, bits) in MODES {
        java.say(&format!("send {bits} {PER_MODE} java-{name}"));
        let (_, sent) = java.collect(0, true);
        assert_eq!(
            sent.as_deref(),
            Some(&*format!("sent {PER_MODE} 0")),
            "java {name}"
        );
    }
    assert!(wait_until(Duration::from_secs(10), || received
        .lock()
        .len()
        == 4 * PER_MODE));
    let got = received.lock().clone();
    for (name, bits) in MODES {
        let mine: Vec<_> = got
            .iter()
            .filter(|(t, _)| t.starts_with(&format!("java-{name}-")))
            .collect();
        assert_eq!(mine.len(), PER_MODE, "from java, mode {name}");
        // The options arrive as Java wrote them: the mode bits plus BYTE_MESSAGE.
        assert!(
            mine.iter().all(|(_, o)| *o == (bits | 1)),
            "options for {name}"
        );
        let set: HashSet<_> = mine.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(set.len(), PER_MODE, "duplicates from java, mode {name}");
    }

    // FAIL_ACK both ways.
    let err = rust
        .send(
            &to,
            &b"fail-please"[..],
            SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK,
        )
        .unwrap_err();
    assert_eq!(err.faulty_members()[0].member, java.member);
    assert_eq!(err.faulty_members()[0].failure, Failure::RemoteProcess);
    java.say("send 6 1 fail");
    let (_, sent) = java.collect(0, true);
    assert_eq!(sent.as_deref(), Some("sent 1 1"), "java saw our FAIL_ACK");

    rust.stop(Levels::ALL).unwrap();
}

// ---------------------------------------------------------------- multicast membership

const FREQUENCY_MS: u64 = 100;
const DROP_MS: u64 = 1000;

fn mcast_cfg(port: u16) -> tribes::membership::McastConfig {
    tribes::membership::McastConfig {
        port,
        frequency: Duration::from_millis(FREQUENCY_MS),
        drop_time: Duration::from_millis(DROP_MS),
        ttl: Some(0),
        ..Default::default()
    }
}

/// Not a test on its own: with `TRIBES_JAVA_MCAST_CHILD` set to a group port it runs one
/// Rust multicast node as a child process, prints `CHILD-READY <port> <id-hex>`, and stops cleanly
/// on `exit` (or after 60 s).
#[test]
fn mcast_child() {
    let Ok(port) = std::env::var("TRIBES_JAVA_MCAST_CHILD") else {
        return;
    };
    let ch = GroupChannel::builder()
        .name("child")
        .port(0)
        .heartbeat_interval(None)
        .multicast(mcast_cfg(port.parse().unwrap()))
        .build()
        .unwrap();
    struct Print;
    impl tribes::MembershipListener for Print {
        fn member_added(&self, m: &Member) {
            println!("\nCHILD-ADDED {} {}", m.port, hex(&m.unique_id));
        }
        fn member_disappeared(&self, m: &Member) {
            println!("\nCHILD-GONE {} {}", m.port, hex(&m.unique_id));
        }
    }
    ch.add_membership_listener(Print);
    ch.start(Levels::ALL).unwrap();
    let me = ch.local_member();
    // A marker to search for: libtest may print its own text on the same line.
    println!("\nCHILD-READY {} {}", me.port, hex(&me.unique_id));
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
            if line.trim() == "exit" {
                break;
            }
            line.clear();
        }
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(60));
    ch.stop(Levels::ALL).unwrap();
}

struct RustChild {
    child: Child,
    stdin: ChildStdin,
    port: u16,
    id: String,
    /// Membership lines the child printed after it was ready (`CHILD-ADDED ...`).
    events: Receiver<String>,
}

/// `program args...`, run inside network namespace `ns` when one is given.
fn command_in(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl RustChild {
    fn start(group_port: u16) -> Self {
        Self::start_in(None, group_port)
    }

    // The child is waited for in `Drop` (and on the early-exit path below); the lint cannot
    // see through the struct.
    #[allow(clippy::zombie_processes)]
    fn start_in(ns: Option<&str>, group_port: u16) -> Self {
        let mut child = command_in(ns, &std::env::current_exe().unwrap())
            .args([
                "--exact",
                "mcast_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("TRIBES_JAVA_MCAST_CHILD", group_port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let (tx, events) = crossbeam_channel::unbounded();
        let forward = |line: &str, tx: &crossbeam_channel::Sender<String>| {
            for marker in ["CHILD-ADDED ", "CHILD-GONE "] {
                if let Some(at) = line.find(marker) {
                    let _ = tx.send(line[at..].trim().to_string());
                }
            }
        };
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child did not start");
            }
            // Members may be seen before the child reports ready.
            forward(&line, &tx);
            if let Some(at) = line.find("CHILD-READY ") {
                let rest = &line[at + "CHILD-READY ".len()..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let (port, id) = (f[0].parse().unwrap(), f[1].to_string());
                std::thread::spawn(move || {
                    for line in out.lines().map_while(Result::ok) {
                        forward(&line, &tx);
                    }
                });
                return Self {
                    child,
                    stdin,
                    port,
                    id,
                    events,
                };
            }
        }
    }
}

impl Drop for RustChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_java_mcast(
    classes: &Path,
    group_port: u16,
) -> (Child, ChildStdin, Receiver<String>, Member) {
    start_java_mcast_in(None, classes, group_port)
}

fn start_java_mcast_in(
    ns: Option<&str>,
    classes: &Path,
    group_port: u16,
) -> (Child, ChildStdin, Receiver<String>, Member) {
    let args = [
        "mcast".to_string(),
        group_port.to_string(),
        FREQUENCY_MS.to_string(),
        DROP_MS.to_string(),
    ];
    // IPv4 sockets: a dual-stack socket cannot send to an IPv4 group over 127.0.0.1.
    let (child, stdin, lines) =
        spawn_java_in(ns, classes, &["-Djava.net.preferIPv4Stack=true"], &args);
    let member = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("java multicast node did not start");
        assert!(!line.starts_with("exited"), "java multicast node {line}");
        if let Some(rest) = line.strip_prefix("ready ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let addr = format!("127.0.0.1:{}", f[0]).parse().unwrap();
            break Member::with_id(addr, unhex(f[1]));
        }
    };
    (child, stdin, lines, member)
}

/// Waits for a line from the Java node; returns how long it took.
fn expect_line(lines: &Receiver<String>, want: &str, within: Duration) -> Duration {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(20)) {
            if l == want {
                return start.elapsed();
            }
        }
    }
    panic!("java node did not print {want:?} within {within:?}");
}

#[test]
fn rust_and_java_find_each_other_by_multicast_and_see_leaves_kills_and_restarts() {
    let classes = compile_java();
    let group_port = 48000 + (std::process::id() % 1000) as u16;
    let (mut java, mut java_in, java_lines, java_member) = start_java_mcast(&classes, group_port);

    // A Rust child joins: Java reports it within two beacon intervals (plus slack for the
    // JVM's scheduling), and the child sees Java.
    let child = RustChild::start(group_port);
    let took = expect_line(
        &java_lines,
        &format!("added {} {}", child.port, child.id),
        Duration::from_secs(3),
    );
    eprintln!("java saw the rust node after {took:?}");

    // The child is killed (no shutdown beacon): Java drops it after its drop time.
    let (old_port, old_id) = (child.port, child.id.clone());
    drop(child); // SIGKILL, by its handle
    let took = expect_line(
        &java_lines,
        &format!("gone {old_port} {old_id}"),
        Duration::from_millis(DROP_MS * 3),
    );
    eprintln!("java dropped the killed rust node after {took:?}");

    // Restart: a new process, a new unique id, a new member for Java.
    let mut again = RustChild::start(group_port);
    assert_ne!(again.id, old_id);
    expect_line(
        &java_lines,
        &format!("added {} {}", again.port, again.id),
        Duration::from_secs(3),
    );
    // A clean stop sends the shutdown beacon: Java drops it well before the drop time.
    writeln!(again.stdin, "exit").unwrap();
    again.stdin.flush().unwrap();
    let took = expect_line(
        &java_lines,
        &format!("gone {} {}", again.port, again.id),
        Duration::from_secs(3),
    );
    assert!(
        took < Duration::from_millis(DROP_MS),
        "shutdown beacon took {took:?}"
    );

    // The other direction, in this process: Rust sees Java, then Java leaving cleanly.
    let rust = GroupChannel::builder()
        .name("mrust")
        .port(0)
        .heartbeat_interval(None)
        .multicast(mcast_cfg(group_port))
        .build()
        .unwrap();
    rust.start(Levels::ALL).unwrap();
    assert!(
        rust.wait_for_members(1, Duration::from_secs(3)),
        "rust never saw java"
    );
    assert_eq!(rust.members(), vec![java_member.clone()]);
    writeln!(java_in, "exit").unwrap();
    java_in.flush().unwrap();
    let start = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(3), || rust
        .members()
        .is_empty()));
    assert!(
        start.elapsed() < Duration::from_millis(DROP_MS),
        "java's shutdown beacon"
    );
    let _ = java.wait();

    // A second Java node is killed: Rust drops it after the drop time.
    let (mut java2, _in2, _lines2, java2_member) = start_java_mcast(&classes, group_port);
    assert!(wait_until(Duration::from_secs(3), || rust
        .members()
        .contains(&java2_member)));
    java2.kill().unwrap(); // our own child, by its handle
    java2.wait().unwrap();
    let start = std::time::Instant::now();
    assert!(wait_until(Duration::from_millis(DROP_MS * 3), || rust
        .members()
        .is_empty()));
    let took = start.elapsed();
    assert!(
        took <= Duration::from_millis(DROP_MS + FREQUENCY_MS + 300),
        "expired after {took:?}"
    );
    rust.stop(Levels::ALL).unwrap();
}

/// A network namespace of this test's own, deleted on drop (also when the test fails).
struct NetNs(String);

impl NetNs {
    fn create() -> Self {
        let name = format!("tribes-test-{}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        assert!(
            ok(&["netns", "add", &name]),
            "NAMESPACE TEST CANNOT RUN: `ip netns add` failed (needs root and iproute2)"
        );
        let ns = Self(name);
        assert!(
            ok(&["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"]),
            "cannot bring up lo in {}",
            ns.0
        );
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn expect_event(events: &Receiver<String>, want: &str, within: Duration) -> Duration {
    expect_line(events, want, within)
}

#[test]
fn in_a_private_namespace_java_and_rust_see_joins_leaves_and_kills_by_multicast() {
    let classes = compile_java();
    let ns = NetNs::create();
    let group_port = 45564; // Tribes' default: the namespace is ours alone.
    let (mut java, _java_in, java_lines, java_member) =
        start_java_mcast_in(Some(&ns.0), &classes, group_port);
    let java_id = hex(&java_member.unique_id);

    // Both see each other within two beacon intervals (plus scheduling slack).
    let mut a = RustChild::start_in(Some(&ns.0), group_port);
    let within = Duration::from_millis(2 * FREQUENCY_MS + 1000);
    expect_line(&java_lines, &format!("added {} {}", a.port, a.id), within);
    expect_event(
        &a.events,
        &format!("CHILD-ADDED {} {java_id}", java_member.port),
        within,
    );

    // A clean stop: Java sees the shutdown beacon at once.
    writeln!(a.stdin, "exit").unwrap();
    a.stdin.flush().unwrap();
    let took = expect_line(
        &java_lines,
        &format!("gone {} {}", a.port, a.id),
        Duration::from_secs(3),
    );
    assert!(took < Duration::from_millis(DROP_MS), "{took:?}");

    // Java is killed: a Rust node drops it after the drop time.
    let b = RustChild::start_in(Some(&ns.0), group_port);
    expect_event(
        &b.events,
        &format!("CHILD-ADDED {} {java_id}", java_member.port),
        within,
    );
    java.kill().unwrap(); // our own child (`ip netns exec` execs java), by its handle
    java.wait().unwrap();
    let took = expect_event(
        &b.events,
        &format!("CHILD-GONE {} {java_id}", java_member.port),
        Duration::from_millis(DROP_MS * 3),
    );
    assert!(
        took <= Duration::from_millis(DROP_MS + FREQUENCY_MS + 300),
        "{took:?}"
    );
    drop(b);
    drop(ns);
}

#[test]
fn the_read_test_verifies_a_java_member_and_finds_it_frozen_when_stopped() {
    // Our failure detector's read test asks a Java receiver for an ACK of Tribes' probe; a
    // Java node stopped with SIGSTOP (its kernel still accepts connections) fails it, is
    // reported gone after a failed send, and is a member again once it resumes.
    use tribes::interceptors::{FailureDetectorConfig, TcpFailureDetector};
    let classes = compile_java();
    let statics = Arc::new(StaticMembershipInterceptor::new(Vec::new()));
    let rust = GroupChannel::builder()
        .name("interop-fd")
        .port(0)
        .heartbeat_interval(None)
        .sender(tribes::transport::SenderConfig {
            timeout: Duration::from_millis(800),
            ..Default::default()
        })
        .interceptor(TcpFailureDetector::new(FailureDetectorConfig {
            perform_read_test: true,
            read_test_timeout: Duration::from_millis(500),
            ..Default::default()
        }))
        .interceptor_arc(statics.clone())
        .build()
        .unwrap();
    rust.start(Levels::SND_RX).unwrap();
    let mut java = JavaNode::start(&classes, &rust.local_member());
    statics.set_members(vec![java.member.clone()]);
    rust.start(Levels::SND_TX).unwrap();
    let to = [java.member.clone()];
    assert!(
        rust.members().contains(&java.member),
        "the Java node ACKed the read test's probe at start"
    );
    let signal = |sig: &str| {
        // Our own child, by its PID.
        let pid = java.child.id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    // The signal is queued, not yet taken: wait until every thread of the JVM stopped.
    let pid = java.child.id();
    let stopped = wait_until(Duration::from_secs(5), || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.filter_map(Result::ok).all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
        })
    });
    assert!(stopped, "the JVM did not stop");
    let failed = rust.send(&to, &b"while-stopped"[..], SendOptions::USE_ACK);
    assert!(failed.is_err(), "a stopped JVM sends no ACK");
    let gone = wait_until(Duration::from_secs(5), || {
        !rust.members().contains(&java.member)
    });
    assert!(gone, "the read test found the stopped Java node frozen");
    signal("-CONT");
    let back = wait_until(Duration::from_secs(10), || {
        rust.heartbeat();
        std::thread::sleep(Duration::from_millis(100));
        rust.members().contains(&java.member)
    });
    assert!(back, "the resumed Java node answered a heartbeat's probe");
    rust.send(&to, &b"after-resume"[..], SendOptions::USE_ACK)
        .expect("delivered to the resumed Java node");
    // The Java node has no failure detector to swallow our probes: its application sees
    // them as byte messages, before ours.
    let arrived = wait_until(Duration::from_secs(10), || {
        java.lines
            .recv_timeout(Duration::from_millis(100))
            .is_ok_and(|l| l == "recv after-resume")
    });
    assert!(
        arrived,
        "the Java node received the message sent after it resumed"
    );
    java.say("exit");
    rust.stop(Levels::ALL).unwrap();
}
