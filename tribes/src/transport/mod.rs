//! TCP transport: the mio receiver with its worker pool, and the pooled sender with acks.
//!
//! ```text
//!   send ──► Sender ── per member: pool of keep-alive connections ──► Receiver (peer)
//!              ▲  acks matched in order (pipelined)                      │ selector thread
//!              └──────────────────── ACK / FAIL_ACK ◄── worker pool ◄────┘ (reads, frames)
//! ```

mod config;
mod receiver;
mod sender;

pub use config::{ReceiverConfig, SenderConfig};
pub use receiver::{MessageHandler, Receiver, ReceiverStats};
pub use sender::{Batch, Frame, Sender, SenderStats};
