//! Web-session replication on top of `tribes` (work in progress).
//!
//! This first part is the protocol core, pure and socket-free: the session model with typed
//! attributes ([`session`]), the per-session delta log ([`delta`]), the DeltaManager message
//! vocabulary ([`message`]), the store of session copies with per-session versions and
//! expiry rules ([`store`]), and the state-transfer queue ([`transfer`]). The cluster object,
//! the DeltaManager driver on a `GroupChannel` and the tower layer come next.

pub mod delta;
pub mod error;
pub mod message;
pub mod session;
pub mod store;
pub mod transfer;

pub use delta::{Action, Delta, DeltaLog};
pub use error::SessionError;
pub use message::{SessionEvent, SessionMessage};
pub use session::{Session, SessionId};
pub use store::{Applied, SessionStore, StoreStats};
pub use transfer::{Offer, StateTransfer};
