//! `StaticMembershipInterceptor`: a fixed list of members, for networks without multicast.

use std::net::SocketAddr;

use bytes::Bytes;
use log::{debug, info};
use parking_lot::RwLock;

use super::{Interceptor, Outgoing, StackHandle, Up};
use crate::channel::Levels;
use crate::error::{ChannelError, ProcessError};
use crate::member::{Member, SHUTDOWN_COMMAND};
use crate::options::SendOptions;
use crate::wire::ChannelMessage;

/// Notice sent to each static member at start (ASCII, 36 bytes).
pub const HELLO_PAYLOAD: &[u8] = b"Local StaticMember Notification Data";
/// Notice sent to each static member at stop (ASCII, 32 bytes).
pub const GOODBYE_PAYLOAD: &[u8] = b"Local StaticMember Shutdown Data";

/// Adds a fixed list of members to the membership (Tribes `StaticMembershipInterceptor`).
///
/// At start every configured member is reported as added and sent a hello notice; at stop
/// everyone gets a goodbye notice. A goodbye received from a configured member reports it as
/// gone (with the shutdown command set); a later hello reports it as added again. Notices are
/// byte-exact with Tribes and are swallowed here, never reaching the application.
///
/// ```
/// use tribes::{Member, interceptors::StaticMembershipInterceptor};
/// let peer = Member::new("127.0.0.1:4001".parse().unwrap());
/// let statics = StaticMembershipInterceptor::new(vec![peer]);
/// assert_eq!(statics.members().len(), 1);
/// ```
pub struct StaticMembershipInterceptor {
    members: RwLock<Vec<Member>>,
}

impl StaticMembershipInterceptor {
    /// Static membership over `members` (the local node may be in the list; it is skipped).
    pub fn new(members: Vec<Member>) -> Self {
        Self {
            members: RwLock::new(members),
        }
    }

    /// The configured members.
    pub fn members(&self) -> Vec<Member> {
        self.members.read().clone()
    }

    /// Replaces the configured members. Takes effect for the announcements of the next start
    /// of the SND_TX level; useful when ports are only known after binding (port 0): start
    /// `Levels::SND_RX`, learn the addresses, set them here, then start the other levels.
    pub fn set_members(&self, members: Vec<Member>) {
        *self.members.write() = members;
    }

    fn configured(&self, addr: SocketAddr) -> Option<Member> {
        self.members
            .read()
            .iter()
            .find(|m| m.addr() == addr)
            .cloned()
    }

    fn others(&self, handle: &StackHandle) -> Vec<Member> {
        let local = handle.local_member();
        self.members
            .read()
            .iter()
            .filter(|m| local.as_ref().is_none_or(|l| l.addr() != m.addr()))
            .cloned()
            .collect()
    }

    fn notice(handle: &StackHandle, to: Member, payload: &'static [u8]) {
        let Some(local) = handle.local_member() else {
            return;
        };
        let addr = to.addr();
        let out = Outgoing {
            destinations: vec![to],
            // Tribes sends notices with options 0: no ACK, not even the byte-message bit.
            message: ChannelMessage::control(local, payload, SendOptions::empty()),
            handler: None,
        };
        if let Err(e) = handle.send(out) {
            debug!(target: "tribes::membership", "static notice to {addr} not delivered: {e}");
        }
    }
}

impl Interceptor for StaticMembershipInterceptor {
    fn name(&self) -> &'static str {
        "StaticMembershipInterceptor"
    }

    fn received(&self, msg: ChannelMessage, next: Up<'_>) -> Result<(), ProcessError> {
        let payload: &[u8] = &msg.payload;
        if payload == HELLO_PAYLOAD || payload == GOODBYE_PAYLOAD {
            if let Some(m) = self.configured(msg.sender.addr()) {
                if payload == HELLO_PAYLOAD {
                    info!(target: "tribes::membership", "static member {m} says hello");
                    next.member_added(m);
                } else {
                    info!(target: "tribes::membership", "static member {m} is shutting down");
                    let mut gone = m;
                    gone.command = Bytes::from_static(SHUTDOWN_COMMAND);
                    next.member_disappeared(gone);
                }
            }
            return Ok(());
        }
        next.received(msg)
    }

    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        if !levels.contains(Levels::SND_TX) {
            return Ok(());
        }
        for m in self.others(handle) {
            handle.member_added(m.clone());
            Self::notice(handle, m, HELLO_PAYLOAD);
        }
        Ok(())
    }

    fn stop(&self, levels: Levels, handle: &StackHandle) {
        if !levels.contains(Levels::SND_TX) {
            return;
        }
        for m in self.others(handle) {
            Self::notice(handle, m, GOODBYE_PAYLOAD);
        }
    }
}
