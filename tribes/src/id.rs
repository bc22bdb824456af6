//! Unique ids shaped like version-4 UUIDs, and the small RNG behind them.

use std::cell::Cell;
use std::fmt;
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// A 16-byte id shaped like a version-4 UUID (byte 6 high nibble `4`, byte 8 top bits `10`).
///
/// Message ids ([`UniqueId::random`]) come from a fast non-cryptographic generator, as in Tribes
/// (`USE_SECURE_RANDOM_FOR_UUID` is false there). Member ids use [`UniqueId::secure`], which reads
/// the operating system's random source.
///
/// ```
/// use tribes::UniqueId;
/// let id = UniqueId::random();
/// assert_eq!(id.as_bytes()[6] >> 4, 4);
/// assert_eq!(id.as_bytes()[8] >> 6, 0b10);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UniqueId(pub [u8; 16]);

impl UniqueId {
    /// A fresh id from the fast per-thread generator.
    pub fn random() -> Self {
        let hi = next_u64();
        let lo = next_u64();
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_be_bytes());
        b[8..].copy_from_slice(&lo.to_be_bytes());
        Self::shape_v4(b)
    }

    /// A fresh id from the OS random source (falls back to the fast generator if it cannot be
    /// read, which on Linux does not happen in practice).
    pub fn secure() -> Self {
        let mut b = [0u8; 16];
        match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
            Ok(()) => Self::shape_v4(b),
            Err(_) => Self::random(),
        }
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    fn shape_v4(mut b: [u8; 16]) -> Self {
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Self(b)
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UniqueId({self})")
    }
}

/// Prints the canonical 8-4-4-4-12 hex form.
impl fmt::Display for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

/// SplitMix64 step on a per-thread state: cheap, and good enough for message ids, which only
/// need to be distinct, not unpredictable.
pub(crate) fn next_u64() -> u64 {
    RNG.with(|s| {
        let z0 = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(z0);
        let mut z = z0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_ne_bytes(b);
    }
    // No OS randomness: mix the clock with this thread's stack address-free identity.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let tid = format!("{:?}", std::thread::current().id());
    tid.bytes()
        .fold(nanos, |acc, c| acc.rotate_left(5) ^ u64::from(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_v4_shaped_and_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let id = UniqueId::random();
            assert_eq!(id.0[6] & 0xf0, 0x40);
            assert_eq!(id.0[8] & 0xc0, 0x80);
            assert!(seen.insert(id));
        }
        let s = UniqueId::secure();
        assert_eq!(s.0[6] & 0xf0, 0x40);
    }

    #[test]
    fn displays_as_uuid() {
        let id = UniqueId([
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05,
            0x06, 0x07,
        ]);
        assert_eq!(id.to_string(), "12345678-9abc-4def-8001-020304050607");
    }
}
