//! MQTT 5 receive maximum in the client-to-broker direction (§3.3.4): the broker announces
//! `max_inbound_pending` in CONNACK, and a client that has more QoS 1/2 publishes without PUBACK
//! or PUBCOMP than that is disconnected with 0x93; up to it, nothing happens. (The other
//! direction, and the resend after a reconnect, are in tests/tests/paho_mqtt5_packets.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;

fn publish(pkid: u16, qos: Q5) -> v5::Packet {
    let mut p = v5::Publish::new("rm/t", qos, Bytes::from_static(b"x"), None);
    p.pkid = pkid;
    v5::Packet::Publish(p)
}

#[tokio::test]
async fn one_publish_over_the_receive_maximum_is_disconnected_with_0x93() {
    let mut s = settings();
    s.max_inbound_pending = 3;
    // The gateway does not answer: every publish stays unacknowledged.
    let (b, mut ingest) = start_manual(s).await;
    let (mut c, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet("rm"), None).await;
    assert_eq!(ack.properties.expect("properties").receive_max, Some(3));
    c.send(publish(1, Q5::AtLeastOnce)).await;
    c.send(publish(2, Q5::ExactlyOnce)).await;
    c.send(publish(3, Q5::AtLeastOnce)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::time::timeout(WAIT, ingest.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // A resend of an id already counted is not a fourth, nor is QoS 0.
    let mut dup = v5::Publish::new("rm/t", Q5::AtLeastOnce, Bytes::from_static(b"x"), None);
    dup.pkid = 3;
    dup.dup = true;
    c.send(v5::Packet::Publish(dup)).await;
    c.send(publish(0, Q5::AtMostOnce)).await;
    c.send(v5::Packet::PingReq(v5::PingReq)).await;
    assert_eq!(c.recv().await, Some(v5::Packet::PingResp(v5::PingResp)));
    // The fourth unacknowledged one is.
    c.send(publish(4, Q5::AtLeastOnce)).await;
    match c.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(
                d.reason_code,
                v5::DisconnectReasonCode::ReceiveMaximumExceeded
            )
        }
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    assert!(c.recv().await.is_none(), "closed after DISCONNECT");
    assert_eq!(b.handle.stats().malformed_packets, 1);
    drop(held);
    b.shutdown.cancel();
}

#[tokio::test]
async fn acks_and_pubcomp_free_room_under_the_receive_maximum() {
    let mut s = settings();
    s.max_inbound_pending = 2;
    let (b, mut ingest) = start_manual(s).await;
    let (mut c, _) = Raw5::connect_with(b.addr, Raw5::connect_packet("rm2"), None).await;
    // Ten rounds of two: a QoS 2 (counted until PUBCOMP) and a QoS 1 (until PUBACK).
    for round in 0..10u16 {
        let (q2, q1) = (round * 2 + 1, round * 2 + 2);
        c.send(publish(q2, Q5::ExactlyOnce)).await;
        c.send(publish(q1, Q5::AtLeastOnce)).await;
        for _ in 0..2 {
            let mut m = tokio::time::timeout(WAIT, ingest.recv())
                .await
                .unwrap()
                .unwrap();
            m.reply.take().unwrap().send(Ok(())).unwrap();
        }
        match c.recv().await {
            Some(v5::Packet::PubRec(r)) => assert_eq!(r.pkid, q2),
            other => panic!("expected PUBREC {q2}, got {other:?}"),
        }
        match c.recv().await {
            Some(v5::Packet::PubAck(a)) => assert_eq!(a.pkid, q1),
            other => panic!("expected PUBACK {q1}, got {other:?}"),
        }
        c.send(v5::Packet::PubRel(v5::PubRel::new(q2, None))).await;
        match c.recv().await {
            Some(v5::Packet::PubComp(r)) => assert_eq!(r.pkid, q2),
            other => panic!("expected PUBCOMP {q2}, got {other:?}"),
        }
    }
    assert_eq!(b.handle.stats().malformed_packets, 0);
    b.shutdown.cancel();
}
