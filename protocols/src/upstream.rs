//! The upstream MQTT client behind a small [`Upstream`] trait: it only carries packets.
//!
//! Every decision (what to send next, which record a PUBACK acknowledges, what a refusal means,
//! when a connection counts as broken) is the gateway's sans-IO sync core. This module turns
//! rumqttc's two clients (3.1.1 and 5) into one event vocabulary, [`UpstreamEvent`], one error
//! type, [`UpstreamError`], with a kind the core can act on, and computes the exact encoded size
//! of a PUBLISH ([`publish_size`]) so that the core can refuse a record the broker would not
//! take *before* it reaches the client.
//!
//! Facts about rumqttc 0.25 this adapter is built around (read in its source):
//! - `publish()` returns no packet id. The adapter reports [`UpstreamEvent::Sent`] with the id
//!   when the event loop writes the PUBLISH; the core correlates by order.
//! - The 3.1.1 client refuses outgoing packets over its `max_outgoing_packet_size` (10 KiB by
//!   default) *inside the event loop*, which ends the connection. The adapter raises both limits
//!   to MQTT's maximum; the core checks the configured and the announced limits itself.
//! - The 5 client takes its outgoing limit from the CONNACK's maximum packet size and announces
//!   ours (the local broker's limit) in CONNECT, so the cloud broker drops commands we could not
//!   take instead of sending them.
//! - `try_publish` rejects an invalid topic with the same error variant as a full request
//!   channel; the adapter validates the topic first so the two are told apart.
//! - A fresh event loop per connection: rumqttc never retransmits on its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// MQTT's largest packet (a remaining length of 268,435,455 bytes is the protocol's ceiling).
pub const MQTT_MAX_PACKET_SIZE: u32 = 268_435_455;

/// The protocol version spoken on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamVersion {
    V311,
    V5,
}

impl UpstreamVersion {
    /// "3.1.1" or "5", as in the configuration and status.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamVersion::V311 => "3.1.1",
            UpstreamVersion::V5 => "5",
        }
    }
}

impl std::fmt::Display for UpstreamVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach and log in to the upstream broker for one connection.
#[derive(Clone)]
pub struct UpstreamOptions {
    pub host: String,
    pub port: u16,
    /// `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub username: Option<String>,
    /// Only used with `username`.
    pub password: Option<String>,
    /// Retained QoS 1 will: topic and payload.
    pub will: Option<(String, Bytes)>,
    pub version: UpstreamVersion,
    /// The largest packet we accept from the broker (commands). Announced in an MQTT 5 CONNECT,
    /// so the broker drops (per the specification) anything larger instead of sending it.
    pub max_incoming_packet_size: u32,
    /// Most QoS 1 publishes the client keeps in flight.
    pub inflight: u16,
    /// Capacity of the request channel to the event loop.
    pub request_capacity: usize,
}

impl std::fmt::Debug for UpstreamOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("client_id", &self.client_id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// One outgoing PUBLISH, already rendered by the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingPublish {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    /// MQTT 5 user properties; ignored (and not counted in the size) on 3.1.1.
    pub user_properties: Vec<(String, String)>,
}

/// A PUBACK's reason code (MQTT 5; 3.1.1 acks are always [`PubAckCode::Success`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PubAckCode {
    Success,
    NoMatchingSubscribers,
    UnspecifiedError,
    ImplementationSpecificError,
    NotAuthorized,
    TopicNameInvalid,
    PacketIdentifierInUse,
    QuotaExceeded,
    PayloadFormatInvalid,
    /// 0x89: not a PUBACK code in the specification, but some brokers send it.
    ServerBusy,
}

impl PubAckCode {
    /// Whether the broker took the message.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            PubAckCode::Success | PubAckCode::NoMatchingSubscribers
        )
    }

    /// The numeric reason code.
    pub fn code(self) -> u8 {
        match self {
            PubAckCode::Success => 0x00,
            PubAckCode::NoMatchingSubscribers => 0x10,
            PubAckCode::UnspecifiedError => 0x80,
            PubAckCode::ImplementationSpecificError => 0x83,
            PubAckCode::NotAuthorized => 0x87,
            PubAckCode::ServerBusy => 0x89,
            PubAckCode::TopicNameInvalid => 0x90,
            PubAckCode::PacketIdentifierInUse => 0x91,
            PubAckCode::QuotaExceeded => 0x97,
            PubAckCode::PayloadFormatInvalid => 0x99,
        }
    }

    /// A stable snake_case name (metric labels, status).
    pub fn name(self) -> &'static str {
        match self {
            PubAckCode::Success => "success",
            PubAckCode::NoMatchingSubscribers => "no_matching_subscribers",
            PubAckCode::UnspecifiedError => "unspecified_error",
            PubAckCode::ImplementationSpecificError => "implementation_specific_error",
            PubAckCode::NotAuthorized => "not_authorized",
            PubAckCode::ServerBusy => "server_busy",
            PubAckCode::TopicNameInvalid => "topic_name_invalid",
            PubAckCode::PacketIdentifierInUse => "packet_identifier_in_use",
            PubAckCode::QuotaExceeded => "quota_exceeded",
            PubAckCode::PayloadFormatInvalid => "payload_format_invalid",
        }
    }

    fn from_v5(reason: PubAckReason) -> PubAckCode {
        match reason {
            PubAckReason::Success => PubAckCode::Success,
            PubAckReason::NoMatchingSubscribers => PubAckCode::NoMatchingSubscribers,
            PubAckReason::UnspecifiedError => PubAckCode::UnspecifiedError,
            PubAckReason::ImplementationSpecificError => PubAckCode::ImplementationSpecificError,
            PubAckReason::NotAuthorized => PubAckCode::NotAuthorized,
            PubAckReason::TopicNameInvalid => PubAckCode::TopicNameInvalid,
            PubAckReason::PacketIdentifierInUse => PubAckCode::PacketIdentifierInUse,
            PubAckReason::QuotaExceeded => PubAckCode::QuotaExceeded,
            PubAckReason::PayloadFormatInvalid => PubAckCode::PayloadFormatInvalid,
        }
    }
}

/// What the connection reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// The broker accepted the CONNECT.
    ConnAck {
        session_present: bool,
        /// The broker's maximum packet size (MQTT 5 CONNACK property), if it announced one.
        max_packet_size: Option<u32>,
    },
    /// A QoS 1 PUBLISH was written with this packet id. A retransmission repeats an id.
    Sent { pkid: u16 },
    /// The broker's PUBACK.
    PubAck { pkid: u16, code: PubAckCode },
    /// A PUBLISH from the broker (a command). `topic` is `None` when it was not UTF-8.
    Message {
        topic: Option<String>,
        payload: Bytes,
        qos: u8,
        retain: bool,
    },
    /// Anything else (SUBACK, PINGRESP, ...).
    Other,
}

/// How a connection failed, as far as the sync core needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamErrorKind {
    /// No TCP connection (refused, unreachable, name not resolved, timed out).
    Unreachable,
    /// TLS handshake or certificate failure.
    Tls,
    /// The broker refused the CONNECT with a return code other than "protocol version".
    Refused,
    /// The broker does not speak the version we sent: a CONNACK that refuses the protocol
    /// version, a CONNACK we could not parse, or the connection closed before any CONNACK.
    ProtocolRejected,
    /// The broker sent DISCONNECT.
    Disconnected,
    /// The connection broke after CONNACK (I/O, keep-alive, protocol error).
    Lost,
    /// The client's request channel is closed or full (the event loop is gone).
    ClientGone,
}

/// A failed connection: its kind and what the client said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub detail: String,
}

impl UpstreamError {
    fn new(kind: UpstreamErrorKind, detail: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            detail: detail.into(),
        }
    }
}

/// Why a publish was not handed to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// This record can never be sent as it is (the client would not encode it).
    #[error("the client cannot send it: {0}")]
    Refused(String),
    /// The connection is gone; nothing is wrong with the record.
    #[error("the upstream client is gone")]
    ClientGone,
}

/// The packet carrier the sync engine drives.
pub trait Upstream: Send {
    /// The version this connection speaks.
    fn version(&self) -> UpstreamVersion;
    /// Queues a QoS 1 PUBLISH; [`UpstreamEvent::Sent`] reports its packet id.
    fn publish(&mut self, publish: OutgoingPublish) -> Result<(), PublishError>;
    /// Queues a QoS 0 PUBLISH (heartbeats). No event reports it.
    fn publish_qos0(&mut self, topic: String, payload: Bytes) -> Result<(), PublishError>;
    /// Queues a QoS 1 SUBSCRIBE.
    fn subscribe(&mut self, filter: String) -> Result<(), PublishError>;
    /// Queues a DISCONNECT.
    fn disconnect(&mut self);
    /// The next event; an error ends the connection.
    fn next_event(
        &mut self,
    ) -> impl std::future::Future<Output = Result<UpstreamEvent, UpstreamError>> + Send;
}

/// Why a topic cannot be published to, or `None` when it can.
pub fn invalid_topic(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("empty topic")
    } else if topic.len() > usize::from(u16::MAX) {
        Some("topic longer than 65535 bytes")
    } else if topic.contains(['+', '#']) {
        Some("wildcard in a topic name")
    } else if topic.contains('\0') {
        Some("NUL in a topic name")
    } else {
        None
    }
}

/// Bytes of MQTT's variable-length encoding of `n`.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The exact encoded size of a QoS 1 PUBLISH (fixed header included): what a broker compares
/// with its maximum packet size.
pub fn publish_size(version: UpstreamVersion, publish: &OutgoingPublish) -> usize {
    let base = 2 + publish.topic.len() + 2 + publish.payload.len();
    let remaining = match version {
        UpstreamVersion::V311 => base,
        UpstreamVersion::V5 => {
            let props: usize = publish
                .user_properties
                .iter()
                .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
                .sum();
            base + varint_len(props) + props
        }
    };
    1 + varint_len(remaining) + remaining
}

/// A connection through rumqttc, either version. Connecting happens on the first
/// [`Upstream::next_event`].
pub enum RumqttUpstream {
    V4 {
        client: rumqttc::AsyncClient,
        events: Box<rumqttc::EventLoop>,
        connected: bool,
    },
    V5 {
        client: rumqttc::v5::AsyncClient,
        events: Box<rumqttc::v5::EventLoop>,
        connected: bool,
    },
}

impl std::fmt::Debug for RumqttUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V4 { .. } => "RumqttUpstream::V4",
            Self::V5 { .. } => "RumqttUpstream::V5",
        })
    }
}

impl RumqttUpstream {
    /// Builds the client and its event loop; nothing touches the network yet.
    pub fn new(o: &UpstreamOptions) -> RumqttUpstream {
        let max_in = o.max_incoming_packet_size.clamp(64, MQTT_MAX_PACKET_SIZE);
        match o.version {
            UpstreamVersion::V311 => {
                let mut opts = rumqttc::MqttOptions::new(&o.client_id, &o.host, o.port);
                opts.set_keep_alive(o.keep_alive)
                    .set_clean_session(o.clean_session)
                    .set_inflight(o.inflight)
                    .set_request_channel_capacity(o.request_capacity)
                    .set_pending_throttle(Duration::ZERO)
                    // Never let rumqttc's 10 KiB default refuse inside the event loop: the
                    // sync core checks sizes before a record gets here. Incoming: 3.1.1 cannot
                    // announce a limit, so a command over rumqttc's limit would end the
                    // connection and come back on every reconnect; take anything and let the
                    // gateway refuse what the local broker cannot carry.
                    .set_max_packet_size(
                        MQTT_MAX_PACKET_SIZE as usize,
                        MQTT_MAX_PACKET_SIZE as usize,
                    );
                if let Some((topic, payload)) = &o.will {
                    opts.set_last_will(rumqttc::LastWill::new(
                        topic,
                        payload.to_vec(),
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                }
                if let Some(user) = &o.username {
                    opts.set_credentials(user, o.password.clone().unwrap_or_default());
                }
                if let Some(tls) = &o.tls {
                    opts.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
                    ));
                }
                let (client, events) = rumqttc::AsyncClient::new(opts, o.request_capacity);
                RumqttUpstream::V4 {
                    client,
                    events: Box::new(events),
                    connected: false,
                }
            }
            UpstreamVersion::V5 => {
                let mut opts = rumqttc::v5::MqttOptions::new(&o.client_id, &o.host, o.port);
                opts.set_keep_alive(o.keep_alive)
                    .set_clean_start(o.clean_session)
                    .set_outgoing_inflight_upper_limit(o.inflight)
                    .set_request_channel_capacity(o.request_capacity)
                    .set_pending_throttle(Duration::ZERO)
                    .set_max_packet_size(Some(max_in));
                if let Some((topic, payload)) = &o.will {
                    opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        topic,
                        payload.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                if let Some(user) = &o.username {
                    opts.set_credentials(user, o.password.clone().unwrap_or_default());
                }
                if let Some(tls) = &o.tls {
                    opts.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
                    ));
                }
                let (client, events) = rumqttc::v5::AsyncClient::new(opts, o.request_capacity);
                RumqttUpstream::V5 {
                    client,
                    events: Box::new(events),
                    connected: false,
                }
            }
        }
    }
}

/// An I/O error's kind says whether a TCP connection was ever made.
fn io_kind(e: &std::io::Error, connected: bool) -> UpstreamErrorKind {
    use std::io::ErrorKind as K;
    if connected {
        return UpstreamErrorKind::Lost;
    }
    match e.kind() {
        K::ConnectionRefused
        | K::TimedOut
        | K::NotFound
        | K::AddrNotAvailable
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::NetworkDown
        | K::WouldBlock => UpstreamErrorKind::Unreachable,
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
            UpstreamErrorKind::ProtocolRejected
        }
        // DNS failures come back as "Other" / "Uncategorized" with a message.
        _ => UpstreamErrorKind::Unreachable,
    }
}

fn classify_v4(e: rumqttc::ConnectionError, connected: bool) -> UpstreamError {
    use rumqttc::{ConnectReturnCode, ConnectionError as E, StateError as S};
    let detail = e.to_string();
    let kind = match &e {
        E::Io(io) => io_kind(io, connected),
        E::Tls(_) => UpstreamErrorKind::Tls,
        E::NetworkTimeout | E::FlushTimeout if !connected => UpstreamErrorKind::Unreachable,
        E::ConnectionRefused(ConnectReturnCode::RefusedProtocolVersion) => {
            UpstreamErrorKind::ProtocolRejected
        }
        E::ConnectionRefused(_) => UpstreamErrorKind::Refused,
        E::MqttState(S::Io(io)) => io_kind(io, connected),
        E::MqttState(S::Deserialization(_) | S::ConnectionAborted) if !connected => {
            UpstreamErrorKind::ProtocolRejected
        }
        E::NotConnAck(_) => UpstreamErrorKind::ProtocolRejected,
        E::RequestsDone => UpstreamErrorKind::ClientGone,
        _ => UpstreamErrorKind::Lost,
    };
    UpstreamError::new(kind, explain(kind, detail))
}

/// Says what a protocol rejection means: rumqttc reports a 3.1.1 broker's refusal of a v5
/// CONNECT as a closed connection or a CONNACK it cannot parse.
fn explain(kind: UpstreamErrorKind, detail: String) -> String {
    if kind == UpstreamErrorKind::ProtocolRejected {
        format!(
            "the broker rejected the MQTT protocol version (it refused or closed the connection before a CONNACK this version can read): {detail}"
        )
    } else {
        detail
    }
}

fn classify_v5(e: rumqttc::v5::ConnectionError, connected: bool) -> UpstreamError {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::{ConnectionError as E, StateError as S};
    let detail = e.to_string();
    let kind = match &e {
        E::Io(io) => io_kind(io, connected),
        E::Tls(_) => UpstreamErrorKind::Tls,
        E::Timeout(_) if !connected => UpstreamErrorKind::Unreachable,
        E::ConnectionRefused(C::UnsupportedProtocolVersion | C::RefusedProtocolVersion) => {
            UpstreamErrorKind::ProtocolRejected
        }
        E::ConnectionRefused(_) => UpstreamErrorKind::Refused,
        E::MqttState(S::Io(io)) => io_kind(io, connected),
        E::MqttState(S::Deserialization(_) | S::ConnectionAborted) if !connected => {
            UpstreamErrorKind::ProtocolRejected
        }
        E::MqttState(S::ServerDisconnect { .. }) => UpstreamErrorKind::Disconnected,
        E::NotConnAck(_) => UpstreamErrorKind::ProtocolRejected,
        E::RequestsDone => UpstreamErrorKind::ClientGone,
        _ => UpstreamErrorKind::Lost,
    };
    UpstreamError::new(kind, explain(kind, detail))
}

impl Upstream for RumqttUpstream {
    fn version(&self) -> UpstreamVersion {
        match self {
            Self::V4 { .. } => UpstreamVersion::V311,
            Self::V5 { .. } => UpstreamVersion::V5,
        }
    }

    fn publish(&mut self, p: OutgoingPublish) -> Result<(), PublishError> {
        if let Some(why) = invalid_topic(&p.topic) {
            return Err(PublishError::Refused(why.to_owned()));
        }
        match self {
            Self::V4 { client, .. } => client
                .try_publish(p.topic, rumqttc::QoS::AtLeastOnce, p.retain, p.payload)
                .map_err(|_| PublishError::ClientGone),
            Self::V5 { client, .. } => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: p.user_properties,
                    ..Default::default()
                };
                client
                    .try_publish_with_properties(
                        p.topic,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        p.retain,
                        p.payload,
                        props,
                    )
                    .map_err(|_| PublishError::ClientGone)
            }
        }
    }

    fn publish_qos0(&mut self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        if let Some(why) = invalid_topic(&topic) {
            return Err(PublishError::Refused(why.to_owned()));
        }
        match self {
            Self::V4 { client, .. } => client
                .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .map_err(|_| PublishError::ClientGone),
            Self::V5 { client, .. } => client
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .map_err(|_| PublishError::ClientGone),
        }
    }

    fn subscribe(&mut self, filter: String) -> Result<(), PublishError> {
        match self {
            Self::V4 { client, .. } => client
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|_| PublishError::ClientGone),
            Self::V5 { client, .. } => client
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|_| PublishError::ClientGone),
        }
    }

    fn disconnect(&mut self) {
        let _ = match self {
            Self::V4 { client, .. } => client.try_disconnect().is_ok(),
            Self::V5 { client, .. } => client.try_disconnect().is_ok(),
        };
    }

    async fn next_event(&mut self) -> Result<UpstreamEvent, UpstreamError> {
        match self {
            Self::V4 {
                events, connected, ..
            } => {
                use rumqttc::{Event, Outgoing, Packet};
                let event = events
                    .poll()
                    .await
                    .map_err(|e| classify_v4(e, *connected))?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        *connected = true;
                        UpstreamEvent::ConnAck {
                            session_present: ack.session_present,
                            max_packet_size: None,
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => UpstreamEvent::PubAck {
                        pkid: ack.pkid,
                        code: PubAckCode::Success,
                    },
                    Event::Incoming(Packet::Publish(p)) => UpstreamEvent::Message {
                        topic: Some(p.topic),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                        UpstreamEvent::Sent { pkid }
                    }
                    _ => UpstreamEvent::Other,
                })
            }
            Self::V5 {
                events, connected, ..
            } => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                let event = events
                    .poll()
                    .await
                    .map_err(|e| classify_v5(e, *connected))?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        *connected = true;
                        UpstreamEvent::ConnAck {
                            session_present: ack.session_present,
                            max_packet_size: ack.properties.and_then(|p| p.max_packet_size),
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => UpstreamEvent::PubAck {
                        pkid: ack.pkid,
                        code: PubAckCode::from_v5(ack.reason),
                    },
                    Event::Incoming(Packet::Publish(p)) => UpstreamEvent::Message {
                        topic: String::from_utf8(p.topic.to_vec()).ok(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                        UpstreamEvent::Sent { pkid }
                    }
                    _ => UpstreamEvent::Other,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic_len: usize, payload_len: usize, props: usize) -> OutgoingPublish {
        OutgoingPublish {
            topic: "t".repeat(topic_len),
            payload: Bytes::from(vec![7u8; payload_len]),
            retain: false,
            user_properties: (0..props)
                .map(|i| (format!("k{i}"), "v".repeat(i * 40)))
                .collect(),
        }
    }

    /// Our size formula against rumqttc's own encoder, at every varint boundary.
    #[test]
    fn publish_size_matches_the_encoders_at_varint_boundaries() {
        for payload in [
            0usize, 1, 100, 120, 121, 122, 123, 127, 128, 16_370, 16_383, 16_384, 2_097_140,
            2_097_151, 2_097_152,
        ] {
            for props in [0usize, 1, 3] {
                let p = publish(20, payload, props);
                let mut v4 = rumqttc::mqttbytes::v4::Publish::new(
                    p.topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    p.payload.to_vec(),
                );
                v4.pkid = 1;
                let mut buf = bytes::BytesMut::new();
                let written = v4
                    .write(&mut buf)
                    .unwrap_or_else(|e| panic!("v4 encode: {e:?}"));
                assert_eq!(written, buf.len());
                assert_eq!(
                    publish_size(UpstreamVersion::V311, &p),
                    buf.len(),
                    "v4 {payload}"
                );

                let mut v5 = rumqttc::v5::mqttbytes::v5::Publish::new(
                    p.topic.clone(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    p.payload.clone(),
                    Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
                        user_properties: p.user_properties.clone(),
                        ..Default::default()
                    }),
                );
                v5.pkid = 1;
                let mut buf = bytes::BytesMut::new();
                v5.write(&mut buf)
                    .unwrap_or_else(|e| panic!("v5 encode: {e:?}"));
                assert_eq!(
                    publish_size(UpstreamVersion::V5, &p),
                    buf.len(),
                    "v5 {payload} {props}"
                );
            }
        }
    }

    #[test]
    fn invalid_topics_are_named() {
        assert_eq!(invalid_topic("a/b"), None);
        assert!(invalid_topic("").is_some());
        assert!(invalid_topic("a/+/b").is_some());
        assert!(invalid_topic("a/#").is_some());
        assert!(invalid_topic(&"x".repeat(70_000)).is_some());
    }
}
