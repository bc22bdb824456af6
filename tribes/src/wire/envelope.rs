//! The ChannelData envelope (§2): options, timestamp, unique id, sender, payload.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{END_MARKER, FRAME_OVERHEAD, START_MARKER};
use super::member::{decode_member, encode_member_into, member_record_len};
use super::{read_i32, read_i64, WireError};
use crate::id::UniqueId;
use crate::member::Member;
use crate::options::SendOptions;

/// One message as it travels between channels (Tribes `ChannelData`).
///
/// ```
/// use bytes::Bytes;
/// use tribes::{Member, SendOptions, UniqueId, wire::ChannelMessage};
/// let me = Member::new("127.0.0.1:4000".parse().unwrap());
/// let msg = ChannelMessage {
///     options: SendOptions::BYTE_MESSAGE,
///     timestamp: 1_700_000_000_000,
///     unique_id: UniqueId::random(),
///     sender: me,
///     payload: Bytes::from_static(b"hi"),
/// };
/// let body = msg.encode();
/// assert_eq!(body.len(), 24 + 16 + 77 + 2);
/// assert_eq!(ChannelMessage::decode(&body).unwrap(), msg);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelMessage {
    /// Send options plus interceptor-private bits.
    pub options: SendOptions,
    /// Sender wall clock at send time, ms since the Unix epoch.
    pub timestamp: i64,
    /// Message identity.
    pub unique_id: UniqueId,
    /// The sending member.
    pub sender: Member,
    /// Application (or interceptor) bytes.
    pub payload: Bytes,
}

impl ChannelMessage {
    /// A fresh message from `sender` carrying a fixed control payload (notices, probes,
    /// pings), with a new id and the current wall-clock time.
    pub fn control(sender: Member, payload: &'static [u8], options: SendOptions) -> Self {
        Self {
            options,
            timestamp: crate::channel::now_millis(),
            unique_id: UniqueId::random(),
            sender,
            payload: Bytes::from_static(payload),
        }
    }

    /// Encoded envelope size.
    pub fn encoded_len(&self) -> usize {
        24 + 16 + member_record_len(&self.sender) + self.payload.len()
    }

    /// Encodes the envelope (the body of a data frame).
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }

    /// Appends the envelope to `buf`.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        buf.put_u32(self.options.bits());
        buf.put_i64(self.timestamp);
        buf.put_i32(16);
        buf.put_slice(&self.unique_id.0);
        buf.put_i32(member_record_len(&self.sender) as i32);
        encode_member_into(buf, &self.sender);
        buf.put_i32(self.payload.len() as i32);
        buf.put_slice(&self.payload);
    }

    /// Encodes the envelope already wrapped in a frame, with one allocation.
    pub fn encode_frame(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len() + FRAME_OVERHEAD);
        self.encode_frame_into(&mut buf);
        buf.freeze()
    }

    /// Appends the framed envelope to `buf`.
    pub fn encode_frame_into(&self, buf: &mut BytesMut) {
        let len = self.encoded_len();
        buf.reserve(len + FRAME_OVERHEAD);
        buf.put_slice(START_MARKER);
        buf.put_i32(len as i32);
        self.encode_into(buf);
        buf.put_slice(END_MARKER);
    }

    /// Encodes the frame up to and including the payload length, for sending the payload as
    /// its own buffer (no copy); the frame is `head + payload + END_MARKER`.
    pub fn encode_frame_head(&self) -> Bytes {
        let len = self.encoded_len();
        let head_len = len - self.payload.len() + 11;
        let mut buf = BytesMut::with_capacity(head_len);
        buf.put_slice(START_MARKER);
        buf.put_i32(len as i32);
        buf.put_u32(self.options.bits());
        buf.put_i64(self.timestamp);
        buf.put_i32(16);
        buf.put_slice(&self.unique_id.0);
        buf.put_i32(member_record_len(&self.sender) as i32);
        encode_member_into(&mut buf, &self.sender);
        buf.put_i32(self.payload.len() as i32);
        debug_assert_eq!(buf.len(), head_len);
        buf.freeze()
    }

    /// Decodes an envelope; the payload and member fields are zero-copy slices of `body`.
    pub fn decode(body: &Bytes) -> Result<Self, WireError> {
        const WHAT: &str = "envelope";
        need(body, 0, 16, WHAT)?;
        let options = SendOptions::from_bits(read_i32(body, 0) as u32);
        let timestamp = read_i64(body, 4);
        let u = read_i32(body, 12);
        if u != 16 {
            return Err(WireError::BadUniqueIdLength(u));
        }
        need(body, 16, 16 + 4, "envelope unique id")?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&body[16..32]);
        let m = read_i32(body, 32);
        if m < 0 {
            return Err(WireError::BadLength {
                what: "envelope member length",
                value: i64::from(m),
            });
        }
        let m = m as usize;
        need(body, 36, m + 4, "envelope member")?;
        let (sender, used) = decode_member(&body.slice(36..36 + m))?;
        if used != m {
            return Err(WireError::TrailingBytes {
                what: "envelope member",
                extra: m - used,
            });
        }
        let at = 36 + m;
        let p = read_i32(body, at);
        if p < 0 {
            return Err(WireError::BadLength {
                what: "envelope payload length",
                value: i64::from(p),
            });
        }
        let p = p as usize;
        need(body, at + 4, p, "envelope payload")?;
        let end = at + 4 + p;
        if end != body.len() {
            return Err(WireError::TrailingBytes {
                what: WHAT,
                extra: body.len() - end,
            });
        }
        Ok(Self {
            options,
            timestamp,
            unique_id: UniqueId(id),
            sender,
            payload: body.slice(at + 4..end),
        })
    }
}

fn need(buf: &[u8], at: usize, n: usize, what: &'static str) -> Result<(), WireError> {
    let available = buf.len().saturating_sub(at);
    if available < n {
        Err(WireError::Truncated {
            what,
            needed: n,
            available,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_frame_equals_contiguous_frame() {
        let msg = ChannelMessage {
            options: SendOptions::from_bits(11),
            timestamp: 42,
            unique_id: UniqueId::random(),
            sender: Member::new("127.0.0.1:4000".parse().unwrap()),
            payload: Bytes::from(vec![9u8; 10_000]),
        };
        let mut split = msg.encode_frame_head().to_vec();
        split.extend_from_slice(&msg.payload);
        split.extend_from_slice(END_MARKER);
        assert_eq!(split, msg.encode_frame().to_vec());
    }
}
