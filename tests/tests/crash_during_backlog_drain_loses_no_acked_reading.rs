//! Crash while draining a backlog: readings are acked while the upstream is down, outpost is
//! stopped with SIGTERM (exit 0), the upstream comes up with a consumer attached, outpost is
//! restarted and SIGKILLed while it drains. After another restart every acked reading arrives
//! upstream (0 lost), per-topic order is kept and duplicates carry their first seq.
//!
//! Run three ways ([`UplinkVariant`]): shipped uplink defaults (MQTT 5 against mosquitto, seq in
//! user properties) with a 50,000-reading backlog; MQTT 3.1.1 without metadata (duplicates
//! recognised by payload only) and MQTT 3.1.1 with the CBOR envelope (the consumer dedupes by
//! the envelope's seq) with 20,000, to keep the suite's time sane on 2 cores (still enough that
//! the drain is under way, not finished, when the crash comes: the test checks that).

use std::time::Duration;

use outpost_tests::{
    Mosquitto, Outpost, Publisher, PublisherSpec, Subscriber, SubscriberSpec, TestDir,
    UplinkVariant, check_upstream_delivery, json_u64, wait_for, wait_for_readings,
};

const NODE: &str = "gw1";

fn crash_during_drain(v: UplinkVariant) -> anyhow::Result<()> {
    let per_topic = v.count(12_500, 5_000);
    let total = 4 * per_topic;
    let dir = TestDir::new(&format!("crash-drain-{}", v.name))?;
    let cloud_port = Mosquitto::reserve_port()?;
    let mut gw = Outpost::start(&dir, &v.gateway_config(&dir, NODE, Some(cloud_port))?)?;

    let topics: Vec<String> = (0..4).map(|i| format!("field/{i}/soil")).collect();
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
    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.finish(Duration::from_secs(300))?);
    }
    assert_eq!(
        acked.len(),
        usize::try_from(total)?,
        "every reading acked while the upstream is down"
    );

    let st = gw.sigterm()?;
    assert!(
        st.success(),
        "SIGTERM must stop outpost with exit 0, got {st}"
    );
    let stopped = gw.status_json()?;
    assert!(
        json_u64(&stopped, &["buffered_records"]).is_some_and(|n| n >= total),
        "the backlog survives a clean stop: {stopped:#}"
    );

    let _cloud = Mosquitto::start_on(&dir, cloud_port, false)?;
    let consumer = Subscriber::spawn(
        &dir,
        "cloud",
        &v.subscriber(SubscriberSpec::new(
            cloud_port,
            &format!("outpost/{NODE}/#"),
        )),
    )?;
    gw.restart()?;
    wait_for("the drain to start", Duration::from_secs(120), || {
        (consumer.count() >= 500).then_some(())
    })?;
    gw.sigkill()?;
    let after_kill = gw.status_json()?;
    let left = json_u64(&after_kill, &["buffered_records"]).unwrap_or(0);
    assert!(
        left > 0,
        "the drain finished before the SIGKILL; the scenario did not crash mid-drain: {after_kill:#}"
    );
    eprintln!(
        "{left} records left in the buffer at the crash; {} messages upstream",
        consumer.count()
    );

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
fn sigkill_while_draining_backlog_loses_no_acked_reading() -> anyhow::Result<()> {
    crash_during_drain(UplinkVariant::SHIPPED_DEFAULTS)
}

#[test]
fn sigkill_while_draining_backlog_over_mqtt311_loses_no_acked_reading() -> anyhow::Result<()> {
    crash_during_drain(UplinkVariant::MQTT311)
}

#[test]
fn sigkill_while_draining_backlog_over_mqtt311_envelope_loses_no_acked_reading()
-> anyhow::Result<()> {
    crash_during_drain(UplinkVariant::MQTT311_ENVELOPE)
}
