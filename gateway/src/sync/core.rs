//! The sans-IO sync core: every decision of the sync engine, none of its I/O.
//!
//! The shell (`sync/mod.rs`) owns the store, the upstream connection and the clock; it feeds
//! this state machine what happened (`on_connack`, `on_sent`, `on_puback`, `on_records`,
//! `on_connection_lost`, ...) and asks it what to do next ([`SyncCore::poll_send`]). Nothing in
//! here awaits, sleeps or touches a socket, so the tests below drive every transition in
//! microseconds, and the model test (`model_tests.rs`) checks the invariants over random
//! interleavings.
//!
//! # What the core guarantees
//!
//! - **A record leaves the store only after its own PUBACK or an explicit refusal.** A PUBACK is
//!   matched to the record whose PUBLISH carried that packet id on *this* connection; a PUBACK
//!   for a birth or shutdown message, or for an id we do not know, deletes nothing.
//! - **Correlation by order.** rumqttc's `publish()` returns no packet id: the core pushes a slot
//!   on a FIFO when it hands a publish to the client and pops it when the client reports the
//!   PUBLISH on the wire with its id ([`SyncCore::on_sent`]). An id that is already mapped is a
//!   retransmission and pops nothing. An id that is acked may be reused for the next publish.
//! - **After every connection, everything not acked is offered again,** from the start of each
//!   priority class, whether or not the broker had a session: the store is the source of truth.
//! - **One record never stops the link.** A record larger than the limit in force (the
//!   configured `upstream.max_packet_size`, lowered by an MQTT 5 broker's CONNACK) is refused
//!   before it is sent; a PUBACK with a permanent failure code refuses it; a record the client
//!   cannot encode is refused; a record on the wire each time the broker closed the connection,
//!   [`POISON_STRIKES`] connections in a row with nothing acked after it, is refused. Refused
//!   records are moved (by the shell) to the store's refused table, not deleted. Transient codes
//!   (quota exceeded, server busy, packet id in use) pause sending with back-off and resend.
//! - **Honest connection state.** A connection that ended before anything was acked and before
//!   [`CoreSettings::stable_after`] counts as a failure: back-off keeps growing. The same record
//!   at the head of two such failures is reported as the failing record.
//! - **MQTT 5 first, 3.1.1 when refused.** With [`ProtocolChoice::Auto`], two MQTT 5 CONNECTs in a
//!   row that the broker rejects as a protocol (a CONNACK refusing the version, a CONNACK we cannot
//!   parse as MQTT 5, or a close before any CONNACK) switch to 3.1.1 for the rest of the run.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use outpost_protocols::upstream::{
    MQTT_MAX_PACKET_SIZE, PubAckCode, UpstreamError, UpstreamErrorKind, UpstreamVersion,
};
use outpost_storage::{Priority, StoreError};

/// A record's position in the store.
pub type Seq = u64;

/// Consecutive broken connections with the same record first on the wire (and nothing acked
/// after it was sent) before that record is refused as the cause.
pub const POISON_STRIKES: u32 = 3;
/// Consecutive MQTT 5 connects rejected as a protocol before falling back to 3.1.1.
pub const FALLBACK_AFTER: u32 = 2;

/// Which MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// MQTT 5, falling back to 3.1.1 when the broker refuses it.
    Auto,
    /// Only this version.
    Pinned(UpstreamVersion),
}

/// The knobs of the core.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// Publishes between "handed to the client" and "acked" (birth included).
    pub window: usize,
    /// Records per store read.
    pub read_batch: usize,
    /// `upstream.max_packet_size`.
    pub max_packet_size: u32,
    pub protocol: ProtocolChoice,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A connection that lasted this long counts as healthy even if nothing was acked.
    pub stable_after: Duration,
}

/// Why a record is refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its encoded PUBLISH is larger than the limit in force.
    PacketTooLarge { size: usize, max: u32 },
    /// The broker's PUBACK said no, with a code that will not change on a resend.
    Broker(PubAckCode),
    /// The client cannot encode it (an invalid topic).
    Unencodable(String),
    /// The broker closed the connection this many times in a row with it first on the wire.
    ConnectionClosedOnPublish { times: u32 },
}

impl Refusal {
    /// Metric label / status key.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::PacketTooLarge { .. } => "packet_too_large",
            Refusal::Broker(code) => code.name(),
            Refusal::Unencodable(_) => "unencodable",
            Refusal::ConnectionClosedOnPublish { .. } => "connection_closed_on_publish",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PacketTooLarge { size, max } => write!(
                f,
                "packet_too_large: {size} bytes encoded, the upstream takes at most {max}"
            ),
            Refusal::Broker(code) => write!(
                f,
                "{}: the upstream broker's PUBACK had reason code 0x{:02x}",
                code.name(),
                code.code()
            ),
            Refusal::Unencodable(why) => write!(f, "unencodable: {why}"),
            Refusal::ConnectionClosedOnPublish { times } => write!(
                f,
                "connection_closed_on_publish: the upstream closed the connection {times} times in a row while this record was the first unacknowledged one"
            ),
        }
    }
}

/// Whether a failure PUBACK code may succeed if the same record is sent again later.
pub fn is_transient(code: PubAckCode) -> bool {
    matches!(
        code,
        PubAckCode::QuotaExceeded | PubAckCode::ServerBusy | PubAckCode::PacketIdentifierInUse
    )
}

/// Why a connection ended or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("connecting with MQTT {version}: {source}")]
    Connect {
        version: UpstreamVersion,
        source: UpstreamError,
    },
    #[error("connection lost: {0}")]
    Lost(UpstreamError),
    #[error("reading the store: {0}")]
    Store(String),
    #[error("the ack writer stopped")]
    AckWriterGone,
    #[error("TLS settings: {0}")]
    Tls(String),
}

impl From<StoreError> for SyncError {
    fn from(e: StoreError) -> Self {
        SyncError::Store(e.to_string())
    }
}

/// The connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected, nothing attempted yet or between attempts.
    Disconnected,
    /// CONNECT sent (or about to be), no CONNACK yet.
    Connecting { version: UpstreamVersion },
    /// CONNACK received.
    Connected {
        version: UpstreamVersion,
        session_present: bool,
        /// The largest PUBLISH this connection may send.
        max_packet_size: u32,
        since: Instant,
    },
}

/// A record rendered for the current connection, with its exact encoded size.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready<T> {
    pub seq: Seq,
    pub wire_size: usize,
    pub item: T,
}

/// What the shell should do next.
#[derive(Debug, PartialEq)]
pub enum Next<T> {
    /// Publish the retained birth message (its PUBACK deletes nothing).
    Birth,
    /// Read up to `limit` records of `priority` after `after` and give them to `on_records`.
    Read {
        priority: Priority,
        after: Seq,
        limit: usize,
    },
    /// Move this record to the refused table, with this reason.
    Refuse { seq: Seq, reason: Refusal },
    /// Hand this record to the client.
    Publish { seq: Seq, item: T },
}

/// What a PUBACK means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// The record is delivered: delete it.
    Delete { seq: Seq, rtt: Duration },
    /// A birth or shutdown message was acked: delete nothing.
    Lifecycle { rtt: Duration },
    /// The broker refused the record for good.
    Refuse { seq: Seq, reason: Refusal },
    /// The broker refused it for now: it is resent after `after`.
    Retry {
        seq: Seq,
        code: PubAckCode,
        after: Duration,
    },
    /// Not a packet id we are waiting for: ignore.
    Unknown,
}

/// What `on_sent` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentOutcome {
    /// The next queued publish now has this packet id.
    Mapped,
    /// The id is already in flight: the client retransmitted.
    Retransmission,
    /// Nothing was queued: a publish we did not make.
    Unexpected,
}

/// What a lost (or failed) connection leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Back-off before the next attempt, before jitter.
    pub backoff: Duration,
    /// Whether a CONNACK had been received on that connection.
    pub was_connected: bool,
    /// Whether the core switched to MQTT 3.1.1 just now.
    pub fell_back: bool,
    /// A record found to break the connection: refuse it.
    pub poison: Option<(Seq, Refusal)>,
}

/// What the status shows about the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreStatus {
    pub state: ConnState,
    /// The version in use, or the one the next attempt uses.
    pub version: UpstreamVersion,
    pub fell_back: bool,
    /// Consecutive failed connections.
    pub failures: u32,
    /// The record at the head of repeated failures, and the last error.
    pub failing: Option<(Seq, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Record(Seq),
    Lifecycle,
}

#[derive(Debug)]
struct InFlight<T> {
    slot: Slot,
    item: Option<Ready<T>>,
    sent_at: Instant,
    /// Order of sending on this connection.
    order: u64,
}

/// The sync engine's decisions. `T` is the rendered publish the shell hands to the client.
#[derive(Debug)]
pub struct SyncCore<T> {
    s: CoreSettings,
    state: ConnState,
    version: UpstreamVersion,
    fell_back: bool,
    protocol_rejects: u32,
    failures: u32,
    strike: Option<(Seq, u32)>,
    failing: Option<(Seq, String)>,
    // Per connection.
    cursors: [Seq; 3],
    cache: [VecDeque<Ready<T>>; 3],
    more: [bool; 3],
    birth_pending: bool,
    fifo: VecDeque<(Slot, Option<Ready<T>>)>,
    inflight: HashMap<u16, InFlight<T>>,
    retry: VecDeque<Ready<T>>,
    paused_until: Option<Instant>,
    transient: u32,
    acked: u64,
    sent: u64,
    /// The latest send order among the records acked on this connection.
    latest_acked_order: u64,
}

impl<T: Clone> SyncCore<T> {
    pub fn new(settings: CoreSettings) -> Self {
        let version = match settings.protocol {
            ProtocolChoice::Auto => UpstreamVersion::V5,
            ProtocolChoice::Pinned(v) => v,
        };
        SyncCore {
            s: settings,
            state: ConnState::Disconnected,
            version,
            fell_back: false,
            protocol_rejects: 0,
            failures: 0,
            strike: None,
            failing: None,
            cursors: [0; 3],
            cache: Default::default(),
            more: [true; 3],
            birth_pending: false,
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            retry: VecDeque::new(),
            paused_until: None,
            transient: 0,
            acked: 0,
            sent: 0,
            latest_acked_order: 0,
        }
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn status(&self) -> CoreStatus {
        CoreStatus {
            state: self.state,
            version: self.version,
            fell_back: self.fell_back,
            failures: self.failures,
            failing: self.failing.clone(),
        }
    }

    /// Publishes handed to the client and not yet acked (birth and shutdown included).
    pub fn outstanding(&self) -> usize {
        self.fifo.len() + self.inflight.len()
    }

    /// When a paused send (after a transient refusal) may go on.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.paused_until
    }

    /// A connection attempt starts; returns the version to speak.
    pub fn begin_connect(&mut self) -> UpstreamVersion {
        self.reset_connection();
        self.state = ConnState::Connecting {
            version: self.version,
        };
        self.version
    }

    fn reset_connection(&mut self) {
        self.cursors = [0; 3];
        self.cache = Default::default();
        self.more = [true; 3];
        self.birth_pending = false;
        self.fifo.clear();
        self.inflight.clear();
        self.retry.clear();
        self.paused_until = None;
        self.transient = 0;
        self.acked = 0;
        self.sent = 0;
        self.latest_acked_order = 0;
    }

    /// The broker accepted the CONNECT. Everything not acked will be offered again from the
    /// start, whatever `session_present` says; the birth goes first.
    pub fn on_connack(&mut self, session_present: bool, announced_max: Option<u32>, now: Instant) {
        self.reset_connection();
        let max_packet_size = announced_max
            .unwrap_or(MQTT_MAX_PACKET_SIZE)
            .min(self.s.max_packet_size);
        self.state = ConnState::Connected {
            version: self.version,
            session_present,
            max_packet_size,
            since: now,
        };
        self.protocol_rejects = 0;
        if self.s.protocol == ProtocolChoice::Auto && self.version == UpstreamVersion::V311 {
            self.fell_back = true;
        }
        self.birth_pending = true;
    }

    /// New records were committed: every class may have more to read.
    pub fn on_committed(&mut self) {
        self.more = [true; 3];
    }

    /// The store is closing: nothing more will come.
    pub fn on_store_closed(&mut self) {
        self.more = [false; 3];
    }

    /// The result of a [`Next::Read`]: `full` when the read returned `limit` records.
    pub fn on_records(&mut self, priority: Priority, records: Vec<Ready<T>>, full: bool) {
        let i = priority.as_index();
        self.more[i] = full;
        if let Some(last) = records.last() {
            self.cursors[i] = self.cursors[i].max(last.seq);
        }
        self.cache[i].extend(records);
    }

    /// What to do next, or `None` when there is nothing to do until an event arrives.
    pub fn poll_send(&mut self, now: Instant) -> Option<Next<T>> {
        let ConnState::Connected {
            max_packet_size, ..
        } = self.state
        else {
            return None;
        };
        if self.birth_pending {
            self.birth_pending = false;
            self.fifo.push_back((Slot::Lifecycle, None));
            return Some(Next::Birth);
        }
        if self.outstanding() >= self.s.window {
            return None;
        }
        if let Some(until) = self.paused_until {
            if now < until {
                return None;
            }
            self.paused_until = None;
        }
        let ready = match self.retry.pop_front() {
            Some(r) => r,
            None => {
                let mut found = None;
                for p in Priority::ALL {
                    let i = p.as_index();
                    if self.cache[i].is_empty() && self.more[i] {
                        // Mark as read until the result arrives, so an empty read ends it.
                        self.more[i] = false;
                        return Some(Next::Read {
                            priority: p,
                            after: self.cursors[i],
                            limit: self.s.read_batch,
                        });
                    }
                    if let Some(r) = self.cache[i].pop_front() {
                        found = Some(r);
                        break;
                    }
                }
                found?
            }
        };
        if ready.wire_size > max_packet_size as usize {
            return Some(Next::Refuse {
                seq: ready.seq,
                reason: Refusal::PacketTooLarge {
                    size: ready.wire_size,
                    max: max_packet_size,
                },
            });
        }
        let seq = ready.seq;
        let item = ready.item.clone();
        self.fifo.push_back((Slot::Record(seq), Some(ready)));
        Some(Next::Publish { seq, item })
    }

    /// The client refused to take the publish just handed to it (it cannot encode it).
    pub fn on_unencodable(&mut self, seq: Seq, why: String) -> Next<T> {
        if let Some(pos) = self
            .fifo
            .iter()
            .rposition(|(slot, _)| *slot == Slot::Record(seq))
        {
            self.fifo.remove(pos);
        }
        Next::Refuse {
            seq,
            reason: Refusal::Unencodable(why),
        }
    }

    /// A shutdown message is handed to the client (its PUBACK deletes nothing).
    pub fn queue_lifecycle(&mut self) {
        self.fifo.push_back((Slot::Lifecycle, None));
    }

    /// Undo [`SyncCore::queue_lifecycle`] (the client did not take it).
    pub fn unqueue_lifecycle(&mut self) {
        if let Some(pos) = self
            .fifo
            .iter()
            .rposition(|(slot, _)| *slot == Slot::Lifecycle)
        {
            self.fifo.remove(pos);
        }
    }

    /// The client wrote a QoS 1 PUBLISH with this packet id.
    pub fn on_sent(&mut self, pkid: u16, now: Instant) -> SentOutcome {
        if self.inflight.contains_key(&pkid) {
            return SentOutcome::Retransmission;
        }
        let Some((slot, item)) = self.fifo.pop_front() else {
            return SentOutcome::Unexpected;
        };
        self.sent += 1;
        self.inflight.insert(
            pkid,
            InFlight {
                slot,
                item,
                sent_at: now,
                order: self.sent,
            },
        );
        SentOutcome::Mapped
    }

    /// The broker's PUBACK for `pkid`.
    pub fn on_puback(&mut self, pkid: u16, code: PubAckCode, now: Instant) -> AckOutcome {
        let Some(f) = self.inflight.remove(&pkid) else {
            return AckOutcome::Unknown;
        };
        let rtt = now.saturating_duration_since(f.sent_at);
        let seq = match f.slot {
            Slot::Lifecycle => return AckOutcome::Lifecycle { rtt },
            Slot::Record(seq) => seq,
        };
        if code.is_success() {
            self.acked += 1;
            self.latest_acked_order = self.latest_acked_order.max(f.order);
            self.transient = 0;
            if self.strike.is_some_and(|(s, _)| s == seq) {
                self.strike = None;
            }
            if self.failing.as_ref().is_some_and(|(s, _)| *s == seq) {
                self.failing = None;
            }
            return AckOutcome::Delete { seq, rtt };
        }
        if is_transient(code) {
            let after = backoff_base(&self.s, self.transient);
            self.transient = self.transient.saturating_add(1);
            self.paused_until = Some(now + after);
            if let Some(item) = f.item {
                let pos = self.retry.partition_point(|r| r.seq < item.seq);
                self.retry.insert(pos, item);
            }
            return AckOutcome::Retry { seq, code, after };
        }
        AckOutcome::Refuse {
            seq,
            reason: Refusal::Broker(code),
        }
    }

    /// The connection ended (or could not be made) with `error`.
    pub fn on_connection_lost(&mut self, error: &SyncError, now: Instant) -> Lost {
        let was_connected;
        let mut fell_back = false;
        let mut poison = None;
        match self.state {
            ConnState::Connected { since, .. } => {
                was_connected = true;
                // The first record on the wire that was not acked, if no record sent after it
                // was acked (a broker that took a later one did not choke on this one).
                let head = self
                    .inflight
                    .values()
                    .filter(|f| matches!(f.slot, Slot::Record(_)))
                    .min_by_key(|f| f.order)
                    .filter(|f| self.latest_acked_order < f.order)
                    .and_then(|f| match f.slot {
                        Slot::Record(seq) => Some(seq),
                        Slot::Lifecycle => None,
                    });
                let struck = match head {
                    Some(seq) => {
                        let times = match self.strike {
                            Some((s, n)) if s == seq => n + 1,
                            _ => 1,
                        };
                        self.strike = Some((seq, times));
                        if times >= 2 {
                            self.failing = Some((seq, error.to_string()));
                        }
                        if times >= POISON_STRIKES {
                            poison = Some((seq, Refusal::ConnectionClosedOnPublish { times }));
                            self.strike = None;
                            self.failing = None;
                        }
                        true
                    }
                    None => false,
                };
                let healthy = !struck
                    && (self.acked > 0
                        || now.saturating_duration_since(since) >= self.s.stable_after);
                if healthy {
                    self.failures = 0;
                } else {
                    self.failures = self.failures.saturating_add(1);
                }
            }
            ConnState::Connecting { version } => {
                was_connected = false;
                self.failures = self.failures.saturating_add(1);
                let rejected = matches!(
                    error,
                    SyncError::Connect { source, .. }
                        if source.kind == UpstreamErrorKind::ProtocolRejected
                );
                if rejected && self.s.protocol == ProtocolChoice::Auto {
                    self.protocol_rejects += 1;
                    if self.protocol_rejects >= FALLBACK_AFTER {
                        self.protocol_rejects = 0;
                        let other = match version {
                            UpstreamVersion::V5 => UpstreamVersion::V311,
                            UpstreamVersion::V311 => UpstreamVersion::V5,
                        };
                        fell_back = other == UpstreamVersion::V311;
                        self.version = other;
                    }
                } else {
                    self.protocol_rejects = 0;
                }
            }
            ConnState::Disconnected => {
                was_connected = false;
                self.failures = self.failures.saturating_add(1);
            }
        }
        self.state = ConnState::Disconnected;
        self.reset_connection();
        let backoff = if fell_back {
            self.s.backoff_min
        } else {
            backoff_base(&self.s, self.failures.saturating_sub(1))
        };
        Lost {
            backoff,
            was_connected,
            fell_back,
            poison,
        }
    }
}

/// `min * 2^failures`, capped at `max` (the shell adds jitter).
pub fn backoff_base(s: &CoreSettings, failures: u32) -> Duration {
    s.backoff_min
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(s.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Core = SyncCore<&'static str>;

    fn settings() -> CoreSettings {
        CoreSettings {
            window: 10,
            read_batch: 4,
            max_packet_size: MQTT_MAX_PACKET_SIZE,
            protocol: ProtocolChoice::Auto,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
        }
    }

    fn ready(seq: Seq, size: usize) -> Ready<&'static str> {
        Ready {
            seq,
            wire_size: size,
            item: "r",
        }
    }

    fn err(kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError {
            kind,
            detail: format!("{kind:?}"),
        }
    }

    fn lost() -> SyncError {
        SyncError::Lost(err(UpstreamErrorKind::Lost))
    }

    /// A connected core whose birth is on the wire (pkid 1) and acked.
    fn connected(s: CoreSettings, t: Instant) -> Core {
        let mut c = Core::new(s);
        c.begin_connect();
        c.on_connack(false, None, t);
        assert_eq!(c.poll_send(t), Some(Next::Birth));
        assert_eq!(c.on_sent(1, t), SentOutcome::Mapped);
        assert!(matches!(
            c.on_puback(1, PubAckCode::Success, t),
            AckOutcome::Lifecycle { .. }
        ));
        c
    }

    /// Reads for `priority` and answers with `records`.
    fn serve_read(c: &mut Core, t: Instant, priority: Priority, records: Vec<Ready<&'static str>>) {
        match c.poll_send(t) {
            Some(Next::Read {
                priority: p, limit, ..
            }) => {
                assert_eq!(p, priority);
                let full = records.len() >= limit;
                c.on_records(p, records, full);
            }
            other => panic!("expected a read of {priority:?}, got {other:?}"),
        }
    }

    /// Serves empty reads until a publish (or nothing) comes out.
    fn next_publish(c: &mut Core, t: Instant) -> Option<Seq> {
        loop {
            match c.poll_send(t)? {
                Next::Read { priority, .. } => c.on_records(priority, vec![], false),
                Next::Publish { seq, .. } => return Some(seq),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn connack_sends_birth_first_and_its_ack_deletes_nothing() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        assert_eq!(c.poll_send(t), None, "nothing before CONNACK");
        c.begin_connect();
        c.on_connack(false, None, t);
        assert_eq!(c.poll_send(t), Some(Next::Birth));
        c.on_sent(7, t);
        assert!(matches!(
            c.on_puback(7, PubAckCode::Success, t),
            AckOutcome::Lifecycle { .. }
        ));
    }

    #[test]
    fn out_of_order_pubacks_delete_their_own_records() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![]);
        serve_read(
            &mut c,
            t,
            Priority::Normal,
            vec![ready(10, 5), ready(11, 5), ready(12, 5)],
        );
        for (seq, pkid) in [(10, 2), (11, 3), (12, 4)] {
            assert_eq!(next_publish(&mut c, t), Some(seq));
            assert_eq!(c.on_sent(pkid, t), SentOutcome::Mapped);
        }
        assert!(matches!(
            c.on_puback(4, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 12, .. }
        ));
        assert!(matches!(
            c.on_puback(2, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 10, .. }
        ));
        assert!(matches!(
            c.on_puback(3, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 11, .. }
        ));
        assert_eq!(
            c.on_puback(3, PubAckCode::Success, t),
            AckOutcome::Unknown,
            "a second ack deletes nothing"
        );
    }

    #[test]
    fn packet_id_reuse_after_ack_maps_the_next_record_and_retransmission_pops_nothing() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![]);
        serve_read(&mut c, t, Priority::Normal, vec![ready(1, 5), ready(2, 5)]);
        assert_eq!(next_publish(&mut c, t), Some(1));
        assert_eq!(next_publish(&mut c, t), Some(2));
        assert_eq!(c.on_sent(5, t), SentOutcome::Mapped);
        // The client resends id 5 (DUP): it must not take record 2's slot.
        assert_eq!(c.on_sent(5, t), SentOutcome::Retransmission);
        assert!(matches!(
            c.on_puback(5, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 1, .. }
        ));
        // Id 5 is free again and now carries record 2.
        assert_eq!(c.on_sent(5, t), SentOutcome::Mapped);
        assert!(matches!(
            c.on_puback(5, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 2, .. }
        ));
    }

    #[test]
    fn puback_with_a_permanent_failure_code_refuses_the_record() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![ready(3, 5)]);
        assert_eq!(next_publish(&mut c, t), Some(3));
        c.on_sent(9, t);
        assert_eq!(
            c.on_puback(9, PubAckCode::NotAuthorized, t),
            AckOutcome::Refuse {
                seq: 3,
                reason: Refusal::Broker(PubAckCode::NotAuthorized)
            }
        );
        for code in [
            PubAckCode::PayloadFormatInvalid,
            PubAckCode::TopicNameInvalid,
            PubAckCode::UnspecifiedError,
        ] {
            assert!(!is_transient(code));
        }
    }

    #[test]
    fn puback_no_matching_subscribers_is_a_success() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![ready(3, 5)]);
        next_publish(&mut c, t);
        c.on_sent(2, t);
        assert!(matches!(
            c.on_puback(2, PubAckCode::NoMatchingSubscribers, t),
            AckOutcome::Delete { seq: 3, .. }
        ));
    }

    #[test]
    fn transient_refusal_pauses_then_resends_the_same_record_first() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![]);
        serve_read(&mut c, t, Priority::Normal, vec![ready(4, 5), ready(5, 5)]);
        assert_eq!(next_publish(&mut c, t), Some(4));
        c.on_sent(2, t);
        let AckOutcome::Retry { seq: 4, after, .. } = c.on_puback(2, PubAckCode::QuotaExceeded, t)
        else {
            panic!("expected a retry");
        };
        assert_eq!(after, Duration::from_millis(100));
        assert_eq!(c.poll_send(t), None, "paused");
        assert_eq!(c.next_deadline(), Some(t + after));
        let later = t + after;
        assert_eq!(
            next_publish(&mut c, later),
            Some(4),
            "the refused record goes first"
        );
        c.on_sent(3, later);
        let AckOutcome::Retry { after: second, .. } = c.on_puback(3, PubAckCode::ServerBusy, later)
        else {
            panic!("expected a retry");
        };
        assert_eq!(second, Duration::from_millis(200), "back-off grows");
        let later = later + second;
        assert_eq!(next_publish(&mut c, later), Some(4));
        c.on_sent(4, later);
        assert!(matches!(
            c.on_puback(4, PubAckCode::Success, later),
            AckOutcome::Delete { seq: 4, .. }
        ));
        assert_eq!(next_publish(&mut c, later), Some(5));
    }

    #[test]
    fn puback_for_a_record_evicted_meanwhile_still_only_names_that_record() {
        // The store may have evicted or expired seq 8 while it was in flight: the core still
        // reports Delete{8}; deleting a missing seq is a no-op in the store. Nothing else moves.
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![ready(8, 5), ready(9, 5)]);
        next_publish(&mut c, t);
        next_publish(&mut c, t);
        c.on_sent(2, t);
        c.on_sent(3, t);
        assert!(matches!(
            c.on_puback(2, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 8, .. }
        ));
        assert_eq!(c.outstanding(), 1);
    }

    #[test]
    fn record_over_the_configured_limit_is_refused_before_sending_and_the_next_goes() {
        let t = Instant::now();
        let mut s = settings();
        s.max_packet_size = 1000;
        let mut c = connected(s, t);
        serve_read(
            &mut c,
            t,
            Priority::High,
            vec![ready(1, 999), ready(2, 1001), ready(3, 1000)],
        );
        assert_eq!(next_publish(&mut c, t), Some(1));
        assert_eq!(
            c.poll_send(t),
            Some(Next::Refuse {
                seq: 2,
                reason: Refusal::PacketTooLarge {
                    size: 1001,
                    max: 1000
                }
            })
        );
        assert_eq!(
            next_publish(&mut c, t),
            Some(3),
            "exactly the limit is allowed"
        );
    }

    #[test]
    fn connack_maximum_packet_size_lowers_the_limit_never_raises_it() {
        let t = Instant::now();
        let mut s = settings();
        s.max_packet_size = 5000;
        let mut c = Core::new(s.clone());
        c.begin_connect();
        c.on_connack(false, Some(100), t);
        assert!(matches!(
            c.state(),
            ConnState::Connected {
                max_packet_size: 100,
                ..
            }
        ));
        let mut c = Core::new(s);
        c.begin_connect();
        c.on_connack(false, Some(1_000_000), t);
        assert!(matches!(
            c.state(),
            ConnState::Connected {
                max_packet_size: 5000,
                ..
            }
        ));
    }

    #[test]
    fn record_the_client_refuses_to_encode_is_refused_and_leaves_the_queue() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![ready(1, 5), ready(2, 5)]);
        assert_eq!(next_publish(&mut c, t), Some(1));
        assert_eq!(
            c.on_unencodable(1, "wildcard in a topic name".into()),
            Next::Refuse {
                seq: 1,
                reason: Refusal::Unencodable("wildcard in a topic name".into())
            }
        );
        assert_eq!(c.outstanding(), 0);
        assert_eq!(next_publish(&mut c, t), Some(2));
        c.on_sent(2, t);
        assert!(matches!(
            c.on_puback(2, PubAckCode::Success, t),
            AckOutcome::Delete { seq: 2, .. }
        ));
    }

    #[test]
    fn priority_overtakes_the_backlog_after_a_commit() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![]);
        serve_read(&mut c, t, Priority::Normal, vec![]);
        serve_read(
            &mut c,
            t,
            Priority::Low,
            vec![ready(1, 5), ready(2, 5), ready(3, 5), ready(4, 5)],
        );
        assert_eq!(next_publish(&mut c, t), Some(1));
        // A high-priority reading is committed.
        c.on_committed();
        serve_read(&mut c, t, Priority::High, vec![ready(100, 5)]);
        assert_eq!(
            next_publish(&mut c, t),
            Some(100),
            "high goes before the rest of the low backlog"
        );
        assert_eq!(next_publish(&mut c, t), Some(2));
    }

    #[test]
    fn window_bounds_what_is_outstanding() {
        let t = Instant::now();
        let mut s = settings();
        s.window = 2;
        let mut c = connected(s, t);
        serve_read(
            &mut c,
            t,
            Priority::High,
            vec![ready(1, 5), ready(2, 5), ready(3, 5)],
        );
        assert_eq!(next_publish(&mut c, t), Some(1));
        assert_eq!(next_publish(&mut c, t), Some(2));
        assert_eq!(c.poll_send(t), None, "window full");
        c.on_sent(2, t);
        c.on_puback(2, PubAckCode::Success, t);
        assert_eq!(next_publish(&mut c, t), Some(3));
    }

    fn reconnect_offers_everything_again(session_present: bool) {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        serve_read(&mut c, t, Priority::High, vec![ready(1, 5), ready(2, 5)]);
        next_publish(&mut c, t);
        next_publish(&mut c, t);
        c.on_sent(2, t);
        c.on_sent(3, t);
        c.on_puback(3, PubAckCode::Success, t); // seq 2 delivered; 1 is not
        c.on_connection_lost(&lost(), t);
        assert_eq!(c.outstanding(), 0);
        c.begin_connect();
        c.on_connack(session_present, None, t);
        assert_eq!(c.poll_send(t), Some(Next::Birth));
        match c.poll_send(t) {
            Some(Next::Read {
                priority: Priority::High,
                after: 0,
                ..
            }) => {}
            other => panic!("reads restart from the beginning, got {other:?}"),
        }
        // A PUBACK for an id of the old connection deletes nothing.
        assert_eq!(c.on_puback(2, PubAckCode::Success, t), AckOutcome::Unknown);
    }

    #[test]
    fn reconnect_without_session_present_offers_every_unacked_record_again() {
        reconnect_offers_everything_again(false);
    }

    #[test]
    fn reconnect_with_session_present_offers_every_unacked_record_again() {
        reconnect_offers_everything_again(true);
    }

    #[test]
    fn connection_lost_right_after_connect_grows_the_backoff() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        let a = c.on_connection_lost(&lost(), t);
        assert!(a.was_connected);
        c.begin_connect();
        c.on_connack(false, None, t);
        let b = c.on_connection_lost(&lost(), t);
        c.begin_connect();
        c.on_connack(false, None, t);
        let d = c.on_connection_lost(&lost(), t);
        assert!(
            a.backoff < b.backoff && b.backoff < d.backoff,
            "{a:?} {b:?} {d:?}"
        );
        assert_eq!(c.status().failures, 3);
    }

    #[test]
    fn connection_that_delivered_resets_the_backoff() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        c.on_connection_lost(&lost(), t);
        c.begin_connect();
        c.on_connack(false, None, t);
        c.poll_send(t); // birth
        serve_read(&mut c, t, Priority::High, vec![ready(1, 5)]);
        next_publish(&mut c, t);
        c.on_sent(1, t);
        c.on_sent(2, t);
        c.on_puback(2, PubAckCode::Success, t);
        let l = c.on_connection_lost(&lost(), t);
        assert_eq!(c.status().failures, 0);
        assert_eq!(l.backoff, Duration::from_millis(100));
    }

    #[test]
    fn connection_that_lasted_counts_as_healthy_even_when_idle() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        c.on_connection_lost(&lost(), t + Duration::from_secs(60));
        assert_eq!(c.status().failures, 0);
    }

    /// One connection that sends `seq` first and dies before its ack.
    fn die_on(c: &mut Core, t: Instant, seq: Seq) -> Lost {
        c.begin_connect();
        c.on_connack(false, None, t);
        assert_eq!(c.poll_send(t), Some(Next::Birth));
        c.on_sent(1, t);
        c.on_puback(1, PubAckCode::Success, t);
        serve_read(c, t, Priority::High, vec![ready(seq, 5)]);
        assert_eq!(next_publish(c, t), Some(seq));
        c.on_sent(2, t);
        c.on_connection_lost(&lost(), t)
    }

    #[test]
    fn same_record_failing_twice_is_reported_and_three_times_is_refused() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        let first = die_on(&mut c, t, 42);
        assert_eq!(first.poison, None);
        assert_eq!(c.status().failing, None);
        let second = die_on(&mut c, t, 42);
        assert_eq!(second.poison, None);
        assert_eq!(c.status().failing.map(|f| f.0), Some(42));
        assert!(second.backoff > first.backoff);
        let third = die_on(&mut c, t, 42);
        assert_eq!(
            third.poison,
            Some((42, Refusal::ConnectionClosedOnPublish { times: 3 }))
        );
        assert_eq!(c.status().failing, None);
    }

    #[test]
    fn failures_on_different_records_poison_nothing() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        for seq in [1, 2, 1, 2, 1, 2] {
            assert_eq!(die_on(&mut c, t, seq).poison, None);
        }
    }

    #[test]
    fn a_record_acked_after_the_head_clears_suspicion() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        for _ in 0..5 {
            c.begin_connect();
            c.on_connack(false, None, t);
            c.poll_send(t);
            serve_read(&mut c, t, Priority::High, vec![ready(7, 5), ready(8, 5)]);
            next_publish(&mut c, t);
            next_publish(&mut c, t);
            c.on_sent(1, t);
            c.on_sent(2, t);
            c.on_sent(3, t);
            // 8 is acked after 7 was sent: the broker did not choke on 7.
            c.on_puback(3, PubAckCode::Success, t);
            assert_eq!(c.on_connection_lost(&lost(), t).poison, None);
        }
    }

    #[test]
    fn a_late_ack_of_an_earlier_record_does_not_clear_suspicion() {
        // 3.1.1 broker closing on record 8: record 7 went first and its ack arrives after 8 was
        // written. That ack says nothing about 8, so 8 still collects strikes.
        let t = Instant::now();
        let mut c = Core::new(settings());
        let mut poisoned = None;
        for _ in 0..POISON_STRIKES {
            c.begin_connect();
            c.on_connack(false, None, t);
            c.poll_send(t);
            c.on_sent(1, t);
            serve_read(&mut c, t, Priority::High, vec![ready(7, 5), ready(8, 5)]);
            assert_eq!(next_publish(&mut c, t), Some(7));
            assert_eq!(next_publish(&mut c, t), Some(8));
            c.on_sent(2, t);
            c.on_sent(3, t);
            c.on_puback(2, PubAckCode::Success, t); // 7 acked after 8 was sent
            poisoned = c.on_connection_lost(&lost(), t).poison;
        }
        assert_eq!(
            poisoned,
            Some((
                8,
                Refusal::ConnectionClosedOnPublish {
                    times: POISON_STRIKES
                }
            ))
        );
    }

    fn connect_fail(c: &mut Core, kind: UpstreamErrorKind, t: Instant) -> Lost {
        let version = c.begin_connect();
        c.on_connection_lost(
            &SyncError::Connect {
                version,
                source: err(kind),
            },
            t,
        )
    }

    #[test]
    fn auto_falls_back_to_311_after_two_protocol_rejections_and_stays() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        assert_eq!(c.status().version, UpstreamVersion::V5);
        assert!(!connect_fail(&mut c, UpstreamErrorKind::ProtocolRejected, t).fell_back);
        assert_eq!(c.status().version, UpstreamVersion::V5);
        assert!(connect_fail(&mut c, UpstreamErrorKind::ProtocolRejected, t).fell_back);
        assert_eq!(c.status().version, UpstreamVersion::V311);
        assert_eq!(c.begin_connect(), UpstreamVersion::V311);
        c.on_connack(false, None, t);
        assert!(c.status().fell_back);
        c.on_connection_lost(&lost(), t);
        assert_eq!(c.begin_connect(), UpstreamVersion::V311, "stays on 3.1.1");
    }

    #[test]
    fn unreachable_broker_never_triggers_fallback() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        for _ in 0..10 {
            connect_fail(&mut c, UpstreamErrorKind::Unreachable, t);
        }
        assert_eq!(c.status().version, UpstreamVersion::V5);
        // Interleaved: a rejection, then unreachable, then a rejection: not two in a row.
        connect_fail(&mut c, UpstreamErrorKind::ProtocolRejected, t);
        connect_fail(&mut c, UpstreamErrorKind::Unreachable, t);
        connect_fail(&mut c, UpstreamErrorKind::ProtocolRejected, t);
        assert_eq!(c.status().version, UpstreamVersion::V5);
    }

    #[test]
    fn pinned_version_never_falls_back() {
        let t = Instant::now();
        let mut s = settings();
        s.protocol = ProtocolChoice::Pinned(UpstreamVersion::V5);
        let mut c = Core::new(s);
        for _ in 0..5 {
            assert!(!connect_fail(&mut c, UpstreamErrorKind::ProtocolRejected, t).fell_back);
        }
        assert_eq!(c.status().version, UpstreamVersion::V5);
    }

    #[test]
    fn failed_connects_back_off_up_to_the_cap() {
        let t = Instant::now();
        let mut c = Core::new(settings());
        let mut last = Duration::ZERO;
        for _ in 0..30 {
            let l = connect_fail(&mut c, UpstreamErrorKind::Unreachable, t);
            assert!(l.backoff >= last);
            last = l.backoff;
        }
        assert_eq!(last, Duration::from_secs(10));
    }

    #[test]
    fn shutdown_message_ack_deletes_nothing() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        c.queue_lifecycle();
        c.on_sent(2, t);
        assert!(matches!(
            c.on_puback(2, PubAckCode::Success, t),
            AckOutcome::Lifecycle { .. }
        ));
    }

    #[test]
    fn sent_with_nothing_queued_is_unexpected() {
        let t = Instant::now();
        let mut c = connected(settings(), t);
        assert_eq!(c.on_sent(9, t), SentOutcome::Unexpected);
    }
}
