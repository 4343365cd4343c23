//! Time that does not lie: the gateway's wall clock jumps a year forward, then a year back
//! (from a year ahead to a year behind the real time), while a sensor publishes and the uplink is
//! down, with `storage.ttl = "1h"`. Nothing acked is deleted early: the TTL runs on the store's
//! own running time, which only moves forward (storage/src/lib.rs, "Time"). With a wall-clock TTL
//! the +1 year jump would expire every buffered reading within one expiry pass (at most 5 s).
//!
//! The jump is real for the gateway process only: libfaketime (Debian's `faketime`, LD_PRELOAD)
//! with an offset file it re-reads on every call (`FAKETIME_NO_CACHE`), the monotonic clock left
//! alone (`FAKETIME_DONT_FAKE_MONOTONIC`), as NTP stepping the clock of a board without an RTC
//! would leave it. Afterwards the uplink comes back and every acked reading arrives.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, SeqSource, Subscriber,
    SubscriberSpec, TestDir, check_upstream_delivery, in_ci, json_u64, wait_for_readings,
};

const NODE: &str = "gw1";
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const YEAR_S: i64 = 365 * 24 * 3600;

fn set_offset(file: &Path, seconds: i64) -> Result<()> {
    std::fs::write(file, format!("{seconds:+}\n"))?;
    Ok(())
}

#[test]
fn wall_clock_jumps_of_a_year_either_way_delete_nothing_early() -> Result<()> {
    if !Path::new(LIBFAKETIME).exists() {
        assert!(
            !in_ci(),
            "{LIBFAKETIME} missing (apt: faketime) and CI=true"
        );
        eprintln!("SKIP: {LIBFAKETIME} missing (apt: faketime)");
        return Ok(());
    }
    let dir = TestDir::new("clock-jump")?;
    let offset = dir.join("faketime-offset");
    set_offset(&offset, 0)?;
    // The cloud consumer's persistent session is saved before the uplink goes down, so it is
    // subscribed again before the gateway can reconnect.
    let mut cloud = Mosquitto::start_on(&dir, Mosquitto::reserve_port()?, true)?;
    let mut sub_spec = SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#"));
    sub_spec.client_id = "cloud-consumer".to_owned();
    sub_spec.session_expiry = Some(3600);
    let consumer = Subscriber::spawn(&dir, "cloud", &sub_spec)?;
    cloud.wait_saved()?;
    cloud.stop()?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    cfg.shipped_storage = true;
    cfg.ttl = Some("1h".to_owned());
    let mut gw = Outpost::start_with_env(
        &dir,
        &cfg,
        &[
            ("LD_PRELOAD", LIBFAKETIME.to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ],
    )?;

    let mut acked = Vec::new();
    let mut topics = Vec::new();
    for (phase, seconds) in [("now", 0), ("plus-1y", YEAR_S), ("minus-1y", -YEAR_S)] {
        set_offset(&offset, seconds)?;
        let topic = format!("clock/{phase}");
        acked.extend(
            Publisher::spawn(
                &dir,
                &format!("pub-{phase}"),
                &PublisherSpec::new(gw.port(), &[topic.as_str()], 2_000),
            )?
            .finish(Duration::from_secs(120))?,
        );
        topics.push(topic);
        // Longer than the store's longest expiry interval (5 s): a wall-clock TTL would have
        // deleted the readings of the earlier phases by now.
        std::thread::sleep(Duration::from_secs(7));
        let s = gw.status_json()?;
        assert_eq!(
            json_u64(&s, &["store", "expired_total"]),
            Some(0),
            "after the jump to {phase}, nothing expired: {s:#}"
        );
        // The gateway's own records (device registry, resources) are buffered too.
        assert!(
            json_u64(&s, &["buffered_records"]) >= Some(u64::try_from(acked.len())?),
            "after the jump to {phase}, every acked reading is still buffered: {s:#}"
        );
    }
    set_offset(&offset, 0)?;

    cloud.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(300))?;
    let d = check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, SeqSource::UserProperty)?;
    eprintln!("delivery after the clock jumps: {d:?}");
    Ok(())
}
