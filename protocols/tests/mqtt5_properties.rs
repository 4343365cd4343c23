//! MQTT 5 publish properties passed through to subscribers (§3.3.2.3), and message expiry
//! (§3.3.2.3.3): a message waits no longer than its publisher allowed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;

fn props(expiry: Option<u32>) -> v5::PublishProperties {
    v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: expiry,
        topic_alias: None,
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![
            ("k".into(), "v1".into()),
            ("k".into(), "v2".into()),
            ("other".into(), "x".into()),
        ],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    }
}

fn publish(
    topic: &str,
    qos: Q5,
    pkid: u16,
    payload: &'static [u8],
    p: Option<v5::PublishProperties>,
) -> v5::Packet {
    let mut p = v5::Publish::new(topic, qos, Bytes::from_static(payload), p);
    p.pkid = pkid;
    v5::Packet::Publish(p)
}

#[tokio::test]
async fn user_properties_content_type_format_response_topic_and_correlation_reach_v5_subscribers() {
    let (b, _seen) = start(settings()).await;
    let mut sub = Raw5::connect(b.addr, "sub").await;
    sub.subscribe("p/#", Q5::AtLeastOnce).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publisher
        .send(publish(
            "p/1",
            Q5::AtLeastOnce,
            1,
            b"{}",
            Some(props(Some(60))),
        ))
        .await;
    let got = sub.expect_publish().await;
    assert_eq!(&got.payload[..], b"{}");
    let got = got.properties.expect("properties forwarded");
    let sent = props(None);
    assert_eq!(
        got.user_properties, sent.user_properties,
        "order and duplicates kept"
    );
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.payload_format_indicator, sent.payload_format_indicator);
    assert_eq!(got.response_topic, sent.response_topic);
    assert_eq!(got.correlation_data, sent.correlation_data);
    let left = got.message_expiry_interval.expect("expiry forwarded");
    assert!((59..=60).contains(&left), "{left}");
    assert_eq!(got.topic_alias, None);
    b.shutdown.cancel();
}

#[tokio::test]
async fn v311_subscriber_gets_the_payload_only() {
    let (b, _seen) = start(settings()).await;
    let mut sub = Raw4::connect(b.addr, "sub4").await;
    sub.subscribe("p/#", rumqttc::QoS::AtMostOnce).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publisher
        .send(publish(
            "p/1",
            Q5::AtMostOnce,
            0,
            b"raw",
            Some(props(Some(60))),
        ))
        .await;
    let got = sub.expect_publish().await;
    assert_eq!(got.topic, "p/1");
    assert_eq!(&got.payload[..], b"raw");
    b.shutdown.cancel();
}

#[tokio::test]
async fn message_without_properties_is_delivered_without_properties() {
    let (b, _seen) = start(settings()).await;
    let mut sub = Raw5::connect(b.addr, "sub").await;
    sub.subscribe("p/#", Q5::AtMostOnce).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publisher
        .send(publish("p/1", Q5::AtMostOnce, 0, b"x", None))
        .await;
    assert_eq!(sub.expect_publish().await.properties, None);
    b.shutdown.cancel();
}

#[tokio::test]
async fn message_expiry_is_decremented_by_the_time_the_message_waited() {
    let (b, _seen) = start(settings()).await;
    let (mut sub, _) = Raw5::connect_expiring(b.addr, "late", 300).await;
    sub.subscribe("e/#", Q5::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publisher
        .send(publish(
            "e/1",
            Q5::AtLeastOnce,
            1,
            b"x",
            Some(props(Some(10))),
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut c = Raw5::connect_packet("late");
    c.clean_start = false;
    c.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(300),
        ..v5::ConnectProperties::new()
    });
    let (mut sub, ack) = Raw5::connect_with(b.addr, c, None).await;
    assert!(ack.session_present);
    let got = sub.expect_publish().await;
    let left = got
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("expiry");
    assert!(
        (1..=8).contains(&left),
        "10 s minus the 2 s it waited, got {left}"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn expired_message_in_an_offline_queue_is_dropped_and_counted() {
    let (b, _seen) = start(settings()).await;
    let (mut sub, _) = Raw5::connect_expiring(b.addr, "away", 300).await;
    sub.subscribe("e/#", Q5::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publisher
        .send(publish(
            "e/1",
            Q5::AtLeastOnce,
            1,
            b"stale",
            Some(props(Some(1))),
        ))
        .await;
    publisher
        .send(publish(
            "e/1",
            Q5::AtLeastOnce,
            2,
            b"fresh",
            Some(props(Some(600))),
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = Raw5::connect_packet("away");
    c.clean_start = false;
    c.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(300),
        ..v5::ConnectProperties::new()
    });
    let (mut sub, ack) = Raw5::connect_with(b.addr, c, None).await;
    assert!(ack.session_present);
    assert_eq!(&sub.expect_publish().await.payload[..], b"fresh");
    sub.expect_no_publish().await;
    assert_eq!(b.handle.stats().messages_expired, 1);
    b.shutdown.cancel();
}

#[tokio::test]
async fn expired_retained_message_is_not_sent_to_new_subscribers() {
    let (b, _seen) = start(settings()).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    let mut p = v5::Publish::new("r/1", Q5::AtMostOnce, "old", Some(props(Some(1))));
    p.retain = true;
    publisher.send(v5::Packet::Publish(p)).await;
    let mut p = v5::Publish::new("r/2", Q5::AtMostOnce, "kept", Some(props(Some(600))));
    p.retain = true;
    publisher.send(v5::Packet::Publish(p)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sub = Raw5::connect(b.addr, "sub").await;
    sub.subscribe("r/#", Q5::AtMostOnce).await;
    let got = sub.expect_publish().await;
    assert_eq!(&got.payload[..], b"kept");
    assert!(got.retain);
    sub.expect_no_publish().await;
    b.shutdown.cancel();
}
