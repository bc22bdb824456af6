//! Membership: who is in the group.
//!
//! [`MembershipTable`] is the pure core (beacons in, events out, time as a parameter);
//! [`McastConfig`] configures the multicast beacon service a channel runs at the MBR levels.

mod multicast;
mod table;

pub use multicast::McastConfig;
pub(crate) use multicast::{EventSink, McastService};
pub use table::{MemberEvent, MembershipTable};
