//! Binding fails loudly; shutdown stops accepting and closes connected clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use outpost_protocols::{Broker, BrokerError};
use rumqttc::v5::mqttbytes::v5;

#[tokio::test]
async fn a_failed_bind_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut s = settings();
    s.listeners = vec!["127.0.0.1:0".parse().unwrap(), addr];
    match Broker::bind(s).await {
        Err(e @ BrokerError::Bind { .. }) => assert!(e.to_string().contains(&addr.to_string())),
        other => panic!("expected a bind error, got {other:?}"),
    }
    let mut s = settings();
    s.listeners.clear();
    assert!(matches!(
        Broker::bind(s).await,
        Err(BrokerError::NoListeners)
    ));
}

#[tokio::test]
async fn shutdown_closes_clients_and_stops_accepting() {
    let (b, _seen) = start(settings()).await;
    let mut v4c = Raw4::connect(b.addr, "four").await;
    let (mut v5c, _) = Raw5::connect_with(b.addr, Raw5::connect_packet("five"), None).await;
    b.shutdown.cancel();
    tokio::time::timeout(WAIT, b.task)
        .await
        .expect("run returns")
        .unwrap();
    v4c.expect_closed().await;
    match v5c.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ServerShuttingDown)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(tokio::net::TcpStream::connect(b.addr).await.is_err());
}
