//! Membership: who is in the group.
//!
//! [`MembershipTable`] is the pure core (beacons in, events out, time as a parameter).

mod table;

pub use table::{MemberEvent, MembershipTable};
