//! Crash while sensors publish: outpost is SIGKILLed while four publishers are sending QoS 1
//! readings (upstream up). After a restart, every reading a publisher saw PUBACKed arrives
//! upstream (0 lost), per-topic order is kept and duplicates carry their first seq.
//!
//! Run three ways ([`UplinkVariant`]): shipped uplink defaults (MQTT 5 against mosquitto, seq in
//! user properties) with 4 x 25,000 readings, crash after 5,000 acked; MQTT 3.1.1 without
//! metadata (duplicates recognised by payload only) and MQTT 3.1.1 with the CBOR envelope (the
//! consumer dedupes by the envelope's seq), scaled down to 4 x 10,000, crash after 2,000 acked,
//! to keep the suite's time sane on 2 cores.

use std::time::Duration;

use outpost_tests::{
    Mosquitto, Outpost, Publisher, PublisherSpec, Subscriber, SubscriberSpec, TestDir,
    UplinkVariant, check_upstream_delivery, json_str, json_u64, wait_for, wait_for_readings,
};

const NODE: &str = "gw1";

fn crash_during_ingest(v: UplinkVariant) -> anyhow::Result<()> {
    let per_topic = v.count(25_000, 10_000);
    let crash_after = usize::try_from(v.count(5_000, 2_000))?;
    let dir = TestDir::new(&format!("crash-ingest-{}", v.name))?;
    let cloud = Mosquitto::start(&dir)?;
    let consumer = Subscriber::spawn(
        &dir,
        "cloud",
        &v.subscriber(SubscriberSpec::new(
            cloud.port(),
            &format!("outpost/{NODE}/#"),
        )),
    )?;
    let mut gw = Outpost::start(&dir, &v.gateway_config(&dir, NODE, Some(cloud.port()))?)?;
    gw.wait_status("uplink connected", Duration::from_secs(30), |s| {
        json_str(s, &["runtime", "uplink_state"]) == Some("connected")
    })?;

    let topics: Vec<String> = (0..4).map(|i| format!("line/{i}/temp")).collect();
    let publishers = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Publisher::spawn(
                &dir,
                &format!("pub{i}"),
                &PublisherSpec::new(gw.port(), &[t.as_str()], per_topic),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_for(
        &format!("{crash_after} acked readings before the crash"),
        Duration::from_secs(120),
        || {
            let n: usize = publishers
                .iter()
                .map(|p| p.acked().map_or(0, |a| a.len()))
                .sum();
            (n >= crash_after).then_some(())
        },
    )?;
    gw.sigkill()?;

    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.finish(Duration::from_secs(120))?);
    }
    assert!(
        acked.len() < 4 * usize::try_from(per_topic)?,
        "the crash happened after everything was sent; nothing was tested"
    );
    eprintln!("{} readings acked before the crash", acked.len());

    gw.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(300))?;
    gw.wait_status("buffer drained", Duration::from_secs(120), |s| {
        json_u64(s, &["buffered_records"]) == Some(0)
    })?;
    let d = check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, v.seq_source())?;
    eprintln!("delivery: {d:?}");
    Ok(())
}

#[test]
fn sigkill_while_publishing_loses_no_acked_reading() -> anyhow::Result<()> {
    crash_during_ingest(UplinkVariant::SHIPPED_DEFAULTS)
}

#[test]
fn sigkill_while_publishing_over_mqtt311_loses_no_acked_reading() -> anyhow::Result<()> {
    crash_during_ingest(UplinkVariant::MQTT311)
}

#[test]
fn sigkill_while_publishing_over_mqtt311_envelope_loses_no_acked_reading() -> anyhow::Result<()> {
    crash_during_ingest(UplinkVariant::MQTT311_ENVELOPE)
}
