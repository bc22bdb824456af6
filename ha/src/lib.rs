//! Web-session replication on top of `tribes`: sessions that survive the loss of a node
//! behind a load balancer, sticky or not.
//!
//! The protocol core is pure and socket-free: the session model with typed attributes
//! ([`session`]), the per-session delta log ([`delta`]), the DeltaManager message vocabulary
//! ([`message`]), the store of session copies with per-session versions and expiry rules
//! ([`store`]), the state-transfer queue ([`transfer`]) and the counters ([`stats`]). On top:
//! the [`Cluster`] (a `GroupChannel` routing session messages by context, Tribes'
//! `SimpleTcpCluster` and `ClusterSessionListener`), the [`DeltaManager`] (all-to-all delta
//! replication, state transfer on join, route rebinding, fetching unknown sessions from the
//! cluster, repairing copies a dying node left behind), and with the `axum` feature the
//! tower layer that replicates at request end (module `layer`).
//!
//! ```no_run
//! use ha::{Cluster, DeltaManager, ManagerConfig};
//! use tribes::membership::McastConfig;
//! // Members find each other by multicast beacons (Tribes' membership); without multicast,
//! // static or DNS membership: see the README's axum node.
//! let channel = tribes::GroupChannel::builder().port(4000).multicast(McastConfig::default());
//! let cluster = Cluster::with_defaults(channel)?;
//! let manager = DeltaManager::new("/", ManagerConfig { sync: true, ..Default::default() });
//! cluster.register(&manager)?;
//! cluster.start()?;
//! manager.start(&cluster); // pulls the sessions of the oldest member
//! let id = manager.create_session().unwrap();
//! manager.with_session(&id, |s| s.insert("user", &"ada"));
//! manager.request_completed(&id)?; // replicated to every member before this returns
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cluster;
pub mod delta;
pub mod error;
#[cfg(feature = "axum")]
pub mod layer;
pub mod manager;
pub mod message;
pub mod session;
pub mod stats;
pub mod store;
#[cfg(test)]
mod testing;
pub mod transfer;

pub use cluster::{Cluster, ClusterListener, ClusterMessage};
pub use delta::{Action, Delta, DeltaLog};
pub use error::SessionError;
pub use manager::{AttributeFilter, DeltaManager, ManagerConfig, VersionReached};
pub use message::{SessionEvent, SessionMessage};
pub use session::{Session, SessionId};
pub use stats::{EventCounts, ManagerStats};
pub use store::{Applied, SessionStore, StoreStats};
pub use transfer::{Offer, StateTransfer};

/// `from + after`, or a century after `from` when that would overflow: settings and
/// arguments may be as large as `Duration::MAX` ("wait for good"), and `Instant + Duration`
/// panics on overflow. (The same rule as `tribes`' own, which is private to it.)
pub(crate) fn deadline(from: std::time::Instant, after: std::time::Duration) -> std::time::Instant {
    const FAR: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    from.checked_add(after)
        .or_else(|| from.checked_add(FAR))
        .unwrap_or(from)
}

/// Whether the `n`th occurrence (from 1) of a failure that can repeat at will (a member
/// down, a forged message, a flood of new sessions) is logged at warn level: the 1st, 2nd,
/// 4th, 8th ... (the others go to debug level; counters keep them all).
pub(crate) fn sparse(n: u64) -> bool {
    n.is_power_of_two()
}

/// Wall clock in ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
