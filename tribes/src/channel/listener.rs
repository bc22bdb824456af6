use crate::error::ProcessError;
use crate::member::Member;
use crate::wire::ChannelMessage;

/// Receives messages that reach the top of the stack (Tribes `ChannelListener`).
///
/// Closures `Fn(&ChannelMessage) -> Result<(), ProcessError>` are listeners too. Returning an
/// error makes the receiver answer FAIL_ACK to a `USE_ACK | SYNCHRONIZED_ACK` sender.
pub trait ChannelListener: Send + Sync + 'static {
    /// Whether this listener wants the message. Default: every message.
    fn accept(&self, msg: &ChannelMessage) -> bool {
        let _ = msg;
        true
    }

    /// Processes an accepted message. Runs on a receiver worker thread: keep it short.
    fn message_received(&self, msg: &ChannelMessage) -> Result<(), ProcessError>;
}

impl<F> ChannelListener for F
where
    F: Fn(&ChannelMessage) -> Result<(), ProcessError> + Send + Sync + 'static,
{
    fn message_received(&self, msg: &ChannelMessage) -> Result<(), ProcessError> {
        self(msg)
    }
}

/// Told when members join or leave (Tribes `MembershipListener`).
pub trait MembershipListener: Send + Sync + 'static {
    /// A member joined.
    fn member_added(&self, member: &Member) {
        let _ = member;
    }
    /// A member left.
    fn member_disappeared(&self, member: &Member) {
        let _ = member;
    }
}
