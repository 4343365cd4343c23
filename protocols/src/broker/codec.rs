//! The two thin adapters between rumqttc's codecs (`mqttbytes::v4`, `v5::mqttbytes::v5`) and the
//! broker's protocol-agnostic packets. Nothing here parses MQTT by hand except the two bytes needed
//! to tell 3.1.1 from 5 before the right codec is chosen, and the zero-length MQTT 5 DISCONNECT
//! that rumqttc's v5 reader rejects.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes as m4root;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes as m5root;
use rumqttc::v5::mqttbytes::v5;

use outpost_config::Secret;

use super::QoS;

/// Which codec a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// A will as carried by CONNECT.
#[derive(Debug, Clone)]
pub(crate) struct WillIn {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 will delay interval (seconds); `None` for 3.1.1 and when absent.
    pub delay: Option<u32>,
    /// MQTT 5 will properties passed to subscribers like a PUBLISH's.
    pub props: PublishProps,
    /// MQTT 5 message expiry interval of the will.
    pub message_expiry: Option<u32>,
}

/// The parts of a CONNECT the broker acts on.
#[derive(Debug, Clone)]
pub(crate) struct ConnectIn {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub will: Option<WillIn>,
    /// MQTT 5 session expiry interval (seconds); `None` for 3.1.1 and when absent.
    pub session_expiry: Option<u32>,
    /// MQTT 5 receive maximum the client announced (its inbound in-flight window).
    pub receive_maximum: Option<u16>,
    /// MQTT 5 maximum packet size the client accepts.
    pub max_packet_size: Option<u32>,
    /// The username flag's value; `None` when absent (rumqttc also reads an empty one as absent).
    pub username: Option<String>,
    /// The password; `Debug` prints `***`.
    pub password: Option<Secret>,
}

/// What the first packet of a connection turned out to be.
#[derive(Debug)]
pub(crate) enum Handshake {
    Connect(Box<ConnectIn>),
    /// A CONNECT with a protocol level we do not speak (3 = MQIsdp 3.1, or garbage).
    UnsupportedLevel(u8),
    /// The first packet is not a CONNECT (its packet type).
    NotConnect(u8),
}

/// One requested subscription.
#[derive(Debug, Clone)]
pub(crate) struct SubscriptionRequest {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 = send retained on every subscribe, 1 = only if new, 2 = never (MQTT 5 §3.8.3.1).
    pub retain_handling: u8,
}

/// The MQTT 5 PUBLISH properties the broker passes from a publisher to its v5 subscribers
/// unchanged (MQTT 5 §3.3.2.3). 3.1.1 subscribers get the payload only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PublishProps {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// In the publisher's order, duplicates kept (the spec requires both).
    pub user_properties: Vec<(String, String)>,
}

/// An inbound PUBLISH, topic not yet validated.
#[derive(Debug, Clone)]
pub(crate) struct PublishIn {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub pkid: u16,
    /// MQTT 5 properties to forward; empty for 3.1.1.
    pub props: PublishProps,
    /// MQTT 5 message expiry interval, seconds from receipt.
    pub message_expiry: Option<u32>,
    /// MQTT 5 topic alias (resolved by the connection).
    pub topic_alias: Option<u16>,
}

/// Every packet a client may send after CONNECT, and the ones it must not (`Unexpected`).
#[derive(Debug)]
pub(crate) enum Incoming {
    Publish(PublishIn),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubscriptionRequest>,
        /// MQTT 5 subscription identifier, for every filter of the packet.
        id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `with_will` is MQTT 5 reason 0x04 "disconnect with will message"; `session_expiry`
    /// the MQTT 5 session expiry interval it sets, if any.
    Disconnect {
        with_will: bool,
        session_expiry: Option<u32>,
    },
    /// A second CONNECT: a protocol violation.
    Connect,
    /// A server-to-client packet (CONNACK, SUBACK, ...) or AUTH: a protocol violation.
    Unexpected(&'static str),
}

/// CONNACK outcomes, mapped to each protocol's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnAckCode {
    Accepted,
    IdentifierRejected,
    /// A limit (`max_connections`, `max_sessions`): 3.1.1 0x03 server unavailable, MQTT 5
    /// 0x97 quota exceeded.
    ServerUnavailable,
    /// 3.1.1 0x04, MQTT 5 0x86.
    BadUsernameOrPassword,
    /// 3.1.1 0x05, MQTT 5 0x87.
    NotAuthorized,
}

/// Why an inbound QoS 1/2 publish was not accepted (MQTT 5 reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckReason {
    Success,
    QuotaExceeded,
    PayloadFormatInvalid,
    Unspecified,
    /// The ACL does not let the client publish there (MQTT 5 0x87).
    NotAuthorized,
}

/// The outcome of one filter of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubAckCode {
    Granted(QoS),
    /// 3.1.1 0x80, MQTT 5 0x8F.
    InvalidFilter,
    /// 3.1.1 0x80, MQTT 5 0x87.
    NotAuthorized,
}

/// Every packet the broker sends.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    ConnAck {
        session_present: bool,
        code: ConnAckCode,
        /// MQTT 5 only: the id we assigned to an empty client id.
        assigned_client_id: Option<String>,
        receive_maximum: u16,
        max_packet_size: u32,
        /// MQTT 5 only: the highest topic alias the client may use (0: none).
        topic_alias_max: u16,
        /// MQTT 5 only: the keep-alive the server imposes instead of the client's.
        server_keep_alive: Option<u16>,
        /// MQTT 5 only: the session expiry interval the server uses instead of the client's.
        session_expiry: Option<u32>,
    },
    Publish {
        topic: std::sync::Arc<str>,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        dup: bool,
        pkid: u16,
        /// MQTT 5 only: the publisher's properties.
        props: std::sync::Arc<PublishProps>,
        /// MQTT 5 only: the expiry interval left (seconds).
        message_expiry: Option<u32>,
        /// MQTT 5 only: the identifiers of the subscriptions that matched.
        subscription_ids: Vec<u32>,
    },
    PubAck {
        pkid: u16,
        reason: AckReason,
    },
    PubRec {
        pkid: u16,
        reason: AckReason,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        /// One per requested filter, in order.
        codes: Vec<SubAckCode>,
    },
    UnsubAck {
        pkid: u16,
        /// Whether each filter had a subscription (MQTT 5 reason codes).
        existed: Vec<bool>,
    },
    PingResp,
    /// MQTT 5 only (3.1.1 has no server DISCONNECT): why the server closes.
    Disconnect {
        reason: DisconnectReason,
    },
}

/// Reasons the broker closes an MQTT 5 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DisconnectReason {
    SessionTakenOver,
    ServerShuttingDown,
    KeepAliveTimeout,
    PacketTooLarge,
    MalformedPacket,
    ProtocolError,
    TopicNameInvalid,
    /// A topic alias of 0 or above the maximum we announced (0x94).
    TopicAliasInvalid,
    /// More unacknowledged QoS 1/2 publishes than the receive maximum we announced (0x93).
    ReceiveMaximumExceeded,
}

/// Why bytes could not be turned into a packet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The fixed header announces more than the limit; nothing after it was read.
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// The bytes are not a valid MQTT packet.
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Could not encode an outgoing packet (too large for the peer, or out of range).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode packet: {0}")]
pub(crate) struct EncodeError(String);

fn qos_from4(q: m4root::QoS) -> QoS {
    match q {
        m4root::QoS::AtMostOnce => QoS::AtMostOnce,
        m4root::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m4root::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to4(q: QoS) -> m4root::QoS {
    match q {
        QoS::AtMostOnce => m4root::QoS::AtMostOnce,
        QoS::AtLeastOnce => m4root::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m4root::QoS::ExactlyOnce,
    }
}

fn qos_from5(q: m5root::QoS) -> QoS {
    match q {
        m5root::QoS::AtMostOnce => QoS::AtMostOnce,
        m5root::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m5root::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to5(q: QoS) -> m5root::QoS {
    match q {
        QoS::AtMostOnce => m5root::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5root::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5root::QoS::ExactlyOnce,
    }
}

/// Length of the fixed header (type byte + 1..4 remaining-length bytes) and the remaining length,
/// or `None` when more bytes are needed. Used only to size-check and to find the protocol level.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(FrameError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// Checks the announced size before waiting for the body, so an oversized packet is refused
/// after its first five bytes rather than after buffering it.
fn check_size(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    match fixed_header(buf)? {
        None => Ok(None),
        Some((hdr, remaining)) => {
            let size = hdr + remaining;
            if size > max {
                return Err(FrameError::TooLarge { size, max });
            }
            Ok(Some(size))
        }
    }
}

/// Reads the first packet of a connection, choosing the codec by its protocol level.
/// `Ok(None)`: need more bytes.
pub(crate) fn read_handshake(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Handshake>, FrameError> {
    let Some(first) = buf.first().copied() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Ok(Some(Handshake::NotConnect(first >> 4)));
    }
    let Some(size) = check_size(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < size {
        return Ok(None);
    }
    let Some((hdr, _)) = fixed_header(buf)? else {
        return Ok(None);
    };
    // Variable header: protocol name (u16 length + bytes), then the level byte.
    let name_len = match (buf.get(hdr), buf.get(hdr + 1)) {
        (Some(&a), Some(&b)) => usize::from(u16::from_be_bytes([a, b])),
        _ => return Err(FrameError::Malformed("CONNECT too short".into())),
    };
    let Some(&level) = buf.get(hdr + 2 + name_len) else {
        return Err(FrameError::Malformed(
            "CONNECT without protocol level".into(),
        ));
    };
    match level {
        4 => match v4::Packet::read(buf, max_packet_size) {
            Ok(v4::Packet::Connect(c)) => Ok(Some(Handshake::Connect(Box::new(ConnectIn {
                protocol: Protocol::V4,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                will: c.last_will.map(|w| WillIn {
                    topic: Bytes::from(w.topic.into_bytes()),
                    payload: w.message,
                    qos: qos_from4(w.qos),
                    retain: w.retain,
                    delay: None,
                    props: PublishProps::default(),
                    message_expiry: None,
                }),
                session_expiry: None,
                receive_maximum: None,
                max_packet_size: None,
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| Secret::new(l.password)),
            })))),
            Ok(_) => Err(FrameError::Malformed("expected CONNECT".into())),
            Err(e) => Err(map4(e, max_packet_size)),
        },
        5 => match v5::Packet::read(buf, Some(clamp_u32(max_packet_size))) {
            Ok(v5::Packet::Connect(c, will, login)) => {
                let props = c.properties.as_ref();
                Ok(Some(Handshake::Connect(Box::new(ConnectIn {
                    protocol: Protocol::V5,
                    client_id: c.client_id,
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    will: will.map(|w| {
                        let mut will = WillIn {
                            topic: w.topic,
                            payload: w.message,
                            qos: qos_from5(w.qos),
                            retain: w.retain,
                            delay: None,
                            message_expiry: None,
                            props: PublishProps::default(),
                        };
                        if let Some(p) = w.properties {
                            will.delay = p.delay_interval;
                            will.message_expiry = p.message_expiry_interval;
                            will.props = PublishProps {
                                payload_format_indicator: p.payload_format_indicator,
                                content_type: p.content_type,
                                response_topic: p.response_topic,
                                correlation_data: p.correlation_data,
                                user_properties: p.user_properties,
                            };
                        }
                        will
                    }),
                    session_expiry: props.and_then(|p| p.session_expiry_interval),
                    receive_maximum: props.and_then(|p| p.receive_maximum),
                    max_packet_size: props.and_then(|p| p.max_packet_size),
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| Secret::new(l.password)),
                }))))
            }
            Ok(_) => Err(FrameError::Malformed("expected CONNECT".into())),
            Err(e) => Err(map5(e, max_packet_size)),
        },
        other => {
            // Consume the frame: the connection is answered and closed anyway.
            buf.advance(size);
            Ok(Some(Handshake::UnsupportedLevel(other)))
        }
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn map4(e: m4root::Error, max: usize) -> FrameError {
    match e {
        m4root::Error::PayloadSizeLimitExceeded(size) => FrameError::TooLarge { size, max },
        other => FrameError::Malformed(other.to_string()),
    }
}

fn map5(e: m5root::Error, max: usize) -> FrameError {
    match e {
        m5root::Error::PayloadSizeLimitExceeded { pkt_size, .. } => FrameError::TooLarge {
            size: pkt_size,
            max,
        },
        other => FrameError::Malformed(other.to_string()),
    }
}

/// Reads the next packet after CONNECT. `Ok(None)`: need more bytes.
pub(crate) fn read_packet(
    protocol: Protocol,
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Incoming>, FrameError> {
    let Some(size) = check_size(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < size {
        return Ok(None);
    }
    match protocol {
        // The whole frame is buffered (checked above), so "insufficient bytes" from the codec
        // means a length inside the packet points past its end: malformed, not "wait".
        Protocol::V4 => v4::Packet::read(buf, max_packet_size)
            .map(|p| Some(from4(p)))
            .map_err(|e| map4(e, max_packet_size)),
        Protocol::V5 => {
            // rumqttc's v5 reader refuses the short DISCONNECTs the spec allows (§3.14.2.1):
            // no variable header at all (reason 0x00), or a reason code without properties.
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0x00 {
                buf.advance(2);
                return Ok(Some(Incoming::Disconnect {
                    with_will: false,
                    session_expiry: None,
                }));
            }
            if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 0x01 {
                let with_will = buf[2] == 0x04;
                buf.advance(3);
                return Ok(Some(Incoming::Disconnect {
                    with_will,
                    session_expiry: None,
                }));
            }
            v5::Packet::read(buf, Some(clamp_u32(max_packet_size)))
                .map(|p| Some(from5(p)))
                .map_err(|e| map5(e, max_packet_size))
        }
    }
}

fn from4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::Publish(p) => Incoming::Publish(PublishIn {
            topic: Bytes::from(p.topic.into_bytes()),
            payload: p.payload,
            qos: qos_from4(p.qos),
            retain: p.retain,
            pkid: p.pkid,
            props: PublishProps::default(),
            message_expiry: None,
            topic_alias: None,
        }),
        v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
        v4::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            id: None,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscriptionRequest {
                    filter: f.path,
                    qos: qos_from4(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect {
            with_will: false,
            session_expiry: None,
        },
        v4::Packet::Connect(_) => Incoming::Connect,
        v4::Packet::ConnAck(_) => Incoming::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Incoming::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Incoming::Unexpected("PINGRESP"),
    }
}

fn from5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::Publish(p) => {
            let props = p.properties.unwrap_or_default();
            Incoming::Publish(PublishIn {
                topic: p.topic,
                payload: p.payload,
                qos: qos_from5(p.qos),
                retain: p.retain,
                pkid: p.pkid,
                message_expiry: props.message_expiry_interval,
                topic_alias: props.topic_alias,
                props: PublishProps {
                    payload_format_indicator: props.payload_format_indicator,
                    content_type: props.content_type,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation_data,
                    user_properties: props.user_properties,
                },
            })
        }
        v5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Incoming::PubRec(a.pkid),
        v5::Packet::PubRel(a) => Incoming::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Incoming::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            // rumqttc reads the variable byte integer into a usize (at most 268,435,455).
            id: s
                .properties
                .and_then(|p| p.id)
                .map(|id| u32::try_from(id).unwrap_or(u32::MAX)),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscriptionRequest {
                    filter: f.path,
                    qos: qos_from5(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Connect(..) => Incoming::Connect,
        v5::Packet::ConnAck(_) => Incoming::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Incoming::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Incoming::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
    }
}

/// The CONNACK for a CONNECT whose protocol level we do not speak: always in the 3.1.1 layout,
/// which is also what 3.1 clients parse (return code 0x01).
pub(crate) fn write_unsupported_protocol(out: &mut BytesMut) -> Result<(), EncodeError> {
    v4::ConnAck::new(v4::ConnectReturnCode::RefusedProtocolVersion, false)
        .write(out)
        .map(drop)
        .map_err(|e| EncodeError(e.to_string()))
}

/// Encodes `packet` for `protocol`, refusing anything larger than `max_size` (the peer's limit).
pub(crate) fn write_packet(
    protocol: Protocol,
    packet: &Outgoing,
    out: &mut BytesMut,
    max_size: usize,
) -> Result<(), EncodeError> {
    match protocol {
        Protocol::V4 => write4(packet, out, max_size),
        Protocol::V5 => write5(packet, out, max_size),
    }
}

fn write4(packet: &Outgoing, out: &mut BytesMut, max_size: usize) -> Result<(), EncodeError> {
    let p = match packet {
        Outgoing::ConnAck {
            session_present,
            code,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match code {
                ConnAckCode::Accepted => v4::ConnectReturnCode::Success,
                ConnAckCode::IdentifierRejected => v4::ConnectReturnCode::BadClientId,
                ConnAckCode::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
                ConnAckCode::BadUsernameOrPassword => v4::ConnectReturnCode::BadUserNamePassword,
                ConnAckCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
            },
            *session_present,
        )),
        Outgoing::Publish {
            topic,
            payload,
            qos,
            retain,
            dup,
            pkid,
            ..
        } => {
            let mut p = v4::Publish::from_bytes(topic.as_ref(), qos_to4(*qos), payload.clone());
            p.retain = *retain;
            p.dup = *dup;
            p.pkid = if *qos == QoS::AtMostOnce { 0 } else { *pkid };
            v4::Packet::Publish(p)
        }
        Outgoing::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Outgoing::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
        Outgoing::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
        Outgoing::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
        Outgoing::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|c| match c {
                    SubAckCode::Granted(q) => v4::SubscribeReasonCode::Success(qos_to4(*q)),
                    SubAckCode::InvalidFilter | SubAckCode::NotAuthorized => {
                        v4::SubscribeReasonCode::Failure
                    }
                })
                .collect(),
        )),
        Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outgoing::PingResp => v4::Packet::PingResp,
        // 3.1.1 has no server-sent DISCONNECT: the server just closes.
        Outgoing::Disconnect { .. } => return Ok(()),
    };
    p.write(out, max_size)
        .map(drop)
        .map_err(|e| EncodeError(e.to_string()))
}

fn write5(packet: &Outgoing, out: &mut BytesMut, max_size: usize) -> Result<(), EncodeError> {
    let p = match packet {
        Outgoing::ConnAck {
            session_present,
            code,
            assigned_client_id,
            receive_maximum,
            max_packet_size,
            topic_alias_max,
            server_keep_alive,
            session_expiry,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *session_present,
            code: match code {
                ConnAckCode::Accepted => v5::ConnectReturnCode::Success,
                ConnAckCode::IdentifierRejected => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnAckCode::ServerUnavailable => v5::ConnectReturnCode::QuotaExceeded,
                ConnAckCode::BadUsernameOrPassword => v5::ConnectReturnCode::BadUserNamePassword,
                ConnAckCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: (*code == ConnAckCode::Accepted).then(|| v5::ConnAckProperties {
                session_expiry_interval: *session_expiry,
                receive_max: Some(*receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(*max_packet_size),
                assigned_client_identifier: assigned_client_id.clone(),
                topic_alias_max: Some(*topic_alias_max),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: *server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Outgoing::Publish {
            topic,
            payload,
            qos,
            retain,
            dup,
            pkid,
            props,
            message_expiry,
            subscription_ids,
        } => v5::Packet::Publish(v5::Publish {
            dup: *dup,
            qos: qos_to5(*qos),
            retain: *retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid: if *qos == QoS::AtMostOnce { 0 } else { *pkid },
            payload: payload.clone(),
            properties: (**props != PublishProps::default()
                || message_expiry.is_some()
                || !subscription_ids.is_empty())
            .then(|| v5::PublishProperties {
                payload_format_indicator: props.payload_format_indicator,
                message_expiry_interval: *message_expiry,
                topic_alias: None,
                response_topic: props.response_topic.clone(),
                correlation_data: props.correlation_data.clone(),
                user_properties: props.user_properties.clone(),
                subscription_identifiers: subscription_ids
                    .iter()
                    .filter_map(|id| usize::try_from(*id).ok())
                    .collect(),
                content_type: props.content_type.clone(),
            }),
        }),
        Outgoing::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
            pkid: *pkid,
            reason: match reason {
                AckReason::Success => v5::PubAckReason::Success,
                AckReason::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                AckReason::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                AckReason::Unspecified => v5::PubAckReason::UnspecifiedError,
                AckReason::NotAuthorized => v5::PubAckReason::NotAuthorized,
            },
            properties: None,
        }),
        Outgoing::PubRec { pkid, reason } => v5::Packet::PubRec(v5::PubRec {
            pkid: *pkid,
            reason: match reason {
                AckReason::Success => v5::PubRecReason::Success,
                AckReason::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
                AckReason::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
                AckReason::Unspecified => v5::PubRecReason::UnspecifiedError,
                AckReason::NotAuthorized => v5::PubRecReason::NotAuthorized,
            },
            properties: None,
        }),
        Outgoing::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel::new(*pkid, None)),
        Outgoing::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(*pkid, None)),
        Outgoing::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    SubAckCode::Granted(q) => v5::SubscribeReasonCode::Success(qos_to5(*q)),
                    SubAckCode::InvalidFilter => v5::SubscribeReasonCode::TopicFilterInvalid,
                    SubAckCode::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Outgoing::UnsubAck { pkid, existed } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: existed
                .iter()
                .map(|e| {
                    if *e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        }),
        Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outgoing::Disconnect { reason } => {
            // rumqttc 0.25's `Disconnect::write` announces a remaining length of 1 but writes
            // two bytes when there are no properties (and drops the reason code when there
            // are), so this one fixed-size packet is written here: reason code, then an empty
            // property length, which every client (rumqttc's reader included) parses.
            let code = match reason {
                DisconnectReason::SessionTakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                DisconnectReason::ServerShuttingDown => {
                    v5::DisconnectReasonCode::ServerShuttingDown
                }
                DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                DisconnectReason::MalformedPacket => v5::DisconnectReasonCode::MalformedPacket,
                DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                DisconnectReason::TopicNameInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
                DisconnectReason::TopicAliasInvalid => v5::DisconnectReasonCode::TopicAliasInvalid,
                DisconnectReason::ReceiveMaximumExceeded => {
                    v5::DisconnectReasonCode::ReceiveMaximumExceeded
                }
            };
            out.extend_from_slice(&[0xE0, 0x02, code as u8, 0x00]);
            return Ok(());
        }
    };
    p.write(out, Some(clamp_u32(max_size)))
        .map(drop)
        .map_err(|e| EncodeError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode4(p: v4::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("encodes");
        b
    }

    #[test]
    fn detects_v4_connect() {
        let mut c = v4::Connect::new("dev1");
        c.keep_alive = 0;
        let mut buf = encode4(v4::Packet::Connect(c));
        match read_handshake(&mut buf, 1024) {
            Ok(Some(Handshake::Connect(c))) => {
                assert_eq!(c.protocol, Protocol::V4);
                assert_eq!(c.client_id, "dev1");
                assert_eq!(c.keep_alive, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn connect_credentials_are_read_and_the_password_never_printed() {
        let mut c = v4::Connect::new("dev1");
        c.set_login("alice", "hunter2");
        let mut buf = encode4(v4::Packet::Connect(c));
        match read_handshake(&mut buf, 1024) {
            Ok(Some(Handshake::Connect(c))) => {
                assert_eq!(c.username.as_deref(), Some("alice"));
                assert_eq!(c.password.as_ref().map(Secret::expose), Some("hunter2"));
                let printed = format!("{c:?}");
                assert!(
                    !printed.contains("hunter2") && printed.contains("***"),
                    "{printed}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn detects_v5_connect() {
        let c = v5::Connect {
            keep_alive: 30,
            client_id: "dev5".into(),
            clean_start: true,
            properties: None,
        };
        let mut buf = BytesMut::new();
        v5::Packet::Connect(c, None, None)
            .write(&mut buf, None)
            .expect("encodes");
        match read_handshake(&mut buf, 1024) {
            Ok(Some(Handshake::Connect(c))) => assert_eq!(c.protocol, Protocol::V5),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn mqisdp_is_unsupported_level() {
        // MQTT 3.1 CONNECT: "MQIsdp", level 3, clean, keepalive 60, id "a".
        let mut body = vec![0x00, 0x06];
        body.extend_from_slice(b"MQIsdp");
        body.extend_from_slice(&[3, 0x02, 0, 60, 0, 1, b'a']);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x10, u8::try_from(body.len()).expect("small")]);
        buf.extend_from_slice(&body);
        assert!(matches!(
            read_handshake(&mut buf, 1024),
            Ok(Some(Handshake::UnsupportedLevel(3)))
        ));
    }

    #[test]
    fn partial_connect_waits() {
        let full = encode4(v4::Packet::Connect(v4::Connect::new("x")));
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(
                matches!(read_handshake(&mut buf, 1024), Ok(None)),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn oversized_is_refused_from_the_header() {
        // PUBLISH announcing 1,000,000 bytes; only the header arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0xC0, 0x84, 0x3D][..]);
        assert!(matches!(
            read_packet(Protocol::V4, &mut buf, 1000),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn v5_short_disconnect() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert!(matches!(
            read_packet(Protocol::V5, &mut buf, 1000),
            Ok(Some(Incoming::Disconnect {
                with_will: false,
                ..
            }))
        ));
    }

    #[test]
    fn v5_disconnect_with_reason_only() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x01, 0x04, 0xE0, 0x01, 0x00][..]);
        assert!(matches!(
            read_packet(Protocol::V5, &mut buf, 1000),
            Ok(Some(Incoming::Disconnect {
                with_will: true,
                ..
            }))
        ));
        assert!(matches!(
            read_packet(Protocol::V5, &mut buf, 1000),
            Ok(Some(Incoming::Disconnect {
                with_will: false,
                ..
            }))
        ));
    }

    #[test]
    fn server_disconnect_round_trips_through_rumqttc() {
        let mut buf = BytesMut::new();
        write_packet(
            Protocol::V5,
            &Outgoing::Disconnect {
                reason: DisconnectReason::SessionTakenOver,
            },
            &mut buf,
            1000,
        )
        .expect("encodes");
        match v5::Packet::read(&mut buf, None) {
            Ok(v5::Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn truncated_field_inside_a_complete_frame_is_malformed() {
        // v5 PUBLISH QoS 0, topic "a", but no property length: the frame is complete.
        let mut buf = BytesMut::from(&[0x30u8, 0x03, 0x00, 0x01, b'a'][..]);
        assert!(matches!(
            read_packet(Protocol::V5, &mut buf, 1000),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn v5_suback_failure_code() {
        let mut buf = BytesMut::new();
        write_packet(
            Protocol::V5,
            &Outgoing::SubAck {
                pkid: 7,
                codes: vec![
                    SubAckCode::Granted(QoS::AtLeastOnce),
                    SubAckCode::InvalidFilter,
                    SubAckCode::NotAuthorized,
                ],
            },
            &mut buf,
            1000,
        )
        .expect("encodes");
        assert_eq!(&buf[..], &[0x90, 6, 0, 7, 0, 0x01, 0x8F, 0x87]);
        let mut buf = BytesMut::new();
        write_packet(
            Protocol::V4,
            &Outgoing::SubAck {
                pkid: 7,
                codes: vec![SubAckCode::InvalidFilter, SubAckCode::NotAuthorized],
            },
            &mut buf,
            1000,
        )
        .expect("encodes");
        assert_eq!(&buf[..], &[0x90, 4, 0, 7, 0x80, 0x80]);
    }

    proptest! {
        /// Whatever a peer sends, parsing returns a packet, "need more", or an error: never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), v5 in any::<bool>()) {
            let mut buf = BytesMut::from(&data[..]);
            let _ = read_handshake(&mut buf, 256);
            let proto = if v5 { Protocol::V5 } else { Protocol::V4 };
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..64 {
                match read_packet(proto, &mut buf, 256) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// A valid header followed by arbitrary body bytes, for both codecs.
        #[test]
        fn arbitrary_bodies_never_panic(kind in 1u8..16, flags in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut data = vec![(kind << 4) | flags, u8::try_from(body.len().min(127)).unwrap_or(127)];
            data.extend_from_slice(&body[..body.len().min(127)]);
            for proto in [Protocol::V4, Protocol::V5] {
                let mut buf = BytesMut::from(&data[..]);
                let _ = read_packet(proto, &mut buf, 1024);
            }
            let mut buf = BytesMut::from(&data[..]);
            let _ = read_handshake(&mut buf, 1024);
        }
    }
}
