//! The bottom of the stack: owns the sender and receiver and the local member.

use std::sync::Arc;
use std::time::Duration;

use log::warn;
use parking_lot::{Mutex, RwLock};

use super::levels::Levels;
use crate::error::{ChannelError, FaultyMember, SendError};
use crate::interceptors::{Bottom, Outgoing, Stack};
use crate::member::Member;
use crate::membership::{EventSink, McastConfig, McastService, MemberEvent};
use crate::options::SendOptions;
use crate::transport::{Batch, Frame, Receiver, ReceiverConfig, ReceiverStats, Sender};
use crate::wire::FRAME_OVERHEAD;

pub(crate) struct Coordinator {
    name: String,
    /// Tribes writes the bound port back into the receiver config, so a restart binds the
    /// same port again (peers configured with it keep working).
    receiver_cfg: Mutex<ReceiverConfig>,
    receiver: Mutex<Option<Receiver>>,
    sender: Arc<Sender>,
    local: Arc<RwLock<Member>>,
    max_body: usize,
    mcast_cfg: Option<McastConfig>,
    mcast: Mutex<Option<McastService>>,
}

impl Coordinator {
    pub(crate) fn new(
        name: String,
        receiver_cfg: ReceiverConfig,
        sender: Sender,
        local: Member,
        mcast_cfg: Option<McastConfig>,
    ) -> Self {
        let max_body = receiver_cfg.max_body_size;
        Self {
            name,
            receiver_cfg: Mutex::new(receiver_cfg),
            receiver: Mutex::new(None),
            sender: Arc::new(sender),
            local: Arc::new(RwLock::new(local)),
            max_body,
            mcast_cfg,
            mcast: Mutex::new(None),
        }
    }

    /// Changes the advertised payload and domain; with multicast membership a beacon goes
    /// out at once.
    pub(crate) fn update_local(&self, f: impl FnOnce(&mut Member)) {
        f(&mut self.local.write());
        if let Some(m) = self.mcast.lock().as_ref() {
            m.beacon_now();
        }
    }

    /// How long after start the membership service may take to find the members that are
    /// up: two beacon intervals with multicast (what Tribes sleeps in start); nothing
    /// otherwise.
    pub(crate) fn discovery_time(&self) -> Duration {
        self.mcast_cfg
            .as_ref()
            .map(|c| c.frequency.saturating_mul(2))
            .unwrap_or_default()
    }

    /// Members known to the membership service (empty without one).
    pub(crate) fn service_members(&self) -> Vec<Member> {
        self.mcast
            .lock()
            .as_ref()
            .map(McastService::members)
            .unwrap_or_default()
    }

    fn mcast_service(&self, stack: &Arc<Stack>) -> Result<(), ChannelError> {
        let Some(cfg) = &self.mcast_cfg else {
            return Ok(());
        };
        let mut slot = self.mcast.lock();
        if slot.is_some() {
            return Ok(());
        }
        let weak = Arc::downgrade(stack);
        let sender = Arc::downgrade(&self.sender);
        let sink: EventSink = Arc::new(move |event| {
            let Some(stack) = weak.upgrade() else {
                return;
            };
            match event {
                MemberEvent::Added(m) => stack.up_from_bottom().member_added(m),
                MemberEvent::Disappeared { member, .. } => {
                    if let Some(s) = sender.upgrade() {
                        s.remove(&member);
                    }
                    stack.up_from_bottom().member_disappeared(member);
                }
            }
        });
        *slot = Some(McastService::new(
            cfg.clone(),
            &self.name,
            Arc::clone(&self.local),
            sink,
        )?);
        Ok(())
    }

    pub(crate) fn sender_arc(&self) -> &Arc<Sender> {
        &self.sender
    }

    pub(crate) fn sender(&self) -> &Sender {
        &self.sender
    }

    pub(crate) fn receiver_stats(&self) -> Option<Arc<ReceiverStats>> {
        self.receiver.lock().as_ref().map(Receiver::stats_arc)
    }

    /// Starts SND_RX (binding, then advertising the bound address) and SND_TX. Membership
    /// levels have no service of their own yet; static membership lives in its interceptor.
    pub(crate) fn start(&self, levels: Levels, stack: &Arc<Stack>) -> Result<(), ChannelError> {
        if levels.contains(Levels::SND_RX) {
            let handler = Arc::new(crate::interceptors::stack_entry(stack));
            let mut cfg = self.receiver_cfg.lock();
            let rx = Receiver::start(&cfg, &self.name, handler)?;
            let addr = rx.local_addr();
            cfg.port = addr.port();
            drop(cfg);
            {
                let mut local = self.local.write();
                local.host = addr.ip();
                local.port = addr.port();
            }
            *self.receiver.lock() = Some(rx);
        }
        if levels.contains(Levels::SND_TX) {
            self.sender.start();
        }
        if levels.intersects(Levels::MBR_RX.union(Levels::MBR_TX)) {
            self.mcast_service(stack)?;
            if let Some(m) = self.mcast.lock().as_mut() {
                if levels.contains(Levels::MBR_RX) {
                    m.start_rx()?;
                }
                if levels.contains(Levels::MBR_TX) {
                    m.start_tx()?;
                }
            }
        }
        Ok(())
    }

    /// Stops the levels in `levels`. Services are taken out of their slots before they are
    /// stopped, so no lock is held while their threads are joined: those threads call
    /// listeners, and a listener that touches the channel (sets its payload, reads
    /// receiver counters) would otherwise wait for the lock while stop waits for it.
    pub(crate) fn stop(&self, levels: Levels, still_running: Levels) {
        let mcast = self.mcast.lock().take();
        if let Some(mut m) = mcast {
            if levels.contains(Levels::MBR_TX) {
                m.stop_tx();
            }
            if levels.contains(Levels::MBR_RX) {
                m.stop_rx();
            }
            if still_running.intersects(Levels::MBR_RX.union(Levels::MBR_TX)) {
                *self.mcast.lock() = Some(m);
            }
            // Otherwise both halves stopped: dropping it leaves the group and closes the
            // socket.
        }
        if levels.contains(Levels::SND_TX) {
            self.sender.stop();
        }
        if levels.contains(Levels::SND_RX) {
            let rx = self.receiver.lock().take();
            if let Some(mut rx) = rx {
                rx.stop();
            }
        }
    }
}

impl Bottom for Coordinator {
    fn send(&self, mut out: Outgoing) -> Result<(), SendError> {
        // A local hint for the dispatch interceptor; it does not go on the wire.
        out.message.options = out.message.options.without(SendOptions::LAZY);
        let opts = out.message.options;
        if opts.contains(SendOptions::UDP) || opts.contains(SendOptions::MULTICAST) {
            warn!(target: "tribes::channel", "UDP/MULTICAST sends are not supported yet; sending over TCP");
        }
        let len = out.message.encoded_len();
        let result = if len > self.max_body {
            Err(SendError::TooLarge {
                len,
                max: self.max_body,
            })
        } else {
            let frame = Frame::message(&out.message);
            debug_assert_eq!(frame.len(), len + FRAME_OVERHEAD);
            self.sender
                .send(&frame, &out.destinations, opts.wants_ack())
        };
        // A handler on a message that reaches the transport on the caller's thread (no
        // dispatch interceptor took it) hears the outcome here, as well as the caller.
        if let Some(h) = &out.handler {
            let id = out.message.unique_id;
            match &result {
                Ok(()) => h.handle_completion(id),
                Err(e) => h.handle_error(e.clone(), id),
            }
        }
        result
    }

    fn heartbeat(&self) {
        self.sender.keep_alive_check();
    }

    fn local_member(&self) -> Member {
        self.local.read().clone()
    }

    fn batch(&self, f: &mut dyn FnMut(&mut Batch)) -> Vec<(usize, FaultyMember)> {
        Batch::run(&self.sender, |b| f(b)).1
    }
}
