//! MQTT 5 subscription options (§3.8.3.1: no local, retain as published, retain handling) and
//! subscription identifiers (§3.8.2.1.2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;

fn filter(path: &str, f: impl FnOnce(&mut v5::Filter)) -> v5::Filter {
    let mut filter = v5::Filter::new(path, Q5::AtMostOnce);
    f(&mut filter);
    filter
}

async fn publish(c: &mut Raw5, topic: &str, payload: &'static [u8], retain: bool) {
    let mut p = v5::Publish::new(topic, Q5::AtMostOnce, Bytes::from_static(payload), None);
    p.retain = retain;
    c.send(v5::Packet::Publish(p)).await;
}

#[tokio::test]
async fn no_local_subscription_does_not_receive_own_publications_but_others_do() {
    let (b, _seen) = start(settings()).await;
    let mut me = Raw5::connect(b.addr, "me").await;
    me.subscribe_with(vec![filter("nl/#", |f| f.nolocal = true)], None)
        .await;
    let mut other = Raw5::connect(b.addr, "other").await;
    other.subscribe("nl/#", Q5::AtMostOnce).await;
    publish(&mut me, "nl/1", b"mine", false).await;
    assert_eq!(&other.expect_publish().await.payload[..], b"mine");
    me.expect_no_publish().await;
    publish(&mut other, "nl/1", b"theirs", false).await;
    assert_eq!(&me.expect_publish().await.payload[..], b"theirs");
    b.shutdown.cancel();
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_and_its_absence_clears_it() {
    let (b, _seen) = start(settings()).await;
    let mut rap = Raw5::connect(b.addr, "rap").await;
    rap.subscribe_with(vec![filter("rap/#", |f| f.preserve_retain = true)], None)
        .await;
    let mut plain = Raw5::connect(b.addr, "plain").await;
    plain.subscribe("rap/#", Q5::AtMostOnce).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "rap/1", b"r", true).await;
    assert!(rap.expect_publish().await.retain, "retain as published");
    assert!(
        !plain.expect_publish().await.retain,
        "a live message is forwarded with retain cleared"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn retain_handling_0_sends_retained_messages_on_every_subscribe() {
    let (b, _seen) = start(settings()).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "rh/0", b"kept", true).await;
    publisher.expect_no_publish().await;
    let mut c = Raw5::connect(b.addr, "c").await;
    for _ in 0..2 {
        c.subscribe_with(
            vec![filter("rh/#", |f| {
                f.retain_forward_rule = v5::RetainForwardRule::OnEverySubscribe
            })],
            None,
        )
        .await;
        let got = c.expect_publish().await;
        assert!(got.retain);
        assert_eq!(&got.payload[..], b"kept");
    }
    b.shutdown.cancel();
}

#[tokio::test]
async fn retain_handling_1_sends_retained_messages_only_for_a_new_subscription() {
    let (b, _seen) = start(settings()).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "rh/1", b"kept", true).await;
    publisher.expect_no_publish().await;
    let mut c = Raw5::connect(b.addr, "c").await;
    let on_new = || {
        vec![filter("rh/#", |f| {
            f.retain_forward_rule = v5::RetainForwardRule::OnNewSubscribe
        })]
    };
    c.subscribe_with(on_new(), None).await;
    assert_eq!(&c.expect_publish().await.payload[..], b"kept");
    c.subscribe_with(on_new(), None).await;
    c.expect_no_publish().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn retain_handling_2_never_sends_retained_messages() {
    let (b, _seen) = start(settings()).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "rh/2", b"kept", true).await;
    publisher.expect_no_publish().await;
    let mut c = Raw5::connect(b.addr, "c").await;
    c.subscribe_with(
        vec![filter("rh/#", |f| {
            f.retain_forward_rule = v5::RetainForwardRule::Never
        })],
        None,
    )
    .await;
    c.expect_no_publish().await;
    // The subscription itself works.
    publish(&mut publisher, "rh/2", b"live", false).await;
    assert_eq!(&c.expect_publish().await.payload[..], b"live");
    b.shutdown.cancel();
}

#[tokio::test]
async fn subscription_identifiers_are_passed_with_every_matching_message() {
    let (b, _seen) = start(settings()).await;
    let mut c = Raw5::connect(b.addr, "c").await;
    c.subscribe_with(vec![v5::Filter::new("id/+", Q5::AtMostOnce)], Some(7))
        .await;
    c.subscribe_with(vec![v5::Filter::new("id/#", Q5::AtMostOnce)], Some(300))
        .await;
    c.subscribe_with(vec![v5::Filter::new("#", Q5::AtMostOnce)], None)
        .await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "id/x", b"both", false).await;
    let got = c.expect_publish().await;
    let ids = got.properties.expect("properties").subscription_identifiers;
    assert_eq!(ids, vec![7, 300], "one delivery, every matching identifier");
    publish(&mut publisher, "other", b"none", false).await;
    let got = c.expect_publish().await;
    assert!(
        got.properties
            .is_none_or(|p| p.subscription_identifiers.is_empty()),
        "a subscription without an identifier adds none"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn retained_message_sent_on_subscribe_carries_that_subscription_identifier() {
    let (b, _seen) = start(settings()).await;
    let mut publisher = Raw5::connect(b.addr, "pub").await;
    publish(&mut publisher, "rid/1", b"kept", true).await;
    publisher.expect_no_publish().await;
    let mut c = Raw5::connect(b.addr, "c").await;
    c.subscribe_with(vec![v5::Filter::new("rid/#", Q5::AtMostOnce)], Some(42))
        .await;
    let got = c.expect_publish().await;
    assert!(got.retain);
    assert_eq!(
        got.properties.expect("properties").subscription_identifiers,
        vec![42]
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn connack_announces_subscription_identifiers_available() {
    let (b, _seen) = start(settings()).await;
    let (_c, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet("c"), None).await;
    let props = ack.properties.expect("properties");
    assert_ne!(props.subscription_identifiers_available, Some(0));
    b.shutdown.cancel();
}
