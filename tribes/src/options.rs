//! Send options: the Tribes option bits carried in every envelope (§6 of the reference).

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Not};
use std::str::FromStr;

/// A set of Tribes send-option bits.
///
/// The values are the exact Tribes constants, so an envelope written by Java Tribes decodes to
/// the same flags. Bits above [`SendOptions::MULTICAST`] are free for interceptors (the Tribes
/// "other" space), e.g. compression uses `0x0100`.
///
/// ```
/// use tribes::SendOptions;
/// let opts = SendOptions::USE_ACK | SendOptions::SYNCHRONIZED_ACK;
/// assert_eq!(opts.bits(), 6);
/// assert!(opts.contains(SendOptions::USE_ACK));
/// assert_eq!("use_ack,sync".parse::<SendOptions>().unwrap(), opts);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SendOptions(u32);

impl SendOptions {
    /// Payload is raw bytes (`SEND_OPTIONS_BYTE_MESSAGE`, 0x0001). Set by the channel itself.
    pub const BYTE_MESSAGE: Self = Self(0x0001);
    /// Wait for an ACK from each destination (`SEND_OPTIONS_USE_ACK`, 0x0002).
    pub const USE_ACK: Self = Self(0x0002);
    /// With `USE_ACK`: ACK only after the receiver processed the message, FAIL_ACK when its
    /// listener failed (`SEND_OPTIONS_SYNCHRONIZED_ACK`, 0x0004).
    pub const SYNCHRONIZED_ACK: Self = Self(0x0004);
    /// Hand the message to the dispatch interceptor and return at once
    /// (`SEND_OPTIONS_ASYNCHRONOUS`, 0x0008).
    pub const ASYNCHRONOUS: Self = Self(0x0008);
    /// Reserved by Tribes, no effect (`SEND_OPTIONS_SECURE`, 0x0010).
    pub const SECURE: Self = Self(0x0010);
    /// Send as a UDP datagram (`SEND_OPTIONS_UDP`, 0x0020). Not supported by this transport yet.
    pub const UDP: Self = Self(0x0020);
    /// Send through the membership service's multicast socket (`SEND_OPTIONS_MULTICAST`, 0x0040).
    pub const MULTICAST: Self = Self(0x0040);
    /// A local hint, never sent: nobody waits for this message to arrive soon, so the
    /// dispatch interceptor may hold it for a few yields to write it together with messages
    /// about to be queued ([`DispatchConfig::gather_yields`](crate::interceptors::DispatchConfig::gather_yields)).
    /// The channel clears it before the envelope is written. Not a Tribes bit; the highest
    /// bit but one, far from the low "other" bits Tribes' interceptors use.
    pub const LAZY: Self = Self(0x4000_0000);
    /// Tribes' `SEND_OPTIONS_DEFAULT`: `USE_ACK`.
    pub const DEFAULT: Self = Self::USE_ACK;

    const NAMED: [(&'static str, Self); 8] = [
        ("lazy", Self::LAZY),
        ("multicast", Self::MULTICAST),
        ("udp", Self::UDP),
        ("secure", Self::SECURE),
        ("asynchronous", Self::ASYNCHRONOUS),
        ("synchronized_ack", Self::SYNCHRONIZED_ACK),
        ("use_ack", Self::USE_ACK),
        ("byte_message", Self::BYTE_MESSAGE),
    ];

    /// No bits set.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Options from raw bits, keeping unknown (interceptor) bits.
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The raw bits, as they travel in the envelope.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True when every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `self` with the bits of `other` set.
    #[must_use]
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// `self` with the bits of `other` cleared.
    #[must_use]
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// True when the receiver must write an ACK for this message.
    pub const fn wants_ack(self) -> bool {
        self.contains(Self::USE_ACK)
    }

    /// True when the ACK is written after processing (and FAIL_ACK is possible).
    pub const fn wants_ack_after_processing(self) -> bool {
        self.contains(Self::USE_ACK.with(Self::SYNCHRONIZED_ACK))
    }

    /// Tribes' `okToProcess`: an interceptor with option flag `flag` handles a message with
    /// these options when the flag is empty or all of its bits are set.
    pub const fn matches_flag(self, flag: Self) -> bool {
        flag.0 == 0 || self.contains(flag)
    }
}

impl BitOr for SendOptions {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for SendOptions {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for SendOptions {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl Not for SendOptions {
    type Output = Self;
    fn not(self) -> Self {
        Self(!self.0)
    }
}

impl fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SendOptions({self})")
    }
}

/// Names from the highest bit down, like Tribes; leftover bits in hex.
impl fmt::Display for SendOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        let mut first = true;
        let named = Self::NAMED.iter().fold(0, |m, (_, flag)| m | flag.0);
        if rest & !named != 0 {
            write!(f, "{:#x}", rest & !named)?;
            rest &= named;
            first = false;
        }
        for (name, flag) in Self::NAMED {
            if rest & flag.0 != 0 {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("0")?;
        }
        Ok(())
    }
}

/// Error from parsing a [`SendOptions`] string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseOptionsError {
    /// The part of the input that is neither a number nor a known option name.
    pub unknown: String,
}

impl fmt::Display for ParseOptionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown send option {:?} (expected an integer or names such as use_ack, sync, async, byte)",
            self.unknown
        )
    }
}

impl std::error::Error for ParseOptionsError {}

/// Parses Tribes option strings: an integer, or a comma-separated list of names
/// (`byte_message`/`byte`, `use_ack`, `synchronized_ack`/`sync`, `asynchronous`/`async`,
/// `secure`, `udp`, `multicast`), OR-ed together.
impl FromStr for SendOptions {
    type Err = ParseOptionsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(n) = s.parse::<u32>() {
            return Ok(Self(n));
        }
        let mut out = Self::empty();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let flag = match part.to_ascii_lowercase().as_str() {
                "byte_message" | "byte" => Self::BYTE_MESSAGE,
                "use_ack" => Self::USE_ACK,
                "synchronized_ack" | "sync" => Self::SYNCHRONIZED_ACK,
                "asynchronous" | "async" => Self::ASYNCHRONOUS,
                "secure" => Self::SECURE,
                "udp" => Self::UDP,
                "multicast" => Self::MULTICAST,
                "lazy" => Self::LAZY,
                _ => {
                    return Err(ParseOptionsError {
                        unknown: part.to_string(),
                    })
                }
            };
            out |= flag;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_match_tribes_constants() {
        assert_eq!(SendOptions::BYTE_MESSAGE.bits(), 1);
        assert_eq!(SendOptions::USE_ACK.bits(), 2);
        assert_eq!(SendOptions::SYNCHRONIZED_ACK.bits(), 4);
        assert_eq!(SendOptions::ASYNCHRONOUS.bits(), 8);
        assert_eq!(SendOptions::SECURE.bits(), 16);
        assert_eq!(SendOptions::UDP.bits(), 32);
        assert_eq!(SendOptions::MULTICAST.bits(), 64);
        assert_eq!(SendOptions::DEFAULT, SendOptions::USE_ACK);
    }

    #[test]
    fn parses_names_and_numbers() {
        assert_eq!("8".parse::<SendOptions>().unwrap().bits(), 8);
        assert_eq!("async".parse::<SendOptions>().unwrap().bits(), 8);
        assert_eq!(
            "use_ack, synchronized_ack"
                .parse::<SendOptions>()
                .unwrap()
                .bits(),
            6
        );
        assert!("use_ack,bogus".parse::<SendOptions>().is_err());
    }

    #[test]
    fn displays_from_highest_bit() {
        assert_eq!(
            SendOptions::from_bits(7).to_string(),
            "synchronized_ack,use_ack,byte_message"
        );
        assert_eq!(
            SendOptions::from_bits(0x109).to_string(),
            "0x100,asynchronous,byte_message"
        );
        assert_eq!(SendOptions::empty().to_string(), "0");
        let lazy = SendOptions::LAZY | SendOptions::ASYNCHRONOUS | SendOptions::from_bits(0x100);
        assert_eq!(lazy.to_string(), "0x100,lazy,asynchronous");
        assert_eq!(
            "lazy,asynchronous".parse::<SendOptions>().unwrap(),
            SendOptions::LAZY | SendOptions::ASYNCHRONOUS
        );
    }

    #[test]
    fn flag_filter_is_all_bits() {
        let flag = SendOptions::from_bits(0x0108);
        assert!(SendOptions::from_bits(0x010a).matches_flag(flag));
        assert!(!SendOptions::from_bits(0x0008).matches_flag(flag));
        assert!(SendOptions::from_bits(0).matches_flag(SendOptions::empty()));
    }
}
