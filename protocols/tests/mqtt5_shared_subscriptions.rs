//! MQTT 5 shared subscriptions (§4.8.2): `$share/{group}/{filter}` delivers each message to one
//! member of the group (round robin here), and a shared subscribe gets no retained messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;

async fn publish(c: &mut Raw5, topic: &str, payload: String, retain: bool) {
    let mut p = v5::Publish::new(topic, Q5::AtMostOnce, Bytes::from(payload), None);
    p.retain = retain;
    c.send(v5::Packet::Publish(p)).await;
}

async fn member(addr: std::net::SocketAddr, id: &str, filter: &str) -> Raw5 {
    let mut c = Raw5::connect(addr, id).await;
    c.subscribe(filter, Q5::AtMostOnce).await;
    c
}

#[tokio::test]
async fn each_message_goes_to_one_member_of_the_group_in_turn() {
    let (b, _seen) = start(settings()).await;
    let mut a = member(b.addr, "a", "$share/g/s/#").await;
    let mut c = member(b.addr, "c", "$share/g/s/#").await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    for i in 0..4 {
        publish(&mut publisher, "s/1", format!("{i}"), false).await;
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push((0, a.expect_publish().await.payload));
        got.push((1, c.expect_publish().await.payload));
    }
    a.expect_no_publish().await;
    c.expect_no_publish().await;
    let mut payloads: Vec<_> = got.iter().map(|(_, p)| p.clone()).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        vec!["0", "1", "2", "3"],
        "each message exactly once"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn every_group_and_every_ordinary_subscriber_gets_each_message() {
    let (b, _seen) = start(settings()).await;
    let mut solo = member(b.addr, "solo", "$share/one/s/#").await;
    let mut x = member(b.addr, "x", "$share/two/s/#").await;
    let mut y = member(b.addr, "y", "$share/two/s/#").await;
    let mut plain = member(b.addr, "plain", "s/#").await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    for i in 0..2 {
        publish(&mut publisher, "s/1", format!("{i}"), false).await;
    }
    for i in 0..2 {
        assert_eq!(solo.expect_publish().await.payload, format!("{i}"));
        assert_eq!(plain.expect_publish().await.payload, format!("{i}"));
    }
    x.expect_publish().await;
    y.expect_publish().await;
    x.expect_no_publish().await;
    y.expect_no_publish().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn retained_messages_are_not_sent_on_a_shared_subscribe() {
    let (b, _seen) = start(settings()).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "r/1", "kept".into(), true).await;
    publisher.expect_no_publish().await;
    let mut shared = member(b.addr, "m", "$share/g/r/#").await;
    shared.expect_no_publish().await;
    let mut plain = member(b.addr, "p", "r/#").await;
    assert!(
        plain.expect_publish().await.retain,
        "the retained message is there"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn unsubscribe_by_the_full_share_name_leaves_the_group() {
    let (b, _seen) = start(settings()).await;
    let mut a = member(b.addr, "a", "$share/g/s/#").await;
    let mut c = member(b.addr, "c", "$share/g/s/#").await;
    let mut u = v5::Unsubscribe::new("$share/g/s/#", None);
    u.pkid = 2;
    a.send(v5::Packet::Unsubscribe(u)).await;
    match a.recv().await {
        Some(v5::Packet::UnsubAck(ack)) => {
            assert_eq!(ack.reasons, vec![v5::UnsubAckReason::Success])
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    for i in 0..2 {
        publish(&mut publisher, "s/1", format!("{i}"), false).await;
    }
    c.expect_publish().await;
    c.expect_publish().await;
    a.expect_no_publish().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn connack_announces_shared_subscriptions_available() {
    let (b, _seen) = start(settings()).await;
    let (_c, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet("c"), None).await;
    assert_ne!(
        ack.properties
            .expect("properties")
            .shared_subscription_available,
        Some(0)
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn invalid_share_name_is_refused_as_an_invalid_filter() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw5::connect(b.addr, "c").await;
    let ack = c
        .subscribe_with(
            vec![
                v5::Filter::new("$share/g+/a", Q5::AtMostOnce),
                v5::Filter::new("$share/g", Q5::AtMostOnce),
            ],
            None,
        )
        .await;
    assert_eq!(
        ack.return_codes,
        vec![
            v5::SubscribeReasonCode::TopicFilterInvalid,
            v5::SubscribeReasonCode::TopicFilterInvalid
        ]
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw5::connect(b.addr, "c").await;
    let mut f = v5::Filter::new("$share/g/a", Q5::AtMostOnce);
    f.nolocal = true;
    let mut s = v5::Subscribe::new(f, None);
    s.pkid = 1;
    c.send(v5::Packet::Subscribe(s)).await;
    match c.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    b.shutdown.cancel();
}
