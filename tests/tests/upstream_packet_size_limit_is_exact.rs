//! The upstream's packet size limit is applied to the byte: a reading whose PUBLISH is exactly
//! the limit arrives, one byte more is refused (packet_too_large), and readings of every size
//! from 0 B up to the largest allowed arrive in order, byte for byte, on one topic.
//!
//! The limit is 100000 bytes, the whole encoded packet as MQTT 5 defines Maximum Packet Size:
//! fixed header, topic, packet id, properties, payload. Over MQTT 5 mosquitto announces it in
//! CONNACK (`max_packet_size 100000`); over 3.1.1 the gateway is told (`[upstream]
//! max_packet_size = "100000"`). mosquitto 2.0.11 itself is lenient by the remaining length's own
//! bytes (it compares remaining length + 1 with the limit, so it would take a 100003-byte
//! packet): the one-byte-over reading is refused by the gateway's own arithmetic, and the test
//! checks that it never arrives.
//!
//! The payload size that makes a 100000-byte packet depends on the properties the gateway adds
//! over MQTT 5 (user properties `seq` and `ingested_at`, whose lengths vary with the values). The
//! test measures them: the cloud subscriber records the size of each received PUBLISH's property
//! block (mosquitto passes properties through unchanged, both hops QoS 1, no topic alias), and
//! the boundary readings are sized from the latest one, after making sure the seq keeps its
//! number of digits (filler readings first if it is about to gain one). The delivered
//! boundary reading's packet is then checked to be exactly 100000 bytes, so a wrong prediction
//! fails loudly instead of testing the wrong boundary.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, MosquittoOptions, Outpost, Received, Subscriber, SubscriberSpec,
    TestDir, UplinkReport, UpstreamProtocol, blob, free_port, json_u64, payload, publish_all_acked,
    publish_packet_size, wait_for,
};

const NODE: &str = "gw1";
const LIMIT: usize = 100_000;
const SWEEP: &str = "sensors/sweep";
const FILLER: &str = "sensors/filler";
/// Payload sizes below the boundary: empty, one byte, around the remaining length's 1-, 2- and
/// 3-byte encodings and the 16-bit boundary.
const SIZES: [usize; 8] = [0, 1, 127, 128, 16_383, 16_384, 65_535, 65_536];

fn digits(n: u64) -> usize {
    n.to_string().len()
}

/// The readings on the sweep topic that arrived, first copies in arrival order.
fn sweep_firsts<'a>(
    msgs: &'a [Received],
    expected: &[Vec<u8>],
) -> anyhow::Result<Vec<&'a Received>> {
    let topic = format!("outpost/{NODE}/{SWEEP}");
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut firsts = Vec::new();
    for m in msgs.iter().filter(|m| m.topic == topic) {
        if !expected.contains(&m.payload) {
            anyhow::bail!(
                "a {} B payload no sensor sent (or changed on the way) arrived on {topic}",
                m.payload.len()
            );
        }
        if !seen.contains(&m.payload.as_slice()) {
            seen.push(&m.payload);
            firsts.push(m);
        }
    }
    Ok(firsts)
}

fn boundary(protocol: UpstreamProtocol) -> anyhow::Result<()> {
    let v5 = protocol == UpstreamProtocol::V5;
    let dir = TestDir::new(&format!("packet-limit-{}", protocol.as_str()))?;
    let cloud = Mosquitto::start_with(
        &dir,
        free_port()?,
        &MosquittoOptions::packet_limit(u32::try_from(LIMIT)?),
    )?;
    // A 3.1.1 consumer for the 3.1.1 gateway: its received packets have no property block
    // either, so their size is the gateway's.
    let mut sub = SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#"));
    sub.protocol = protocol.as_str().to_owned();
    let consumer = Subscriber::spawn(&dir, "cloud", &sub)?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    if v5 {
        // The shipped default ("auto") against mosquitto: MQTT 5, the limit from CONNACK.
        cfg.protocol = None;
    } else {
        cfg.protocol = Some(UpstreamProtocol::V311);
        cfg.upstream_max_packet_size = Some(LIMIT.to_string());
    }
    let gw = Outpost::start(&dir, &cfg)?;
    gw.wait_uplink_connected()?;

    let upstream_topic_len = format!("outpost/{NODE}/{SWEEP}").len();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    let mut sweep: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, size) in SIZES.iter().enumerate() {
        let b = blob(100 + i as u64, *size);
        expected.push(b.clone());
        sweep.push((SWEEP.to_owned(), b));
    }
    publish_all_acked(
        &dir,
        "sweep",
        gw.port(),
        "3.1.1",
        &sweep,
        Duration::from_secs(60),
    )?;
    wait_for("the sweep upstream", Duration::from_secs(60), || {
        let m = consumer.messages().ok()?;
        (sweep_firsts(&m, &expected).ok()?.len() == expected.len()).then_some(())
    })?;

    // The property block the next readings will carry (MQTT 5): that of the latest reading,
    // once the seq is far enough from gaining a digit.
    let mut props_len = None;
    if v5 {
        let mut fillers = 0u64;
        loop {
            let msgs = consumer.messages()?;
            let latest = msgs
                .iter()
                .filter(|m| m.topic.ends_with(SWEEP) || m.topic.ends_with(FILLER))
                .filter_map(|m| Some((m.props.get("seq")?.parse::<u64>().ok()?, m)))
                .max_by_key(|(s, _)| *s);
            let (seq, m) = latest.ok_or_else(|| {
                anyhow::anyhow!("no reading upstream carries a seq user property over MQTT 5")
            })?;
            if digits(seq + 20) == digits(seq) {
                props_len = Some(m.props_len.ok_or_else(|| {
                    anyhow::anyhow!("the MQTT 5 subscriber recorded no property block")
                })?);
                break;
            }
            let batch: Vec<(String, Vec<u8>)> = (fillers..fillers + 10)
                .map(|c| (FILLER.to_owned(), payload(FILLER, c, 10)))
                .collect();
            publish_all_acked(
                &dir,
                &format!("filler{fillers}"),
                gw.port(),
                "3.1.1",
                &batch,
                Duration::from_secs(60),
            )?;
            fillers += 10;
            let want = usize::try_from(fillers)?;
            wait_for("the fillers upstream", Duration::from_secs(60), || {
                let m = consumer.messages().ok()?;
                (m.iter().filter(|r| r.topic.ends_with(FILLER)).count() >= want).then_some(())
            })?;
        }
    }

    let size = |p: usize| publish_packet_size(upstream_topic_len, props_len, p);
    let max = (0..LIMIT)
        .rev()
        .find(|p| size(*p) <= LIMIT)
        .ok_or_else(|| anyhow::anyhow!("no payload fits"))?;
    assert_eq!(
        size(max),
        LIMIT,
        "no payload size makes exactly {LIMIT} (harness)"
    );
    assert_eq!(size(max + 1), LIMIT + 1);
    eprintln!("largest allowed payload: {max} B (property block {props_len:?})");

    let below = blob(200, max - 1);
    let at = blob(201, max);
    let over = blob(202, max + 1);
    let after = blob(203, 10);
    expected.extend([below.clone(), at.clone(), after.clone()]);
    let last: Vec<(String, Vec<u8>)> = [&below, &at, &over, &after]
        .into_iter()
        .map(|b| (SWEEP.to_owned(), b.clone()))
        .collect();
    publish_all_acked(
        &dir,
        "boundary",
        gw.port(),
        "3.1.1",
        &last,
        Duration::from_secs(60),
    )?;

    gw.wait_status(
        "the one-byte-over reading refused, the rest synced",
        Duration::from_secs(60),
        |s| {
            json_u64(s, &["refused_records"]) == Some(1)
                && json_u64(s, &["buffered_records"]) == Some(0)
        },
    )?;
    wait_for(
        "the reading after the refused one",
        Duration::from_secs(30),
        || {
            consumer
                .messages()
                .ok()?
                .iter()
                .any(|m| m.payload == after)
                .then_some(())
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let msgs = consumer.messages()?;

    assert!(
        !msgs.iter().any(|m| m.payload == over),
        "the reading one byte over the limit arrived upstream"
    );
    let firsts = sweep_firsts(&msgs, &expected)?;
    let got: Vec<usize> = firsts.iter().map(|m| m.payload.len()).collect();
    let want: Vec<usize> = expected.iter().map(Vec::len).collect();
    assert_eq!(
        got, want,
        "payload sizes in arrival order, 0 B to the largest allowed"
    );
    for m in &firsts {
        assert!(
            m.packet_size() <= LIMIT,
            "a {} B packet went to a broker whose limit is {LIMIT}",
            m.packet_size()
        );
    }
    let at_msg = firsts
        .iter()
        .find(|m| m.payload == at)
        .ok_or_else(|| anyhow::anyhow!("the largest allowed reading did not arrive"))?;
    assert_eq!(
        at_msg.packet_size(),
        LIMIT,
        "the boundary reading's packet is not exactly the limit: the gateway's properties \
         changed from one reading to the next (props_len {:?}, predicted {props_len:?})",
        at_msg.props_len
    );
    if v5 {
        let seqs: Vec<u64> = firsts
            .iter()
            .map(|m| {
                m.props
                    .get("seq")
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("no seq on a {} B reading", m.payload.len()))
            })
            .collect::<anyhow::Result<_>>()?;
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seq increases in store order: {seqs:?}"
        );
    }

    let status = gw.status_json()?;
    let r = UplinkReport::from_status(&status);
    let want = UplinkReport {
        state: Some("connected".to_owned()),
        protocol: Some(protocol.as_str().to_owned()),
        max_packet_size: Some(u64::try_from(LIMIT)?),
        reconnects: Some(0),
        sync_refused: Some(1),
        refused_by_reason: UplinkReport::only("packet_too_large", 1),
        refused_records: Some(1),
        // buffered_records reached 0 above; the gateway's own resource samples (every 30 s)
        // may be in flight at any one instant.
        ..r.clone()
    };
    assert_eq!(r, want, "uplink figures; status: {status:#}");
    Ok(())
}

#[test]
fn mqtt5_packet_of_exactly_the_connack_limit_arrives_one_byte_more_is_refused() -> anyhow::Result<()>
{
    boundary(UpstreamProtocol::V5)
}

#[test]
fn mqtt311_packet_of_exactly_the_configured_limit_arrives_one_byte_more_is_refused()
-> anyhow::Result<()> {
    boundary(UpstreamProtocol::V311)
}
