use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use super::coordinator::Coordinator;
use super::{ChannelTop, GroupChannel, Levels};
use crate::error::ChannelError;
use crate::id::UniqueId;
use crate::interceptors::{Interceptor, MessageDispatchInterceptor, Stack};
use crate::member::Member;
use crate::membership::McastConfig;
use crate::transport::{ReceiverConfig, Sender, SenderConfig};

/// Builds a [`GroupChannel`]. Defaults are Tribes' defaults (see each config struct).
///
/// Interceptors are stacked in the order they are added: the first one added sits nearest the
/// application, the last one nearest the transport. With none added, a
/// [`MessageDispatchInterceptor`] is added, as Tribes does.
///
/// ```
/// use std::time::Duration;
/// use tribes::GroupChannel;
/// let channel = GroupChannel::builder()
///     .name("orders")
///     .port(0)
///     .heartbeat_interval(Some(Duration::from_secs(1)))
///     .build()
///     .unwrap();
/// assert_eq!(channel.name(), "orders");
/// ```
pub struct ChannelBuilder {
    name: String,
    receiver: ReceiverConfig,
    sender: SenderConfig,
    interceptors: Vec<Arc<dyn Interceptor>>,
    heartbeat_interval: Option<Duration>,
    unique_id: Option<UniqueId>,
    domain: Bytes,
    payload: Bytes,
    multicast: Option<McastConfig>,
}

impl Default for ChannelBuilder {
    fn default() -> Self {
        Self {
            name: "tribes".into(),
            receiver: ReceiverConfig::default(),
            sender: SenderConfig::default(),
            interceptors: Vec::new(),
            heartbeat_interval: Some(Duration::from_millis(5000)),
            unique_id: None,
            domain: Bytes::new(),
            payload: Bytes::new(),
            multicast: None,
        }
    }
}

impl ChannelBuilder {
    /// Channel name, used in thread names and logs. Default `tribes`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Receiver settings.
    pub fn receiver(mut self, cfg: ReceiverConfig) -> Self {
        self.receiver = cfg;
        self
    }

    /// Sender settings.
    pub fn sender(mut self, cfg: SenderConfig) -> Self {
        self.sender = cfg;
        self
    }

    /// Address to bind and advertise (default 127.0.0.1).
    pub fn address(mut self, ip: IpAddr) -> Self {
        self.receiver.address = ip;
        self
    }

    /// First port to try (default 4000; 0 = any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.receiver.port = port;
        self
    }

    /// Adds an interceptor below the ones added before.
    pub fn interceptor(mut self, i: impl Interceptor) -> Self {
        self.interceptors.push(Arc::new(i));
        self
    }

    /// Adds a shared interceptor (keep a clone to read its state).
    pub fn interceptor_arc(mut self, i: Arc<dyn Interceptor>) -> Self {
        self.interceptors.push(i);
        self
    }

    /// True when interceptors were added (so the builder's default stack will not be used).
    pub fn has_interceptors(&self) -> bool {
        !self.interceptors.is_empty()
    }

    /// Heartbeat period; `None` disables the thread. Default 5 s (Tribes
    /// `heartbeatSleeptime`).
    pub fn heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// The local member's unique id (default: fresh from the OS random source).
    pub fn unique_id(mut self, id: UniqueId) -> Self {
        self.unique_id = Some(id);
        self
    }

    /// The local member's domain bytes.
    pub fn domain(mut self, domain: impl Into<Bytes>) -> Self {
        self.domain = domain.into();
        self
    }

    /// The local member's advertised payload.
    pub fn member_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Membership by multicast beacons, run at the MBR_RX / MBR_TX levels. Without it the
    /// membership levels do nothing (use static membership).
    pub fn multicast(mut self, cfg: McastConfig) -> Self {
        self.multicast = Some(cfg);
        self
    }

    /// Validates the configuration and builds the (not yet started) channel.
    pub fn build(self) -> Result<GroupChannel, ChannelError> {
        if self.heartbeat_interval.is_some_and(|i| i.is_zero()) {
            return Err(ChannelError::Config(crate::error::ConfigError {
                field: "heartbeat_interval",
                reason: "must be above zero (zero would spin a core); None turns it off".into(),
            }));
        }
        self.receiver.validate()?;
        self.sender.validate()?;
        if let Some(m) = &self.multicast {
            m.validate()?;
        }
        let mut local = Member::with_id(
            std::net::SocketAddr::new(self.receiver.address, self.receiver.port),
            self.unique_id.unwrap_or_else(UniqueId::secure),
        );
        local.domain = self.domain;
        local.payload = self.payload;
        // Java Tribes writes the absolute start time for a member without a membership
        // service (reference §12.1); do the same so records compare alike.
        local.alive_time = super::now_millis();
        let mut interceptors = self.interceptors;
        if interceptors.is_empty() {
            interceptors.push(Arc::new(MessageDispatchInterceptor::default()));
        }
        let coordinator = Arc::new(Coordinator::new(
            self.name.clone(),
            self.receiver,
            Sender::new(self.sender),
            local,
            self.multicast,
        ));
        let top = Arc::new(ChannelTop {
            sender: Arc::downgrade(coordinator.sender_arc()),
            ..ChannelTop::default()
        });
        let stack = Arc::new(Stack {
            interceptors,
            top: top.clone(),
            bottom: coordinator.clone(),
        });
        Ok(GroupChannel {
            name: self.name,
            stack,
            top,
            coordinator,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat: Mutex::new(None),
            levels: Mutex::new(Levels::default()),
        })
    }
}
