//! An upstream that speaks only MQTT 3.1.1: with the protocol absent (or "auto") the gateway
//! falls back to 3.1.1 when the broker refuses MQTT 5 at CONNECT; pinned to "5" it never
//! connects and its status says why.
//!
//! The peer is Debian's nats-server (2.9.10) with its MQTT listener (it needs JetStream and a
//! `server_name`). What it answers to an MQTT 5 CONNECT was checked by hand with a raw socket
//! and is pinned by the first test: a 3.1.1-format CONNACK `20 02 00 01` (session present 0,
//! return code 0x01 "unacceptable protocol version"), then it closes the connection; it logs
//! `unacceptable protocol version of 5`. A 3.1.1 CONNECT gets `20 02 00 00`.
//!
//! Fallback (protocol absent, and "auto" written out): `runtime.uplink_protocol` "3.1.1",
//! `runtime.uplink_protocol_fallback` true (metric `outpost_uplink_protocol_fallback` 1), the
//! gateway's log says so once (a line naming both "3.1.1" and a fall-back: "fall" in any case),
//! one birth, and readings flow in order to a 3.1.1 subscriber of that peer (no seq: metadata
//! defaults to none on 3.1.1). Pinned "3.1.1" against the same peer: the same flow without
//! fallback. Pinned "5": never connected over several seconds, `uplink_protocol` null, no
//! fallback, `uplink_last_error` mentions the protocol, no birth, the readings stay buffered.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use outpost_tests::{
    GatewayConfig, NatsServer, Outpost, Publisher, PublisherSpec, SeqSource, Subscriber,
    SubscriberSpec, TestDir, UplinkReport, UpstreamProtocol, births, check_upstream_delivery,
    scrape_metrics, wait_for_readings,
};

const NODE: &str = "gw1";
const TOPICS: [&str; 2] = ["plant/press", "plant/oven"];
const PER_TOPIC: u64 = 50;

/// A minimal CONNECT (clean session, keep-alive 30 s) at protocol level `level` (4 = 3.1.1,
/// 5 = MQTT 5 with an empty property block).
fn connect_packet(level: u8, client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&u16::try_from(client_id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10, u8::try_from(body.len()).unwrap_or(0)];
    p.extend(body);
    p
}

/// What the peer sends back to `packet` within 3 s, and whether it closed the connection.
fn answer(port: u16, packet: &[u8]) -> anyhow::Result<(Vec<u8>, bool)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(packet)?;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Ok((got, true)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok((got, true)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok((got, false))
}

#[test]
fn nats_server_refuses_an_mqtt5_connect_with_a_311_connack_0x01_and_closes() -> anyhow::Result<()> {
    let dir = TestDir::new("nats-probe")?;
    let nats = NatsServer::start(&dir)?;
    let (v5, closed) = answer(nats.mqtt_port(), &connect_packet(5, "probe-5"))?;
    assert_eq!(v5, [0x20, 0x02, 0x00, 0x01], "answer to an MQTT 5 CONNECT");
    assert!(closed, "nats-server keeps the refused connection open");
    let (v4, closed) = answer(nats.mqtt_port(), &connect_packet(4, "probe-4"))?;
    assert_eq!(v4, [0x20, 0x02, 0x00, 0x00], "answer to a 3.1.1 CONNECT");
    assert!(!closed, "nats-server closed an accepted 3.1.1 connection");
    Ok(())
}

/// Log lines that report falling back to 3.1.1.
fn fallback_lines(gw: &Outpost) -> Vec<String> {
    std::fs::read_to_string(gw.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("3.1.1") && l.contains("fall")
        })
        .map(str::to_owned)
        .collect()
}

/// Readings flow to a 3.1.1 subscriber of nats-server; `fallback`: whether the gateway had to
/// fall back from MQTT 5 to get there.
fn flows(name: &str, protocol: Option<UpstreamProtocol>, fallback: bool) -> anyhow::Result<()> {
    let dir = TestDir::new(name)?;
    let nats = NatsServer::start(&dir)?;
    let mut sub = SubscriberSpec::new(nats.mqtt_port(), &format!("outpost/{NODE}/#"));
    sub.protocol = "3.1.1".to_owned();
    let consumer = Subscriber::spawn(&dir, "cloud", &sub)?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(nats.mqtt_port()))?;
    cfg.protocol = protocol;
    let mut gw = Outpost::start(&dir, &cfg)?;
    gw.wait_uplink_connected()?;

    let acked = Publisher::spawn(
        &dir,
        "sensor",
        &PublisherSpec::new(gw.port(), &TOPICS, PER_TOPIC),
    )?
    .finish(Duration::from_secs(60))?;
    assert_eq!(acked.len(), TOPICS.len() * usize::try_from(PER_TOPIC)?);
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(60))?;
    let topics: Vec<String> = TOPICS.iter().map(|t| (*t).to_owned()).collect();
    check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, SeqSource::Nothing)?;
    // The status is written every second: let it catch up with what the consumer saw.
    std::thread::sleep(Duration::from_secs(2));

    let msgs = consumer.messages()?;
    assert_eq!(births(&msgs, NODE).len(), 1, "births seen by the consumer");
    let lines = fallback_lines(&gw);
    assert_eq!(
        lines.len(),
        usize::from(fallback),
        "log lines about falling back to 3.1.1: {lines:#?}"
    );
    let status = gw.status_json()?;
    let r = UplinkReport::from_status(&status);
    let want = UplinkReport {
        state: Some("connected".to_owned()),
        protocol: Some("3.1.1".to_owned()),
        protocol_reported: true,
        fallback: Some(fallback),
        births_published: Some(1),
        ..r.clone()
    };
    assert_eq!(r, want, "uplink figures; status: {status:#}");
    let m = scrape_metrics(cfg.health_port)?;
    assert_eq!(
        m.get("outpost_uplink_protocol_fallback", &[])?,
        f64::from(u8::from(fallback))
    );
    Ok(())
}

#[test]
fn protocol_absent_falls_back_to_mqtt311_and_readings_flow() -> anyhow::Result<()> {
    flows("fallback-default", None, true)
}

#[test]
fn protocol_auto_falls_back_to_mqtt311_and_readings_flow() -> anyhow::Result<()> {
    flows("fallback-auto", Some(UpstreamProtocol::Auto), true)
}

#[test]
fn protocol_311_pinned_connects_without_fallback() -> anyhow::Result<()> {
    flows("fallback-pinned-311", Some(UpstreamProtocol::V311), false)
}

#[test]
fn protocol_5_pinned_never_connects_and_status_says_why() -> anyhow::Result<()> {
    let dir = TestDir::new("fallback-pinned-5")?;
    let nats = NatsServer::start(&dir)?;
    let mut sub = SubscriberSpec::new(nats.mqtt_port(), &format!("outpost/{NODE}/#"));
    sub.protocol = "3.1.1".to_owned();
    let consumer = Subscriber::spawn(&dir, "cloud", &sub)?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(nats.mqtt_port()))?;
    cfg.protocol = Some(UpstreamProtocol::V5);
    // No resource samples: the buffer holds exactly the sensor's readings.
    cfg.resource_interval = Some("off".to_owned());
    let mut gw = Outpost::start(&dir, &cfg)?;

    let acked = Publisher::spawn(&dir, "sensor", &PublisherSpec::new(gw.port(), &TOPICS, 5))?
        .finish(Duration::from_secs(60))?;
    assert_eq!(
        acked.len(),
        10,
        "the local broker acks while the uplink is down"
    );

    // Several seconds of attempts (the back-off is 100 ms to 1 s): never connected.
    let start = Instant::now();
    let mut last = serde_json::Value::Null;
    while start.elapsed() < Duration::from_secs(6) {
        gw.check_alive()?;
        last = gw.status_json()?;
        let r = UplinkReport::from_status(&last);
        assert_ne!(
            r.state.as_deref(),
            Some("connected"),
            "pinned to MQTT 5, it connected to a 3.1.1-only broker: {last:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = UplinkReport::from_status(&last);
    let error = r.last_error.clone().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("protocol"),
        "uplink_last_error should say the broker refused the protocol: {error:?}"
    );
    let want = UplinkReport {
        protocol: None,
        protocol_reported: true,
        fallback: Some(false),
        // Not `reconnects`: each attempt gets a (refusing) CONNACK from nats-server, and the
        // contract counts "connections after the first that got a CONNACK".
        births_published: Some(0),
        buffered_records: Some(10),
        ..r.clone()
    };
    assert_eq!(r, want, "uplink figures; status: {last:#}");
    assert!(
        fallback_lines(&gw).is_empty(),
        "pinned to 5, the log talks of a fallback"
    );
    assert_eq!(consumer.count(), 0, "something reached the broker");
    Ok(())
}
