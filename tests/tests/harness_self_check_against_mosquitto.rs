//! The harness itself, against mosquitto alone (no outpost): if this fails, the machine or the
//! harness is broken, not the gateway. Also pins the payload format shared with publisher.py.

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_tests::{
    Mosquitto, MosquittoOptions, Publisher, PublisherSpec, Subscriber, SubscriberSpec, TestDir,
    blob, free_port, parse_payload, payload, publish_all_acked, publish_packet_size,
    run_blob_publisher, wait_for,
};

#[test]
fn publisher_acks_and_subscriber_records_against_mosquitto() -> anyhow::Result<()> {
    let dir = TestDir::new("harness")?;
    let mut broker = Mosquitto::start(&dir)?;
    let sub = Subscriber::spawn(&dir, "sub", &SubscriberSpec::new(broker.port(), "h/#"))?;
    let mut spec = PublisherSpec::new(broker.port(), &["h/a", "h/b"], 500);
    spec.protocol = "5".to_owned();
    let acked = Publisher::spawn(&dir, "pub", &spec)?.finish(Duration::from_secs(120))?;
    assert_eq!(acked.len(), 1000, "every reading is acked by mosquitto");
    let msgs = wait_for("1000 messages", Duration::from_secs(60), || {
        let m = sub.messages().ok()?;
        (m.len() >= 1000).then_some(m)
    })?;
    let got: BTreeSet<(String, u64)> = msgs
        .iter()
        .filter_map(|m| parse_payload(&m.payload))
        .collect();
    let want: BTreeSet<(String, u64)> = acked.into_iter().collect();
    assert_eq!(got, want);
    for m in &msgs {
        let (t, c) = parse_payload(&m.payload).expect("payload format");
        assert_eq!(m.topic, t);
        assert_eq!(m.payload, payload(&t, c, 100));
        assert_eq!(m.qos, 1);
    }

    // A restart on the same port works (the scenarios rely on it).
    broker.kill()?;
    broker.restart()?;
    broker.stop()?;
    Ok(())
}

#[test]
fn payload_format_is_stable() {
    assert_eq!(payload("a/b", 7, 10), b"a/b|7|....".to_vec());
    assert_eq!(
        payload("long/topic", 12345, 4),
        b"long/topic|12345|".to_vec()
    );
    assert_eq!(parse_payload(b"a/b|7|...."), Some(("a/b".to_owned(), 7)));
}

/// The packet size arithmetic the limit scenarios rely on ([`publish_packet_size`], the
/// subscriber's recorded property block) agrees with mosquitto's own parsing: mosquitto 2.0.11
/// with `max_packet_size N` takes a PUBLISH whose remaining length + 1 is at most N (so a whole
/// packet of N + 3 bytes at this size) and closes the connection on one byte more.
#[test]
fn packet_size_arithmetic_matches_mosquitto() -> anyhow::Result<()> {
    const LIMIT: usize = 100_000;
    let dir = TestDir::new("harness-packet-size")?;
    let broker = Mosquitto::start_with(
        &dir,
        free_port()?,
        &MosquittoOptions::packet_limit(u32::try_from(LIMIT)?),
    )?;
    let sub = Subscriber::spawn(&dir, "sub", &SubscriberSpec::new(broker.port(), "h/#"))?;
    // The user properties the gateway adds: seq and ingested_at (1 + 2+3 + 2+2 and
    // 1 + 2+11 + 2+13 bytes) behind the block's one-byte length: 40 bytes.
    let props_len = 1 + (1 + 5 + 4) + (1 + 13 + 15);
    let topic = "h/size";
    let accepted = (0..LIMIT + 10)
        .rev()
        .find(|p| publish_packet_size(topic.len(), Some(props_len), *p) == LIMIT + 3)
        .ok_or_else(|| anyhow::anyhow!("no payload makes {} bytes", LIMIT + 3))?;
    // paho, not mosquitto_pub: libmosquitto checks the CONNACK limit itself (exactly) and
    // would not send the over-limit packets at all.
    let publish = |name: &str, size: usize| {
        let reading = (topic.to_owned(), blob(size as u64, size));
        run_blob_publisher(
            &dir,
            name,
            broker.port(),
            "5",
            &[("seq", "12"), ("ingested_at", "1796400219000")],
            &[reading],
            Duration::from_secs(30),
        )
    };
    let (ok, out) = publish("fits", accepted)?;
    assert!(ok, "the packet of limit + 3 bytes was not acked: {out:?}");
    let got = wait_for(
        "the packet of limit + 3 bytes",
        Duration::from_secs(30),
        || sub.messages().ok()?.into_iter().find(|m| m.topic == topic),
    )?;
    assert_eq!(got.props_len, Some(props_len), "recorded property block");
    assert_eq!(got.packet_size(), LIMIT + 3);
    assert_eq!(got.payload, blob(accepted as u64, accepted));

    let (ok, out) = publish("over", accepted + 1)?;
    assert!(!ok, "a packet of limit + 4 bytes was acked: {out:?}");
    std::thread::sleep(Duration::from_secs(1));
    let n = sub.messages()?.iter().filter(|m| m.topic == topic).count();
    assert_eq!(n, 1, "mosquitto took a packet of limit + 4 bytes");
    let log = std::fs::read_to_string(broker.log())?;
    assert!(
        log.contains("disconnected due to oversize packet"),
        "mosquitto did not say why it closed:\n{log}"
    );
    Ok(())
}

fn cbor_head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => [vec![m | 25], (n as u16).to_be_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![m | 26], (n as u32).to_be_bytes().to_vec()].concat(),
        _ => [vec![m | 27], n.to_be_bytes().to_vec()].concat(),
    }
}

fn cbor_text(s: &str) -> Vec<u8> {
    [cbor_head(3, s.len() as u64), s.as_bytes().to_vec()].concat()
}

/// A CBOR map of text keys, encoded by hand (independently of the decoder under test).
fn cbor_map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = cbor_head(5, entries.len() as u64);
    for (k, v) in entries {
        out.extend(cbor_text(k));
        out.extend_from_slice(v);
    }
    out
}

/// The envelope-decoding consumer (subscriber.py --envelope, cbor2) against hand-encoded CBOR
/// through mosquitto: a valid envelope yields its payload and seq; a payload in a text string,
/// trailing bytes and bytes that are not CBOR are reported, not accepted.
#[test]
fn envelope_consumer_decodes_cbor_envelopes() -> anyhow::Result<()> {
    let dir = TestDir::new("harness-envelope")?;
    let broker = Mosquitto::start(&dir)?;
    let mut spec = SubscriberSpec::new(broker.port(), "e/#");
    spec.envelope = true;
    let sub = Subscriber::spawn(&dir, "sub", &spec)?;
    let inner = payload("e/a", 3, 40);
    let envelope = |payload_item: Vec<u8>| {
        cbor_map(&[
            ("v", cbor_head(0, 1)),
            ("seq", cbor_head(0, 70_000)),
            ("ingested_at", cbor_head(0, 1_800_000_000_123)),
            ("payload", payload_item),
        ])
    };
    let good = envelope([cbor_head(2, inner.len() as u64), inner.clone()].concat());
    let text = envelope(cbor_text(std::str::from_utf8(&inner)?));
    let trailing = [good.clone(), vec![0]].concat();
    let readings: Vec<(String, Vec<u8>)> = [
        ("e/good", good),
        ("e/text", text),
        ("e/trailing", trailing),
        ("e/raw", inner.clone()),
    ]
    .into_iter()
    .map(|(t, b)| (t.to_owned(), b))
    .collect();
    publish_all_acked(
        &dir,
        "pub",
        broker.port(),
        "5",
        &readings,
        Duration::from_secs(30),
    )?;
    let msgs = wait_for("four messages", Duration::from_secs(30), || {
        let m = sub.messages().ok()?;
        (m.len() >= 4).then_some(m)
    })?;
    let by_topic = |t: &str| msgs.iter().find(|m| m.topic == t).expect(t);

    let g = by_topic("e/good");
    assert_eq!(g.payload, inner, "the envelope's payload");
    let env = g
        .envelope
        .clone()
        .expect("decoded")
        .expect("valid CBOR map");
    assert_eq!(env.check(None)?, 70_000);
    assert_eq!(env.ingested_at, Some(1_800_000_000_123));

    let t = by_topic("e/text").envelope.clone().expect("decoded");
    assert!(
        t.expect("a CBOR map").check(None).is_err(),
        "a text payload is not the contract's bytes"
    );
    for bad in ["e/trailing", "e/raw"] {
        assert!(
            matches!(by_topic(bad).envelope, Some(Err(_))),
            "{bad}: {:?}",
            by_topic(bad).envelope
        );
    }
    Ok(())
}
