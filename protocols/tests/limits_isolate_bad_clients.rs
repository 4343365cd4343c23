//! Limits: malformed and oversized packets close only their own connection; past
//! `max_connections` a client gets a CONNACK refusal, never a silent hang; slow subscribers drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use outpost_protocols::QoS;
use rumqttc::QoS as Q;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

#[tokio::test]
async fn malformed_packet_closes_only_that_connection() {
    let (b, _seen) = start(settings()).await;
    let mut good = Raw4::connect(b.addr, "good").await;
    good.subscribe("g/#", Q::AtMostOnce).await;
    let mut bad = Raw4::connect(b.addr, "bad").await;
    // PUBLISH with QoS 3 (both QoS bits set) is malformed.
    bad.send_raw(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01])
        .await;
    bad.expect_closed().await;
    let mut bad2 = Raw4::connect(b.addr, "bad2").await;
    // Remaining length with five continuation bytes.
    bad2.send_raw(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
    bad2.expect_closed().await;
    assert_eq!(b.handle.stats().malformed_packets, 2);

    let mut p = Raw4::connect(b.addr, "p").await;
    p.publish("g/1", Q::AtMostOnce, 0, b"still fine").await;
    assert_eq!(&good.expect_publish().await.payload[..], b"still fine");
    b.shutdown.cancel();
}

#[tokio::test]
async fn oversized_packet_closes_the_connection() {
    let mut s = settings();
    s.max_packet_size = 1024;
    let (b, _seen) = start(s).await;
    let mut c = Raw4::connect(b.addr, "big").await;
    let payload: &'static [u8] = Box::leak(vec![0u8; 2048].into_boxed_slice());
    c.publish("big", Q::AtLeastOnce, 1, payload).await;
    assert!(c.expect_closed().await.is_empty());
    assert_eq!(b.handle.stats().oversized_packets, 1);
    let mut ok = Raw4::connect(b.addr, "small").await;
    ok.publish("small", Q::AtLeastOnce, 1, b"x").await;
    assert!(matches!(ok.recv().await, Some(v4::Packet::PubAck(_))));
    b.shutdown.cancel();
}

#[tokio::test]
async fn beyond_max_connections_gets_connack_refusal() {
    let mut s = settings();
    s.max_connections = 2;
    let (b, _seen) = start(s).await;
    let _a = Raw4::connect(b.addr, "a").await;
    let _b = Raw4::connect(b.addr, "b").await;
    let (mut c, ack) = Raw4::connect_with(b.addr, v4::Connect::new("c")).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::ServiceUnavailable);
    c.expect_closed().await;
    let (mut c5, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet("c5"), None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::QuotaExceeded);
    assert!(c5.recv().await.is_none());
    let stats = b.handle.stats();
    assert_eq!(stats.connections_refused, 2);
    assert_eq!(stats.connections_current, 2);

    drop(_a);
    tokio::time::sleep(QUIET).await;
    let _c = Raw4::connect(b.addr, "c").await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn slow_subscriber_drops_and_counts_without_blocking_publishers() {
    let mut s = settings();
    s.max_inflight = 1;
    s.max_queued_messages = 3;
    let (b, _seen) = start(s).await;
    let mut slow = Raw4::connect(b.addr, "slow").await;
    slow.subscribe("x", Q::AtLeastOnce).await;
    b.handle
        .publish("x", Bytes::from(vec![0]), QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let first = slow.expect_publish().await;
    assert_eq!(first.payload[0], 0);
    for i in 1..10u8 {
        b.handle
            .publish("x", Bytes::from(vec![i]), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    // One in flight, three queued, six dropped; the publisher was never blocked.
    assert_eq!(b.handle.stats().dropped_queue_full, 6);
    slow.expect_silence().await;
    slow.send(v4::Packet::PubAck(v4::PubAck::new(first.pkid)))
        .await;
    assert_eq!(slow.expect_publish().await.payload[0], 1);
    b.shutdown.cancel();
}
