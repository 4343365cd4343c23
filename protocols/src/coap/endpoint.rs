//! One listener's task: the UDP loop and the message layer (RFC 7252 section 4), block-wise
//! transfer (RFC 7959) and Observe (RFC 7641) for the server side.
//!
//! Everything here is owned by the one task that owns the socket; hand-overs to the gateway run
//! in small spawned tasks (so a full ingest channel never stops the socket from ACKing,
//! retransmitting or answering duplicates) and report back over `done`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{MessageType, Packet};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{self, Link};
use super::msg::{self, Block, code, opt};
use super::{CON_NOTIFY_EVERY, PIGGYBACK_WINDOW, RETRY_AFTER_SECS, Shared, Status, bump};
use crate::broker::{Inbound, IngestRefusal, IngestReply, QoS, Source};
use crate::topic::TopicName;

/// RFC 7252 section 4.8 transmission parameters.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const ACK_RANDOM_FACTOR: f64 = 1.5;
pub(crate) const MAX_RETRANSMIT: u32 = 4;

/// Block size exponent used when the client does not ask: 1024 bytes, which with header and
/// options stays under the 1280-byte IPv6 minimum MTU.
const DEFAULT_SZX: u8 = 6;

/// Largest diagnostic payload (a 4.00 reason), so the response stays one small datagram.
const MAX_DIAGNOSTIC: usize = 512;

/// Non-confirmable notifications remembered so an RST to one can cancel its observation.
const RECENT_NON_NOTIFICATIONS: usize = 256;

/// How often caches are swept for expired exchanges and stale uploads.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

type Peer = SocketAddr;
type ObsKey = (Peer, Vec<u8>);

/// A remembered request, for duplicate detection.
#[derive(Debug)]
enum ExState {
    /// Handed to the gateway, not answered yet. `ack` is the empty ACK once sent (a CON whose
    /// answer took longer than the piggy-back window): duplicates get it again.
    Pending { con: bool, ack: Option<Vec<u8>> },
    /// Answered. What a duplicate CON gets again (None for NON: duplicates are ignored).
    Answered(Option<Vec<u8>>),
}

#[derive(Debug)]
struct Exchange {
    state: ExState,
    at: Instant,
}

/// A Block1 upload being reassembled.
#[derive(Debug)]
struct Upload {
    data: Vec<u8>,
    content_format: Option<u16>,
    started: Instant,
}

type UploadKey = (Peer, String);

/// The Block1 uploads being reassembled, and the bytes they hold together.
#[derive(Debug, Default)]
struct Uploads {
    map: HashMap<UploadKey, Upload>,
    bytes: usize,
}

impl Uploads {
    fn len(&self) -> usize {
        self.map.len()
    }

    fn contains(&self, key: &UploadKey) -> bool {
        self.map.contains_key(key)
    }

    /// Bytes received so far for `key`.
    fn received(&self, key: &UploadKey) -> Option<usize> {
        self.map.get(key).map(|u| u.data.len())
    }

    /// Starts (or starts over) the upload for `key`.
    fn start(&mut self, key: UploadKey, upload: Upload) {
        self.bytes += upload.data.len();
        if let Some(old) = self.map.insert(key, upload) {
            self.bytes = self.bytes.saturating_sub(old.data.len());
        }
    }

    fn append(&mut self, key: &UploadKey, data: &[u8]) {
        if let Some(u) = self.map.get_mut(key) {
            u.data.extend_from_slice(data);
            self.bytes += data.len();
        }
    }

    fn remove(&mut self, key: &UploadKey) -> Option<Upload> {
        let u = self.map.remove(key)?;
        self.bytes = self.bytes.saturating_sub(u.data.len());
        Some(u)
    }

    /// The upload that started first, other than `except`.
    fn oldest(&self, except: Option<&UploadKey>) -> Option<UploadKey> {
        self.map
            .iter()
            .filter(|(k, _)| Some(*k) != except)
            .min_by_key(|(_, u)| u.started)
            .map(|(k, _)| k.clone())
    }

    /// Drops the uploads started `lifetime` or longer before `now`.
    fn expire(&mut self, now: Instant, lifetime: Duration) {
        self.map.retain(|_, u| u.started + lifetime > now);
        self.bytes = self.map.values().map(|u| u.data.len()).sum();
    }
}

/// A confirmable message we sent and retransmit until ACKed.
#[derive(Debug)]
struct Outgoing {
    peer: Peer,
    bytes: Vec<u8>,
    /// Retransmissions so far.
    attempts: u32,
    timeout: Duration,
    /// Tells a stale timer from the current one when a message id is reused.
    generation: u64,
    /// Set for notifications: an RST or a timeout removes that observer.
    observer: Option<ObsKey>,
}

#[derive(Debug)]
struct Observer {
    /// Notifications sent so far (decides which are confirmable).
    sent: u64,
    /// The message id of an unacknowledged confirmable notification.
    outstanding: Option<u16>,
    /// Block size the observer asked for at registration.
    szx: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    EmptyAck(Peer, u16),
    Retransmit(u16, u64),
    Housekeeping,
}

/// What a hand-over task reports back.
#[derive(Debug)]
struct Done {
    peer: Peer,
    mid: u16,
    con: bool,
    token: Vec<u8>,
    /// 2.01 for POST, 2.04 for PUT.
    success: u8,
    /// Payload bytes handed over (counted in `Endpoint::in_flight_bytes` until answered).
    bytes: usize,
    /// The final Block1 option to echo, for a block-wise upload.
    block1: Option<Block>,
    reply: IngestReply,
}

enum Outcome {
    Respond(Packet),
    HandedOver,
}

enum Event {
    Shutdown,
    Done(Done),
    Datagram(usize, Peer),
    RecvError,
    Status,
    Timer,
}

pub(crate) struct Endpoint {
    socket: UdpSocket,
    shared: Arc<Shared>,
    /// None once shutting down: new readings get 5.03.
    ingest: Option<mpsc::Sender<Inbound>>,
    shutdown: CancellationToken,
    /// Cancelled when `run` returns: hand-overs still waiting for channel space give up.
    hard_stop: CancellationToken,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Hand-overs not yet reported back; bounded by `max_exchanges`.
    in_flight: usize,
    /// Their payload bytes; bounded by the buffer budget (`max_buffered_bytes`).
    in_flight_bytes: usize,
    exchanges: HashMap<(Peer, u16), Exchange>,
    /// Insertion order of `exchanges`, for expiry and eviction.
    order: VecDeque<(Peer, u16)>,
    uploads: Uploads,
    outgoing: HashMap<u16, Outgoing>,
    observers: HashMap<ObsKey, Observer>,
    recent_non: HashMap<u16, ObsKey>,
    recent_non_order: VecDeque<u16>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    next_mid: u16,
    next_generation: u64,
    status_rx: watch::Receiver<Status>,
    links: Vec<Link>,
    /// When the event being handled happened: the loop sets it before each handler, and the
    /// handlers read it instead of the clock (so tests can drive them at any time).
    now: Instant,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("socket", &self.socket)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// RFC 7252: the initial timeout is random between ACK_TIMEOUT and ACK_TIMEOUT * factor.
pub(crate) fn initial_timeout() -> Duration {
    ACK_TIMEOUT.mul_f64(1.0 + rand::random::<f64>() * (ACK_RANDOM_FACTOR - 1.0))
}

impl Endpoint {
    pub(crate) fn new(
        socket: UdpSocket,
        shared: Arc<Shared>,
        ingest: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Self {
        let s = &shared.settings;
        let links = vec![
            Link {
                href: format!("/{}", s.ingest_path),
                attrs: vec![
                    ("rt", Some("outpost.ingest".into())),
                    ("ct", Some("0 50 60 110 112".into())),
                    ("if", Some("core.p".into())),
                ],
            },
            Link {
                href: "/status".into(),
                attrs: vec![
                    ("rt", Some("outpost.status".into())),
                    ("ct", Some("50".into())),
                    ("if", Some("core.rp".into())),
                    ("obs", None),
                ],
            },
        ];
        let (done_tx, done_rx) = mpsc::channel(s.max_exchanges.max(1));
        let status_rx = shared.status.subscribe();
        let now = Instant::now();
        let mut timers = BinaryHeap::new();
        timers.push(Reverse((now + HOUSEKEEPING, Timer::Housekeeping)));
        Endpoint {
            socket,
            shared,
            ingest: Some(ingest),
            shutdown,
            hard_stop: CancellationToken::new(),
            done_tx,
            done_rx,
            in_flight: 0,
            in_flight_bytes: 0,
            exchanges: HashMap::new(),
            order: VecDeque::new(),
            uploads: Uploads::default(),
            outgoing: HashMap::new(),
            observers: HashMap::new(),
            recent_non: HashMap::new(),
            recent_non_order: VecDeque::new(),
            timers,
            next_mid: rand::random(),
            next_generation: 0,
            status_rx,
            links,
            now,
        }
    }

    pub(crate) async fn run(mut self, grace: Duration) {
        // The largest UDP payload; anything the kernel hands us fits.
        let mut buf = vec![0u8; 65_535];
        loop {
            let next = self
                .timers
                .peek()
                .map(|Reverse((t, _))| *t)
                .unwrap_or_else(|| Instant::now() + HOUSEKEEPING);
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Event::Shutdown,
                Some(d) = self.done_rx.recv() => Event::Done(d),
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, peer)) => Event::Datagram(n, peer),
                    Err(_) => Event::RecvError,
                },
                r = self.status_rx.changed() => match r {
                    Ok(()) => Event::Status,
                    Err(_) => Event::RecvError,
                },
                _ = tokio::time::sleep_until(next) => Event::Timer,
            };
            self.now = Instant::now();
            match event {
                Event::Shutdown => break,
                Event::Done(d) => self.on_done(d).await,
                Event::Datagram(n, peer) => self.on_datagram(&buf[..n], peer).await,
                // ICMP errors from earlier sends surface here (ECONNREFUSED); the socket is fine.
                Event::RecvError => {}
                Event::Status => self.notify_all().await,
                Event::Timer => self.on_timers().await,
            }
        }
        // Stop taking readings, answer those already handed over.
        self.ingest = None;
        let deadline = Instant::now() + grace;
        while self.in_flight > 0 {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(d)) => {
                    self.now = Instant::now();
                    self.on_done(d).await
                }
                _ => break,
            }
        }
        self.hard_stop.cancel();
        let lost = self.observers.len() as u64;
        self.shared
            .counters
            .observers
            .fetch_sub(lost, Ordering::Relaxed);
        tracing::debug!(listener = ?self.socket.local_addr().ok(), "CoAP listener stopped");
    }

    async fn send(&self, bytes: &[u8], peer: Peer) {
        if let Err(e) = self.socket.send_to(bytes, peer).await {
            tracing::debug!(%peer, error = %e, "CoAP send failed");
        }
    }

    fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn timer(&mut self, at: Instant, t: Timer) {
        self.timers.push(Reverse((at, t)));
    }

    async fn on_datagram(&mut self, data: &[u8], peer: Peer) {
        // Version 1 only; anything shorter than a header is noise (RFC 7252 section 3).
        if data.len() < 4 || data[0] >> 6 != 1 {
            bump(&self.shared.counters.bad_requests);
            return;
        }
        let confirmable = (data[0] >> 4) & 0x3 == 0;
        let mid = u16::from_be_bytes([data[2], data[3]]);
        let pkt = match Packet::from_bytes(data) {
            Ok(p) => p,
            Err(e) => {
                bump(&self.shared.counters.bad_requests);
                tracing::debug!(%peer, error = ?e, "malformed CoAP datagram");
                if confirmable {
                    self.reset(mid, peer).await;
                }
                return;
            }
        };
        let c = msg::raw_code(&pkt);
        let t = pkt.header.get_type();
        if c == code::EMPTY {
            // An empty message is exactly a header (RFC 7252 section 4.1).
            if data.len() != 4 {
                bump(&self.shared.counters.bad_requests);
                if confirmable {
                    self.reset(mid, peer).await;
                }
                return;
            }
            match t {
                // CoAP ping.
                MessageType::Confirmable => self.reset(mid, peer).await,
                MessageType::Acknowledgement => self.on_ack(mid, peer),
                MessageType::Reset => self.on_reset(mid, peer),
                MessageType::NonConfirmable => bump(&self.shared.counters.bad_requests),
            }
            return;
        }
        match (c >> 5, t) {
            (0, MessageType::Confirmable | MessageType::NonConfirmable) => {
                self.on_request(pkt, peer).await
            }
            // A response: this socket sends no requests, so nothing can match it. A CON one
            // gets RST so the sender stops retransmitting.
            (2 | 4 | 5, MessageType::Confirmable) => self.reset(mid, peer).await,
            (2 | 4 | 5, _) => {}
            _ => {
                bump(&self.shared.counters.bad_requests);
                if confirmable {
                    self.reset(mid, peer).await;
                }
            }
        }
    }

    async fn reset(&self, mid: u16, peer: Peer) {
        if let Some(b) = msg::encode(&msg::empty(MessageType::Reset, mid)) {
            self.send(&b, peer).await;
        }
    }

    fn on_ack(&mut self, mid: u16, peer: Peer) {
        if self.outgoing.get(&mid).is_some_and(|o| o.peer == peer)
            && let Some(o) = self.outgoing.remove(&mid)
            && let Some(key) = o.observer
            && let Some(obs) = self.observers.get_mut(&key)
        {
            obs.outstanding = None;
        }
    }

    fn on_reset(&mut self, mid: u16, peer: Peer) {
        let key = if self.outgoing.get(&mid).is_some_and(|o| o.peer == peer) {
            self.outgoing.remove(&mid).and_then(|o| o.observer)
        } else {
            self.recent_non.get(&mid).filter(|k| k.0 == peer).cloned()
        };
        if let Some(key) = key {
            self.recent_non.remove(&mid);
            if self.deregister(&key) {
                bump(&self.shared.counters.observers_lost);
            }
        }
    }

    async fn on_request(&mut self, pkt: Packet, peer: Peer) {
        bump(&self.shared.counters.requests);
        let mid = pkt.header.message_id;
        let con = pkt.header.get_type() == MessageType::Confirmable;
        let key = (peer, mid);
        if let Some(ex) = self.exchanges.get(&key) {
            bump(&self.shared.counters.duplicates);
            let again = match &ex.state {
                ExState::Pending { ack, .. } => ack.clone(),
                ExState::Answered(bytes) => bytes.clone(),
            };
            if con && let Some(b) = again {
                self.send(&b, peer).await;
            }
            return;
        }
        match self.process(&pkt, peer, con) {
            Outcome::Respond(resp) => {
                let bytes = self.send_response(resp, con, mid, peer).await;
                self.remember(key, ExState::Answered(if con { bytes } else { None }));
            }
            Outcome::HandedOver => {
                self.remember(key, ExState::Pending { con, ack: None });
                if con {
                    self.timer(self.now + PIGGYBACK_WINDOW, Timer::EmptyAck(peer, mid));
                }
            }
        }
    }

    /// Sends `resp` as the piggy-backed ACK of a CON request, or as a NON; returns the bytes.
    async fn send_response(
        &mut self,
        resp: Packet,
        con: bool,
        mid: u16,
        peer: Peer,
    ) -> Option<Vec<u8>> {
        let resp = if con {
            msg::with_type(resp, MessageType::Acknowledgement, mid)
        } else {
            let m = self.mid();
            msg::with_type(resp, MessageType::NonConfirmable, m)
        };
        let bytes = msg::encode(&resp)?;
        self.send(&bytes, peer).await;
        Some(bytes)
    }

    /// Sends a confirmable message and schedules its retransmission.
    async fn send_con(&mut self, pkt: Packet, peer: Peer, observer: Option<ObsKey>) -> Option<u16> {
        let mid = self.mid();
        let bytes = msg::encode(&msg::with_type(pkt, MessageType::Confirmable, mid))?;
        self.send(&bytes, peer).await;
        let timeout = initial_timeout();
        self.next_generation += 1;
        let generation = self.next_generation;
        self.outgoing.insert(
            mid,
            Outgoing {
                peer,
                bytes,
                attempts: 0,
                timeout,
                generation,
                observer,
            },
        );
        self.timer(self.now + timeout, Timer::Retransmit(mid, generation));
        Some(mid)
    }

    fn remember(&mut self, key: (Peer, u16), state: ExState) {
        if self.exchanges.len() >= self.shared.settings.max_exchanges {
            self.evict_exchange();
        }
        self.exchanges.insert(
            key,
            Exchange {
                state,
                at: self.now,
            },
        );
        self.order.push_back(key);
    }

    /// Drops the oldest answered exchange (pending ones must stay: their answer needs them).
    fn evict_exchange(&mut self) {
        for _ in 0..self.order.len() {
            let Some(k) = self.order.pop_front() else {
                return;
            };
            match self.exchanges.get(&k) {
                None => continue,
                Some(Exchange {
                    state: ExState::Pending { .. },
                    ..
                }) => self.order.push_back(k),
                Some(_) => {
                    self.exchanges.remove(&k);
                    bump(&self.shared.counters.evicted);
                    return;
                }
            }
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let lifetime = self.shared.settings.exchange_lifetime;
        while let Some(k) = self.order.front() {
            match self.exchanges.get(k) {
                None => {
                    self.order.pop_front();
                }
                Some(e) if matches!(e.state, ExState::Answered(_)) && e.at + lifetime <= now => {
                    let k = *k;
                    self.exchanges.remove(&k);
                    self.order.pop_front();
                }
                Some(_) => break,
            }
        }
        self.uploads.expire(now, lifetime);
    }

    async fn on_timers(&mut self) {
        let now = self.now;
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, timer))) = self.timers.pop() else {
                break;
            };
            match timer {
                Timer::Housekeeping => {
                    self.housekeeping(now);
                    self.timer(now + HOUSEKEEPING, Timer::Housekeeping);
                }
                Timer::EmptyAck(peer, mid) => {
                    let Some(Exchange {
                        state: ExState::Pending { con: true, ack },
                        ..
                    }) = self.exchanges.get_mut(&(peer, mid))
                    else {
                        continue;
                    };
                    if ack.is_none()
                        && let Some(b) = msg::encode(&msg::empty(MessageType::Acknowledgement, mid))
                    {
                        *ack = Some(b.clone());
                        self.send(&b, peer).await;
                    }
                }
                Timer::Retransmit(mid, generation) => {
                    let Some(o) = self.outgoing.get_mut(&mid) else {
                        continue;
                    };
                    if o.generation != generation {
                        continue;
                    }
                    if o.attempts < MAX_RETRANSMIT {
                        o.attempts += 1;
                        o.timeout *= 2;
                        let (bytes, peer, timeout) = (o.bytes.clone(), o.peer, o.timeout);
                        bump(&self.shared.counters.retransmissions);
                        self.send(&bytes, peer).await;
                        self.timer(now + timeout, Timer::Retransmit(mid, generation));
                    } else if let Some(o) = self.outgoing.remove(&mid) {
                        bump(&self.shared.counters.timeouts);
                        tracing::debug!(peer = %o.peer, mid, "confirmable message not acknowledged, giving up");
                        if let Some(key) = o.observer
                            && self.deregister(&key)
                        {
                            bump(&self.shared.counters.observers_lost);
                        }
                    }
                }
            }
        }
    }

    fn process(&mut self, pkt: &Packet, peer: Peer, con: bool) -> Outcome {
        let respond = Outcome::Respond;
        for (&number, _) in pkt.options() {
            if number == opt::PROXY_URI || number == opt::PROXY_SCHEME {
                return respond(msg::response(pkt, code::PROXYING_NOT_SUPPORTED));
            }
            if opt::is_critical(number) && !opt::UNDERSTOOD_CRITICAL.contains(&number) {
                return respond(diagnostic(
                    pkt,
                    code::BAD_OPTION,
                    &format!("unsupported critical option {number}"),
                ));
            }
        }
        let Some(path) = msg::path(pkt) else {
            return respond(diagnostic(pkt, code::BAD_REQUEST, "Uri-Path is not UTF-8"));
        };
        let method = msg::raw_code(pkt);
        let segs: Vec<&str> = path.iter().map(String::as_str).collect();
        match segs.as_slice() {
            [".well-known", "core"] => {
                if method != code::GET {
                    return respond(msg::response(pkt, code::METHOD_NOT_ALLOWED));
                }
                let Some(queries) = msg::queries(pkt) else {
                    return respond(diagnostic(pkt, code::BAD_REQUEST, "Uri-Query is not UTF-8"));
                };
                let doc = link::document(&self.links, &queries);
                respond(body(pkt, code::CONTENT, doc.as_bytes(), 40, None))
            }
            ["status"] => {
                if method != code::GET {
                    return respond(msg::response(pkt, code::METHOD_NOT_ALLOWED));
                }
                respond(self.status_get(pkt, peer))
            }
            [first, rest @ ..] if *first == self.shared.settings.ingest_path => {
                let success = match method {
                    code::POST => code::CREATED,
                    code::PUT => code::CHANGED,
                    _ => return respond(msg::response(pkt, code::METHOD_NOT_ALLOWED)),
                };
                self.ingest(pkt, peer, con, rest, success)
            }
            _ => respond(msg::response(pkt, code::NOT_FOUND)),
        }
    }

    fn status_get(&mut self, pkt: &Packet, peer: Peer) -> Packet {
        let status = self.status_rx.borrow().clone();
        let key: ObsKey = (peer, pkt.get_token().to_vec());
        let szx = match msg::block_opt(pkt, opt::BLOCK2) {
            Some(Ok(b)) => b.szx.min(6),
            _ => DEFAULT_SZX,
        };
        let mut observing = false;
        match msg::uint_opt(pkt, opt::OBSERVE) {
            Some(Ok(0)) => {
                let max = self.shared.settings.max_observers as u64;
                if let Some(o) = self.observers.get_mut(&key) {
                    o.szx = szx;
                    observing = true;
                } else if self.shared.counters.observers.load(Ordering::Relaxed) < max {
                    self.observers.insert(
                        key,
                        Observer {
                            sent: 0,
                            outstanding: None,
                            szx,
                        },
                    );
                    bump(&self.shared.counters.observers);
                    observing = true;
                }
            }
            Some(Ok(1)) => {
                self.deregister(&key);
            }
            _ => {}
        }
        let seq = observing.then_some(status.seq);
        body(pkt, code::CONTENT, &status.body, 50, seq)
    }

    /// Removes an observer; true if it was registered.
    fn deregister(&mut self, key: &ObsKey) -> bool {
        match self.observers.remove(key) {
            Some(o) => {
                if let Some(mid) = o.outstanding {
                    self.outgoing.remove(&mid);
                }
                self.shared
                    .counters
                    .observers
                    .fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    async fn notify_all(&mut self) {
        let status = self.status_rx.borrow_and_update().clone();
        let keys: Vec<ObsKey> = self.observers.keys().cloned().collect();
        for key in keys {
            let Some(obs) = self.observers.get_mut(&key) else {
                continue;
            };
            let mut n = Packet::new();
            n.header.code = coap_lite::MessageClass::from(code::CONTENT);
            n.set_token(key.1.clone());
            let n = body(&n, code::CONTENT, &status.body, 50, Some(status.seq));
            obs.sent += 1;
            let confirmable = obs.sent % CON_NOTIFY_EVERY == 0;
            bump(&self.shared.counters.notifications);
            // RFC 7641 section 4.5.2: a newer notification replaces one still being
            // retransmitted, and inherits its retransmission state. It goes out now, as a
            // confirmable message with a new id: an ACK for the old id would not say that the
            // new state arrived.
            let replaced = obs
                .outstanding
                .take()
                .and_then(|mid| self.outgoing.remove(&mid));
            if let Some(old) = replaced {
                let mid = self.mid();
                let Some(bytes) = msg::encode(&msg::with_type(n, MessageType::Confirmable, mid))
                else {
                    continue;
                };
                self.send(&bytes, key.0).await;
                let deadline = self.now + old.timeout;
                self.timer(deadline, Timer::Retransmit(mid, old.generation));
                self.outgoing.insert(mid, Outgoing { bytes, ..old });
                if let Some(obs) = self.observers.get_mut(&key) {
                    obs.outstanding = Some(mid);
                }
                continue;
            }
            if confirmable {
                let mid = self.send_con(n, key.0, Some(key.clone())).await;
                if let Some(obs) = self.observers.get_mut(&key) {
                    obs.outstanding = mid;
                }
            } else {
                let mid = self.mid();
                if let Some(b) = msg::encode(&msg::with_type(n, MessageType::NonConfirmable, mid)) {
                    self.send(&b, key.0).await;
                }
                if self.recent_non_order.len() >= RECENT_NON_NOTIFICATIONS
                    && let Some(old) = self.recent_non_order.pop_front()
                {
                    self.recent_non.remove(&old);
                }
                self.recent_non.insert(mid, key.clone());
                self.recent_non_order.push_back(mid);
            }
        }
    }

    fn ingest(
        &mut self,
        pkt: &Packet,
        peer: Peer,
        con: bool,
        rest: &[&str],
        success: u8,
    ) -> Outcome {
        let respond = Outcome::Respond;
        let settings = &self.shared.settings;
        let max = settings.max_payload;
        if rest.is_empty() || rest.iter().any(|s| s.is_empty()) {
            return respond(diagnostic(
                pkt,
                code::BAD_REQUEST,
                &format!(
                    "post readings to /{}/<topic>, with non-empty topic levels",
                    settings.ingest_path
                ),
            ));
        }
        let topic = format!("{}/{}", settings.topic_prefix, rest.join("/"));
        let topic = match TopicName::new(&topic) {
            Ok(t) => t.into_string(),
            Err(e) => {
                return respond(diagnostic(
                    pkt,
                    code::BAD_REQUEST,
                    &format!("invalid topic {topic:?}: {e}"),
                ));
            }
        };
        let content_format = match msg::uint_opt(pkt, opt::CONTENT_FORMAT) {
            None => None,
            Some(Ok(v)) if v <= u32::from(u16::MAX) => Some(v as u16),
            Some(_) => {
                return respond(diagnostic(pkt, code::BAD_REQUEST, "invalid Content-Format"));
            }
        };
        let block1 = match msg::block_opt(pkt, opt::BLOCK1) {
            None => None,
            Some(Ok(b)) if b.szx < 7 => Some(b),
            Some(_) => {
                return respond(diagnostic(pkt, code::BAD_REQUEST, "invalid Block1 option"));
            }
        };
        let budget = self.buffer_budget();
        let (payload, content_format) = match block1 {
            None if pkt.payload.len() > max => return respond(too_large(pkt, max)),
            None => {
                if let Some(busy) = self.admit(pkt, pkt.payload.len()) {
                    return respond(busy);
                }
                (pkt.payload.clone(), content_format)
            }
            Some(b) => {
                let ukey = (peer, topic.clone());
                if b.num == 0 {
                    if let Some(Ok(size1)) = msg::uint_opt(pkt, opt::SIZE1)
                        && size1 as usize > max
                    {
                        return respond(too_large(pkt, max));
                    }
                    if !self.uploads.contains(&ukey)
                        && self.uploads.len() >= self.shared.settings.max_exchanges
                        && let Some(oldest) = self.uploads.oldest(None)
                    {
                        self.uploads.remove(&oldest);
                        bump(&self.shared.counters.evicted);
                    }
                    self.uploads.start(
                        ukey.clone(),
                        Upload {
                            data: Vec::new(),
                            content_format,
                            started: self.now,
                        },
                    );
                }
                let Some(have) = self.uploads.received(&ukey) else {
                    return respond(diagnostic(
                        pkt,
                        code::REQUEST_ENTITY_INCOMPLETE,
                        &format!("block {} without the blocks before it", b.num),
                    ));
                };
                if b.offset() != have {
                    self.uploads.remove(&ukey);
                    return respond(diagnostic(
                        pkt,
                        code::REQUEST_ENTITY_INCOMPLETE,
                        &format!(
                            "block {} starts at offset {}, expected offset {have}",
                            b.num,
                            b.offset()
                        ),
                    ));
                }
                if b.more && pkt.payload.len() != b.size() {
                    self.uploads.remove(&ukey);
                    return respond(diagnostic(
                        pkt,
                        code::BAD_REQUEST,
                        "block payload does not match its block size",
                    ));
                }
                if have + pkt.payload.len() > max {
                    self.uploads.remove(&ukey);
                    return respond(too_large(pkt, max));
                }
                // The last block is taken only if the body can be handed over now: refused,
                // the upload stays, and the block can be sent again.
                if !b.more
                    && let Some(busy) = self.admit(pkt, have + pkt.payload.len())
                {
                    return respond(busy);
                }
                // Bytes held by all uploads stay within the budget: the oldest others make
                // room (this one alone always fits: it is at most `max_payload`).
                while self.uploads.bytes + pkt.payload.len() > budget {
                    let Some(oldest) = self.uploads.oldest(Some(&ukey)) else {
                        break;
                    };
                    self.uploads.remove(&oldest);
                    bump(&self.shared.counters.evicted);
                }
                self.uploads.append(&ukey, &pkt.payload);
                if b.more {
                    let mut r = msg::response(pkt, code::CONTINUE);
                    msg::set_uint(&mut r, opt::BLOCK1, b.value());
                    return respond(r);
                }
                let Some(up) = self.uploads.remove(&ukey) else {
                    return respond(msg::response(pkt, code::REQUEST_ENTITY_INCOMPLETE));
                };
                bump(&self.shared.counters.block_uploads);
                (up.data, content_format.or(up.content_format))
            }
        };
        let Some(ingest) = self.ingest.clone() else {
            return respond(service_unavailable(pkt, 1));
        };
        self.in_flight += 1;
        self.in_flight_bytes += payload.len();
        let bytes = payload.len();
        let (tx, rx) = oneshot::channel();
        let inbound = Inbound {
            client_id: Arc::from(format!("coap:{peer}")),
            topic,
            payload: Bytes::from(payload),
            qos: if con {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
            retain: false,
            source: Source::Coap,
            content_format,
            reply: Some(tx),
        };
        let mut done = Done {
            peer,
            mid: pkt.header.message_id,
            con,
            token: pkt.get_token().to_vec(),
            success,
            bytes,
            block1: block1.map(|b| Block { more: false, ..b }),
            reply: Err(IngestRefusal::StoreUnavailable),
        };
        let done_tx = self.done_tx.clone();
        let hard_stop = self.hard_stop.clone();
        tokio::spawn(async move {
            let handed = tokio::select! {
                r = ingest.send(inbound) => r.is_ok(),
                _ = hard_stop.cancelled() => false,
            };
            drop(ingest);
            if handed {
                // A dropped reply sender counts as a refusal: no success for what was not stored.
                done.reply = rx.await.unwrap_or(Err(IngestRefusal::StoreUnavailable));
            }
            let _ = done_tx.send(done).await;
        });
        Outcome::HandedOver
    }

    /// Bytes of request bodies held, in uploads and in hand-overs (each): `max_buffered_bytes`,
    /// but never less than one body of the largest size.
    fn buffer_budget(&self) -> usize {
        let s = &self.shared.settings;
        s.max_buffered_bytes.max(s.max_payload)
    }

    /// None if a body of `len` bytes can be handed to the gateway now; else the 5.03 to send.
    fn admit(&self, req: &Packet, len: usize) -> Option<Packet> {
        if self.ingest.is_none() {
            return Some(service_unavailable(req, 1));
        }
        if self.in_flight >= self.shared.settings.max_exchanges
            || self.in_flight_bytes + len > self.buffer_budget()
        {
            bump(&self.shared.counters.overloaded);
            return Some(service_unavailable(req, 1));
        }
        None
    }

    async fn on_done(&mut self, done: Done) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(done.bytes);
        let mut req = Packet::new();
        req.set_token(done.token.clone());
        let resp = match &done.reply {
            Ok(()) => {
                bump(&self.shared.counters.stored);
                let mut r = msg::response(&req, done.success);
                if let Some(b) = done.block1 {
                    msg::set_uint(&mut r, opt::BLOCK1, b.value());
                }
                r
            }
            Err(refusal) => {
                bump(&self.shared.counters.refused);
                tracing::debug!(peer = %done.peer, ?refusal, "CoAP reading refused by the gateway");
                match refusal {
                    IngestRefusal::PayloadInvalid(why) => diagnostic(&req, code::BAD_REQUEST, why),
                    IngestRefusal::UnsupportedFormat => {
                        msg::response(&req, code::UNSUPPORTED_CONTENT_FORMAT)
                    }
                    IngestRefusal::TooLarge => too_large(&req, self.shared.settings.max_payload),
                    IngestRefusal::QuotaExceeded | IngestRefusal::StoreUnavailable => {
                        service_unavailable(&req, RETRY_AFTER_SECS)
                    }
                }
            }
        };
        let key = (done.peer, done.mid);
        let pending_ack = match self.exchanges.get(&key) {
            Some(Exchange {
                state: ExState::Pending { ack, .. },
                ..
            }) => Some(ack.clone()),
            _ => None,
        };
        if !done.con {
            self.send_response(resp, false, done.mid, done.peer).await;
            if let Some(e) = self.exchanges.get_mut(&key) {
                e.state = ExState::Answered(None);
            }
            return;
        }
        match pending_ack {
            // Still within the piggy-back window: the response is the ACK.
            Some(None) => {
                let bytes = self.send_response(resp, true, done.mid, done.peer).await;
                if let Some(e) = self.exchanges.get_mut(&key) {
                    e.state = ExState::Answered(bytes);
                }
            }
            // Empty ACK already sent (or the exchange is gone): a separate CON response.
            other => {
                tracing::debug!(peer = %done.peer, mid = done.mid, code = %code::fmt(msg::raw_code(&resp)),
                    "separate response");
                self.send_con(resp, done.peer, None).await;
                if let Some(e) = self.exchanges.get_mut(&key) {
                    e.state = ExState::Answered(other.flatten());
                }
            }
        }
    }
}

/// A response whose payload is a diagnostic message (RFC 7252 section 5.5.2: UTF-8, no
/// Content-Format).
fn diagnostic(req: &Packet, c: u8, why: &str) -> Packet {
    let mut r = msg::response(req, c);
    let mut end = why.len().min(MAX_DIAGNOSTIC);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    r.payload = why.as_bytes()[..end].to_vec();
    r
}

fn too_large(req: &Packet, max: usize) -> Packet {
    let mut r = diagnostic(
        req,
        code::REQUEST_ENTITY_TOO_LARGE,
        &format!("payload larger than {max} bytes"),
    );
    msg::set_uint(&mut r, opt::SIZE1, u32::try_from(max).unwrap_or(u32::MAX));
    r
}

fn service_unavailable(req: &Packet, retry_after: u32) -> Packet {
    let mut r = msg::response(req, code::SERVICE_UNAVAILABLE);
    msg::set_uint(&mut r, opt::MAX_AGE, retry_after);
    r
}

/// A response carrying `content` in the format `cf`, one Block2 block of it when it is larger
/// than the block size the client asked for (or 1024 bytes), with `Observe` when `observe`.
fn body(req: &Packet, c: u8, content: &[u8], cf: u16, observe: Option<u32>) -> Packet {
    let requested = msg::block_opt(req, opt::BLOCK2);
    let (num, szx) = match requested {
        None => (0, DEFAULT_SZX),
        Some(Ok(b)) => (b.num, b.szx.min(6)),
        Some(Err(())) => return diagnostic(req, code::BAD_REQUEST, "invalid Block2 option"),
    };
    let block = Block {
        num,
        more: false,
        szx,
    };
    let mut r = msg::response(req, c);
    msg::set_uint(&mut r, opt::CONTENT_FORMAT, u32::from(cf));
    if let Some(seq) = observe {
        msg::set_uint(&mut r, opt::OBSERVE, seq & 0x00ff_ffff);
    }
    if requested.is_none() && content.len() <= block.size() {
        r.payload = content.to_vec();
        return r;
    }
    let start = block.offset();
    if start >= content.len() && !(start == 0 && content.is_empty()) {
        return diagnostic(
            req,
            code::BAD_OPTION,
            "Block2 beyond the end of the resource",
        );
    }
    let end = (start + block.size()).min(content.len());
    let block = Block {
        more: end < content.len(),
        ..block
    };
    msg::set_uint(&mut r, opt::BLOCK2, block.value());
    if num == 0 {
        msg::set_uint(
            &mut r,
            opt::SIZE2,
            u32::try_from(content.len()).unwrap_or(u32::MAX),
        );
    }
    r.payload = content[start..end].to_vec();
    r
}

#[cfg(test)]
mod fuzz;
