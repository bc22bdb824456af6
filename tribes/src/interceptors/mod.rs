//! The interceptor stack: an ordered chain between the application and the transport.
//!
//! ```text
//!   application (listeners)                       ▲ received, member_added/disappeared
//!   ─────────────── GroupChannel ───────────────  │
//!   interceptor 0   (first added)                 │
//!   interceptor 1                                 │
//!   ...                                           │
//!   ─────────────── coordinator ────────────────  │
//!   sender / receiver / membership       send, heartbeat ▼
//! ```
//!
//! Writing one is like writing a tower layer: implement the methods you care about and call
//! the cursor to pass the call on. Every method has a pass-through default.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use tribes::interceptors::{Down, Interceptor, Outgoing};
//! use tribes::error::SendError;
//!
//! /// Counts messages going down.
//! #[derive(Default)]
//! struct Counter(AtomicU64);
//!
//! impl Interceptor for Counter {
//!     fn name(&self) -> &'static str {
//!         "counter"
//!     }
//!     fn send(&self, out: Outgoing, next: Down<'_>) -> Result<(), SendError> {
//!         self.0.fetch_add(1, Ordering::Relaxed);
//!         next.send(out)
//!     }
//! }
//! ```
//!
//! Rules: never hold a lock while calling a cursor; drop a message by returning `Ok(())`
//! without calling the cursor; hold it by storing it and re-inject later through the
//! [`StackHandle`] given to [`Interceptor::start`]. An interceptor with a non-empty
//! [`Interceptor::option_flag`] only sees messages carrying all of its bits (Tribes
//! `okToProcess`); the stack applies that filter, so the interceptor never checks it.

mod dispatch;
mod failure_detector;
mod stack;
mod static_membership;
mod tcp_ping;

use std::sync::Arc;

pub use dispatch::{DispatchConfig, MessageDispatchInterceptor};
pub use failure_detector::{FailureDetectorConfig, TcpFailureDetector, PROBE_PAYLOAD};
pub(crate) use stack::{stack_entry, Bottom, Stack, Top};
pub use stack::{Down, StackHandle, Up};
pub use static_membership::{StaticMembershipInterceptor, GOODBYE_PAYLOAD, HELLO_PAYLOAD};
pub use tcp_ping::{TcpPingInterceptor, PING_PAYLOAD};

use crate::channel::Levels;
use crate::error::{ChannelError, FaultyMember, ProcessError, SendError};
use crate::id::UniqueId;
use crate::member::Member;
use crate::options::SendOptions;
use crate::wire::ChannelMessage;

/// A message on its way down, with its destinations and optional completion callback.
#[derive(Clone)]
pub struct Outgoing {
    /// Members to send to.
    pub destinations: Vec<Member>,
    /// The envelope.
    pub message: ChannelMessage,
    /// Told how the send ended: by the dispatch thread for an asynchronous send, by the
    /// transport for one made on the caller's thread. An interceptor that drops a message
    /// (returns `Ok` without passing it on) leaves it untold.
    pub handler: Option<Arc<dyn ErrorHandler>>,
}

/// Callback for the outcome of a send (Tribes `ErrorHandler`, which only asynchronous sends
/// have). A send made on the caller's thread also returns the outcome to the caller.
pub trait ErrorHandler: Send + Sync {
    /// Every destination got the message.
    fn handle_completion(&self, id: UniqueId);
    /// At least one destination failed.
    fn handle_error(&self, error: SendError, id: UniqueId);
}

/// One element of the stack. All methods default to passing the call on.
pub trait Interceptor: Send + Sync + 'static {
    /// Name for logs and errors.
    fn name(&self) -> &'static str;

    /// Only messages carrying all these bits reach [`Interceptor::send`] and
    /// [`Interceptor::received`]; empty (the default) means every message.
    fn option_flag(&self) -> SendOptions {
        SendOptions::empty()
    }

    /// A message going down.
    fn send(&self, out: Outgoing, next: Down<'_>) -> Result<(), SendError> {
        next.send(out)
    }

    /// A message coming up. An `Err` becomes FAIL_ACK for sync-ACK messages.
    fn received(&self, msg: ChannelMessage, next: Up<'_>) -> Result<(), ProcessError> {
        next.received(msg)
    }

    /// A member joined (coming up).
    fn member_added(&self, member: Member, next: Up<'_>) {
        next.member_added(member)
    }

    /// A member left (coming up).
    fn member_disappeared(&self, member: Member, next: Up<'_>) {
        next.member_disappeared(member)
    }

    /// Members that a batch of messages written by an interceptor above this one (the
    /// dispatch threads write asynchronous messages in batches) failed to reach, reported
    /// after the batch: this interceptor's [`Interceptor::send`] saw those messages only
    /// queued. Every interceptor below the batch's writer is told, whatever its
    /// [`Interceptor::option_flag`], in stack order; each member comes once per batch
    /// (`failure` is its first failure there). Default: nothing (there is nothing to pass
    /// on). A failure detector checks these members.
    fn sends_failed(&self, failed: &[FaultyMember]) {
        let _ = failed;
    }

    /// The periodic heartbeat (going down).
    fn heartbeat(&self, next: Down<'_>) {
        next.heartbeat()
    }

    /// Called after the transport levels in `levels` started, bottom interceptor first.
    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        let _ = (levels, handle);
        Ok(())
    }

    /// Called before the levels in `levels` stop, top interceptor first. Must join any
    /// thread that `start` spawned.
    fn stop(&self, levels: Levels, handle: &StackHandle) {
        let _ = (levels, handle);
    }
}
