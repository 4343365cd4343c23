//! The embedded MQTT broker (3.1.1 and 5) that local sensors publish to.
//!
//! Every accepted PUBLISH is handed to the gateway as an [`Inbound`] over a bounded channel. For
//! QoS 1/2 the broker waits for the gateway's [`IngestReply`] before it writes PUBACK / PUBREC:
//! *acknowledged means stored*. While a connection waits it keeps reading, up to
//! [`BrokerSettings::max_inbound_pending`] unanswered messages; acks go out in arrival order. At
//! that bound the connection stops reading, so a slow store slows publishers through their
//! in-flight windows instead of dropping anything acknowledged.
//! (That is MQTT 3.1.1; an MQTT 5 client is told the bound as the receive maximum, and one that
//! exceeds it is disconnected with 0x93, MQTT 5 §3.3.4.)
//!
//! Layout: `codec` adapts rumqttc's v4/v5 codecs to one internal packet set; `session` is the
//! sans-IO per-client state (queues, in-flight window, packet ids); `router` holds sessions and
//! retained messages; `connection` is the per-socket task that drives them; `tls` holds the
//! TLS listeners' rustls configurations and reads a client certificate's name.
//!
//! Policies worth knowing:
//! - Wills are published (to local subscribers, and to ingest with `reply: None`) on every end
//!   except DISCONNECT and broker shutdown: network error, keep-alive expiry, protocol
//!   violation, takeover, and a 3.1.1 connection closed because the gateway refused a publish.
//! - Offline persistent sessions queue QoS 1/2 only (mosquitto's default); QoS 0 to an offline
//!   client is not a counted drop.
//! - MQTT 5 sessions: a session outlives its connection for the CONNECT's session expiry
//!   interval (0: not at all), capped at [`BrokerSettings::max_session_expiry`] (0xFFFFFFFF,
//!   "never", included; CONNACK tells the client the value in force), which a DISCONNECT may
//!   change (but not raise from 0); an offline session is discarded when it runs out (checked
//!   every `EXPIRY_TICK`, counted in [`BrokerStats::sessions_expired`]). A 3.1.1 session with
//!   clean session 0 is kept [`BrokerSettings::session_expiry_311`] after its connection ends,
//!   the same way. A will with a delay waits
//!   in the router and is published when the delay or the session ends, whichever is first,
//!   unless the client reconnects before (a takeover counts as reconnecting).
//! - MQTT 5 messages: payload format indicator, content type, response topic, correlation
//!   data and user properties pass from publisher (and will) to v5 subscribers unchanged;
//!   3.1.1 subscribers get the payload only. A message expiry interval (0 read as none, as
//!   mosquitto does) is counted from receipt: a queued message (online backlog, offline
//!   queue, retained store) past it is dropped, counted in
//!   [`BrokerStats::messages_expired`], and a delivered one carries the time left.
//! - MQTT 5 subscriptions: no-local, retain-as-published, retain handling, subscription
//!   identifiers (every matching subscription's on the one delivery), and shared
//!   subscriptions `$share/{group}/{filter}`: each message to one member per group, round
//!   robin in client id order among connected members (offline ones only if none is
//!   connected), no retained messages on a shared subscribe. 3.1.1 clients' `$share/...`
//!   filters are ordinary filters.
//! - MQTT 5 topic aliases from clients: up to 16 per connection (announced in CONNACK);
//!   alias 0 or above 16 closes with DISCONNECT 0x94, an alias never set with 0x82. The
//!   broker never sends aliases. [`Broker::set_max_keep_alive`] caps v5 clients' keep-alive
//!   (CONNACK server keep-alive); 3.1.1 clients' is kept.
//! - Sessions that outlive their connections, and retained messages, survive a restart when
//!   the gateway gives the broker a place to write them ([`Broker::restore`], the `persist`
//!   module): subscriptions, queued and in-flight QoS 1/2 messages (resent with their packet
//!   ids), inbound QoS 2 ids awaiting PUBREL, pending delayed wills. A publisher's PUBACK /
//!   PUBREC waits until what its message changed there is durable, as SUBACK waits for the
//!   subscription and CONNACK for the session: a session-present flag, a granted
//!   subscription and an acknowledged message hold across a crash. QoS 0 messages (retained
//!   ones change the retained store) are routed without waiting, but a connection stops
//!   reading while `max_inbound_pending` of their writes are not yet durable.
//!
//! Bounds on what outlives a connection (the gateway keeps it outside its storage quota):
//! - Retained messages: [`BrokerSettings::max_retained`] and `max_retained_bytes` (topic +
//!   payload + properties). A retained message on a topic not held yet is not kept past either
//!   (expired ones are swept first): an MQTT 5 QoS 1/2 publish is refused whole with
//!   PUBACK/PUBREC 0x97 (not handed to the gateway, not delivered); otherwise (3.1.1, QoS 0,
//!   wills, [`BrokerHandle::publish`]) the message goes on as usual and only is not retained.
//!   Replacing and clearing a topic held always work; a replacement may take the bytes up to
//!   an eighth over the bound, and one past that is refused the same way (where the publisher
//!   is not told, the topic's older message is cleared rather than left standing). Counted in
//!   [`BrokerStats::retained_refused`].
//! - Persistent sessions: [`BrokerSettings::max_sessions`], connected or not; a CONNECT
//!   starting one more is refused (3.1.1: 0x03; MQTT 5: 0x97), counted in
//!   [`BrokerStats::sessions_refused`]. Resuming one's own session and clean sessions are
//!   never refused for it.
//! - Restoring more than the bounds allow (they were lowered) deletes nothing: new retained
//!   topics and sessions wait until enough are gone.
//!
//! Access control ([`Auth`], see the `auth` module for the rules): a CONNECT is checked against
//! the password file and the listener's anonymous policy before anything else; a publish the
//! ACL refuses is never handed to the gateway nor routed (MQTT 5: PUBACK/PUBREC 0x87; 3.1.1:
//! acknowledged and dropped, as mosquitto does), a subscription it refuses gets a SUBACK
//! failure, and every message is checked again per subscriber before it is queued (messages
//! from [`BrokerHandle::publish`] and retained ones included), since a permitted wildcard
//! filter can match forbidden topics. [`BrokerHandle::reload_auth`] swaps the policy for the
//! next check; connected clients keep their login and subscriptions.
//!
//! TLS ([`BrokerSettings::tls`]): a TLS listener runs the rustls handshake (ring provider)
//! within `connect_timeout`, then serves the same MQTT session as a plain one. A failed
//! handshake closes that socket only (counted in [`BrokerStats::tls_handshake_failures`]). With
//! a client CA, a verified client certificate's subject CN (else its first DNS or email SAN) is
//! the client's username, for the ACL, and stands for a login: no password is checked, and the
//! CONNECT's username and password are ignored. A verified certificate with no such name is
//! refused at CONNECT (not authorised). [`BrokerHandle::reload_tls`] re-reads the files for new
//! connections; open connections keep the configuration they were accepted with.

mod auth;
mod codec;
mod connection;
mod persist;
mod retained;
mod router;
mod session;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::topic::{TopicError, TopicName};
use router::{Publication, Router};
use tls::TlsListener;

pub use auth::{Access, Auth};
pub use persist::{RestoreReport, STATE_PREFIX, StateBatch, StateChange, StateSink};

/// How long connections get, after shutdown is requested, to finish the acks for messages they
/// already handed to the gateway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bound on handing a will to the gateway (the channel may be full).
const WILL_HANDOVER_TIMEOUT: Duration = Duration::from_secs(1);

/// How often offline sessions are checked for an expired session or a will whose delay
/// passed: the precision of both (they are set in whole seconds).
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// Broker limits and listeners.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Addresses to listen on (port 0 picks a free port; see [`Broker::local_addrs`]).
    pub listeners: Vec<SocketAddr>,
    /// Connected clients allowed at once; the next one gets CONNACK "server unavailable".
    pub max_connections: usize,
    /// Largest packet accepted (whole packet, bytes); larger closes the connection. Also the
    /// MQTT 5 maximum packet size announced.
    pub max_packet_size: usize,
    /// Outbound QoS 1/2 messages in flight (unacknowledged) per client.
    pub max_inflight: u16,
    /// Inbound QoS 1/2 messages awaiting the gateway's reply per client; at the bound the
    /// connection stops reading. Also the MQTT 5 receive maximum announced.
    pub max_inbound_pending: u16,
    /// Per-client outbound queue (online backlog beyond the in-flight window, and a persistent
    /// session's offline queue). When full QoS 0 is dropped first; every drop is counted.
    pub max_queued_messages: usize,
    /// Bound of the bytes (topic + payload) in one client's queue, with the same policy.
    pub max_queued_bytes: usize,
    /// Retained messages kept at most. A retained message on a topic not held yet is not kept
    /// beyond (MQTT 5 QoS 1/2: refused with 0x97; otherwise delivered, not retained); see
    /// "Bounds" in the module documentation.
    pub max_retained: usize,
    /// Bytes (topic + payload + MQTT 5 properties) of retained messages kept at most, with
    /// the same policy.
    pub max_retained_bytes: usize,
    /// Sessions that outlive their connections (3.1.1 clean session 0, MQTT 5 session expiry
    /// above 0) kept at most, connected or not. A CONNECT that would start one more is refused
    /// (3.1.1: 0x03 server unavailable; MQTT 5: 0x97 quota exceeded). Sessions that end with
    /// their connection are not counted, and never refused for it.
    pub max_sessions: usize,
    /// How long an MQTT 3.1.1 session with clean session 0 outlives its connection; then it
    /// is discarded like an expired MQTT 5 session.
    pub session_expiry_311: Duration,
    /// The longest session expiry an MQTT 5 client gets (whole seconds, at least one): one
    /// asking for more, or for 0xFFFFFFFF (never), gets this and is told so in CONNACK.
    pub max_session_expiry: Duration,
    /// Time allowed between TCP accept and CONNECT.
    pub connect_timeout: Duration,
    /// Who may connect and what each client may publish and receive. `None`: anyone may
    /// connect, with or without a username (not checked), and do anything, on every listener.
    /// The value in force later is the handle's ([`BrokerHandle::reload_auth`]).
    pub auth: Option<Arc<Auth>>,
    /// Per listener, by index into `listeners`: `Some` serves MQTT over TLS there with these
    /// files (read at [`Broker::bind`], again on [`BrokerHandle::reload_tls`]); `None`, or no
    /// entry (a shorter list, `Vec::new()`), plain TCP. From the configuration:
    /// `b.listener_settings.iter().map(|l| l.tls.clone()).collect()`.
    pub tls: Vec<Option<outpost_config::TlsListenerConfig>>,
}

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// QoS 0.
    AtMostOnce,
    /// QoS 1.
    AtLeastOnce,
    /// QoS 2.
    ExactlyOnce,
}

/// A message accepted from a local client, handed to the gateway.
#[derive(Debug)]
pub struct Inbound {
    /// The publishing client.
    pub client_id: Arc<str>,
    /// Validated topic name.
    pub topic: String,
    /// The bytes the client sent, unchanged.
    pub payload: Bytes,
    /// QoS the client published with.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// Which protocol adapter accepted the message (metadata upstream, dead-letter records).
    pub source: Source,
    /// The CoAP Content-Format number the sender declared; None for MQTT (MQTT 5's content
    /// type is a string and is not carried here) and for CoAP requests without the option.
    pub content_format: Option<u16>,
    /// Some for QoS 1/2 (the broker waits for it before acking); None for QoS 0 and for wills.
    /// The gateway MUST answer or drop; a dropped sender counts as a refusal.
    pub reply: Option<oneshot::Sender<IngestReply>>,
}

/// The protocol adapter a message came in through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The embedded MQTT broker.
    Mqtt,
    /// The CoAP endpoint (a request to the ingest resource, or an observed device's
    /// notification).
    Coap,
}

impl Source {
    /// Lower-case name for metadata and logs (`"mqtt"`, `"coap"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Coap => "coap",
        }
    }
}

/// The gateway's answer for an inbound QoS 1/2 message: `Ok` once it is committed.
pub type IngestReply = Result<(), IngestRefusal>;

/// Why the gateway did not take a message.
///
/// How each adapter tells the sender: MQTT 5 gets the PUBACK/PUBREC reason code below, MQTT
/// 3.1.1 gets its connection closed without an ack (it has no negative ack), CoAP gets the
/// response code below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestRefusal {
    /// The store is at its quota. MQTT 5 reason 0x97; CoAP 5.03 with Max-Age.
    QuotaExceeded,
    /// The store cannot write (poisoned, closed). MQTT 5 reason 0x80; CoAP 5.03 with Max-Age.
    StoreUnavailable,
    /// The route declared a payload format and the payload does not decode as it; the text
    /// says what is wrong and where. The gateway has kept the message as a dead letter before
    /// answering. MQTT 5 reason 0x99; MQTT 3.1.1 is acknowledged (resending the same bytes
    /// cannot help and it has no negative ack); CoAP 4.00 with the text as payload.
    PayloadInvalid(String),
    /// The declared content format is one the route does not take. MQTT 5 reason 0x99; MQTT
    /// 3.1.1 acknowledged (as for `PayloadInvalid`); CoAP 4.15.
    UnsupportedFormat,
    /// The payload is larger than the route or store takes. MQTT 5 reason 0x97; CoAP 4.13.
    TooLarge,
}

/// Errors of the broker's public operations.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener could not be bound.
    #[error("cannot listen on tcp {addr}")]
    Bind {
        /// The address that failed.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`BrokerSettings::listeners`] is empty.
    #[error("no MQTT listener configured")]
    NoListeners,
    /// A TLS listener's certificate, key or client CA file could not be loaded (at bind, or on
    /// [`BrokerHandle::reload_tls`], which then keeps the configuration in force).
    #[error("TLS listener {addr}: {source}")]
    Tls {
        /// The listener.
        addr: SocketAddr,
        /// Which file, and why (never its contents).
        #[source]
        source: outpost_config::TlsFileError,
    },
    /// The files loaded, and rustls refused to build a server configuration from them.
    #[error("TLS listener {addr}: {reason}")]
    TlsSetup {
        /// The listener.
        addr: SocketAddr,
        /// rustls' reason.
        reason: String,
    },
    /// The access policy came from a configuration that serves this listener over TLS
    /// ([`Auth::from_config`]), and [`BrokerSettings::tls`] has no TLS settings for it: refused
    /// rather than serving it in plain text.
    #[error(
        "listener {addr} is configured for TLS but BrokerSettings::tls has no entry for it \
         (build it from the same configuration: listener_settings[i].tls)"
    )]
    TlsMissing {
        /// The listener.
        addr: SocketAddr,
    },
    /// [`BrokerSettings::tls`] has more entries than there are listeners.
    #[error("BrokerSettings::tls has {tls} entries for {listeners} listeners")]
    TlsListenerCount {
        /// Entries in `tls`.
        tls: usize,
        /// Entries in `listeners`.
        listeners: usize,
    },
    /// [`BrokerHandle::publish`] with an invalid topic name.
    #[error("invalid topic name {topic:?}: {source}")]
    InvalidTopic {
        /// The topic as given.
        topic: String,
        /// What is wrong with it.
        #[source]
        source: TopicError,
    },
}

/// A snapshot of the broker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Clients connected now (past CONNACK).
    pub connections_current: u64,
    /// Clients accepted since start.
    pub connections_total: u64,
    /// CONNECTs refused (limit, protocol version, client id) or never sent in time.
    pub connections_refused: u64,
    /// Connections closed for malformed packets or protocol violations (bad topic alias, ...).
    pub malformed_packets: u64,
    /// Connections closed for a packet over `max_packet_size`.
    pub oversized_packets: u64,
    /// Valid PUBLISH packets received from clients.
    pub publishes_received: u64,
    /// PUBLISH packets written to subscribers (first transmissions).
    pub publishes_delivered: u64,
    /// Inbound QoS 1/2 messages the gateway refused (or never answered).
    pub ingest_refused: u64,
    /// Messages dropped because a subscriber's queue was full.
    pub dropped_queue_full: u64,
    /// Connections closed after 1.5x keep-alive without a packet.
    pub keepalive_timeouts: u64,
    /// Connections closed for an invalid PUBLISH topic.
    pub invalid_topics: u64,
    /// CONNECTs refused for a bad username or password, or for being anonymous where that is
    /// not allowed (also counted in `connections_refused`).
    pub auth_refused: u64,
    /// PUBLISH packets (and wills) the ACL did not allow: dropped, never handed to the gateway.
    pub publishes_denied: u64,
    /// Subscription filters the ACL did not allow (SUBACK failure).
    pub subscriptions_denied: u64,
    /// Messages not delivered to a subscriber that may not read their topic (its filter
    /// matched, the ACL did not).
    pub deliveries_denied: u64,
    /// TLS handshakes on TLS listeners that failed or did not finish within
    /// `connect_timeout` (plain MQTT on a TLS port, an untrusted or missing client
    /// certificate, ...): each closed that socket only.
    pub tls_handshake_failures: u64,
    /// MQTT 5 messages dropped because their message expiry interval ran out while they
    /// waited for a subscriber (online backlog or offline queue).
    pub messages_expired: u64,
    /// Offline sessions discarded because their session expiry passed (MQTT 5's interval, or
    /// [`BrokerSettings::session_expiry_311`]).
    pub sessions_expired: u64,
    /// CONNECTs refused because they would start a persistent session beyond
    /// [`BrokerSettings::max_sessions`] (also counted in `connections_refused`).
    pub sessions_refused: u64,
    /// Retained messages not kept because the retained store was at a bound
    /// ([`BrokerSettings::max_retained`], [`BrokerSettings::max_retained_bytes`]): refused
    /// (MQTT 5 QoS 1/2), or delivered without being retained.
    pub retained_refused: u64,
    /// Retained messages held now (a gauge).
    pub retained_messages: u64,
    /// Bytes (topic + payload + properties) of the retained messages held now (a gauge).
    pub retained_bytes: u64,
    /// Sessions that outlive their connections held now, connected or not (a gauge).
    pub persistent_sessions: u64,
    /// Persisted session or retained entries that could not be read back at start (logged,
    /// discarded).
    pub state_invalid: u64,
    /// Times a client waited for session state to be made durable and it could not be (the
    /// store refused or is gone): the client was answered anyway, logged.
    pub state_write_failures: u64,
}

/// Live counters behind [`BrokerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub malformed_packets: AtomicU64,
    pub oversized_packets: AtomicU64,
    pub publishes_received: AtomicU64,
    pub publishes_delivered: AtomicU64,
    pub ingest_refused: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub invalid_topics: AtomicU64,
    pub auth_refused: AtomicU64,
    pub publishes_denied: AtomicU64,
    pub subscriptions_denied: AtomicU64,
    pub deliveries_denied: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub messages_expired: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub retained_refused: AtomicU64,
    pub state_invalid: AtomicU64,
    pub state_write_failures: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> BrokerStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BrokerStats {
            connections_current: g(&self.connections_current),
            connections_total: g(&self.connections_total),
            connections_refused: g(&self.connections_refused),
            malformed_packets: g(&self.malformed_packets),
            oversized_packets: g(&self.oversized_packets),
            publishes_received: g(&self.publishes_received),
            publishes_delivered: g(&self.publishes_delivered),
            ingest_refused: g(&self.ingest_refused),
            dropped_queue_full: g(&self.dropped_queue_full),
            keepalive_timeouts: g(&self.keepalive_timeouts),
            invalid_topics: g(&self.invalid_topics),
            auth_refused: g(&self.auth_refused),
            publishes_denied: g(&self.publishes_denied),
            subscriptions_denied: g(&self.subscriptions_denied),
            deliveries_denied: g(&self.deliveries_denied),
            tls_handshake_failures: g(&self.tls_handshake_failures),
            messages_expired: g(&self.messages_expired),
            sessions_expired: g(&self.sessions_expired),
            sessions_refused: g(&self.sessions_refused),
            retained_refused: g(&self.retained_refused),
            retained_messages: 0,
            retained_bytes: 0,
            persistent_sessions: 0,
            state_invalid: g(&self.state_invalid),
            state_write_failures: g(&self.state_write_failures),
        }
    }
}

/// State shared by the accept loops, every connection and every handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: BrokerSettings,
    pub router: Mutex<Router>,
    pub counters: Counters,
    /// Source of connection ids (see `router::Link::conn_id`) and assigned client ids.
    pub next_id: AtomicU64,
    /// Sockets accepted but not yet past CONNECT; bounded by `max_connections` so a flood of
    /// idle sockets cannot exhaust memory or descriptors before `connect_timeout` reaps them.
    pub handshaking: AtomicU64,
    /// The access policy in force; replaced whole by `reload_auth`, read once per check.
    pub auth: RwLock<Option<Arc<Auth>>>,
    /// By listener index: the TLS listeners' server configurations (`reload_tls`).
    pub tls: Vec<Option<TlsListener>>,
    /// The longest keep-alive (seconds) an MQTT 5 client may use; 0: no maximum. Set by
    /// `Broker::set_max_keep_alive`, read at each CONNECT.
    pub max_keep_alive: AtomicU16,
}

impl Shared {
    /// Locks the router. A panic while holding the lock cannot leave it half-updated in a way
    /// worse than losing the broker, so a poisoned lock is used as is.
    pub(crate) fn router(&self) -> MutexGuard<'_, Router> {
        self.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The access policy in force now.
    pub(crate) fn auth(&self) -> Option<Arc<Auth>> {
        self.auth.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Routes a message to local subscribers that may read it, counting drops and refusals.
    /// Returns what resolves once the persistent sessions (and retained store) it changed are
    /// durable, if it changed any.
    pub(crate) fn route(&self, p: &Publication, origin: Option<&str>) -> Option<persist::Ticket> {
        let auth = self.auth();
        let (routed, ticket) =
            self.router()
                .route(p, origin, auth.as_deref(), tokio::time::Instant::now());
        self.count(routed, &p.topic);
        ticket
    }

    /// Publishes a client's will: to local subscribers, and to ingest without waiting for a
    /// reply (bounded by `WILL_HANDOVER_TIMEOUT`).
    pub(crate) async fn publish_will(
        &self,
        ingest: &mpsc::Sender<Inbound>,
        client_id: Arc<str>,
        will: Publication,
    ) {
        tracing::debug!(%client_id, topic = %will.topic, "publishing will");
        let _ = self.route(&will, None);
        let inbound = Inbound {
            client_id: client_id.clone(),
            topic: will.topic.to_string(),
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            source: Source::Mqtt,
            content_format: None,
            reply: None,
        };
        if tokio::time::timeout(WILL_HANDOVER_TIMEOUT, ingest.send(inbound))
            .await
            .map_or(true, |r| r.is_err())
        {
            tracing::warn!(%client_id, "will not handed to ingest (channel full or closed)");
        }
    }

    /// Adds up a routing pass's drops and refusals.
    pub(crate) fn count(&self, routed: router::Routed, topic: &str) {
        if routed.denied > 0 {
            self.counters
                .deliveries_denied
                .fetch_add(routed.denied, Ordering::Relaxed);
            tracing::debug!(%topic, subscribers = routed.denied,
                "message not delivered: the ACL does not let the subscriber read it");
        }
        if routed.dropped > 0 {
            self.counters
                .dropped_queue_full
                .fetch_add(routed.dropped, Ordering::Relaxed);
            tracing::warn!(%topic, dropped = routed.dropped, "subscriber queue full, message dropped");
        }
        if routed.retained_refused > 0 {
            self.counters
                .retained_refused
                .fetch_add(routed.retained_refused, Ordering::Relaxed);
            tracing::warn!(%topic,
                "retained message not kept: the retained store is at broker.max_retained or \
                 max_retained_bytes (delivered to current subscribers only)");
        }
        if routed.expired > 0 {
            self.counters
                .messages_expired
                .fetch_add(routed.expired, Ordering::Relaxed);
            tracing::debug!(%topic, expired = routed.expired,
                "queued messages dropped: their message expiry interval ran out");
        }
    }
}

/// A bound, not yet running, broker.
#[derive(Debug)]
pub struct Broker {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
}

/// A cheap handle for publishing into the broker and reading its counters.
#[derive(Clone, Debug)]
pub struct BrokerHandle {
    shared: Arc<Shared>,
}

impl Broker {
    /// Binds every listener now (a failed bind is an error naming the address, not a log line).
    pub async fn bind(settings: BrokerSettings) -> Result<Broker, BrokerError> {
        if settings.listeners.is_empty() {
            return Err(BrokerError::NoListeners);
        }
        if settings.tls.len() > settings.listeners.len() {
            return Err(BrokerError::TlsListenerCount {
                tls: settings.tls.len(),
                listeners: settings.listeners.len(),
            });
        }
        let mut tls = Vec::with_capacity(settings.listeners.len());
        for (i, addr) in settings.listeners.iter().enumerate() {
            match settings.tls.get(i).cloned().flatten() {
                Some(config) => tls.push(Some(TlsListener::new(*addr, config)?)),
                None if settings.auth.as_ref().is_some_and(|a| a.expects_tls(i)) => {
                    return Err(BrokerError::TlsMissing { addr: *addr });
                }
                None => tls.push(None),
            }
        }
        let mut listeners = Vec::with_capacity(settings.listeners.len());
        for addr in &settings.listeners {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: *addr,
                    source,
                })?;
            listeners.push(l);
        }
        for (i, addr) in settings.listeners.iter().enumerate() {
            let anonymous = settings.auth.as_ref().is_none_or(|a| a.allows_anonymous(i))
                && !tls[i]
                    .as_ref()
                    .is_some_and(TlsListener::requires_client_cert);
            if anonymous && !addr.ip().to_canonical().is_loopback() {
                tracing::warn!(listener = %addr,
                    "MQTT listener admits clients without a username from the network: anyone \
                     who reaches it may publish and subscribe (set broker.password_file to \
                     require logins)");
            }
        }
        let mut router = Router::new(settings.max_queued_messages, settings.max_inflight);
        router.set_max_queued_bytes(settings.max_queued_bytes);
        router.set_retained_limits(settings.max_retained, settings.max_retained_bytes);
        router.set_session_limits(router::SessionLimits {
            max_sessions: settings.max_sessions,
            default_expiry: Some(settings.session_expiry_311),
            max_expiry: Some(settings.session_expiry_311.max(settings.max_session_expiry)),
        });
        let auth = RwLock::new(settings.auth.clone());
        Ok(Broker {
            listeners,
            shared: Arc::new(Shared {
                settings,
                router: Mutex::new(router),
                counters: Counters::default(),
                next_id: AtomicU64::new(1),
                handshaking: AtomicU64::new(0),
                auth,
                tls,
                max_keep_alive: AtomicU16::new(0),
            }),
        })
    }

    /// The bound addresses (real ports when bound to port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Sets the longest keep-alive an MQTT 5 client may use (`None`: no maximum, the
    /// default). A client asking for more, or for none (0), is told this value in CONNACK's
    /// server keep-alive and held to it. MQTT 3.1.1 clients cannot be told, so theirs is
    /// kept. Applies to connections made after the call; rounded to whole seconds (at least
    /// one, at most 65,535).
    pub fn set_max_keep_alive(&self, max: Option<Duration>) {
        let secs = max.map_or(0, |d| u16::try_from(d.as_secs().max(1)).unwrap_or(u16::MAX));
        self.shared.max_keep_alive.store(secs, Ordering::Relaxed);
    }

    /// Makes sessions that outlive their connections, and retained messages, survive a
    /// restart: puts back what `restored` holds (every entry the store kept under
    /// [`STATE_PREFIX`], in key order) and from now on sends every change to `sink` (see
    /// [`StateBatch`] for what the receiver must do). Call before [`Broker::run`]; without
    /// it the broker keeps them in memory only. Unreadable entries are logged, skipped, and
    /// deleted through `sink`; the report lists them.
    pub fn restore(&self, sink: StateSink, restored: Vec<(String, Vec<u8>)>) -> RestoreReport {
        let report = self
            .shared
            .router()
            .restore(sink, restored, tokio::time::Instant::now());
        self.shared.counters.state_invalid.fetch_add(
            u64::try_from(report.invalid.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        report
    }

    /// A handle for publishing and stats; usable before, during and after `run`.
    pub fn handle(&self) -> BrokerHandle {
        BrokerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, lets every connection finish
    /// the acks for what it already handed over (bounded by a few seconds), closes connections,
    /// returns.
    pub async fn run(
        self,
        ingest: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Result<(), BrokerError> {
        let tracker = TaskTracker::new();
        // Cancelled after the grace period: connections still busy are closed at once.
        let hard_stop = CancellationToken::new();
        for (index, listener) in self.listeners.into_iter().enumerate() {
            let ctx = AcceptCtx {
                index,
                shared: self.shared.clone(),
                ingest: ingest.clone(),
                shutdown: shutdown.clone(),
                hard_stop: hard_stop.clone(),
                tracker: tracker.clone(),
            };
            tracker.spawn(accept_loop(listener, ctx));
        }
        tracker.spawn(expiry_loop(
            self.shared.clone(),
            ingest.clone(),
            shutdown.clone(),
        ));
        drop(ingest);
        shutdown.cancelled().await;
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("MQTT connections still busy after {SHUTDOWN_GRACE:?}, closing them");
            hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        }
        hard_stop.cancel();
        Ok(())
    }
}

struct AcceptCtx {
    /// The listener's index in `BrokerSettings::listeners` (its anonymous policy).
    index: usize,
    shared: Arc<Shared>,
    ingest: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptCtx) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let tls = ctx.shared.tls.get(ctx.index).and_then(Option::as_ref);
                ctx.tracker.spawn(connection::serve(
                    stream,
                    tls.map(TlsListener::acceptor),
                    peer,
                    ctx.index,
                    ctx.shared.clone(),
                    ctx.ingest.clone(),
                    ctx.shutdown.clone(),
                    ctx.hard_stop.clone(),
                ));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning; the listener stays.
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!(listener = ?local, "MQTT listener stopped");
}

/// Discards offline sessions whose expiry interval passed and publishes delayed wills that
/// are due, until shutdown (pending wills are not published then, like every will at
/// shutdown).
async fn expiry_loop(
    shared: Arc<Shared>,
    ingest: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired = shared.router().expire(tokio::time::Instant::now());
        if expired.sessions > 0 {
            shared
                .counters
                .sessions_expired
                .fetch_add(expired.sessions, Ordering::Relaxed);
            tracing::debug!(sessions = expired.sessions, "offline MQTT sessions expired");
        }
        for (client_id, will) in expired.wills {
            shared.publish_will(&ingest, client_id, will).await;
        }
    }
}

impl BrokerHandle {
    /// Publish into the local broker as the gateway itself (commands from the cloud): delivered
    /// to matching local subscribers (and stored as retained if `retain`), NOT handed to ingest.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), BrokerError> {
        let name = TopicName::new(topic).map_err(|source| BrokerError::InvalidTopic {
            topic: topic.to_owned(),
            source,
        })?;
        let topic: Arc<str> = Arc::from(name.into_string());
        let _ = self
            .shared
            .route(&Publication::plain(topic, payload, qos, retain), None);
        Ok(())
    }

    /// Replaces the access policy (after SIGHUP re-read the files: see [`Auth::reloaded`]).
    /// It applies from the next check on: new CONNECTs, and every later publish, subscribe and
    /// delivery of connected clients. Logins and subscriptions already granted are kept.
    /// `None` turns access control off.
    pub fn reload_auth(&self, auth: Option<Arc<Auth>>) {
        *self.shared.auth.write().unwrap_or_else(|e| e.into_inner()) = auth;
        tracing::info!("MQTT access policy replaced");
    }

    /// Reads every TLS listener's certificate, key and client CA files again (SIGHUP) and puts
    /// the new configurations in force for new connections. Connections already open keep
    /// theirs; plain listeners are not touched. All or nothing: if any file fails to load,
    /// every listener keeps the configuration it had, and the first error is returned. `Ok`
    /// when there is no TLS listener. Reads files: cheap, but blocking.
    pub fn reload_tls(&self) -> Result<(), BrokerError> {
        let listeners: Vec<&TlsListener> = self.shared.tls.iter().flatten().collect();
        let fresh = listeners
            .iter()
            .map(|l| l.reload())
            .collect::<Result<Vec<_>, _>>()?;
        for (listener, server) in listeners.iter().zip(fresh) {
            listener.replace(server);
        }
        if !listeners.is_empty() {
            tracing::info!(
                listeners = listeners.len(),
                "MQTT TLS certificates reloaded for new connections"
            );
        }
        Ok(())
    }

    /// The access policy in force.
    pub fn auth(&self) -> Option<Arc<Auth>> {
        self.shared.auth()
    }

    /// A snapshot of the counters (and of the retained store's and sessions' sizes).
    pub fn stats(&self) -> BrokerStats {
        let mut stats = self.shared.counters.snapshot();
        let router = self.shared.router();
        let (retained, bytes) = router.retained_usage();
        let to_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        stats.retained_messages = to_u64(retained);
        stats.retained_bytes = to_u64(bytes);
        stats.persistent_sessions = to_u64(router.persistent_sessions(tokio::time::Instant::now()));
        stats
    }
}
