//! The harness itself, against mosquitto alone (no outpost): if this fails, the machine or the
//! harness is broken, not the gateway. Also pins the payload format shared with publisher.py.

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_tests::{
    Mosquitto, Publisher, PublisherSpec, Subscriber, SubscriberSpec, TestDir, parse_payload,
    payload, wait_for,
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
