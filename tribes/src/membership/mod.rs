//! Membership: who is in the group.
//!
//! [`MembershipTable`] is the pure core (beacons in, events out, time as a parameter);
//! [`McastConfig`] configures the multicast beacon service a channel runs at the MBR levels;
//! [`DnsMembershipInterceptor`] finds members by resolving a DNS name.

mod dns;
mod multicast;
mod table;

pub use dns::{dns_member_id, DnsConfig, DnsMembershipInterceptor, DnsTable, Resolver};
pub use multicast::McastConfig;
pub(crate) use multicast::{EventSink, McastService};
pub use table::{MemberEvent, MembershipTable};
