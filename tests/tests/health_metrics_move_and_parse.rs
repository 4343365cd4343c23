//! `/metrics` is Prometheus text 0.0.4 that prometheus-client's own parser reads, every family
//! typed and documented, and its figures follow what happens: readings published to outpost
//! while the upstream is not there yet move `outpost_ingested_total` and `outpost_stored_total`
//! and the normal-priority backlog, with `outpost_uplink_connected` 0 and a sync lag; once the
//! cloud broker is up the backlog drains into `outpost_synced_total` and the uplink is 1.
//! Counters never go down between scrapes. `/healthz` and `/readyz` answer alongside.

use std::time::Duration;

use outpost_tests::{
    GatewayConfig, Mosquitto, Outpost, Publisher, PublisherSpec, Scrape, TestDir, health_get,
    scrape_metrics, wait_metrics,
};

const NODE: &str = "gw-metrics";
const TOPICS: [&str; 2] = ["sensors/a", "sensors/b"];

/// Every counter sample of `before` is <= the same sample in `after`.
fn counters_never_decrease(before: &Scrape, after: &Scrape) {
    for fam in before.families.iter().filter(|f| f.kind == "counter") {
        for s in &fam.samples {
            let labels: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(now) = after.value(&s.name, &labels) {
                assert!(
                    now >= s.value,
                    "counter {}{:?} went down: {} -> {now}",
                    s.name,
                    s.labels,
                    s.value
                );
            }
        }
    }
}

fn publish(dir: &TestDir, name: &str, port: u16, start: u64, count: u64) -> anyhow::Result<u64> {
    let mut spec = PublisherSpec::new(port, &TOPICS, count);
    spec.start = start;
    let acked = Publisher::spawn(dir, name, &spec)?.finish(Duration::from_secs(60))?;
    assert_eq!(
        acked.len() as u64,
        count * TOPICS.len() as u64,
        "every reading acked"
    );
    Ok(acked.len() as u64)
}

#[test]
fn metrics_parse_and_counters_move_as_readings_flow() -> anyhow::Result<()> {
    let dir = TestDir::new("health-metrics")?;
    // The cloud broker's port is known, but it is not running yet: readings wait in the store.
    let cloud_port = Mosquitto::reserve_port()?;
    let mut cfg = GatewayConfig::new(&dir, NODE, Some(cloud_port))?;
    // Resource samples and a check make every metric family of the gateway appear, so the
    // parse covers them all.
    cfg.resource_interval = Some("1s".to_owned());
    cfg.extra = format!(
        "[[check]]\nname = \"own-broker\"\nkind = \"tcp\"\naddress = \"127.0.0.1:{}\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\n\n",
        cfg.port
    );
    let hp = cfg.health_port;
    let mut gw = Outpost::start(&dir, &cfg)?;

    // The other endpoints.
    let healthz = outpost_tests::poll(
        "/healthz",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || Ok(Some(health_get(hp, "/healthz")?)),
    )?;
    assert_eq!(healthz.status, 200, "/healthz: {healthz:?}");
    assert_eq!(healthz.body.trim(), "ok", "/healthz body");
    let readyz = health_get(hp, "/readyz")?;
    assert_eq!(readyz.status, 200, "/readyz: {readyz:?}");
    let ready: serde_json::Value = serde_json::from_str(&readyz.body)?;
    assert_eq!(ready["ready"], true, "/readyz: {ready}");
    assert_eq!(ready["store_writable"], true, "/readyz: {ready}");
    assert_eq!(ready["broker_listening"], true, "/readyz: {ready}");

    // Wait until the resource sample and the check are in, so every family is there.
    let first = wait_metrics(
        hp,
        "resource and check families in /metrics",
        Duration::from_secs(30),
        |s| {
            s.value("outpost_process_resident_memory_bytes", &[])
                .is_some()
                && s.value(
                    "outpost_check_state",
                    &[("check", "own-broker"), ("state", "healthy")],
                ) == Some(1.0)
        },
    )?;
    assert!(
        first.content_type.starts_with("text/plain; version=0.0.4"),
        "Content-Type {:?}",
        first.content_type
    );
    for name in [
        "outpost_ingested",
        "outpost_stored",
        "outpost_synced",
        "outpost_backlog_records",
        "outpost_backlog_bytes",
        "outpost_sync_lag_seconds",
        "outpost_uplink_connected",
        "outpost_uplink_state",
        "outpost_evicted",
        "outpost_check_state",
        "outpost_check_runs",
        "outpost_process_resident_memory_bytes",
        "outpost_process_open_fds",
        "outpost_resource_cpu_percent",
        "outpost_resource_memory_total_bytes",
        "outpost_resource_disk_available_bytes",
    ] {
        let f = first
            .family(name)
            .unwrap_or_else(|| panic!("family {name} missing from /metrics:\n{}", first.text));
        assert!(!f.help.is_empty() && !f.samples.is_empty(), "{f:?}");
    }
    for (name, kind) in [
        ("outpost_ingested", "counter"),
        ("outpost_synced", "counter"),
        ("outpost_backlog_records", "gauge"),
        ("outpost_uplink_connected", "gauge"),
    ] {
        assert_eq!(
            first.family(name).map(|f| f.kind.as_str()),
            Some(kind),
            "{name}"
        );
    }
    assert_eq!(
        first.get("outpost_uplink_connected", &[])?,
        0.0,
        "no upstream yet"
    );
    assert_eq!(
        first.get("outpost_uplink_state", &[("state", "connecting")])?,
        1.0
    );
    assert!(first.get("outpost_process_resident_memory_bytes", &[])? > 0.0);
    assert!(first.get("outpost_process_open_fds", &[])? > 0.0);
    let ingested0 = first.get("outpost_ingested_total", &[])?;
    let stored0 = first.get("outpost_stored_total", &[])?;
    let synced0 = first.get("outpost_synced_total", &[])?;
    let normal0 = first.get("outpost_backlog_records", &[("priority", "normal")])?;
    assert_eq!(synced0, 0.0, "nothing synced without an upstream");
    assert_eq!(
        normal0, 0.0,
        "no readings yet (samples are low, checks high)"
    );

    // Readings while the upstream is down: ingested, stored and the normal backlog move by
    // exactly what was acked; nothing is synced; the lag grows.
    let n1 = publish(&dir, "pub1", gw.port(), 0, 25)? as f64;
    let offline = wait_metrics(
        hp,
        "the readings counted while offline",
        Duration::from_secs(30),
        |s| {
            s.value("outpost_stored_total", &[]) == Some(stored0 + n1)
                && s.value("outpost_backlog_records", &[("priority", "normal")]) == Some(n1)
        },
    )?;
    assert_eq!(offline.get("outpost_ingested_total", &[])?, ingested0 + n1);
    assert_eq!(offline.get("outpost_synced_total", &[])?, 0.0);
    assert_eq!(offline.get("outpost_uplink_connected", &[])?, 0.0);
    assert!(
        offline.get("outpost_sync_lag_seconds", &[])? > 0.0,
        "a backlog has a sync lag"
    );
    counters_never_decrease(&first, &offline);
    let lag_a = offline.get("outpost_sync_lag_seconds", &[])?;
    let later = wait_metrics(hp, "the sync lag to grow", Duration::from_secs(30), |s| {
        s.value("outpost_sync_lag_seconds", &[])
            .is_some_and(|l| l >= lag_a + 1.0)
    })?;
    counters_never_decrease(&offline, &later);

    // The cloud broker comes up: the uplink connects and the normal backlog drains.
    let _cloud = Mosquitto::start_on(&dir, cloud_port, false)?;
    let online = wait_metrics(
        hp,
        "uplink connected and the backlog drained",
        Duration::from_secs(60),
        |s| {
            s.value("outpost_uplink_connected", &[]) == Some(1.0)
                && s.value("outpost_backlog_records", &[("priority", "normal")]) == Some(0.0)
        },
    )?;
    assert!(
        online.get("outpost_synced_total", &[])? >= n1,
        "every reading synced: {}",
        online.get("outpost_synced_total", &[])?
    );
    assert_eq!(
        online.get("outpost_uplink_state", &[("state", "connected")])?,
        1.0
    );
    counters_never_decrease(&later, &online);

    // Readings with the upstream up: counted, and synced too.
    let synced1 = online.get("outpost_synced_total", &[])?;
    let n2 = publish(&dir, "pub2", gw.port(), 1000, 25)? as f64;
    let after = wait_metrics(
        hp,
        "the online readings counted and synced",
        Duration::from_secs(30),
        |s| {
            s.value("outpost_stored_total", &[]) == Some(stored0 + n1 + n2)
                && s.value("outpost_synced_total", &[])
                    .is_some_and(|v| v >= synced1 + n2)
                && s.value("outpost_backlog_records", &[("priority", "normal")]) == Some(0.0)
        },
    )?;
    assert_eq!(
        after.get("outpost_ingested_total", &[])?,
        ingested0 + n1 + n2
    );
    assert!(after.get("outpost_broker_publishes_received_total", &[])? >= n1 + n2);
    assert!(
        after.get("outpost_sync_published_total", &[])?
            >= after.get("outpost_synced_total", &[])?
    );
    counters_never_decrease(&online, &after);
    // The last scrape is validated like every other (scrape_metrics fails on any problem).
    scrape_metrics(hp)?;
    gw.check_alive()?;
    Ok(())
}
