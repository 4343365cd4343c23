//! mDNS against python-zeroconf, inside network namespaces the tests create (see
//! `discovery_netns` for the re-exec pattern). Needs root and `pip install zeroconf`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod discovery_netns;

use std::net::IpAddr;
use std::time::Duration;

use discovery_netns::{Peer, Topology, require_python};
use outpost_protocols::discovery::{Found, Mdns, MdnsSettings};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ZC: &str = "discovery_zeroconf.py";

/// Outer run: build `peers` peer namespaces and run `test` inside; inner run: None is never
/// returned, the caller runs the scenario with the topology.
fn topology(test: &str, peers: usize) -> Option<Topology> {
    if let Some(t) = Topology::inner() {
        return Some(t);
    }
    require_python("zeroconf", "zeroconf");
    if let Some(t) = Topology::create(peers) {
        t.run_inner(test);
    }
    None
}

fn settings(interfaces: &[&str]) -> MdnsSettings {
    MdnsSettings {
        interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
        instance: "Outpost Test GW".into(),
        hostname: None,
        mqtt_port: Some(1883),
        coap_port: Some(5683),
        txt: vec![
            ("node".into(), "gw-test".into()),
            ("version".into(), "0.1.0".into()),
            ("paths".into(), "/t".into()),
        ],
        browse: vec![],
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_ours(v: &Value, event: &str, ty: &str) -> bool {
    v["event"] == event && v["type"] == ty && v["name"] == format!("Outpost Test GW.{ty}")
}

fn txt_ok(v: &Value) -> bool {
    v["txt"]["node"] == "gw-test" && v["txt"]["version"] == "0.1.0" && v["txt"]["paths"] == "/t"
}

fn has_addr(v: &Value, addr: &str) -> bool {
    v["addresses"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == addr))
}

/// (1) zeroconf finds `_mqtt._tcp` and `_coap._udp` with their TXT records and our LAN
/// address; an address added to the LAN interface is re-announced; (3) after shutdown
/// zeroconf sees the goodbye (both services removed).
#[test]
fn zeroconf_finds_our_services_then_sees_goodbye() {
    let Some(t) = topology("zeroconf_finds_our_services_then_sees_goodbye", 1) else {
        return;
    };
    rt().block_on(async move {
        let mut zc = Peer::spawn(
            &t.peers[0],
            ZC,
            &["browse", "_mqtt._tcp.local.", "_coap._udp.local."],
        );
        zc.until(Duration::from_secs(10), |v| v["event"] == "ready")
            .await
            .expect("zeroconf ready");

        let lan = Topology::lan(0);
        let mdns = Mdns::start(settings(&[&lan])).expect("start");
        let handle = mdns.handle();
        let (tx, _rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mdns.run(tx, shutdown.clone()));

        let gw = Topology::gw_addr(0).to_string();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let v = zc
                .until(Duration::from_secs(15), |v| {
                    (is_ours(v, "added", "_mqtt._tcp.local.")
                        || is_ours(v, "added", "_coap._udp.local."))
                        && txt_ok(v)
                        && has_addr(v, &gw)
                })
                .await
                .unwrap_or_else(|| panic!("zeroconf resolved only {seen:?}"));
            let got = if v["type"] == "_mqtt._tcp.local." {
                assert_eq!(v["port"], 1883);
                "_mqtt._tcp.local."
            } else {
                assert_eq!(v["port"], 5683);
                "_coap._udp.local."
            };
            if !seen.contains(&got) {
                seen.push(got);
            }
        }
        assert_eq!(seen.len(), 2, "both services: {seen:?}");

        // A new address on the LAN interface: the daemon notices it within its 5 s check,
        // we re-announce, and zeroconf resolves the services again with it.
        discovery_netns::ip(&["addr", "add", "10.77.0.9/24", "dev", &lan]).expect("add address");
        zc.until(Duration::from_secs(20), |v| {
            is_ours(v, "updated", "_mqtt._tcp.local.") && has_addr(v, "10.77.0.9")
        })
        .await
        .expect("zeroconf resolved the new address");
        wait_for(|| handle.stats().reannouncements == 1).await;
        assert_eq!(handle.stats().address_changes, 1);

        // The address goes away: mdns-sd alone would leave peers with the stale A record until
        // its TTL; our re-announcement (cache-flush) replaces it.
        discovery_netns::ip(&["addr", "del", "10.77.0.9/24", "dev", &lan]).expect("del address");
        wait_for(|| handle.stats().reannouncements == 2).await;
        // zeroconf expires the flushed record a second after the announcement.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        zc.say("resolve _mqtt._tcp.local. Outpost Test GW._mqtt._tcp.local.")
            .await;
        let v = zc
            .until(Duration::from_secs(5), |v| v["event"] == "resolved")
            .await
            .expect("zeroconf resolved");
        assert!(has_addr(&v, &gw) && !has_addr(&v, "10.77.0.9"), "{v}");
        wait_for(|| handle.stats().reannouncements == 2).await;
        assert_eq!(handle.stats().address_changes, 2);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run returns after shutdown")
            .expect("join")
            .expect("run");
        assert_eq!(handle.stats().goodbyes, 2);

        let mut removed = Vec::new();
        while removed.len() < 2 {
            let v = zc
                .until(Duration::from_secs(10), |v| {
                    is_ours(v, "removed", "_mqtt._tcp.local.")
                        || is_ours(v, "removed", "_coap._udp.local.")
                })
                .await
                .expect("zeroconf saw the goodbye");
            let ty = v["type"].as_str().unwrap().to_owned();
            if !removed.contains(&ty) {
                removed.push(ty);
            }
        }
    });
}

/// (2) A service registered by zeroconf is found (sanitised id, port, address, TXT), and its
/// goodbye arrives as `ServiceRemoved`.
#[test]
fn we_find_a_zeroconf_service_and_its_goodbye() {
    let Some(t) = topology("we_find_a_zeroconf_service_and_its_goodbye", 1) else {
        return;
    };
    rt().block_on(async move {
        let peer = Topology::peer_addr(0).to_string();
        let mut zc = Peer::spawn(
            &t.peers[0],
            ZC,
            &[
                "register",
                "--type",
                "_outpost-sensor._tcp.local.",
                "--name",
                "Sensor 1/a",
                "--port",
                "7777",
                "--address",
                &peer,
                "--txt",
                "fw=1.2",
                "--txt",
                "kind=temp",
            ],
        );
        zc.until(Duration::from_secs(15), |v| v["event"] == "registered")
            .await
            .expect("zeroconf registered");

        let mut s = settings(&[&Topology::lan(0)]);
        s.browse = vec!["_outpost-sensor._tcp.local.".into()];
        let mdns = Mdns::start(s).expect("start");
        let handle = mdns.handle();
        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mdns.run(tx, shutdown.clone()));

        let found = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("found in time")
            .expect("channel open");
        match found {
            Found::Service {
                id,
                service_type,
                addresses,
                port,
                txt,
            } => {
                assert_eq!(id, "Sensor_1_a");
                assert_eq!(service_type, "_outpost-sensor._tcp.local.");
                assert_eq!(port, 7777);
                assert!(
                    addresses.contains(&peer.parse::<IpAddr>().unwrap()),
                    "{addresses:?}"
                );
                assert_eq!(txt.get("fw").map(String::as_str), Some("1.2"));
                assert_eq!(txt.get("kind").map(String::as_str), Some("temp"));
            }
            other => panic!("unexpected {other:?}"),
        }

        zc.terminate();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Found::ServiceRemoved { id, service_type })) => {
                    assert_eq!(id, "Sensor_1_a");
                    assert_eq!(service_type, "_outpost-sensor._tcp.local.");
                    break;
                }
                Ok(Some(_)) => continue,
                other => panic!("no ServiceRemoved: {other:?}"),
            }
        }
        let stats = handle.stats();
        assert!(
            stats.services_found >= 1 && stats.services_removed == 1,
            "{stats:?}"
        );
        assert_eq!(stats.bad_records, 0);
        shutdown.cancel();
        task.await.unwrap().unwrap();
    });
}

/// (4) Two LAN-looking interfaces, one configured: the peer behind the configured one sees our
/// services and we see its; the peer behind the other sees nothing and is not seen.
#[test]
fn only_the_configured_interface_is_used() {
    let Some(t) = topology("only_the_configured_interface_is_used", 2) else {
        return;
    };
    rt().block_on(async move {
        let types = ["browse", "_mqtt._tcp.local.", "_coap._udp.local."];
        let mut inside = Peer::spawn(&t.peers[0], ZC, &types);
        let mut outside = Peer::spawn(&t.peers[1], ZC, &types);
        for p in [&mut inside, &mut outside] {
            p.until(Duration::from_secs(10), |v| v["event"] == "ready")
                .await
                .expect("zeroconf ready");
        }
        let reg = |i: usize, name: &str| {
            let addr = Topology::peer_addr(i).to_string();
            Peer::spawn(
                &t.peers[i],
                ZC,
                &[
                    "register",
                    "--type",
                    "_outpost-sensor._tcp.local.",
                    "--name",
                    name,
                    "--port",
                    "7000",
                    "--address",
                    &addr,
                ],
            )
        };
        let mut sensor_in = reg(0, "inside");
        let mut sensor_out = reg(1, "outside");
        for p in [&mut sensor_in, &mut sensor_out] {
            p.until(Duration::from_secs(15), |v| v["event"] == "registered")
                .await
                .expect("registered");
        }

        let mut s = settings(&[&Topology::lan(0)]);
        s.browse = vec!["_outpost-sensor._tcp.local.".into()];
        let mdns = Mdns::start(s).expect("start");
        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mdns.run(tx, shutdown.clone()));

        inside
            .until(Duration::from_secs(15), |v| {
                is_ours(v, "added", "_mqtt._tcp.local.") || is_ours(v, "added", "_coap._udp.local.")
            })
            .await
            .expect("the peer on the configured interface sees us");
        let mut ids = Vec::new();
        let window = tokio::time::Instant::now() + Duration::from_secs(6);
        while let Ok(Some(f)) = tokio::time::timeout_at(window, rx.recv()).await {
            if let Found::Service { id, addresses, .. } = f {
                assert!(
                    !addresses.contains(&IpAddr::V4(Topology::peer_addr(1))),
                    "{addresses:?}"
                );
                ids.push(id);
            }
        }
        assert!(ids.iter().any(|i| i == "inside"), "{ids:?}");
        assert!(!ids.iter().any(|i| i == "outside"), "{ids:?}");
        // The other side heard nothing of ours in all that time (it did see its own sensor
        // registration at most, which is not ours).
        let leak = outside
            .until(Duration::from_millis(500), |v| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("Outpost Test GW"))
            })
            .await;
        assert!(leak.is_none(), "leaked to the other interface: {leak:?}");

        shutdown.cancel();
        task.await.unwrap().unwrap();
        let leak = outside
            .until(Duration::from_secs(2), |v| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("Outpost Test GW"))
            })
            .await;
        assert!(
            leak.is_none(),
            "goodbye leaked to the other interface: {leak:?}"
        );
    });
}
