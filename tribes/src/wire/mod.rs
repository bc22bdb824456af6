//! Pure Tribes wire codecs: frames, envelopes, member records and ACK commands.
//!
//! Nothing here touches a socket or a clock. Every decoder checks lengths against what is
//! available (and, for frames, a configured maximum) before it allocates, and returns a
//! [`WireError`] instead of panicking.
//!
//! ```text
//! frame     = "FLT2002" | i32 N | body (N bytes) | "TLF2003"
//! body      = ChannelData envelope (data direction) or a 3-byte ACK command (reply direction)
//! envelope  = i32 options | i64 timestamp | i32 16 | unique id | i32 M | member | i32 P | payload
//! member    = "TRIBES-B" 01 00 | i32 L | ... | "TRIBES-E" 01 00
//! ```

mod ack;
mod envelope;
mod error;
mod frame;
mod member;

pub use ack::{AckCommand, ACK_BODY, FAIL_ACK_BODY};
pub use envelope::ChannelMessage;
pub use error::WireError;
pub use frame::{
    encode_frame, encode_frame_into, FrameDecoder, DEFAULT_MAX_BODY_SIZE, END_MARKER,
    FRAME_OVERHEAD, START_MARKER,
};
pub use member::{
    decode_member, encode_member, encode_member_into, member_record_len, MEMBER_BEGIN, MEMBER_END,
};

/// Reads a big-endian i32 at `at`; callers check bounds first.
fn read_i32(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Reads a big-endian i64 at `at`; callers check bounds first.
fn read_i64(buf: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    i64::from_be_bytes(b)
}
