//! `McastService`: membership by multicast beacons (Tribes `McastService`).
//!
//! Two threads: `tribes-mcast-rx-<name>` (MBR_RX) receives beacons into a
//! [`MembershipTable`] and runs expiry; `tribes-mcast-tx-<name>` (MBR_TX) sends the local
//! member's beacon every `frequency`, at once when payload or domain change, and a shutdown
//! beacon when it stops. Unlike Tribes there is no start-up sleep: use
//! [`crate::GroupChannel::wait_for_members`] to wait for peers.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver as ChanRx, RecvTimeoutError, Sender as ChanTx};
use log::{debug, info, warn};
use parking_lot::{Mutex, RwLock};

use super::table::{MemberEvent, MembershipTable};
use crate::error::{ChannelError, ConfigError};
use crate::member::{Member, SHUTDOWN_COMMAND};
use crate::wire::encode_member;

/// Multicast membership settings (Tribes `<Membership>`).
///
/// ```
/// use std::time::Duration;
/// use tribes::membership::McastConfig;
/// let cfg = McastConfig::default();
/// assert_eq!(cfg.port, 45564);
/// assert_eq!(cfg.frequency, Duration::from_millis(500));
/// ```
#[derive(Debug, Clone)]
pub struct McastConfig {
    /// Multicast group. Default 228.0.0.4 (Tribes). Group + port define the cluster.
    pub group: Ipv4Addr,
    /// Port. Default 45564 (Tribes).
    pub port: u16,
    /// Beacon interval. Default 500 ms (Tribes).
    pub frequency: Duration,
    /// Silence after which a member expires. Default 3000 ms (Tribes `dropTime`).
    pub drop_time: Duration,
    /// Interface address multicast goes out on and is joined on. Default 127.0.0.1, so that
    /// nothing leaves the machine by accident (Tribes: unset, the OS chooses). Set it to the
    /// address of the cluster's interface in production.
    pub bind: Ipv4Addr,
    /// Multicast TTL; `None` keeps the OS default (1). Tests use 0.
    pub ttl: Option<u32>,
    /// Do not loop our own multicast back to this host. Default false (Tribes).
    pub local_loopback_disabled: bool,
    /// Re-create the socket after `recovery_counter` consecutive send or receive errors.
    /// Default true (Tribes `recoveryEnabled`).
    pub recovery_enabled: bool,
    /// Consecutive errors before recovery. Default 10 (Tribes).
    pub recovery_counter: u32,
    /// Pause between recovery attempts. Default 5 s (Tribes `recoverySleepTime`).
    pub recovery_sleep: Duration,
    /// Members the table holds at most; beacons of further new members are refused (with
    /// a log line) until one leaves. Default 4096 (Tribes has no bound: anyone who can send
    /// to the group could grow it without end with forged beacons).
    pub max_members: usize,
}

impl Default for McastConfig {
    fn default() -> Self {
        Self {
            group: Ipv4Addr::new(228, 0, 0, 4),
            port: 45564,
            frequency: Duration::from_millis(500),
            drop_time: Duration::from_millis(3000),
            bind: Ipv4Addr::LOCALHOST,
            ttl: None,
            local_loopback_disabled: false,
            recovery_enabled: true,
            recovery_counter: 10,
            recovery_sleep: Duration::from_secs(5),
            max_members: 4096,
        }
    }
}

impl McastConfig {
    /// Checks that the values can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.group.is_multicast() {
            return Err(ConfigError {
                field: "group",
                reason: format!("{} is not a multicast address", self.group),
            });
        }
        if self.frequency.is_zero() || self.drop_time <= self.frequency {
            return Err(ConfigError {
                field: "drop_time",
                reason: "frequency must be > 0 and drop_time larger than frequency".into(),
            });
        }
        if self.max_members == 0 {
            return Err(ConfigError {
                field: "max_members",
                reason: "0 would refuse every member".into(),
            });
        }
        Ok(())
    }
}

/// Receives membership events from the service (the channel passes them up the stack).
pub(crate) type EventSink = Arc<dyn Fn(MemberEvent) + Send + Sync>;

/// A running multicast membership service.
pub(crate) struct McastService {
    cfg: McastConfig,
    name: String,
    socket: SharedSocket,
    table: Arc<Mutex<MembershipTable>>,
    local: Arc<RwLock<Member>>,
    started: Instant,
    sink: EventSink,
    rx: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    tx: Option<(ChanTx<()>, JoinHandle<()>)>,
    malformed: Arc<AtomicU64>,
    recover: Arc<AtomicBool>,
}

/// The socket both loops use; recovery swaps in a new one.
type SharedSocket = Arc<RwLock<Arc<UdpSocket>>>;

/// Counts consecutive socket errors (successes reset it) and says when to recover: pure, so
/// the policy is tested without failing sockets.
#[derive(Debug, Default)]
pub(crate) struct ErrorCounter {
    consecutive: u32,
}

impl ErrorCounter {
    /// Records an outcome; returns true when `limit` consecutive errors call for recovery
    /// (and starts counting again).
    pub(crate) fn record(&mut self, ok: bool, limit: u32) -> bool {
        if ok {
            self.consecutive = 0;
            return false;
        }
        self.consecutive += 1;
        if self.consecutive >= limit.max(1) {
            self.consecutive = 0;
            return true;
        }
        false
    }
}

impl McastService {
    pub(crate) fn new(
        cfg: McastConfig,
        name: &str,
        local: Arc<RwLock<Member>>,
        sink: EventSink,
    ) -> Result<Self, ChannelError> {
        cfg.validate()?;
        let socket = open_socket(&cfg)?;
        let key = local.read().key();
        if local.read().host.is_loopback() && !cfg.bind.is_loopback() {
            warn!(target: "tribes::membership",
                "advertising loopback address {} while multicast goes out on {}: peers on other hosts cannot reach this node; set the receiver address to this host's cluster interface",
                local.read().host, cfg.bind);
        }
        Ok(Self {
            table: Arc::new(Mutex::new(
                MembershipTable::new(key, cfg.drop_time).with_max_members(cfg.max_members),
            )),
            cfg,
            name: name.to_string(),
            socket: Arc::new(RwLock::new(Arc::new(socket))),
            local,
            started: Instant::now(),
            sink,
            rx: None,
            tx: None,
            malformed: Arc::new(AtomicU64::new(0)),
            recover: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Members currently known, oldest first.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.table.lock().members()
    }

    pub(crate) fn start_rx(&mut self) -> Result<(), ChannelError> {
        if self.rx.is_some() {
            return Ok(());
        }
        self.table.lock().set_local(self.local.read().key());
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = RxLoop {
            socket: Arc::clone(&self.socket),
            cfg: self.cfg.clone(),
            recover: Arc::clone(&self.recover),
            table: Arc::clone(&self.table),
            sink: Arc::clone(&self.sink),
            stop: Arc::clone(&stop),
            malformed: Arc::clone(&self.malformed),
        };
        let h = std::thread::Builder::new()
            .name(format!("tribes-mcast-rx-{}", self.name))
            .spawn(move || ctx.run())?;
        self.rx = Some((stop, h));
        info!(target: "tribes::membership", "listening for beacons on {}:{}", self.cfg.group, self.cfg.port);
        Ok(())
    }

    pub(crate) fn start_tx(&mut self) -> Result<(), ChannelError> {
        if self.tx.is_some() {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let ctx = TxLoop {
            socket: Arc::clone(&self.socket),
            errors: Mutex::new(ErrorCounter::default()),
            recovery_counter: self.cfg.recovery_counter,
            recover: Arc::clone(&self.recover),
            dest: SocketAddrV4::new(self.cfg.group, self.cfg.port).into(),
            local: Arc::clone(&self.local),
            started: self.started,
            frequency: self.cfg.frequency,
            wake: rx,
        };
        // The first beacon goes out before start returns, so peers can see us at once.
        ctx.beacon(false);
        let h = std::thread::Builder::new()
            .name(format!("tribes-mcast-tx-{}", self.name))
            .spawn(move || ctx.run())?;
        self.tx = Some((tx, h));
        Ok(())
    }

    /// Sends a beacon now (the member's payload or domain changed).
    pub(crate) fn beacon_now(&self) {
        if let Some((tx, _)) = &self.tx {
            let _ = tx.try_send(());
        }
    }

    pub(crate) fn stop_tx(&mut self) {
        if let Some((tx, h)) = self.tx.take() {
            drop(tx); // the loop sends the shutdown beacon and exits
            let _ = h.join();
        }
    }

    pub(crate) fn stop_rx(&mut self) {
        if let Some((stop, h)) = self.rx.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = h.join();
            self.table.lock().clear();
        }
    }
}

impl Drop for McastService {
    fn drop(&mut self) {
        self.stop_tx();
        self.stop_rx();
    }
}

fn open_socket(cfg: &McastConfig) -> Result<UdpSocket, ChannelError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Bound to the group address: only this group's datagrams arrive here.
    socket.bind(&SocketAddr::from(SocketAddrV4::new(cfg.group, cfg.port)).into())?;
    socket.join_multicast_v4(&cfg.group, &cfg.bind)?;
    socket.set_multicast_if_v4(&cfg.bind)?;
    socket.set_multicast_loop_v4(!cfg.local_loopback_disabled)?;
    if let Some(ttl) = cfg.ttl {
        socket.set_multicast_ttl_v4(ttl)?;
    }
    // The receive loop wakes at least every beacon interval to run expiry, and every
    // 100 ms to see a stop (a stop used to wait up to a whole interval for it).
    socket.set_read_timeout(Some(cfg.frequency.min(Duration::from_millis(100))))?;
    Ok(socket.into())
}

struct RxLoop {
    socket: SharedSocket,
    cfg: McastConfig,
    /// Set by the send loop after a run of send errors.
    recover: Arc<AtomicBool>,
    table: Arc<Mutex<MembershipTable>>,
    sink: EventSink,
    stop: Arc<AtomicBool>,
    malformed: Arc<AtomicU64>,
}

impl RxLoop {
    fn run(self) {
        let mut buf = vec![0u8; 65535];
        let mut errors = ErrorCounter::default();
        while !self.stop.load(Ordering::SeqCst) {
            if self.recover.swap(false, Ordering::AcqRel) && self.cfg.recovery_enabled {
                self.recover();
            }
            let socket = Arc::clone(&self.socket.read());
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    errors.record(true, self.cfg.recovery_counter);
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if MembershipTable::is_beacon(&data) {
                        let (res, refused) = {
                            let mut table = self.table.lock();
                            let before = table.refused();
                            let res = table.handle_beacon(&data, Instant::now());
                            (res, (table.refused() > before).then(|| table.refused()))
                        };
                        if let Some(n) = refused.filter(|n| crate::sparse(*n)) {
                            warn!(target: "tribes::membership", "membership full ({} members): refused the beacon of a new member from {from} ({n} so far)", self.cfg.max_members);
                        }
                        match res {
                            Ok(events) => self.emit(events),
                            Err(e) => {
                                let n = self.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                                // Bad input is logged, rate-limited so a flood cannot fill logs.
                                if crate::sparse(n) {
                                    warn!(target: "tribes::membership", "malformed beacon from {from} ({n} so far): {e}");
                                }
                            }
                        }
                    } else {
                        debug!(target: "tribes::membership", "ignoring non-beacon datagram from {from}");
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    warn!(target: "tribes::membership", "multicast receive failed: {e}");
                    let recover = errors.record(false, self.cfg.recovery_counter);
                    if recover && self.cfg.recovery_enabled {
                        self.recover();
                    } else {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
            let expired = self.table.lock().expire(Instant::now());
            self.emit(expired);
        }
    }

    /// Re-creates the socket until it works or the service stops (Tribes' recovery thread,
    /// without leaving and re-joining the group in the peers' eyes).
    fn recover(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            match open_socket(&self.cfg) {
                Ok(fresh) => {
                    *self.socket.write() = Arc::new(fresh);
                    info!(target: "tribes::membership", "multicast socket re-created after repeated errors");
                    return;
                }
                Err(e) => {
                    warn!(target: "tribes::membership", "multicast recovery failed: {e}; retrying in {:?}", self.cfg.recovery_sleep);
                    let until = crate::deadline::from_now(self.cfg.recovery_sleep);
                    while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }

    fn emit(&self, events: Vec<MemberEvent>) {
        for e in events {
            (self.sink)(e);
        }
    }
}

struct TxLoop {
    socket: SharedSocket,
    errors: Mutex<ErrorCounter>,
    recovery_counter: u32,
    recover: Arc<AtomicBool>,
    dest: SocketAddr,
    local: Arc<RwLock<Member>>,
    started: Instant,
    frequency: Duration,
    wake: ChanRx<()>,
}

impl TxLoop {
    fn run(self) {
        loop {
            match self.wake.recv_timeout(self.frequency) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => self.beacon(false),
                Err(RecvTimeoutError::Disconnected) => {
                    self.beacon(true);
                    return;
                }
            }
        }
    }

    fn beacon(&self, shutdown: bool) {
        let mut m = self.local.read().clone();
        m.alive_time = self.started.elapsed().as_millis() as i64;
        if shutdown {
            m.command = Bytes::from_static(SHUTDOWN_COMMAND);
        }
        let socket = Arc::clone(&self.socket.read());
        match socket.send_to(&encode_member(&m), self.dest) {
            Ok(_) => {
                self.errors.lock().record(true, self.recovery_counter);
            }
            Err(e) => {
                warn!(target: "tribes::membership", "beacon send failed: {e}");
                // A run of send errors asks the receive loop to re-create the socket.
                if self.errors.lock().record(false, self.recovery_counter) {
                    self.recover.store(true, Ordering::Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        assert!(McastConfig::default().validate().is_ok());
        let bad = [
            (
                McastConfig {
                    group: Ipv4Addr::LOCALHOST,
                    ..McastConfig::default()
                },
                "group",
            ),
            (
                McastConfig {
                    drop_time: Duration::from_millis(500),
                    ..McastConfig::default()
                },
                "drop_time",
            ),
            (
                McastConfig {
                    max_members: 0,
                    ..McastConfig::default()
                },
                "max_members",
            ),
        ];
        for (cfg, field) in bad {
            assert_eq!(cfg.validate().map_err(|e| e.field), Err(field));
        }
    }

    #[test]
    fn recovery_is_due_after_the_configured_run_of_errors_only() {
        let mut c = ErrorCounter::default();
        for _ in 0..9 {
            assert!(!c.record(false, 10));
        }
        assert!(!c.record(true, 10), "a success resets the run");
        for _ in 0..9 {
            assert!(!c.record(false, 10));
        }
        assert!(c.record(false, 10));
        // Counting starts again after a recovery.
        assert!(!c.record(false, 10));
    }

    #[test]
    fn recovery_re_creates_the_socket_and_membership_goes_on() {
        let cfg = McastConfig {
            port: 47900 + (std::process::id() % 90) as u16,
            frequency: Duration::from_millis(50),
            drop_time: Duration::from_millis(2000),
            ttl: Some(0),
            ..McastConfig::default()
        };
        let local = Arc::new(RwLock::new(Member::new("127.0.0.1:4000".parse().unwrap())));
        let added = Arc::new(Mutex::new(Vec::new()));
        let a2 = Arc::clone(&added);
        let sink: EventSink = Arc::new(move |e| {
            if let MemberEvent::Added(m) = e {
                a2.lock().push(m);
            }
        });
        let mut svc = McastService::new(cfg.clone(), "rec", local, sink).unwrap();
        svc.start_rx().unwrap();
        let before = Arc::clone(&svc.socket.read());
        // What a run of send errors does: ask the receive loop to recover.
        svc.recover.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Arc::ptr_eq(&before, &svc.socket.read()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !Arc::ptr_eq(&before, &svc.socket.read()),
            "socket re-created"
        );
        // Beacons still arrive on the new socket.
        let peer = Member::new("127.0.0.1:4001".parse().unwrap());
        let out = open_socket(&cfg).unwrap();
        while added.lock().is_empty() && Instant::now() < deadline {
            out.send_to(
                &encode_member(&peer),
                SocketAddrV4::new(cfg.group, cfg.port),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(added.lock().as_slice(), &[peer]);
        svc.stop_rx();
    }
}
