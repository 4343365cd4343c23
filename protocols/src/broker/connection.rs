//! One task per TCP connection: the TLS handshake on a TLS listener, then the MQTT handshake,
//! then a loop that reads packets, hands publishes to
//! the gateway, writes acks in order as the gateway's replies arrive, and writes what the
//! session has queued for this client.
//!
//! The loop keeps reading while replies are outstanding and stops only at
//! `max_inbound_pending`: that is the backpressure from the store to the publishers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::auth::{Access, LoginRefusal};
use super::codec::{
    self, AckReason, ConnAckCode, ConnectIn, DisconnectReason, FrameError, Handshake, Incoming,
    Outgoing, Protocol, PublishIn, PublishProps, SubAckCode, SubscriptionRequest,
};
use super::persist::Ticket;
use super::router::{Link, Publication};
use super::session::{Send, Subscription, split_shared};
use super::tls::PeerCert;
use super::{Inbound, IngestRefusal, IngestReply, QoS, Shared, Source, bump};
use crate::topic::{TopicFilter, TopicName};

/// A write that makes no progress for this long closes the connection (a peer that stopped
/// reading must not pin its task forever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The MQTT 5 topic alias maximum announced in CONNACK: each connection keeps at most this
/// many aliases (topic names), so the map is bounded whatever the client sends.
const TOPIC_ALIAS_MAX: u16 = 16;
/// Bound on the last writes of a closing connection (v5 DISCONNECT) and on handing a will over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection's first read buffer: most clients are quiet most of the time, and with
/// thousands of them the buffers are most of the broker's memory.
const READ_BUF_MIN: usize = 512;

/// The most room made for one read, reached by doubling while reads fill the buffer.
const READ_BUF_MAX: usize = 64 * 1024;

/// Why a connection ended; decides whether the will is published.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client (MQTT 5 may ask for the will anyway).
    Disconnect {
        with_will: bool,
    },
    /// The peer closed the socket without DISCONNECT.
    PeerClosed,
    /// Read or write failed or timed out.
    Io(String),
    KeepAlive,
    Takeover,
    Malformed(String),
    Oversized {
        size: usize,
        max: usize,
    },
    InvalidTopic(String),
    /// MQTT 5 topic alias 0 or above `TOPIC_ALIAS_MAX`.
    TopicAliasInvalid(u16),
    /// An MQTT 5 client had more unacknowledged QoS 1/2 publishes than our receive maximum.
    ReceiveMaximumExceeded(usize),
    ProtocolViolation(&'static str),
    /// MQTT 3.1.1 publish refused by the gateway: closed without ack, the client resends later.
    Refused(IngestRefusal),
    /// Broker shutdown.
    Shutdown,
}

impl End {
    fn publishes_will(&self) -> bool {
        match self {
            End::Disconnect { with_will } => *with_will,
            End::Shutdown => false,
            _ => true,
        }
    }

    fn v5_reason(&self) -> Option<DisconnectReason> {
        Some(match self {
            End::Takeover => DisconnectReason::SessionTakenOver,
            End::KeepAlive => DisconnectReason::KeepAliveTimeout,
            End::Oversized { .. } => DisconnectReason::PacketTooLarge,
            End::Malformed(_) => DisconnectReason::MalformedPacket,
            End::InvalidTopic(_) => DisconnectReason::TopicNameInvalid,
            End::TopicAliasInvalid(_) => DisconnectReason::TopicAliasInvalid,
            End::ReceiveMaximumExceeded(_) => DisconnectReason::ReceiveMaximumExceeded,
            End::ProtocolViolation(_) => DisconnectReason::ProtocolError,
            End::Shutdown => DisconnectReason::ServerShuttingDown,
            End::Disconnect { .. } | End::PeerClosed | End::Io(_) | End::Refused(_) => {
                return None;
            }
        })
    }
}

/// A will, validated at CONNECT.
#[derive(Debug)]
struct Will {
    topic: Arc<str>,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    /// MQTT 5 will delay interval (zero for 3.1.1).
    delay: Duration,
    /// MQTT 5 will properties, forwarded like a PUBLISH's.
    props: Arc<PublishProps>,
    /// MQTT 5 message expiry interval of the will, counted from when it is published.
    message_expiry: Option<Duration>,
}

impl Will {
    /// The will as a message published at `at`.
    fn publication(&self, at: Instant) -> Publication {
        Publication {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            props: self.props.clone(),
            expires_at: self.message_expiry.map(|e| at + e),
        }
    }
}

/// An inbound QoS 1/2 publish whose ack has not been written yet.
#[derive(Debug)]
struct Pending {
    pkid: u16,
    qos: QoS,
    /// The gateway's reply; `None` for a message answered without the gateway (a duplicate
    /// QoS 2 publish, re-acknowledged; a publish the ACL refused), acked with `reason`.
    wait: Option<oneshot::Receiver<IngestReply>>,
    /// The ack's reason when `wait` is `None`.
    reason: AckReason,
    /// After the gateway accepted it: the persisted sessions it was queued for (or the
    /// retained store it changed) becoming durable; the ack waits for that too.
    durable: Option<Ticket>,
    /// Delivered to local subscribers once the gateway accepted it.
    message: Option<Publication>,
}

/// Releases the connection slot when the task ends, however it ends.
struct SlotGuard<'a>(&'a Shared);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0
            .counters
            .connections_current
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives back the handshake slot (see `Shared::handshaking`) however the handshake ends.
struct HandshakeSlot(Arc<Shared>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshaking.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one accepted socket until it closes: over TLS first when `tls` is given (the
/// listener's configuration in force at accept).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    peer: SocketAddr,
    listener: usize,
    shared: Arc<Shared>,
    ingest: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let in_handshake = shared
        .handshaking
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            (usize::try_from(c).unwrap_or(usize::MAX) < shared.settings.max_connections)
                .then_some(c + 1)
        })
        .is_ok();
    if !in_handshake {
        bump(&shared.counters.connections_refused);
        tracing::warn!(%peer, "MQTT connection refused: too many connections waiting for CONNECT");
        return;
    }
    let slot = HandshakeSlot(shared.clone());
    // TLS and CONNECT together get `connect_timeout`.
    let deadline = Instant::now() + shared.settings.connect_timeout;
    let ctx = Ctx {
        peer,
        listener,
        shared,
        ingest,
        shutdown,
        hard_stop,
    };
    let Some(acceptor) = tls else {
        let (rd, wr) = stream.into_split();
        // Boxed: the task's future is then only as large as a plain session needs, not as
        // large as a TLS one (rustls' state), which matters with thousands of idle clients.
        return Box::pin(session(rd, wr, PeerCert::None, deadline, slot, ctx)).await;
    };
    Box::pin(serve_tls(stream, acceptor, deadline, slot, ctx)).await;
}

/// The TLS handshake (within the connect deadline), then the session over it.
async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    deadline: Instant,
    slot: HandshakeSlot,
    ctx: Ctx,
) {
    let peer = ctx.peer;
    let accepted = tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        a = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => a,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            bump(&ctx.shared.counters.tls_handshake_failures);
            tracing::warn!(%peer, error = %e, "MQTT TLS handshake failed");
            return;
        }
        Err(_) => {
            bump(&ctx.shared.counters.tls_handshake_failures);
            tracing::warn!(%peer, timeout = ?ctx.shared.settings.connect_timeout,
                "MQTT TLS handshake not finished in time");
            return;
        }
    };
    let cert = PeerCert::from_chain(stream.get_ref().1.peer_certificates());
    let (rd, wr) = tokio::io::split(stream);
    session(rd, wr, cert, deadline, slot, ctx).await;
}

/// What a connection task was started with.
struct Ctx {
    peer: SocketAddr,
    /// The listener's index (its anonymous policy).
    listener: usize,
    shared: Arc<Shared>,
    ingest: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

/// The MQTT part, the same over TCP and over TLS: CONNECT (by `deadline`), login, the session.
async fn session<R, W>(
    mut rd: R,
    mut wr: W,
    cert: PeerCert,
    deadline: Instant,
    slot: HandshakeSlot,
    ctx: Ctx,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Ctx {
        peer,
        listener,
        shared,
        ingest,
        shutdown,
        hard_stop,
    } = ctx;
    let mut read_buf = BytesMut::with_capacity(READ_BUF_MIN);
    // Boxed (like the TLS handshake and the end): what only runs before or after the session
    // does not make every idle connection's task larger.
    let connect = Box::pin(handshake(
        &mut rd,
        &mut wr,
        &mut read_buf,
        peer,
        &shared,
        &shutdown,
        deadline,
    ))
    .await;
    drop(slot);
    let Some(connect) = connect else {
        return;
    };
    let settings = &shared.settings;
    let protocol = connect.protocol;

    // Authentication first: a refused login must not take a connection slot. A verified client
    // certificate is the login (its name the username); the CONNECT's credentials are ignored.
    let auth = shared.auth();
    let username: Option<Arc<str>> = match (&cert, &auth) {
        (PeerCert::Named(name), _) => Some(Arc::from(name.as_str())),
        (PeerCert::Unnamed, _) => {
            bump(&shared.counters.connections_refused);
            bump(&shared.counters.auth_refused);
            tracing::warn!(%peer, client_id = %connect.client_id,
                "MQTT connection refused: its client certificate names no CN or DNS/email SAN");
            refuse(&mut wr, protocol, ConnAckCode::NotAuthorized).await;
            return;
        }
        (PeerCert::None, None) => None,
        (PeerCert::None, Some(auth)) => {
            let (auth, user, pass) = (
                auth.clone(),
                connect.username.clone(),
                connect.password.clone(),
            );
            // PBKDF2 is CPU work (the iteration count is the file's): keep it off the workers.
            let login = tokio::task::spawn_blocking(move || {
                auth.login(
                    listener,
                    user.as_deref(),
                    pass.as_ref().map(outpost_config::Secret::expose),
                )
            })
            .await
            .unwrap_or(Err(LoginRefusal::BadCredentials));
            match login {
                Ok(name) => name,
                Err(refusal) => {
                    bump(&shared.counters.connections_refused);
                    bump(&shared.counters.auth_refused);
                    let code = match refusal {
                        LoginRefusal::BadCredentials => ConnAckCode::BadUsernameOrPassword,
                        LoginRefusal::NotAuthorized => ConnAckCode::NotAuthorized,
                    };
                    tracing::warn!(%peer, client_id = %connect.client_id,
                        username = connect.username.as_deref().unwrap_or(""), ?refusal,
                        "MQTT connection refused: not authenticated");
                    refuse(&mut wr, protocol, code).await;
                    return;
                }
            }
        }
    };

    // Admission: the limit counts connected clients.
    let admitted = shared
        .counters
        .connections_current
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            (usize::try_from(c).unwrap_or(usize::MAX) < settings.max_connections).then_some(c + 1)
        })
        .is_ok();
    if !admitted {
        bump(&shared.counters.connections_refused);
        tracing::warn!(%peer, client_id = %connect.client_id, max = settings.max_connections,
            "MQTT connection refused: max_connections reached");
        refuse(&mut wr, protocol, ConnAckCode::ServerUnavailable).await;
        return;
    }
    let _slot = SlotGuard(&shared);

    let mut assigned = None;
    let client_id: Arc<str> = if connect.client_id.is_empty() {
        if protocol == Protocol::V4 && !connect.clean_start {
            bump(&shared.counters.connections_refused);
            tracing::warn!(%peer, "MQTT connection refused: empty client id with a persistent session");
            refuse(&mut wr, protocol, ConnAckCode::IdentifierRejected).await;
            return;
        }
        let id = format!(
            "outpost-auto-{}",
            shared.next_id.fetch_add(1, Ordering::Relaxed)
        );
        assigned = Some(id.clone());
        Arc::from(id)
    } else {
        Arc::from(connect.client_id.as_str())
    };

    let will = match connect.will.as_ref().map(|w| {
        std::str::from_utf8(&w.topic)
            .map_err(|_| "will topic is not UTF-8".to_string())
            .and_then(|t| TopicName::new(t).map_err(|e| format!("will topic {t:?}: {e}")))
            .map(|t| Will {
                topic: Arc::from(t.into_string()),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                delay: Duration::from_secs(u64::from(w.delay.unwrap_or(0))),
                props: Arc::new(w.props.clone()),
                message_expiry: w
                    .message_expiry
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(u64::from(s))),
            })
    }) {
        None => None,
        Some(Ok(w)) => Some(w),
        Some(Err(why)) => {
            bump(&shared.counters.invalid_topics);
            tracing::warn!(%peer, %client_id, %why, "MQTT connection refused: invalid will");
            return;
        }
    };
    // A will is a publish the client arranges now: refused now if it may not write there (as
    // mosquitto does), rather than dropped silently later.
    if let (Some(w), Some(auth)) = (&will, &auth)
        && !auth.allows(&client_id, username.as_deref(), &w.topic, Access::Write)
    {
        bump(&shared.counters.connections_refused);
        bump(&shared.counters.publishes_denied);
        tracing::warn!(%peer, %client_id, topic = %w.topic,
            "MQTT connection refused: the ACL does not allow its will topic");
        refuse(&mut wr, protocol, ConnAckCode::NotAuthorized).await;
        return;
    }

    // How long the session outlives the connection (zero: not at all). MQTT 5 §3.2.2.3.2:
    // a client that asked for more than the maximum is told the value in force in CONNACK.
    let (session_expiry, announced_expiry) = match protocol {
        Protocol::V4 if connect.clean_start => (Duration::ZERO, None),
        Protocol::V4 => (settings.session_expiry_311, None),
        Protocol::V5 => {
            let asked = connect.session_expiry.unwrap_or(0);
            let granted = capped_session_expiry(asked, settings.max_session_expiry);
            (
                Duration::from_secs(u64::from(granted)),
                (granted != asked).then_some(granted),
            )
        }
    };
    let conn_id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let notify = Arc::new(Notify::new());
    let kick = hard_stop.child_token();
    let inflight_limit = connect.receive_maximum.unwrap_or(u16::MAX).max(1);
    let attached = {
        let mut router = shared.router();
        // Checked and attached under one lock: two new clients cannot both take the last
        // place. A refused client takes over nothing (an old connection of its id stays).
        router
            .session_admitted(&client_id, Some(session_expiry), Instant::now())
            .then(|| {
                router.attach(
                    &client_id,
                    connect.clean_start,
                    Some(session_expiry),
                    inflight_limit,
                    Link {
                        conn_id,
                        notify: notify.clone(),
                        kick: kick.clone(),
                    },
                    username.clone(),
                )
            })
    };
    let Some(attached) = attached else {
        bump(&shared.counters.connections_refused);
        bump(&shared.counters.sessions_refused);
        tracing::warn!(%peer, %client_id, max = settings.max_sessions,
            "MQTT connection refused: it asks for a persistent session and broker.max_sessions \
             are kept already");
        refuse(&mut wr, protocol, ConnAckCode::ServerUnavailable).await;
        return;
    };
    if attached.session_expired {
        bump(&shared.counters.sessions_expired);
    }
    if let Some(w) = attached.ended_will {
        shared.publish_will(&ingest, client_id.clone(), w).await;
    }
    bump(&shared.counters.connections_total);
    tracing::debug!(%peer, %client_id, username = username.as_deref().unwrap_or(""), ?protocol,
        keep_alive = connect.keep_alive,
        clean = connect.clean_start, session_present = attached.session_present, "MQTT client connected");

    // MQTT 5 §3.2.2.3.14: above the configured maximum (or "none", 0) the server's value
    // applies and CONNACK says so. 3.1.1 has no way to say it: its keep-alive is kept.
    let max_keep_alive = shared.max_keep_alive.load(Ordering::Relaxed);
    let server_keep_alive = (protocol == Protocol::V5
        && max_keep_alive > 0
        && (connect.keep_alive == 0 || connect.keep_alive > max_keep_alive))
        .then_some(max_keep_alive);
    let keep_alive_secs = server_keep_alive.unwrap_or(connect.keep_alive);
    let keep_alive =
        (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500));
    let mut conn = Conn {
        shared: shared.clone(),
        ingest,
        peer,
        protocol,
        client_id: client_id.clone(),
        username,
        conn_id,
        rd,
        wr,
        read_buf,
        write_buf: BytesMut::new(),
        pending: VecDeque::new(),
        max_pending: usize::from(settings.max_inbound_pending.max(1)),
        keep_alive,
        deadline: keep_alive.map(|k| Instant::now() + k),
        peer_max_packet: connect
            .max_packet_size
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(usize::MAX),
        kick,
        notify,
        topic_aliases: HashMap::new(),
        read_chunk: READ_BUF_MIN,
        rel_open: HashSet::new(),
        write_gate: None,
        retained_writes: VecDeque::new(),
    };
    // The session a persistent client is told it has is durable first.
    if let Some(t) = attached.persisted
        && let Err(end) = conn.wait_durable(t).await
    {
        Box::pin(conn.finish(end, will)).await;
        return;
    }
    conn.queue(&Outgoing::ConnAck {
        session_present: attached.session_present,
        code: ConnAckCode::Accepted,
        assigned_client_id: assigned,
        receive_maximum: settings.max_inbound_pending.max(1),
        max_packet_size: u32::try_from(settings.max_packet_size).unwrap_or(u32::MAX),
        topic_alias_max: TOPIC_ALIAS_MAX,
        server_keep_alive,
        session_expiry: announced_expiry,
    });
    // What was in flight before goes again through `drain_outbound` (the router woke this
    // connection), within the window this CONNECT set.

    let end = conn.run(&shutdown).await;
    Box::pin(conn.finish(end, will)).await;
}

/// The MQTT 5 session expiry interval (seconds) granted for the one `asked`: at most `max`
/// (in whole seconds, at least one), which 0xFFFFFFFF ("never") also gets: a session that
/// never ends is hostile input on a gateway that runs for years.
fn capped_session_expiry(asked: u32, max: Duration) -> u32 {
    let max = u32::try_from(max.as_secs())
        .unwrap_or(u32::MAX - 1)
        .clamp(1, u32::MAX - 1);
    asked.min(max)
}

/// Reads the CONNECT (by `deadline`) and answers the refusals that need no session.
async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
    deadline: Instant,
) -> Option<Box<ConnectIn>> {
    let settings = &shared.settings;
    loop {
        match codec::read_handshake(buf, settings.max_packet_size) {
            Ok(Some(Handshake::Connect(c))) => return Some(c),
            Ok(Some(Handshake::UnsupportedLevel(level))) => {
                bump(&shared.counters.connections_refused);
                tracing::warn!(%peer, level, "MQTT connection refused: unacceptable protocol version");
                let mut out = BytesMut::new();
                if codec::write_unsupported_protocol(&mut out).is_ok() {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                        let _ = wr.write_all(&out).await;
                        let _ = wr.shutdown().await;
                    })
                    .await;
                }
                return None;
            }
            Ok(Some(Handshake::NotConnect(kind))) => {
                bump(&shared.counters.malformed_packets);
                tracing::warn!(%peer, packet_type = kind, "MQTT connection closed: first packet is not CONNECT");
                return None;
            }
            Err(FrameError::TooLarge { size, max }) => {
                bump(&shared.counters.oversized_packets);
                tracing::warn!(%peer, size, max, "MQTT connection closed: CONNECT too large");
                return None;
            }
            Err(FrameError::Malformed(why)) => {
                bump(&shared.counters.malformed_packets);
                tracing::warn!(%peer, %why, "MQTT connection closed: malformed CONNECT");
                return None;
            }
            Ok(None) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep_until(deadline) => {
                bump(&shared.counters.connections_refused);
                tracing::warn!(%peer, timeout = ?settings.connect_timeout,
                    "MQTT connection closed: no CONNECT in time");
                return None;
            }
            r = rd.read_buf(buf) => match r {
                Ok(0) => {
                    tracing::debug!(%peer, "MQTT peer closed before CONNECT");
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "MQTT read failed before CONNECT");
                    return None;
                }
            }
        }
    }
}

/// Writes a refusing CONNACK and lets the socket close.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, protocol: Protocol, code: ConnAckCode) {
    let mut out = BytesMut::new();
    let connack = Outgoing::ConnAck {
        session_present: false,
        code,
        assigned_client_id: None,
        receive_maximum: 0,
        max_packet_size: 0,
        topic_alias_max: 0,
        server_keep_alive: None,
        session_expiry: None,
    };
    if codec::write_packet(protocol, &connack, &mut out, usize::MAX).is_ok() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
        })
        .await;
    }
}

/// What the message at the front of the queue waited for.
enum Front {
    /// The gateway's reply.
    Reply(Result<IngestReply, oneshot::error::RecvError>),
    /// The session state it changed is durable (or why not).
    Durable(Result<(), String>),
}

impl Pending {
    fn waits(&self) -> bool {
        self.wait.is_some() || self.durable.is_some()
    }
}

/// Waits for what the front of the queue waits for (acks leave in order, so only the front
/// matters). Never resolves when the front needs nothing or the queue is empty.
async fn front_reply(pending: &mut VecDeque<Pending>) -> Front {
    match pending.front_mut() {
        Some(Pending { wait: Some(rx), .. }) => Front::Reply(rx.await),
        Some(Pending {
            durable: Some(t), ..
        }) => Front::Durable(
            t.await
                .unwrap_or_else(|_| Err("the session state writer is gone".into())),
        ),
        _ => std::future::pending().await,
    }
}

/// Waits for the oldest QoS 0 state write to be durable (never resolves when there is none).
async fn front_write(writes: &mut VecDeque<Ticket>) -> Result<(), String> {
    match writes.front_mut() {
        Some(t) => t
            .await
            .unwrap_or_else(|_| Err("the session state writer is gone".into())),
        None => std::future::pending().await,
    }
}

/// The state of an established connection (`Rd`, `Wr`: the halves of a TCP or TLS stream).
struct Conn<Rd, Wr> {
    shared: Arc<Shared>,
    ingest: mpsc::Sender<Inbound>,
    peer: SocketAddr,
    protocol: Protocol,
    client_id: Arc<str>,
    /// The verified login; `None` for an anonymous client (ACL checks).
    username: Option<Arc<str>>,
    /// Identifies this connection to the router (a takeover gets a new id).
    conn_id: u64,
    rd: Rd,
    wr: Wr,
    read_buf: BytesMut,
    /// Packets encoded but not yet written; flushed once per loop turn.
    write_buf: BytesMut,
    /// Inbound QoS 1/2 publishes awaiting their ack, in arrival order.
    pending: VecDeque<Pending>,
    max_pending: usize,
    /// 1.5x the client's keep-alive; `None` for keep-alive 0 (no timeout).
    keep_alive: Option<Duration>,
    deadline: Option<Instant>,
    /// MQTT 5: the largest packet the client accepts; larger messages are not sent to it.
    peer_max_packet: usize,
    /// Cancelled on takeover; a child of the broker's hard stop.
    kick: CancellationToken,
    /// Woken by the router when the session has messages to send.
    notify: Arc<Notify>,
    /// MQTT 5 topic aliases the client set on this connection (at most `TOPIC_ALIAS_MAX`;
    /// they die with the connection, MQTT 5 §3.3.2.3.4).
    topic_aliases: HashMap<u16, Arc<str>>,
    /// How much room to make in `read_buf` before a read (see `run`).
    read_chunk: usize,
    /// Inbound QoS 2 ids PUBREC'd on this connection and not yet released (they count against
    /// the MQTT 5 receive maximum until PUBCOMP).
    rel_open: HashSet<u16>,
    /// The persisted session's record of what `write_buf` sends (a message's packet id and
    /// handshake state) becoming durable: the buffer is written after it, so a message a
    /// client received is resent with the same packet id after a crash.
    write_gate: Option<Ticket>,
    /// The state writes of QoS 0 publishes (retained ones change the retained store) not yet
    /// durable, oldest first. Nothing waits for them, but at `max_pending` the connection
    /// stops reading until the oldest is: the router's channel to the store is unbounded,
    /// and a client flooding QoS 0 retained messages must not grow it without end.
    retained_writes: VecDeque<Ticket>,
}

impl<Rd: AsyncRead + Unpin, Wr: AsyncWrite + Unpin> Conn<Rd, Wr> {
    async fn run(&mut self, shutdown: &CancellationToken) -> End {
        let mut draining = false;
        loop {
            // Both boxed, and only entered with work to do: their futures are large, and
            // inline they would make every idle connection's task as large.
            if !draining
                && !self.read_buf.is_empty()
                && let Err(end) = Box::pin(self.process_buffer()).await
            {
                return end;
            }
            self.resolve_ready();
            self.ack_ready();
            if !self.write_buf.is_empty()
                && let Err(end) = Box::pin(self.flush()).await
            {
                return end;
            }
            if draining && self.pending.is_empty() {
                return End::Shutdown;
            }
            let can_read = !draining && self.may_read();
            let deadline = self.deadline.filter(|_| can_read);
            let front_waits = self.pending.front().is_some_and(Pending::waits);
            let writes_run = !self.retained_writes.is_empty();
            // Room to read into: small while the client is quiet, doubled (up to
            // READ_BUF_MAX) each time a read fills it, so a busy publisher gets big reads.
            if can_read && self.read_buf.capacity() - self.read_buf.len() < self.read_chunk / 2 {
                self.read_buf.reserve(self.read_chunk);
            }
            let spare = self.read_buf.capacity() - self.read_buf.len();
            tokio::select! {
                _ = self.kick.cancelled() => return End::Takeover,
                _ = shutdown.cancelled(), if !draining => draining = true,
                front = front_reply(&mut self.pending), if front_waits => {
                    if let Some(p) = self.pending.pop_front() {
                        self.touch();
                        match front {
                            Front::Reply(reply) => if let Err(end) = self.resolve(p, reply) {
                                return end;
                            },
                            Front::Durable(result) => {
                                if let Err(why) = result {
                                    self.state_write_failed(&why);
                                }
                                self.queue_ack(p.pkid, p.qos, AckReason::Success);
                            }
                        }
                    }
                }
                written = front_write(&mut self.retained_writes), if writes_run => {
                    self.retained_writes.pop_front();
                    if let Err(why) = written {
                        self.state_write_failed(&why);
                    }
                }
                r = self.rd.read_buf(&mut self.read_buf), if can_read => match r {
                    Ok(0) => return End::PeerClosed,
                    Ok(n) => if n >= spare {
                        self.read_chunk = (self.read_chunk * 2).min(READ_BUF_MAX);
                    },
                    Err(e) => return End::Io(e.to_string()),
                },
                _ = self.notify.notified() => self.drain_outbound(),
                _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } },
                    if deadline.is_some() => return End::KeepAlive,
            }
        }
    }

    /// Whether to read (and handle) more packets. MQTT 3.1.1 has no receive maximum: at the
    /// bound the connection stops reading (backpressure). An MQTT 5 client was told the bound
    /// and is held to it (`on_publish`). Either stops while `max_pending` QoS 0 state writes
    /// are not yet durable.
    fn may_read(&self) -> bool {
        (self.protocol == Protocol::V5 || self.pending.len() < self.max_pending)
            && self.retained_writes.len() < self.max_pending
    }

    fn touch(&mut self) {
        if let Some(k) = self.keep_alive {
            self.deadline = Some(Instant::now() + k);
        }
    }

    /// Handles every complete packet in the read buffer, stopping at the pending bound.
    async fn process_buffer(&mut self) -> Result<(), End> {
        while self.may_read() {
            let packet = codec::read_packet(
                self.protocol,
                &mut self.read_buf,
                self.shared.settings.max_packet_size,
            )
            .map_err(|e| match e {
                FrameError::TooLarge { size, max } => End::Oversized { size, max },
                FrameError::Malformed(why) => End::Malformed(why),
            })?;
            let Some(packet) = packet else {
                return Ok(());
            };
            self.touch();
            self.handle(packet).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, packet: Incoming) -> Result<(), End> {
        match packet {
            Incoming::Publish(p) => self.on_publish(p).await?,
            Incoming::PubAck(pkid) => {
                let known = self.with_session(|s| s.outbound.on_puback(pkid));
                if known != Some(true) {
                    tracing::debug!(peer = %self.peer, client_id = %self.client_id, pkid, "PUBACK for unknown packet id");
                }
                self.drain_outbound();
            }
            Incoming::PubRec(pkid) => {
                self.with_session(|s| s.outbound.on_pubrec(pkid));
                self.queue(&Outgoing::PubRel { pkid });
            }
            Incoming::PubComp(pkid) => {
                self.with_session(|s| s.outbound.on_pubcomp(pkid));
                self.drain_outbound();
            }
            Incoming::PubRel(pkid) => {
                self.rel_open.remove(&pkid);
                self.with_session(|s| s.released(pkid));
                self.queue(&Outgoing::PubComp { pkid });
            }
            Incoming::Subscribe { pkid, filters, id } => {
                self.on_subscribe(pkid, filters, id).await?
            }
            Incoming::Unsubscribe { pkid, filters } => {
                let existed = self
                    .with_session(|s| filters.iter().map(|f| s.unsubscribe(f)).collect())
                    .unwrap_or_else(|| vec![false; filters.len()]);
                self.queue(&Outgoing::UnsubAck { pkid, existed });
            }
            Incoming::PingReq => self.queue(&Outgoing::PingResp),
            Incoming::Disconnect {
                with_will,
                session_expiry: expiry,
            } => {
                if let Some(seconds) = expiry {
                    self.on_disconnect_session_expiry(seconds);
                }
                return Err(End::Disconnect { with_will });
            }
            Incoming::Connect => return Err(End::ProtocolViolation("second CONNECT")),
            Incoming::Unexpected(kind) => return Err(End::ProtocolViolation(kind)),
        }
        Ok(())
    }

    async fn on_publish(&mut self, p: PublishIn) -> Result<(), End> {
        // MQTT 5 §3.3.4: a client may have at most our receive maximum of QoS 1/2 publishes
        // without PUBACK / PUBCOMP from us; one more is a protocol error (0x93). A resend of
        // an id already counted is not one more.
        if self.protocol == Protocol::V5 && p.qos != QoS::AtMostOnce {
            let again =
                self.pending.iter().any(|q| q.pkid == p.pkid) || self.rel_open.contains(&p.pkid);
            let unacked = self.pending.len() + self.rel_open.len();
            if !again && unacked >= self.max_pending {
                return Err(End::ReceiveMaximumExceeded(unacked));
            }
        }
        let topic = match p.topic_alias {
            Some(alias) if alias == 0 || alias > TOPIC_ALIAS_MAX => {
                return Err(End::TopicAliasInvalid(alias));
            }
            // An alias with an empty topic stands for the topic set earlier.
            Some(alias) if p.topic.is_empty() => match self.topic_aliases.get(&alias) {
                Some(t) => t.to_string(),
                None => return Err(End::ProtocolViolation("topic alias not set")),
            },
            _ => {
                let topic = match std::str::from_utf8(&p.topic) {
                    Ok(t) => TopicName::new(t).map_err(|e| format!("{t:?}: {e}")),
                    Err(_) => Err("topic is not UTF-8".to_string()),
                };
                match topic {
                    Ok(t) => t.into_string(),
                    Err(why) => {
                        bump(&self.shared.counters.invalid_topics);
                        return Err(End::InvalidTopic(why));
                    }
                }
            }
        };
        if let Some(alias) = p.topic_alias {
            // Set or replaced by a publish that names the topic (bounded: alias <= max).
            self.topic_aliases.insert(alias, Arc::from(topic.as_str()));
        }
        bump(&self.shared.counters.publishes_received);
        if let Some(auth) = self.shared.auth()
            && !auth.allows(
                &self.client_id,
                self.username.as_deref(),
                &topic,
                Access::Write,
            )
        {
            bump(&self.shared.counters.publishes_denied);
            tracing::warn!(peer = %self.peer, client_id = %self.client_id, %topic, qos = ?p.qos,
                "publish refused by the ACL, dropped");
            if p.qos != QoS::AtMostOnce {
                // MQTT 5 says why; 3.1.1 has no negative ack: acknowledged and dropped, as
                // mosquitto does (closing would only make the client send it again). Queued
                // behind the acks still pending, which leave in arrival order.
                let reason = match self.protocol {
                    Protocol::V5 => AckReason::NotAuthorized,
                    Protocol::V4 => AckReason::Success,
                };
                self.pending.push_back(Pending {
                    pkid: p.pkid,
                    qos: p.qos,
                    wait: None,
                    durable: None,
                    reason,
                    message: None,
                });
            }
            return Ok(());
        }
        let now = Instant::now();
        // Interval 0 is read as "no expiry", as mosquitto does.
        let expires_at = p
            .message_expiry
            .filter(|s| *s > 0)
            .map(|s| now + Duration::from_secs(u64::from(s)));
        let publication = Publication {
            topic: Arc::from(topic.as_str()),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            props: Arc::new(p.props),
            expires_at,
        };
        match p.qos {
            QoS::AtMostOnce => {
                let inbound = Inbound {
                    client_id: self.client_id.clone(),
                    topic,
                    payload: p.payload.clone(),
                    qos: p.qos,
                    retain: p.retain,
                    source: Source::Mqtt,
                    content_format: None,
                    reply: None,
                };
                if !self.hand_over(inbound).await? {
                    tracing::warn!(peer = %self.peer, client_id = %self.client_id,
                        "ingest channel closed, QoS 0 message not stored");
                }
                // QoS 0 has no ack to hold back: delivered now, not after its state write
                // (a retained one's) is durable. But at most `max_pending` such writes run
                // ahead of the store per connection (see `retained_writes`).
                if let Some(t) = self.shared.route(&publication, Some(&self.client_id)) {
                    self.retained_writes.push_back(t);
                }
            }
            QoS::AtLeastOnce | QoS::ExactlyOnce => {
                if p.qos == QoS::ExactlyOnce && self.is_qos2_duplicate(p.pkid) {
                    self.pending.push_back(Pending {
                        pkid: p.pkid,
                        qos: p.qos,
                        wait: None,
                        durable: None,
                        reason: AckReason::Success,
                        message: None,
                    });
                    return Ok(());
                }
                if p.retain && !p.payload.is_empty() && self.retained_refused(&publication) {
                    // MQTT 5 says why, before anything is stored (the reading too: it is
                    // refused whole, and the client may send it again without retain).
                    // 3.1.1 cannot: its message goes on, delivered and not retained.
                    self.pending.push_back(Pending {
                        pkid: p.pkid,
                        qos: p.qos,
                        wait: None,
                        durable: None,
                        reason: AckReason::QuotaExceeded,
                        message: None,
                    });
                    return Ok(());
                }
                let (tx, rx) = oneshot::channel();
                let inbound = Inbound {
                    client_id: self.client_id.clone(),
                    topic,
                    payload: p.payload.clone(),
                    qos: p.qos,
                    retain: p.retain,
                    source: Source::Mqtt,
                    content_format: None,
                    reply: Some(tx),
                };
                // If the channel is closed the sender is dropped with it, and `rx` resolves as
                // a refusal: no ack for what was not stored.
                self.hand_over(inbound).await?;
                self.pending.push_back(Pending {
                    pkid: p.pkid,
                    qos: p.qos,
                    wait: Some(rx),
                    durable: None,
                    reason: AckReason::Success,
                    message: Some(publication),
                });
            }
        }
        Ok(())
    }

    /// Whether an MQTT 5 QoS 1/2 retained publish is refused now because the retained store
    /// has no room for it (counted, logged). Always false for 3.1.1, which has no negative
    /// ack: its retained publishes are stored and delivered, and not retained when routing
    /// finds no room.
    fn retained_refused(&self, publication: &Publication) -> bool {
        if self.protocol != Protocol::V5 {
            return false;
        }
        let (fits, expired) = self.shared.router().retained_fits(
            &publication.topic,
            publication.retained_size(),
            Instant::now(),
        );
        if expired > 0 {
            self.shared
                .counters
                .messages_expired
                .fetch_add(expired, Ordering::Relaxed);
        }
        if !fits {
            bump(&self.shared.counters.retained_refused);
            tracing::warn!(peer = %self.peer, client_id = %self.client_id,
                topic = %publication.topic, qos = ?publication.qos,
                "retained publish refused (0x97): the retained store is at broker.max_retained \
                 or max_retained_bytes");
        }
        !fits
    }

    /// A QoS 2 publish whose id is already being handled or awaiting PUBREL.
    fn is_qos2_duplicate(&mut self, pkid: u16) -> bool {
        self.pending
            .iter()
            .any(|q| q.qos == QoS::ExactlyOnce && q.pkid == pkid)
            || self.with_session(|s| s.awaiting_rel.contains(&pkid)) == Some(true)
    }

    /// Sends to the gateway; the bounded channel is the backpressure. `Ok(false)`: channel closed.
    async fn hand_over(&self, inbound: Inbound) -> Result<bool, End> {
        tokio::select! {
            r = self.ingest.send(inbound) => Ok(r.is_ok()),
            _ = self.kick.cancelled() => Err(End::Takeover),
        }
    }

    /// Acks for the messages at the front that need no reply (duplicates, ACL refusals).
    fn ack_ready(&mut self) {
        while self.pending.front().is_some_and(|p| !p.waits()) {
            if let Some(p) = self.pending.pop_front() {
                self.queue_ack(p.pkid, p.qos, p.reason);
            }
        }
    }

    /// The gateway stored the message `pkid`: it goes to local subscribers (a QoS 2 id now
    /// awaits PUBREL). Returns what its ack must wait for: the persisted sessions (and
    /// retained store) it changed becoming durable.
    fn accepted(&mut self, pkid: u16, qos: QoS, message: Option<&Publication>) -> Option<Ticket> {
        let mut durable = None;
        if qos == QoS::ExactlyOnce {
            durable = self
                .shared
                .router()
                .with_session_durable(&self.client_id, self.conn_id, |s| s.await_rel(pkid))
                .and_then(|(_, t)| t);
        }
        if let Some(publication) = message {
            // Batches become durable in order: the later ticket covers both.
            durable = self
                .shared
                .route(publication, Some(&self.client_id))
                .or(durable);
        }
        durable
    }

    /// Handles the gateway's replies that have already arrived for the messages behind the
    /// front, in arrival order up to the first still unanswered: accepted ones are routed now,
    /// so that their session writes are gathered into the same commits instead of waiting,
    /// one by one, to reach the front. Their acks still leave in order (`ack_ready`). A
    /// refusal is left for the front, which decides what it does to the connection.
    fn resolve_ready(&mut self) {
        for i in 0..self.pending.len() {
            let Some(rx) = self.pending[i].wait.as_mut() else {
                continue;
            };
            match rx.try_recv() {
                Ok(Ok(())) => {
                    let entry = &mut self.pending[i];
                    entry.wait = None;
                    let (pkid, qos, message) = (entry.pkid, entry.qos, entry.message.take());
                    let durable = self.accepted(pkid, qos, message.as_ref());
                    let entry = &mut self.pending[i];
                    entry.durable = durable;
                    entry.reason = AckReason::Success;
                }
                Ok(Err(refusal)) => {
                    // Put back for the front to handle.
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Err(refusal));
                    self.pending[i].wait = Some(rx);
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// The gateway answered for the front message.
    fn resolve(
        &mut self,
        p: Pending,
        reply: Result<IngestReply, oneshot::error::RecvError>,
    ) -> Result<(), End> {
        let reply = reply.unwrap_or(Err(IngestRefusal::StoreUnavailable));
        match reply {
            Ok(()) => {
                let durable = self.accepted(p.pkid, p.qos, p.message.as_ref());
                match durable {
                    // Acked once what the message changed in persisted sessions is durable.
                    Some(t) => self.pending.push_front(Pending {
                        durable: Some(t),
                        wait: None,
                        message: None,
                        ..p
                    }),
                    None => self.queue_ack(p.pkid, p.qos, AckReason::Success),
                }
                Ok(())
            }
            Err(refusal) => {
                bump(&self.shared.counters.ingest_refused);
                let topic = p.message.as_ref().map(|m| m.topic.clone());
                tracing::warn!(peer = %self.peer, client_id = %self.client_id, ?topic, pkid = p.pkid,
                    ?refusal, "publish refused by the gateway");
                match self.protocol {
                    // A payload the gateway could not decode was kept as a dead letter: sending
                    // it again cannot help, and 3.1.1 has no reason codes, so it is acknowledged
                    // (closing would make the client resend the same bytes forever).
                    Protocol::V4
                        if matches!(
                            refusal,
                            IngestRefusal::PayloadInvalid(_) | IngestRefusal::UnsupportedFormat
                        ) =>
                    {
                        self.queue_ack(p.pkid, p.qos, AckReason::Success);
                        Ok(())
                    }
                    Protocol::V4 => Err(End::Refused(refusal)),
                    Protocol::V5 => {
                        let reason = match refusal {
                            IngestRefusal::QuotaExceeded | IngestRefusal::TooLarge => {
                                AckReason::QuotaExceeded
                            }
                            IngestRefusal::StoreUnavailable => AckReason::Unspecified,
                            IngestRefusal::PayloadInvalid(_) | IngestRefusal::UnsupportedFormat => {
                                AckReason::PayloadFormatInvalid
                            }
                        };
                        self.queue_ack(p.pkid, p.qos, reason);
                        Ok(())
                    }
                }
            }
        }
    }

    fn queue_ack(&mut self, pkid: u16, qos: QoS, reason: AckReason) {
        match qos {
            QoS::AtLeastOnce => self.queue(&Outgoing::PubAck { pkid, reason }),
            QoS::ExactlyOnce => {
                // Until PUBCOMP it still counts against the receive maximum.
                if reason == AckReason::Success {
                    self.rel_open.insert(pkid);
                }
                self.queue(&Outgoing::PubRec { pkid, reason })
            }
            QoS::AtMostOnce => {}
        }
    }

    async fn on_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubscriptionRequest>,
        id: Option<u32>,
    ) -> Result<(), End> {
        if filters.is_empty() {
            return Err(End::ProtocolViolation("SUBSCRIBE without filters"));
        }
        if id == Some(0) {
            return Err(End::ProtocolViolation("subscription identifier 0"));
        }
        let mut codes = Vec::with_capacity(filters.len());
        let mut subs = Vec::with_capacity(filters.len());
        let auth = self.shared.auth();
        for req in filters {
            // 3.1.1 has no shared subscriptions: `$share/...` is an ordinary filter there.
            let split = match self.protocol {
                Protocol::V5 => split_shared(&req.filter),
                Protocol::V4 => Ok(None),
            };
            let (share, filter_text) = match split {
                Ok(None) => (None, req.filter.as_str()),
                Ok(Some((group, f))) => {
                    // MQTT 5 §3.8.3.1: no-local on a shared subscription is a protocol error.
                    if req.no_local {
                        return Err(End::ProtocolViolation("no-local on a shared subscription"));
                    }
                    (Some(Arc::<str>::from(group)), f)
                }
                Err(why) => {
                    tracing::warn!(peer = %self.peer, client_id = %self.client_id,
                        filter = %req.filter, why, "subscription refused: invalid shared subscription");
                    codes.push(SubAckCode::InvalidFilter);
                    continue;
                }
            };
            match TopicFilter::new(filter_text) {
                Ok(filter)
                    if auth.as_ref().is_some_and(|a| {
                        !a.allows_subscribe(
                            &self.client_id,
                            self.username.as_deref(),
                            filter.as_str(),
                        )
                    }) =>
                {
                    bump(&self.shared.counters.subscriptions_denied);
                    tracing::warn!(peer = %self.peer, client_id = %self.client_id,
                        filter = %req.filter, "subscription refused by the ACL");
                    codes.push(SubAckCode::NotAuthorized);
                }
                Ok(filter) => {
                    codes.push(SubAckCode::Granted(req.qos));
                    subs.push((
                        Subscription {
                            filter,
                            qos: req.qos,
                            no_local: req.no_local,
                            retain_as_published: req.retain_as_published,
                            id,
                            share,
                        },
                        req.retain_handling,
                    ));
                }
                Err(e) => {
                    tracing::warn!(peer = %self.peer, client_id = %self.client_id,
                        filter = %req.filter, error = %e, "subscription refused: invalid filter");
                    codes.push(SubAckCode::InvalidFilter);
                }
            }
        }
        let (_, routed, durable) = self.shared.router().subscribe(
            &self.client_id,
            self.conn_id,
            subs,
            auth.as_deref(),
            Instant::now(),
        );
        self.shared.count(routed, "(retained messages)");
        // A granted subscription of a persistent session is durable before SUBACK says so.
        if let Some(t) = durable {
            self.wait_durable(t).await?;
        }
        // SUBACK first, then the retained messages the subscription selected.
        self.queue(&Outgoing::SubAck { pkid, codes });
        self.drain_outbound();
        Ok(())
    }

    /// An MQTT 5 DISCONNECT sets a new session expiry interval. A session that had none
    /// (CONNECT said 0) cannot be given one now (§3.14.2.2.2: a protocol error, here ignored
    /// as the connection is closing anyway).
    fn on_disconnect_session_expiry(&mut self, seconds: u32) {
        let persistent = self.with_session(|s| s.persistent).unwrap_or(false);
        if !persistent && seconds > 0 {
            tracing::debug!(peer = %self.peer, client_id = %self.client_id, seconds,
                "DISCONNECT sets a session expiry on a session that had none: ignored");
            return;
        }
        let granted = capped_session_expiry(seconds, self.shared.settings.max_session_expiry);
        self.shared.router().set_session_expiry(
            &self.client_id,
            self.conn_id,
            Some(Duration::from_secs(u64::from(granted))),
        );
    }

    /// Waits until session state is durable; a failure is logged and counted, and the client
    /// is answered anyway (its messages are in the store; only the session copy is at risk).
    async fn wait_durable(&self, ticket: Ticket) -> Result<(), End> {
        let result = tokio::select! {
            r = ticket => r.unwrap_or_else(|_| Err("the session state writer is gone".into())),
            _ = self.kick.cancelled() => return Err(End::Takeover),
        };
        if let Err(why) = result {
            self.state_write_failed(&why);
        }
        Ok(())
    }

    fn state_write_failed(&self, why: &str) {
        bump(&self.shared.counters.state_write_failures);
        tracing::error!(peer = %self.peer, client_id = %self.client_id, %why,
            "MQTT session state could not be made durable; it may not survive a restart");
    }

    fn with_session<R>(&self, f: impl FnOnce(&mut super::session::Session) -> R) -> Option<R> {
        self.shared
            .router()
            .with_session(&self.client_id, self.conn_id, f)
    }

    /// Moves whatever the session may send now into the write buffer.
    fn drain_outbound(&mut self) {
        loop {
            let (next, expired) = match self.shared.router().with_session_durable(
                &self.client_id,
                self.conn_id,
                |s| {
                    let next = s.outbound.next_send(Instant::now());
                    (next, s.outbound.take_expired())
                },
            ) {
                Some((r, gate)) => {
                    // Batches become durable in order: the latest covers the earlier ones.
                    if gate.is_some() {
                        self.write_gate = gate;
                    }
                    r
                }
                None => (None, 0),
            };
            if expired > 0 {
                self.shared
                    .counters
                    .messages_expired
                    .fetch_add(expired, Ordering::Relaxed);
                tracing::debug!(peer = %self.peer, client_id = %self.client_id, expired,
                    "queued messages dropped: their message expiry interval ran out");
            }
            let Some(send) = next else {
                return;
            };
            self.queue_send(send);
        }
    }

    fn queue_send(&mut self, send: Send) {
        match send {
            Send::Publish { msg, pkid, dup } => {
                let packet = Outgoing::Publish {
                    topic: msg.topic.clone(),
                    payload: msg.payload.clone(),
                    qos: msg.qos,
                    retain: msg.retain,
                    dup,
                    pkid,
                    message_expiry: msg.expiry_left(Instant::now()),
                    props: msg.props,
                    subscription_ids: msg.subscription_ids,
                };
                if self.try_queue(&packet) {
                    if !dup {
                        bump(&self.shared.counters.publishes_delivered);
                    }
                } else if pkid != 0 {
                    // Cannot ever be written to this client (over its maximum packet size).
                    self.with_session(|s| s.outbound.abandon(pkid));
                }
            }
            Send::PubRel(pkid) => {
                self.queue(&Outgoing::PubRel { pkid });
            }
        }
    }

    /// Encodes a packet into the write buffer (a failure is logged in `try_queue`).
    fn queue(&mut self, packet: &Outgoing) {
        self.try_queue(packet);
    }

    /// Encodes a packet into the write buffer; false (and logged) if it cannot be encoded.
    fn try_queue(&mut self, packet: &Outgoing) -> bool {
        match codec::write_packet(
            self.protocol,
            packet,
            &mut self.write_buf,
            self.peer_max_packet,
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(peer = %self.peer, client_id = %self.client_id, error = %e,
                    "packet not sent to client");
                false
            }
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        if let Some(gate) = self.write_gate.take() {
            self.wait_durable(gate).await?;
        }
        let buf = self.write_buf.split().freeze();
        let wr = &mut self.wr;
        // The flush matters for TLS: rustls may hold the end of the records until then.
        let write = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        };
        tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, write) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(End::Io(e.to_string())),
                Err(_) => Err(End::Io(format!("write stalled for {WRITE_TIMEOUT:?}"))),
            },
            _ = self.kick.cancelled() => Err(End::Takeover),
        }
    }

    /// Logs and counts the end, tells an MQTT 5 client why, publishes the will if due, and
    /// releases the session.
    async fn finish(mut self, end: End, will: Option<Will>) {
        // A kick while the broker shuts down is the shutdown, not a takeover.
        let end = match end {
            End::Takeover if self.kick.is_cancelled() && !self.shared_kick_is_takeover() => {
                End::Shutdown
            }
            other => other,
        };
        let counters = &self.shared.counters;
        let (peer, client_id) = (self.peer, self.client_id.clone());
        match &end {
            End::Disconnect { .. } => {
                tracing::debug!(%peer, %client_id, "MQTT client disconnected")
            }
            End::PeerClosed => {
                tracing::info!(%peer, %client_id, "MQTT connection closed by peer without DISCONNECT")
            }
            End::Io(e) => tracing::info!(%peer, %client_id, error = %e, "MQTT connection failed"),
            End::KeepAlive => {
                bump(&counters.keepalive_timeouts);
                tracing::warn!(%peer, %client_id, "MQTT connection closed: keep-alive expired");
            }
            End::Takeover => {
                tracing::info!(%peer, %client_id, "MQTT session taken over by a new connection")
            }
            End::Malformed(why) => {
                bump(&counters.malformed_packets);
                tracing::warn!(%peer, %client_id, %why, "MQTT connection closed: malformed packet");
            }
            End::Oversized { size, max } => {
                bump(&counters.oversized_packets);
                tracing::warn!(%peer, %client_id, size, max, "MQTT connection closed: packet too large");
            }
            End::InvalidTopic(why) => {
                tracing::warn!(%peer, %client_id, %why, "MQTT connection closed: invalid topic name");
            }
            End::ReceiveMaximumExceeded(unacked) => {
                bump(&counters.malformed_packets);
                tracing::warn!(%peer, %client_id, unacked, max = self.max_pending,
                    "MQTT connection closed: receive maximum exceeded");
            }
            End::TopicAliasInvalid(alias) => {
                bump(&counters.malformed_packets);
                tracing::warn!(%peer, %client_id, alias, max = TOPIC_ALIAS_MAX,
                    "MQTT connection closed: invalid topic alias");
            }
            End::ProtocolViolation(what) => {
                bump(&counters.malformed_packets);
                tracing::warn!(%peer, %client_id, what, "MQTT connection closed: protocol violation");
            }
            End::Refused(r) => tracing::warn!(%peer, %client_id, refusal = ?r,
                "MQTT 3.1.1 connection closed without ack: gateway refused a publish"),
            End::Shutdown => {
                tracing::debug!(%peer, %client_id, "MQTT connection closed for shutdown")
            }
        }
        if self.protocol == Protocol::V5
            && let Some(reason) = end.v5_reason()
        {
            self.queue(&Outgoing::Disconnect { reason });
        }
        let buf = self.write_buf.split().freeze();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if !buf.is_empty() {
                let _ = self.wr.write_all(&buf).await;
            }
            let _ = self.wr.shutdown().await;
        })
        .await;
        // Checked at CONNECT; checked again in case the policy was reloaded since.
        let will = will.filter(|_| end.publishes_will()).filter(|w| {
            let allowed = self.shared.auth().is_none_or(|a| {
                a.allows(
                    &self.client_id,
                    self.username.as_deref(),
                    &w.topic,
                    Access::Write,
                )
            });
            if !allowed {
                bump(&self.shared.counters.publishes_denied);
                tracing::warn!(%peer, %client_id, topic = %w.topic, "will refused by the ACL, dropped");
            }
            allowed
        });
        let now = Instant::now();
        let due = self.shared.router().detach(
            &self.client_id,
            self.conn_id,
            now,
            will.map(|w| (w.publication(now + w.delay), w.delay)),
        );
        if let Some(w) = due {
            self.shared
                .publish_will(&self.ingest, self.client_id.clone(), w)
                .await;
        }
    }

    /// True when our kick token was cancelled by a takeover rather than by the broker's hard
    /// stop (the kick is a child of the hard stop, so both look the same from the child).
    fn shared_kick_is_takeover(&self) -> bool {
        self.shared
            .router()
            .with_session(&self.client_id, self.conn_id, |_| ())
            .is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt5_session_expiry_is_capped_and_never_means_the_maximum() {
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(capped_session_expiry(0, week), 0);
        assert_eq!(capped_session_expiry(3600, week), 3600);
        assert_eq!(capped_session_expiry(700_000, week), 604_800);
        assert_eq!(capped_session_expiry(u32::MAX, week), 604_800);
        // A maximum that does not fit the interval still never grants "never"; nor does one
        // under a second grant "none".
        assert_eq!(
            capped_session_expiry(u32::MAX, Duration::from_secs(u64::MAX)),
            u32::MAX - 1
        );
        assert_eq!(capped_session_expiry(10, Duration::from_millis(10)), 1);
    }
}
