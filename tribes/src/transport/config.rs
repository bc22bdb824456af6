use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::error::ConfigError;
use crate::wire::DEFAULT_MAX_BODY_SIZE;

/// Receiver settings (Tribes `NioReceiver`).
///
/// ```
/// use tribes::transport::ReceiverConfig;
/// let cfg = ReceiverConfig { port: 0, ..ReceiverConfig::default() };
/// assert_eq!(cfg.max_threads, 6);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Address to bind and to advertise. Default `127.0.0.1`.
    ///
    /// Tribes defaults to `auto` (the host's primary address); we default to loopback so that
    /// nothing is exposed by accident. Set a routable address for a real cluster.
    pub address: IpAddr,
    /// First port tried. Default 4000 (Tribes). 0 lets the OS choose.
    pub port: u16,
    /// Number of consecutive ports tried from `port`. Default 100 (Tribes `autoBind`).
    pub auto_bind: u16,
    /// Worker threads that process received messages. Default 6 (Tribes' core `minThreads`).
    pub max_threads: usize,
    /// Largest accepted frame body. Default 64 MiB (Tribes has no limit).
    pub max_body_size: usize,
    /// Bytes of decoded but unprocessed frames kept per connection before the receiver stops
    /// reading it (back-pressure). Default 4 MiB.
    pub read_ahead: usize,
    /// Concurrent connections accepted. Default 1024. At the limit, a connection silent for
    /// 5 s or more (nothing of it waiting or being processed) makes room, one that never
    /// delivered a message first, else the one silent longest; otherwise the new one is
    /// closed. (A peer whose connection was closed that way and that writes its next
    /// message without ACK into it without checking first, as Tribes' sender does, loses
    /// that message; ours checks a connection idle for `idle_check_after` first.)
    pub max_connections: usize,
    /// Bytes of frames not yet complete held over all connections. When more arrive, the
    /// connection holding the most is closed (what it sent before is still delivered).
    /// Default 512 MiB, at least `max_body_size` (Tribes has no bound: each connection may
    /// hold up to the largest frame, so a thousand peers that each begin a large frame and
    /// stop could take gigabytes).
    pub max_partial_bytes: usize,
    /// A connection that never delivered a message, or stopped half-way through one, and
    /// sends nothing for this long is closed (with its partial frame). Default 300 s;
    /// `None` keeps them for good (Tribes). A peer's working connection between two
    /// messages is not affected, however long it is silent. Checked about once a second,
    /// and at least every `selector_timeout`.
    pub idle_timeout: Option<Duration>,
    /// Selector poll timeout. Default 5 s (Tribes `selectorTimeout`).
    pub selector_timeout: Duration,
    /// SO_RCVBUF of accepted sockets. Default 65536 (Tribes `rxBufSize`).
    pub rx_buf_size: usize,
    /// SO_SNDBUF of accepted sockets. Default 25188 (Tribes `txBufSize`).
    pub tx_buf_size: usize,
    /// TCP_NODELAY on accepted sockets. Default true.
    pub tcp_no_delay: bool,
    /// Times a worker that ran out of messages looks again, yielding the core before each
    /// look, before it goes to sleep; one idle worker of the pool looks at a time. Default
    /// 100. Not a Tribes setting: waking a sleeping thread costs more than looking while the
    /// next message is microseconds away, as it usually is under request/ACK traffic (an
    /// ACK round trip took half the time, synchronous session replication served a quarter
    /// more requests on a 2-core machine). 0 sleeps after the channel's own brief spin; a
    /// very large value keeps one worker yielding in a loop for as long as the pool is idle.
    pub idle_yields: u32,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 4000,
            auto_bind: 100,
            max_threads: 6,
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            read_ahead: 4 * 1024 * 1024,
            max_connections: 1024,
            idle_timeout: Some(Duration::from_secs(300)),
            max_partial_bytes: 512 * 1024 * 1024,
            selector_timeout: Duration::from_secs(5),
            rx_buf_size: 65536,
            tx_buf_size: 25188,
            tcp_no_delay: true,
            idle_yields: 100,
        }
    }
}

impl ReceiverConfig {
    /// Checks that the values can work.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tribes::transport::ReceiverConfig;
    /// assert!(ReceiverConfig::default().validate().is_ok());
    /// let spinning = ReceiverConfig { selector_timeout: Duration::ZERO, ..Default::default() };
    /// assert!(spinning.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_threads == 0 {
            return Err(invalid("max_threads", "must be at least 1"));
        }
        if self.auto_bind == 0 {
            return Err(invalid("auto_bind", "must be at least 1"));
        }
        if self.max_body_size == 0 || self.max_body_size > i32::MAX as usize {
            return Err(invalid("max_body_size", "must be within 1..=i32::MAX"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_partial_bytes < self.max_body_size {
            return Err(invalid(
                "max_partial_bytes",
                "must be at least max_body_size (or the largest frame could never arrive)",
            ));
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(invalid(
                "idle_timeout",
                "must be above zero (or None to keep idle connections)",
            ));
        }
        if self.selector_timeout.is_zero() {
            return Err(invalid(
                "selector_timeout",
                "must be above zero (zero would make the selector spin)",
            ));
        }
        Ok(())
    }
}

/// Sender settings (Tribes `PooledParallelSender` / `NioSender`).
///
/// ```
/// use std::time::Duration;
/// use tribes::transport::SenderConfig;
/// let cfg = SenderConfig::default();
/// assert_eq!(cfg.timeout, Duration::from_millis(3000));
/// assert_eq!(cfg.pool_size, 25);
/// ```
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Connect timeout, and the time each destination has to acknowledge a message from
    /// when it was written to it. Default 3000 ms (Tribes `timeout`). Connects are made one
    /// member after another, so a send to members of which k hang in connect takes up to
    /// (k + 1) times this; the healthy members still get their full time to answer instead
    /// of being reported as failed.
    pub timeout: Duration,
    /// Resends after an I/O failure (never after FAIL_ACK or a timeout). Default 1.
    pub max_retry_attempts: u32,
    /// Messages per connection before it is closed; `None` = unlimited (Tribes -1).
    /// Default `None`.
    pub keep_alive_count: Option<u64>,
    /// Age after which a connection is closed; `None` = unlimited (Tribes -1). Default
    /// `None`.
    pub keep_alive_time: Option<Duration>,
    /// Connections per destination. Default 25 (Tribes `poolSize`).
    pub pool_size: usize,
    /// SO_SNDBUF. Default 65536 (Tribes `txBufSize`).
    pub tx_buf_size: usize,
    /// SO_RCVBUF. Default 25188 (Tribes `rxBufSize`).
    pub rx_buf_size: usize,
    /// TCP_NODELAY. Default true.
    pub tcp_no_delay: bool,
    /// Connections idle longer than this are checked for a closed peer before reuse, so a
    /// no-ACK message is not written into a connection whose peer restarted. Default 100 ms.
    pub idle_check_after: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(3000),
            max_retry_attempts: 1,
            keep_alive_count: None,
            keep_alive_time: None,
            pool_size: 25,
            tx_buf_size: 65536,
            rx_buf_size: 25188,
            tcp_no_delay: true,
            idle_check_after: Duration::from_millis(100),
        }
    }
}

impl SenderConfig {
    /// Checks that the values can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than zero"));
        }
        if self.pool_size == 0 {
            return Err(invalid("pool_size", "must be at least 1"));
        }
        if self.keep_alive_count == Some(0) {
            return Err(invalid("keep_alive_count", "must be at least 1 (or None)"));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: &str) -> ConfigError {
    ConfigError {
        field,
        reason: reason.to_string(),
    }
}
