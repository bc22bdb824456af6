//! DNS membership, for networks without multicast (e.g. a Kubernetes headless service):
//! resolve one name on every heartbeat; the members are the addresses it resolves to, all
//! listening on the local receiver's port (Tribes `DNSMembershipProvider`, §4.2).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use log::{debug, warn};
use md5::{Digest, Md5};
use parking_lot::Mutex;

use super::MemberEvent;
use crate::channel::Levels;
use crate::error::ChannelError;
use crate::id::UniqueId;
use crate::interceptors::{Down, Interceptor, StackHandle};
use crate::member::Member;

/// Where names are resolved.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Resolver {
    /// The operating system's resolver (`/etc/hosts`, `/etc/resolv.conf`).
    System,
    /// A DNS server asked directly for A records over UDP (timeout 1 s).
    Server(SocketAddr),
}

impl Resolver {
    /// Resolves `name` to addresses.
    pub fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        match self {
            Self::System => {
                let mut ips: Vec<IpAddr> = (name, 0).to_socket_addrs()?.map(|a| a.ip()).collect();
                ips.sort();
                ips.dedup();
                Ok(ips)
            }
            Self::Server(server) => query_a(*server, name, Duration::from_secs(1)),
        }
    }
}

/// Settings of [`DnsMembershipInterceptor`].
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The name to resolve (Tribes: `DNS_MEMBERSHIP_SERVICE_NAME`).
    pub name: String,
    /// How long an address may be missing from the answers before its member is dropped.
    /// Default 5 s (Tribes `expirationTime`).
    pub expiration: Duration,
    /// Where to resolve. Default: the system resolver.
    pub resolver: Resolver,
}

impl DnsConfig {
    /// Resolve `name` with the system resolver, Tribes' expiration.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            expiration: Duration::from_secs(5),
            resolver: Resolver::System,
        }
    }
}

/// The unique id Tribes gives a DNS-discovered member: MD5 of its address text. Build the
/// local channel with it (`ChannelBuilder::unique_id`) so every node agrees on every id.
///
/// ```
/// use tribes::membership::dns_member_id;
/// let a = dns_member_id("10.0.0.1".parse().unwrap());
/// assert_eq!(a, dns_member_id("10.0.0.1".parse().unwrap()));
/// assert_ne!(a, dns_member_id("10.0.0.2".parse().unwrap()));
/// ```
pub fn dns_member_id(ip: IpAddr) -> UniqueId {
    let digest = Md5::digest(ip.to_string().as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest);
    UniqueId(b)
}

/// Members from DNS answers: pure, time as a parameter.
#[derive(Debug)]
pub struct DnsTable {
    port: u16,
    local: IpAddr,
    expiration: Duration,
    members: HashMap<IpAddr, (Member, Instant)>,
}

impl DnsTable {
    /// A table for members on `port`, skipping `local` (this node's address).
    pub fn new(local: IpAddr, port: u16, expiration: Duration) -> Self {
        Self {
            port,
            local,
            expiration,
            members: HashMap::new(),
        }
    }

    /// Applies one resolution made at `now`: new addresses join at once, missing ones leave
    /// after the expiration.
    pub fn update(&mut self, ips: &[IpAddr], now: Instant) -> Vec<MemberEvent> {
        let mut events = Vec::new();
        for &ip in ips {
            if ip == self.local {
                continue;
            }
            match self.members.get_mut(&ip) {
                Some((_, seen)) => *seen = now,
                None => {
                    let m = Member::with_id(SocketAddr::new(ip, self.port), dns_member_id(ip));
                    self.members.insert(ip, (m.clone(), now));
                    events.push(MemberEvent::Added(m));
                }
            }
        }
        let expiration = self.expiration;
        self.members.retain(|_, (m, seen)| {
            let keep = now.saturating_duration_since(*seen) <= expiration;
            if !keep {
                events.push(MemberEvent::Disappeared {
                    member: m.clone(),
                    expired: true,
                });
            }
            keep
        });
        events
    }
}

/// Membership from a DNS name, resolved at start and on every heartbeat.
///
/// ```
/// use tribes::membership::{DnsConfig, DnsMembershipInterceptor};
/// let dns = DnsMembershipInterceptor::new(DnsConfig::new("tribes.default.svc.cluster.local"));
/// # drop(dns);
/// ```
pub struct DnsMembershipInterceptor {
    cfg: DnsConfig,
    table: Mutex<Option<DnsTable>>,
    handle: Mutex<Option<StackHandle>>,
}

impl DnsMembershipInterceptor {
    /// DNS membership with the given settings.
    pub fn new(cfg: DnsConfig) -> Self {
        Self {
            cfg,
            table: Mutex::new(None),
            handle: Mutex::new(None),
        }
    }

    fn poll(&self) {
        let Some(handle) = self.handle.lock().clone() else {
            return;
        };
        let ips = match self.cfg.resolver.resolve(&self.cfg.name) {
            Ok(ips) => ips,
            Err(e) => {
                warn!(target: "tribes::membership", "cannot resolve {}: {e}", self.cfg.name);
                Vec::new()
            }
        };
        let events = {
            let mut table = self.table.lock();
            match table.as_mut() {
                Some(t) => t.update(&ips, Instant::now()),
                None => return,
            }
        };
        for e in events {
            match e {
                MemberEvent::Added(m) => handle.member_added(m),
                MemberEvent::Disappeared { member, .. } => handle.member_disappeared(member),
            }
        }
    }
}

impl Interceptor for DnsMembershipInterceptor {
    fn name(&self) -> &'static str {
        "DnsMembershipInterceptor"
    }

    fn heartbeat(&self, next: Down<'_>) {
        self.poll();
        next.heartbeat();
    }

    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        if !levels.contains(Levels::SND_TX) {
            return Ok(());
        }
        let local = handle
            .local_member()
            .ok_or_else(|| ChannelError::Interceptor {
                name: self.name().into(),
                reason: "no local member".into(),
            })?;
        *self.table.lock() = Some(DnsTable::new(local.host, local.port, self.cfg.expiration));
        *self.handle.lock() = Some(handle.clone());
        self.poll();
        Ok(())
    }

    fn stop(&self, levels: Levels, _handle: &StackHandle) {
        if levels.contains(Levels::SND_TX) {
            *self.handle.lock() = None;
            *self.table.lock() = None;
        }
    }
}

/// Asks `server` for the A records of `name` (one UDP query, no recursion on our side).
fn query_a(server: SocketAddr, name: &str, timeout: Duration) -> io::Result<Vec<IpAddr>> {
    let local: IpAddr = if server.ip().is_loopback() {
        server.ip()
    } else {
        IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0))
    };
    let socket = UdpSocket::bind(SocketAddr::new(local, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    let id = (crate::id::next_u64() & 0xffff) as u16;
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad DNS name"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    socket.send_to(&q, server)?;
    let mut buf = [0u8; 1500];
    let deadline = crate::deadline::from_now(timeout);
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        if from == server && n >= 12 && buf[..2] == id.to_be_bytes() {
            return parse_a_answers(&buf[..n]);
        }
        if Instant::now() >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        debug!(target: "tribes::membership", "ignoring stray DNS datagram from {from}");
    }
}

fn parse_a_answers(msg: &[u8]) -> io::Result<Vec<IpAddr>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed DNS answer");
    let get16 = |at: usize| -> io::Result<u16> {
        msg.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(bad)
    };
    let rcode = get16(2)? & 0x000f;
    if rcode == 3 {
        return Ok(Vec::new()); // NXDOMAIN: nobody there
    }
    if rcode != 0 {
        return Err(io::Error::other(format!("DNS error code {rcode}")));
    }
    let (qd, an) = (get16(4)?, get16(6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at).ok_or_else(bad)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at).ok_or_else(bad)?;
        let (ty, len) = (get16(at)?, get16(at + 8)? as usize);
        let data = msg.get(at + 10..at + 10 + len).ok_or_else(bad)?;
        if ty == 1 && len == 4 {
            out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            )));
        }
        at += 10 + len;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Returns the offset after a (possibly compressed) name.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + l as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_adds_new_addresses_and_expires_missing_ones() {
        let local: IpAddr = "10.0.0.1".parse().unwrap();
        let mut t = DnsTable::new(local, 4000, Duration::from_secs(5));
        let t0 = Instant::now();
        let ips: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ev = t.update(&ips, t0);
        assert_eq!(ev.len(), 2, "self is skipped");
        assert!(ev
            .iter()
            .all(|e| matches!(e, MemberEvent::Added(m) if m.port == 4000
            && m.unique_id == dns_member_id(m.host))));
        assert!(t.update(&ips, t0 + Duration::from_secs(1)).is_empty());
        // 10.0.0.3 vanishes from DNS: kept until the expiration passes.
        assert!(t.update(&ips[..2], t0 + Duration::from_secs(5)).is_empty());
        let ev = t.update(&ips[..2], t0 + Duration::from_millis(6001));
        assert!(
            matches!(&ev[..], [MemberEvent::Disappeared { member, expired: true }]
            if member.host == ips[2])
        );
    }

    #[test]
    fn answers_with_compressed_names_are_parsed_and_junk_refused() {
        // Header: id 1, response, 1 question, 2 answers.
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        m.extend_from_slice(b"\x01a\x04test\x00\x00\x01\x00\x01");
        for ip in [[127, 0, 0, 2], [127, 0, 0, 3]] {
            m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            m.extend_from_slice(&ip);
        }
        let ips = parse_a_answers(&m).unwrap();
        assert_eq!(
            ips,
            vec![IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3])]
        );
        for cut in 0..m.len() {
            let _ = parse_a_answers(&m[..cut]); // never panics
        }
    }
}
