//! The CoAP endpoint (RFC 7252 over UDP) that constrained sensors POST readings to.
//!
//! coap-lite is only the message codec; the UDP loop, message ids, duplicate detection,
//! retransmission, block-wise transfer and Observe are ours (`endpoint`).
//!
//! # Invariants
//!
//! - **A success response means stored.** A POST/PUT to `/{ingest_path}/{topic...}` is handed to
//!   the gateway as the same [`Inbound`] the MQTT broker uses (`source: Coap`, `reply: Some`) and
//!   answered only after the gateway's [`IngestReply`](crate::IngestReply): 2.01 Created (POST) or
//!   2.04 Changed (PUT) when committed; a refusal maps to 4.00 (with the diagnostic as payload),
//!   4.13, 4.15 or 5.03 with Max-Age. A confirmable request is ACKed with the response
//!   piggy-backed; if the gateway has not answered within [`PIGGYBACK_WINDOW`] an empty ACK goes
//!   out and the response follows as a separate CON, retransmitted per RFC 7252 (ACK_TIMEOUT 2 s,
//!   ACK_RANDOM_FACTOR 1.5, MAX_RETRANSMIT 4).
//! - **Stored once.** (endpoint, message id) of every request is kept for `exchange_lifetime`; a
//!   duplicate is never handed over again, and a duplicate CON gets the same ACK again (nothing
//!   while the gateway has not answered yet: the client retransmits).
//! - **Bounded.** The duplicate cache and Block1 reassemblies are bounded by `max_exchanges`
//!   (oldest evicted, counted), observers by `max_observers`, ingest hand-overs in flight per
//!   listener by `max_exchanges` (beyond: 5.03 Max-Age 1). The bytes held in reassemblies, and
//!   in hand-overs, are bounded by `max_buffered_bytes` each (same policies). Nothing is
//!   allocated for a size a request only declares (Size1, block numbers). The ingest channel is
//!   the gateway's bound; while it is full, hand-overs wait in their own tasks and the socket
//!   keeps serving.
//! - **No panics on input.** Malformed datagrams are counted and dropped (a confirmable one with a
//!   readable header gets RST). Fuzzed with the bounds above checked after every datagram
//!   (`endpoint/fuzz.rs`, in simulated time) and over UDP against a running server
//!   (`tests/coap_fuzz.rs`).
//!
//! # Resources
//!
//! - `POST|PUT /{ingest_path}/{a}/{b}...` -> topic `{topic_prefix}/a/b`. Block1 for large bodies.
//! - `GET /.well-known/core` (RFC 6690), filterable by `?rt=`, `?if=`, `?ct=`, `?href=` (a
//!   trailing `*` matches a prefix).
//! - `GET /status` (application/json), observable (RFC 7641): [`CoapHandle::set_status`]
//!   notifies observers; every [`CON_NOTIFY_EVERY`]th notification is confirmable, and an
//!   observer that RSTs a notification, or does not ACK a confirmable one, is removed.
//!
//! Block2 serves any response larger than the block size the client asks for (default 1024).
//!
//! The client side, observing a device resource, is [`CoapObserver`].

mod client;
mod endpoint;
mod link;
mod msg;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Inbound;

pub use client::{CoapObserver, ObserveSettings, ObserverHandle, ObserverStats};

/// How long a confirmable request waits for the gateway before it gets an empty ACK and a
/// separate response: well under the client's first retransmission (ACK_TIMEOUT, 2 s).
pub const PIGGYBACK_WINDOW: Duration = Duration::from_millis(1500);

/// Every Nth notification to an observer is confirmable (RFC 7641 section 4.5: at least now and
/// then, so a vanished observer is noticed); the others are non-confirmable.
pub const CON_NOTIFY_EVERY: u64 = 5;

/// Max-Age (seconds) sent with 5.03 when the store refuses writes.
pub const RETRY_AFTER_SECS: u32 = 30;

/// How long, after shutdown is requested, outstanding hand-overs get to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// CoAP listeners, the ingest resource and limits.
#[derive(Debug, Clone)]
pub struct CoapSettings {
    /// UDP addresses to listen on (port 0 picks a free port; see [`CoapServer::local_addrs`]).
    pub listeners: Vec<SocketAddr>,
    /// First path segment of the ingest resource: `t` makes `POST /t/a/b` a reading for
    /// `{topic_prefix}/a/b`.
    pub ingest_path: String,
    /// Topic prefix for readings posted over CoAP, e.g. `sensors`.
    pub topic_prefix: String,
    /// Largest request body, after Block1 reassembly; larger is answered 4.13 with Size1.
    pub max_payload: usize,
    /// How long (endpoint, message id) pairs are remembered for duplicate detection
    /// (EXCHANGE_LIFETIME, 247 s with RFC 7252's defaults).
    pub exchange_lifetime: Duration,
    /// Bound on remembered exchanges and on Block1 uploads in progress, each per listener.
    pub max_exchanges: usize,
    /// Bound on registered observers of `/status` (all listeners together); a registration
    /// beyond it is served as a plain GET (RFC 7641 section 4.1).
    pub max_observers: usize,
    /// Bound on the request-body bytes a listener holds, twice over: in Block1 uploads being
    /// reassembled (beyond: the oldest are evicted, counted), and in readings handed to the
    /// gateway and not answered yet (beyond: 5.03 with Max-Age 1, counted as overloaded).
    /// Never less than `max_payload` in effect: one body of the largest size always fits.
    pub max_buffered_bytes: usize,
}

impl CoapSettings {
    /// EXCHANGE_LIFETIME with RFC 7252's default transmission parameters.
    pub const DEFAULT_EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

    /// Request-body bytes a listener holds in uploads, and in hand-overs: 4 MiB each. Without
    /// a byte bound, one peer could hold `max_exchanges` x `max_payload` (256 MiB with the
    /// defaults) in uploads it never finishes, and as much again in readings while the store is
    /// slow.
    pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 4 * 1024 * 1024;

    /// Defaults for the given listeners: ingest at `/t`, prefix `sensors`, 64 KiB bodies.
    pub fn new(listeners: Vec<SocketAddr>) -> Self {
        Self {
            listeners,
            ingest_path: "t".to_owned(),
            topic_prefix: "sensors".to_owned(),
            max_payload: 64 * 1024,
            exchange_lifetime: Self::DEFAULT_EXCHANGE_LIFETIME,
            max_exchanges: 4096,
            max_observers: 64,
            max_buffered_bytes: Self::DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

/// Receive buffer asked for on each CoAP socket. The kernel default (about 208 KiB) overflows
/// when a few hundred sensors send at once: measured, 512 requests in flight lost ~280 datagrams
/// per round, each costing its sender a 2-3 s retransmission timeout. The kernel caps the value
/// at `net.core.rmem_max`; whatever it grants is used.
pub const RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

fn widen_receive_buffer(socket: &UdpSocket, addr: SocketAddr) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(RECEIVE_BUFFER) {
        tracing::warn!(%addr, error = %e, "CoAP socket keeps the default receive buffer");
    }
}

/// Errors of the CoAP endpoint's public operations.
#[derive(Debug, thiserror::Error)]
pub enum CoapError {
    /// A listener could not be bound.
    #[error("cannot listen on udp {addr}")]
    Bind {
        /// The address that failed.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`CoapSettings::listeners`] is empty.
    #[error("no CoAP listener configured")]
    NoListeners,
    /// A setting that cannot work.
    #[error("invalid CoAP setting {field}: {why}")]
    InvalidSetting {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// A snapshot of the endpoint's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoapStats {
    /// Well-formed requests received (duplicates included).
    pub requests: u64,
    /// Duplicate requests (same endpoint and message id within the exchange lifetime).
    pub duplicates: u64,
    /// Malformed datagrams dropped.
    pub bad_requests: u64,
    /// Readings the gateway committed.
    pub stored: u64,
    /// Readings the gateway refused (or never answered).
    pub refused: u64,
    /// Readings answered 5.03 because too many hand-overs were in flight.
    pub overloaded: u64,
    /// Observers registered now.
    pub observers: u64,
    /// Notifications sent (first transmissions).
    pub notifications: u64,
    /// Observers removed for an RST or an unacknowledged confirmable notification.
    pub observers_lost: u64,
    /// Confirmable messages we retransmitted.
    pub retransmissions: u64,
    /// Separate responses or notifications given up after MAX_RETRANSMIT.
    pub timeouts: u64,
    /// Exchanges or Block1 uploads evicted from full caches.
    pub evicted: u64,
    /// Block1 uploads completed.
    pub block_uploads: u64,
}

/// Live counters behind [`CoapStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub duplicates: AtomicU64,
    pub bad_requests: AtomicU64,
    pub stored: AtomicU64,
    pub refused: AtomicU64,
    pub overloaded: AtomicU64,
    pub observers: AtomicU64,
    pub notifications: AtomicU64,
    pub observers_lost: AtomicU64,
    pub retransmissions: AtomicU64,
    pub timeouts: AtomicU64,
    pub evicted: AtomicU64,
    pub block_uploads: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> CoapStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CoapStats {
            requests: g(&self.requests),
            duplicates: g(&self.duplicates),
            bad_requests: g(&self.bad_requests),
            stored: g(&self.stored),
            refused: g(&self.refused),
            overloaded: g(&self.overloaded),
            observers: g(&self.observers),
            notifications: g(&self.notifications),
            observers_lost: g(&self.observers_lost),
            retransmissions: g(&self.retransmissions),
            timeouts: g(&self.timeouts),
            evicted: g(&self.evicted),
            block_uploads: g(&self.block_uploads),
        }
    }
}

/// The observable status resource: its representation and Observe sequence number.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    /// Observe sequence number (24 bits on the wire), bumped by every `set_status`.
    pub seq: u32,
    /// JSON bytes.
    pub body: Bytes,
}

/// State shared by every listener task and every handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub settings: CoapSettings,
    pub counters: Counters,
    /// Current status; listener tasks watch it to notify their observers.
    pub status: watch::Sender<Status>,
    /// Observe sequence source.
    pub next_seq: AtomicU32,
}

/// A bound, not yet running, CoAP endpoint.
#[derive(Debug)]
pub struct CoapServer {
    sockets: Vec<UdpSocket>,
    shared: Arc<Shared>,
}

/// A cheap handle for stats and the status resource.
#[derive(Clone, Debug)]
pub struct CoapHandle {
    shared: Arc<Shared>,
}

impl CoapServer {
    /// Binds every listener now (a failed bind is an error naming the address).
    pub async fn bind(settings: CoapSettings) -> Result<CoapServer, CoapError> {
        if settings.listeners.is_empty() {
            return Err(CoapError::NoListeners);
        }
        let invalid = |field, why| Err(CoapError::InvalidSetting { field, why });
        if settings.ingest_path.is_empty() || settings.ingest_path.contains('/') {
            return invalid("ingest_path", "must be one non-empty path segment");
        }
        if crate::topic::TopicName::new(&settings.topic_prefix).is_err() {
            return invalid("topic_prefix", "must be a valid MQTT topic name");
        }
        if settings.max_exchanges == 0 {
            return invalid("max_exchanges", "must be at least 1");
        }
        let mut sockets = Vec::with_capacity(settings.listeners.len());
        for addr in &settings.listeners {
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|source| CoapError::Bind {
                    addr: *addr,
                    source,
                })?;
            widen_receive_buffer(&s, *addr);
            sockets.push(s);
        }
        let (status, _) = watch::channel(Status {
            seq: 0,
            body: Bytes::from_static(b"{}"),
        });
        Ok(CoapServer {
            sockets,
            shared: Arc::new(Shared {
                settings,
                counters: Counters::default(),
                status,
                next_seq: AtomicU32::new(1),
            }),
        })
    }

    /// The bound addresses (real ports when bound to port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// A handle for stats and status; usable before, during and after `run`.
    pub fn handle(&self) -> CoapHandle {
        CoapHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled; then stops taking requests, answers what was
    /// already handed to the gateway (bounded by a few seconds), and returns.
    pub async fn run(
        self,
        ingest: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Result<(), CoapError> {
        let tracker = TaskTracker::new();
        for socket in self.sockets {
            let ep = endpoint::Endpoint::new(
                socket,
                self.shared.clone(),
                ingest.clone(),
                shutdown.clone(),
            );
            tracker.spawn(ep.run(SHUTDOWN_GRACE));
        }
        drop(ingest);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

impl CoapHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> CoapStats {
        self.shared.counters.snapshot()
    }

    /// Replaces the `/status` representation (JSON) and notifies its observers.
    pub fn set_status(&self, body: impl Into<Bytes>) {
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        self.shared.status.send_replace(Status {
            seq,
            body: body.into(),
        });
    }
}
