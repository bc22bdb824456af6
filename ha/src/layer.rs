//! The replication layer (Tomcat `ReplicationValve` + `JvmRouteBinderValve`) as a tower
//! [`Layer`] for axum: finds the request's session from its cookie, hands handlers a
//! [`Session`] extractor, and at the end of the request replicates what changed.
//!
//! With a synchronous manager ([`crate::ManagerConfig::sync`]) the response is sent only
//! after every member applied the change, so a client that lands on another node next sees
//! its own writes. A cookie naming a session this node has not seen makes it ask the
//! cluster first ([`crate::DeltaManager::fetch`]), so a request that overtook the session's
//! replication does not start a new session. Creations, renames and invalidations a
//! handler makes go out when it makes them without waiting (a request dropped half-way
//! still logs its user out everywhere); the request waits for their ACKs, and its delta's,
//! at its end, so handlers never wait on the network. The layer's own waits never hold a
//! runtime thread: synchronous replication's ACKs and the questions for an unknown session
//! are awaited on the channel's dispatch threads (the request's task sleeps until they
//! report), and waits for a change in flight are futures woken by the receiver.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use http::{header, HeaderValue, Request, Response, StatusCode};
use log::warn;
use parking_lot::Mutex;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::{Layer, Service};

use crate::error::SessionError;
use crate::manager::{Acked, DeltaManager, ACK_WAIT_LIMIT};
use crate::message::SessionEvent;
use crate::session::SessionId;

/// Counters of a [`ReplicationLayer`] (Tomcat `ReplicationValve` statistics).
#[derive(Debug, Default)]
pub struct LayerStats {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Requests that replicated something.
    pub sends: AtomicU64,
    /// Requests skipped by the URI filter.
    pub filtered: AtomicU64,
    /// Replication failures (logged; the response still goes out).
    pub errors: AtomicU64,
    /// Time spent replicating, microseconds.
    pub send_micros: AtomicU64,
}

/// Default of [`ReplicationLayer::fetch_grace`].
const DEFAULT_FETCH_GRACE: Duration = Duration::from_millis(2);

/// The read-your-writes wait a layer over a synchronous manager starts with (see
/// [`ReplicationLayer::read_your_writes`]): none. There a copy is behind only after a
/// failed replication, so there is nothing to wait for: the member asks for the session at
/// once.
pub const SYNC_VERSION_WAIT: Duration = Duration::ZERO;

/// The attributes of the cookies the layer sets (the session cookie and, with
/// read-your-writes, its version cookie).
///
/// Defaults: `Path=/`, `HttpOnly`, no `Domain`, not `Secure`, no `SameSite` (Tomcat's
/// defaults, except that its path is the context path). Behind HTTPS set `secure`.
///
/// ```
/// use ha::layer::{CookieAttributes, SameSite};
/// let attrs = CookieAttributes {
///     secure: true,
///     same_site: Some(SameSite::Lax),
///     ..CookieAttributes::default()
/// };
/// assert_eq!(attrs.render().unwrap(), "; Path=/; Secure; HttpOnly; SameSite=Lax");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieAttributes {
    /// `Path`. Default `/`.
    pub path: String,
    /// `Domain`. Default none (the host that answered).
    pub domain: Option<String>,
    /// `Secure`: sent over HTTPS only. Default false.
    pub secure: bool,
    /// `HttpOnly`: out of reach of page scripts. Default true.
    pub http_only: bool,
    /// `SameSite`. Default none (the browser's default).
    pub same_site: Option<SameSite>,
}

impl Default for CookieAttributes {
    fn default() -> Self {
        Self {
            path: "/".into(),
            domain: None,
            secure: false,
            http_only: true,
            same_site: None,
        }
    }
}

/// The `SameSite` cookie attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// Only with requests from the same site.
    Strict,
    /// Also with top-level navigations from other sites.
    Lax,
    /// With every request; browsers require `Secure` with it.
    None,
}

/// A setting of the layer that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerError {
    /// A cookie attribute that would break the `Set-Cookie` header or that browsers refuse.
    InvalidCookieAttribute {
        /// The attribute (`Path`, `Domain`, `SameSite`).
        attribute: &'static str,
        /// Why.
        reason: &'static str,
    },
}

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidCookieAttribute { attribute, reason } => {
                write!(f, "invalid session cookie attribute {attribute}: {reason}")
            }
        }
    }
}

impl std::error::Error for LayerError {}

impl CookieAttributes {
    /// The attributes as they follow the cookie's value in `Set-Cookie` (`; Path=/; ...`),
    /// or why they cannot.
    pub fn render(&self) -> Result<String, LayerError> {
        // A ';' would start another attribute, anything outside visible ASCII would make
        // the header invalid.
        let plain = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b';');
        let invalid = |attribute, reason| LayerError::InvalidCookieAttribute { attribute, reason };
        if !plain(&self.path) || !self.path.starts_with('/') {
            return Err(invalid(
                "Path",
                "must start with '/' and hold no ';', space or control character",
            ));
        }
        let mut out = format!("; Path={}", self.path);
        if let Some(domain) = &self.domain {
            if !plain(domain) {
                return Err(invalid(
                    "Domain",
                    "must hold no ';', space or control character",
                ));
            }
            out.push_str(&format!("; Domain={domain}"));
        }
        if self.secure {
            out.push_str("; Secure");
        }
        if self.http_only {
            out.push_str("; HttpOnly");
        }
        match self.same_site {
            Some(SameSite::None) if !self.secure => {
                return Err(invalid(
                    "SameSite",
                    "None needs Secure (browsers drop the cookie otherwise)",
                ));
            }
            Some(SameSite::Strict) => out.push_str("; SameSite=Strict"),
            Some(SameSite::Lax) => out.push_str("; SameSite=Lax"),
            Some(SameSite::None) => out.push_str("; SameSite=None"),
            None => {}
        }
        Ok(out)
    }
}

struct Config {
    manager: Arc<DeltaManager>,
    cookie: String,
    filter: Option<Regex>,
    /// Shared by every layer built from the same [`ReplicationLayer::new`], whatever
    /// builder calls came after, so a clone taken early reads the same counters.
    stats: Arc<LayerStats>,
    /// Read-your-writes: how long a request waits for a change its client already saw.
    read_your_writes: Option<Duration>,
    /// How long a request for a session this node has not seen waits for its replication
    /// before asking the members (asynchronous managers only).
    fetch_grace: Duration,
    /// The cookie that carries the session version the client last saw: `<cookie>_V`.
    version_cookie: String,
    /// What follows each cookie's value in `Set-Cookie` ([`CookieAttributes::render`]).
    cookie_attributes: String,
}

/// Puts a [`Session`] into every request and replicates its changes at the end.
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use ha::{DeltaManager, ManagerConfig, layer::{ReplicationLayer, Session}};
///
/// async fn counter(session: Session) -> String {
///     let n = session.get::<u64>("n").unwrap().unwrap_or(0) + 1;
///     session.insert("n", &n).unwrap();
///     n.to_string()
/// }
///
/// let manager = DeltaManager::new("/", ManagerConfig::default());
/// let app: Router = Router::new()
///     .route("/counter", get(counter))
///     .layer(ReplicationLayer::new(manager).filter(r".*\.(png|css|js)$").unwrap());
/// ```
#[derive(Clone)]
pub struct ReplicationLayer {
    cfg: Arc<Config>,
}

impl ReplicationLayer {
    /// A layer over `manager`, cookie `JSESSIONID`, no filter.
    ///
    /// The layer's waits are futures bounded by tokio timers: run it on a runtime with
    /// timers (`#[tokio::main]` and `Builder::enable_all` have them). They hold no thread
    /// when the cluster's channel has a `MessageDispatchInterceptor` (as
    /// [`Cluster::with_defaults`](crate::Cluster::with_defaults) builds it); without one,
    /// sends that wait for ACKs wait on the request's thread (`Cluster::register` warns of
    /// that for a synchronous manager).
    pub fn new(manager: Arc<DeltaManager>) -> Self {
        if let Err(e) = manager.config().validate(manager.context()) {
            // `Cluster::register` refuses such a manager; used alone it would still make
            // ids (with its route) that requests could not name.
            warn!(target: "ha::layer", "{e}: requests may not find their sessions");
        }
        let sync = manager.config().sync;
        Self {
            cfg: Arc::new(Config {
                manager,
                cookie: "JSESSIONID".into(),
                filter: None,
                stats: Arc::default(),
                // With synchronous replication a copy is behind only where a change could not
                // be replicated (a member that froze past the send timeout and came back
                // with the change still in its socket): the version cookie lets it notice
                // and fetch, instead of answering from its old copy.
                read_your_writes: sync.then_some(SYNC_VERSION_WAIT),
                fetch_grace: DEFAULT_FETCH_GRACE,
                version_cookie: "JSESSIONID_V".into(),
                // The defaults always render.
                cookie_attributes: CookieAttributes::default().render().unwrap_or_default(),
            }),
        }
    }

    /// The session cookie's name (default `JSESSIONID`).
    pub fn cookie_name(self, name: impl Into<String>) -> Self {
        self.with(|c| c.cookie = name.into())
    }

    /// The attributes of the cookies the layer sets (default `Path=/; HttpOnly`); an
    /// error for attributes that would break the header or that browsers refuse.
    ///
    /// ```no_run
    /// use ha::{DeltaManager, ManagerConfig};
    /// use ha::layer::{CookieAttributes, ReplicationLayer, SameSite};
    /// let manager = DeltaManager::new("/", ManagerConfig::default());
    /// let layer = ReplicationLayer::new(manager).cookie_attributes(CookieAttributes {
    ///     secure: true,
    ///     same_site: Some(SameSite::Strict),
    ///     ..CookieAttributes::default()
    /// })?;
    /// # Ok::<(), ha::layer::LayerError>(())
    /// ```
    pub fn cookie_attributes(self, attributes: CookieAttributes) -> Result<Self, LayerError> {
        let rendered = attributes.render()?;
        Ok(self.with(|c| c.cookie_attributes = rendered))
    }

    /// Requests whose path matches `regex` (anchored: the whole path) are not replicated,
    /// e.g. static resources.
    pub fn filter(self, regex: &str) -> Result<Self, regex::Error> {
        let re = Regex::new(&format!("^(?:{regex})$"))?;
        Ok(self.with(|c| c.filter = Some(re)))
    }

    /// Read-your-writes for asynchronous replication behind a non-sticky balancer (off by
    /// default for an asynchronous manager, as in Tribes; on, with no wait, for a
    /// synchronous one: see [`SYNC_VERSION_WAIT`]). A `wait` of zero asks the members as
    /// soon as the copy is found behind. Each response that changed the session also sets a second
    /// cookie, `<cookie name>_V`, to `<session id base>-<version>-<origin>` (the change's
    /// version, and in hex the node that made it); a request whose node
    /// holds an older copy of that session, because the change is still on its way, waits
    /// up to `wait` for it and then asks the members
    /// ([`DeltaManager::version_reached`](crate::DeltaManager::version_reached), then
    /// [`DeltaManager::fetch_version`](crate::DeltaManager::fetch_version)); the wait holds
    /// no thread, and needs a runtime with timers (`#[tokio::main]` has them). A client thus never sees
    /// its own session go back, without waiting for every member on every request as
    /// synchronous replication does. A few milliseconds is plenty on a LAN: the wait ends as
    /// soon as the change is applied.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use ha::{DeltaManager, ManagerConfig, layer::ReplicationLayer};
    /// let manager = DeltaManager::new("/", ManagerConfig { sync: false, ..ManagerConfig::default() });
    /// let layer = ReplicationLayer::new(manager).read_your_writes(Duration::from_millis(20));
    /// ```
    pub fn read_your_writes(self, wait: Duration) -> Self {
        self.with(|c| c.read_your_writes = Some(wait))
    }

    /// No version cookie and no version check: with synchronous replication (where they
    /// are on by default, waiting [`SYNC_VERSION_WAIT`]) a member that missed a change,
    /// such as one that froze past the send timeout, then answers from its old copy until
    /// it catches up.
    ///
    /// ```no_run
    /// use ha::{DeltaManager, ManagerConfig, layer::ReplicationLayer};
    /// let manager = DeltaManager::new("/", ManagerConfig { sync: true, ..ManagerConfig::default() });
    /// let layer = ReplicationLayer::new(manager).without_read_your_writes();
    /// ```
    pub fn without_read_your_writes(self) -> Self {
        self.with(|c| c.read_your_writes = None)
    }

    /// How long a request naming a session this node has not seen (or only seen created,
    /// without its first change) waits for that session's replication to arrive before it
    /// asks the members for it. Default 2 ms; only with asynchronous replication (with
    /// synchronous replication a session reached every member before its client got the
    /// cookie, so the members are asked at once).
    ///
    /// Behind a round-robin balancer a session's second request often overtakes its
    /// creation, which is then a fraction of a millisecond away: waiting for it (no thread
    /// waits) costs less than a question and an answer to another member, which is what
    /// happens when the grace ends. Zero asks at once, and then a copy that has the
    /// creation but not yet the first change is taken as it is.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use ha::{DeltaManager, ManagerConfig, layer::ReplicationLayer};
    /// let manager = DeltaManager::new("/", ManagerConfig { sync: false, ..ManagerConfig::default() });
    /// let layer = ReplicationLayer::new(manager).fetch_grace(Duration::from_millis(5));
    /// ```
    pub fn fetch_grace(self, grace: Duration) -> Self {
        self.with(|c| c.fetch_grace = grace)
    }

    /// Counters.
    pub fn stats(&self) -> &LayerStats {
        &self.cfg.stats
    }

    fn with(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config {
            manager: Arc::clone(&self.cfg.manager),
            cookie: self.cfg.cookie.clone(),
            filter: self.cfg.filter.clone(),
            stats: Arc::clone(&self.cfg.stats),
            read_your_writes: self.cfg.read_your_writes,
            fetch_grace: self.cfg.fetch_grace,
            version_cookie: String::new(),
            cookie_attributes: self.cfg.cookie_attributes.clone(),
        };
        f(&mut cfg);
        cfg.version_cookie = format!("{}_V", cfg.cookie);
        Self { cfg: Arc::new(cfg) }
    }
}

impl<S> Layer<S> for ReplicationLayer {
    type Service = ReplicationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplicationService {
            inner,
            cfg: Arc::clone(&self.cfg),
        }
    }
}

/// The service [`ReplicationLayer`] produces.
#[derive(Clone)]
pub struct ReplicationService<S> {
    inner: S,
    cfg: Arc<Config>,
}

impl<S, B, R> Service<Request<B>> for ReplicationService<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let cfg = Arc::clone(&self.cfg);
        cfg.stats.requests.fetch_add(1, Ordering::Relaxed);
        let filtered = cfg
            .filter
            .as_ref()
            .is_some_and(|re| re.is_match(req.uri().path()));
        let requested = requested_session(&req, &cfg);
        // With read-your-writes: the change of this session its client last saw, as
        // (version, origin): `<base>-<version>-<origin hex>` (or `<base>-<version>`).
        let seen_version = requested
            .as_ref()
            .filter(|_| cfg.read_your_writes.is_some())
            .and_then(|id| {
                let value = cookies(&req, &cfg.version_cookie).into_iter().next()?;
                let mut parts = value.split('-');
                let (base, version) = (parts.next()?, parts.next()?.parse::<u64>().ok()?);
                let origin = match parts.next() {
                    Some(o) => u64::from_str_radix(o, 16).ok()?,
                    None => 0,
                };
                (base == id.base()).then_some((version, origin))
            });
        // Tower's rule: call the service that was polled ready, keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // What this request replicates; its sends go out at once, and the request
            // waits for their ACKs (synchronous replication) at its end.
            let mut acked = Acked::default();
            let (current, cookie_changed) = match requested {
                Some(id) => cfg.find_session(id, seen_version, &mut acked).await,
                None => (None, false),
            };
            let session = Session {
                inner: Arc::new(Mutex::new(Handle {
                    manager: Arc::clone(&cfg.manager),
                    id: current,
                    set_cookie: cookie_changed,
                    clear_cookie: false,
                    acked,
                })),
            };
            req.extensions_mut().insert(session.clone());
            let mut resp = inner.call(req).await?;
            let (id, set_cookie, clear_cookie, mut acked) = {
                let mut h = session.inner.lock();
                // Where the session is now (`current` follows a rename that landed while
                // the handler ran); gone, it is where the handler left it.
                let id = h.current().or_else(|| h.id.clone());
                (
                    id,
                    h.set_cookie,
                    h.clear_cookie,
                    std::mem::take(&mut h.acked),
                )
            };
            if id.is_none() && clear_cookie {
                // An expired cookie: the client stops sending an id nobody holds.
                let mut expired = vec![&cfg.cookie];
                if cfg.read_your_writes.is_some() {
                    // Its version cookie names a session that is gone too.
                    expired.push(&cfg.version_cookie);
                }
                for name in expired {
                    let value = format!("{name}=; Max-Age=0{}", cfg.cookie_attributes);
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
            }
            // The filter skips the delta, not the creations, renames and invalidations the
            // handler made (those went out when it made them).
            let delta_of = id.clone().filter(|_| !filtered);
            if filtered && id.is_some() {
                cfg.stats.filtered.fetch_add(1, Ordering::Relaxed);
            }
            let mut sent = None;
            if let Some(id) = &delta_of {
                // Changes held back for a version that has not come (another node changed
                // this session meanwhile): a whole copy first, so this change goes out
                // above them with them applied. At once when nothing is held back.
                bounded(cfg.manager.settle_acked(id)).await;
                // Without read-your-writes nobody waits for an asynchronous delta, so it may
                // share a write with the deltas of concurrent requests; except the first
                // change of a new (or renamed) session, which another node's request may be
                // waiting for (`fetch_grace`).
                let lazy = cfg.read_your_writes.is_none() && !set_cookie;
                sent = cfg.manager.complete_request(id, &mut acked, lazy);
            }
            if acked.sent() > 0 {
                let start = Instant::now();
                // With synchronous replication the dispatch threads wait for the members'
                // ACKs; this task sleeps until they report (no runtime thread waits). The
                // limit only matters if a message is dropped on its way down the stack
                // (its handler then never hears).
                let outcome = if acked.waits() {
                    tokio::time::timeout(ACK_WAIT_LIMIT, acked).await
                } else {
                    Ok(acked.await)
                };
                match outcome {
                    Ok(Ok(())) => cfg.stats.sends.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(e)) => {
                        // The manager already said so at warn level, naming the members.
                        log::debug!(target: "ha::layer", "the request's replication failed: {e}");
                        cfg.stats.errors.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => {
                        let session = id.as_ref().map(ToString::to_string).unwrap_or_default();
                        warn!(target: "ha::layer", "replication of session {session}: no outcome after {ACK_WAIT_LIMIT:?} (a message dropped on its way down?); answering anyway");
                        cfg.stats.errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
                cfg.stats
                    .send_micros
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            if let Some(id) = id {
                if set_cookie {
                    let value = format!("{}={id}{}", cfg.cookie, cfg.cookie_attributes);
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                let changed_version = cfg.read_your_writes.and_then(|_| {
                    cookie_change(
                        sent,
                        || cfg.manager.last_change(&id),
                        seen_version,
                        set_cookie,
                    )
                });
                if let Some((version, origin)) = changed_version {
                    let value = format!(
                        "{}={}-{version}-{origin:x}{}",
                        cfg.version_cookie,
                        id.base(),
                        cfg.cookie_attributes
                    );
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
            }
            Ok(resp)
        })
    }
}

impl Config {
    /// The session a request names, found without holding a runtime thread: brought up to
    /// the version its client saw (read-your-writes: wait for the change in flight, then ask
    /// the members), fetched from the members if this node has not seen it, and taken over
    /// under this node's route (the rename goes out at once, `acked` hears how). Returns
    /// the id to use and whether the client needs a new cookie.
    async fn find_session(
        self: &Arc<Self>,
        id: SessionId,
        seen_version: Option<(u64, u64)>,
        acked: &mut Acked,
    ) -> (Option<SessionId>, bool) {
        let manager = &self.manager;
        let mut asked = false;
        if let (Some(seen), Some(wait)) = (seen_version, self.read_your_writes) {
            if !manager.holds(&id, seen) {
                // No wait at all when there is none: a zero timer still lasts a tick of the
                // runtime's clock (a millisecond).
                let arrived = !wait.is_zero()
                    && tokio::time::timeout(wait, manager.change_reached(&id, seen))
                        .await
                        .unwrap_or(false);
                if !arrived {
                    asked = true;
                    if !bounded(manager.fetch_change_acked(&id, seen))
                        .await
                        .unwrap_or(false)
                    {
                        warn!(target: "ha::layer", "session {id}: this node's copy still lacks v{} (from {:x}), which its client saw", seen.0, seen.1);
                    }
                }
            }
        }
        if asked {
            // The members were asked already; asking again would not bring more.
            bounded(manager.settle_acked(&id)).await;
            return self.take_over(id, acked);
        }
        // An id this node has not seen, or only its creation (the first change travels
        // just behind it): with asynchronous replication that change is usually a moment
        // away, so give it that moment before asking the members. A copy without the
        // session's first change would look like a new session to the handler.
        if !manager.config().sync && !self.fetch_grace.is_zero() && manager.awaits_first_change(&id)
        {
            let arrived = tokio::time::timeout(self.fetch_grace, manager.version_reached(&id, 1))
                .await
                .unwrap_or(false);
            if !arrived && manager.knows(&id) {
                bounded(manager.fetch_version_acked(&id, 1)).await;
            }
        }
        // Not seen at all: ask the members before the handler sees no session.
        bounded(manager.fetch_acked(&id)).await;
        // Changes held back for a version that has not come: a whole copy first.
        bounded(manager.settle_acked(&id)).await;
        self.take_over(id, acked)
    }

    /// The id to use for a session found (or not) here: under this node's route after a
    /// failover with a sticky balancer (the rename goes out at once), and whether the
    /// client needs a new cookie.
    fn take_over(&self, id: SessionId, acked: &mut Acked) -> (Option<SessionId>, bool) {
        let manager = &self.manager;
        match manager.rebind_unannounced(&id) {
            Some((new, renamed)) => {
                if let Some(event) = renamed {
                    manager.announce(event, acked);
                }
                (Some(new), true)
            }
            None if manager.contains(&id) => (Some(id), false),
            None => (None, false),
        }
    }
}

/// Waits for a question to the members at most [`ACK_WAIT_LIMIT`]. It ends when their ACKs
/// are in or the send times out (3 s), unless a message is dropped on its way down the
/// stack without a word (its handler never hears); the request then goes on without the
/// answer rather than wait forever.
async fn bounded<F: Future>(question: F) -> Option<F::Output> {
    let answer = tokio::time::timeout(ACK_WAIT_LIMIT, question).await.ok();
    if answer.is_none() {
        warn!(target: "ha::layer", "no answer from the members after {ACK_WAIT_LIMIT:?} (a message dropped on its way down?); going on without it");
    }
    answer
}

/// The change (version, origin) the version cookie names after a request, or `None` when
/// the client's cookie stays as it is.
///
/// The change this request `sent`; without one, the newest here (`last`), unless the
/// client `seen` one of that same version: another node's change of it must not stand in
/// for the client's own. Nor may it when the request sent one: by the time the response
/// goes out, another node's change of the same version may have merged here and be the
/// copy's `last`. A new session cookie (`set_cookie`) always gets a version cookie.
fn cookie_change(
    sent: Option<(u64, u64)>,
    last: impl FnOnce() -> Option<(u64, u64)>,
    seen: Option<(u64, u64)>,
    set_cookie: bool,
) -> Option<(u64, u64)> {
    let change = sent.or_else(|| {
        let last = last()?;
        match seen {
            Some(seen) if seen.0 == last.0 && !set_cookie => Some(seen),
            _ => Some(last),
        }
    })?;
    (set_cookie || seen != Some(change)).then_some(change)
}

/// Whether a cookie value could name a session made by a manager
/// ([`SessionId::is_well_formed`]). Anything else is no session at all, so a forged or
/// garbled cookie costs neither a store lookup with a huge key nor a question to every
/// member (the request gets a new session if its handler makes one).
fn could_be_session_id(value: &str) -> bool {
    let ok = SessionId::is_well_formed(value);
    if !ok {
        log::debug!(target: "ha::layer", "ignoring a session cookie that no manager makes ({} bytes)", value.len());
    }
    ok
}

/// The values of every cookie called `name`, in header order. Read as bytes: a byte that
/// is not visible ASCII in another cookie (browsers send what sites set) costs that cookie
/// only, not the whole header, and with it the session.
fn cookies<B>(req: &Request<B>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            let (k, v) = (kv[..eq].trim_ascii(), kv[eq + 1..].trim_ascii());
            (k == name.as_bytes()).then(|| std::str::from_utf8(v).ok().map(str::to_owned))?
        })
        .collect()
}

/// The session a request names. Browsers send two cookies of one name when the site set
/// them for different paths; as Tomcat does, the first that names a session held here
/// wins (under any route), else the first that could name one.
fn requested_session<B>(req: &Request<B>, cfg: &Config) -> Option<SessionId> {
    let candidates: Vec<SessionId> = cookies(req, &cfg.cookie)
        .into_iter()
        .filter(|v| could_be_session_id(v))
        .map(SessionId::new)
        .collect();
    let held = candidates.iter().position(|id| cfg.manager.knows(id));
    candidates.into_iter().nth(held.unwrap_or(0))
}

struct Handle {
    manager: Arc<DeltaManager>,
    id: Option<SessionId>,
    set_cookie: bool,
    /// The session was invalidated: tell the client to drop its cookie (unless a new
    /// session replaced it).
    clear_cookie: bool,
    /// The request's replication: the creations, renames and invalidations the handler
    /// makes go out at once (a handler never waits on the network); the request waits
    /// for their ACKs at its end.
    acked: Acked,
}

impl Handle {
    /// The session's id as held now. A message from another node can move the session
    /// while this request runs (another route: a rename this node missed; or a new id: a
    /// login there); the request follows it, and its client gets the new cookie.
    fn current(&mut self) -> Option<SessionId> {
        self.with(|_| ())?;
        self.id.clone()
    }

    /// Runs `f` on the session wherever it is held now (see [`Handle::current`]).
    fn with<R>(&mut self, f: impl FnOnce(&mut crate::Session) -> R) -> Option<R> {
        let id = self.id.as_ref()?;
        let (now, r) = self.manager.with_current(id, f)?;
        if now != *id {
            self.id = Some(now);
            self.set_cookie = true;
        }
        Some(r)
    }

    /// Tells the members about a change the handler made here (see [`Acked`]).
    fn announce(&mut self, event: SessionEvent) {
        self.manager.announce(event, &mut self.acked);
    }
}

/// The request's session, as an axum extractor. Created on the first `insert`.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Mutex<Handle>>,
}

impl Session {
    /// The session id, once there is a session.
    pub fn id(&self) -> Option<SessionId> {
        self.inner.lock().id.clone()
    }

    /// Reads an attribute.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, SessionError> {
        self.inner
            .lock()
            .with(|s| s.get::<T>(name))
            .unwrap_or(Ok(None))
    }

    /// Sets an attribute, creating the session (and its cookie) if needed. Creating one
    /// fails with [`SessionError::TooManySessions`] when the node holds
    /// [`ManagerConfig::max_active_sessions`](crate::ManagerConfig::max_active_sessions).
    pub fn insert<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<(), SessionError> {
        let mut h = self.inner.lock();
        if let Some(done) = h.with(|s| s.insert(name, value)) {
            return done;
        }
        let (id, created) = h.manager.create_session_unannounced()?;
        h.announce(created);
        h.id = Some(id.clone());
        h.set_cookie = true;
        h.manager
            .with_session(&id, |s| s.insert(name, value))
            .unwrap_or(Ok(()))
    }

    /// Removes an attribute.
    pub fn remove(&self, name: &str) -> bool {
        self.inner.lock().with(|s| s.remove(name)).unwrap_or(false)
    }

    /// The attribute names (empty without a session).
    pub fn names(&self) -> Vec<String> {
        (self.inner.lock())
            .with(|s| s.names().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// When the session was created, ms since the Unix epoch (`None` without a session).
    pub fn created_ms(&self) -> Option<i64> {
        self.inner.lock().with(|s| s.created_ms())
    }

    /// When the session was last used (this request counts), ms since the Unix epoch
    /// (`None` without a session).
    pub fn last_access_ms(&self) -> Option<i64> {
        self.inner.lock().with(|s| s.last_access_ms())
    }

    /// This session's max inactive interval, seconds; zero or negative: it never expires
    /// (`None` without a session).
    pub fn max_inactive_secs(&self) -> Option<i64> {
        self.inner.lock().with(|s| s.max_inactive_secs())
    }

    /// Changes this session's max inactive interval, seconds (zero or negative: never
    /// expires), here and, with the request's other changes, on every member. Returns
    /// false without a session.
    ///
    /// ```no_run
    /// # use ha::layer::Session;
    /// async fn remember_me(session: Session) -> &'static str {
    ///     session.insert("user", "ada").unwrap();
    ///     session.set_max_inactive_secs(30 * 24 * 3600); // a month
    ///     "ok"
    /// }
    /// ```
    pub fn set_max_inactive_secs(&self, secs: i64) -> bool {
        (self.inner.lock())
            .with(|s| s.set_max_inactive_secs(secs))
            .is_some()
    }

    /// Gives the session a new id (here and on every member) and sends the client the new
    /// cookie: call it when a user logs in, against session fixation. Does nothing without
    /// a session.
    pub fn cycle_id(&self) {
        let mut h = self.inner.lock();
        let Some(old) = h.current() else {
            return;
        };
        if let Some((new, renamed)) = h.manager.cycle_id_unannounced(&old) {
            h.announce(renamed);
            h.id = Some(new);
            h.set_cookie = true;
        }
    }

    /// Invalidates the session here and everywhere, and tells the client to drop its
    /// cookie (unless the handler starts a new session afterwards).
    pub fn invalidate(&self) {
        let mut h = self.inner.lock();
        let current = h.current();
        if h.id.take().is_some() {
            if let Some(expired) = current.and_then(|id| h.manager.invalidate_unannounced(&id)) {
                h.announce(expired);
            }
            h.clear_cookie = true;
            h.set_cookie = false;
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Self>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "ha::layer::ReplicationLayer is not installed",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{deltas_setting, Receiving};
    use crate::ManagerConfig;

    /// The `Session` a handler gets for a request naming `id`.
    fn request_for(manager: &Arc<DeltaManager>, id: &SessionId) -> Session {
        Session {
            inner: Arc::new(Mutex::new(Handle {
                manager: Arc::clone(manager),
                id: Some(id.clone()),
                set_cookie: false,
                clear_cookie: false,
                acked: Acked::default(),
            })),
        }
    }

    #[test]
    fn cookie_attributes_render_and_refuse_what_would_break_the_header() {
        assert_eq!(
            CookieAttributes::default().render().unwrap(),
            "; Path=/; HttpOnly"
        );
        let all = CookieAttributes {
            path: "/shop".into(),
            domain: Some("example.com".into()),
            secure: true,
            http_only: false,
            same_site: Some(SameSite::None),
        };
        assert_eq!(
            all.render().unwrap(),
            "; Path=/shop; Domain=example.com; Secure; SameSite=None"
        );
        let bad = [
            CookieAttributes {
                path: "/a; Secure".into(),
                ..Default::default()
            },
            CookieAttributes {
                path: "shop".into(),
                ..Default::default()
            },
            CookieAttributes {
                domain: Some("a\r\nSet-Cookie: x=1".into()),
                ..Default::default()
            },
            CookieAttributes {
                same_site: Some(SameSite::None),
                ..Default::default()
            },
        ];
        for attrs in bad {
            assert!(attrs.render().is_err(), "{attrs:?}");
        }
    }

    #[test]
    fn the_version_cookie_names_the_requests_own_change_after_a_concurrent_one_merges() {
        let rx = Receiving::new(ManagerConfig::default());
        let manager = &rx.manager;
        let id = SessionId::new("s");
        let (at_v1, base) = deltas_setting(&id, &["a"]);
        rx.deliver(SessionEvent::Delta(base[0].clone()));
        // A request here sets x, making v2 from this node.
        let session = request_for(manager, &id);
        session.insert("x", &1u32).unwrap();
        let mut acked = std::mem::take(&mut session.inner.lock().acked);
        let sent = manager
            .complete_request(&id, &mut acked, false)
            .expect("the request's change went out");
        assert_eq!(sent.0, 2);
        // Before its response is written, another node's v2 merges here.
        let mut other = at_v1.clone();
        other.insert("y", &2u32).unwrap();
        let theirs = other.take_delta_from(sent.1 + 1).unwrap();
        rx.deliver(SessionEvent::Delta(theirs));
        let last = manager.last_change(&id).unwrap();
        assert_eq!(last.0, 2);
        assert_ne!(last, sent, "the copy's newest is the other node's change");
        // The client is told its own change, which another node may lack, not the other.
        assert_eq!(
            cookie_change(Some(sent), || Some(last), None, false),
            Some(sent)
        );
        assert!(manager.holds(&id, sent));
    }

    #[test]
    fn the_version_cookie_stays_when_nothing_newer_than_the_clients_change_is_here() {
        let never = || -> Option<(u64, u64)> { unreachable!("not asked when a change went out") };
        // A read-only request: the copy's newest of the client's version is another
        // node's change; the client keeps naming its own.
        assert_eq!(
            cookie_change(None, || Some((3, 9)), Some((3, 7)), false),
            None
        );
        // Something newer landed: the client is told.
        assert_eq!(
            cookie_change(None, || Some((4, 9)), Some((3, 7)), false),
            Some((4, 9))
        );
        // Same change as the client's: no new cookie.
        assert_eq!(
            cookie_change(None, || Some((3, 7)), Some((3, 7)), false),
            None
        );
        // A new session id always comes with a version cookie.
        assert_eq!(
            cookie_change(None, || Some((3, 9)), Some((3, 7)), true),
            Some((3, 9))
        );
        assert_eq!(
            cookie_change(Some((5, 1)), never, Some((4, 1)), false),
            Some((5, 1))
        );
        // This copy is older than the client's change, and asking the members did not
        // bring it (it was lost with a node): the cookie names what this answer was
        // served from, so later requests stop waiting for a change that may never come.
        assert_eq!(
            cookie_change(None, || Some((2, 9)), Some((3, 7)), false),
            Some((2, 9))
        );
        // No session here at all: nothing to name.
        assert_eq!(cookie_change(None, || None, None, false), None);
    }

    #[test]
    fn a_request_follows_its_session_through_a_login_on_another_node() {
        let rx = Receiving::new(ManagerConfig::default());
        let manager = &rx.manager;
        let old = SessionId::new("s");
        let (_, d) = deltas_setting(&old, &["user"]);
        rx.deliver(SessionEvent::Delta(d[0].clone()));
        let session = request_for(manager, &old);
        session.insert("cart", &1u32).unwrap();
        // The client logs in on another node meanwhile: s -> t.
        rx.deliver(SessionEvent::ChangeSessionId {
            old: old.clone(),
            new: SessionId::new("t"),
        });
        session.insert("cart", &2u32).unwrap();
        assert_eq!(manager.len(), 1, "no second, empty session");
        let new = SessionId::new("t");
        assert_eq!(session.id(), Some(new.clone()));
        assert!(
            session.inner.lock().set_cookie,
            "the client learns the new id"
        );
        let held = manager.session(&new).unwrap();
        assert_eq!(held.get::<u32>("cart").unwrap(), Some(2));
        assert_eq!(held.get::<u32>("user").unwrap(), Some(1));
    }

    #[test]
    fn a_request_follows_its_session_when_a_missed_rename_lands_meanwhile() {
        let rx = Receiving::new(ManagerConfig::default());
        let manager = &rx.manager;
        // Another node's session, copied here at v1 under its route n1.
        let old = SessionId::new("s.n1");
        let mut primary = crate::Session::new(old.clone(), 0, 60);
        primary.insert("count", &1u32).unwrap();
        primary.access(1);
        rx.deliver(SessionEvent::Delta(primary.take_delta().unwrap()));

        // A request for it runs here and reads it ...
        let session = request_for(manager, &old);
        assert_eq!(session.get::<u32>("count").unwrap(), Some(1));
        // ... when a change from a node that had moved it to route n3 lands (this node
        // missed the rename): the copy takes that name.
        primary.insert("count", &2u32).unwrap();
        let mut moved = primary.take_delta().unwrap();
        let new = SessionId::new("s.n3");
        moved.session_id = new.clone();
        rx.deliver(SessionEvent::Delta(moved));

        // The request goes on with the same session, now named s.n3, and tells its client.
        assert_eq!(session.get::<u32>("count").unwrap(), Some(2));
        session.insert("count", &3u32).unwrap();
        assert_eq!(session.id(), Some(new.clone()));
        assert!(session.inner.lock().set_cookie);
        assert_eq!(manager.len(), 1, "no new session");
        let held = manager.session(&new).unwrap();
        assert_eq!(held.get::<u32>("count").unwrap(), Some(3));
    }
}
