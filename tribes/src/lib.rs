//! Group communication in the style of Apache Tribes, wire-compatible with it.
//!
//! ```text
//!   application ── send ──►  GroupChannel  ◄── listeners (messages, membership)
//!                               │   ▲
//!                     interceptors (dispatch, static membership, ...)
//!                               ▼   │
//!                          coordinator
//!             ┌─────────────────┼──────────────────┐
//!          Sender             Receiver          (membership)
//!   pooled keep-alive     mio selector +
//!   connections, acks     bounded workers
//! ```
//!
//! * [`wire`]: pure codecs for frames, envelopes, member records and ACKs (byte-exact with
//!   Tribes).
//! * [`transport`]: the receiver and the pooled sender.
//! * [`interceptors`]: the stack and the interceptors that ship with it.
//! * [`channel`]: [`GroupChannel`] and its builder.
//!
//! ```no_run
//! use tribes::{GroupChannel, Levels, Member, SendOptions};
//! use tribes::interceptors::StaticMembershipInterceptor;
//!
//! let a_addr = "127.0.0.1:4000".parse()?;
//! let b_addr = "127.0.0.1:4001".parse()?;
//! let (a_id, b_id) = (tribes::UniqueId::random(), tribes::UniqueId::random());
//! let members = vec![Member::with_id(a_addr, a_id), Member::with_id(b_addr, b_id)];
//! let a = GroupChannel::builder().port(4000).unique_id(a_id)
//!     .interceptor(StaticMembershipInterceptor::new(members.clone())).build()?;
//! let b = GroupChannel::builder().port(4001).unique_id(b_id)
//!     .interceptor(StaticMembershipInterceptor::new(members)).build()?;
//! b.add_channel_listener(|m: &tribes::ChannelMessage| { println!("{:?}", m.payload); Ok(()) });
//! a.start(Levels::DEFAULT)?;
//! b.start(Levels::DEFAULT)?;
//! a.send(&a.members(), &b"hello"[..], SendOptions::USE_ACK)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod channel;
mod deadline;
pub mod error;
pub mod id;
mod idle;
pub mod interceptors;
pub mod member;
pub mod membership;
pub mod options;
pub mod transport;
pub mod wire;

pub use channel::{ChannelBuilder, ChannelListener, GroupChannel, Levels, MembershipListener};
pub use error::{ChannelError, Failure, FaultyMember, ProcessError, SendError};
pub use id::UniqueId;
pub use member::{Member, MemberKey};
pub use options::SendOptions;
pub use wire::ChannelMessage;

/// Whether the `n`th occurrence (from 1) of a failure that can repeat at will (a peer's bad
/// input, a full queue) is logged at warn level: the 1st, 2nd, 4th, 8th ..., so a flood
/// cannot flood the log (the others go to debug level; counters keep them all).
pub(crate) fn sparse(n: u64) -> bool {
    n.is_power_of_two()
}
