//! Persistent sessions and retained messages: how the router's state is written as key/value
//! changes, and read back at start.
//!
//! The broker does not know where the state goes (`protocols` never depends on `storage`): the
//! router sends [`StateBatch`]es, in the order it made the changes, to a [`StateSink`]; the
//! gateway applies each batch in one transaction of its store, in that order, and answers
//! `committed` once it is durable. At start the gateway hands back everything under
//! [`STATE_PREFIX`] ([`Broker::restore`](super::Broker::restore)).
//!
//! What is kept, for a session that outlives its connection (3.1.1 clean session 0, MQTT 5
//! session expiry > 0) and only for those:
//! - `mqtt/s/{client}`: subscriptions, login, session expiry (and, while offline, when it ends),
//!   inbound QoS 2 ids awaiting PUBREL, a delayed will waiting for its delay;
//! - `mqtt/m/{client}/{id}`: each QoS 1/2 message queued for it or in flight, with its packet id
//!   and handshake state once sent (so it is resent with the same id, MQTT 3.1.1 §4.4);
//! - `mqtt/r/{topic}`: each retained message (any publisher), as many as the retained store's
//!   bounds let it hold (`retained` module).
//!
//! `{client}` is the client id in lower-case hex, so that one client's key prefix is never the
//! prefix of another's; `{id}` is a 16-digit hex number that orders one client's messages.
//! Values are CBOR (minicbor), arrays of indexed fields: a later field is added as an `Option`
//! that older values simply lack. Deadlines are stored as wall-clock milliseconds since the Unix
//! epoch, since `Instant`s do not survive a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::QoS;
use super::codec::PublishProps;
use super::router::Publication;
use super::session::{Awaiting, Message, Subscription};
use crate::topic::TopicFilter;

/// Every key the broker writes starts with this.
pub const STATE_PREFIX: &str = "mqtt/";
const SESSION: &str = "mqtt/s/";
const MESSAGE: &str = "mqtt/m/";
const RETAINED: &str = "mqtt/r/";

/// One change to the persisted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// Insert or replace `value` under `key`.
    Put {
        /// The key (starts with [`STATE_PREFIX`]).
        key: String,
        /// The encoded value.
        value: Vec<u8>,
    },
    /// Remove `key` (nothing if absent).
    Delete {
        /// The key.
        key: String,
    },
}

/// Changes to apply in one transaction, after every batch sent before it.
#[derive(Debug)]
pub struct StateBatch {
    /// In the order they must be applied.
    pub changes: Vec<StateChange>,
    /// Answered once the batch is durable (`Err` with the reason if it cannot be), when a
    /// client waits for it: a publisher's PUBACK, a SUBACK, a CONNACK.
    pub committed: Option<oneshot::Sender<Result<(), String>>>,
}

/// Where the router sends its changes. Unbounded so that the router can send while it holds
/// its lock (the order of the changes is the order of the sends); what waits for a batch is
/// bounded by the clients' own windows.
pub type StateSink = mpsc::UnboundedSender<StateBatch>;

/// Resolves when a batch is durable.
pub(crate) type Ticket = oneshot::Receiver<Result<(), String>>;

/// What [`Broker::restore`](super::Broker::restore) found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Sessions restored (all offline until their clients reconnect).
    pub sessions: u64,
    /// Queued and in-flight messages restored into those sessions.
    pub messages: u64,
    /// Retained messages restored (expired ones are not).
    pub retained: u64,
    /// Entries that could not be read: each key with what is wrong. They are skipped (and
    /// deleted, so the complaint is not repeated at every start).
    pub invalid: Vec<(String, String)>,
}

pub(crate) fn session_key(client_id: &str) -> String {
    format!("{SESSION}{}", hex(client_id))
}

pub(crate) fn message_key(client_id: &str, id: u64) -> String {
    format!("{MESSAGE}{}/{id:016x}", hex(client_id))
}

pub(crate) fn retained_key(topic: &str) -> String {
    format!("{RETAINED}{topic}")
}

fn hex(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(s: &str) -> Result<String, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits in the client id".into());
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("{s:?} is not hex"))
        })
        .collect::<Result<Vec<u8>, String>>()?;
    String::from_utf8(bytes).map_err(|_| "client id is not UTF-8".into())
}

/// A persisted key, parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Key {
    Session(String),
    Message(String, u64),
    Retained(String),
}

pub(crate) fn parse_key(key: &str) -> Result<Key, String> {
    if let Some(rest) = key.strip_prefix(SESSION) {
        return unhex(rest).map(Key::Session);
    }
    if let Some(rest) = key.strip_prefix(MESSAGE) {
        let (client, id) = rest
            .split_once('/')
            .ok_or("message key without a message id")?;
        let id = u64::from_str_radix(id, 16).map_err(|_| format!("bad message id {id:?}"))?;
        return Ok(Key::Message(unhex(client)?, id));
    }
    if let Some(topic) = key.strip_prefix(RETAINED) {
        if topic.is_empty() {
            return Err("retained key without a topic".into());
        }
        return Ok(Key::Retained(topic.to_owned()));
    }
    Err("unknown key".into())
}

/// Converts between the monotonic clock the broker runs on and the wall clock stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    now: Instant,
    wall_ms: u64,
}

impl Clock {
    pub(crate) fn at(now: Instant) -> Clock {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Clock { now, wall_ms }
    }

    pub(crate) fn to_wall(self, at: Instant) -> u64 {
        if at >= self.now {
            let ahead = u64::try_from((at - self.now).as_millis()).unwrap_or(u64::MAX);
            self.wall_ms.saturating_add(ahead)
        } else {
            let behind = u64::try_from((self.now - at).as_millis()).unwrap_or(u64::MAX);
            self.wall_ms.saturating_sub(behind)
        }
    }

    /// A stored deadline as an instant (one already past is `now`, or earlier).
    pub(crate) fn to_instant(self, wall_ms: u64) -> Instant {
        if wall_ms >= self.wall_ms {
            self.now + Duration::from_millis(wall_ms - self.wall_ms)
        } else {
            let behind = Duration::from_millis(self.wall_ms - wall_ms);
            self.now.checked_sub(behind).unwrap_or(self.now)
        }
    }
}

fn qos_code(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn qos_from(code: u8) -> Result<QoS, String> {
    match code {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(format!("QoS {other}")),
    }
}

#[derive(Debug, Encode, Decode)]
struct PropsRecord {
    #[n(0)]
    payload_format_indicator: Option<u8>,
    #[n(1)]
    content_type: Option<String>,
    #[n(2)]
    response_topic: Option<String>,
    #[n(3)]
    correlation_data: Option<ByteVec>,
    #[n(4)]
    user_properties: Vec<(String, String)>,
}

impl PropsRecord {
    fn from_props(p: &PublishProps) -> Option<PropsRecord> {
        (*p != PublishProps::default()).then(|| PropsRecord {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p
                .correlation_data
                .as_ref()
                .map(|b| ByteVec::from(b.to_vec())),
            user_properties: p.user_properties.clone(),
        })
    }

    fn into_props(self) -> PublishProps {
        PublishProps {
            payload_format_indicator: self.payload_format_indicator,
            content_type: self.content_type,
            response_topic: self.response_topic,
            correlation_data: self.correlation_data.map(|b| Bytes::from(Vec::from(b))),
            user_properties: self.user_properties,
        }
    }
}

fn props_of(record: Option<PropsRecord>) -> Arc<PublishProps> {
    record.map_or_else(Arc::default, |p| Arc::new(p.into_props()))
}

/// A queued or in-flight message of one session.
#[derive(Debug, Encode, Decode)]
struct MessageRecord {
    #[n(0)]
    message: PublicationRecord,
    #[n(1)]
    subscription_ids: Vec<u32>,
    /// Once sent: its packet id and what it awaits (0 PUBACK, 1 PUBREC, 2 PUBCOMP).
    #[n(2)]
    inflight: Option<(u16, u8)>,
}

/// A message read back: where it was in its handshake.
#[derive(Debug)]
pub(crate) struct RestoredMessage {
    pub msg: Message,
    pub inflight: Option<(u16, Awaiting)>,
}

pub(crate) fn encode_message(
    msg: &Message,
    inflight: Option<(u16, Awaiting)>,
    clock: Clock,
) -> Vec<u8> {
    let record = MessageRecord {
        message: PublicationRecord {
            topic: msg.topic.to_string(),
            payload: ByteVec::from(msg.payload.to_vec()),
            qos: qos_code(msg.qos),
            retain: msg.retain,
            props: PropsRecord::from_props(&msg.props),
            expires_at_ms: msg.expires_at.map(|e| clock.to_wall(e)),
        },
        subscription_ids: msg.subscription_ids.clone(),
        inflight: inflight.map(|(pkid, state)| {
            let code = match state {
                Awaiting::Ack => 0,
                Awaiting::Rec => 1,
                Awaiting::Comp => 2,
            };
            (pkid, code)
        }),
    };
    to_vec(&record)
}

pub(crate) fn decode_message(
    bytes: &[u8],
    id: u64,
    clock: Clock,
) -> Result<RestoredMessage, String> {
    let r: MessageRecord = minicbor::decode(bytes).map_err(|e| e.to_string())?;
    let p = r.message.publication(clock)?;
    if p.qos == QoS::AtMostOnce {
        return Err("a QoS 0 message is never kept".into());
    }
    let inflight = match r.inflight {
        None => None,
        Some((0, _)) => return Err("packet id 0".into()),
        Some((pkid, 0)) => Some((pkid, Awaiting::Ack)),
        Some((pkid, 1)) => Some((pkid, Awaiting::Rec)),
        Some((pkid, 2)) => Some((pkid, Awaiting::Comp)),
        Some((_, other)) => return Err(format!("handshake state {other}")),
    };
    Ok(RestoredMessage {
        msg: Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            props: p.props,
            expires_at: p.expires_at,
            subscription_ids: r.subscription_ids,
            id,
        },
        inflight,
    })
}

#[derive(Debug, Encode, Decode)]
struct SubscriptionRecord {
    #[n(0)]
    filter: String,
    #[n(1)]
    qos: u8,
    #[n(2)]
    no_local: bool,
    #[n(3)]
    retain_as_published: bool,
    #[n(4)]
    id: Option<u32>,
    #[n(5)]
    share: Option<String>,
}

#[derive(Debug, Encode, Decode)]
struct PublicationRecord {
    #[n(0)]
    topic: String,
    #[n(1)]
    payload: ByteVec,
    #[n(2)]
    qos: u8,
    #[n(3)]
    retain: bool,
    #[n(4)]
    props: Option<PropsRecord>,
    #[n(5)]
    expires_at_ms: Option<u64>,
}

impl PublicationRecord {
    fn new(p: &Publication, clock: Clock) -> PublicationRecord {
        PublicationRecord {
            topic: p.topic.to_string(),
            payload: ByteVec::from(p.payload.to_vec()),
            qos: qos_code(p.qos),
            retain: p.retain,
            props: PropsRecord::from_props(&p.props),
            expires_at_ms: p.expires_at.map(|e| clock.to_wall(e)),
        }
    }

    fn publication(self, clock: Clock) -> Result<Publication, String> {
        Ok(Publication {
            topic: Arc::from(self.topic),
            payload: Bytes::from(Vec::from(self.payload)),
            qos: qos_from(self.qos)?,
            retain: self.retain,
            props: props_of(self.props),
            expires_at: self.expires_at_ms.map(|ms| clock.to_instant(ms)),
        })
    }
}

#[derive(Debug, Encode, Decode)]
struct SessionRecord {
    #[n(0)]
    subscriptions: Vec<SubscriptionRecord>,
    #[n(1)]
    username: Option<String>,
    /// Session expiry interval in ms; `None`: never ends.
    #[n(2)]
    expiry_ms: Option<u64>,
    /// While offline: when the session ends (`None` while connected, or never).
    #[n(3)]
    ends_at_ms: Option<u64>,
    #[n(4)]
    awaiting_rel: Vec<u16>,
    /// A delayed will waiting while offline: when it is due, and the message.
    #[n(5)]
    will: Option<(u64, PublicationRecord)>,
    /// Whether a connection held the session when this was written.
    #[n(6)]
    online: bool,
}

/// A session's persisted fields (everything but its messages).
#[derive(Debug)]
pub(crate) struct SessionState {
    pub subscriptions: Vec<Subscription>,
    pub username: Option<Arc<str>>,
    pub expiry: Option<Duration>,
    pub ends_at: Option<Instant>,
    pub awaiting_rel: Vec<u16>,
    pub will: Option<(Instant, Publication)>,
    pub online: bool,
}

pub(crate) fn encode_session(s: &SessionState, clock: Clock) -> Vec<u8> {
    let record = SessionRecord {
        subscriptions: s
            .subscriptions
            .iter()
            .map(|sub| SubscriptionRecord {
                filter: sub.filter.as_str().to_owned(),
                qos: qos_code(sub.qos),
                no_local: sub.no_local,
                retain_as_published: sub.retain_as_published,
                id: sub.id,
                share: sub.share.as_deref().map(str::to_owned),
            })
            .collect(),
        username: s.username.as_deref().map(str::to_owned),
        expiry_ms: s
            .expiry
            .map(|e| u64::try_from(e.as_millis()).unwrap_or(u64::MAX)),
        ends_at_ms: s.ends_at.map(|t| clock.to_wall(t)),
        awaiting_rel: s.awaiting_rel.clone(),
        will: s
            .will
            .as_ref()
            .map(|(at, p)| (clock.to_wall(*at), PublicationRecord::new(p, clock))),
        online: s.online,
    };
    to_vec(&record)
}

pub(crate) fn decode_session(bytes: &[u8], clock: Clock) -> Result<SessionState, String> {
    let r: SessionRecord = minicbor::decode(bytes).map_err(|e| e.to_string())?;
    let subscriptions = r
        .subscriptions
        .into_iter()
        .map(|s| {
            Ok(Subscription {
                filter: TopicFilter::new(&s.filter)
                    .map_err(|e| format!("filter {:?}: {e}", s.filter))?,
                qos: qos_from(s.qos)?,
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                id: s.id,
                share: s.share.map(Arc::from),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let will = match r.will {
        Some((at, p)) => Some((clock.to_instant(at), p.publication(clock)?)),
        None => None,
    };
    Ok(SessionState {
        subscriptions,
        username: r.username.map(Arc::from),
        expiry: r.expiry_ms.map(Duration::from_millis),
        ends_at: r.ends_at_ms.map(|ms| clock.to_instant(ms)),
        awaiting_rel: r.awaiting_rel,
        will,
        online: r.online,
    })
}

pub(crate) fn encode_retained(p: &Publication, clock: Clock) -> Vec<u8> {
    to_vec(&PublicationRecord::new(p, clock))
}

pub(crate) fn decode_retained(bytes: &[u8], clock: Clock) -> Result<Publication, String> {
    let r: PublicationRecord = minicbor::decode(bytes).map_err(|e| e.to_string())?;
    let p = r.publication(clock)?;
    if p.payload.is_empty() {
        return Err("a retained message with an empty payload is never kept".into());
    }
    Ok(p)
}

fn to_vec<T: Encode<()>>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail (its writer is infallible).
    minicbor::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_client_prefixes_never_overlap() {
        for id in ["a", "a/b", "", "\u{e9}t\u{e9}/+#", "ab"] {
            assert_eq!(parse_key(&session_key(id)), Ok(Key::Session(id.to_owned())));
            assert_eq!(
                parse_key(&message_key(id, 42)),
                Ok(Key::Message(id.to_owned(), 42))
            );
        }
        // "a"'s messages and "a/b"'s differ before the message id.
        assert!(!message_key("a/b", 1).starts_with(&format!("{MESSAGE}{}/", hex("a"))));
        assert_eq!(
            parse_key(&retained_key("x/y")),
            Ok(Key::Retained("x/y".into()))
        );
        for bad in [
            "mqtt/s/zz",
            "mqtt/s/6",
            "mqtt/m/61",
            "mqtt/m/61/xyz",
            "mqtt/r/",
            "mqtt/q/1",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clock_round_trips_deadlines() {
        let now = Instant::now();
        let clock = Clock::at(now);
        let later = now + Duration::from_secs(90);
        assert_eq!(clock.to_instant(clock.to_wall(later)), later);
        // Past deadlines stay past (or now), never in the future.
        let past = clock.to_instant(clock.wall_ms.saturating_sub(5_000));
        assert!(past <= now);
    }

    #[test]
    fn message_with_properties_round_trips() {
        let clock = Clock::at(Instant::now());
        let msg = Message {
            topic: Arc::from("t/1"),
            payload: Bytes::from_static(b"\x00\xffdata"),
            qos: QoS::ExactlyOnce,
            retain: true,
            props: Arc::new(PublishProps {
                payload_format_indicator: Some(1),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"\x01\x02")),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            }),
            expires_at: Some(clock.to_instant(clock.to_wall(Instant::now()) + 60_000)),
            subscription_ids: vec![3, 7],
            id: 9,
        };
        let bytes = encode_message(&msg, Some((12, Awaiting::Comp)), clock);
        let back = decode_message(&bytes, 9, clock).expect("decodes");
        assert_eq!(back.msg, msg);
        assert_eq!(back.inflight, Some((12, Awaiting::Comp)));
        assert!(decode_message(b"\x80", 1, clock).is_err());
        assert!(decode_message(b"garbage", 1, clock).is_err());
    }
}
