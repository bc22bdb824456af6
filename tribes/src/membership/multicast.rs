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
        Ok(())
    }
}

/// Receives membership events from the service (the channel passes them up the stack).
pub(crate) type EventSink = Arc<dyn Fn(MemberEvent) + Send + Sync>;

/// A running multicast membership service.
pub(crate) struct McastService {
    cfg: McastConfig,
    name: String,
    socket: Arc<UdpSocket>,
    table: Arc<Mutex<MembershipTable>>,
    local: Arc<RwLock<Member>>,
    started: Instant,
    sink: EventSink,
    rx: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    tx: Option<(ChanTx<()>, JoinHandle<()>)>,
    malformed: Arc<AtomicU64>,
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
            table: Arc::new(Mutex::new(MembershipTable::new(key, cfg.drop_time))),
            cfg,
            name: name.to_string(),
            socket: Arc::new(socket),
            local,
            started: Instant::now(),
            sink,
            rx: None,
            tx: None,
            malformed: Arc::new(AtomicU64::new(0)),
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
    // The receive loop wakes at least every beacon interval to run expiry and see stop.
    socket.set_read_timeout(Some(cfg.frequency))?;
    Ok(socket.into())
}

struct RxLoop {
    socket: Arc<UdpSocket>,
    table: Arc<Mutex<MembershipTable>>,
    sink: EventSink,
    stop: Arc<AtomicBool>,
    malformed: Arc<AtomicU64>,
}

impl RxLoop {
    fn run(self) {
        let mut buf = vec![0u8; 65535];
        let mut errors = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    errors = 0;
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if MembershipTable::is_beacon(&data) {
                        let res = self.table.lock().handle_beacon(&data, Instant::now());
                        match res {
                            Ok(events) => self.emit(events),
                            Err(e) => {
                                self.malformed.fetch_add(1, Ordering::Relaxed);
                                debug!(target: "tribes::membership", "malformed beacon from {from}: {e}");
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
                    errors += 1;
                    warn!(target: "tribes::membership", "multicast receive failed ({errors} in a row): {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            let expired = self.table.lock().expire(Instant::now());
            self.emit(expired);
        }
    }

    fn emit(&self, events: Vec<MemberEvent>) {
        for e in events {
            (self.sink)(e);
        }
    }
}

struct TxLoop {
    socket: Arc<UdpSocket>,
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
        if let Err(e) = self.socket.send_to(&encode_member(&m), self.dest) {
            warn!(target: "tribes::membership", "beacon send failed: {e}");
        }
    }
}
