//! Members: who is in the group, and how to reach them.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

use crate::id::UniqueId;

/// The shutdown command `BABY-ALEX`: a member carrying it is leaving the group.
pub const SHUTDOWN_COMMAND: &[u8] = b"BABY-ALEX";

/// A group member, as carried in beacons and in every envelope (Tribes `MemberImpl`, §3).
///
/// Identity is host + TCP port + unique id ([`MemberKey`]); alive time, command, domain and
/// payload are not part of it. A restarted node has a new unique id and is a new member.
///
/// ```
/// use tribes::Member;
/// let m = Member::new("127.0.0.1:4000".parse().unwrap());
/// assert_eq!(m.name(), "tcp://127.0.0.1:4000");
/// assert_eq!(m.secure_port, -1);
/// ```
#[derive(Clone)]
pub struct Member {
    /// Address the member's receiver listens on (raw bytes on the wire).
    pub host: IpAddr,
    /// TCP listen port.
    pub port: u16,
    /// Secure port, -1 for none (advertised only).
    pub secure_port: i32,
    /// UDP port, -1 for none.
    pub udp_port: i32,
    /// Milliseconds since the member's membership service started (or, for a static local
    /// member, a fixed Unix time in ms, as Java Tribes writes it).
    pub alive_time: i64,
    /// The member's 16-byte unique id.
    pub unique_id: UniqueId,
    /// Command bytes; empty normally, [`SHUTDOWN_COMMAND`] when leaving.
    pub command: Bytes,
    /// Logical domain bytes.
    pub domain: Bytes,
    /// Application payload advertised to everyone.
    pub payload: Bytes,
}

impl Member {
    /// A member at `addr` with a fresh secure unique id and empty command, domain and payload.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_id(addr, UniqueId::secure())
    }

    /// A member at `addr` with the given unique id (static members are configured this way).
    pub fn with_id(addr: SocketAddr, unique_id: UniqueId) -> Self {
        Self {
            host: addr.ip(),
            port: addr.port(),
            secure_port: -1,
            udp_port: -1,
            alive_time: 0,
            unique_id,
            command: Bytes::new(),
            domain: Bytes::new(),
            payload: Bytes::new(),
        }
    }

    /// The TCP address of the member's receiver.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The identity of this member.
    pub fn key(&self) -> MemberKey {
        MemberKey {
            host: self.host,
            port: self.port,
            unique_id: self.unique_id,
        }
    }

    /// Name used in logs: `tcp://<host>:<port>`.
    pub fn name(&self) -> String {
        format!("tcp://{}", self.addr())
    }

    /// True when the member carries the shutdown command.
    pub fn is_shutting_down(&self) -> bool {
        self.command.as_ref() == SHUTDOWN_COMMAND
    }
}

impl PartialEq for Member {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Member {}

impl Hash for Member {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("addr", &self.addr())
            .field("unique_id", &self.unique_id)
            .field("alive_time", &self.alive_time)
            .field("domain_len", &self.domain.len())
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp://{}", self.addr())
    }
}

/// The identity of a member: host, TCP port and unique id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MemberKey {
    /// Host address.
    pub host: IpAddr,
    /// TCP port.
    pub port: u16,
    /// Unique id.
    pub unique_id: UniqueId,
}

/// Tribes' `AbsoluteOrder`: host bytes (shorter first, then unsigned byte by byte), then port,
/// then unique id. The lowest member is the leader.
pub fn absolute_order(a: &Member, b: &Member) -> std::cmp::Ordering {
    fn host_bytes(ip: &IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }
    let (ha, hb) = (host_bytes(&a.host), host_bytes(&b.host));
    ha.len()
        .cmp(&hb.len())
        .then_with(|| ha.cmp(&hb))
        .then_with(|| a.port.cmp(&b.port))
        .then_with(|| a.unique_id.0.cmp(&b.unique_id.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_ignores_alive_time_and_payload() {
        let id = UniqueId::random();
        let mut a = Member::with_id("127.0.0.1:4000".parse().unwrap(), id);
        let b = a.clone();
        a.alive_time = 99;
        a.payload = Bytes::from_static(b"x");
        assert_eq!(a, b);
        let c = Member::with_id("127.0.0.1:4001".parse().unwrap(), id);
        assert_ne!(a, c);
        let d = Member::with_id("127.0.0.1:4000".parse().unwrap(), UniqueId::random());
        assert_ne!(a, d);
    }

    #[test]
    fn absolute_order_compares_host_then_port_then_id() {
        let id = UniqueId([0; 16]);
        let a = Member::with_id("10.0.0.2:4000".parse().unwrap(), id);
        let b = Member::with_id("10.0.0.10:3000".parse().unwrap(), id);
        let c = Member::with_id("10.0.0.10:3001".parse().unwrap(), id);
        let v6 = Member::with_id("[::1]:1".parse().unwrap(), id);
        assert!(absolute_order(&a, &b).is_lt());
        assert!(absolute_order(&b, &c).is_lt());
        assert!(absolute_order(&c, &v6).is_lt());
    }
}
