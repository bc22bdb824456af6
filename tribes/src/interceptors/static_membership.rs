//! `StaticMembershipInterceptor`: a fixed list of members, for networks without multicast.

use std::net::SocketAddr;

use bytes::Bytes;
use log::{debug, info, warn};
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
    /// Addresses whose notices were ignored because they are not in the list, each
    /// logged once (at most [`MAX_STRANGERS`] remembered).
    strangers: parking_lot::Mutex<Vec<SocketAddr>>,
}

/// How many unlisted senders of notices are remembered (each is warned about once).
const MAX_STRANGERS: usize = 64;

impl StaticMembershipInterceptor {
    /// Static membership over `members` (the local node may be in the list; it is skipped).
    pub fn new(members: Vec<Member>) -> Self {
        Self {
            members: RwLock::new(members),
            strangers: parking_lot::Mutex::new(Vec::new()),
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

    /// A notice from an address not in the list: ignored as Tribes does, but said once,
    /// since it usually means a node bound another port than its peers expect (its
    /// configured port was taken and it moved on) and will not get their messages.
    fn stranger(&self, addr: SocketAddr) {
        let mut seen = self.strangers.lock();
        if seen.contains(&addr) {
            return;
        }
        if seen.len() < MAX_STRANGERS {
            seen.push(addr);
        }
        warn!(target: "tribes::membership", "ignoring a membership notice from {addr}, which is not a configured static member (a node on another port than its peers list?)");
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

    /// Sends a notice to every member, each on its own short-lived thread: a member whose
    /// host is down holds its notice for the send timeout, and one after another those
    /// waits would add up in the channel's start and stop.
    fn notice_all(handle: &StackHandle, to: Vec<Member>, payload: &'static [u8]) {
        std::thread::scope(|scope| {
            for m in to {
                let here = m.clone();
                let spawned = std::thread::Builder::new()
                    .name("tribes-static-notice".into())
                    .spawn_scoped(scope, move || Self::notice(handle, m, payload));
                if spawned.is_err() {
                    // No thread to spare: send it from here.
                    Self::notice(handle, here, payload);
                }
            }
        });
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
            let Some(m) = self.configured(msg.sender.addr()) else {
                self.stranger(msg.sender.addr());
                return Ok(());
            };
            if payload == HELLO_PAYLOAD {
                info!(target: "tribes::membership", "static member {m} says hello");
                next.member_added(m);
            } else {
                info!(target: "tribes::membership", "static member {m} is shutting down");
                let mut gone = m;
                gone.command = Bytes::from_static(SHUTDOWN_COMMAND);
                next.member_disappeared(gone);
            }
            return Ok(());
        }
        next.received(msg)
    }

    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        if !levels.contains(Levels::SND_TX) {
            return Ok(());
        }
        let others = self.others(handle);
        for m in &others {
            handle.member_added(m.clone());
        }
        Self::notice_all(handle, others, HELLO_PAYLOAD);
        Ok(())
    }

    fn stop(&self, levels: Levels, handle: &StackHandle) {
        if !levels.contains(Levels::SND_TX) {
            return;
        }
        Self::notice_all(handle, self.others(handle), GOODBYE_PAYLOAD);
    }
}
