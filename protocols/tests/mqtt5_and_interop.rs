//! MQTT 5 basics, and messages crossing between 3.1.1 and 5 clients (rumqttc's real clients).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use tokio::sync::mpsc;

#[tokio::test]
async fn v5_connack_announces_limits_and_assigned_id() {
    let mut s = settings();
    s.max_inbound_pending = 7;
    s.max_packet_size = 4096;
    let (b, _seen) = start(s).await;
    let (_c, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet(""), None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(7));
    assert_eq!(props.max_packet_size, Some(4096));
    assert_eq!(props.topic_alias_max, Some(16));
    assert!(
        props
            .assigned_client_identifier
            .is_some_and(|id| !id.is_empty())
    );
    let (_d, ack) = Raw5::connect_with(b.addr, Raw5::connect_packet("named"), None).await;
    assert!(
        ack.properties
            .expect("props")
            .assigned_client_identifier
            .is_none()
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn v5_subscribe_publish_all_qos_and_reason_codes() {
    let (b, mut seen) = start(settings()).await;
    let (mut c, _) = Raw5::connect_with(b.addr, Raw5::connect_packet("v5"), None).await;
    c.send(v5::Packet::Subscribe(v5::Subscribe::new_many(
        [
            v5::Filter::new("v/#", Q5::ExactlyOnce),
            v5::Filter::new("bad#", Q5::AtMostOnce),
        ],
        None,
    )))
    .await;
    match c.recv().await {
        Some(v5::Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![
                v5::SubscribeReasonCode::Success(Q5::ExactlyOnce),
                v5::SubscribeReasonCode::TopicFilterInvalid
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    for (pkid, qos) in [
        (0u16, Q5::AtMostOnce),
        (1, Q5::AtLeastOnce),
        (2, Q5::ExactlyOnce),
    ] {
        let mut p = v5::Publish::new("v/x", qos, format!("q{}", qos as u8), None);
        p.pkid = pkid;
        c.send(v5::Packet::Publish(p)).await;
        let inbound = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inbound.topic, "v/x");
        // Our own subscription delivers the message back (no-local not set); the ack and
        // the delivery may come in either order relative to each other.
        let mut got_ack = qos == Q5::AtMostOnce;
        let mut got_msg = false;
        while !(got_ack && got_msg) {
            match c.recv().await {
                Some(v5::Packet::PubAck(a)) => {
                    assert_eq!(a.reason, v5::PubAckReason::Success);
                    got_ack = true;
                }
                Some(v5::Packet::PubRec(r)) => {
                    assert_eq!(r.pkid, 2);
                    c.send(v5::Packet::PubRel(v5::PubRel::new(2, None))).await;
                }
                Some(v5::Packet::PubComp(pc)) => {
                    assert_eq!(pc.pkid, 2);
                    got_ack = true;
                }
                Some(v5::Packet::Publish(p)) => {
                    assert_eq!(p.qos, qos, "delivered at the published QoS");
                    match p.qos {
                        Q5::AtLeastOnce => {
                            c.send(v5::Packet::PubAck(v5::PubAck::new(p.pkid, None)))
                                .await
                        }
                        Q5::ExactlyOnce => {
                            c.send(v5::Packet::PubRec(v5::PubRec::new(p.pkid, None)))
                                .await
                        }
                        Q5::AtMostOnce => {}
                    }
                    got_msg = true;
                }
                Some(v5::Packet::PubRel(r)) => {
                    c.send(v5::Packet::PubComp(v5::PubComp::new(r.pkid, None)))
                        .await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    c.send(v5::Packet::Unsubscribe(v5::Unsubscribe::new("nope", None)))
        .await;
    loop {
        match c.recv().await {
            Some(v5::Packet::UnsubAck(u)) => {
                assert_eq!(u.reasons, vec![v5::UnsubAckReason::NoSubscriptionExisted]);
                break;
            }
            Some(v5::Packet::PubRel(r)) => {
                c.send(v5::Packet::PubComp(v5::PubComp::new(r.pkid, None)))
                    .await;
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }
    b.shutdown.cancel();
}

#[tokio::test]
async fn v5_no_local_and_disconnect_without_will() {
    let (b, _seen) = start(settings()).await;
    let mut watcher = Raw4::connect(b.addr, "watcher").await;
    watcher.subscribe("wills/#", rumqttc::QoS::AtMostOnce).await;
    let will = v5::LastWill::new("wills/v5", "gone", Q5::AtMostOnce, false, None);
    let (mut c, _) = Raw5::connect_with(b.addr, Raw5::connect_packet("nl"), Some(will)).await;
    let mut f = v5::Filter::new("loop", Q5::AtMostOnce);
    f.nolocal = true;
    c.send(v5::Packet::Subscribe(v5::Subscribe::new(f, None)))
        .await;
    assert!(matches!(c.recv().await, Some(v5::Packet::SubAck(_))));
    c.send(v5::Packet::Publish(v5::Publish::new(
        "loop",
        Q5::AtMostOnce,
        "x",
        None,
    )))
    .await;
    c.send(v5::Packet::PingReq(v5::PingReq)).await;
    assert!(
        matches!(c.recv().await, Some(v5::Packet::PingResp(_))),
        "own message not echoed"
    );
    // The two-byte DISCONNECT most clients send.
    tokio::io::AsyncWriteExt::write_all(&mut c.stream, &[0xE0, 0x00])
        .await
        .unwrap();
    assert!(c.recv().await.is_none());
    watcher.expect_silence().await;
    b.shutdown.cancel();
}

/// Runs a rumqttc 3.1.1 client; incoming publishes go to the returned channel.
async fn client4(
    addr: std::net::SocketAddr,
    id: &str,
    sub: Option<(&str, rumqttc::QoS)>,
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::Publish>,
) {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::ZERO);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(ready_tx);
    let subscribe = sub.is_some();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) if subscribe => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) if !subscribe => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    if let Some((f, q)) = sub {
        client.subscribe(f, q).await.unwrap();
    }
    tokio::time::timeout(WAIT, ready_rx).await.unwrap().unwrap();
    (client, rx)
}

async fn client5(
    addr: std::net::SocketAddr,
    id: &str,
    sub: Option<(&str, Q5)>,
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<v5::Publish>,
) {
    let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(ready_tx);
    let subscribe = sub.is_some();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(v5::Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(rumqttc::v5::Event::Incoming(v5::Packet::SubAck(_))) if subscribe => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(rumqttc::v5::Event::Incoming(v5::Packet::ConnAck(_))) if !subscribe => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    if let Some((f, q)) = sub {
        client.subscribe(f, q).await.unwrap();
    }
    tokio::time::timeout(WAIT, ready_rx).await.unwrap().unwrap();
    (client, rx)
}

#[tokio::test]
async fn v4_publisher_reaches_v5_subscriber() {
    let (b, mut seen) = start(settings()).await;
    let (_sub, mut got) = client5(b.addr, "sub5", Some(("i/#", Q5::ExactlyOnce))).await;
    let (publisher, _) = client4(b.addr, "pub4", None).await;
    publisher
        .publish("i/4to5", rumqttc::QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let p = tokio::time::timeout(WAIT, got.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&p.topic[..], b"i/4to5");
    assert_eq!(&p.payload[..], b"hello");
    assert_eq!(
        p.qos,
        Q5::AtLeastOnce,
        "delivered QoS never exceeds the published QoS"
    );
    assert_eq!(
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap()
            .topic,
        "i/4to5"
    );
    b.shutdown.cancel();
}

#[tokio::test]
async fn v5_publisher_reaches_v4_subscriber() {
    let (b, _seen) = start(settings()).await;
    let (_sub, mut got) = client4(b.addr, "sub4", Some(("i/#", rumqttc::QoS::AtLeastOnce))).await;
    let (publisher, _) = client5(b.addr, "pub5", None).await;
    publisher
        .publish("i/5to4", Q5::ExactlyOnce, false, "hi")
        .await
        .unwrap();
    publisher
        .publish("i/5to4", Q5::AtMostOnce, false, "q0")
        .await
        .unwrap();
    let p = tokio::time::timeout(WAIT, got.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.topic, "i/5to4");
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    let p = tokio::time::timeout(WAIT, got.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.qos, rumqttc::QoS::AtMostOnce);
    b.shutdown.cancel();
}

#[tokio::test]
async fn rumqttc_clients_with_keep_alive_zero_and_many_qos1_publishes() {
    let mut s = settings();
    // Enough queue for the burst: this test is about order, not the drop policy.
    s.max_queued_messages = 1000;
    let (b, mut seen) = start(s).await;
    let (_sub, mut got) = client4(b.addr, "s", Some(("load/#", rumqttc::QoS::AtLeastOnce))).await;
    let (publisher, _) = client4(b.addr, "p", None).await;
    let n = 500;
    let p2 = publisher.clone();
    tokio::spawn(async move {
        for i in 0..n {
            p2.publish("load/x", rumqttc::QoS::AtLeastOnce, false, format!("{i}"))
                .await
                .unwrap();
        }
    });
    for i in 0..n {
        let m = tokio::time::timeout(WAIT, got.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload, format!("{i}").as_bytes(), "in order");
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let stats = b.handle.stats();
    assert_eq!(stats.publishes_received, n);
    assert_eq!(stats.dropped_queue_full, 0);
    b.shutdown.cancel();
}
