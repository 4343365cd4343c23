//! With the upstream up, every reading a sensor publishes to outpost arrives at the cloud broker
//! on `outpost/<node>/<topic>`, payload unchanged; over MQTT 5 each carries a `seq` user property
//! (unique, increasing in store order) and `ingested_at` (unix ms). Local subscribers on outpost's
//! own broker receive the readings too. Commands published upstream on `outpost/<node>/cmd/<X>`
//! come out on the local broker on `<X>`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, Subscriber, SubscriberSpec,
    TestDir, UpstreamProtocol, json_str, mosquitto_pub_ok, payload, spawn_mosquitto_sub, tail,
    wait_for,
};

const NODE: &str = "gw1";
const TOPICS: [&str; 3] = ["sensors/temp", "sensors/hum", "plant/line-1/pressure"];
const PER_TOPIC: u64 = 50;
const SIZE: usize = 100;

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(0)
}

/// Runs the online scenario with upstream protocol `protocol` and returns what the cloud saw.
fn run(protocol: UpstreamProtocol) -> anyhow::Result<()> {
    let dir = TestDir::new(&format!("online-{}", protocol.as_str()))?;
    let cloud = Mosquitto::start(&dir)?;
    let upstream_sub = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.protocol = Some(protocol);
    let gw = Outpost::start(&dir, &cfg)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;

    // A local subscriber on outpost's own broker (mosquitto_sub, MQTT 3.1.1), ready before publishing.
    let local_log = dir.join("local.log");
    let local = spawn_mosquitto_sub(
        &dir,
        "local",
        gw.port(),
        &["-t", "#", "-q", "1", "-v", "-d", "-i", "local-sub"],
    )?;
    wait_for(
        "the local mosquitto_sub's SUBACK",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&local_log)
                .ok()?
                .contains("SUBACK")
                .then_some(())
        },
    )?;

    let before = unix_ms();
    let mut spec = PublisherSpec::new(gw.port(), &TOPICS, PER_TOPIC);
    spec.size = SIZE;
    spec.protocol = "3.1.1".to_owned();
    let acked = Publisher::spawn(&dir, "sensor", &spec)?.finish(Duration::from_secs(120))?;
    let total = TOPICS.len() * usize::try_from(PER_TOPIC)?;
    assert_eq!(acked.len(), total, "outpost acked every QoS 1 reading");

    let msgs = wait_for("every reading upstream", Duration::from_secs(60), || {
        let m = upstream_sub.messages().ok()?;
        // Count readings only: the gateway's birth message also arrives under outpost/<node>/.
        let distinct: BTreeSet<(String, u64)> = m
            .iter()
            .filter_map(|r| outpost_tests::parse_payload(&r.payload))
            .collect();
        (distinct.len() >= total).then_some(m)
    })?;
    let after = unix_ms();

    // Each reading arrives on outpost/<node>/<topic>, payload byte-for-byte unchanged, at QoS 1.
    let mut seen: BTreeMap<(String, u64), Option<u64>> = BTreeMap::new();
    for m in &msgs {
        // The gateway's own messages (birth, health: not sensor payloads on sensor topics) are
        // not part of this contract.
        let sensor_topic = TOPICS
            .iter()
            .any(|t| m.topic == format!("outpost/{NODE}/{t}"));
        if !sensor_topic && outpost_tests::parse_payload(&m.payload).is_none() {
            continue;
        }
        let local_topic = m
            .topic
            .strip_prefix(&format!("outpost/{NODE}/"))
            .unwrap_or_else(|| {
                panic!(
                    "upstream topic {:?} lacks the outpost/{NODE}/ prefix",
                    m.topic
                )
            });
        let (t, c) = outpost_tests::parse_payload(&m.payload).unwrap_or_else(|| {
            panic!(
                "payload on {} is not a sensor's: {:?}",
                m.topic,
                String::from_utf8_lossy(&m.payload)
            )
        });
        assert_eq!(
            local_topic, t,
            "reading published on {t} arrived on {}",
            m.topic
        );
        assert_eq!(
            m.payload,
            payload(&t, c, SIZE),
            "payload changed on the way"
        );
        assert_eq!(m.qos, 1, "forwarded at QoS 1");
        let seq = if protocol == UpstreamProtocol::V5 {
            let seq: u64 = m
                .props
                .get("seq")
                .unwrap_or_else(|| {
                    panic!("no seq user property on {} (props {:?})", m.topic, m.props)
                })
                .parse()
                .unwrap_or_else(|e| panic!("seq {:?} is not decimal: {e}", m.props.get("seq")));
            let at: u64 = m
                .props
                .get("ingested_at")
                .unwrap_or_else(|| panic!("no ingested_at user property (props {:?})", m.props))
                .parse()?;
            assert!(
                at + 1000 >= before && at <= after + 1000,
                "ingested_at {at} is not unix ms within the test run [{before}, {after}]"
            );
            Some(seq)
        } else {
            None
        };
        if let Some(prev) = seen.insert((t.clone(), c), seq) {
            assert_eq!(prev, seq, "a duplicate of {t}#{c} must carry the same seq");
        }
    }
    let want: BTreeSet<(String, u64)> = acked.iter().cloned().collect();
    let got: BTreeSet<(String, u64)> = seen.keys().cloned().collect();
    assert_eq!(got, want, "exactly the acked readings arrive upstream");

    if protocol == UpstreamProtocol::V5 {
        // seq is unique per record, and increases in store order: one sensor on one connection
        // publishes each topic's readings in counter order, so per topic seq follows the counter.
        let seqs: BTreeSet<u64> = seen.values().flatten().copied().collect();
        assert_eq!(seqs.len(), seen.len(), "two readings share a seq");
        for t in TOPICS {
            let per: Vec<u64> = (0..PER_TOPIC)
                .map(|c| seen[&(t.to_owned(), c)].unwrap_or(0))
                .collect();
            assert!(
                per.windows(2).all(|w| w[0] < w[1]),
                "seq does not increase with store order on {t}: {per:?}"
            );
        }
    }

    // The local subscriber on outpost got every reading too.
    let local_lines = wait_for(
        "every reading at the local subscriber",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&local_log).ok()?;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| TOPICS.iter().any(|t| l.starts_with(&format!("{t} "))))
                .map(str::to_owned)
                .collect();
            (lines.len() >= total).then_some(lines)
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", tail(&local_log, 20)))?;
    let local_got: BTreeSet<(String, u64)> = local_lines
        .iter()
        .filter_map(|l| {
            let (t, p) = l.split_once(' ')?;
            let (pt, c) = outpost_tests::parse_payload(p.as_bytes())?;
            (pt == t && p.as_bytes() == payload(t, c, SIZE).as_slice()).then_some((pt, c))
        })
        .collect();
    assert_eq!(
        local_got, want,
        "the local subscriber receives every reading unchanged"
    );
    drop(local);
    Ok(())
}

#[test]
fn mqtt5_upstream_gets_payload_unchanged_with_seq_and_ingested_at() -> anyhow::Result<()> {
    run(UpstreamProtocol::V5)
}

#[test]
fn mqtt311_upstream_gets_payload_unchanged() -> anyhow::Result<()> {
    run(UpstreamProtocol::V311)
}

#[test]
fn command_from_upstream_is_published_on_local_broker() -> anyhow::Result<()> {
    let dir = TestDir::new("command")?;
    let cloud = Mosquitto::start(&dir)?;
    let cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    let gw = Outpost::start(&dir, &cfg)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;
    let device =
        outpost_tests::Client::spawn(&dir, "device", gw.port(), &["--subscribe", "actuators/#:1"])?;
    device.wait_line("subscribed", Duration::from_secs(30))?;
    // The gateway subscribes to its command topic after connecting; resend until one arrives
    // (a command lost before that subscription exists is not what this test is about).
    let line = wait_for(
        "the command on the local broker",
        Duration::from_secs(30),
        || {
            mosquitto_pub_ok(
                cloud.port(),
                &[
                    "-t",
                    &format!("outpost/{NODE}/cmd/actuators/valve-7"),
                    "-q",
                    "1",
                    "-m",
                    "open",
                ],
            )
            .ok()?;
            std::thread::sleep(Duration::from_millis(300));
            device
                .lines()
                .into_iter()
                .find(|l| l.starts_with("message "))
        },
    )?;
    let mut parts = line.splitn(5, ' ');
    let (_, _qos, _retain, topic, body) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    );
    assert_eq!(
        topic,
        Some("actuators/valve-7"),
        "command topic mapped to the local topic: {line}"
    );
    assert_eq!(body, Some("open"), "command payload unchanged: {line}");
    Ok(())
}
