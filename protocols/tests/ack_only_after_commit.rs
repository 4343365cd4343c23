//! "Acknowledged means stored": PUBACK / PUBREC are written only after the gateway's reply, in
//! order, and a refusal is never acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use outpost_protocols::{IngestRefusal, QoS};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

#[tokio::test]
async fn puback_waits_for_the_gateway_reply_and_acks_in_order() {
    let (b, mut ingest) = start_manual(settings()).await;
    let mut c = Raw4::connect(b.addr, "pub").await;
    c.publish("s/1", rumqttc::QoS::AtLeastOnce, 1, b"one").await;
    c.publish("s/2", rumqttc::QoS::AtLeastOnce, 2, b"two").await;

    let mut first = tokio::time::timeout(WAIT, ingest.recv())
        .await
        .unwrap()
        .unwrap();
    let mut second = tokio::time::timeout(WAIT, ingest.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.topic, "s/1");
    assert_eq!(second.qos, QoS::AtLeastOnce);
    assert_eq!(&*first.client_id, "pub");
    // The broker kept reading while the first reply was outstanding (both were handed over),
    // but acks nothing yet.
    c.expect_silence().await;

    // The second commit alone does not release the first ack: acks leave in order.
    second.reply.take().unwrap().send(Ok(())).unwrap();
    c.expect_silence().await;

    first.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(c.recv().await, Some(v4::Packet::PubAck(v4::PubAck::new(1))));
    assert_eq!(c.recv().await, Some(v4::Packet::PubAck(v4::PubAck::new(2))));
    b.shutdown.cancel();
}

#[tokio::test]
async fn pubrec_waits_for_the_reply_and_duplicates_are_not_reingested() {
    let (b, mut ingest) = start_manual(settings()).await;
    let mut c = Raw4::connect(b.addr, "q2").await;
    c.publish("s/q2", rumqttc::QoS::ExactlyOnce, 7, b"x").await;
    let mut msg = tokio::time::timeout(WAIT, ingest.recv())
        .await
        .unwrap()
        .unwrap();
    c.expect_silence().await;
    msg.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(c.recv().await, Some(v4::Packet::PubRec(v4::PubRec::new(7))));

    // A retransmission before PUBREL: PUBREC again, nothing new for the gateway.
    let mut dup = v4::Publish::from_bytes(
        "s/q2",
        rumqttc::QoS::ExactlyOnce,
        bytes::Bytes::from_static(b"x"),
    );
    dup.pkid = 7;
    dup.dup = true;
    c.send(v4::Packet::Publish(dup)).await;
    assert_eq!(c.recv().await, Some(v4::Packet::PubRec(v4::PubRec::new(7))));
    c.send(v4::Packet::PubRel(v4::PubRel::new(7))).await;
    assert_eq!(
        c.recv().await,
        Some(v4::Packet::PubComp(v4::PubComp::new(7)))
    );
    assert!(
        tokio::time::timeout(QUIET, ingest.recv()).await.is_err(),
        "duplicate QoS 2 publish was handed over again"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn refusal_closes_a_v4_connection_without_puback() {
    let (b, _seen) = start_replying(settings(), |_| Err(IngestRefusal::QuotaExceeded)).await;
    let mut c = Raw4::connect(b.addr, "refused").await;
    c.publish("s/1", rumqttc::QoS::AtLeastOnce, 1, b"x").await;
    let got = c.expect_closed().await;
    assert!(got.is_empty(), "nothing may be acked, got {got:?}");
    assert_eq!(b.handle.stats().ingest_refused, 1);
    b.shutdown.cancel();
}

#[tokio::test]
async fn dropped_reply_counts_as_refusal() {
    let (b, mut ingest) = start_manual(settings()).await;
    let mut c = Raw4::connect(b.addr, "dropped").await;
    c.publish("s/1", rumqttc::QoS::AtLeastOnce, 1, b"x").await;
    let msg = tokio::time::timeout(WAIT, ingest.recv())
        .await
        .unwrap()
        .unwrap();
    drop(msg);
    assert!(c.expect_closed().await.is_empty());
    assert_eq!(b.handle.stats().ingest_refused, 1);
    b.shutdown.cancel();
}

#[tokio::test]
async fn refusal_gives_v5_reason_codes_and_keeps_the_connection() {
    let (b, _seen) = start_replying(settings(), |m| {
        if m.topic == "full" {
            Err(IngestRefusal::QuotaExceeded)
        } else {
            Err(IngestRefusal::StoreUnavailable)
        }
    })
    .await;
    let (mut c, _) = Raw5::connect_with(b.addr, Raw5::connect_packet("v5ref"), None).await;
    let mut p = v5::Publish::new("full", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "x", None);
    p.pkid = 1;
    c.send(v5::Packet::Publish(p)).await;
    match c.recv().await {
        Some(v5::Packet::PubAck(a)) => {
            assert_eq!(a.pkid, 1);
            assert_eq!(a.reason, v5::PubAckReason::QuotaExceeded);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let mut p = v5::Publish::new(
        "broken",
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        "x",
        None,
    );
    p.pkid = 2;
    c.send(v5::Packet::Publish(p)).await;
    match c.recv().await {
        Some(v5::Packet::PubRec(a)) => assert_eq!(a.reason, v5::PubRecReason::UnspecifiedError),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    c.send(v5::Packet::PingReq(v5::PingReq)).await;
    assert!(matches!(c.recv().await, Some(v5::Packet::PingResp(_))));
    assert_eq!(b.handle.stats().ingest_refused, 2);
    b.shutdown.cancel();
}

#[tokio::test]
async fn backpressure_stops_reading_at_max_inbound_pending() {
    let mut s = settings();
    s.max_inbound_pending = 2;
    let (b, mut ingest) = start_manual(s).await;
    let mut c = Raw4::connect(b.addr, "fast").await;
    for pkid in 1..=4 {
        c.publish("s", rumqttc::QoS::AtLeastOnce, pkid, b"x").await;
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            tokio::time::timeout(WAIT, ingest.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        tokio::time::timeout(QUIET, ingest.recv()).await.is_err(),
        "a third message was read while two replies were outstanding"
    );
    for mut m in held {
        m.reply.take().unwrap().send(Ok(())).unwrap();
    }
    for _ in 0..2 {
        let mut m = tokio::time::timeout(WAIT, ingest.recv())
            .await
            .unwrap()
            .unwrap();
        m.reply.take().unwrap().send(Ok(())).unwrap();
    }
    for pkid in 1..=4 {
        assert_eq!(
            c.recv().await,
            Some(v4::Packet::PubAck(v4::PubAck::new(pkid)))
        );
    }
    b.shutdown.cancel();
}

#[tokio::test]
async fn shutdown_finishes_pending_acks() {
    let (b, mut ingest) = start_manual(settings()).await;
    let mut c = Raw4::connect(b.addr, "draining").await;
    c.publish("s", rumqttc::QoS::AtLeastOnce, 9, b"x").await;
    let mut m = tokio::time::timeout(WAIT, ingest.recv())
        .await
        .unwrap()
        .unwrap();
    b.shutdown.cancel();
    tokio::time::sleep(QUIET).await;
    m.reply.take().unwrap().send(Ok(())).unwrap();
    assert_eq!(c.recv().await, Some(v4::Packet::PubAck(v4::PubAck::new(9))));
    assert!(c.expect_closed().await.is_empty());
    tokio::time::timeout(WAIT, b.task)
        .await
        .expect("run returns")
        .unwrap();
}
