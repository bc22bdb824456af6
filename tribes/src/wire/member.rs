//! The member record (Tribes `MemberImpl.getData`, §3): beacon body and envelope sender field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, Bytes, BytesMut};

use super::{read_i32, read_i64, WireError};
use crate::id::UniqueId;
use crate::member::Member;

/// Begin marker: `TRIBES-B` followed by version bytes `01 00`.
pub const MEMBER_BEGIN: &[u8; 10] = b"TRIBES-B\x01\x00";
/// End marker: `TRIBES-E` followed by version bytes `01 00`.
pub const MEMBER_END: &[u8; 10] = b"TRIBES-E\x01\x00";

const FIXED: usize = 73;

/// Encoded size of `m`'s record: `73 + host + command + domain + payload`.
pub fn member_record_len(m: &Member) -> usize {
    FIXED + host_len(&m.host) + m.command.len() + m.domain.len() + m.payload.len()
}

/// Encodes `m` as a standalone record.
///
/// ```
/// use tribes::{Member, wire};
/// let m = Member::new("127.0.0.1:4000".parse().unwrap());
/// let rec = wire::encode_member(&m);
/// assert_eq!(rec.len(), 77);
/// assert_eq!(wire::decode_member(&rec).unwrap().0, m);
/// ```
pub fn encode_member(m: &Member) -> Bytes {
    let mut buf = BytesMut::with_capacity(member_record_len(m));
    encode_member_into(&mut buf, m);
    buf.freeze()
}

/// Appends `m`'s record to `buf`.
pub fn encode_member_into(buf: &mut BytesMut, m: &Member) {
    let total = member_record_len(m);
    buf.reserve(total);
    buf.put_slice(MEMBER_BEGIN);
    buf.put_i32((total - 24) as i32);
    buf.put_i64(m.alive_time);
    buf.put_i32(i32::from(m.port));
    buf.put_i32(m.secure_port);
    buf.put_i32(m.udp_port);
    match m.host {
        IpAddr::V4(v4) => {
            buf.put_i8(4);
            buf.put_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            buf.put_i8(16);
            buf.put_slice(&v6.octets());
        }
    }
    buf.put_i32(m.command.len() as i32);
    buf.put_slice(&m.command);
    buf.put_i32(m.domain.len() as i32);
    buf.put_slice(&m.domain);
    buf.put_slice(&m.unique_id.0);
    buf.put_i32(m.payload.len() as i32);
    buf.put_slice(&m.payload);
    buf.put_slice(MEMBER_END);
}

/// Decodes one record at the start of `buf`; returns the member and the bytes it used.
///
/// Command, domain and payload are zero-copy slices of `buf`. Unlike Tribes, every inner
/// length is checked against the record's own length.
pub fn decode_member(buf: &Bytes) -> Result<(Member, usize), WireError> {
    const WHAT: &str = "member record";
    if buf.len() < 14 {
        if !MEMBER_BEGIN.starts_with(&buf[..buf.len().min(10)]) {
            return Err(WireError::BadMemberBeginMarker);
        }
        return Err(truncated(WHAT, 14, buf.len()));
    }
    if &buf[..10] != MEMBER_BEGIN {
        return Err(WireError::BadMemberBeginMarker);
    }
    let l = read_i32(buf, 10);
    if l < 0 {
        return Err(WireError::BadLength {
            what: "member record length",
            value: i64::from(l),
        });
    }
    let total = l as usize + 24;
    if total < FIXED {
        return Err(WireError::BadLength {
            what: "member record length",
            value: i64::from(l),
        });
    }
    if buf.len() < total {
        return Err(truncated(WHAT, total, buf.len()));
    }
    if &buf[total - 10..total] != MEMBER_END {
        return Err(WireError::BadMemberEndMarker);
    }
    // Fields live in buf[14 .. total - 10].
    let body_end = total - 10;
    let mut at = 14;
    let alive_time = read_i64(buf, at);
    at += 8;
    let port = read_i32(buf, at);
    at += 4;
    if !(0..=65535).contains(&port) {
        return Err(WireError::BadPort(port));
    }
    let secure_port = read_i32(buf, at);
    at += 4;
    let udp_port = read_i32(buf, at);
    at += 4;
    let h = buf[at] as i8;
    at += 1;
    let host = match h {
        4 if at + 4 <= body_end => {
            let o = &buf[at..at + 4];
            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
        }
        16 if at + 16 <= body_end => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        4 | 16 => return Err(truncated("member host", h as usize, body_end - at)),
        _ => return Err(WireError::BadHostLength(h)),
    };
    at += h as usize;
    let command = take_sized(buf, &mut at, body_end, "member command")?;
    let domain = take_sized(buf, &mut at, body_end, "member domain")?;
    if at + 16 > body_end {
        return Err(truncated("member unique id", 16, body_end - at));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&buf[at..at + 16]);
    at += 16;
    let payload = take_sized(buf, &mut at, body_end, "member payload")?;
    if at != body_end {
        return Err(WireError::TrailingBytes {
            what: WHAT,
            extra: body_end - at,
        });
    }
    let member = Member {
        host,
        port: port as u16,
        secure_port,
        udp_port,
        alive_time,
        unique_id: UniqueId(id),
        command,
        domain,
        payload,
    };
    Ok((member, total))
}

fn take_sized(
    buf: &Bytes,
    at: &mut usize,
    end: usize,
    what: &'static str,
) -> Result<Bytes, WireError> {
    if *at + 4 > end {
        return Err(truncated(what, 4, end - *at));
    }
    let n = read_i32(buf, *at);
    *at += 4;
    if n < 0 {
        return Err(WireError::BadLength {
            what,
            value: i64::from(n),
        });
    }
    let n = n as usize;
    if n > end - *at {
        return Err(truncated(what, n, end - *at));
    }
    let out = buf.slice(*at..*at + n);
    *at += n;
    Ok(out)
}

fn truncated(what: &'static str, needed: usize, available: usize) -> WireError {
    WireError::Truncated {
        what,
        needed,
        available,
    }
}

fn host_len(ip: &IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    }
}
