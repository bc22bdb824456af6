//! Group communication in the style of Apache Tribes.
//!
//! (Crate documentation is completed below as modules land.)

pub mod id;
pub mod member;
pub mod options;
pub mod wire;

pub use id::UniqueId;
pub use member::{Member, MemberKey};
pub use options::SendOptions;
