//! MQTT 3.1.1 behaviour against raw packets from rumqttc's codec.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use outpost_protocols::QoS;
use rumqttc::QoS as Q;
use rumqttc::mqttbytes::v4;

#[tokio::test]
async fn keep_alive_zero_is_accepted_and_never_times_out() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw4::connect(b.addr, "ka0").await; // keep_alive = 0
    tokio::time::sleep(Duration::from_millis(1600)).await;
    c.send(v4::Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(v4::Packet::PingResp));
    b.shutdown.cancel();
}

#[tokio::test]
async fn keep_alive_expiry_closes_and_publishes_the_will() {
    let (b, mut seen) = start(settings()).await;
    let mut watcher = Raw4::connect(b.addr, "watcher").await;
    watcher.subscribe("wills/#", Q::AtLeastOnce).await;
    let mut connect = v4::Connect::new("sleepy");
    connect.keep_alive = 1;
    connect.last_will = Some(v4::LastWill::new(
        "wills/sleepy",
        "gone",
        Q::AtLeastOnce,
        false,
    ));
    let (mut c, ack) = Raw4::connect_with(b.addr, connect).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    let started = std::time::Instant::now();
    c.expect_closed().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "closed after {took:?}, before 1.5x keep-alive"
    );
    let will = watcher.expect_publish().await;
    assert_eq!(will.topic, "wills/sleepy");
    assert_eq!(&will.payload[..], b"gone");
    assert_eq!(b.handle.stats().keepalive_timeouts, 1);
    let handed = tokio::time::timeout(WAIT, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(handed.topic, "wills/sleepy");
    assert!(handed.reply.is_none(), "wills carry no reply");
    b.shutdown.cancel();
}

#[tokio::test]
async fn will_on_abnormal_close_not_on_disconnect() {
    let (b, _seen) = start(settings()).await;
    let mut watcher = Raw4::connect(b.addr, "watcher").await;
    watcher.subscribe("wills/#", Q::AtMostOnce).await;

    let will = |id: &str| {
        let mut c = v4::Connect::new(id);
        c.keep_alive = 0;
        c.last_will = Some(v4::LastWill::new(
            format!("wills/{id}"),
            "bye",
            Q::AtMostOnce,
            false,
        ));
        c
    };
    let (mut polite, _) = Raw4::connect_with(b.addr, will("polite")).await;
    polite.send(v4::Packet::Disconnect).await;
    polite.expect_closed().await;
    watcher.expect_silence().await;

    let (rude, _) = Raw4::connect_with(b.addr, will("rude")).await;
    drop(rude);
    assert_eq!(watcher.expect_publish().await.topic, "wills/rude");
    b.shutdown.cancel();
}

#[tokio::test]
async fn retained_will_is_kept() {
    let (b, _seen) = start(settings()).await;
    let mut c = v4::Connect::new("r");
    c.keep_alive = 0;
    c.last_will = Some(v4::LastWill::new(
        "status/r",
        "offline",
        Q::AtLeastOnce,
        true,
    ));
    let (rude, _) = Raw4::connect_with(b.addr, c).await;
    drop(rude);
    tokio::time::sleep(QUIET).await;
    let mut late = Raw4::connect(b.addr, "late").await;
    late.subscribe("status/+", Q::AtLeastOnce).await;
    let p = late.expect_publish().await;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"offline");
    b.shutdown.cancel();
}

#[tokio::test]
async fn delivery_qos_is_the_minimum_of_publish_and_subscription() {
    let (b, _seen) = start(settings()).await;
    let mut low = Raw4::connect(b.addr, "low").await;
    low.subscribe("d/#", Q::AtMostOnce).await;
    let mut high = Raw4::connect(b.addr, "high").await;
    high.subscribe("d/#", Q::ExactlyOnce).await;
    let mut p = Raw4::connect(b.addr, "p").await;
    p.publish("d/1", Q::AtLeastOnce, 1, b"m").await;
    assert!(matches!(p.recv().await, Some(v4::Packet::PubAck(_))));
    assert_eq!(low.expect_publish().await.qos, Q::AtMostOnce);
    let got = high.expect_publish().await;
    assert_eq!(got.qos, Q::AtLeastOnce, "never above the published QoS");
    high.send(v4::Packet::PubAck(v4::PubAck::new(got.pkid)))
        .await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_max_qos() {
    let (b, _seen) = start(settings()).await;
    let mut s = Raw4::connect(b.addr, "s").await;
    s.subscribe("o/+", Q::AtMostOnce).await;
    s.subscribe("o/#", Q::AtLeastOnce).await;
    let mut p = Raw4::connect(b.addr, "p").await;
    p.publish("o/1", Q::ExactlyOnce, 3, b"m").await;
    let got = s.expect_publish().await;
    assert_eq!(got.qos, Q::AtLeastOnce);
    s.expect_silence().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn retained_messages_stored_sent_on_subscribe_and_cleared() {
    let (b, _seen) = start(settings()).await;
    let mut live = Raw4::connect(b.addr, "live").await;
    live.subscribe("r/#", Q::AtMostOnce).await;
    let mut p = Raw4::connect(b.addr, "p").await;
    let mut msg = v4::Publish::from_bytes("r/1", Q::AtLeastOnce, Bytes::from_static(b"v1"));
    msg.pkid = 1;
    msg.retain = true;
    p.send(v4::Packet::Publish(msg)).await;
    assert!(matches!(p.recv().await, Some(v4::Packet::PubAck(_))));
    assert!(
        !live.expect_publish().await.retain,
        "forwarding clears the retain flag"
    );

    let mut late = Raw4::connect(b.addr, "late").await;
    late.subscribe("r/+", Q::AtLeastOnce).await;
    let got = late.expect_publish().await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"v1");

    let mut clear = v4::Publish::from_bytes("r/1", Q::AtMostOnce, Bytes::new());
    clear.retain = true;
    p.send(v4::Packet::Publish(clear)).await;
    tokio::time::sleep(QUIET).await;
    let mut later = Raw4::connect(b.addr, "later").await;
    later.subscribe("r/+", Q::AtLeastOnce).await;
    later.expect_silence().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn invalid_filter_fails_alone_in_suback() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw4::connect(b.addr, "c").await;
    c.send(v4::Packet::Subscribe(v4::Subscribe::new_many([
        v4::SubscribeFilter::new("ok/#".into(), Q::AtLeastOnce),
        v4::SubscribeFilter::new("bad/#/x".into(), Q::AtLeastOnce),
        v4::SubscribeFilter::new("q2/+".into(), Q::ExactlyOnce),
    ])))
    .await;
    match c.recv().await {
        Some(v4::Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![
                v4::SubscribeReasonCode::Success(Q::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
                v4::SubscribeReasonCode::Success(Q::ExactlyOnce),
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    c.send(v4::Packet::Unsubscribe(v4::Unsubscribe::new("ok/#")))
        .await;
    assert!(matches!(c.recv().await, Some(v4::Packet::UnsubAck(_))));
    b.shutdown.cancel();
}

#[tokio::test]
async fn wildcard_in_publish_topic_closes_the_connection() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw4::connect(b.addr, "c").await;
    c.publish("a/+", Q::AtMostOnce, 0, b"x").await;
    c.expect_closed().await;
    assert_eq!(b.handle.stats().invalid_topics, 1);
    b.shutdown.cancel();
}

#[tokio::test]
async fn second_connect_is_a_protocol_violation() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw4::connect(b.addr, "twice").await;
    c.send(v4::Packet::Connect(v4::Connect::new("twice"))).await;
    c.expect_closed().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn mqtt31_gets_unacceptable_protocol_version() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw4::tcp(b.addr).await;
    let mut body = vec![0x00, 0x06];
    body.extend_from_slice(b"MQIsdp");
    body.extend_from_slice(&[3, 0x02, 0, 60, 0, 1, b'a']);
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    c.send_raw(&pkt).await;
    match c.recv().await {
        Some(v4::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v4::ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.expect_closed().await;
    assert_eq!(b.handle.stats().connections_refused, 1);
    b.shutdown.cancel();
}

#[tokio::test]
async fn empty_client_id_rules() {
    let (b, _seen) = start(settings()).await;
    let mut persistent = v4::Connect::new("");
    persistent.clean_session = false;
    let (mut c, ack) = Raw4::connect_with(b.addr, persistent).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    c.expect_closed().await;

    let (mut c, ack) = Raw4::connect_with(b.addr, v4::Connect::new("")).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    c.send(v4::Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(v4::Packet::PingResp));
    b.shutdown.cancel();
}

#[tokio::test]
async fn no_connect_in_time_is_closed() {
    let mut s = settings();
    s.connect_timeout = Duration::from_millis(200);
    let (b, _seen) = start(s).await;
    let mut c = Raw4::tcp(b.addr).await;
    c.expect_closed().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn gateway_publish_reaches_subscribers_not_ingest() {
    let (b, mut seen) = start(settings()).await;
    let mut s = Raw4::connect(b.addr, "s").await;
    s.subscribe("cmd/#", Q::AtLeastOnce).await;
    b.handle
        .publish(
            "cmd/led",
            Bytes::from_static(b"on"),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    let got = s.expect_publish().await;
    assert_eq!(got.topic, "cmd/led");
    assert_eq!(got.qos, Q::AtLeastOnce);
    assert!(tokio::time::timeout(QUIET, seen.recv()).await.is_err());
    assert!(
        b.handle
            .publish("cmd/#", Bytes::new(), QoS::AtMostOnce, false)
            .await
            .is_err()
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn qos2_outbound_flow_completes() {
    let (b, _seen) = start(settings()).await;
    let mut s = Raw4::connect(b.addr, "s").await;
    s.subscribe("q/#", Q::ExactlyOnce).await;
    b.handle
        .publish("q/1", Bytes::from_static(b"a"), QoS::ExactlyOnce, false)
        .await
        .unwrap();
    let p = s.expect_publish().await;
    assert_eq!(p.qos, Q::ExactlyOnce);
    s.send(v4::Packet::PubRec(v4::PubRec::new(p.pkid))).await;
    assert_eq!(
        s.recv().await,
        Some(v4::Packet::PubRel(v4::PubRel::new(p.pkid)))
    );
    s.send(v4::Packet::PubComp(v4::PubComp::new(p.pkid))).await;
    s.send(v4::Packet::PingReq).await;
    assert_eq!(s.recv().await, Some(v4::Packet::PingResp));
    b.shutdown.cancel();
}
