//! Deadlines from durations that may be as large as the caller likes.
//!
//! `Instant + Duration` panics on overflow, and settings and arguments such as a send
//! timeout of `Duration::MAX` ("never give up") are legal values. A deadline that far
//! away is simply one that is never reached.

use std::time::{Duration, Instant};

/// About a century: further than anything here waits, near enough that no clock
/// representation overflows.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from + after`, or a point a century after `from` when that would overflow.
pub(crate) fn after(from: Instant, after: Duration) -> Instant {
    (from.checked_add(after))
        .or_else(|| from.checked_add(FAR))
        .unwrap_or(from)
}

/// `now + after` (see [`after`]).
pub(crate) fn from_now(after: Duration) -> Instant {
    self::after(Instant::now(), after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_give_a_far_deadline_instead_of_a_panic() {
        let t0 = Instant::now();
        assert_eq!(
            after(t0, Duration::from_secs(3)),
            t0 + Duration::from_secs(3)
        );
        assert_eq!(after(t0, Duration::MAX), t0 + FAR);
        assert!(from_now(Duration::MAX) > t0 + Duration::from_secs(3600 * 24 * 365));
    }
}
