//! Sync: drains the store to the upstream broker, deleting a record only after the upstream
//! acknowledged it.
//!
//! SQLite is the source of truth, not the MQTT client's memory. Each connection attempt gets a
//! fresh rumqttc event loop, so rumqttc never retransmits on its own (it would silently drop its
//! unacked publishes on a reconnect without session anyway); instead, after every (re)connect the
//! read cursors start from zero and everything still in the store is sent again, in order.
//! Duplicates are possible (at-least-once); each record carries its `seq` (MQTT 5 user property)
//! so a consumer can drop them.
//!
//! rumqttc's `publish()` does not return the packet id, so records are correlated by order: the
//! record's seq goes onto a FIFO just before it is handed to the client, is popped when the event
//! loop reports `Outgoing::Publish(pkid)` (a pkid that is already mapped is a retransmission and
//! does not pop), and the record is deleted when `PubAck(pkid)` arrives.
//!
//! At most `inflight_window` records are between "handed to the client" and "acked". Which record
//! goes next is decided by priority: high before normal before low, so fresh high-priority readings
//! are not stuck behind hours of low-priority backlog; within a class, in seq order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_config::{MqttVersion, SyncConfig, UpstreamConfig};
use outpost_protocols::{BrokerHandle, QoS as LocalQoS};
use outpost_storage::{Priority, Record, Store, StoreStats};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::lifecycle::{self, Heartbeat, NodeIdentity, Topics};
use crate::metrics::{Metrics, UplinkState, get, inc, now_ms};
use crate::route::Router;

/// How long a stopping sync keeps the connection to collect PUBACKs for what is in flight.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Bound of the channel that carries acked seqs to the store-writing task.
const ACK_CHANNEL: usize = 65_536;
/// Most acked seqs deleted in one store write.
const ACK_BATCH: usize = 8192;
/// Longest wait for more acks before deleting what was gathered.
const ACK_GATHER: Duration = Duration::from_millis(20);

/// What the upstream event loop told us, independent of the MQTT version.
#[derive(Debug)]
enum UpEvent {
    Connected {
        session_present: bool,
    },
    OutgoingPublish(u16),
    PubAck {
        pkid: u16,
        failure: Option<String>,
    },
    Command {
        topic: String,
        payload: Bytes,
        qos: LocalQoS,
        retain: bool,
    },
    Other,
}

/// The client half, for either protocol version.
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event-loop half, for either protocol version.
enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V4(_) => "Client::V4",
            Self::V5(_) => "Client::V5",
        })
    }
}

impl Client {
    /// Publishes at QoS 1. `meta` (seq, ingest time) becomes MQTT 5 user properties; with 3.1.1
    /// it is dropped (the README says what that loses).
    fn publish(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
        meta: Option<(u64, u64)>,
    ) -> Result<(), String> {
        match self {
            Self::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
            Self::V5(c) => {
                let mut props = rumqttc::v5::mqttbytes::v5::PublishProperties::default();
                if let Some((seq, ingested_at_ms)) = meta {
                    props.user_properties = vec![
                        ("seq".to_owned(), seq.to_string()),
                        ("ingested_at".to_owned(), ingested_at_ms.to_string()),
                    ];
                }
                c.try_publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                    props,
                )
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Publishes at QoS 0 (heartbeats: a lost one is replaced by the next).
    fn publish_qos0(&self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Self::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
            Self::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
        }
    }

    fn subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Self::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Self::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    fn disconnect(&self) {
        let _ = match self {
            Self::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Self::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn local_qos_v4(q: rumqttc::QoS) -> LocalQoS {
    match q {
        rumqttc::QoS::AtMostOnce => LocalQoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => LocalQoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => LocalQoS::ExactlyOnce,
    }
}

fn local_qos_v5(q: rumqttc::v5::mqttbytes::QoS) -> LocalQoS {
    match q {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => LocalQoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => LocalQoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => LocalQoS::ExactlyOnce,
    }
}

impl EventLoop {
    async fn poll(&mut self) -> Result<UpEvent, String> {
        match self {
            Self::V4(ev) => {
                use rumqttc::{Event, Outgoing, Packet};
                match ev.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => Ok(UpEvent::Connected {
                        session_present: ack.session_present,
                    }),
                    Event::Incoming(Packet::PubAck(ack)) => Ok(UpEvent::PubAck {
                        pkid: ack.pkid,
                        failure: None,
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(UpEvent::Command {
                        topic: p.topic,
                        payload: p.payload,
                        qos: local_qos_v4(p.qos),
                        retain: p.retain,
                    }),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ok(UpEvent::OutgoingPublish(pkid)),
                    _ => Ok(UpEvent::Other),
                }
            }
            Self::V5(ev) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                use rumqttc::v5::{Event, Incoming};
                match ev.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Incoming::ConnAck(ack)) => Ok(UpEvent::Connected {
                        session_present: ack.session_present,
                    }),
                    Event::Incoming(Packet::PubAck(ack)) => Ok(UpEvent::PubAck {
                        pkid: ack.pkid,
                        failure: match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            other => Some(format!("{other:?}")),
                        },
                    }),
                    Event::Incoming(Packet::Publish(p)) => Ok(UpEvent::Command {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: local_qos_v5(p.qos),
                        retain: p.retain,
                    }),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ok(UpEvent::OutgoingPublish(pkid)),
                    _ => Ok(UpEvent::Other),
                }
            }
        }
    }
}

/// Builds the TLS settings for an `mqtts://` upstream: the configured CA file, or the system roots.
fn tls_configuration(upstream: &UpstreamConfig) -> Result<rumqttc::TlsConfiguration, String> {
    match &upstream.ca_file {
        Some(path) => {
            let ca = std::fs::read(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            Ok(rumqttc::TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth: None,
            })
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A broken system certificate is skipped, not fatal: the others may still verify.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates found; set upstream.ca_file".into());
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
        }
    }
}

/// Everything the sync engine needs; built once, then [`Sync::run`].
#[derive(Debug)]
pub struct Sync {
    /// Where and how to connect.
    pub(crate) upstream: UpstreamConfig,
    /// Window, batch and backoff settings.
    pub(crate) settings: SyncConfig,
    /// The node name used in topics.
    pub(crate) node: String,
    /// The source of truth for what still has to go.
    pub(crate) store: Store,
    /// Renders the upstream topic of each record.
    pub(crate) router: Arc<Router>,
    /// Where commands from the cloud are published.
    pub(crate) broker: BrokerHandle,
    /// Shared counters and the uplink state.
    pub(crate) metrics: Arc<Metrics>,
    /// Birth, will, shutdown and heartbeat messages.
    pub(crate) lifecycle: Arc<Lifecycle>,
}

/// What sync needs to speak for the gateway itself (see `lifecycle`).
pub struct Lifecycle {
    pub identity: NodeIdentity,
    pub heartbeat_interval: Duration,
    /// Builds the heartbeat from the store's stats and whatever else the gateway watches.
    pub heartbeat: Box<dyn Fn(&StoreStats) -> Heartbeat + Send + std::marker::Sync>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("identity", &self.identity)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .finish_non_exhaustive()
    }
}

/// A FIFO entry that is not a stored record (birth, shutdown): its PUBACK deletes nothing.
const NOT_A_RECORD: u64 = 0;

/// How one connection ended.
enum Ended {
    Stopped,
    Failed { was_connected: bool, error: String },
}

/// Per-connection send state; thrown away when the connection ends.
struct Conn {
    /// Last seq read from the store per priority class (the next read starts after it).
    cursors: [u64; 3],
    /// Records read ahead from the store, per priority class.
    cache: [VecDeque<Record>; 3],
    /// Whether the store may hold more records of that class than we read.
    more: [bool; 3],
    /// Seqs handed to the client whose packet id is not known yet, in order.
    fifo: VecDeque<u64>,
    /// Packet id -> (seq, when it went on the wire) for publishes awaiting PUBACK.
    inflight: HashMap<u16, (u64, Instant)>,
    connected: bool,
}

impl Conn {
    fn new() -> Self {
        Self {
            cursors: [0; 3],
            cache: Default::default(),
            more: [true; 3],
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            connected: false,
        }
    }
    fn outstanding(&self) -> usize {
        self.fifo.len() + self.inflight.len()
    }
}

impl Sync {
    fn topics(&self) -> Topics {
        Topics::new(&self.upstream.topic_prefix, &self.node)
    }

    fn command_filter(&self) -> String {
        format!("{}/{}/cmd/#", self.upstream.topic_prefix, self.node)
    }

    fn build(&self) -> Result<(Client, EventLoop), String> {
        let host = self.upstream.url.host.clone();
        let port = self.upstream.url.port;
        let cap = usize::from(self.settings.inflight_window) + 16;
        let tls = if self.upstream.url.tls {
            Some(tls_configuration(&self.upstream)?)
        } else {
            None
        };
        let status_topic = self.topics().status;
        let will = lifecycle::will(&self.node);
        match self.upstream.protocol {
            MqttVersion::V311 => {
                let mut opts = rumqttc::MqttOptions::new(&self.upstream.client_id, host, port);
                opts.set_keep_alive(self.upstream.keep_alive)
                    .set_clean_session(self.upstream.clean_session)
                    .set_inflight(self.settings.inflight_window)
                    .set_request_channel_capacity(cap)
                    .set_pending_throttle(Duration::ZERO)
                    .set_last_will(rumqttc::LastWill::new(
                        &status_topic,
                        will,
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                if let Some(user) = &self.upstream.username {
                    let pass = self
                        .upstream
                        .password
                        .as_ref()
                        .map(|p| p.expose().to_owned())
                        .unwrap_or_default();
                    opts.set_credentials(user, pass);
                }
                if let Some(tls) = tls {
                    opts.set_transport(rumqttc::Transport::tls_with_config(tls));
                }
                let (c, e) = rumqttc::AsyncClient::new(opts, cap);
                Ok((Client::V4(c), EventLoop::V4(Box::new(e))))
            }
            MqttVersion::V5 => {
                let mut opts = rumqttc::v5::MqttOptions::new(&self.upstream.client_id, host, port);
                opts.set_keep_alive(self.upstream.keep_alive)
                    .set_clean_start(self.upstream.clean_session)
                    .set_outgoing_inflight_upper_limit(self.settings.inflight_window)
                    .set_request_channel_capacity(cap)
                    .set_pending_throttle(Duration::ZERO)
                    .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        &status_topic,
                        will,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                if let Some(user) = &self.upstream.username {
                    let pass = self
                        .upstream
                        .password
                        .as_ref()
                        .map(|p| p.expose().to_owned())
                        .unwrap_or_default();
                    opts.set_credentials(user, pass);
                }
                if let Some(tls) = tls {
                    opts.set_transport(rumqttc::Transport::tls_with_config(tls));
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(opts, cap);
                Ok((Client::V5(c), EventLoop::V5(Box::new(e))))
            }
        }
    }

    /// Runs until `stop` is cancelled. Unacked records simply stay in the store.
    pub async fn run(self, stop: CancellationToken) {
        let (ack_tx, ack_rx) = mpsc::channel(ACK_CHANNEL);
        let acker = tokio::spawn(write_acks(
            self.store.clone(),
            ack_rx,
            Arc::clone(&self.metrics),
        ));
        let mut failures: u32 = 0;
        let mut ever_connected = false;
        info!(upstream = %self.upstream.url, "sync starting");
        loop {
            self.metrics.set_uplink_state(UplinkState::Connecting);
            let ended = match self.build() {
                Ok((client, events)) => {
                    self.serve(client, events, &ack_tx, &stop, &mut ever_connected)
                        .await
                }
                Err(error) => Ended::Failed {
                    was_connected: false,
                    error,
                },
            };
            match ended {
                Ended::Stopped => break,
                Ended::Failed {
                    was_connected,
                    error,
                } => {
                    inc(&self.metrics.connection_errors);
                    if was_connected || failures.is_multiple_of(30) {
                        warn!(upstream = %self.upstream.url, %error, attempt = failures + 1, "upstream connection failed");
                    } else {
                        debug!(upstream = %self.upstream.url, %error, "upstream connection failed");
                    }
                    self.metrics.set_last_error(error);
                    failures = if was_connected {
                        0
                    } else {
                        failures.saturating_add(1)
                    };
                }
            }
            let delay = backoff(&self.settings, failures);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.metrics.set_uplink_state(UplinkState::Stopped);
        drop(ack_tx);
        let _ = acker.await;
        info!("sync stopped");
    }

    async fn serve(
        &self,
        client: Client,
        mut events: EventLoop,
        acks: &mpsc::Sender<u64>,
        stop: &CancellationToken,
        ever_connected: &mut bool,
    ) -> Ended {
        let mut conn = Conn::new();
        let mut committed = self.store.committed_seq();
        let window = usize::from(self.settings.inflight_window);
        let mut heartbeat = tokio::time::interval(self.lifecycle.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if conn.connected
                && conn.outstanding() < window
                && let Err(error) = self.feed(&client, &mut conn, window).await
            {
                return Ended::Failed {
                    was_connected: true,
                    error,
                };
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    self.finish(&client, &mut events, &mut conn, acks).await;
                    return Ended::Stopped;
                }
                event = events.poll() => {
                    match event {
                        Ok(event) => {
                            if let Err(error) = self.on_event(event, &client, &mut conn, acks, ever_connected).await {
                                return Ended::Failed { was_connected: conn.connected, error };
                            }
                        }
                        Err(error) => return Ended::Failed { was_connected: conn.connected, error },
                    }
                }
                _ = heartbeat.tick(), if conn.connected => {
                    self.send_heartbeat(&client).await;
                }
                changed = committed.changed(), if conn.connected => {
                    if changed.is_err() {
                        // The store is closing: nothing more will arrive.
                        conn.more = [false; 3];
                    } else {
                        conn.more = [true; 3];
                    }
                }
            }
        }
    }

    async fn on_event(
        &self,
        event: UpEvent,
        client: &Client,
        conn: &mut Conn,
        acks: &mpsc::Sender<u64>,
        ever_connected: &mut bool,
    ) -> Result<(), String> {
        match event {
            UpEvent::Connected { session_present } => {
                if *ever_connected {
                    inc(&self.metrics.reconnects);
                }
                *ever_connected = true;
                conn.connected = true;
                self.metrics.set_uplink_state(UplinkState::Connected);
                info!(upstream = %self.upstream.url, session_present, "upstream connected; sending everything not yet acknowledged");
                if self.upstream.command_topic {
                    client.subscribe(self.command_filter())?;
                }
                let birth = lifecycle::birth(&self.lifecycle.identity, now_ms());
                conn.fifo.push_back(NOT_A_RECORD);
                client.publish(self.topics().status, Bytes::from(birth), true, None)?;
            }
            UpEvent::OutgoingPublish(pkid) => {
                if pkid != 0 && !conn.inflight.contains_key(&pkid) {
                    match conn.fifo.pop_front() {
                        Some(seq) => {
                            conn.inflight.insert(pkid, (seq, Instant::now()));
                        }
                        None => warn!(pkid, "publish on the wire that sync did not send"),
                    }
                }
            }
            UpEvent::PubAck { pkid, failure } => match conn.inflight.remove(&pkid) {
                Some((seq, sent_at)) => match failure {
                    None if seq == NOT_A_RECORD => {
                        self.metrics.observe_rtt(sent_at.elapsed());
                    }
                    None => {
                        self.metrics.observe_rtt(sent_at.elapsed());
                        inc(&self.metrics.sync_acked);
                        acks.send(seq)
                            .await
                            .map_err(|_| "ack writer stopped".to_owned())?;
                    }
                    Some(reason) => {
                        inc(&self.metrics.sync_rejected);
                        warn!(seq, %reason, "upstream refused a record; it stays stored and is sent again after the next reconnect");
                    }
                },
                None => debug!(pkid, "PUBACK for an unknown packet id"),
            },
            UpEvent::Command {
                topic,
                payload,
                qos,
                retain,
            } => self.forward_command(&topic, payload, qos, retain).await,
            UpEvent::Other => {}
        }
        Ok(())
    }

    async fn forward_command(&self, topic: &str, payload: Bytes, qos: LocalQoS, retain: bool) {
        let prefix = format!("{}/{}/cmd/", self.upstream.topic_prefix, self.node);
        let Some(local) = topic.strip_prefix(&prefix).filter(|t| !t.is_empty()) else {
            inc(&self.metrics.commands_failed);
            warn!(
                topic,
                "message from upstream outside the command prefix ignored"
            );
            return;
        };
        match self.broker.publish(local, payload, qos, retain).await {
            Ok(()) => inc(&self.metrics.commands_forwarded),
            Err(e) => {
                inc(&self.metrics.commands_failed);
                warn!(topic = local, error = %e, "command could not be published locally");
            }
        }
    }

    /// Hands records to the client until the window is full or nothing is left.
    async fn feed(&self, client: &Client, conn: &mut Conn, window: usize) -> Result<(), String> {
        while conn.outstanding() < window {
            let mut next = None;
            for p in Priority::ALL {
                let i = p.as_index();
                if conn.cache[i].is_empty() && conn.more[i] {
                    let batch = self
                        .store
                        .read_after(p, conn.cursors[i], self.settings.read_batch)
                        .await
                        .map_err(|e| format!("reading the store: {e}"))?;
                    conn.more[i] = batch.len() >= self.settings.read_batch;
                    if let Some(last) = batch.last() {
                        conn.cursors[i] = last.seq;
                    }
                    conn.cache[i].extend(batch);
                }
                if let Some(record) = conn.cache[i].pop_front() {
                    next = Some(record);
                    break;
                }
            }
            let Some(record) = next else { return Ok(()) };
            let topic =
                self.router
                    .upstream_topic(&self.upstream.topic_prefix, &self.node, &record.stream);
            conn.fifo.push_back(record.seq);
            self.metrics.sync_bytes.fetch_add(
                (topic.len() + record.payload.len()) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            // Registry changes are retained: a cloud subscriber sees every device's last state.
            let retain = crate::registry::is_retained_stream(&record.stream);
            client.publish(
                topic,
                record.payload,
                retain,
                Some((record.seq, record.ingested_at_ms)),
            )?;
            inc(&self.metrics.sync_published);
        }
        Ok(())
    }

    async fn send_heartbeat(&self, client: &Client) {
        let stats = match self.store.stats().await {
            Ok(stats) => stats,
            Err(e) => {
                warn!(error = %e, "no store stats for the heartbeat");
                StoreStats::default()
            }
        };
        let heartbeat = (self.lifecycle.heartbeat)(&stats);
        if let Err(e) = client.publish_qos0(self.topics().heartbeat, lifecycle::to_json(&heartbeat))
        {
            debug!(error = %e, "heartbeat not sent");
        }
    }

    /// Stopping: send nothing new, collect PUBACKs for what is in flight for a short grace period,
    /// then disconnect. Whatever is not acked by then stays in the store for the next start.
    async fn finish(
        &self,
        client: &Client,
        events: &mut EventLoop,
        conn: &mut Conn,
        acks: &mpsc::Sender<u64>,
    ) {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        let mut ignored = true;
        if conn.connected {
            // Retained "offline, shutdown" replaces the birth; the will is for unclean ends only.
            let payload = lifecycle::shutdown(&self.node, now_ms());
            conn.fifo.push_back(NOT_A_RECORD);
            if client
                .publish(self.topics().status, Bytes::from(payload), true, None)
                .is_err()
            {
                conn.fifo.pop_back();
            }
        }
        while conn.connected && conn.outstanding() > 0 {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(event @ (UpEvent::OutgoingPublish(_) | UpEvent::PubAck { .. }))) => {
                    if self
                        .on_event(event, client, conn, acks, &mut ignored)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        client.disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
        debug!(
            unacked = conn.outstanding(),
            acked = get(&self.metrics.sync_acked),
            "sync connection closed"
        );
    }
}

/// Exponential backoff with jitter: `min * 2^failures`, capped at `max`, then a random 50-100% of
/// it so a fleet of gateways does not reconnect in lockstep.
fn backoff(settings: &SyncConfig, failures: u32) -> Duration {
    let base = settings
        .backoff_min
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(settings.backoff_max);
    let factor = rand::rng().random_range(0.5..=1.0);
    base.mul_f64(factor)
}

/// Deletes acknowledged records in batches. A failed delete only means duplicates later (the
/// records are sent again), never a loss, so it is counted and logged, not fatal.
///
/// Deletes are gathered for up to [`ACK_GATHER`] (or [`ACK_BATCH`] seqs) before each write: a
/// delete that is lost in a crash only costs a duplicate, so it does not need its own commit,
/// and during a drain every commit (an fsync on the single writer thread) delays the reads that
/// feed the upstream. Measured: committing each small ack batch at once drained a 100k backlog
/// at 0.65x the rate of gathered deletes.
async fn write_acks(store: Store, mut rx: mpsc::Receiver<u64>, metrics: Arc<Metrics>) {
    let mut buf = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut buf, ACK_BATCH).await > 0 {
        let deadline = tokio::time::Instant::now() + ACK_GATHER;
        while buf.len() < ACK_BATCH {
            let room = ACK_BATCH - buf.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut buf, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let seqs = std::mem::take(&mut buf);
        if let Err(e) = store.ack(seqs).await {
            inc(&metrics.ack_write_failures);
            warn!(error = %e, "could not delete acknowledged records; they will be sent again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(min_ms: u64, max_ms: u64) -> SyncConfig {
        SyncConfig {
            inflight_window: 10,
            read_batch: 10,
            backoff_min: Duration::from_millis(min_ms),
            backoff_max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped_with_jitter() {
        let s = settings(100, 1000);
        for _ in 0..100 {
            let first = backoff(&s, 0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(&s, 2);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(&s, 40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
        }
    }
}
