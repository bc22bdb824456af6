use std::fmt;

/// Start/stop levels of a channel (Tribes `Channel.SND_RX_SEQ` ...).
///
/// ```
/// use tribes::Levels;
/// assert_eq!(Levels::DEFAULT.bits(), 15);
/// assert!(Levels::DEFAULT.contains(Levels::SND_RX));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Levels(u32);

impl Levels {
    /// Receiver (binds the server socket).
    pub const SND_RX: Self = Self(1);
    /// Sender.
    pub const SND_TX: Self = Self(2);
    /// Membership listening.
    pub const MBR_RX: Self = Self(4);
    /// Membership broadcasting.
    pub const MBR_TX: Self = Self(8);
    /// Everything (Tribes `DEFAULT`, 15).
    pub const DEFAULT: Self = Self(15);
    /// Same as `DEFAULT`.
    pub const ALL: Self = Self(15);
    /// Receiver and sender only: what static membership needs (Tribes start option 3).
    pub const TRANSPORT: Self = Self(3);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Levels from raw bits (masked to the four defined ones).
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits & 15)
    }
    /// True when all of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// True when any level is shared.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
    /// Levels in both.
    #[must_use]
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
    /// Levels in either.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    /// Levels in `self` but not `other`.
    #[must_use]
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
    /// True when no level is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for Levels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::SND_RX, "SND_RX"),
            (Self::SND_TX, "SND_TX"),
            (Self::MBR_RX, "MBR_RX"),
            (Self::MBR_TX, "MBR_TX"),
        ];
        let parts: Vec<_> = names
            .iter()
            .filter(|(l, _)| self.contains(*l))
            .map(|(_, n)| *n)
            .collect();
        write!(
            f,
            "{}",
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join("|")
            }
        )
    }
}
