//! CoAP discovery: multicast against an aiocoap device inside network namespaces the test
//! creates (see `discovery_netns`), unicast against scripted devices on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod discovery_netns;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use discovery_netns::{Peer, Topology, require_python};
use outpost_protocols::discovery::{CoapDiscovery, CoapDiscoverySettings, Found, Resource};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn settings(interfaces: &[&str], groups: bool) -> CoapDiscoverySettings {
    CoapDiscoverySettings {
        interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
        interval: Duration::from_secs(2),
        groups,
        unicast: vec![],
    }
}

fn check_device_resources(resources: &[Resource]) {
    let temp = resources
        .iter()
        .find(|r| r.path == "/sensors/temp")
        .unwrap_or_else(|| panic!("no /sensors/temp in {resources:?}"));
    assert!(temp.observable, "{temp:?}");
    assert_eq!(
        temp.attrs.get("rt").map(String::as_str),
        Some("temperature-c")
    );
    let info = resources
        .iter()
        .find(|r| r.path == "/info")
        .unwrap_or_else(|| panic!("no /info in {resources:?}"));
    assert!(!info.observable, "{info:?}");
    assert_eq!(
        info.attrs.get("rt").map(String::as_str),
        Some("outpost.test.info")
    );
}

/// An aiocoap device joined to the All-CoAP-Nodes groups on its only interface answers our
/// multicast `GET /.well-known/core` over IPv4 (224.0.1.187) and IPv6 (ff02::fd); its
/// resources arrive with their attributes and `obs` flags.
#[test]
fn aiocoap_device_answers_multicast_discovery() {
    let t = match Topology::inner() {
        Some(t) => t,
        None => {
            require_python("aiocoap", "aiocoap");
            if let Some(t) = Topology::create(1) {
                t.run_inner("aiocoap_device_answers_multicast_discovery");
            }
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut device = Peer::spawn(
            &t.peers[0],
            "discovery_coap_device.py",
            &["--interface", "eth0"],
        );
        let ready = device.line(Duration::from_secs(20)).await;
        assert_eq!(ready.as_deref(), Some("listening 5683"));

        let disc = CoapDiscovery::bind(settings(&[&Topology::lan(0)], true))
            .await
            .expect("bind");
        let handle = disc.handle();
        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(disc.run(tx, shutdown.clone()));

        let (mut v4, mut v6) = (false, false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !(v4 && v6) {
            let f = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("answers: v4 {v4} v6 {v6}, {:?}", handle.stats()))
                .expect("open");
            let Found::CoapResources {
                id,
                address,
                resources,
            } = f
            else {
                panic!("unexpected {f:?}");
            };
            println!("found {id} at {address}: {resources:?}");
            assert_eq!(address.port(), 5683);
            assert!(
                id.starts_with("coap-")
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            );
            check_device_resources(&resources);
            match address.ip() {
                IpAddr::V4(a) => {
                    assert_eq!(a, Topology::peer_addr(0));
                    assert_eq!(id, "coap-10.77.0.2-5683");
                    v4 = true;
                }
                IpAddr::V6(a) => {
                    assert!(a.segments()[0] == 0xfe80, "link-local: {a}");
                    v6 = true;
                }
            }
        }
        let stats = handle.stats();
        assert_eq!(stats.bad_responses, 0, "{stats:?}");
        shutdown.cancel();
        task.await.unwrap().unwrap();
    });
}

/// A scripted device on loopback: answers every GET /.well-known/core with `doc`, in blocks
/// of `block` bytes when it is longer (Block2, RFC 7959).
async fn scripted_device(doc: &'static str, block: usize) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(req) = Packet::from_bytes(&buf[..n]) else {
                continue;
            };
            let num = req
                .get_first_option(CoapOption::Block2)
                .map(|v| v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)) >> 4)
                .unwrap_or(0) as usize;
            let mut resp = Packet::new();
            resp.header.set_type(MessageType::NonConfirmable);
            resp.header.message_id = req.header.message_id;
            resp.header.code = MessageClass::Response(ResponseType::Content);
            resp.set_token(req.get_token().to_vec());
            resp.add_option(CoapOption::ContentFormat, vec![40]);
            let bytes = doc.as_bytes();
            if bytes.len() > block {
                let szx = (block / 16).trailing_zeros();
                let start = (num * block).min(bytes.len());
                let end = (start + block).min(bytes.len());
                let more = u32::from(end < bytes.len());
                let v = ((num as u32) << 4) | (more << 3) | szx;
                let b = v.to_be_bytes();
                let skip = b.iter().take_while(|x| **x == 0).count();
                resp.add_option(CoapOption::Block2, b[skip..].to_vec());
                resp.payload = bytes[start..end].to_vec();
            } else {
                resp.payload = bytes.to_vec();
            }
            let _ = sock.send_to(&resp.to_bytes().unwrap(), from).await;
        }
    });
    addr
}

/// Unicast targets (as mDNS adds them): a long document arrives whole through Block2; a
/// malformed one is counted, never reported, and does not stop discovery.
#[tokio::test]
async fn unicast_targets_block2_and_malformed_link_format() {
    let long: &'static str = Box::leak(
        (0..40)
            .map(|i| format!("</sensor/{i}>;rt=\"outpost.test\";obs"))
            .collect::<Vec<_>>()
            .join(",")
            .into_boxed_str(),
    );
    let good = scripted_device(long, 256).await;
    let bad = scripted_device("</a>;rt=\"unterminated", 1024).await;

    let disc = CoapDiscovery::bind(settings(&[], false)).await.unwrap();
    let handle = disc.handle();
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(disc.run(tx, shutdown.clone()));
    handle.add_unicast(bad);
    handle.add_unicast(good);
    handle.add_unicast(good);

    let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no answer in time: {:?}", handle.stats()))
        .expect("open");
    match f {
        Found::CoapResources {
            id,
            address,
            resources,
        } => {
            assert_eq!(address, good);
            assert_eq!(id, format!("coap-127.0.0.1-{}", good.port()));
            assert_eq!(resources.len(), 40);
            assert!(resources.iter().all(|r| r.observable));
            assert_eq!(resources[39].path, "/sensor/39");
        }
        other => panic!("unexpected {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handle.stats().bad_responses == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = handle.stats();
    assert!(stats.answers >= 1, "{stats:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    // Nothing from the malformed device was reported.
    while let Ok(f) = rx.try_recv() {
        if let Found::CoapResources { address, .. } = f {
            assert_ne!(address, bad);
        }
    }
}
