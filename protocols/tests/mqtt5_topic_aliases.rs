//! MQTT 5 topic aliases from clients (§3.3.2.3.4): announced in CONNACK, set by a PUBLISH that
//! carries alias and topic, used by one that carries the alias and an empty topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;

fn aliased(topic: &str, alias: u16, payload: &'static [u8]) -> v5::Packet {
    v5::Packet::Publish(v5::Publish::new(
        topic,
        Q5::AtMostOnce,
        Bytes::from_static(payload),
        Some(v5::PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        }),
    ))
}

async fn expect_disconnect(c: &mut Raw5, code: v5::DisconnectReasonCode) {
    match c.recv().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(d.reason_code, code),
        other => panic!("expected DISCONNECT {code:?}, got {other:?}"),
    }
    assert!(c.recv().await.is_none(), "closed after DISCONNECT");
}

#[tokio::test]
async fn connack_announces_a_topic_alias_maximum_of_16() {
    let (b, _seen) = start(settings()).await;
    let (_c, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet("c"), None).await;
    assert_eq!(
        ack.properties.expect("properties").topic_alias_max,
        Some(16)
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn alias_with_topic_sets_it_and_alias_with_empty_topic_uses_it() {
    let (b, mut seen) = start(settings()).await;
    let mut sub = Raw5::connect(b.addr, "sub").await;
    sub.subscribe("a/#", Q5::AtMostOnce).await;
    let mut c = Raw5::connect(b.addr, "pub").await;
    c.send(aliased("a/long/topic", 16, b"1")).await;
    c.send(aliased("", 16, b"2")).await;
    // Re-pointing an alias is allowed.
    c.send(aliased("a/other", 16, b"3")).await;
    c.send(aliased("", 16, b"4")).await;
    for (topic, payload) in [
        ("a/long/topic", "1"),
        ("a/long/topic", "2"),
        ("a/other", "3"),
        ("a/other", "4"),
    ] {
        let got = sub.expect_publish().await;
        assert_eq!(&got.topic[..], topic.as_bytes());
        assert_eq!(&got.payload[..], payload.as_bytes());
        assert!(
            got.properties.is_none_or(|p| p.topic_alias.is_none()),
            "the alias is the publisher's, never forwarded"
        );
        let inbound = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inbound.topic, topic, "the gateway sees the real topic");
    }
    b.shutdown.cancel();
}

#[tokio::test]
async fn topic_alias_0_is_refused_with_disconnect_0x94() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw5::connect(b.addr, "c").await;
    c.send(aliased("a/b", 0, b"x")).await;
    expect_disconnect(&mut c, v5::DisconnectReasonCode::TopicAliasInvalid).await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn topic_alias_above_the_maximum_is_refused_with_disconnect_0x94() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw5::connect(b.addr, "c").await;
    c.send(aliased("a/b", 17, b"x")).await;
    expect_disconnect(&mut c, v5::DisconnectReasonCode::TopicAliasInvalid).await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn alias_never_set_on_this_connection_is_a_protocol_error() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw5::connect(b.addr, "c").await;
    c.send(aliased("a/b", 1, b"x")).await;
    c.disconnect().await;
    // Aliases belong to the connection: a new one starts without any.
    let mut c = Raw5::connect(b.addr, "c").await;
    c.send(aliased("", 1, b"y")).await;
    expect_disconnect(&mut c, v5::DisconnectReasonCode::ProtocolError).await;
    b.shutdown.cancel();
}
