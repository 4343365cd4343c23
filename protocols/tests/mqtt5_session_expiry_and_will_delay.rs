//! MQTT 5 session expiry (§3.1.2.11.2, §3.14.2.2.2) and will delay (§3.1.3.2.2): a session
//! outlives its connection as long as the client asked, and a will waits for its delay unless
//! the client comes back first, but never past the end of the session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;

/// Resumes (clean start 0) with the given session expiry; returns session-present.
async fn resume(addr: std::net::SocketAddr, id: &str, expiry: u32) -> (Raw5, bool) {
    let mut c = Raw5::connect_packet(id);
    c.clean_start = false;
    c.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(expiry),
        ..v5::ConnectProperties::new()
    });
    let (c, ack) = Raw5::connect_with(addr, c, None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    (c, ack.session_present)
}

/// A DISCONNECT (normal) that sets the session expiry interval; written by hand because
/// rumqttc 0.25 cannot encode a DISCONNECT with properties correctly.
async fn disconnect_setting_expiry(mut c: Raw5, seconds: u32) {
    let mut bytes = vec![0xE0, 0x07, 0x00, 0x05, 0x11];
    bytes.extend_from_slice(&seconds.to_be_bytes());
    c.send_raw(&bytes).await;
    assert!(c.recv().await.is_none(), "closed after DISCONNECT");
}

/// Connects with a will on `wills/<id>` delayed by `delay` seconds.
async fn with_will(addr: std::net::SocketAddr, id: &str, session_expiry: u32, delay: u32) -> Raw5 {
    let mut c = Raw5::connect_packet(id);
    c.properties = Some(v5::ConnectProperties {
        session_expiry_interval: Some(session_expiry),
        ..v5::ConnectProperties::new()
    });
    let will = v5::LastWill::new(
        format!("wills/{id}"),
        "gone",
        Q5::AtMostOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("why".into(), "test".into())],
        }),
    );
    let (c, ack) = Raw5::connect_with(addr, c, Some(will)).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    c
}

async fn watcher(addr: std::net::SocketAddr) -> Raw5 {
    let mut w = Raw5::connect(addr, "watcher").await;
    w.subscribe("wills/#", Q5::AtMostOnce).await;
    w
}

#[tokio::test]
async fn session_expiry_0_ends_the_session_with_the_connection() {
    let (b, _seen) = start(settings()).await;
    let (mut c, _) = Raw5::connect_expiring(b.addr, "s0", 0).await;
    c.subscribe("a", Q5::AtLeastOnce).await;
    c.disconnect().await;
    let (_c, present) = resume(b.addr, "s0", 0).await;
    assert!(!present);
    b.shutdown.cancel();
}

#[tokio::test]
async fn session_is_resumed_within_its_expiry_interval() {
    let (b, _seen) = start(settings()).await;
    let (mut c, _) = Raw5::connect_expiring(b.addr, "s", 5).await;
    c.subscribe("a", Q5::AtLeastOnce).await;
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c, present) = resume(b.addr, "s", 5).await;
    assert!(present);
    b.shutdown.cancel();
}

#[tokio::test]
async fn session_is_discarded_once_its_expiry_interval_passes() {
    let (b, _seen) = start(settings()).await;
    let (mut c, _) = Raw5::connect_expiring(b.addr, "short", 1).await;
    c.subscribe("a", Q5::AtLeastOnce).await;
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(b.handle.stats().sessions_expired, 1);
    let (_c, present) = resume(b.addr, "short", 1).await;
    assert!(!present);
    b.shutdown.cancel();
}

#[tokio::test]
async fn disconnect_can_set_the_session_expiry_to_0_ending_the_session() {
    let (b, _seen) = start(settings()).await;
    let (c, _) = Raw5::connect_expiring(b.addr, "d0", 300).await;
    disconnect_setting_expiry(c, 0).await;
    let (_c, present) = resume(b.addr, "d0", 300).await;
    assert!(!present);
    b.shutdown.cancel();
}

#[tokio::test]
async fn disconnect_can_lengthen_the_session_expiry() {
    let (b, _seen) = start(settings()).await;
    let (c, _) = Raw5::connect_expiring(b.addr, "dl", 1).await;
    disconnect_setting_expiry(c, 300).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_c, present) = resume(b.addr, "dl", 300).await;
    assert!(present, "the DISCONNECT's 300 s replaced the CONNECT's 1 s");
    b.shutdown.cancel();
}

#[tokio::test]
async fn disconnect_cannot_give_a_session_without_expiry_one() {
    let (b, _seen) = start(settings()).await;
    let (c, _) = Raw5::connect_expiring(b.addr, "none", 0).await;
    disconnect_setting_expiry(c, 300).await;
    let (_c, present) = resume(b.addr, "none", 0).await;
    assert!(!present);
    b.shutdown.cancel();
}

#[tokio::test]
async fn will_is_published_after_its_delay() {
    let (b, _seen) = start(settings()).await;
    let mut w = watcher(b.addr).await;
    let c = with_will(b.addr, "late", 300, 1).await;
    drop(c); // closed without DISCONNECT
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.expect_no_publish().await; // not yet (about 0.8 s)
    let got = w.expect_publish().await;
    assert_eq!(&got.topic[..], b"wills/late");
    let props = got.properties.expect("will properties forwarded");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, vec![("why".into(), "test".into())]);
    b.shutdown.cancel();
}

#[tokio::test]
async fn will_is_not_published_when_the_client_reconnects_within_the_delay() {
    let (b, _seen) = start(settings()).await;
    let mut w = watcher(b.addr).await;
    let c = with_will(b.addr, "back", 300, 1).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c, present) = resume(b.addr, "back", 300).await;
    assert!(present);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    w.expect_no_publish().await;
    b.shutdown.cancel();
}

#[tokio::test]
async fn will_is_published_when_the_session_ends_before_the_delay() {
    let (b, _seen) = start(settings()).await;
    let mut w = watcher(b.addr).await;
    let c = with_will(b.addr, "ends", 1, 3600).await;
    drop(c);
    let got = w.expect_publish().await;
    assert_eq!(&got.topic[..], b"wills/ends");
    b.shutdown.cancel();
}

#[tokio::test]
async fn will_with_delay_goes_at_once_when_the_session_expiry_is_0() {
    let (b, _seen) = start(settings()).await;
    let mut w = watcher(b.addr).await;
    let c = with_will(b.addr, "now", 0, 3600).await;
    drop(c);
    let got = tokio::time::timeout(Duration::from_millis(500), w.expect_publish())
        .await
        .expect("will published when the session ended");
    assert_eq!(&got.topic[..], b"wills/now");
    b.shutdown.cancel();
}

#[tokio::test]
async fn disconnect_without_will_cancels_a_delayed_will() {
    let (b, _seen) = start(settings()).await;
    let mut w = watcher(b.addr).await;
    let c = with_will(b.addr, "polite", 300, 1).await;
    c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.expect_no_publish().await;
    b.shutdown.cancel();
}
