//! `TcpPingInterceptor`: keeps connections warm and drives failure detection (§8.2).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use log::debug;
use parking_lot::Mutex;

use super::{Down, Interceptor, Outgoing, StackHandle, TcpFailureDetector, Up};
use crate::channel::Levels;
use crate::error::{ChannelError, ProcessError};
use crate::options::SendOptions;
use crate::wire::ChannelMessage;

/// The 64-byte ping Tribes sends (the failure detector's probe with five bytes changed).
pub const PING_PAYLOAD: [u8; 64] = [
    0x4f, 0xa7, 0x73, 0x48, 0x79, 0xdf, 0x43, 0xc9, 0x9f, 0x6f, 0x89, 0x80, 0xa1, 0x5b, 0x07, 0x14,
    0x7d, 0xd9, 0x52, 0x5b, 0xeb, 0xdf, 0x43, 0x9a, 0xb7, 0x7e, 0xbe, 0x8f, 0x81, 0x67, 0x1e, 0xb6,
    0x37, 0x15, 0xbe, 0x87, 0x45, 0x21, 0x4c, 0xa8, 0xbf, 0x0a, 0x4d, 0x13, 0x53, 0x38, 0x15, 0x32,
    0x55, 0xf6, 0x94, 0xb7, 0x3a, 0xdf, 0x21, 0x78, 0x91, 0x04, 0x7d, 0xd7, 0x72, 0x84, 0xc0, 0xd5,
];

/// Pings every member on each heartbeat, or every `interval` on its own thread
/// (`tribes-ping-<channel>`). With a [`TcpFailureDetector`] (given to [`TcpPingInterceptor::with_detector`])
/// a ping is a forced check of every member by the detector instead, as in Tribes. A failed
/// ping reaches a failure detector placed below this interceptor as a send failure.
///
/// ```
/// use std::time::Duration;
/// use tribes::interceptors::TcpPingInterceptor;
/// let ping = TcpPingInterceptor::new().use_thread(Some(Duration::from_secs(1)));
/// # drop(ping);
/// ```
#[derive(Default)]
pub struct TcpPingInterceptor {
    detector: Option<Arc<TcpFailureDetector>>,
    interval: Option<Duration>,
    handle: Mutex<Option<StackHandle>>,
    thread: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

impl TcpPingInterceptor {
    /// Pings on every channel heartbeat (Tribes `useThread=false`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Pings from its own thread every `interval` instead (Tribes `useThread`, `interval`
    /// 1000 ms), or on the heartbeat with `None`.
    pub fn use_thread(mut self, interval: Option<Duration>) -> Self {
        self.interval = interval;
        self
    }

    /// Lets the failure detector check every member instead of sending pings.
    pub fn with_detector(mut self, detector: Arc<TcpFailureDetector>) -> Self {
        self.detector = Some(detector);
        self
    }

    fn ping(detector: Option<&TcpFailureDetector>, handle: &StackHandle) {
        if let Some(fd) = detector {
            fd.check_all();
            return;
        }
        let members = handle.members();
        let Some(local) = handle.local_member() else {
            return;
        };
        if members.is_empty() {
            return;
        }
        let out = Outgoing {
            destinations: members,
            // Tribes pings with options 0: no ACK.
            message: ChannelMessage::control(local, &PING_PAYLOAD, SendOptions::empty()),
            handler: None,
        };
        if let Err(e) = handle.send(out) {
            debug!(target: "tribes::ping", "ping failed: {e}");
        }
    }
}

impl Interceptor for TcpPingInterceptor {
    fn name(&self) -> &'static str {
        "TcpPingInterceptor"
    }

    fn received(&self, msg: ChannelMessage, next: Up<'_>) -> Result<(), ProcessError> {
        if msg.payload[..] == PING_PAYLOAD[..] {
            return Ok(());
        }
        next.received(msg)
    }

    fn heartbeat(&self, next: Down<'_>) {
        if self.interval.is_none() {
            // Cloned out: pings wait for connects, and `stop` must not wait behind them for
            // the lock.
            let handle = self.handle.lock().clone();
            if let Some(h) = handle {
                Self::ping(self.detector.as_deref(), &h);
            }
        }
        next.heartbeat();
    }

    fn start(&self, levels: Levels, handle: &StackHandle) -> Result<(), ChannelError> {
        if !levels.contains(Levels::SND_TX) {
            return Ok(());
        }
        *self.handle.lock() = Some(handle.clone());
        let Some(interval) = self.interval else {
            return Ok(());
        };
        let mut slot = self.thread.lock();
        if slot.is_some() {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let handle = handle.clone();
        let detector = self.detector.clone();
        let h = std::thread::Builder::new()
            .name(format!("tribes-ping-{}", handle.channel_name()))
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    Self::ping(detector.as_deref(), &handle);
                }
            })?;
        *slot = Some((tx, h));
        Ok(())
    }

    fn stop(&self, levels: Levels, _handle: &StackHandle) {
        if !levels.contains(Levels::SND_TX) {
            return;
        }
        let thread = self.thread.lock().take();
        if let Some((tx, h)) = thread {
            drop(tx);
            let _ = h.join();
        }
        *self.handle.lock() = None;
    }
}
