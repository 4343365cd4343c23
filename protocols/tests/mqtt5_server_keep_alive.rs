//! MQTT 5 server keep-alive (§3.2.2.3.14): a client asking for a longer keep-alive than the
//! configured maximum (or for none) is told the maximum in CONNACK and held to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use outpost_protocols::Broker;
use rumqttc::v5::mqttbytes::v5;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A broker whose keep-alive maximum is `max`; the gateway side drops everything.
async fn start_with_max(max: Option<Duration>) -> (SocketAddr, CancellationToken) {
    let broker = Broker::bind(settings()).await.expect("bind");
    broker.set_max_keep_alive(max);
    let addr = broker.local_addrs()[0];
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { broker.run(tx, token).await.expect("run") });
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    (addr, shutdown)
}

async fn connack(addr: SocketAddr, keep_alive: u16) -> (Raw5, Option<u16>) {
    let mut c = Raw5::connect_packet("ka");
    c.keep_alive = keep_alive;
    let (c, ack) = Raw5::connect_with(addr, c, None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    (c, ack.properties.and_then(|p| p.server_keep_alive))
}

#[tokio::test]
async fn keep_alive_above_the_maximum_is_replaced_by_the_server_keep_alive() {
    let (addr, stop) = start_with_max(Some(Duration::from_secs(10))).await;
    assert_eq!(connack(addr, 600).await.1, Some(10));
    stop.cancel();
}

#[tokio::test]
async fn keep_alive_0_gets_the_maximum_as_server_keep_alive() {
    let (addr, stop) = start_with_max(Some(Duration::from_secs(10))).await;
    assert_eq!(connack(addr, 0).await.1, Some(10));
    stop.cancel();
}

#[tokio::test]
async fn keep_alive_within_the_maximum_is_left_alone() {
    let (addr, stop) = start_with_max(Some(Duration::from_secs(10))).await;
    assert_eq!(connack(addr, 10).await.1, None);
    assert_eq!(connack(addr, 5).await.1, None);
    stop.cancel();
}

#[tokio::test]
async fn without_a_maximum_no_server_keep_alive_is_sent() {
    let (addr, stop) = start_with_max(None).await;
    assert_eq!(connack(addr, 600).await.1, None);
    assert_eq!(connack(addr, 0).await.1, None);
    stop.cancel();
}

#[tokio::test]
async fn client_is_held_to_the_server_keep_alive() {
    let (addr, stop) = start_with_max(Some(Duration::from_secs(1))).await;
    let (mut c, server) = connack(addr, 600).await;
    assert_eq!(server, Some(1));
    // Silent for 1.5 x 1 s: closed with "keep alive timeout", not after 900 s.
    let closed = tokio::time::timeout(Duration::from_millis(2500), c.recv())
        .await
        .expect("closed within 1.5 x the server keep-alive");
    match closed {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    stop.cancel();
}
