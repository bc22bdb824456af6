//! Web-session replication on top of `tribes` (work in progress).
//!
//! This first part is the protocol core, pure and socket-free: the session model with typed
//! attributes ([`session`]), the per-session delta log ([`delta`]), the DeltaManager message
//! vocabulary ([`message`]), the store of session copies with per-session versions and
//! expiry rules ([`store`]), and the state-transfer queue ([`transfer`]); on top of them the
//! [`Cluster`] (a `GroupChannel` routing session messages by context) and the
//! [`DeltaManager`]. The tower layer, route rebinding and the cluster demo come next.

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
pub mod transfer;

pub use cluster::Cluster;
pub use delta::{Action, Delta, DeltaLog};
pub use error::SessionError;
pub use manager::{AttributeFilter, DeltaManager, ManagerConfig};
pub use message::{SessionEvent, SessionMessage};
pub use session::{Session, SessionId};
pub use stats::{EventCounts, ManagerStats};
pub use store::{Applied, SessionStore, StoreStats};
pub use transfer::{Offer, StateTransfer};

/// Wall clock in ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
