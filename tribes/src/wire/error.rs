use std::fmt;

/// A byte sequence that is not valid Tribes wire data.
///
/// Decoders return it instead of panicking; no decoder state is usable afterwards for a
/// stream (the connection that produced it should be closed), and nothing beyond the checked
/// lengths was allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// A frame did not start with `FLT2002` at the expected offset.
    BadStartMarker,
    /// The bytes after a frame body were not `TLF2003`.
    BadEndMarker,
    /// A frame announced a negative body length.
    NegativeLength(i32),
    /// A frame announced a body larger than the configured maximum.
    TooLarge {
        /// Announced body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A structure ended before one of its fields.
    Truncated {
        /// Which structure and field.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A length field inside a structure was negative.
    BadLength {
        /// Which field.
        what: &'static str,
        /// The value found.
        value: i64,
    },
    /// A member record did not start with `TRIBES-B 01 00`.
    BadMemberBeginMarker,
    /// A member record did not end with `TRIBES-E 01 00` where its length says.
    BadMemberEndMarker,
    /// A member's host address was neither 4 (IPv4) nor 16 (IPv6) bytes.
    BadHostLength(i8),
    /// A member's port was outside 0..=65535.
    BadPort(i32),
    /// An envelope's unique id was not 16 bytes long.
    BadUniqueIdLength(i32),
    /// Bytes were left over after a structure that should fill its container.
    TrailingBytes {
        /// Which structure.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A reply frame's body was neither ACK nor FAIL_ACK.
    UnknownCommand,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadStartMarker => f.write_str("frame does not start with FLT2002"),
            Self::BadEndMarker => f.write_str("frame body is not followed by TLF2003"),
            Self::NegativeLength(n) => write!(f, "frame announces a negative body length {n}"),
            Self::TooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds the maximum of {max}")
            }
            Self::Truncated {
                what,
                needed,
                available,
            } => write!(f, "{what}: needs {needed} bytes, {available} available"),
            Self::BadLength { what, value } => write!(f, "{what}: invalid length {value}"),
            Self::BadMemberBeginMarker => f.write_str("member record does not start with TRIBES-B"),
            Self::BadMemberEndMarker => f.write_str("member record does not end with TRIBES-E"),
            Self::BadHostLength(n) => write!(f, "member host address of {n} bytes (want 4 or 16)"),
            Self::BadPort(p) => write!(f, "member port {p} out of range"),
            Self::BadUniqueIdLength(n) => write!(f, "unique id of {n} bytes (want 16)"),
            Self::TrailingBytes { what, extra } => write!(f, "{what}: {extra} trailing bytes"),
            Self::UnknownCommand => f.write_str("reply frame is neither ACK nor FAIL_ACK"),
        }
    }
}

impl std::error::Error for WireError {}
