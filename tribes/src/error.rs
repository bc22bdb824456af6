//! Error types of the channel and transport.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::member::Member;

/// Why one destination of a send failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// No TCP connection could be made.
    Connect {
        /// The OS error kind.
        kind: io::ErrorKind,
        /// The OS error text.
        detail: String,
    },
    /// Writing the message or reading its ACK failed.
    Io {
        /// The OS error kind.
        kind: io::ErrorKind,
        /// The OS error text.
        detail: String,
    },
    /// No ACK arrived before the send deadline (`SenderConfig::timeout`).
    Timeout,
    /// The receiver answered FAIL_ACK: its listener failed to process the message
    /// (Tribes `RemoteProcessException`). The message was not resent.
    RemoteProcess,
    /// The peer sent bytes that are not a valid reply frame; the connection was dropped.
    Protocol(String),
    /// The member left the group after the message was queued for an asynchronous send,
    /// so it was not sent there (a member found frozen would otherwise hold the dispatch
    /// thread for the send timeout once more).
    Left,
    /// The sender is stopped.
    Stopped,
}

impl Failure {
    pub(crate) fn connect(e: &io::Error) -> Self {
        Self::Connect {
            kind: e.kind(),
            detail: e.to_string(),
        }
    }

    pub(crate) fn io(e: &io::Error) -> Self {
        Self::Io {
            kind: e.kind(),
            detail: e.to_string(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { detail, .. } => write!(f, "connect failed: {detail}"),
            Self::Io { detail, .. } => write!(f, "i/o error: {detail}"),
            Self::Timeout => f.write_str("no ACK before the send timeout"),
            Self::RemoteProcess => f.write_str("receiver failed to process the message (FAIL_ACK)"),
            Self::Protocol(d) => write!(f, "protocol error: {d}"),
            Self::Left => f.write_str("the member left before the message went out"),
            Self::Stopped => f.write_str("sender stopped"),
        }
    }
}

/// One destination that did not get a message, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultyMember {
    /// The member the message was for.
    pub member: Member,
    /// What went wrong.
    pub failure: Failure,
}

impl fmt::Display for FaultyMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.member, self.failure)
    }
}

/// A send that did not reach every destination.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// Some destinations failed; the others got the message.
    Faulty(Vec<FaultyMember>),
    /// The asynchronous dispatch queue is over its byte budget; nothing was queued.
    QueueFull {
        /// Bytes queued when the message was refused.
        queued: usize,
        /// The configured budget.
        max: usize,
    },
    /// The destination list was empty.
    NoDestinations,
    /// The channel (or its sending level) is not started.
    NotStarted,
    /// The message could not be serialized; nothing was sent.
    Serialize(String),
    /// The message is larger than the configured maximum frame body.
    TooLarge {
        /// Encoded envelope size.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
}

impl SendError {
    /// The members that failed (empty for errors that concern the whole send).
    pub fn faulty_members(&self) -> &[FaultyMember] {
        match self {
            Self::Faulty(v) => v,
            _ => &[],
        }
    }

    /// True when the send failed only for members that left the group after it was
    /// queued ([`Failure::Left`]): every current member got it.
    ///
    /// ```
    /// use tribes::{Failure, FaultyMember, Member, SendError};
    /// let gone = FaultyMember {
    ///     member: Member::new("127.0.0.1:4001".parse().unwrap()),
    ///     failure: Failure::Left,
    /// };
    /// assert!(SendError::Faulty(vec![gone]).missed_only_departed());
    /// assert!(!SendError::NotStarted.missed_only_departed());
    /// ```
    pub fn missed_only_departed(&self) -> bool {
        let faulty = self.faulty_members();
        !faulty.is_empty() && faulty.iter().all(|f| f.failure == Failure::Left)
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Faulty(v) => {
                write!(f, "send failed for {} member(s): ", v.len())?;
                for (i, m) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{m}")?;
                }
                Ok(())
            }
            Self::QueueFull { queued, max } => write!(
                f,
                "async dispatch queue full ({queued} of {max} bytes queued); message refused"
            ),
            Self::NoDestinations => f.write_str("no destination members given"),
            Self::NotStarted => f.write_str("channel not started for sending"),
            Self::Serialize(d) => write!(f, "cannot serialize message: {d}"),
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the maximum of {max}")
            }
        }
    }
}

impl std::error::Error for SendError {}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field at fault.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// An error starting or stopping a channel.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChannelError {
    /// No port in the auto-bind range could be bound.
    Bind {
        /// First address tried.
        first: SocketAddr,
        /// Number of ports tried.
        tried: u16,
        /// The last OS error.
        source: io::Error,
    },
    /// Another OS error while starting.
    Io(io::Error),
    /// The configuration is invalid.
    Config(ConfigError),
    /// A level was started twice or stopped while not running.
    Level(String),
    /// An interceptor refused to start.
    Interceptor {
        /// The interceptor's name.
        name: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bind {
                first,
                tried,
                source,
            } => write!(f, "cannot bind {tried} port(s) from {first}: {source}"),
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Config(e) => e.fmt(f),
            Self::Level(d) => f.write_str(d),
            Self::Interceptor { name, reason } => write!(f, "interceptor {name}: {reason}"),
        }
    }
}

impl std::error::Error for ChannelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Bind { source, .. } => Some(source),
            Self::Io(e) => Some(e),
            Self::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for ChannelError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<io::Error> for ChannelError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// A listener's refusal to process a message; turns into FAIL_ACK for
/// `USE_ACK | SYNCHRONIZED_ACK` messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessError(pub String);

impl ProcessError {
    /// A processing error with a reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message processing failed: {}", self.0)
    }
}

impl std::error::Error for ProcessError {}
