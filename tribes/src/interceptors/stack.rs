use std::sync::{Arc, Weak};

use super::{Interceptor, Outgoing};
use crate::error::{FaultyMember, ProcessError, SendError};
use crate::member::Member;
use crate::transport::{Batch, MessageHandler};
use crate::wire::ChannelMessage;

/// What sits above the stack (the channel's listeners and member view).
pub(crate) trait Top: Send + Sync {
    fn received(&self, msg: ChannelMessage) -> Result<(), ProcessError>;
    fn member_added(&self, m: Member);
    fn member_disappeared(&self, m: Member);
    fn members(&self) -> Vec<Member>;
}

/// What sits below the stack (the coordinator: transport and membership).
pub(crate) trait Bottom: Send + Sync {
    fn send(&self, out: Outgoing) -> Result<(), SendError>;
    fn heartbeat(&self);
    fn local_member(&self) -> Member;
    fn batch(&self, f: &mut dyn FnMut(&mut Batch)) -> Vec<(usize, FaultyMember)>;
}

pub(crate) struct Stack {
    pub(crate) interceptors: Vec<Arc<dyn Interceptor>>,
    pub(crate) top: Arc<dyn Top>,
    pub(crate) bottom: Arc<dyn Bottom>,
}

impl Stack {
    pub(crate) fn down(&self) -> Down<'_> {
        Down {
            stack: self,
            index: 0,
        }
    }

    pub(crate) fn up_from_bottom(&self) -> Up<'_> {
        Up {
            stack: self,
            index: self.interceptors.len(),
        }
    }
}

/// Receiver → bottom of the stack.
pub(crate) struct StackEntry(Weak<Stack>);

pub(crate) fn stack_entry(stack: &Arc<Stack>) -> StackEntry {
    StackEntry(Arc::downgrade(stack))
}

impl MessageHandler for StackEntry {
    fn message_received(&self, msg: ChannelMessage) -> Result<(), ProcessError> {
        match self.0.upgrade() {
            Some(stack) => stack.up_from_bottom().received(msg),
            None => Err(ProcessError::new("channel stopped")),
        }
    }
}

/// Cursor for calls going down: towards the transport.
#[derive(Clone, Copy)]
pub struct Down<'a> {
    stack: &'a Stack,
    index: usize,
}

impl Down<'_> {
    /// Passes a message to the next interceptor that wants it, or to the transport.
    pub fn send(self, out: Outgoing) -> Result<(), SendError> {
        let opts = out.message.options;
        let stack = self.stack;
        for i in self.index..stack.interceptors.len() {
            let ic = &stack.interceptors[i];
            if opts.matches_flag(ic.option_flag()) {
                return ic.send(
                    out,
                    Down {
                        stack,
                        index: i + 1,
                    },
                );
            }
        }
        stack.bottom.send(out)
    }

    /// Passes the heartbeat on.
    pub fn heartbeat(self) {
        let stack = self.stack;
        match stack.interceptors.get(self.index) {
            Some(ic) => ic.heartbeat(Down {
                stack,
                index: self.index + 1,
            }),
            None => stack.bottom.heartbeat(),
        }
    }
}

/// Cursor for calls going up: towards the application.
#[derive(Clone, Copy)]
pub struct Up<'a> {
    stack: &'a Stack,
    /// Interceptors below this index have not seen the call yet.
    index: usize,
}

impl Up<'_> {
    /// Passes a message to the next interceptor above that wants it, or to the listeners.
    pub fn received(self, msg: ChannelMessage) -> Result<(), ProcessError> {
        let opts = msg.options;
        let stack = self.stack;
        for i in (0..self.index).rev() {
            let ic = &stack.interceptors[i];
            if opts.matches_flag(ic.option_flag()) {
                return ic.received(msg, Up { stack, index: i });
            }
        }
        stack.top.received(msg)
    }

    /// Passes a member-added event on.
    pub fn member_added(self, m: Member) {
        match self.index.checked_sub(1) {
            Some(i) => self.stack.interceptors[i].member_added(
                m,
                Up {
                    stack: self.stack,
                    index: i,
                },
            ),
            None => self.stack.top.member_added(m),
        }
    }

    /// Passes a member-disappeared event on.
    pub fn member_disappeared(self, m: Member) {
        match self.index.checked_sub(1) {
            Some(i) => self.stack.interceptors[i].member_disappeared(
                m,
                Up {
                    stack: self.stack,
                    index: i,
                },
            ),
            None => self.stack.top.member_disappeared(m),
        }
    }
}

/// An interceptor's way back into the stack from its own threads or timers, at its own
/// position: `send` continues below it, the `*_up` calls continue above it.
#[derive(Clone)]
pub struct StackHandle {
    pub(crate) stack: Weak<Stack>,
    pub(crate) index: usize,
    /// The channel's name, for the names of the interceptor's threads.
    pub(crate) channel: Arc<str>,
}

impl StackHandle {
    /// The name of the channel this interceptor is in: put it in the names of the threads
    /// the interceptor starts (`tribes-<what>-<channel>`), so that the threads of several
    /// channels in one process can be told apart.
    pub fn channel_name(&self) -> &str {
        &self.channel
    }

    /// Sends a message down from just below this interceptor.
    pub fn send(&self, out: Outgoing) -> Result<(), SendError> {
        let stack = self.stack.upgrade().ok_or(SendError::NotStarted)?;
        Down {
            stack: &stack,
            index: self.index + 1,
        }
        .send(out)
    }

    /// Delivers a message upwards from just above this interceptor.
    pub fn received(&self, msg: ChannelMessage) -> Result<(), ProcessError> {
        let stack = self
            .stack
            .upgrade()
            .ok_or_else(|| ProcessError::new("channel stopped"))?;
        Up {
            stack: &stack,
            index: self.index,
        }
        .received(msg)
    }

    /// Raises member-added from just above this interceptor.
    pub fn member_added(&self, m: Member) {
        if let Some(stack) = self.stack.upgrade() {
            Up {
                stack: &stack,
                index: self.index,
            }
            .member_added(m);
        }
    }

    /// Raises member-disappeared from just above this interceptor.
    pub fn member_disappeared(&self, m: Member) {
        if let Some(stack) = self.stack.upgrade() {
            Up {
                stack: &stack,
                index: self.index,
            }
            .member_disappeared(m);
        }
    }

    /// The local member as the transport advertises it.
    pub fn local_member(&self) -> Option<Member> {
        self.stack.upgrade().map(|s| s.bottom.local_member())
    }

    /// The members the application currently sees.
    pub fn members(&self) -> Vec<Member> {
        self.stack
            .upgrade()
            .map(|s| s.top.members())
            .unwrap_or_default()
    }

    /// Runs `f` with transport write batching on for this thread (see
    /// [`crate::transport::Batch`]); returns the failures by tag. The interceptors below
    /// this one hear of the members that failed ([`Interceptor::sends_failed`]): their
    /// `send` saw the messages only queued.
    pub fn batch(&self, f: &mut dyn FnMut(&mut Batch)) -> Vec<(usize, FaultyMember)> {
        let Some(stack) = self.stack.upgrade() else {
            return Vec::new();
        };
        let failures = stack.bottom.batch(f);
        if !failures.is_empty() {
            let mut failed: Vec<FaultyMember> = Vec::new();
            for (_, f) in &failures {
                if !failed
                    .iter()
                    .any(|seen| seen.member.key() == f.member.key())
                {
                    failed.push(f.clone());
                }
            }
            let below = stack.interceptors.get(self.index + 1..).unwrap_or_default();
            for ic in below {
                ic.sends_failed(&failed);
            }
        }
        failures
    }
}
