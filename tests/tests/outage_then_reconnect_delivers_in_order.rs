//! Upstream outage: the cloud broker is SIGKILLed; while it is down, QoS 1 readings (10 topics,
//! 100 B each) are published to outpost and acknowledged. When the broker comes back on the same
//! port (with the cloud consumer's persistent session restored, so it is subscribed before
//! outpost can reconnect), every acknowledged reading arrives, per-topic order is kept (ignoring
//! duplicates), duplicates only carry a seq already seen, and the buffer empties.
//!
//! Run three ways ([`UplinkVariant`]): with the shipped uplink defaults (protocol and metadata
//! absent: MQTT 5 against mosquitto, seq in user properties) at full size, 100,000 readings
//! (10 x 10,000); pinned to MQTT 3.1.1 without metadata (duplicates recognised by payload
//! only); and MQTT 3.1.1 with `metadata = "envelope"`, where the consumer decodes the CBOR
//! envelope and dedupes by its seq. The two extra variants send 10,000 readings (10 x 1,000):
//! the suite runs on 2 cores and they test the encoding, not the volume.

use std::time::Duration;

use outpost_tests::{
    Mosquitto, Outpost, Publisher, PublisherSpec, Subscriber, SubscriberSpec, TestDir,
    UplinkVariant, check_upstream_delivery, json_str, json_u64, wait_for_readings,
};

const NODE: &str = "gw1";
const TOPICS: usize = 10;
const PUBLISHERS: usize = 5;

fn outage_then_reconnect(v: UplinkVariant) -> anyhow::Result<()> {
    let per_topic = v.count(10_000, 1_000);
    let dir = TestDir::new(&format!("outage-{}", v.name))?;
    let mut cloud = Mosquitto::start_on(&dir, Mosquitto::reserve_port()?, true)?;
    let mut sub_spec = SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#"));
    sub_spec.client_id = "cloud-consumer".to_owned();
    sub_spec.session_expiry = Some(3600);
    let consumer = Subscriber::spawn(&dir, "cloud", &v.subscriber(sub_spec))?;

    let mut gw = Outpost::start(&dir, &v.gateway_config(&dir, NODE, Some(cloud.port()))?)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;

    // An abrupt outage: SIGKILL, once the consumer's session is in mosquitto's database.
    cloud.wait_saved()?;
    cloud.kill()?;
    gw.wait_status(
        "uplink to notice the outage",
        Duration::from_secs(60),
        |s| json_str(s, &["runtime", "uplink_state"]).is_some_and(|st| st != "connected"),
    )?;

    let topics: Vec<String> = (0..TOPICS)
        .map(|i| format!("site/sensor-{i}/value"))
        .collect();
    let mut publishers = Vec::new();
    for (p, chunk) in topics.chunks(TOPICS / PUBLISHERS).enumerate() {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        publishers.push(Publisher::spawn(
            &dir,
            &format!("pub{p}"),
            &PublisherSpec::new(gw.port(), &names, per_topic),
        )?);
    }
    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.finish(Duration::from_secs(600))?);
    }
    let total = TOPICS * usize::try_from(per_topic)?;
    assert_eq!(
        acked.len(),
        total,
        "every reading is acked while the upstream is down"
    );
    let during = gw.status_json()?;
    let buffered = json_u64(&during, &["buffered_records"]).unwrap_or(0);
    assert!(
        buffered >= u64::try_from(total)?,
        "buffered_records {buffered} < {total} acked readings during the outage: {during:#}"
    );

    cloud.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(600))?;
    gw.wait_status("buffer drained", Duration::from_secs(120), |s| {
        json_u64(s, &["buffered_records"]) == Some(0)
    })?;

    // The consumer must have been subscribed before outpost could reconnect, i.e. its session
    // came back from mosquitto's persistence file; otherwise this run proved nothing.
    let consumer_log = std::fs::read_to_string(consumer.log())?;
    let fresh = consumer_log
        .lines()
        .filter(|l| l.starts_with("connected session_present=False"))
        .count();
    assert_eq!(
        fresh, 1,
        "the consumer's session did not survive the broker restart (harness problem):\n{consumer_log}"
    );

    let d = check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, v.seq_source())?;
    eprintln!("delivery: {d:?}");
    assert_eq!(d.distinct, total);
    Ok(())
}

#[test]
fn outage_then_reconnect_delivers_every_acked_reading_in_order() -> anyhow::Result<()> {
    outage_then_reconnect(UplinkVariant::SHIPPED_DEFAULTS)
}

#[test]
fn outage_then_reconnect_over_mqtt311_delivers_every_acked_reading_in_order() -> anyhow::Result<()>
{
    outage_then_reconnect(UplinkVariant::MQTT311)
}

#[test]
fn outage_then_reconnect_over_mqtt311_envelope_dedupes_by_envelope_seq() -> anyhow::Result<()> {
    outage_then_reconnect(UplinkVariant::MQTT311_ENVELOPE)
}
