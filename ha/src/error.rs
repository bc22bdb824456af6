//! Errors of the session layer.

use std::fmt;

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// An attribute value could not be serialized; nothing was stored or recorded.
    Serialize {
        /// The attribute name.
        name: String,
        /// The serializer's message.
        reason: String,
    },
    /// A stored attribute could not be read back as the requested type.
    Deserialize {
        /// The attribute name.
        name: String,
        /// The deserializer's message.
        reason: String,
    },
    /// A replication message could not be decoded.
    Codec(String),
    /// A manager's configuration was refused when it was registered.
    InvalidConfig {
        /// The context the manager is for.
        context: String,
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A manager for this context is registered already.
    DuplicateContext(String),
    /// No new session: this node holds
    /// [`ManagerConfig::max_active_sessions`](crate::ManagerConfig::max_active_sessions)
    /// already (Tomcat `TooManyActiveSessionsException`).
    TooManySessions {
        /// The limit.
        limit: usize,
    },
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serialize { name, reason } => {
                write!(
                    f,
                    "session attribute {name:?} cannot be serialized: {reason}"
                )
            }
            Self::Deserialize { name, reason } => {
                write!(
                    f,
                    "session attribute {name:?} cannot be read as that type: {reason}"
                )
            }
            Self::Codec(reason) => write!(f, "bad session message: {reason}"),
            Self::InvalidConfig {
                context,
                field,
                reason,
            } => write!(f, "manager for {context:?}: invalid {field}: {reason}"),
            Self::DuplicateContext(context) => {
                write!(f, "a manager for {context:?} is registered already")
            }
            Self::TooManySessions { limit } => write!(
                f,
                "no new session: {limit} are held, the limit (max_active_sessions)"
            ),
        }
    }
}

impl std::error::Error for SessionError {}
