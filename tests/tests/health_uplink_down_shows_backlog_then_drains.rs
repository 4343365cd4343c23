//! Uplink down: with the cloud broker SIGKILLed, the endpoint's `/status` shows
//! `runtime.uplink_state` "connecting" with the last error, and while readings are published
//! `buffered_records` (normal priority) grows and `oldest_unsynced_age_ms` grows; `/metrics`
//! agrees (uplink 0, backlog, sync lag). Uplink back (the broker restarted on the same port, the
//! consumer's persistent session restored): the backlog drains to 0, the state is "connected",
//! and every acked reading arrives upstream.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, SeqSource, Subscriber,
    SubscriberSpec, TestDir, check_upstream_delivery, json_str, json_u64, scrape_metrics,
    wait_for_readings, wait_health_status,
};
use serde_json::Value;

const NODE: &str = "gw-uplink";
const TOPICS: [&str; 2] = ["line/a", "line/b"];
const PER_BATCH: u64 = 20;
const WAIT: Duration = Duration::from_secs(30);

fn uplink_state(s: &Value) -> Option<&str> {
    json_str(s, &["runtime", "uplink_state"])
}

#[test]
fn uplink_down_shows_a_growing_backlog_and_its_age_then_drains() -> anyhow::Result<()> {
    let dir = TestDir::new("health-uplink")?;
    let mut cloud = Mosquitto::start_on(&dir, Mosquitto::reserve_port()?, true)?;
    let mut sub_spec = SubscriberSpec::new(cloud.port(), &format!("outpost/{NODE}/#"));
    sub_spec.client_id = "uplink-consumer".to_owned();
    sub_spec.session_expiry = Some(3600);
    let consumer = Subscriber::spawn(&dir, "cloud", &sub_spec)?;

    let cfg = GatewayConfig::new(&dir, NODE, Some(cloud.port()))?;
    let hp = cfg.health_port;
    let mut gw = Outpost::start(&dir, &cfg)?;
    wait_health_status(hp, "uplink connected", WAIT, |s| {
        uplink_state(s) == Some("connected")
    })?;

    cloud.wait_saved()?;
    cloud.kill()?;
    let down = wait_health_status(hp, "uplink_state connecting", WAIT, |s| {
        uplink_state(s) == Some("connecting")
    })?;
    assert!(
        json_str(&down, &["runtime", "uplink_last_error"]).is_some(),
        "the last uplink error is shown: {down:#}"
    );
    assert_eq!(json_u64(&down, &["buffered_records"]), Some(0), "{down:#}");

    // Three batches, a moment apart: the backlog and the age of its oldest record grow.
    let mut acked = Vec::new();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for batch in 0..3u64 {
        let mut spec = PublisherSpec::new(gw.port(), &TOPICS, PER_BATCH);
        spec.start = batch * PER_BATCH;
        let got = Publisher::spawn(&dir, &format!("pub{batch}"), &spec)?
            .finish(Duration::from_secs(60))?;
        assert_eq!(got.len() as u64, PER_BATCH * TOPICS.len() as u64);
        acked.extend(got);
        let want = acked.len() as u64;
        let prev_age = seen.last().map_or(0, |(_, a)| *a);
        let s = wait_health_status(
            hp,
            &format!("{want} buffered records, older than {prev_age} ms"),
            WAIT,
            |s| {
                json_u64(s, &["buffered_records"]) == Some(want)
                    && json_u64(s, &["oldest_unsynced_age_ms"]).is_some_and(|a| a > prev_age)
            },
        )?;
        assert_eq!(uplink_state(&s), Some("connecting"), "{s:#}");
        assert_eq!(
            json_u64(&s, &["buffered_by_priority", "normal"]),
            Some(want),
            "{s:#}"
        );
        let age = json_u64(&s, &["oldest_unsynced_age_ms"]).unwrap_or(0);
        seen.push((want, age));
        let m = scrape_metrics(hp)?;
        assert_eq!(m.get("outpost_uplink_connected", &[])?, 0.0);
        assert_eq!(
            m.get("outpost_uplink_state", &[("state", "connecting")])?,
            1.0
        );
        assert!(
            m.get("outpost_backlog_records", &[("priority", "normal")])? >= want as f64,
            "metrics backlog"
        );
        assert!(m.get("outpost_sync_lag_seconds", &[])? > 0.0, "metrics lag");
        // Let the oldest record age visibly before the next batch.
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("backlog while down (records, oldest age ms): {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1),
        "backlog and its age grow: {seen:?}"
    );

    // Uplink back.
    cloud.restart()?;
    let msgs = wait_for_readings(&consumer, &mut gw, &acked, Duration::from_secs(60))?;
    let up = wait_health_status(hp, "the backlog drained and uplink connected", WAIT, |s| {
        uplink_state(s) == Some("connected") && json_u64(s, &["buffered_records"]) == Some(0)
    })?;
    assert!(
        up.get("oldest_unsynced_age_ms").is_some_and(Value::is_null),
        "no unsynced age once drained: {up:#}"
    );
    assert!(
        json_u64(&up, &["runtime", "reconnects"]) >= Some(1),
        "{up:#}"
    );
    let m = scrape_metrics(hp)?;
    assert_eq!(m.get("outpost_uplink_connected", &[])?, 1.0);
    assert_eq!(
        m.get("outpost_backlog_records", &[("priority", "normal")])?,
        0.0
    );
    assert!(m.get("outpost_synced_total", &[])? >= acked.len() as f64);
    let topics: Vec<String> = TOPICS.iter().map(|t| (*t).to_owned()).collect();
    check_upstream_delivery(&msgs, NODE, &topics, 100, &acked, SeqSource::UserProperty)?;
    Ok(())
}
