//! The client side: observe one resource on a device (RFC 7641) and hand each notification to
//! the gateway as an [`Inbound`] for a configured topic.
//!
//! - Registration is a confirmable GET with Observe=0, retransmitted per RFC 7252; a failed
//!   registration is retried with exponential back-off (1 s .. 60 s).
//! - Every notification (and the registration response) is handed over with `reply: Some`; a
//!   confirmable notification is ACKed only after the gateway committed it, so a device that
//!   retransmits until ACKed gets the same "acknowledged means stored" guarantee as a POST. A
//!   refused one is not ACKed (the device retransmits); a non-confirmable one is handed over and
//!   nothing is sent back.
//! - Freshness follows RFC 7641 section 3.4 (24-bit sequence numbers, 128 s rule). A notification
//!   that is not fresh means the device restarted (its sequence went backwards) or reordering:
//!   it is not ingested and the observation is registered again.
//! - Re-registers when no notification came for Max-Age (of the last one, default 60 s) plus
//!   [`ObserveSettings::margin`], when the device answers with an error or without Observe
//!   (observation ended), or after an RST.
//! - Notifications larger than one block (Block2 with more blocks) are not reassembled: they
//!   are counted in `dropped` and skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::endpoint::{MAX_RETRANSMIT, initial_timeout};
use super::msg::{self, code, opt};
use super::{CoapError, bump};
use crate::broker::{Inbound, IngestRefusal, QoS, Source};

/// How long the gateway gets to commit a notification before it is left unacknowledged.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for a separate response after the registration was ACKed empty.
const SEPARATE_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to observe and where its notifications go.
#[derive(Debug, Clone)]
pub struct ObserveSettings {
    /// The device's CoAP endpoint.
    pub target: SocketAddr,
    /// The resource path, without the leading `/` (`sensors/temp`).
    pub path: String,
    /// The topic notifications are ingested under.
    pub topic: String,
    /// Added to the notification's Max-Age before the observation counts as lapsed.
    pub margin: Duration,
}

impl ObserveSettings {
    /// Settings for `coap://host[:port]/path` (host an IP literal, `[..]` for IPv6; default port
    /// 5683), with a 10 s margin. None if the URI is not of that form.
    pub fn from_uri(uri: &str, topic: &str) -> Option<Self> {
        let rest = uri.strip_prefix("coap://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let target = if let Ok(a) = authority.parse::<SocketAddr>() {
            a
        } else if let Some(v6) = authority
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
        {
            SocketAddr::new(IpAddr::V6(v6.parse().ok()?), 5683)
        } else {
            SocketAddr::new(IpAddr::V4(authority.parse().ok()?), 5683)
        };
        Some(Self {
            target,
            path: path.to_owned(),
            topic: topic.to_owned(),
            margin: Duration::from_secs(10),
        })
    }
}

/// A snapshot of an observer's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObserverStats {
    /// Registrations sent (first and every re-registration).
    pub registrations: u64,
    /// Notifications (and registration responses) the gateway committed.
    pub stored: u64,
    /// Notifications the gateway refused or did not answer in time.
    pub refused: u64,
    /// Notifications skipped: not fresh, duplicates, multi-block.
    pub dropped: u64,
    /// Re-registrations because the observation lapsed, ended or the device restarted.
    pub reregistrations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    registrations: AtomicU64,
    stored: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    reregistrations: AtomicU64,
}

/// Observes one device resource and ingests its notifications (see the module docs).
#[derive(Debug)]
pub struct CoapObserver {
    settings: ObserveSettings,
    socket: UdpSocket,
    counters: Arc<Counters>,
    next_mid: u16,
}

/// Reads an observer's counters while it runs.
#[derive(Debug, Clone)]
pub struct ObserverHandle {
    counters: Arc<Counters>,
}

impl ObserverHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> ObserverStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        ObserverStats {
            registrations: g(&c.registrations),
            stored: g(&c.stored),
            refused: g(&c.refused),
            dropped: g(&c.dropped),
            reregistrations: g(&c.reregistrations),
        }
    }
}

/// Why an observation ended.
enum Lapse {
    Shutdown,
    Again,
}

/// The latest notification, for freshness and lapse detection.
struct Last {
    seq: u32,
    at: Instant,
}

/// RFC 7641 section 3.4: is `v2` (arriving at `t2`) newer than `v1` (at `t1`)?
fn fresh(v1: u32, t1: Instant, v2: u32, t2: Instant) -> bool {
    const HALF: u32 = 1 << 23;
    (v1 < v2 && v2 - v1 < HALF) || (v1 > v2 && v1 - v2 > HALF) || t2 > t1 + Duration::from_secs(128)
}

impl CoapObserver {
    /// Binds a local UDP socket (any port) of the target's address family.
    pub async fn bind(settings: ObserveSettings) -> Result<Self, CoapError> {
        let local = match settings.target {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = UdpSocket::bind(local)
            .await
            .map_err(|source| CoapError::Bind {
                addr: local,
                source,
            })?;
        Ok(Self {
            settings,
            socket,
            counters: Arc::default(),
            next_mid: rand::random(),
        })
    }

    /// Reads the counters while `run` goes on.
    pub fn handle(&self) -> ObserverHandle {
        ObserverHandle {
            counters: self.counters.clone(),
        }
    }

    /// Observes until `shutdown`; then deregisters (best effort) and returns.
    pub async fn run(
        mut self,
        ingest: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Result<(), CoapError> {
        let mut backoff = Duration::from_secs(1);
        loop {
            let token: [u8; 4] = rand::random();
            bump(&self.counters.registrations);
            let registered = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.register(&token, &ingest) => r,
            };
            let lapse = match registered {
                Some(Ok(last)) => {
                    backoff = Duration::from_secs(1);
                    self.observe(&token, last, &ingest, &shutdown).await
                }
                Some(Err(max_age)) => {
                    // Answered but not observable (or an error code): poll again later.
                    tokio::select! {
                        _ = shutdown.cancelled() => Lapse::Shutdown,
                        _ = tokio::time::sleep(max_age) => Lapse::Again,
                    }
                }
                None => {
                    tracing::debug!(target = %self.settings.target, "CoAP observe registration failed, retrying in {backoff:?}");
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    tokio::select! {
                        _ = shutdown.cancelled() => Lapse::Shutdown,
                        _ = tokio::time::sleep(wait) => Lapse::Again,
                    }
                }
            };
            match lapse {
                Lapse::Shutdown => {
                    self.deregister(&token).await;
                    return Ok(());
                }
                Lapse::Again => bump(&self.counters.reregistrations),
            }
        }
    }

    fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn get(&mut self, token: &[u8], observe: u32, t: MessageType) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::from(code::GET);
        let mid = self.mid();
        p = msg::with_type(p, t, mid);
        p.set_token(token.to_vec());
        msg::set_uint(&mut p, opt::OBSERVE, observe);
        for seg in self.settings.path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        p
    }

    async fn deregister(&mut self, token: &[u8]) {
        let p = self.get(token, 1, MessageType::NonConfirmable);
        if let Some(b) = msg::encode(&p) {
            let _ = self.socket.send_to(&b, self.settings.target).await;
        }
    }

    /// Sends the registration and waits for its response. `Some(Ok)`: observing (the
    /// response was ingested); `Some(Err(max_age))`: answered without Observe or with an
    /// error; `None`: no answer.
    async fn register(
        &mut self,
        token: &[u8],
        ingest: &mpsc::Sender<Inbound>,
    ) -> Option<Result<Last, Duration>> {
        let req = self.get(token, 0, MessageType::Confirmable);
        let mid = req.header.message_id;
        let bytes = msg::encode(&req)?;
        let target = self.settings.target;
        let mut timeout = initial_timeout();
        let mut attempts = 0;
        let mut acked = false;
        let mut deadline = Instant::now() + timeout;
        let _ = self.socket.send_to(&bytes, target).await;
        let mut buf = vec![0u8; 65_535];
        loop {
            let r = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await;
            let (n, from) = match r {
                Ok(Ok(x)) => x,
                Ok(Err(_)) => continue,
                Err(_) if acked || attempts >= MAX_RETRANSMIT => return None,
                Err(_) => {
                    attempts += 1;
                    timeout *= 2;
                    deadline = Instant::now() + timeout;
                    let _ = self.socket.send_to(&bytes, target).await;
                    continue;
                }
            };
            if from != target {
                continue;
            }
            let Ok(p) = Packet::from_bytes(&buf[..n]) else {
                continue;
            };
            let t = p.header.get_type();
            if msg::raw_code(&p) == code::EMPTY {
                if p.header.message_id == mid {
                    match t {
                        MessageType::Acknowledgement => {
                            acked = true;
                            deadline = Instant::now() + SEPARATE_RESPONSE_TIMEOUT;
                        }
                        MessageType::Reset => return None,
                        _ => {}
                    }
                }
                continue;
            }
            if p.get_token() != token {
                if t == MessageType::Confirmable {
                    self.reply(MessageType::Reset, p.header.message_id).await;
                }
                continue;
            }
            let max_age = max_age(&p);
            let c = msg::raw_code(&p);
            if c >> 5 != 2 {
                if t == MessageType::Confirmable {
                    self.reply(MessageType::Acknowledgement, p.header.message_id)
                        .await;
                }
                return Some(Err(max_age));
            }
            let stored = self.hand_over(&p, ingest).await;
            if t == MessageType::Confirmable && stored {
                self.reply(MessageType::Acknowledgement, p.header.message_id)
                    .await;
            }
            return Some(match msg::uint_opt(&p, opt::OBSERVE) {
                Some(Ok(seq)) => Ok(Last {
                    seq,
                    at: Instant::now(),
                }),
                _ => Err(max_age),
            });
        }
    }

    async fn observe(
        &mut self,
        token: &[u8],
        mut last: Last,
        ingest: &mpsc::Sender<Inbound>,
        shutdown: &CancellationToken,
    ) -> Lapse {
        let mut buf = vec![0u8; 65_535];
        let margin = self.settings.margin;
        let mut deadline = Instant::now() + Duration::from_secs(60) + margin;
        // Recently seen message ids of confirmable notifications (duplicates are ACKed again).
        let mut seen: std::collections::VecDeque<u16> = std::collections::VecDeque::new();
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return Lapse::Shutdown,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::debug!(target = %self.settings.target, "CoAP observation lapsed, registering again");
                    return Lapse::Again;
                }
                r = self.socket.recv_from(&mut buf) => r,
            };
            let Ok((n, from)) = r else { continue };
            if from != self.settings.target {
                continue;
            }
            let Ok(p) = Packet::from_bytes(&buf[..n]) else {
                continue;
            };
            let t = p.header.get_type();
            let mid = p.header.message_id;
            if p.get_token() != token || msg::raw_code(&p) == code::EMPTY {
                if t == MessageType::Confirmable {
                    self.reply(MessageType::Reset, mid).await;
                }
                continue;
            }
            if t == MessageType::Confirmable && seen.contains(&mid) {
                bump(&self.counters.dropped);
                self.reply(MessageType::Acknowledgement, mid).await;
                continue;
            }
            let c = msg::raw_code(&p);
            let seq = match msg::uint_opt(&p, opt::OBSERVE) {
                Some(Ok(seq)) if c >> 5 == 2 => seq,
                // An error or a response without Observe ends the observation.
                _ => {
                    if t == MessageType::Confirmable {
                        self.reply(MessageType::Acknowledgement, mid).await;
                    }
                    return Lapse::Again;
                }
            };
            let now = Instant::now();
            if !fresh(last.seq, last.at, seq, now) {
                bump(&self.counters.dropped);
                if t == MessageType::Confirmable {
                    self.reply(MessageType::Acknowledgement, mid).await;
                }
                tracing::debug!(target = %self.settings.target, last = last.seq, seq,
                    "CoAP notification out of sequence (device restarted?), registering again");
                return Lapse::Again;
            }
            deadline = now + max_age(&p) + margin;
            let stored = self.hand_over(&p, ingest).await;
            if t == MessageType::Confirmable && stored {
                if seen.len() >= 32 {
                    seen.pop_front();
                }
                seen.push_back(mid);
                self.reply(MessageType::Acknowledgement, mid).await;
            }
            if stored {
                last = Last { seq, at: now };
            }
        }
    }

    async fn reply(&self, t: MessageType, mid: u16) {
        if let Some(b) = msg::encode(&msg::empty(t, mid)) {
            let _ = self.socket.send_to(&b, self.settings.target).await;
        }
    }

    /// Hands a notification to the gateway; true once committed.
    async fn hand_over(&self, p: &Packet, ingest: &mpsc::Sender<Inbound>) -> bool {
        if let Some(Ok(b)) = msg::block_opt(p, opt::BLOCK2)
            && b.more
        {
            bump(&self.counters.dropped);
            return false;
        }
        let content_format = match msg::uint_opt(p, opt::CONTENT_FORMAT) {
            Some(Ok(v)) => u16::try_from(v).ok(),
            _ => None,
        };
        let (tx, rx) = oneshot::channel();
        let inbound = Inbound {
            client_id: Arc::from(format!("coap-observe:{}", self.settings.target)),
            topic: self.settings.topic.clone(),
            payload: Bytes::from(p.payload.clone()),
            qos: QoS::AtLeastOnce,
            retain: false,
            source: Source::Coap,
            content_format,
            reply: Some(tx),
        };
        let reply = tokio::time::timeout(COMMIT_TIMEOUT, async {
            ingest
                .send(inbound)
                .await
                .map_err(|_| IngestRefusal::StoreUnavailable)?;
            rx.await.unwrap_or(Err(IngestRefusal::StoreUnavailable))
        })
        .await;
        match reply {
            Ok(Ok(())) => {
                bump(&self.counters.stored);
                true
            }
            _ => {
                bump(&self.counters.refused);
                false
            }
        }
    }
}

/// Max-Age of a response (RFC 7252 default 60 s).
fn max_age(p: &Packet) -> Duration {
    match msg::uint_opt(p, opt::MAX_AGE) {
        Some(Ok(s)) => Duration::from_secs(u64::from(s)),
        _ => Duration::from_secs(60),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn freshness_follows_rfc7641() {
        let t = Instant::now();
        assert!(fresh(1, t, 2, t));
        assert!(!fresh(2, t, 1, t));
        assert!(!fresh(5, t, 5, t));
        // Wrap-around of the 24-bit counter.
        assert!(fresh(0x00ff_fffe, t, 3, t));
        // A restarted device (small number after a large one) only after 128 s.
        assert!(!fresh(1000, t, 1, t + Duration::from_secs(10)));
        assert!(fresh(1000, t, 1, t + Duration::from_secs(129)));
    }

    #[test]
    fn uris() {
        let s =
            ObserveSettings::from_uri("coap://127.0.0.1:5700/sensors/temp", "dev/temp").unwrap();
        assert_eq!(s.target, "127.0.0.1:5700".parse().unwrap());
        assert_eq!(s.path, "sensors/temp");
        let s = ObserveSettings::from_uri("coap://[::1]/x", "t").unwrap();
        assert_eq!(s.target, "[::1]:5683".parse().unwrap());
        let s = ObserveSettings::from_uri("coap://10.0.0.2", "t").unwrap();
        assert_eq!(s.target.port(), 5683);
        assert!(ObserveSettings::from_uri("http://x/y", "t").is_none());
        assert!(ObserveSettings::from_uri("coap://host.example/y", "t").is_none());
    }
}
