//! Crash while sensors publish: outpost is SIGKILLed while four publishers are sending QoS 1
//! readings (upstream up). After a restart, every reading a publisher saw PUBACKed arrives
//! upstream (0 lost), per-topic order is kept and duplicates carry their first seq.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, Subscriber, SubscriberSpec,
    TestDir, check_upstream_delivery, json_str, json_u64, wait_for, wait_for_readings,
};

const NODE: &str = "gw1";

#[test]
fn sigkill_while_publishing_loses_no_acked_reading() -> anyhow::Result<()> {
    let dir = TestDir::new("crash-ingest")?;
    let cloud = Mosquitto::start(&dir)?;
    let consumer = Subscriber::spawn(
        &dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    let mut gw = Outpost::start(&dir, &GatewayConfig::new(&dir, NODE, Some(cloud.port()))?)?;
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
                &PublisherSpec::new(gw.port(), &[t.as_str()], 25_000),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_for(
        "5,000 acked readings before the crash",
        Duration::from_secs(120),
        || {
            let n: usize = publishers
                .iter()
                .map(|p| p.acked().map_or(0, |a| a.len()))
                .sum();
            (n >= 5_000).then_some(())
        },
    )?;
    gw.sigkill()?;

    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.finish(Duration::from_secs(120))?);
    }
    assert!(
        acked.len() < 100_000,
        "the crash happened after everything was sent; nothing was tested"
    );
    eprintln!("{} readings acked before the crash", acked.len());

    gw.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(300))?;
    gw.wait_status("buffer drained", Duration::from_secs(120), |s| {
        json_u64(s, &["buffered_records"]) == Some(0)
    })?;
    let d = check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, true)?;
    eprintln!("delivery: {d:?}");
    Ok(())
}
