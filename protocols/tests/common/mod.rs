//! Shared helpers: a real broker on 127.0.0.1:0, a scripted gateway, and a raw MQTT client
//! built on rumqttc's codec for conformance cases a full client library would hide.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use outpost_protocols::{Broker, BrokerHandle, BrokerSettings, Inbound, IngestReply};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn settings() -> BrokerSettings {
    BrokerSettings {
        listeners: vec!["127.0.0.1:0".parse().unwrap()],
        max_connections: 32,
        max_packet_size: 64 * 1024,
        max_inflight: 10,
        max_inbound_pending: 10,
        max_queued_messages: 100,
        max_queued_bytes: usize::MAX,
        max_retained: usize::MAX,
        max_retained_bytes: usize::MAX,
        max_sessions: usize::MAX,
        session_expiry_311: Duration::from_secs(7 * 24 * 3600),
        max_session_expiry: Duration::from_secs(7 * 24 * 3600),
        connect_timeout: Duration::from_secs(2),
        auth: None,
        tls: Vec::new(),
    }
}

pub struct Running {
    pub addr: SocketAddr,
    pub handle: BrokerHandle,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

/// Starts the broker; the test drives the gateway side through the returned receiver.
pub async fn start_manual(settings: BrokerSettings) -> (Running, mpsc::Receiver<Inbound>) {
    let broker = Broker::bind(settings).await.expect("bind");
    let addr = broker.local_addrs()[0];
    let handle = broker.handle();
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        broker.run(tx, token).await.expect("broker run");
    });
    (
        Running {
            addr,
            handle,
            shutdown,
            task,
        },
        rx,
    )
}

/// Starts the broker with a gateway that commits everything at once; what it received is
/// forwarded (without the reply) to the returned receiver.
pub async fn start(settings: BrokerSettings) -> (Running, mpsc::UnboundedReceiver<Inbound>) {
    start_replying(settings, |_| Ok(())).await
}

pub async fn start_replying(
    settings: BrokerSettings,
    decide: impl Fn(&Inbound) -> IngestReply + Send + 'static,
) -> (Running, mpsc::UnboundedReceiver<Inbound>) {
    let (running, mut rx) = start_manual(settings).await;
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut inbound) = rx.recv().await {
            let answer = decide(&inbound);
            if let Some(reply) = inbound.reply.take() {
                let _ = reply.send(answer);
            }
            let _ = seen_tx.send(inbound);
        }
    });
    (running, seen_rx)
}

pub const WAIT: Duration = Duration::from_secs(3);
pub const QUIET: Duration = Duration::from_millis(300);

/// A raw MQTT 3.1.1 connection.
pub struct Raw4 {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw4 {
    pub async fn tcp(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    pub async fn connect_with(addr: SocketAddr, connect: v4::Connect) -> (Self, v4::ConnAck) {
        let mut c = Self::tcp(addr).await;
        c.send(v4::Packet::Connect(connect)).await;
        match c.recv().await {
            Some(v4::Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn connect(addr: SocketAddr, id: &str) -> Self {
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 0;
        let (c, ack) = Self::connect_with(addr, connect).await;
        assert_eq!(ack.code, v4::ConnectReturnCode::Success);
        c
    }

    pub async fn send(&mut self, p: v4::Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX).expect("encode");
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Next packet within `WAIT`; None when the broker closed the connection.
    pub async fn recv(&mut self) -> Option<v4::Packet> {
        self.recv_within(WAIT).await.expect("no packet in time")
    }

    /// Err(()) on timeout, Ok(None) on close.
    pub async fn recv_within(&mut self, d: Duration) -> Result<Option<v4::Packet>, ()> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match v4::Packet::read(&mut self.buf, usize::MAX) {
                Ok(p) => return Ok(Some(p)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent garbage: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Asserts nothing arrives for `QUIET`.
    pub async fn expect_silence(&mut self) {
        if let Ok(p) = self.recv_within(QUIET).await {
            panic!("expected silence, got {p:?}");
        }
    }

    /// Asserts the broker closes the connection (after draining anything it sent first).
    pub async fn expect_closed(&mut self) -> Vec<v4::Packet> {
        let mut got = Vec::new();
        loop {
            match self.recv_within(WAIT).await {
                Ok(None) => return got,
                Ok(Some(p)) => got.push(p),
                Err(()) => panic!("connection not closed; received {got:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.send(v4::Packet::Subscribe(v4::Subscribe::new(filter, qos)))
            .await;
        match self.recv().await {
            Some(v4::Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn publish(
        &mut self,
        topic: &str,
        qos: rumqttc::QoS,
        pkid: u16,
        payload: &'static [u8],
    ) {
        let mut p = v4::Publish::from_bytes(topic, qos, Bytes::from_static(payload));
        p.pkid = pkid;
        self.send(v4::Packet::Publish(p)).await;
    }

    pub async fn expect_publish(&mut self) -> v4::Publish {
        match self.recv().await {
            Some(v4::Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

/// A raw MQTT 5 connection.
pub struct Raw5 {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw5 {
    pub async fn connect_with(
        addr: SocketAddr,
        connect: v5::Connect,
        will: Option<v5::LastWill>,
    ) -> (Self, v5::ConnAck) {
        let mut c = Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        };
        c.send(v5::Packet::Connect(connect, will, None)).await;
        match c.recv().await {
            Some(v5::Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn connect_packet(id: &str) -> v5::Connect {
        v5::Connect {
            keep_alive: 0,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        }
    }

    pub async fn send(&mut self, p: v5::Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    pub async fn recv(&mut self) -> Option<v5::Packet> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match v5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent garbage: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("no packet in time"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// MQTT 5 conveniences used by the `mqtt5_*` tests.
impl Raw5 {
    /// Connects with a clean start and the given session expiry interval (seconds).
    pub async fn connect_expiring(
        addr: SocketAddr,
        id: &str,
        session_expiry: u32,
    ) -> (Self, v5::ConnAck) {
        let mut c = Self::connect_packet(id);
        let mut props = v5::ConnectProperties::new();
        props.session_expiry_interval = Some(session_expiry);
        c.properties = Some(props);
        Self::connect_with(addr, c, None).await
    }

    /// A plain connection, asserting success.
    pub async fn connect(addr: SocketAddr, id: &str) -> Self {
        let (c, ack) = Self::connect_with(addr, Self::connect_packet(id), None).await;
        assert_eq!(ack.code, v5::ConnectReturnCode::Success);
        c
    }

    /// Subscribes with these filters (and optional subscription identifier); returns the SUBACK.
    pub async fn subscribe_with(
        &mut self,
        filters: Vec<v5::Filter>,
        id: Option<usize>,
    ) -> v5::SubAck {
        let props = id.map(|id| v5::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        let mut s = v5::Subscribe::new_many(filters, props);
        s.pkid = 1;
        self.send(v5::Packet::Subscribe(s)).await;
        match self.recv().await {
            Some(v5::Packet::SubAck(a)) => a,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Subscribes to one filter at `qos` with default options.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        let ack = self
            .subscribe_with(vec![v5::Filter::new(filter, qos)], None)
            .await;
        assert!(
            matches!(ack.return_codes[..], [v5::SubscribeReasonCode::Success(_)]),
            "{ack:?}"
        );
    }

    /// The next packet must be a PUBLISH; QoS 1 is acknowledged.
    pub async fn expect_publish(&mut self) -> v5::Publish {
        match self.recv().await {
            Some(v5::Packet::Publish(p)) => {
                if p.qos == rumqttc::v5::mqttbytes::QoS::AtLeastOnce {
                    self.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                        .await;
                }
                p
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts no PUBLISH is waiting: a PINGREQ is answered before anything else arrives.
    pub async fn expect_no_publish(&mut self) {
        tokio::time::sleep(QUIET).await;
        self.send(v5::Packet::PingReq(v5::PingReq)).await;
        match self.recv().await {
            Some(v5::Packet::PingResp(_)) => {}
            other => panic!("expected nothing but PINGRESP, got {other:?}"),
        }
    }

    /// Sends a DISCONNECT (normal) and waits for the close.
    pub async fn disconnect(mut self) {
        self.send_raw(&[0xE0, 0x00]).await;
        assert!(self.recv().await.is_none(), "closed after DISCONNECT");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }
}
