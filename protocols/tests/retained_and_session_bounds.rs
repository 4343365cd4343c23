//! Issue 12: retained messages and persistent sessions are bounded, and sessions expire.
//! `max_retained` / `max_retained_bytes` refuse a new retained topic (MQTT 5 QoS 1/2: 0x97;
//! 3.1.1: delivered, not retained), `max_sessions` refuses a new persistent session at CONNECT
//! (3.1.1: 0x03; MQTT 5: 0x97), 3.1.1 persistent sessions expire after `session_expiry_311`,
//! MQTT 5 ones are capped at `max_session_expiry` (CONNACK says so), and QoS 0 state writes
//! cannot run further ahead of the store than `max_inbound_pending` per connection. Raw
//! clients for the packets, mosquitto_pub / mosquitto_sub as the third-party clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use outpost_protocols::broker::StateBatch;
use outpost_protocols::{Broker, BrokerSettings};
use rumqttc::QoS as Q;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn bounded(max_retained: usize, max_sessions: usize) -> BrokerSettings {
    let mut s = settings();
    s.max_retained = max_retained;
    s.max_sessions = max_sessions;
    s
}

async fn publish5(c: &mut Raw5, topic: &str, payload: &'static [u8], pkid: u16) -> v5::PubAck {
    let mut p = v5::Publish::new(topic, Q5::AtLeastOnce, payload, None);
    p.retain = true;
    p.pkid = pkid;
    c.send(v5::Packet::Publish(p)).await;
    match c.recv().await {
        Some(v5::Packet::PubAck(ack)) => ack,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The retained messages a fresh subscriber to `#` gets, as `topic=payload`.
async fn retained_now(addr: std::net::SocketAddr, id: &str) -> Vec<String> {
    let mut c = Raw4::connect(addr, id).await;
    c.subscribe("#", Q::AtMostOnce).await;
    let mut got = Vec::new();
    while let Ok(Some(v4::Packet::Publish(p))) = c.recv_within(QUIET).await {
        assert!(p.retain);
        got.push(format!(
            "{}={}",
            p.topic,
            String::from_utf8_lossy(&p.payload)
        ));
    }
    got.sort();
    got
}

#[tokio::test]
async fn mqtt5_retained_publish_on_a_new_topic_beyond_max_retained_is_refused_with_0x97() {
    let (b, mut seen) = start(bounded(2, usize::MAX)).await;
    let mut c = Raw5::connect(b.addr, "pub5").await;
    assert_eq!(
        publish5(&mut c, "r/1", b"a", 1).await.reason,
        v5::PubAckReason::Success
    );
    assert_eq!(
        publish5(&mut c, "r/2", b"b", 2).await.reason,
        v5::PubAckReason::Success
    );
    assert_eq!(seen.recv().await.unwrap().topic, "r/1");
    assert_eq!(seen.recv().await.unwrap().topic, "r/2");
    let ack = publish5(&mut c, "r/3", b"c", 3).await;
    assert_eq!(ack.reason, v5::PubAckReason::QuotaExceeded);
    assert_eq!(b.handle.stats().retained_refused, 1);
    // Refused whole: not handed to the gateway either.
    assert!(
        tokio::time::timeout(QUIET, seen.recv()).await.is_err(),
        "the refused message reached ingest"
    );
    // Replacing and clearing topics held always work.
    assert_eq!(
        publish5(&mut c, "r/1", b"A", 4).await.reason,
        v5::PubAckReason::Success
    );
    assert_eq!(
        publish5(&mut c, "r/2", b"", 5).await.reason,
        v5::PubAckReason::Success
    );
    assert_eq!(
        publish5(&mut c, "r/3", b"c", 6).await.reason,
        v5::PubAckReason::Success
    );
    assert_eq!(retained_now(b.addr, "probe").await, vec!["r/1=A", "r/3=c"]);
    let stats = b.handle.stats();
    assert_eq!((stats.retained_messages, stats.retained_bytes), (2, 8));
    b.shutdown.cancel();
}

#[tokio::test]
async fn mqtt311_retained_publish_beyond_max_retained_bytes_is_acked_delivered_and_not_retained() {
    let mut s = bounded(usize::MAX, usize::MAX);
    s.max_retained_bytes = 10; // "r/1" + "abcd" = 7: one fits.
    let (b, mut seen) = start(s).await;
    let mut sub = Raw4::connect(b.addr, "sub").await;
    sub.subscribe("r/#", Q::AtLeastOnce).await;
    let mut c = Raw4::connect(b.addr, "pub4").await;
    for (topic, pkid) in [("r/1", 1), ("r/2", 2)] {
        let mut p = v4::Publish::from_bytes(topic, Q::AtLeastOnce, Bytes::from_static(b"abcd"));
        p.retain = true;
        p.pkid = pkid;
        c.send(v4::Packet::Publish(p)).await;
        assert_eq!(
            c.recv().await,
            Some(v4::Packet::PubAck(v4::PubAck::new(pkid)))
        );
        // Stored for upstream, and delivered to the current subscriber, both times.
        assert_eq!(seen.recv().await.unwrap().topic, topic);
        let got = sub.expect_publish().await;
        assert_eq!(got.topic, topic);
        sub.send(v4::Packet::PubAck(v4::PubAck::new(got.pkid)))
            .await;
    }
    assert_eq!(b.handle.stats().retained_refused, 1);
    assert_eq!(retained_now(b.addr, "probe").await, vec!["r/1=abcd"]);
    b.shutdown.cancel();
}

#[tokio::test]
async fn new_persistent_session_beyond_max_sessions_is_refused_at_connect_per_version() {
    let (b, _seen) = start(bounded(usize::MAX, 1)).await;
    let mut first = v4::Connect::new("keeper");
    first.keep_alive = 0;
    first.clean_session = false;
    let (c, ack) = Raw4::connect_with(b.addr, first.clone()).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    drop(c);
    tokio::time::sleep(QUIET).await;

    // 3.1.1: 0x03 server unavailable.
    let mut other = first.clone();
    other.client_id = "second".into();
    let (mut c, ack) = Raw4::connect_with(b.addr, other).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::ServiceUnavailable);
    c.expect_closed().await;
    // MQTT 5: 0x97 quota exceeded.
    let (mut c5, ack) = Raw5::connect_expiring(b.addr, "second5", 60).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::QuotaExceeded);
    assert!(c5.recv().await.is_none(), "closed after the refusal");
    let stats = b.handle.stats();
    assert_eq!((stats.sessions_refused, stats.persistent_sessions), (2, 1));

    // Clean sessions are not affected; the holder resumes its own.
    let _clean = Raw4::connect(b.addr, "clean").await;
    let _clean5 = Raw5::connect(b.addr, "clean5").await;
    let (_c, ack) = Raw4::connect_with(b.addr, first).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    assert!(ack.session_present);
    b.shutdown.cancel();
}

#[tokio::test]
async fn mqtt311_persistent_session_expires_after_session_expiry_311() {
    let mut s = settings();
    s.session_expiry_311 = Duration::from_secs(1);
    let (b, _seen) = start(s).await;
    let mut connect = v4::Connect::new("sleepy");
    connect.keep_alive = 0;
    connect.clean_session = false;
    let (mut c, _) = Raw4::connect_with(b.addr, connect.clone()).await;
    c.subscribe("s", Q::AtLeastOnce).await;
    c.send(v4::Packet::Disconnect).await;
    c.expect_closed().await;
    // Within the expiry: resumed.
    let (mut c, ack) = Raw4::connect_with(b.addr, connect.clone()).await;
    assert!(ack.session_present);
    c.send(v4::Packet::Disconnect).await;
    c.expect_closed().await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let stats = b.handle.stats();
    assert_eq!((stats.sessions_expired, stats.persistent_sessions), (1, 0));
    let (_c, ack) = Raw4::connect_with(b.addr, connect).await;
    assert!(
        !ack.session_present,
        "discarded like an expired MQTT 5 session"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn mqtt5_session_expiry_is_capped_at_max_session_expiry_and_connack_says_so() {
    let mut s = settings();
    s.max_session_expiry = Duration::from_secs(60);
    let (b, _seen) = start(s).await;
    let expiry_in_connack = |ack: &v5::ConnAck| {
        ack.properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
    };
    for (asked, told) in [
        (u32::MAX, Some(60)),
        (3600, Some(60)),
        (30, None),
        (0, None),
    ] {
        let (_c, ack) = Raw5::connect_expiring(b.addr, &format!("cap-{asked}"), asked).await;
        assert_eq!(ack.code, v5::ConnectReturnCode::Success);
        assert_eq!(expiry_in_connack(&ack), told, "asked {asked}");
    }
    b.shutdown.cancel();
}

/// With persistence on and a store that does not answer, a client publishing QoS 0 retained
/// messages is not read past `max_inbound_pending` writes; once the store catches up it is.
#[tokio::test]
async fn qos0_retained_publishes_cannot_run_further_ahead_of_the_store_than_the_window() {
    let settings = settings(); // max_inbound_pending 10
    let broker = Broker::bind(settings).await.unwrap();
    let addr = broker.local_addrs()[0];
    let (sink, mut writes) = mpsc::unbounded_channel::<StateBatch>();
    broker.restore(sink, Vec::new());
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let shutdown = CancellationToken::new();
    tokio::spawn(broker.run(tx, shutdown.clone()));

    let mut c = Raw4::connect(addr, "flood").await;
    for i in 0..12u8 {
        let mut p = v4::Publish::from_bytes(format!("f/{i}"), Q::AtMostOnce, Bytes::from(vec![i]));
        p.retain = true;
        c.send(v4::Packet::Publish(p)).await;
    }
    c.send(v4::Packet::PingReq).await;
    // Ten writes are out, none durable: the connection stopped reading before the PINGREQ.
    assert!(
        c.recv_within(QUIET).await.is_err(),
        "answered while its writes were not durable"
    );
    let mut pending = Vec::new();
    while let Ok(batch) = writes.try_recv() {
        pending.push(batch);
    }
    assert_eq!(
        pending.iter().map(|b| b.changes.len()).sum::<usize>(),
        10,
        "exactly the window's writes were made"
    );
    // The store catches up: the rest is read, and the PINGREQ answered.
    let answer = |batches: Vec<StateBatch>| {
        for b in batches {
            if let Some(done) = b.committed {
                let _ = done.send(Ok(()));
            }
        }
    };
    answer(pending);
    let responder = tokio::spawn(async move {
        while let Some(b) = writes.recv().await {
            answer(vec![b]);
        }
    });
    assert_eq!(c.recv().await, Some(v4::Packet::PingResp));
    shutdown.cancel();
    responder.abort();
}

fn tool(name: &str) -> Option<&'static Path> {
    let path: &'static Path = Path::new(match name {
        "mosquitto_pub" => "/usr/bin/mosquitto_pub",
        _ => "/usr/bin/mosquitto_sub",
    });
    if path.exists() {
        return Some(path);
    }
    let in_ci = std::env::var("CI")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    assert!(
        !in_ci,
        "{name} not installed (apt: mosquitto-clients) and CI=true"
    );
    eprintln!("{name} not installed (apt: mosquitto-clients): skipped");
    None
}

async fn run(tool: &Path, port: u16, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("finished in time")
        .expect("ran")
}

/// mosquitto_pub -r: a retained publish on a new topic past the bound is refused for MQTT 5
/// (its PUBACK says why) and delivered-not-retained for 3.1.1.
#[tokio::test]
async fn mosquitto_pub_retained_beyond_max_retained() {
    let Some(pub_tool) = tool("mosquitto_pub") else {
        return;
    };
    let (b, mut seen) = start(bounded(1, usize::MAX)).await;
    let port = b.addr.port();
    let publish = |version: &'static str, topic: &'static str| {
        let args = ["-V", version, "-q", "1", "-r", "-t", topic, "-m", "v"];
        async move { run(pub_tool, port, &args).await }
    };
    let out = publish("mqttv5", "held").await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(seen.recv().await.unwrap().topic, "held");
    let out = publish("mqttv5", "new5").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("quota exceeded"), "{out:?}");
    let out = publish("mqttv311", "new311").await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        seen.recv().await.unwrap().topic,
        "new311",
        "stored all the same"
    );
    assert_eq!(retained_now(b.addr, "probe").await, vec!["held=v"]);
    assert_eq!(b.handle.stats().retained_refused, 2);
    b.shutdown.cancel();
}

/// mosquitto_sub -c (a persistent session) past `max_sessions`: refused at CONNECT in both
/// versions; without -c it connects.
#[tokio::test]
async fn mosquitto_sub_persistent_session_beyond_max_sessions() {
    let Some(sub_tool) = tool("mosquitto_sub") else {
        return;
    };
    let (b, _seen) = start(bounded(usize::MAX, 1)).await;
    let port = b.addr.port();
    // -W 1: wait a second for a message, then exit (status 27 for the timeout).
    let sub = |version: &'static str, id: &'static str, persistent: bool| {
        let mut args = vec!["-V", version, "-i", id, "-t", "x", "-q", "1", "-W", "1"];
        if persistent {
            args.push("-c");
            if version == "mqttv5" {
                args.extend(["-x", "60"]);
            }
        }
        async move { run(sub_tool, port, &args).await }
    };
    let refused = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        !out.status.success() && stderr.contains("connection") && !stderr.contains("timed out")
    };
    let out = sub("mqttv311", "first", true).await;
    assert!(!refused(&out), "{out:?}");
    let out = sub("mqttv311", "second", true).await;
    assert!(refused(&out), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("unavailable"),
        "{out:?}"
    );
    let out = sub("mqttv5", "second5", true).await;
    assert!(refused(&out), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("quota"),
        "{out:?}"
    );
    let out = sub("mqttv311", "clean", false).await;
    assert!(!refused(&out), "{out:?}");
    let out = sub("mqttv311", "first", true).await;
    assert!(!refused(&out), "the holder resumes: {out:?}");
    assert_eq!(b.handle.stats().sessions_refused, 2);
    b.shutdown.cancel();
}
