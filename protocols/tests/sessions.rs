//! Persistent sessions and takeover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use outpost_protocols::QoS;
use rumqttc::QoS as Q;
use rumqttc::mqttbytes::v4;

fn persistent(id: &str) -> v4::Connect {
    let mut c = v4::Connect::new(id);
    c.keep_alive = 0;
    c.clean_session = false;
    c
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_queued_messages() {
    let (b, _seen) = start(settings()).await;
    let (mut c, ack) = Raw4::connect_with(b.addr, persistent("keeper")).await;
    assert!(!ack.session_present);
    c.subscribe("k/#", Q::AtLeastOnce).await;
    c.send(v4::Packet::Disconnect).await;
    c.expect_closed().await;

    for i in 0..3u8 {
        b.handle
            .publish("k/1", Bytes::from(vec![i]), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    b.handle
        .publish("k/1", Bytes::from_static(b"q0"), QoS::AtMostOnce, false)
        .await
        .unwrap();

    let (mut c, ack) = Raw4::connect_with(b.addr, persistent("keeper")).await;
    assert!(ack.session_present);
    for i in 0..3u8 {
        let p = c.expect_publish().await;
        assert_eq!(p.payload[0], i);
        c.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid))).await;
    }
    c.expect_silence().await; // QoS 0 is not queued for offline sessions
    // Still subscribed.
    b.handle
        .publish("k/2", Bytes::from_static(b"live"), QoS::AtMostOnce, false)
        .await
        .unwrap();
    assert_eq!(&c.expect_publish().await.payload[..], b"live");
    b.shutdown.cancel();
}

#[tokio::test]
async fn unacked_inflight_is_resent_with_dup_on_resume() {
    let (b, _seen) = start(settings()).await;
    let (mut c, _) = Raw4::connect_with(b.addr, persistent("r")).await;
    c.subscribe("r", Q::AtLeastOnce).await;
    b.handle
        .publish("r", Bytes::from_static(b"m"), QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let first = c.expect_publish().await;
    assert!(!first.dup);
    drop(c); // never acked
    tokio::time::sleep(QUIET).await;
    let (mut c, ack) = Raw4::connect_with(b.addr, persistent("r")).await;
    assert!(ack.session_present);
    let again = c.expect_publish().await;
    assert!(again.dup);
    assert_eq!(again.pkid, first.pkid);
    b.shutdown.cancel();
}

#[tokio::test]
async fn clean_session_discards_the_old_one() {
    let (b, _seen) = start(settings()).await;
    let (mut c, _) = Raw4::connect_with(b.addr, persistent("d")).await;
    c.subscribe("d", Q::AtLeastOnce).await;
    c.send(v4::Packet::Disconnect).await;
    c.expect_closed().await;
    let mut clean = v4::Connect::new("d");
    clean.keep_alive = 0;
    let (mut c, ack) = Raw4::connect_with(b.addr, clean).await;
    assert!(!ack.session_present);
    b.handle
        .publish("d", Bytes::from_static(b"m"), QoS::AtLeastOnce, false)
        .await
        .unwrap();
    c.expect_silence().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn takeover_closes_the_old_connection_publishes_its_will_and_keeps_the_session() {
    let (b, _seen) = start(settings()).await;
    let mut watcher = Raw4::connect(b.addr, "watcher").await;
    watcher.subscribe("wills/#", Q::AtMostOnce).await;

    let mut first = persistent("dup-id");
    first.last_will = Some(v4::LastWill::new(
        "wills/dup-id",
        "taken",
        Q::AtMostOnce,
        false,
    ));
    let (mut old, _) = Raw4::connect_with(b.addr, first).await;
    old.subscribe("t", Q::AtLeastOnce).await;

    let (mut new, ack) = Raw4::connect_with(b.addr, persistent("dup-id")).await;
    assert!(ack.session_present);
    old.expect_closed().await;
    assert_eq!(&watcher.expect_publish().await.payload[..], b"taken");

    b.handle
        .publish("t", Bytes::from_static(b"to new"), QoS::AtLeastOnce, false)
        .await
        .unwrap();
    assert_eq!(&new.expect_publish().await.payload[..], b"to new");
    b.shutdown.cancel();
}
