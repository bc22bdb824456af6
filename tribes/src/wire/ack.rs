//! ACK commands: 3-byte bodies sent back on a data connection (§5.1).

use super::WireError;

/// Body of a positive ACK: `06 02 03`.
pub const ACK_BODY: [u8; 3] = [0x06, 0x02, 0x03];
/// Body of a FAIL_ACK (the receiver's listener failed): `0B 00 05`.
pub const FAIL_ACK_BODY: [u8; 3] = [0x0B, 0x00, 0x05];

/// A reply written by the receiver for a message that asked for an ACK.
///
/// ```
/// use tribes::wire::AckCommand;
/// let frame = AckCommand::Ack.frame();
/// assert_eq!(frame.len(), 21);
/// assert_eq!(AckCommand::decode(&frame[11..14]).unwrap(), AckCommand::Ack);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCommand {
    /// The message was received (and processed, for SYNCHRONIZED_ACK).
    Ack,
    /// The receiver's processing failed.
    FailAck,
}

impl AckCommand {
    /// The 3-byte body.
    pub const fn body(self) -> [u8; 3] {
        match self {
            Self::Ack => ACK_BODY,
            Self::FailAck => FAIL_ACK_BODY,
        }
    }

    /// The full 21-byte frame, as written on the wire.
    pub const fn frame(self) -> [u8; 21] {
        let body = self.body();
        [
            b'F', b'L', b'T', b'2', b'0', b'0', b'2', 0, 0, 0, 3, body[0], body[1], body[2], b'T',
            b'L', b'F', b'2', b'0', b'0', b'3',
        ]
    }

    /// Decodes a frame body into a command.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        if body == ACK_BODY {
            Ok(Self::Ack)
        } else if body == FAIL_ACK_BODY {
            Ok(Self::FailAck)
        } else {
            Err(WireError::UnknownCommand)
        }
    }
}
