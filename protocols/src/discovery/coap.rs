//! CoAP resource discovery (RFC 7252 section 8, RFC 6690): every `interval`, a non-confirmable
//! `GET /.well-known/core` to the All-CoAP-Nodes groups (224.0.1.187, ff02::fd) on each
//! configured interface, and to each unicast target (configured, or added by mDNS through
//! [`CoapDiscoveryHandle::add_unicast`]). Every answer becomes a [`Found::CoapResources`].
//!
//! - **Configured interfaces only.** IPv4 multicast goes out through a socket bound to the
//!   interface's own address (Linux routes multicast from a bound source out of the interface
//!   that owns it, so no `IP_MULTICAST_IF` is needed); IPv6 multicast carries the interface's
//!   index as the scope of `ff02::fd`. Addresses are looked up every round, so an interface that
//!   comes up later, or changes address, is used from the next round. TTL / hop limit 1.
//! - **Answers are matched by token.** A datagram whose token we did not send in the last
//!   [`TOKEN_LIFETIME`] is dropped and counted; so is anything that is not a 2.05 answer in
//!   link-format (or without Content-Format), or not a valid document.
//! - **Block2.** A document longer than one block is fetched block by block from the device
//!   (unicast), at most [`MAX_BLOCKS`] blocks, at most [`MAX_REASSEMBLIES`] devices at a time.
//! - Confirmable answers are ACKed. Requests are never retransmitted: the next round is the
//!   retry.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DiscoveryError, Found, MAX_RESOURCES, device_id, parse_link_format};

/// The CoAP port the groups are asked on.
pub const COAP_PORT: u16 = 5683;

/// All-CoAP-Nodes, IPv4 (RFC 7252 section 12.8).
pub const ALL_COAP_NODES_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 1, 187);

/// All-CoAP-Nodes, IPv6 link-local scope.
pub const ALL_COAP_NODES_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfd);

/// How long answers to a request are accepted (multicast answers are spread over the
/// devices' Leisure, 5 s by default).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10);

/// Blocks fetched per document at most (with 1024-byte blocks: 16 KiB).
pub const MAX_BLOCKS: u32 = 16;

/// Documents being fetched block by block at once, at most.
pub const MAX_REASSEMBLIES: usize = 64;

/// Unicast targets kept at most; more are refused and counted.
pub const MAX_UNICAST_TARGETS: usize = 1024;

/// Requests outstanding at most (tokens remembered); the oldest is forgotten beyond.
const MAX_OUTSTANDING: usize = 4096;

/// Datagrams waiting for the discovery loop; more are dropped (counted as bad).
const RX_QUEUE: usize = 256;

/// Content-Format application/link-format.
const LINK_FORMAT: u32 = 40;

/// Where and how often to look.
#[derive(Debug, Clone)]
pub struct CoapDiscoverySettings {
    /// Names of the LAN-side interfaces to multicast on; never others. May be empty when only
    /// unicast targets are asked.
    pub interfaces: Vec<String>,
    /// Time between rounds (the first round is at once).
    pub interval: Duration,
    /// Multicast to 224.0.1.187 and ff02::fd on the interfaces.
    pub groups: bool,
    /// Devices to ask directly every round.
    pub unicast: Vec<SocketAddr>,
}

/// A snapshot of the CoAP discovery counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoapDiscoveryStats {
    /// Rounds started.
    pub rounds: u64,
    /// Requests sent (multicast, unicast and block follow-ups).
    pub requests: u64,
    /// Requests the socket refused (no route, interface without address yet).
    pub send_errors: u64,
    /// `Found::CoapResources` sent.
    pub answers: u64,
    /// Datagrams dropped: undecodable, not 2.05, wrong Content-Format, malformed link-format,
    /// broken Block2 sequences, or the receive queue full.
    pub bad_responses: u64,
    /// Answers with a token we did not send (or sent too long ago).
    pub unknown_tokens: u64,
    /// Resources dropped beyond [`MAX_RESOURCES`], and documents dropped beyond [`MAX_BLOCKS`].
    pub truncated: u64,
    /// Unicast targets refused beyond [`MAX_UNICAST_TARGETS`].
    pub targets_refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rounds: AtomicU64,
    requests: AtomicU64,
    send_errors: AtomicU64,
    answers: AtomicU64,
    bad_responses: AtomicU64,
    unknown_tokens: AtomicU64,
    truncated: AtomicU64,
    targets_refused: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    /// Unicast targets; bounded by [`MAX_UNICAST_TARGETS`].
    targets: Mutex<BTreeSet<SocketAddr>>,
    /// Targets added since the last round: asked at once.
    fresh: Mutex<Vec<SocketAddr>>,
    wake: Notify,
}

/// Adds targets and reads counters while [`CoapDiscovery::run`] goes on.
#[derive(Debug, Clone)]
pub struct CoapDiscoveryHandle {
    shared: Arc<Shared>,
}

impl CoapDiscoveryHandle {
    /// Asks `addr` every round from now on (the first time at once). Idempotent.
    pub fn add_unicast(&self, addr: SocketAddr) {
        add_target(&self.shared, addr);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CoapDiscoveryStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.shared.counters;
        CoapDiscoveryStats {
            rounds: g(&c.rounds),
            requests: g(&c.requests),
            send_errors: g(&c.send_errors),
            answers: g(&c.answers),
            bad_responses: g(&c.bad_responses),
            unknown_tokens: g(&c.unknown_tokens),
            truncated: g(&c.truncated),
            targets_refused: g(&c.targets_refused),
        }
    }
}

fn add_target(shared: &Shared, addr: SocketAddr) {
    let added = {
        let mut t = shared
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if t.contains(&addr) {
            false
        } else if t.len() >= MAX_UNICAST_TARGETS {
            bump(&shared.counters.targets_refused);
            tracing::warn!(%addr, "CoAP discovery: too many unicast targets, refused");
            false
        } else {
            t.insert(addr)
        }
    };
    if added {
        shared
            .fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(addr);
        shared.wake.notify_one();
    }
}

/// CoAP discovery, bound and ready to run.
#[derive(Debug)]
pub struct CoapDiscovery {
    settings: CoapDiscoverySettings,
    /// Unicast to IPv4 targets, and Block2 follow-ups to them.
    any_v4: Arc<UdpSocket>,
    /// Unicast to IPv6 targets and IPv6 multicast; None where the host has no IPv6.
    any_v6: Option<Arc<UdpSocket>>,
    shared: Arc<Shared>,
}

/// What a token was sent for.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    sent: Instant,
    /// The block number asked for (0 for a first request).
    block: u32,
}

/// A document being fetched block by block from one device.
#[derive(Debug)]
struct Reassembly {
    body: Vec<u8>,
    next: u32,
    started: Instant,
}

/// A datagram and the socket it came in on (answers go back through it).
type Datagram = (Arc<UdpSocket>, SocketAddr, Vec<u8>);

fn socket_error(addr: SocketAddr) -> impl FnOnce(std::io::Error) -> DiscoveryError {
    move |source| DiscoveryError::Socket { addr, source }
}

async fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, DiscoveryError> {
    let s = UdpSocket::bind(addr).await.map_err(socket_error(addr))?;
    if addr.is_ipv4() {
        s.set_multicast_ttl_v4(1).map_err(socket_error(addr))?;
        s.set_multicast_loop_v4(false).map_err(socket_error(addr))?;
    }
    Ok(s)
}

impl CoapDiscovery {
    /// Validates the settings and binds the unicast sockets (ephemeral ports).
    pub async fn bind(settings: CoapDiscoverySettings) -> Result<Self, DiscoveryError> {
        if settings.interval < Duration::from_secs(1) {
            return Err(DiscoveryError::InvalidSetting {
                field: "interval",
                why: "must be at least 1 s".into(),
            });
        }
        if settings.groups && settings.interfaces.is_empty() {
            return Err(DiscoveryError::InvalidSetting {
                field: "interfaces",
                why: "multicast discovery needs at least one LAN-side interface".into(),
            });
        }
        let any_v4 = bind_udp(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
        let any_v6 = match bind_udp(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)).await {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                tracing::info!(error = %e, "CoAP discovery: no IPv6");
                None
            }
        };
        let shared = Arc::new(Shared::default());
        for a in &settings.unicast {
            add_target(&shared, *a);
        }
        Ok(Self {
            settings,
            any_v4: Arc::new(any_v4),
            any_v6,
            shared,
        })
    }

    /// Asks `addr` every round from now on (the first time at once). Idempotent.
    pub fn add_unicast(&self, addr: SocketAddr) {
        add_target(&self.shared, addr);
    }

    /// A handle to add targets and read counters while `run` goes on.
    pub fn handle(&self) -> CoapDiscoveryHandle {
        CoapDiscoveryHandle {
            shared: self.shared.clone(),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CoapDiscoveryStats {
        self.handle().stats()
    }

    /// Discovers until `shutdown`. While `found` is full, discovery waits.
    pub async fn run(
        self,
        found: mpsc::Sender<Found>,
        shutdown: CancellationToken,
    ) -> Result<(), DiscoveryError> {
        let mut state = State {
            settings: self.settings,
            any_v4: self.any_v4,
            any_v6: self.any_v6,
            shared: self.shared,
            per_if_v4: HashMap::new(),
            outstanding: HashMap::new(),
            reassembly: HashMap::new(),
            next_mid: rand::random(),
            stop: shutdown.child_token(),
        };
        let (rx_tx, mut rx) = mpsc::channel::<Datagram>(RX_QUEUE);
        spawn_receiver(
            state.any_v4.clone(),
            rx_tx.clone(),
            state.stop.clone(),
            state.shared.clone(),
        );
        if let Some(s) = &state.any_v6 {
            spawn_receiver(
                s.clone(),
                rx_tx.clone(),
                state.stop.clone(),
                state.shared.clone(),
            );
        }
        let mut ticker = tokio::time::interval(state.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = ticker.tick() => state.round(&rx_tx).await,
                _ = state.shared.wake.notified() => {
                    let fresh: Vec<SocketAddr> = std::mem::take(
                        &mut *state.shared.fresh.lock().unwrap_or_else(PoisonError::into_inner),
                    );
                    for addr in fresh {
                        state.unicast(addr, None).await;
                    }
                }
                Some((socket, from, bytes)) = rx.recv() => {
                    if let Some(f) = state.handle(&socket, from, &bytes).await {
                        tokio::select! {
                            _ = shutdown.cancelled() => break Ok(()),
                            sent = found.send(f) => if sent.is_err() { break Ok(()) },
                        }
                    }
                }
            }
        };
        state.stop.cancel();
        result
    }
}

fn spawn_receiver(
    socket: Arc<UdpSocket>,
    tx: mpsc::Sender<Datagram>,
    stop: CancellationToken,
    shared: Arc<Shared>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let got = tokio::select! {
                _ = stop.cancelled() => return,
                got = socket.recv_from(&mut buf) => got,
            };
            match got {
                Ok((n, from)) => {
                    let d = (socket.clone(), from, buf[..n].to_vec());
                    if tx.try_send(d).is_err() {
                        bump(&shared.counters.bad_responses);
                    }
                }
                // ICMP errors surface here on Linux (port unreachable from a target): not fatal.
                Err(e) => tracing::debug!(error = %e, "CoAP discovery: receive error"),
            }
        }
    });
}

/// The discovery loop's state (one task owns it).
struct State {
    settings: CoapDiscoverySettings,
    any_v4: Arc<UdpSocket>,
    any_v6: Option<Arc<UdpSocket>>,
    shared: Arc<Shared>,
    /// Multicast senders, one per IPv4 address of a configured interface, with the token that
    /// stops its receiver when the address goes away.
    per_if_v4: HashMap<Ipv4Addr, (Arc<UdpSocket>, CancellationToken)>,
    outstanding: HashMap<[u8; 8], Outstanding>,
    reassembly: HashMap<SocketAddr, Reassembly>,
    next_mid: u16,
    stop: CancellationToken,
}

impl State {
    fn request(&mut self, block: Option<(u32, u8)>) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(MessageType::NonConfirmable);
        p.header.code = MessageClass::Request(RequestType::Get);
        self.next_mid = self.next_mid.wrapping_add(1);
        p.header.message_id = self.next_mid;
        let token: [u8; 8] = rand::random();
        p.set_token(token.to_vec());
        p.add_option(CoapOption::UriPath, b".well-known".to_vec());
        p.add_option(CoapOption::UriPath, b"core".to_vec());
        if let Some((num, szx)) = block {
            let v = (num << 4) | u32::from(szx);
            let b = v.to_be_bytes();
            let skip = b.iter().take_while(|x| **x == 0).count();
            p.add_option(CoapOption::Block2, b[skip..].to_vec());
        }
        let now = Instant::now();
        self.outstanding
            .retain(|_, o| now.duration_since(o.sent) < TOKEN_LIFETIME);
        if self.outstanding.len() >= MAX_OUTSTANDING
            && let Some(oldest) = self
                .outstanding
                .iter()
                .min_by_key(|(_, o)| o.sent)
                .map(|(t, _)| *t)
        {
            self.outstanding.remove(&oldest);
        }
        self.outstanding.insert(
            token,
            Outstanding {
                sent: now,
                block: block.map_or(0, |b| b.0),
            },
        );
        p
    }

    async fn send(&mut self, socket: &UdpSocket, to: SocketAddr, block: Option<(u32, u8)>) {
        let p = self.request(block);
        let Ok(bytes) = p.to_bytes() else { return };
        bump(&self.shared.counters.requests);
        if let Err(e) = socket.send_to(&bytes, to).await {
            bump(&self.shared.counters.send_errors);
            tracing::debug!(%to, error = %e, "CoAP discovery: send failed");
        }
    }

    async fn unicast(&mut self, to: SocketAddr, block: Option<(u32, u8)>) {
        let socket = match to {
            SocketAddr::V4(_) => Some(self.any_v4.clone()),
            SocketAddr::V6(_) => self.any_v6.clone(),
        };
        match socket {
            Some(s) => self.send(&s, to, block).await,
            None => bump(&self.shared.counters.send_errors),
        }
    }

    async fn round(&mut self, rx_tx: &mpsc::Sender<Datagram>) {
        bump(&self.shared.counters.rounds);
        let now = Instant::now();
        self.reassembly
            .retain(|_, r| now.duration_since(r.started) < TOKEN_LIFETIME);
        if self.settings.groups {
            self.multicast(rx_tx).await;
        }
        let targets: Vec<SocketAddr> = self
            .shared
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        for t in targets {
            self.unicast(t, None).await;
        }
    }

    async fn multicast(&mut self, rx_tx: &mpsc::Sender<Datagram>) {
        let ifs = match if_addrs::get_if_addrs() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "CoAP discovery: cannot list interfaces");
                return;
            }
        };
        let lan: Vec<&if_addrs::Interface> = ifs
            .iter()
            .filter(|i| self.settings.interfaces.contains(&i.name))
            .collect();
        let v4_now: Vec<Ipv4Addr> = lan
            .iter()
            .filter_map(|i| match i.ip() {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        self.per_if_v4.retain(|a, (_, stop)| {
            let keep = v4_now.contains(a);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for a in &v4_now {
            if !self.per_if_v4.contains_key(a) {
                match bind_udp(SocketAddr::new(IpAddr::V4(*a), 0)).await {
                    Ok(s) => {
                        let s = Arc::new(s);
                        let stop = self.stop.child_token();
                        spawn_receiver(s.clone(), rx_tx.clone(), stop.clone(), self.shared.clone());
                        self.per_if_v4.insert(*a, (s, stop));
                    }
                    Err(e) => {
                        bump(&self.shared.counters.send_errors);
                        tracing::warn!(addr = %a, error = %e, "CoAP discovery: cannot bind");
                    }
                }
            }
        }
        let group_v4 = SocketAddr::new(IpAddr::V4(ALL_COAP_NODES_V4), COAP_PORT);
        let senders: Vec<Arc<UdpSocket>> =
            self.per_if_v4.values().map(|(s, _)| s.clone()).collect();
        for s in senders {
            self.send(&s, group_v4, None).await;
        }
        if let Some(v6) = self.any_v6.clone() {
            let mut indexes: Vec<u32> = lan
                .iter()
                .filter(|i| i.ip().is_ipv6())
                .filter_map(|i| i.index)
                .collect();
            indexes.sort_unstable();
            indexes.dedup();
            for idx in indexes {
                let to = SocketAddr::V6(SocketAddrV6::new(ALL_COAP_NODES_V6, COAP_PORT, 0, idx));
                self.send(&v6, to, None).await;
            }
        }
    }

    /// Handles one datagram; a complete, valid document becomes a [`Found`].
    async fn handle(
        &mut self,
        socket: &UdpSocket,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Option<Found> {
        let c = &self.shared.counters;
        let Ok(p) = Packet::from_bytes(bytes) else {
            bump(&c.bad_responses);
            tracing::debug!(%from, "CoAP discovery: undecodable datagram");
            return None;
        };
        if p.header.get_type() == MessageType::Confirmable {
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.code = MessageClass::Empty;
            ack.header.message_id = p.header.message_id;
            if let Ok(b) = ack.to_bytes() {
                let _ = socket.send_to(&b, from).await;
            }
        }
        if matches!(p.header.code, MessageClass::Empty) {
            return None;
        }
        let Ok(token) = <[u8; 8]>::try_from(p.get_token()) else {
            bump(&c.unknown_tokens);
            return None;
        };
        let Some(asked) = self.outstanding.get(&token).copied() else {
            bump(&c.unknown_tokens);
            return None;
        };
        if Instant::now().duration_since(asked.sent) >= TOKEN_LIFETIME {
            bump(&c.unknown_tokens);
            return None;
        }
        if p.header.code != MessageClass::Response(ResponseType::Content) {
            bump(&c.bad_responses);
            tracing::debug!(%from, code = %p.header.code, "CoAP discovery: not a 2.05 answer");
            return None;
        }
        let format = p
            .get_first_option(CoapOption::ContentFormat)
            .map(|v| uint(v));
        if !matches!(format, None | Some(Some(LINK_FORMAT))) {
            bump(&c.bad_responses);
            tracing::debug!(%from, "CoAP discovery: answer is not link-format");
            return None;
        }
        let block = p.get_first_option(CoapOption::Block2).map(|v| {
            uint(v)
                .filter(|_| v.len() <= 3)
                .map(|v| (v >> 4, v & 0x8 != 0, (v & 0x7) as u8))
        });
        let body = match block {
            None => p.payload,
            Some(None) => {
                bump(&c.bad_responses);
                return None;
            }
            Some(Some((num, more, szx))) => {
                if num != asked.block || szx > 6 {
                    bump(&c.bad_responses);
                    self.reassembly.remove(&from);
                    return None;
                }
                if num == 0 {
                    if !more {
                        p.payload
                    } else {
                        if self.reassembly.len() >= MAX_REASSEMBLIES
                            && !self.reassembly.contains_key(&from)
                        {
                            bump(&c.truncated);
                            return None;
                        }
                        self.reassembly.insert(
                            from,
                            Reassembly {
                                body: p.payload,
                                next: 1,
                                started: Instant::now(),
                            },
                        );
                        self.follow_up(socket, from, 1, szx).await;
                        return None;
                    }
                } else {
                    let Some(r) = self.reassembly.get_mut(&from) else {
                        bump(&c.bad_responses);
                        return None;
                    };
                    if r.next != num {
                        bump(&c.bad_responses);
                        self.reassembly.remove(&from);
                        return None;
                    }
                    r.body.extend_from_slice(&p.payload);
                    if more {
                        if num + 1 >= MAX_BLOCKS {
                            bump(&c.truncated);
                            tracing::warn!(%from, "CoAP discovery: /.well-known/core too long, dropped");
                            self.reassembly.remove(&from);
                            return None;
                        }
                        r.next = num + 1;
                        self.follow_up(socket, from, num + 1, szx).await;
                        return None;
                    }
                    self.reassembly
                        .remove(&from)
                        .map(|r| r.body)
                        .unwrap_or_default()
                }
            }
        };
        let c = &self.shared.counters;
        let Ok(doc) = std::str::from_utf8(&body) else {
            bump(&c.bad_responses);
            tracing::warn!(%from, "CoAP discovery: /.well-known/core is not UTF-8");
            return None;
        };
        let mut resources = match parse_link_format(doc) {
            Ok(r) => r,
            Err(e) => {
                bump(&c.bad_responses);
                tracing::warn!(%from, error = %e, "CoAP discovery: malformed /.well-known/core");
                return None;
            }
        };
        if resources.len() > MAX_RESOURCES {
            bump(&c.truncated);
            tracing::warn!(%from, count = resources.len(), "CoAP discovery: too many resources, kept the first");
            resources.truncate(MAX_RESOURCES);
        }
        let id = device_id(&format!("coap-{}-{}", from.ip(), from.port()))?;
        bump(&c.answers);
        Some(Found::CoapResources {
            id,
            address: from,
            resources,
        })
    }

    /// Asks `to` for block `num` through the socket its previous block came in on.
    async fn follow_up(&mut self, socket: &UdpSocket, to: SocketAddr, num: u32, szx: u8) {
        self.send(socket, to, Some((num, szx))).await;
    }
}

/// A CoAP uint option value (at most 4 bytes).
fn uint(bytes: &[u8]) -> Option<u32> {
    (bytes.len() <= 4).then(|| bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}
