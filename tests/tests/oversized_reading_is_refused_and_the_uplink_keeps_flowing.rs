//! One reading the upstream cannot take never stops the uplink, with the shipped defaults.
//!
//! The cloud broker is a stock mosquitto with `max_packet_size 100000`. The gateway runs with the
//! shipped uplink defaults: `[upstream]` holds only the url (the README quick start, `outpost run
//! --upstream URL`), so the protocol is "auto" (MQTT 5 against mosquitto), the client's own limit
//! is the MQTT maximum and mosquitto's CONNACK announces 100000. The only other change is
//! `[broker] max_packet_size = "2MiB"`: the local broker's default limit (256KiB) would refuse the
//! 1 MB reading from the sensor before the uplink ever saw it.
//!
//! A sensor (paho, QoS 1, each reading after the previous PUBACK) sends 20 small readings with
//! a 20 KB, a 200 KB and a 1 MB reading between them; the gateway acks all 23. Then:
//! - every small reading arrives in order with its seq, and the 20 KB one byte for byte (it is
//!   over rumqttc's 10 KiB default, under the broker's limit: it must go through);
//! - the 200 KB and 1 MB ones do not arrive: they are in the refused table (`refused_records`
//!   2) with reason packet_too_large (`runtime.sync_refused_by_reason`, metrics), the buffer
//!   drains to 0;
//! - the link never dropped: `runtime.reconnects` 0, one birth published and seen once by a
//!   cloud subscriber, `runtime.uplink_protocol` "5" without fallback, effective limit 100000.
//!
//! The second test is the same over MQTT 3.1.1 (pinned): a 3.1.1 broker does not announce its
//! limit, so the user configures it (`[upstream] max_packet_size = "100000"`), with the same
//! outcome. The third test pins what the status says when nobody configured that limit on 3.1.1:
//! mosquitto then closes the connection on the 200 KB reading each time it is sent, and after
//! two failures right after connecting on the same record `runtime.uplink_failing_seq` and
//! `runtime.uplink_failing_reason` name it.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, MosquittoOptions, Outpost, RawReading, Received, SeqSource,
    Subscriber, SubscriberSpec, TestDir, UplinkReport, UpstreamProtocol, births, blob,
    check_upstream_delivery, free_port, json_u64, payload, publish_all_acked, scrape_metrics,
    wait_for, wait_for_readings,
};

const NODE: &str = "gw1";
/// mosquitto's `max_packet_size`.
const LIMIT: u32 = 100_000;
const SMALL: &str = "sensors/small";
const BIG: &str = "sensors/blob";
/// The big readings: 20 KB goes through, the other two are over the limit.
const BIG_SIZES: [usize; 3] = [20_000, 200_000, 1_000_000];

/// The readings in publish order: 5 small, 20 KB, 5 small, 200 KB, 5 small, 1 MB, 5 small.
fn plan() -> (Vec<RawReading>, Vec<(String, u64)>) {
    let mut readings = Vec::new();
    let mut small = Vec::new();
    let mut counter = 0;
    let mut smalls = |readings: &mut Vec<RawReading>| {
        for _ in 0..5 {
            readings.push((SMALL.to_owned(), payload(SMALL, counter, 100)));
            small.push((SMALL.to_owned(), counter));
            counter += 1;
        }
    };
    for (i, size) in BIG_SIZES.iter().enumerate() {
        smalls(&mut readings);
        readings.push((BIG.to_owned(), blob(i as u64, *size)));
    }
    smalls(&mut readings);
    (readings, small)
}

/// Starts mosquitto (limit 100000, a consumer on `outpost/<node>/#` subscribed before the gateway
/// exists) and the gateway with `cfg_fn` applied to the shipped-defaults configuration.
fn setup(
    dir: &TestDir,
    cfg_fn: impl FnOnce(&mut GatewayConfig),
) -> anyhow::Result<(Mosquitto, Subscriber, Outpost, GatewayConfig)> {
    let cloud = Mosquitto::start_with(dir, free_port()?, &MosquittoOptions::packet_limit(LIMIT))?;
    let consumer = Subscriber::spawn(
        dir,
        "cloud",
        &SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#")),
    )?;
    let mut cfg = GatewayConfig::new(dir, NODE, Some(cloud.port()))?;
    cfg.upstream_url_only = true;
    cfg.broker_max_packet_size = "2MiB".to_owned();
    cfg_fn(&mut cfg);
    let gw = Outpost::start(dir, &cfg)?;
    gw.wait_uplink_connected()?;
    Ok((cloud, consumer, gw, cfg))
}

/// A sensor publishes `readings` (QoS 1, MQTT 3.1.1, in order); the gateway must ack them all.
fn sensor(dir: &TestDir, gw: &Outpost, readings: &[RawReading]) -> anyhow::Result<()> {
    publish_all_acked(
        dir,
        "sensor",
        gw.port(),
        "3.1.1",
        readings,
        Duration::from_secs(120),
    )
}

fn big_readings(
    name: &str,
    cfg_fn: impl FnOnce(&mut GatewayConfig),
    protocol: &str,
    seq: SeqSource,
) -> anyhow::Result<()> {
    let dir = TestDir::new(name)?;
    let (_cloud, consumer, mut gw, cfg) = setup(&dir, cfg_fn)?;

    let (readings, small) = plan();
    sensor(&dir, &gw, &readings)?;

    wait_for_readings(&consumer, &mut gw, &small, Duration::from_secs(60))?;
    gw.wait_status(
        "the two oversized readings refused and the rest synced",
        Duration::from_secs(60),
        |s| {
            json_u64(s, &["refused_records"]) == Some(2)
                && json_u64(s, &["buffered_records"]) == Some(0)
        },
    )?;
    let twenty_kb = blob(0, BIG_SIZES[0]);
    let big_topic = format!("outpost/{NODE}/{BIG}");
    wait_for(
        "the 20 KB reading upstream",
        Duration::from_secs(30),
        || {
            let m = consumer.messages().ok()?;
            m.iter().any(|r| r.topic == big_topic).then_some(())
        },
    )?;
    // A few seconds more: a link that drops after the refusals, or resends a refused record,
    // shows up in the counters and upstream by then (the status is written every second).
    std::thread::sleep(Duration::from_secs(3));
    gw.check_alive()?;
    let msgs = consumer.messages()?;

    let d = check_upstream_delivery(&msgs, NODE, &[SMALL.to_owned()], 100, &small, seq)?;
    assert_eq!(d.distinct, small.len(), "every small reading arrives");
    let big: Vec<&Received> = msgs.iter().filter(|m| m.topic == big_topic).collect();
    assert!(!big.is_empty(), "the 20 KB reading never arrived upstream");
    for m in &big {
        assert!(
            m.payload == twenty_kb,
            "a {} B message arrived on {big_topic}: only the 20 KB reading fits, byte for byte",
            m.payload.len()
        );
    }

    let status = gw.status_json()?;
    let r = UplinkReport::from_status(&status);
    let want = UplinkReport {
        state: Some("connected".to_owned()),
        protocol: Some(protocol.to_owned()),
        protocol_reported: true,
        fallback: Some(false),
        max_packet_size: Some(u64::from(LIMIT)),
        reconnects: Some(0),
        births_published: Some(1),
        sync_refused: Some(2),
        refused_by_reason: UplinkReport::only("packet_too_large", 2),
        refused_records: Some(2),
        refused_total: Some(2),
        // buffered_records reached 0 above; the gateway's own resource samples (every 30 s)
        // may be in flight at any one instant.
        ..r.clone()
    };
    assert_eq!(r, want, "uplink figures; status: {status:#}");

    let seen = births(&msgs, NODE);
    assert_eq!(
        seen.len(),
        1,
        "the cloud subscriber saw {} births (one per connection; the link must not reconnect)",
        seen.len()
    );

    let m = scrape_metrics(cfg.health_port)?;
    assert_eq!(
        m.get(
            "outpost_sync_refused_total",
            &[("reason", "packet_too_large")]
        )?,
        2.0
    );
    assert_eq!(m.get("outpost_refused_records", &[])?, 2.0);
    assert_eq!(m.get("outpost_uplink_protocol_fallback", &[])?, 0.0);
    Ok(())
}

#[test]
fn shipped_defaults_refuse_what_the_mqtt5_broker_cannot_take_and_keep_flowing() -> anyhow::Result<()>
{
    big_readings("big-defaults", |_| {}, "5", SeqSource::UserProperty)
}

#[test]
fn mqtt311_with_a_configured_limit_refuses_the_same_and_keeps_flowing() -> anyhow::Result<()> {
    big_readings(
        "big-mqtt311",
        |cfg| {
            cfg.protocol = Some(UpstreamProtocol::V311);
            cfg.upstream_max_packet_size = Some(LIMIT.to_string());
        },
        "3.1.1",
        SeqSource::Nothing,
    )
}

#[test]
fn mqtt311_without_a_limit_names_the_record_that_breaks_the_link() -> anyhow::Result<()> {
    let dir = TestDir::new("big-mqtt311-unknown-limit")?;
    let (_cloud, consumer, mut gw, _cfg) = setup(&dir, |cfg| {
        cfg.protocol = Some(UpstreamProtocol::V311);
    })?;
    let small: Vec<(String, u64)> = (0..5).map(|c| (SMALL.to_owned(), c)).collect();
    let mut readings: Vec<RawReading> = small
        .iter()
        .map(|(t, c)| (t.clone(), payload(t, *c, 100)))
        .collect();
    readings.push((BIG.to_owned(), blob(1, BIG_SIZES[1])));
    sensor(&dir, &gw, &readings)?;
    let msgs = wait_for_readings(&consumer, &mut gw, &small, Duration::from_secs(60))?;
    check_upstream_delivery(
        &msgs,
        NODE,
        &[SMALL.to_owned()],
        100,
        &small,
        SeqSource::Nothing,
    )?;
    let status = gw.wait_status(
        "runtime.uplink_failing_seq and uplink_failing_reason",
        Duration::from_secs(60),
        |s| {
            let r = UplinkReport::from_status(s);
            r.failing_seq.is_some() && r.failing_reason.as_deref().is_some_and(|t| !t.is_empty())
        },
    )?;
    eprintln!("status: {status:#}");
    Ok(())
}
